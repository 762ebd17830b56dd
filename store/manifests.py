"""Promotion manifests: the promotions a keyed redemption with ``apply_promotions`` asked,
in the order it asked them (serve/promotions.py says why). The first attempt's list is
kept; every later attempt with the key reads it back. Swept with the idempotency keys of
the key's bucket (store/shards.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from engine.routing import bucket_of

# Inserted when the key has none yet; the row that stands is returned either way. A row
# inserted by a concurrent attempt that is not yet visible to this statement's snapshot
# comes back empty: the caller reads again.
_FIX = (
    "WITH new AS (INSERT INTO promotion_manifests (key, bucket, fingerprint, promotions, created_at)"
    " VALUES ($1, $2, $3, $4::text[], $5) ON CONFLICT (key) DO NOTHING RETURNING fingerprint, promotions)"
    " SELECT fingerprint, promotions FROM new"
    " UNION ALL SELECT fingerprint, promotions FROM promotion_manifests WHERE key = $1"
    " AND NOT EXISTS (SELECT 1 FROM new)"
)
_READ = "SELECT fingerprint, promotions FROM promotion_manifests WHERE key = $1"
# Expired manifests of a shard's buckets, one chunk per statement.
_DELETE_EXPIRED = (
    "DELETE FROM promotion_manifests WHERE key = ANY(ARRAY("
    "SELECT key FROM promotion_manifests WHERE bucket = ANY($1::int2[]) AND created_at < $2"
    " LIMIT $3))"
)


async def fix(
    db: Any, key: str, fingerprint: bytes, promotions: list[str], now: datetime
) -> tuple[bytes, list[str]]:
    """The manifest of ``key``: ``(fingerprint, promotions)`` as given now when the key
    has none, else as its first attempt wrote them."""
    for _ in range(3):
        row = await db.fetchrow(_FIX, key, bucket_of(key), fingerprint, promotions, now)
        if row is None:
            row = await db.fetchrow(_READ, key)
        if row is not None:
            return bytes(row["fingerprint"]), list(row["promotions"])
        # the row that stood in the way went between the two statements (swept): again
    raise RuntimeError(f"the promotion manifest of {key!r} could not be written")


async def delete_expired(conn: Any, buckets: list[int], before: datetime, chunk: int) -> int:
    """Delete one chunk of ``buckets``' manifests created before ``before``; how many went."""
    status = await conn.execute(_DELETE_EXPIRED, buckets, before, chunk)
    return int(status.split()[-1])
