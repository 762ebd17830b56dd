"""Group commit: everything a shard decided in the last few milliseconds is persisted in one
transaction, and every caller waiting for durability is released by that one commit.

While a commit is in flight, new decisions pile up for the next one, so under load the
batch grows by itself and is written as soon as the commit before it returns; when idle, a
decision waits at most ``window_s`` before it is written. A batch that cannot be written
after a few tries is fatal for the shard: its memory is ahead of the database, so it must
not answer again until it has reloaded. A batch refused by the fence (a newer owner holds
the shard) is fatal at once, without retries: this writer will never commit again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from engine import errors
from engine.events import Event

log = logging.getLogger(__name__)


class WriteBehind:
    def __init__(
        self,
        *,
        drain: Callable[[], list[Event]],
        persist: Callable[[Sequence[Event]], Awaitable[None]],
        on_fatal: Callable[[BaseException], None],
        window_s: float = 0.002,
        max_batch: int = 2048,
        retries: int = 3,
        observe: Callable[[int, float, bool], None] | None = None,
    ) -> None:
        """``observe(events, seconds, ok)`` hears of every commit attempt (for metrics)."""
        self._drain = drain
        self._persist = persist
        self._on_fatal = on_fatal
        self.window_s = window_s
        self.max_batch = max_batch
        self.retries = retries
        self._observe = observe
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._failed: BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._run())
        # figures for stats/metrics
        self.batches = 0
        self.events_written = 0
        self.last_batch = 0
        self.max_batch_seen = 0
        self.commit_seconds = 0.0

    def durable(self) -> asyncio.Future[None]:
        """A future that resolves once everything decided so far is committed."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._failed is not None:
            fut.set_exception(self.failure())
            return fut
        self._waiters.append(fut)
        self._wake.set()
        return fut

    @property
    def failed(self) -> bool:
        return self._failed is not None

    def failure(self) -> errors.Unavailable:
        """The error callers get once the writer has failed for good."""
        if isinstance(self._failed, errors.Fenced):
            return errors.Fenced("this shard was replaced by a newer owner; retry")
        return errors.Unavailable("shard storage failed; the shard is restarting")

    @property
    def waiting(self) -> int:
        """Callers waiting for the next commit (durable acks)."""
        return len(self._waiters)

    def poke(self) -> None:
        """Events are pending but nobody waits (fast ack): write them soon anyway."""
        self._wake.set()

    async def flush(self) -> None:
        await self.durable()

    async def _run(self) -> None:
        busy = False
        while True:
            await self._wake.wait()
            self._wake.clear()
            # The window gathers a batch when the shard was idle. Under load the decisions
            # made during the last commit already form the next batch: waiting on top of
            # the commit would only add latency (and, with a fixed number of callers,
            # cost throughput).
            if self.window_s > 0 and not busy and len(self._waiters) < self.max_batch:
                await asyncio.sleep(self.window_s)
            waiters, self._waiters = self._waiters, []
            events = self._drain()
            try:
                if events:
                    await self._write(events)
            except Exception as exc:  # storage is gone or fenced: fail waiters, stop
                self._failed = exc
                log.error("group commit failed: %r", exc)
                for w in waiters + self._waiters:
                    if not w.done():
                        w.set_exception(self.failure())
                self._on_fatal(exc)
                return
            for w in waiters:
                if not w.done():
                    w.set_result(None)
            busy = bool(events) and bool(self._waiters)

    async def _write(self, events: Sequence[Event]) -> None:
        delay = 0.05
        for attempt in range(self.retries):
            t0 = time.perf_counter()
            try:
                await self._persist(events)
            except Exception as exc:
                self._report(len(events), time.perf_counter() - t0, False)
                if attempt + 1 == self.retries or isinstance(exc, errors.Fenced):
                    raise
                log.warning("group commit attempt %d failed: %r; retrying", attempt + 1, exc)
                await asyncio.sleep(delay)
                delay *= 4
                continue
            took = time.perf_counter() - t0
            self.commit_seconds += took
            self._report(len(events), took, True)
            self.batches += 1
            self.events_written += len(events)
            self.last_batch = len(events)
            self.max_batch_seen = max(self.max_batch_seen, len(events))
            return

    def _report(self, events: int, seconds: float, ok: bool) -> None:
        # A metrics bug must never look like a storage failure (which is fatal).
        if self._observe is not None:
            try:
                self._observe(events, seconds, ok)
            except Exception:
                log.exception("commit observer failed")

    async def close(self) -> None:
        if self._failed is None and not self._task.done():
            await self.durable()
        self._task.cancel()
