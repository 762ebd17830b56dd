"""A shard: a thin adapter around :class:`engine.shard_state.ShardState` (its Ray actor is
``actors/shard_actor.py``).

It owns the buckets ``b`` with ``b % shards == shard_id``, decides in memory, and hands
its events to the group-commit writer. In ``durable`` ack mode an answer leaves only after
the batch holding its decision has committed; in ``fast`` mode it leaves at once and the
decision is committed within about one batch window (the loss window if the process dies).

Batch entry points take and return msgpack bytes: one Ray call carries many requests and
the payload is (de)serialised by msgspec instead of pickle. Beside the payload, the
gateway may pass ``request_ids`` (one per request, in order) so the shard's logs name the
HTTP requests they are about; callers that pass none (``VoucherEngine``) work unchanged.

Observability (``actors/observability.py``): one metrics update per batch (decisions by
op and outcome, batch size), per commit (latency, events), and per second (queue depths);
a DEBUG line per batch with its request ids, an INFO line per batch that had rejections
(with each rejected request's id and error code, never the voucher code), and a WARNING
with the batch's ids when a batch fails as a whole.
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

import msgspec
import psutil
import ray

from actors.calls import call as _call
from actors.gcpolicy import settle_heap
from actors.observability import ShardMetrics
from actors.write_behind import WriteBehind
from engine import errors
from engine.audit import Actor
from engine.campaigns import Campaign
from engine.events import Event, ImportedCode, Rejection
from engine.qualification import QualifyRequest, qualify_request, ranked
from engine.routing import BUCKETS, assignment_key, bucket_of
from engine.settings import Settings
from engine.shard_state import CampaignStats, Outcome, RedeemRequest, ShardState
from store.fencing import Fence
from store.key_claims import KeyClaims
from store.pools import open_pool
from store.shards import PgShardStore, ShardStore

log = logging.getLogger(__name__)

_req_list = msgspec.msgpack.Decoder(list[RedeemRequest])
_ref_list = msgspec.msgpack.Decoder(list[tuple[str, str | None]])
_enc = msgspec.msgpack.Encoder()
_campaign_dec = msgspec.msgpack.Decoder(Campaign)
_outs = msgspec.msgpack.Decoder(list[Outcome])
_campaigns_dec = msgspec.msgpack.Decoder(list[Campaign])
_qualify_dec = msgspec.msgpack.Decoder(QualifyRequest)
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


class ShardCore:
    """Everything the actor does, without Ray, so it can be driven in-process."""

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

    # --- batches -------------------------------------------------------------------------

    async def redeem_many(
        self, payload: bytes, request_ids: list[str | None] | None = None
    ) -> bytes:
        return await self._decided("redeem", payload, request_ids)

    async def reserve_many(
        self, payload: bytes, request_ids: list[str | None] | None = None
    ) -> bytes:
        return await self._decided("reserve", payload, request_ids)

    async def _decided(
        self, op: str, payload: bytes, request_ids: list[str | None] | None
    ) -> bytes:
        """A redeem or reserve batch: decided, acknowledged, answered within the
        decision deadline."""
        t0 = time.perf_counter()
        try:
            outs = await self._deadline(self._decide(op, payload))
            self._observe(op, outs, request_ids)
        except Exception as exc:
            self._batch_failed(op, exc, request_ids)
            raise
        return self._answer(outs, t0)

    async def _decide(self, op: str, payload: bytes) -> list[Outcome]:
        with self._answering.batch():
            await self.ready()
            state, writer = self._loaded()
            fn = state.redeem_one if op == "redeem" else state.reserve_one
            outs = await self.keys.decide(
                self.store, op, _req_list.decode(payload), self._units(fn, writer)
            )
            if op == "redeem":
                self.decisions += len(outs)
            await self._ack(writer)
            return outs

    async def validate_many(
        self, payload: bytes, request_ids: list[str | None] | None = None
    ) -> bytes:
        t0 = time.perf_counter()
        try:
            await self.ready_within_deadline()
            outs = [self.state.validate_one(r) for r in _req_list.decode(payload)]
            self._observe("validate", outs, request_ids)
        except Exception as exc:
            self._batch_failed("validate", exc, request_ids)
            raise
        return self._answer(outs, t0)

    def _answer(self, outs: list[Outcome], t0: float) -> bytes:
        self.batch_calls += 1
        self.batch_seconds += time.perf_counter() - t0
        return _enc.encode(outs)

    def _observe(self, op: str, outs: list[Outcome], request_ids: list[str | None] | None) -> None:
        """Metrics and logs of one decided (and, when it writes, acknowledged) batch: one
        pass over the outcomes, log records built only when their level is enabled. Never
        raises: the batch is decided, its answer must leave."""
        try:
            self._report(op, outs, request_ids)
        except Exception:
            log.exception("recording %s batch metrics failed", op, extra={"shard": self.shard_id})

    def _report(self, op: str, outs: list[Outcome], request_ids: list[str | None] | None) -> None:
        failed = self.metrics.batch(op, outs)
        n = len(outs)
        if request_ids is not None and len(request_ids) != n:
            request_ids = None  # a confused caller: better no ids than wrong ones
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s batch of %d decided",
                op,
                n,
                extra={
                    "shard": self.shard_id,
                    "op": op,
                    "size": n,
                    "rejected": len(failed),
                    "request_ids": request_ids,
                },
            )
        if failed and log.isEnabledFor(logging.INFO):
            ids = request_ids
            rejections = [
                {"request_id": ids[i] if ids is not None else None, "error": code}
                for i, code in failed
            ]
            log.info(
                "%s: %d of %d rejected",
                op,
                len(failed),
                n,
                extra={
                    "shard": self.shard_id,
                    "op": op,
                    # the one affected request, when there is one; else see ``rejections``
                    "request_id": rejections[0]["request_id"] if len(rejections) == 1 else None,
                    "rejections": rejections,
                },
            )

    def _batch_failed(
        self, op: str, exc: BaseException, request_ids: list[str | None] | None
    ) -> None:
        log.warning(
            "%s batch failed: %s",
            op,
            getattr(exc, "code", None) or exc.__class__.__name__,
            extra={
                "shard": self.shard_id,
                "op": op,
                "error": getattr(exc, "code", None) or exc.__class__.__name__,
                "request_id": request_ids[0] if request_ids and len(request_ids) == 1 else None,
                "request_ids": request_ids,
            },
        )

    async def refs_many(self, op: str, payload: bytes) -> bytes:
        """``rollback`` / ``confirm`` / ``release`` of ``[(id, idempotency_key)]``."""
        if op not in ("rollback", "confirm", "release"):
            raise errors.InvalidInput(f"unknown operation {op!r}")
        outs = await self._deadline(self._refs(op, payload))
        self._observe(op, outs, None)
        return _enc.encode(outs)

    async def _refs(self, op: str, payload: bytes) -> list[Outcome]:
        with self._answering.batch():
            await self.ready()
            state, writer = self._loaded()
            fn = getattr(state, f"{op}_one")
            outs = await self.keys.decide(
                self.store, op, _ref_list.decode(payload), self._units(lambda item: fn(*item), writer)
            )
            await self._ack(writer)
            return outs

    async def assign_many(
        self, campaign_id: str, customers: list[str], fallback: bool = True
    ) -> bytes:
        """Assign codes to customers this shard decides for (``hash(campaign, customer)``).

        A customer whose code cannot come from this shard's part of the bank gets one from
        another shard's (``fallback``): the peers are first asked whether one of them
        already gave the customer a code (a run interrupted between the two steps), then,
        in a fixed order, to assign one; this shard records the result, so the customer's
        one assignment stays decided here and a re-run returns the same code. While a
        customer's fallback is in flight, other requests for them wait for its answer.
        """
        await self.ready()
        state, writer = self._loaded()
        outs: list[Outcome | None] = []
        waits: dict[int, asyncio.Future[Outcome]] = {}
        for i, cust in enumerate(customers):
            fut = self._inflight.get((campaign_id, cust))
            if fallback and isinstance(cust, str) and not self.state.owns(
                bucket_of(assignment_key(campaign_id, cust))
            ):
                # the customer's assignments are decided by another shard (a caller with
                # a stale topology); a peer's fallback call is the one exception
                outs.append(_not_owner(cust))
            elif fut is not None:
                waits[i] = fut
                outs.append(None)
            else:
                outs.append(state.assign_one(campaign_id, cust))
                writer.mark()
        dry: dict[str, list[int]] = {}
        for i, o in enumerate(outs):
            if o is not None and o.rejection is not None and o.rejection.error == "bank_exhausted":
                dry.setdefault(customers[i], []).append(i)
        if fallback and dry and self.shards > 1 and self.peer is not None:
            loop = asyncio.get_running_loop()
            mine = {c: loop.create_future() for c in dry}
            for c, f in mine.items():
                self._inflight[(campaign_id, c)] = f
            try:
                found = await self._fallback(campaign_id, list(dry))
            except BaseException as exc:
                for f in mine.values():
                    f.set_exception(exc)
                    f.exception()  # retrieved: no "never retrieved" warning
                self._commit_later()  # the batch's local decisions are still persisted
                raise
            finally:
                for c in mine:
                    self._inflight.pop((campaign_id, c), None)
            for c, out in found.items():
                mine[c].set_result(out)
                for i in dry[c]:
                    outs[i] = out
        for i, fut in waits.items():
            outs[i] = await asyncio.shield(fut)
        await self._ack(writer)
        done = [o for o in outs if o is not None]
        self._observe("assign", done, None)
        return _enc.encode(done)

    async def _fallback(self, campaign_id: str, customers: list[str]) -> dict[str, Outcome]:
        """Codes for ``customers`` from the other shards' banks, recorded here."""
        assert self.peer is not None
        others = [(self.shard_id + k) % self.shards for k in range(1, self.shards)]
        result: dict[str, Outcome] = {}
        # 1. a peer that already gave a customer a code (interrupted run) gives it again
        known = await asyncio.gather(
            *[_call(self.peer(k).assignments_of.remote(campaign_id, customers)) for k in others]
        )
        earlier: dict[str, str] = {}
        for part in known:
            for cust, code in part.items():
                earlier.setdefault(cust, code)
        for cust, code in earlier.items():
            result[cust] = self._record(campaign_id, cust, code)
        # 2. the rest: each peer in turn assigns what it can
        left = [c for c in customers if c not in result]
        for k in others:
            if not left:
                break
            raw = await _call(self.peer(k).assign_many.remote(campaign_id, left, False))
            still: list[str] = []
            for cust, out in zip(left, _outs.decode(raw), strict=True):
                if out.assignment is not None:
                    result[cust] = self._record(campaign_id, cust, out.assignment.code)
                elif out.rejection is not None and out.rejection.error == "bank_exhausted":
                    still.append(cust)
                else:
                    result[cust] = out
            left = still
        for cust in left:
            result[cust] = Outcome(
                rejection=Rejection(
                    "bank_exhausted", f"campaign {campaign_id} has no available code left"
                )
            )
        return result

    def _record(self, campaign_id: str, customer_id: str, code: str) -> Outcome:
        try:
            return Outcome(assignment=self.state.record_foreign(campaign_id, customer_id, code))
        except errors.VoucherError as exc:
            return Outcome(rejection=Rejection(exc.code, exc.message))

    async def assignments_of(self, campaign_id: str, customers: list[str]) -> dict[str, str]:
        await self.ready()
        return self.state.assignments_of(campaign_id, customers)

    # --- campaigns and the bank ---------------------------------------------------------

    async def put_campaign(self, payload: bytes) -> int:
        """Apply a campaign change (a newer version only; ended stays ended) and confirm
        it: returns the version held here, once the change's voids are committed and every
        batch decided before it has answered."""
        await self.ready()
        c = _campaign_dec.decode(payload)
        self.state.put_campaign(c)
        await self._settle()
        return self.state.campaign(c.id).version

    async def put_campaigns(self, payload: bytes) -> int:
        """:meth:`put_campaign` for many campaigns (the coordinator's re-broadcast when it
        starts); returns how many changed here."""
        await self.ready()
        changed = sum(self.state.put_campaign(c) for c in _campaigns_dec.decode(payload))
        await self._settle()
        return changed

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

    async def add_codes(self, campaign_id: str, codes: list[str]) -> int:
        """Add new codes to the bank; duplicates of known codes are skipped. Returns how
        many were added (persisted with COPY before they become redeemable). An ended
        campaign takes no new codes."""
        await self.ready()
        campaign = self.state.campaign(campaign_id)
        if campaign.state == "ended":
            raise errors.CannotGenerateEnded(f"campaign {campaign_id} has ended")
        if not all(self.state.owns(bucket_of(c)) for c in codes):
            raise errors.NotOwner(f"codes of buckets shard {self.shard_id} does not own; retry")
        fresh = self.state.claim_new_codes(codes)
        if not fresh:
            return 0
        balance = campaign.gift_balance if campaign.is_gift_card else None
        assert self.store is not None
        try:
            await self.store.copy_codes(campaign_id, fresh, balance)
        except BaseException:
            self.state.abandon_codes(fresh)
            raise
        self.state.admit_codes(campaign_id, fresh)
        return len(fresh)

    async def import_codes(self, campaign_id: str, rows: list[ImportedCode]) -> list[str]:
        """Add a shop's own codes to the bank, as :meth:`add_codes` adds generated ones;
        returns the codes refused because a code of that name exists (in any campaign:
        every code of this shard's buckets is held here)."""
        await self.ready()
        campaign = self.state.campaign(campaign_id)
        if campaign.state == "ended":
            raise errors.CannotGenerateEnded(f"campaign {campaign_id} has ended")
        if not all(self.state.owns(bucket_of(r.code)) for r in rows):
            raise errors.NotOwner(f"codes of buckets shard {self.shard_id} does not own; retry")
        fresh = set(self.state.claim_new_codes([r.code for r in rows]))
        taken = [r.code for r in rows if r.code not in fresh]
        new = [r for r in rows if r.code in fresh]
        if not new:
            return taken
        balance = campaign.gift_balance if campaign.is_gift_card else None
        assert self.store is not None
        try:
            await self.store.copy_imported(campaign_id, new, balance)
        except BaseException:
            self.state.abandon_codes(fresh)
            raise
        self.state.admit_imported(campaign_id, new)
        return taken

    async def record_assignments(self, campaign_id: str, pairs: list[tuple[str, str]]) -> None:
        """Record, on the shard deciding each customer's assignments, that they hold the
        code (imported for them): the first record wins, so publications and issuance
        answer the same code afterwards. Answered once in Postgres."""
        await self.ready()
        _, writer = self._loaded()
        for customer_id, code in pairs:
            out = self._record(campaign_id, customer_id, code)
            writer.mark()
            if out.rejection is not None:
                raise errors.from_code(out.rejection.error, out.rejection.message)
        await self._ack(writer)
        await writer.durable()

    async def codes_held(self) -> int:
        """Codes in this shard's memory (every campaign, void ones included)."""
        await self.ready()
        return len(self.state.codes)

    async def codes_in_campaign(self, campaign_id: str) -> int:
        await self.ready()
        return self.state.codes_in_campaign(campaign_id)

    async def limit_usage(self, campaign_id: str) -> tuple[int, int]:
        await self.ready()
        return self.state.limit_usage(campaign_id)

    async def stats(self, campaign_id: str) -> bytes:
        await self.ready()
        return _enc.encode(self.state.stats(campaign_id))

    async def voucher(self, code: str) -> dict[str, Any]:
        await self.ready()
        return self.state.voucher(code)

    async def qualify(self, payload: bytes) -> bytes:
        """The offers this shard would apply now to a customer's order, best first
        (:func:`engine.qualification.qualify`), as :class:`engine.qualification.Ranked`: a
        read, answered within the decision deadline. Holds past their TTL expire on the
        way, as on every decision."""
        await self.ready_within_deadline()
        answer = qualify_request(self.state, _qualify_dec.decode(payload))
        if self.state.events:
            self._commit_later()
        return _enc.encode(ranked(answer))

    async def control(self, code: str, changes: dict[str, Any], actor: Actor) -> dict[str, Any]:
        """A shop's change to one code (see :meth:`ShardState.control`), answered once it
        is in Postgres with its event and audit entry, whatever the ack mode."""
        async def decide() -> dict[str, Any]:
            await self.ready()
            state, writer = self._loaded()
            with self._answering.batch():
                out = state.control(code, changes, actor)
                writer.mark()
            await self._ack(writer)
            await writer.durable()
            return out

        return await self._deadline(decide())

    async def flush(self) -> None:
        """Return once everything decided so far is in Postgres, ended campaigns' voids
        included."""
        await self.ready()
        _, writer = self._loaded()
        await writer.durable()
        await self.voids_done()

    async def info(self) -> dict[str, Any]:
        await self.ready()
        _, w = self._loaded()
        return {
            "shard_id": self.shard_id,
            "pid": os.getpid(),
            "rss": psutil.Process().memory_info().rss,
            "codes": len(self.state.codes),
            "redemptions": len(self.state.redemptions),
            "decisions": self.decisions,
            "batches": w.batches,
            "events_written": w.events_written,
            "max_batch": w.max_batch_seen,
            "commit_seconds": w.commit_seconds,
            "refused": w.refused,
            "reloads": self.reloads,
            "batch_calls": self.batch_calls,
            "batch_seconds": self.batch_seconds,
            "loaded_at": self.loaded_at.isoformat() if self.loaded_at else None,
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
        }


def _not_owner(customer_id: str) -> Outcome:
    return Outcome(
        rejection=Rejection(
            errors.NotOwner.code,
            f"customer {customer_id}'s assignments belong to another shard; retry",
        )
    )


def _copy(exc: errors.Unavailable) -> errors.Unavailable:
    return type(exc)(exc.message)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a late result's exception as seen (its caller was answered already)."""
    if not task.cancelled():
        task.exception()


__all__ = ["ShardCore", "CampaignStats"]
