"""The readiness probe of Postgres: one kept connection and ``SELECT 1``."""

from __future__ import annotations

import asyncpg

from store.pools import connect


class Probe:
    """Answers whether the database takes a query within ``timeout_s``; a connection cut
    off mid-query is dropped and the next probe opens a new one."""

    def __init__(self, dsn: str, timeout_s: float) -> None:
        self.dsn = dsn
        self.timeout_s = timeout_s
        self._conn: asyncpg.Connection | None = None

    async def ping(self) -> None:
        """Raises when the database does not answer."""
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await connect(self.dsn, timeout=self.timeout_s)
            await self._conn.fetchval("SELECT 1", timeout=self.timeout_s)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()
