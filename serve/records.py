"""A gateway replica's reader of a shop's records in Postgres (code lists, redemption
history) and its runner of code exports.

Reads are single keyset pages on the replica's own small pool (``store.records``). Exports
are jobs in Postgres (``store.exports``): the replica that accepts one runs it at once, a
chunk per transaction, renewing its lease with every chunk; every replica also looks, every
``SWEEP_S``, for running exports whose lease ran out (the replica running them stopped) and
continues them where they stopped. The same sweep marks deleted the exports older than the
retention (``VOUCHER_EXPORT_RETENTION_DAYS``) and deletes the files of deleted exports, a
few chunks per statement, for at most ``PURGE_S`` of the sweep.
Nothing here touches a shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from engine.audit import Actor
from engine.routing import new_id
from store import audit, exports
from store.pools import LazyPool

log = logging.getLogger("voucher.exports")

LEASE_S = 30.0
SWEEP_S = 2.0
PURGE_S = 1.0  # of each sweep, at most, deleting the files of deleted exports
ATTEMPTS = 5  # failed runs of one export on a replica before it is marked failed


class Records:
    """The replica's pool for records and its export runner (started with the replica's
    event loop, or on first use when built outside one)."""

    def __init__(
        self, dsn: str, size: int = 4, *, lease_s: float = LEASE_S, retention_s: float = 7 * 86400.0
    ) -> None:
        self.db = LazyPool(dsn, size)
        self.runner = f"gw-{os.getpid()}-{os.urandom(4).hex()}"
        self.lease_s = lease_s
        self.retention_s = retention_s
        self._running: dict[str, asyncio.Task[None]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._failures: dict[str, int] = {}
        with contextlib.suppress(RuntimeError):  # no running loop: started on first use
            asyncio.get_running_loop()
            self.start()

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def pool(self) -> Any:
        self.start()
        return await self.db()

    async def start_export(
        self, campaign_id: str, fmt: str, status: int | None, actor: Actor
    ) -> dict[str, Any]:
        """A new export, already running on this replica, with its audit entry (one
        transaction: a shop sees who took its codes out)."""
        db = await self.pool()
        async with db.acquire() as conn, conn.transaction():
            job = await exports.create(
                conn, new_id("exp", 0, os.urandom), campaign_id, fmt, status, self.runner,
                self.lease_s, actor.id,
            )
            change = {"export_id": job["id"], "format": fmt, "status": job["status"]}
            await audit.record(conn, actor, "exports.create", "campaign", campaign_id, change)
        self._run(job["id"])
        return job

    async def delete_export(self, export_id: str, actor: Actor) -> bool:
        """Delete an export, running or finished, with its audit entry (one transaction);
        False when there is none. Its file's chunks are purged by the sweeps."""
        db = await self.pool()
        async with db.acquire() as conn, conn.transaction():
            gone = await exports.delete(conn, export_id)
            if gone is None:
                return False
            campaign_id, state = gone
            change = {"export_id": export_id, "state": state}
            await audit.record(conn, actor, "exports.delete", "campaign", campaign_id, change)
        return True  # a runner's next step finds it deleted and stops

    def _run(self, export_id: str) -> None:
        if export_id not in self._running:
            task = asyncio.get_running_loop().create_task(self._drive(export_id))
            self._running[export_id] = task
            task.add_done_callback(lambda _: self._running.pop(export_id, None))

    async def _drive(self, export_id: str) -> None:
        db = await self.db()
        try:
            while True:
                async with db.acquire() as conn:
                    outcome = await exports.step(conn, export_id, self.runner, self.lease_s)
                if outcome != "more":
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures = self._failures[export_id] = self._failures.get(export_id, 0) + 1
            if failures >= ATTEMPTS:
                log.error("export %s failed %d times, the last: %s", export_id, failures, exc)
                with contextlib.suppress(Exception):
                    await exports.fail(db, export_id, self.runner, f"{type(exc).__name__}: {exc}")
                return
            # Left running: its lease runs out and a sweep (here or elsewhere) retries it.
            log.warning("export %s stopped at a chunk and will be continued: %s", export_id, exc)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            try:
                db = await self.db()
                for export_id in await exports.claim(db, self.runner, self.lease_s):
                    log.info("continuing export %s", export_id)
                    self._run(export_id)
                await exports.expire(db, datetime.now(UTC) - timedelta(seconds=self.retention_s))
                # deleted exports' files: a few chunks per statement, for at most PURGE_S
                until = time.monotonic() + PURGE_S
                while await exports.purge(db) == exports.PURGE_CHUNKS and time.monotonic() < until:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("export sweep failed (retried in %.0f s): %s", SWEEP_S, exc)

    async def close(self) -> None:
        tasks = [t for t in (self._sweeper, *self._running.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.db.close()
