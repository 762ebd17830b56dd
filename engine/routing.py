"""Which shard owns what.

A code belongs to one of ``BUCKETS`` virtual buckets by a stable hash (crc32, the same in
every process, unlike ``hash()``), and a bucket to shard ``bucket % shards``. Rows in
Postgres carry the bucket, so changing the shard count needs no data migration: a shard
reloads the buckets it owns. Redemption and reservation ids embed their bucket so a
rollback or confirm can be routed without a lookup.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

BUCKETS = 1024
_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def bucket_of(key: str) -> int:
    return zlib.crc32(key.encode()) % BUCKETS


def shard_of_bucket(bucket: int, shards: int) -> int:
    return bucket % shards


def shard_of(key: str, shards: int) -> int:
    return bucket_of(key) % shards


def assignment_key(campaign_id: str, customer_id: str) -> str:
    """Assignments of one customer in one campaign are decided by one shard."""
    return f"{campaign_id}\x1f{customer_id}"


def new_id(prefix: str, bucket: int, random_bytes: Callable[[int], bytes]) -> str:
    """``<prefix>_<bucket as 3 hex digits><20 random base36 chars>``."""
    raw = random_bytes(20)
    tail = "".join(_ID_ALPHABET[b % 36] for b in raw)
    return f"{prefix}_{bucket:03x}{tail}"


def bucket_of_id(ident: str) -> int | None:
    """The bucket embedded in an id made by :func:`new_id`, or None if malformed."""
    _, sep, rest = ident.partition("_")
    if not sep or len(rest) != 23:
        return None
    try:
        b = int(rest[:3], 16)
    except ValueError:
        return None
    return b if b < BUCKETS else None
