"""A code's own Postgres record read outside its shard: its metadata (not held in the
shard's memory)."""

from __future__ import annotations

import json
from typing import Any

from store.pools import Db


async def metadata_of(db: Db, code: str) -> dict[str, Any] | None:
    raw = await db.fetchval("SELECT metadata FROM vouchers WHERE code = $1", code)
    return None if raw is None else dict(json.loads(raw))
