"""Events: every state change a shop cares about, with a stable id.

``record`` is called inside the transaction that makes the change, so an event exists
exactly when its change does. Types: ``redemption.succeeded``, ``redemption.rolled_back``,
``voucher.published``, ``voucher.updated``, ``campaign.created|updated|activated|paused|ended``,
``export.completed``.
"""

from __future__ import annotations

import os
from typing import Any

from engine import metadata
from engine.routing import new_id
from engine.webhooks import EVENT_TYPES
from store.pools import Db

TYPES = EVENT_TYPES  # every type a shop's webhooks may subscribe to

_INSERT = (
    "INSERT INTO events (id, type, campaign_id, resource_id, data)"
    " VALUES ($1, $2, $3, $4, $5::jsonb) ON CONFLICT (id) DO NOTHING"
)


async def record(
    db: Db,
    type: str,
    data: dict[str, Any],
    *,
    campaign_id: str | None = None,
    resource_id: str | None = None,
    event_id: str | None = None,
) -> str:
    """Record one event and return its id. ``event_id`` makes a retried write of the same
    change one event (e.g. derived from the changed record's own id and version)."""
    if type not in TYPES:
        raise ValueError(f"unknown event type {type!r}")
    eid = event_id or new_id("evt", 0, os.urandom)
    await db.execute(_INSERT, eid, type, campaign_id, resource_id, metadata.encoded(data))
    return eid
