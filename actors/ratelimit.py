"""The GCRA script (``engine/gcra.py``) called through redis-py.

The gateway's limiter (``serve/ratelimit.py``) calls it here whenever its own pipelined
connection is not up; the delivery workers take their send permits with :func:`take`.
A server that does not know the script yet (first call, ``SCRIPT FLUSH``, a failover)
answers ``NOSCRIPT``, and the script is sent whole once.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from engine.gcra import (
    GCRA_LUA,
    GCRA_MULTI_LUA,
    GCRA_MULTI_SHA,
    GCRA_SHA,
    check_args,
    multi_args,
    permits,
    split_multi,
)


async def run(redis: Redis, keys: list[str], args: list[Any]) -> list[Any]:
    """One check's answer (KEYS and ARGV of ``GCRA_LUA``)."""
    try:
        res = await redis.evalsha(GCRA_SHA, len(keys), *keys, *args)
    except NoScriptError:
        res = await redis.eval(GCRA_LUA, len(keys), *keys, *args)
    return list(res)


async def run_many(redis: Redis, groups: list[tuple[list[str], list[Any]]]) -> list[list[Any]]:
    """Several checks' answers in one script call, in order."""
    keys, args = multi_args(groups)
    try:
        raw = await redis.evalsha(GCRA_MULTI_SHA, len(keys), *keys, *args)
    except NoScriptError:
        raw = await redis.eval(GCRA_MULTI_LUA, len(keys), *keys, *args)
    return split_multi(raw, len(groups))


async def take(redis: Redis, key: str, rate: float, burst: float, want: int) -> tuple[int, float]:
    """Up to ``want`` permits from ``key``'s bucket: (granted, seconds until one more)."""
    checks = [(key, rate, burst, want)]
    return permits(await run(redis, [key], check_args("take", checks, None, 0)))
