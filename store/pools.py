"""Every Postgres connection of the engine is opened here: pools (:func:`open_pool`), pools
opened on first use (:class:`LazyPool`) and single connections (:func:`connect`).

A *writer* pool (a shard, the coordinator, the issuer, the notification dispatcher) has
bounded command and connect timeouts and a server-side limit on idle transactions; a plain
pool (the HTTP deployments, the delivery workers) keeps asyncpg's defaults.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeAlias, TypeVar

import asyncpg

T = TypeVar("T")
#: what a statement runs on: a pool (one of its connections) or a connection
Db: TypeAlias = asyncpg.Pool | asyncpg.Connection

# A writer frozen inside a transaction (a paused process, a partition) holds its fence's
# share lock, and the new owner's claim waits for it: the server ends such a transaction
# after this long, so a takeover waits at most that.
IDLE_IN_TRANSACTION_MS = 15_000

_WRITER_OPTIONS: dict[str, Any] = {
    "command_timeout": 60,
    "statement_cache_size": 256,
    "timeout": 10,  # to connect: a database that is away answers unavailable in bounded time
    "server_settings": {"idle_in_transaction_session_timeout": str(IDLE_IN_TRANSACTION_MS)},
}


async def open_pool(dsn: str, size: int, *, writer: bool = False) -> asyncpg.Pool:
    """A pool of 1..``size`` connections; ``writer`` adds the writers' timeouts and settings."""
    pool = await asyncpg.create_pool(
        dsn, min_size=1, max_size=size, **(_WRITER_OPTIONS if writer else {})
    )
    assert pool is not None
    return pool


class LazyPool:
    """A pool opened on first use (a constructor that cannot await) and only once, even
    when the first calls arrive together; an open that failed is tried again by the next
    call."""

    def __init__(self, dsn: str, size: int, *, writer: bool = False) -> None:
        self.dsn = dsn
        self.size = size
        self.writer = writer
        self.pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def __call__(self) -> asyncpg.Pool:
        if self.pool is None:
            async with self._lock:
                if self.pool is None:
                    self.pool = await open_pool(self.dsn, self.size, writer=self.writer)
        return self.pool

    async def close(self) -> None:
        if self.pool is not None:
            pool, self.pool = self.pool, None
            await pool.close()


async def connect(dsn: str, timeout: float | None = None) -> asyncpg.Connection:
    """One connection of its own (tools, probes, one-off statements)."""
    if timeout is None:
        return await asyncpg.connect(dsn)
    return await asyncpg.connect(dsn, timeout=timeout)


async def with_connection(
    dsn: str, fn: Callable[[asyncpg.Connection], Coroutine[Any, Any, T]]
) -> T:
    """``fn`` over a connection opened for it and closed after."""
    conn = await connect(dsn)
    try:
        return await fn(conn)
    finally:
        await conn.close()
