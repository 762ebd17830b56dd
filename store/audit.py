"""The audit log: who (a user or an API key) did what to which resource, and the change.

``record`` is called inside the transaction that makes the change, so an entry exists
exactly when its change does; :func:`changing` gives a change and its entry one
transaction. :func:`page` reads the log newest first, by keyset on the entry id.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg

from engine import metadata
from engine.audit import Actor, cursor_after
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


@asynccontextmanager
async def changing(db: Db) -> AsyncIterator[asyncpg.Connection]:
    """A connection in a transaction (a pooled one, or ``db`` itself) for a change and
    its audit entry."""
    if isinstance(db, asyncpg.Connection):
        async with db.transaction():
            yield db
        return
    async with db.acquire() as conn, conn.transaction():
        yield conn


_PAGE = (
    "SELECT id, at, actor_kind, actor_id, actor_key_id, action, resource_type, resource_id,"
    " change FROM audit_log"
    " WHERE ($1::text IS NULL OR resource_type = $1)"
    " AND ($2::text IS NULL OR resource_id = $2)"
    " AND ($3::text IS NULL OR actor_id = $3 OR actor_key_id = $3)"
    " AND ($4::timestamptz IS NULL OR at >= $4)"
    " AND ($5::bigint IS NULL OR id < $5)"
    " ORDER BY id DESC LIMIT $6"
)


async def page(
    db: Db,
    *,
    resource_type: str | None = None,
    resource_id: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    before: int | None = None,
    limit: int = 100,
) -> dict[str, Any]:
    """Entries newest first, below entry ``before``; ``actor`` matches a user id or an
    API key id. ``{"data": [...], "next_cursor": str | None}``."""
    rows = await db.fetch(
        _PAGE, resource_type, resource_id, actor, since, before, limit + 1
    )
    more = len(rows) > limit
    rows = rows[:limit]
    data = [
        {
            "id": r["id"],
            "at": r["at"],
            "actor": {"kind": r["actor_kind"], "id": r["actor_id"], "key_id": r["actor_key_id"]},
            "action": r["action"],
            "resource_type": r["resource_type"],
            "resource_id": r["resource_id"],
            "change": json.loads(r["change"]),
        }
        for r in rows
    ]
    return {"data": data, "next_cursor": cursor_after(rows[-1]["id"]) if more else None}
