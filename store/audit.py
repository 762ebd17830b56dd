"""The audit log: who (a user or an API key) did what to which resource, and the change.

``record`` is called inside the transaction that makes the change, so an entry exists
exactly when its change does.
"""

from __future__ import annotations

from typing import Any

from engine import metadata
from engine.audit import Actor
from store.pools import Db

_INSERT = (
    "INSERT INTO audit_log (actor_kind, actor_id, actor_key_id, action, resource_type,"
    " resource_id, change) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)"
)


async def record(
    db: Db, actor: Actor, action: str, resource_type: str, resource_id: str, change: dict[str, Any]
) -> None:
    """One entry; ``change`` is a JSON object (e.g. ``{"field": [before, after]}``)."""
    await db.execute(
        _INSERT,
        actor.kind,
        actor.id,
        actor.key_id,
        action,
        resource_type,
        resource_id,
        metadata.encoded(change),
    )
