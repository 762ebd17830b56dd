"""Plumbing the benchmarks share: waiting for a server to answer, one count query, and the
baseline worker shape of the delivery benchmarks (a Postgres pool and a Valkey client,
``concurrency`` loops popping jobs off one list until it is empty)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx
from redis.asyncio import Redis


def wait_http(url: str, timeout_s: float = 90.0) -> None:
    """Block until ``url`` answers 200; ``RuntimeError`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s")
        time.sleep(0.3)


async def fetch_count(dsn: str, sql: str, *args: Any) -> int:
    """The integer ``sql`` answers, over a connection of its own."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(sql, *args))
    finally:
        await conn.close()


JobFn = Callable[[Any, Redis, str], Awaitable[None]]
"""Handles one job (its id, decoded) with the worker's pool and Valkey client."""


async def drain_queue(dsn: str, redis_url: str, queue: str, concurrency: int, handle: JobFn) -> int:
    """Run ``concurrency`` loops over ``queue`` until it is empty; the number of jobs handled."""
    db = await asyncpg.create_pool(dsn, min_size=1, max_size=concurrency)
    assert db is not None
    redis = Redis.from_url(redis_url)
    done = 0

    async def job_loop() -> None:
        nonlocal done
        while True:
            job = await redis.rpop(queue)
            if job is None:
                return
            assert isinstance(job, bytes)
            await handle(db, redis, job.decode())
            done += 1

    try:
        await asyncio.gather(*(job_loop() for _ in range(concurrency)))
    finally:
        await redis.aclose()
        await db.close()
    return done
