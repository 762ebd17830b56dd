"""A shard's life around its :class:`engine.shard_state.ShardState`: loading it from
Postgres (and again after a failure), the group-commit writer and the background voids of
ended campaigns, housekeeping (expired holds and keys, the fencing epoch, catching up on
campaigns missed), and what every answer goes through: the decision deadline and the ack
in ``durable`` or ``fast`` mode. :class:`actors.shard.ShardCore` answers on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from actors.gcpolicy import settle_heap
from actors.observability import ShardMetrics
from actors.write_behind import WriteBehind
from engine import errors
from engine.events import Event
from engine.routing import BUCKETS
from engine.settings import Settings
from engine.shard_state import Outcome, ShardState
from store.fencing import Fence
from store.key_claims import KeyClaims
from store.pools import open_pool
from store.shards import PgShardStore, ShardStore

log = logging.getLogger(__name__)

# a re-sync that hangs must not hold up the rest of housekeeping
_SYNC_TIMEOUT_S = 10.0



T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


# rows per transaction of an ended campaign's background void
VOID_CHUNK = 20_000
# backoff between load attempts while the database is away
_LOAD_RETRY_FIRST_S = 0.2
_LOAD_RETRY_MAX_S = 5.0


class _Answering:
    """Decision batches between their decision and their answer. A campaign change is
    confirmed only after every batch decided before it has answered, so once the change
    is confirmed no answer decided under the old state is still to come."""

    def __init__(self) -> None:
        self._open: set[asyncio.Future[None]] = set()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._open.add(done)
        try:
            yield
        finally:
            self._open.discard(done)
            done.set_result(None)

    async def settled(self) -> None:
        if self._open:
            await asyncio.wait(list(self._open))


class ShardLife:
    """A shard's state, loaded and kept: what :class:`actors.shard.ShardCore` answers on.
    Like it, without Ray, so it can be driven in-process."""

    def __init__(self, shard_id: int, shards: int, dsn: str, settings: Settings) -> None:
        self.shard_id = shard_id
        self.shards = shards
        self.dsn = dsn
        self.settings = settings
        self.buckets = [b for b in range(BUCKETS) if b % shards == shard_id]
        self.state = self._new_state()
        self.store: ShardStore | None = None
        self.writer: WriteBehind | None = None
        # resolves once loaded (fails only when the shard retires); while loading keeps
        # failing, ``_load_error`` says why and callers are answered at once
        self._ready: asyncio.Future[None] | None = None
        self._attempt: asyncio.Future[None] | None = None
        self._load_error: str | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self.loaded_at: datetime | None = None
        self.decisions = 0
        # decision batches handled (redeem/validate/reserve) and their summed time inside
        # this actor, from the method's start to its answer (includes the durable wait)
        self.batch_calls = 0
        self.batch_seconds = 0.0
        self.metrics = ShardMetrics(shard_id)
        # handle of peer shard k (for assignment fallback); set by the actor
        self.peer: Callable[[int], Any] | None = None
        self._inflight: dict[tuple[str, str], asyncio.Future[Outcome]] = {}
        # the epoch this process claimed; once fenced or failed, ``stopped`` says why and
        # every call is refused at once
        self.fence: Fence | None = None
        self.stopped: errors.Unavailable | None = None
        # how the process ends: 1 = crash (Ray restarts it and it reloads), 0 = retired (its
        # topology was replaced: no restart); the Ray face and tests replace it
        self.exit_process: Callable[[int], None] = os._exit
        self.keys = KeyClaims(
            self.state, self.buckets, timedelta(seconds=settings.idempotency_ttl_s)
        )
        self._answering = _Answering()
        # highest campaigns.revision applied by sync_campaigns (0: none yet)
        self._campaign_revision = 0
        # ended campaigns whose rows are being voided in the background (this load's)
        self._voiding: dict[str, asyncio.Task[int]] = {}
        # one per load: a batch decided under an earlier one is never acknowledged
        self.incarnation = 0
        self.reloads = 0
        # the database server we loaded from (its start time): another one means a
        # restart or a failover, after which memory may hold what the server lost
        self._server: datetime | None = None

    def _new_state(self) -> ShardState:
        return ShardState(
            clock=utcnow,
            random_bytes=os.urandom,
            reservation_ttl=timedelta(seconds=self.settings.reservation_ttl_s),
            owned=self.buckets,
            idempotency_ttl=timedelta(seconds=self.settings.idempotency_ttl_s),
        )

    async def ready(self) -> None:
        """Return once loaded. While a load attempt runs, wait for it; while loading keeps
        failing (the database is away), raise ``unavailable`` at once: the loader goes on
        retrying by itself, so a failed start is never kept as the answer."""
        if self.stopped is not None:
            raise _copy(self.stopped)
        if self._ready is None:
            self._begin_load()
        assert self._ready is not None
        while not self._ready.done():
            if self._load_error is not None:
                raise errors.Unavailable(
                    f"shard {self.shard_id} is not loaded yet ({self._load_error}); retry"
                )
            assert self._attempt is not None
            await asyncio.shield(self._attempt)
        failed = self._ready.exception()
        if failed is not None:
            raise _copy(self.stopped) if self.stopped is not None else failed

    async def ready_within_deadline(self) -> None:
        """:meth:`ready` within the decision deadline; at once when loaded (the common
        case: no task, no timer)."""
        r = self._ready
        if self.stopped is None and r is not None and r.done() and not r.cancelled() and r.exception() is None:
            return
        await self._deadline(self.ready())

    def _begin_load(self) -> None:
        self._attempt = asyncio.get_running_loop().create_future()
        self._ready = asyncio.ensure_future(self._load_until_loaded())
        # a retired shard's failed load is answered by ``stopped``; never "unretrieved"
        self._ready.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _load_until_loaded(self) -> None:
        delay = _LOAD_RETRY_FIRST_S
        while True:
            attempt = self._attempt
            assert attempt is not None
            try:
                await self._load()
                self._load_error = None
                return
            except errors.Fenced:
                raise  # retired: never loads
            except Exception as exc:
                self._load_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning(
                    "shard %d load failed (%s); retrying in %.1f s",
                    self.shard_id,
                    self._load_error,
                    delay,
                    extra={"shard": self.shard_id},
                )
                self._attempt = asyncio.get_running_loop().create_future()
            finally:
                attempt.set_result(None)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _LOAD_RETRY_MAX_S)

    async def _load(self) -> None:
        # every attempt starts from empty memory: a failed one may have loaded half
        self.state = self._new_state()
        self.keys = KeyClaims(
            self.state, self.buckets, timedelta(seconds=self.settings.idempotency_ttl_s)
        )
        store = PgShardStore(await open_pool(self.dsn, 4, writer=True))
        # Claim the shard before reading anything: the claim waits for the old owner's
        # in-flight commit and fences it, so what we load is all it will ever commit.
        try:
            self._server = await store.claim(self.settings.namespace, self.shard_id, self.shards)
            self.fence, self.store = store.fence, store
            since = utcnow() - timedelta(seconds=self.settings.idempotency_ttl_s)
            await store.load(self.state, self.buckets, since)
        except errors.Fenced as exc:  # our topology was replaced: retire for good
            await store.close()
            self._stop(exc, code=0)
            raise
        except BaseException:
            self.store = self.fence = None
            store.terminate()
            raise
        state, store = self.state, self.store
        self.writer = WriteBehind(
            drain=state.drain,
            pending=lambda: len(state.events),
            persist=lambda evs: self._persist(store, evs),
            on_fatal=self._writer_failed,
            window_s=self.settings.batch_window_ms / 1000.0,
            max_batch=self.settings.batch_max,
            commit_timeout_s=self.settings.commit_timeout_s,
            observe=self.metrics.commit,
        )
        self.incarnation += 1
        if self.state.events:  # recovery found voids to re-apply
            await self.writer.durable()
        self._housekeeping = asyncio.ensure_future(self._housekeep())
        self.loaded_at = utcnow()
        # The loaded pool lives as long as the shard: out of the collector's sight, so a
        # full collection does not walk every code (actors/gcpolicy.py).
        settle_heap()
        log.info(
            "shard %d/%d loaded %d codes",
            self.shard_id,
            self.shards,
            len(self.state.codes),
            extra={"shard": self.shard_id, "codes": len(self.state.codes)},
        )

    async def _persist(self, store: ShardStore, events: Sequence[Event]) -> None:
        voided = await store.write(events, self.buckets)
        for campaign_id in voided:
            self._void_later(store, campaign_id)

    def _void_later(self, store: ShardStore, campaign_id: str) -> None:
        """Void an ended campaign's unredeemed rows in the background, chunk by chunk (its
        codes are void in memory already). Resumable: a load voids what is left."""
        # after a void already running (it may have passed rows committed since)
        before = self._voiding.get(campaign_id)
        task = asyncio.ensure_future(self._void(store, campaign_id, before))
        self._voiding[campaign_id] = task
        task.add_done_callback(_retrieve)

    async def _void(
        self, store: ShardStore, campaign_id: str, before: asyncio.Task[int] | None
    ) -> int:
        if before is not None and not before.done():
            await asyncio.wait([before])
        total, delay, t0 = 0, _LOAD_RETRY_FIRST_S, time.monotonic()
        while self.store is store:  # a reload starts its own void
            try:
                n = await store.void_chunk(campaign_id, self.buckets, VOID_CHUNK)
            except errors.Fenced as exc:
                self._writer_failed(exc)
                raise
            except Exception as exc:  # the database is away: go on when it is back
                log.warning(
                    "voiding campaign %s: %r; retrying in %.1f s",
                    campaign_id,
                    exc,
                    delay,
                    extra={"shard": self.shard_id, "campaign_id": campaign_id},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _LOAD_RETRY_MAX_S)
                continue
            total += n
            if n < VOID_CHUNK:
                break
            await asyncio.sleep(0)  # decisions go first
        if total:
            log.info(
                "voided %d codes of ended campaign %s in %.1f s",
                total,
                campaign_id,
                time.monotonic() - t0,
                extra={"shard": self.shard_id, "campaign_id": campaign_id},
            )
        return total

    async def voids_done(self) -> None:
        """Wait until the background voids of ended campaigns have finished."""
        while True:
            running = [t for t in self._voiding.values() if not t.done()]
            if not running:
                return
            await asyncio.wait(running)

    def _writer_failed(self, exc: BaseException) -> None:
        if isinstance(exc, errors.Fenced) and not isinstance(exc, errors.ClaimLost):
            self._die(exc)  # a newer owner holds the shard
        else:
            self._reload(exc)

    def _reload(self, exc: BaseException) -> None:
        """Memory may be ahead of the database (a commit failed or its outcome is unknown,
        or the server restarted or failed over): forget it and load again, in this
        process. Callers wait for the new load like at start."""
        if self.stopped is not None or self._ready is None or not self._ready.done():
            return
        self.reloads += 1
        log.error(
            "shard %d reloading its memory from Postgres: %r",
            self.shard_id,
            exc,
            extra={"shard": self.shard_id},
        )
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            self._housekeeping = None
        store, self.store, self.writer, self.fence = self.store, None, None, None
        self.incarnation += 1  # batches decided so far are never acknowledged
        if store is not None:
            store.terminate()
        # callers wait for the reload (within their deadline): a small shard reloads in
        # well under a second; if the load fails they are answered at once, as at start
        self._load_error = None
        self._begin_load()

    def _die(self, exc: BaseException) -> None:
        # Memory is ahead of the database (or another owner's): never answer from it
        # again. Exit so Ray restarts the actor, which claims anew and reloads.
        self._stop(exc, code=1)

    def _stop(self, exc: BaseException, *, code: int) -> None:
        if self.stopped is not None:
            return
        if isinstance(exc, errors.Fenced):
            self.stopped = errors.Fenced(f"shard {self.shard_id} was fenced: {exc}; retry")
        else:
            self.stopped = errors.Unavailable(
                f"shard {self.shard_id} storage failed; the shard is restarting"
            )
        log.error(
            "shard %d stopping (%s): %r",
            self.shard_id,
            "retired" if code == 0 else "exit",
            exc,
            extra={"shard": self.shard_id},
        )
        asyncio.get_running_loop().call_later(0.05, self.exit_process, code)

    async def _housekeep(self) -> None:
        ttl = timedelta(seconds=self.settings.idempotency_ttl_s)
        ticks = 0
        next_sync = time.monotonic() + self.settings.campaign_sync_s
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            if ticks % 2 == 0:
                await self._check_epoch()
            if time.monotonic() >= next_sync:
                next_sync = time.monotonic() + self.settings.campaign_sync_s
                await self._sync_quietly()
            if self.writer is not None:
                self.metrics.queues(len(self.state.events), self.writer.waiting)
            if self.state.expire_reservations():
                self._commit_later()
            if ticks % 300 == 0:
                try:
                    await self.expire_idempotency()
                except Exception as exc:  # the next sweep deletes what this one left
                    log.warning(
                        "deleting expired idempotency keys failed: %r",
                        exc,
                        extra={"shard": self.shard_id},
                    )
                    self.state.prune_idempotency(utcnow() - ttl)

    async def expire_idempotency(self) -> int:
        """Forget the idempotency keys older than the TTL, in memory and in Postgres (this
        shard's buckets only); returns how many rows were deleted."""
        assert self.store is not None
        return await self.keys.expire(self.store)

    async def _check_epoch(self) -> None:
        """An idle owner learns it was fenced without waiting for its next commit, and
        exits: a process cut off from Ray stops holding a replaced shard's memory."""
        if self.fence is None or self.store is None or self.stopped is not None:
            return
        try:
            epoch, server = await self.store.check_epoch(timeout=5)
        except Exception as exc:  # the database is away: the next commit will tell
            log.debug("epoch check failed: %r", exc, extra={"shard": self.shard_id})
            return
        if server != self._server:
            self._reload(errors.Unavailable("the database server restarted or failed over"))
        elif epoch is None or epoch < self.fence.epoch:
            self._reload(errors.ClaimLost(f"the database lost {self.fence.owner}'s claim"))
        elif epoch != self.fence.epoch:
            self._die(errors.Fenced(f"{self.fence.owner} is at epoch {epoch}, ours is {self.fence.epoch}"))

    def _commit_later(self) -> None:
        if self.writer is not None:
            self.writer.poke()

    def _loaded(self) -> tuple[ShardState, WriteBehind]:
        """The memory and writer of the current load (right after :meth:`ready`)."""
        if self.writer is None:  # a reload began since ready() returned
            raise errors.Unavailable(f"shard {self.shard_id} is reloading; retry")
        return self.state, self.writer

    def _units(self, fn: Callable[[T], Outcome], writer: WriteBehind) -> Callable[[T], Outcome]:
        """``fn`` marking where each decision's events end (the group commit cuts and
        isolates batches only there)."""

        def one(item: T) -> Outcome:
            out = fn(item)
            writer.mark()
            return out

        return one

    async def _ack(self, writer: WriteBehind) -> None:
        """Acknowledge what was decided with ``writer`` (the load it was decided in)."""
        if writer.failed:
            raise writer.failure()
        if writer is not self.writer:
            raise errors.Unavailable(f"shard {self.shard_id} reloaded; retry")
        if self.settings.ack_mode == "durable":
            await writer.durable()
        elif writer.behind() * 1000.0 > self.settings.fast_max_lag_ms:
            # Fast mode answers from memory only while the writer keeps up: behind a
            # stalled commit it waits for durability like durable mode, so a crash loses
            # at most the decisions of the lag bound.
            await writer.durable()
        else:
            writer.poke()

    async def _deadline(self, work: Awaitable[T]) -> T:
        """``work``'s result, or ``unavailable`` once the decision deadline passes. The
        work goes on (its decision stays decided and is committed if it can be), so a
        retry with the same idempotency key gets its answer."""
        task = asyncio.ensure_future(work)
        try:
            return await asyncio.wait_for(
                asyncio.shield(task), self.settings.decision_deadline_s
            )
        except TimeoutError:
            task.add_done_callback(_retrieve)
            raise errors.Unavailable(
                f"shard {self.shard_id} could not decide within"
                f" {self.settings.decision_deadline_s:g} s (storage is slow or away); the"
                " outcome is unknown: retry with the same Idempotency-Key"
            ) from None

    async def _settle(self) -> None:
        _, writer = self._loaded()
        if self.state.events:
            await writer.durable()
        await self._answering.settled()

    async def sync_campaigns(self) -> int:
        """Pull the campaigns changed in Postgres since the last pull and apply them, so a
        shard that missed a broadcast catches up by itself; returns how many changed."""
        await self.ready()
        assert self.store is not None
        rows = await self.store.campaigns_since(self._campaign_revision)
        changed = sum(self.state.put_campaign(c) for _, c in rows)
        if rows:
            self._campaign_revision = rows[-1][0]
        if self.state.events:
            self._commit_later()
        return changed

    async def _sync_quietly(self) -> None:
        try:
            changed = await asyncio.wait_for(self.sync_campaigns(), _SYNC_TIMEOUT_S)
        except Exception as exc:  # storage away or slow: the next pull retries
            log.warning(
                "campaign re-sync failed: %r", exc, extra={"shard": self.shard_id}
            )
            return
        if changed:
            log.info(
                "re-sync applied %d campaign change(s) this shard had not heard of",
                changed,
                extra={"shard": self.shard_id},
            )


def _copy(exc: errors.Unavailable) -> errors.Unavailable:
    return type(exc)(exc.message)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a late result's exception as seen (its caller was answered already)."""
    if not task.cancelled():
        task.exception()

