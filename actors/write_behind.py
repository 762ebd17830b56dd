"""Group commit: everything a shard decided in the last few milliseconds is persisted in one
transaction, and every caller waiting for durability is released by that one commit.

While a commit is in flight, new decisions pile up for the next one, so under load the
batch grows by itself and is written as soon as the commit before it returns; when idle, a
decision waits at most ``window_s`` before it is written.

Positions. Events are counted from the writer's start: ``drained`` have been taken for a
commit, ``committed`` are in the database. A caller of :meth:`durable` waits for the
position its events end at, so a batch that holds only part of the backlog releases just
the callers it covers. :meth:`mark` records where one decision's events end (its *unit*):
a batch holds at most ``max_batch`` events and is cut only between units, so no decision
is ever half-committed.

Failures.

* A batch the database refuses for its content (a constraint or data error: nothing of it
  was committed) is bisected along unit boundaries: the units before the refused one are
  committed, their callers released; the refused unit and everything after it are not.
* Any failure leaves memory ahead of the database: the writer stops for good (callers get
  ``unavailable``) and reports the failure to ``on_fatal``, after which the shard reloads
  its memory from Postgres. A commit with an unknown outcome (connection lost, timeout) is
  never retried as is: only a reload says what it left behind.
* A batch refused by the fence (a newer owner holds the shard) is fatal likewise.

Lag. :meth:`behind` is how long the oldest uncommitted decision has waited. Fast ack mode
answers from memory only while it stays below its bound, so the decisions a crash can lose
are the ones of that bound, not of however long a stalled commit hangs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from engine import errors
from engine.events import Event

log = logging.getLogger(__name__)

# SQLSTATE classes meaning "this statement's content was refused, nothing was written":
# 22 data exception (e.g. a NUL byte in text), 23 integrity constraint violation.
_REFUSED_CLASSES = ("22", "23")


def refused_for_content(exc: BaseException) -> bool:
    """The database refused the batch for what it holds (definitely not committed)."""
    state = getattr(exc, "sqlstate", None)
    return (
        isinstance(exc, asyncpg.PostgresError)
        and isinstance(state, str)
        and state[:2] in _REFUSED_CLASSES
    )


class BatchRefused(Exception):
    """One unit of a batch was refused by the database; the units before it committed."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"the database refused a decision: {cause}")
        self.cause = cause


class WriteBehind:
    def __init__(
        self,
        *,
        drain: Callable[[int], list[Event]],
        pending: Callable[[], int],
        persist: Callable[[Sequence[Event]], Awaitable[None]],
        on_fatal: Callable[[BaseException], None],
        window_s: float = 0.002,
        max_batch: int = 2048,
        commit_timeout_s: float = 10.0,
        observe: Callable[[int, float, bool], None] | None = None,
    ) -> None:
        """``drain(n)`` takes the oldest ``n`` pending events, ``pending()`` counts them.
        ``observe(events, seconds, ok)`` hears of every commit attempt (for metrics)."""
        self._drain = drain
        self._pending = pending
        self._persist = persist
        self._on_fatal = on_fatal
        self.window_s = window_s
        self.max_batch = max_batch
        self.commit_timeout_s = commit_timeout_s
        self._observe = observe
        self.drained = 0
        self.committed = 0
        # (position, future) in position order: released once committed reaches position
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        # positions where a decision's events end, beyond ``drained``
        self._units: deque[int] = deque()
        self._batch_units: list[int] = []  # the unit ends of the batch being written
        # (position, monotonic time it was known by), beyond ``committed``: the lag clock
        self._seen: deque[tuple[int, float]] = deque()
        self._wake = asyncio.Event()
        self._failed: BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._run())
        # figures for stats/metrics
        self.batches = 0
        self.events_written = 0
        self.last_batch = 0
        self.max_batch_seen = 0
        self.commit_seconds = 0.0
        self.refused = 0

    # --- what callers use ----------------------------------------------------------------

    def mark(self) -> None:
        """One decision's events end here: a batch may be cut after them."""
        end = self.drained + self._pending()
        if not self._units or self._units[-1] < end:
            self._units.append(end)

    def durable(self) -> asyncio.Future[None]:
        """A future that resolves once everything decided so far is committed."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._failed is not None:
            fut.set_exception(self.failure())
            return fut
        end = self.drained + self._pending()
        if end <= self.committed:
            fut.set_result(None)
            return fut
        self._note(end)
        self._waiters.append((end, fut))
        self._wake.set()
        return fut

    def poke(self) -> None:
        """Events are pending but nobody waits (fast ack): write them soon anyway."""
        self._note(self.drained + self._pending())
        self._wake.set()

    def behind(self) -> float:
        """Seconds the oldest decision not yet committed has waited (0 when none)."""
        if not self._seen:
            return 0.0
        return time.monotonic() - self._seen[0][1]

    @property
    def failed(self) -> bool:
        return self._failed is not None

    def failure(self) -> errors.Unavailable:
        """The error callers get once the writer has failed for good."""
        if isinstance(self._failed, errors.Fenced):
            return errors.Fenced("this shard was replaced by a newer owner; retry")
        return errors.Unavailable("shard storage failed; the shard is reloading")

    @property
    def waiting(self) -> int:
        """Callers waiting for a commit (durable acks)."""
        return len(self._waiters)

    async def flush(self) -> None:
        await self.durable()

    async def close(self) -> None:
        if self._failed is None and not self._task.done():
            await self.durable()
        self._task.cancel()

    # --- the loop ------------------------------------------------------------------------

    def _note(self, end: int) -> None:
        if end > self.committed and (not self._seen or self._seen[-1][0] < end):
            self._seen.append((end, time.monotonic()))

    async def _run(self) -> None:
        busy = False
        while True:
            await self._wake.wait()
            self._wake.clear()
            # The window gathers a batch when the shard was idle. Under load the decisions
            # made during the last commit already form the next batch: waiting on top of
            # the commit would only add latency (and, with a fixed number of callers,
            # cost throughput).
            if self.window_s > 0 and not busy and self._pending() < self.max_batch:
                await asyncio.sleep(self.window_s)
            events = self._take()
            if events:
                start = self.drained
                self.drained += len(events)
                try:
                    await self._write(start, events)
                except Exception as exc:  # refused, storage gone or fenced: stop
                    self._fail(exc)
                    return
                self._committed_to(self.drained)
            more = self._pending() > 0
            if more:
                self._wake.set()
            busy = bool(events) and (more or bool(self._waiters))

    def _take(self) -> list[Event]:
        """The next batch: at most ``max_batch`` events, cut after a whole unit (one unit
        larger than that goes whole)."""
        pending = self._pending()
        if pending <= self.max_batch:
            n = pending
        else:
            limit = self.drained + self.max_batch
            cut = 0
            for end in self._units:
                if end > limit:
                    break
                cut = end
            if cut <= self.drained:  # no unit ends within the cap: the first goes whole
                cut = next((e for e in self._units if e > self.drained), self.drained + pending)
            n = cut - self.drained
        units = self._units
        taken: list[int] = []
        while units and units[0] <= self.drained + n:
            taken.append(units.popleft())
        self._batch_units = taken
        return self._drain(n) if n else []

    def _committed_to(self, position: int) -> None:
        self.committed = position
        seen = self._seen
        while seen and seen[0][0] <= position:
            seen.popleft()
        waiters = self._waiters
        while waiters and waiters[0][0] <= position:
            fut = waiters.popleft()[1]
            if not fut.done():
                fut.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._failed = exc
        log.error("group commit failed: %r", exc)
        for _, w in self._waiters:
            if not w.done():
                w.set_exception(self.failure())
        self._waiters.clear()
        self._on_fatal(exc)

    async def _write(self, start: int, events: Sequence[Event]) -> None:
        try:
            await self._attempt(events)
        except Exception as exc:
            if not refused_for_content(exc):
                raise
            await self._isolate(start, events, exc)

    async def _attempt(self, events: Sequence[Event]) -> None:
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(self._persist(events), self.commit_timeout_s)
        except TimeoutError:
            self._report(len(events), time.perf_counter() - t0, False)
            raise errors.Unavailable(
                f"a group commit took longer than {self.commit_timeout_s:g} s"
            ) from None
        except Exception:
            self._report(len(events), time.perf_counter() - t0, False)
            raise
        took = time.perf_counter() - t0
        self.commit_seconds += took
        self._report(len(events), took, True)
        self.batches += 1
        self.events_written += len(events)
        self.last_batch = len(events)
        self.max_batch_seen = max(self.max_batch_seen, len(events))

    async def _isolate(self, start: int, events: Sequence[Event], cause: BaseException) -> None:
        """Commit the units of ``events`` before the one the database refuses, releasing
        their callers, then raise :class:`BatchRefused`. Invariant: ``events[lo:hi]`` on
        top of what is committed is refused, ``events[:lo]`` is committed."""
        bounds = self._bounds_within(start, len(events))
        lo, hi = 0, len(bounds) - 1  # indexes into bounds
        while hi - lo > 1:
            mid = (lo + hi) // 2
            part = events[bounds[lo] : bounds[mid]]
            try:
                await self._attempt(part)
            except Exception as exc:
                if not refused_for_content(exc):
                    raise
                cause = exc
                hi = mid
                continue
            lo = mid
            self._committed_to(start + bounds[lo])
        self.refused += 1
        log.error(
            "the database refused one decision (events %d..%d of a batch of %d): %r",
            bounds[lo],
            bounds[hi],
            len(events),
            cause,
        )
        raise BatchRefused(cause)

    def _bounds_within(self, start: int, n: int) -> list[int]:
        """Offsets (from ``start``) where units of the batch end, with 0 and ``n``."""
        return [0, *[e - start for e in self._batch_units if start < e < start + n], n]

    def _report(self, events: int, seconds: float, ok: bool) -> None:
        # A metrics bug must never look like a storage failure (which is fatal).
        if self._observe is not None:
            try:
                self._observe(events, seconds, ok)
            except Exception:
                log.exception("commit observer failed")
