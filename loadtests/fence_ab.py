"""The cost of fencing, measured A/B within one run of a benchmark.

Between rounds the benchmark swaps ``voucher_fence()`` in its own throw-away database for a
function that only returns 1, and back. The shards keep sending byte-for-byte the same
statements, so the difference between the rounds is exactly what fencing costs on the hot
path: the owner row look-up and its share lock inside every group commit.
"""

from __future__ import annotations

import re
from importlib import resources

import asyncpg

_NOOP = (
    "CREATE OR REPLACE FUNCTION voucher_fence(p_owner text, p_epoch bigint) RETURNS integer"
    " LANGUAGE sql VOLATILE AS 'SELECT 1'"
)


def _real() -> str:
    """The fence function exactly as its migration creates it."""
    sql = resources.files("store").joinpath("sql/0008_fencing.sql").read_text(encoding="utf-8")
    found = re.search(r"CREATE FUNCTION voucher_fence.*?\$\$;", sql, re.S)
    if found is None:
        raise RuntimeError("voucher_fence() not found in its migration")
    return found.group(0).replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


async def set_fence(dsn: str, *, on: bool) -> None:
    """Turn the fence check on (the real function) or off (a no-op) for every session."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(_real() if on else _NOOP)
    finally:
        await conn.close()
