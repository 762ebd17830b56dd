"""The gateway's micro-batcher: concurrent requests to one shard share one actor call.

An actor call costs about the same for one redemption as for a hundred, so the gateway
keeps, per (shard, op), a queue and at most ``max_inflight`` calls in flight:

* idle lane: a request goes out at once (on the next event-loop turn, so requests that
  arrive in the same turn share the call) -- no timer, no added latency;
* busy lane: requests queue while the call flies and go out together, up to ``max_batch``
  per call, as soon as a call returns.

The batch size thus follows the load by itself: one at a time when quiet, hundreds per call
at peak. A second (third...) call in flight overlaps the shard's group commit, which
otherwise would idle the lane for a whole batch window in durable ack mode.

Each request's id (``X-Request-ID``, from :data:`actors.observability.request_id_var` or
passed to ``submit``) travels with it: a call carries the list of its requests' ids beside
the msgpack payload, so the shard's logs name the HTTP requests. Per call, the batcher
records its size, round trip and failure, and the lane's queue depth and calls in flight
(Ray metrics, when given a :class:`~actors.observability.BatcherMetrics`).

Deadline: a request waits at most ``deadline_s`` for its answer, then gets
``unavailable`` (503, Retry-After; its outcome unknown, so a retry must carry the same
idempotency key); a call unanswered for that long (a frozen shard process) frees its lane
slot, and its late answer is dropped. Shards answer ``unavailable`` themselves a little
earlier (``decision_deadline_s``), so this bound only fires when a shard cannot answer at
all.

A request a shard refuses as ``not_owner`` (the shard count changed; it was not decided)
is routed again after the engine re-reads the topology, a few times at most; a call that
fails makes the engine re-read it too, so the client's retry goes to the new owner.

One batcher belongs to one event loop (the Serve replica's).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import ray

from actors.calls import call, settled
from actors.observability import BatcherMetrics, request_id_var
from actors.shard_socket import ShardChannel, connect
from engine import errors
from engine.routing import shard_of_bucket
from engine.shard_state import Outcome, RedeemRequest, route_bucket

OPS = ("redeem", "validate", "reserve")

_enc = msgspec.msgpack.Encoder()
log = logging.getLogger(__name__)
_REDIAL_S = 2.0  # between attempts to (re)connect a shard's socket
_outs = msgspec.msgpack.Decoder(list[Outcome])
_REROUTES = 3  # times one request refused as not_owner is routed again


@dataclass
class OpStats:
    batches: int = 0
    items: int = 0
    max_batch_size: int = 0
    failed_batches: int = 0


@dataclass
class BatcherStats:
    """Counters for metrics; totals over all shards."""

    batches: int = 0
    items: int = 0
    max_batch_size: int = 0
    failed_batches: int = 0
    #: sum over actor calls of their round trip (send -> answer decoded), seconds
    call_seconds: float = 0.0
    by_op: dict[str, OpStats] = field(default_factory=lambda: {op: OpStats() for op in OPS})

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    def record(self, op: str, size: int, failed: bool) -> None:
        for s in (self, self.by_op[op]):
            s.batches += 1
            s.items += size
            s.max_batch_size = max(s.max_batch_size, size)
            if failed:
                s.failed_batches += 1


_Waiter = tuple[RedeemRequest, "asyncio.Future[Outcome]", str | None]


class _Lane:
    __slots__ = ("shard", "op", "method", "queue", "inflight", "scheduled")

    def __init__(self, shard: int, op: str) -> None:
        self.shard = shard
        self.op = op
        self.method = f"{op}_many"
        self.queue: deque[_Waiter] = deque()
        self.inflight = 0
        self.scheduled = False


class MicroBatcher:
    """Coalesce concurrent ``submit`` calls per (shard, op) into ``<op>_many`` actor calls."""

    def __init__(
        self,
        engine: Any,
        *,
        max_batch: int = 256,
        max_inflight: int = 4,
        metrics: BatcherMetrics | None = None,
        channels: bool = False,
        deadline_s: float | None = None,
    ) -> None:
        """``engine`` is an :class:`actors.client.VoucherEngine` (only ``.shards`` and ``.n``
        are used: anything with shard handles whose ``<op>_many.remote(blob)`` returns an
        awaitable will do; ``remote(blob, request_ids)`` when the requests carry ids).
        ``metrics``: where to record batches and queue depths (none by default).
        ``channels``: send batches to shards on this node over their Unix socket
        (:mod:`actors.shard_socket`; asked for with ``shard.channel.remote()``), Ray calls
        otherwise and while a socket is being (re)connected. ``deadline_s``: the longest a
        request waits for its answer (None: no bound)."""
        if max_batch < 1 or max_inflight < 1:
            raise ValueError("max_batch and max_inflight must be >= 1")
        self.deadline_s = deadline_s
        self.engine = engine
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self.counters = BatcherStats()
        self.metrics = metrics
        self._lanes: dict[tuple[int, str], _Lane] = {}
        self._calls: set[asyncio.Future[None]] = set()  # calls in flight
        self._closed = False
        self.channels = channels
        self._channels: dict[int, ShardChannel] = {}
        self._dialing: dict[int, float] = {}  # shard -> when the last attempt started
        self._dial_tasks: set[asyncio.Task[None]] = set()
        self._reroutes: dict[asyncio.Future[Outcome], int] = {}
        listeners = getattr(engine, "on_topology", None)
        if listeners is not None:
            listeners.append(self._topology_changed)

    # --- public ------------------------------------------------------------------------

    async def submit(self, op: str, req: RedeemRequest, request_id: str | None = None) -> Outcome:
        """The shard's answer to ``req``: an Outcome with a result or a rejection.

        ``request_id`` (default: the current one, :data:`request_id_var`) goes to the shard
        with the request, for its logs.

        Raises :class:`engine.errors.Unavailable` (or whatever the actor call raised) when
        the call carrying this request failed as a whole.
        """
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
        if self._closed:
            raise errors.Unavailable("gateway is shutting down")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Outcome] = loop.create_future()
        if self.deadline_s is not None:
            timer = loop.call_later(self.deadline_s, _expire, fut, self.deadline_s)
            fut.add_done_callback(functools.partial(_cancel, timer))
        self._enqueue(op, (req, fut, request_id or request_id_var.get()), loop)
        return await fut

    def _enqueue(self, op: str, waiter: _Waiter, loop: asyncio.AbstractEventLoop) -> None:
        shard = shard_of_bucket(route_bucket(waiter[0].code), self.engine.n)
        lane = self._lanes.get((shard, op))
        if lane is None:
            lane = self._lanes[(shard, op)] = _Lane(shard, op)
        lane.queue.append(waiter)
        self._schedule(lane, loop)

    async def submit_many(self, op: str, reqs: list[RedeemRequest]) -> list[Outcome | BaseException]:
        """Submit several requests at once; answers (or the call's error) in input order."""
        return list(
            await asyncio.gather(*[self.submit(op, r) for r in reqs], return_exceptions=True)
        )

    async def direct(self, shard: int, op: str, payload: bytes) -> bytes:
        """One call to ``shard`` outside the batches (a read: ``qualify``), over the
        shard's Unix socket when one is connected, else a Ray call to its ``op`` method;
        the caller bounds the wait."""
        chan = self._channel(shard) if self.channels else None
        if chan is None:
            answer: bytes = await call(getattr(self.engine.shards[shard], op).remote(payload))
            return answer
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def settle(res: Any) -> None:
            if fut.done():  # the caller gave up (its deadline)
                return
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)

        chan.call(op, payload, None, settle)
        return await fut

    def stats(self) -> dict[str, Any]:
        """A snapshot for metrics: totals, per-op counters and the current backlog."""
        c = self.counters
        return {
            "batches": c.batches,
            "items": c.items,
            "max_batch": c.max_batch_size,
            "max_batch_size": c.max_batch_size,
            "failed_batches": c.failed_batches,
            "mean_batch_size": c.mean_batch_size,
            "call_seconds": c.call_seconds,
            "queued": self.queued,
            "inflight": self.inflight,
            "channels": sum(1 for c in self._channels.values() if c.usable),
            "by_op": {op: vars(s).copy() for op, s in c.by_op.items()},
        }

    @property
    def queued(self) -> int:
        return sum(len(lane.queue) for lane in self._lanes.values())

    @property
    def inflight(self) -> int:
        return sum(lane.inflight for lane in self._lanes.values())

    async def close(self) -> None:
        """Refuse new requests and wait for everything queued or in flight to be answered."""
        self._closed = True
        while self._calls or self.queued:
            if self._calls:
                await asyncio.gather(*list(self._calls), return_exceptions=True)
            else:
                await asyncio.sleep(0)
        for task in list(self._dial_tasks):
            task.cancel()
        for chan in list(self._channels.values()):
            chan.close()
        self._channels.clear()

    # --- machinery ---------------------------------------------------------------------

    def _schedule(self, lane: _Lane, loop: asyncio.AbstractEventLoop) -> None:
        # call_soon, not a direct pump: submits of the same loop turn join one batch.
        if not lane.scheduled:
            lane.scheduled = True
            loop.call_soon(self._pump, lane)

    def _pump(self, lane: _Lane) -> None:
        lane.scheduled = False
        if lane.shard >= self.engine.n:  # a lane of a replaced, larger topology
            loop = asyncio.get_running_loop()
            while lane.queue:
                self._enqueue(lane.op, lane.queue.popleft(), loop)
            return
        while lane.inflight < self.max_inflight and lane.queue:
            batch: list[_Waiter] = []
            while lane.queue and len(batch) < self.max_batch:
                waiter = lane.queue.popleft()
                if not waiter[1].done():  # a caller that gave up (cancelled) is not sent
                    batch.append(waiter)
            if not batch:
                continue
            lane.inflight += 1
            # The call leaves now, not when a task would first run (a loop turn later,
            # which under load is milliseconds); its answer settles the waiters by callback.
            t0 = time.perf_counter()
            loop = asyncio.get_running_loop()
            done: asyncio.Future[None] = loop.create_future()
            self._calls.add(done)
            done.add_done_callback(self._calls.discard)
            settle = functools.partial(self._settle_call, lane, batch, t0, done)
            if self.deadline_s is not None:
                # a shard that never answers (a frozen process) must not hold the slot
                timer = loop.call_later(
                    self.deadline_s,
                    settle,
                    errors.Unavailable(
                        f"shard {lane.shard} did not answer within {self.deadline_s:g} s; the"
                        " outcome is unknown: retry with the same Idempotency-Key"
                    ),
                )
                done.add_done_callback(functools.partial(_cancel, timer))
            try:
                blob = _enc.encode([w[0] for w in batch])
                ids = [w[2] for w in batch]
                chan = self._channel(lane.shard) if self.channels else None
                if chan is not None:
                    chan.call(lane.op, blob, ids if any(ids) else None, settle)
                    continue
                method = getattr(self.engine.shards[lane.shard], lane.method)
                # ids only when there are some: the plain call shape otherwise
                ref = method.remote(blob, ids) if any(ids) else method.remote(blob)
            except Exception as exc:  # e.g. an unserialisable payload
                settle(exc)
                continue
            if isinstance(ref, ray.ObjectRef):
                # Ray's thread hands the answer to the loop, which settles the waiters right
                # there: a task awaiting the ref would cost one more loop turn.
                ref.future().add_done_callback(
                    lambda cf, loop=loop, settle=settle: loop.call_soon_threadsafe(
                        _settle_future, settle, cf
                    )
                )
            else:  # any other awaitable (tests' fake shards)
                task = loop.create_task(_await(ref, settle))
                self._calls.add(task)
                task.add_done_callback(self._calls.discard)
        if self.metrics is not None:
            self.metrics.depth(lane.shard, lane.op, len(lane.queue), lane.inflight)

    def _settle_call(
        self, lane: _Lane, batch: list[_Waiter], t0: float, done: asyncio.Future[None], res: Any
    ) -> None:
        if done.done():  # the call's deadline answered it already: a late answer is dropped
            return
        try:
            self._settle(lane, batch, res, t0)
        finally:
            if not done.done():
                done.set_result(None)

    # --- direct lines to shards on this node ---------------------------------------------

    def _channel(self, shard: int) -> ShardChannel | None:
        """The shard's socket when connected; else None (and a connection attempt starts,
        at most one per shard every few seconds)."""
        chan = self._channels.get(shard)
        if chan is not None and chan.usable:
            return chan
        last = self._dialing.get(shard)
        now = time.monotonic()
        if last is None or (last > 0 and now - last > _REDIAL_S):
            self._dialing[shard] = -1.0  # attempt running
            task = asyncio.get_running_loop().create_task(self._dial(shard, now))
            self._dial_tasks.add(task)
            task.add_done_callback(self._dial_tasks.discard)
        return None

    async def _dial(self, shard: int, started: float) -> None:
        try:
            where = await call(self.engine.shards[shard].channel.remote())
            if where is not None and where[0] == _node_id():
                chan = await connect(where[1], on_lost=lambda c: self._lost(shard, c))
                if self._closed:
                    chan.close()
                else:
                    self._channels[shard] = chan
                    log.info("shard %d: decisions over its Unix socket %s", shard, where[1])
        except Exception as exc:  # Ray calls keep working meanwhile
            log.warning("shard %d: no direct line (%s); using Ray calls", shard, exc)
        finally:
            self._dialing[shard] = started

    def _topology_changed(self) -> None:
        """The shard handles changed: the sockets lead to processes that own other buckets."""
        for chan in list(self._channels.values()):
            chan.close()
        self._channels.clear()
        self._dialing.clear()

    def _refresh_topology(self) -> None:
        refresh = getattr(self.engine, "refresh", None)
        if refresh is None or self._closed:
            return
        task = asyncio.get_running_loop().create_task(refresh())
        self._dial_tasks.add(task)
        task.add_done_callback(self._dial_tasks.discard)

    async def _reroute(self, op: str, waiters: list[_Waiter]) -> None:
        """Route requests refused as ``not_owner`` again, after a topology look-up."""
        try:
            await self.engine.refresh()
        except Exception as exc:  # the look-up failing leaves the current handles
            log.warning("topology refresh failed: %r", exc)
        loop = asyncio.get_running_loop()
        for waiter in waiters:
            if not waiter[1].done():
                self._enqueue(op, waiter, loop)

    def _lost(self, shard: int, chan: ShardChannel) -> None:
        if self._channels.get(shard) is chan:
            del self._channels[shard]
            if not self._closed:
                log.warning("shard %d: direct line lost; Ray calls until it reconnects", shard)

    def _settle(self, lane: _Lane, batch: list[_Waiter], res: Any, t0: float) -> None:
        """Hand each waiter its outcome (``res``: the shard's answer) or the call's error
        (``res``: an exception); every waiter learns, none hangs. Then free the lane."""
        failed = True
        try:
            if isinstance(res, BaseException):
                raise res
            outs = _outs.decode(res)
            if len(outs) != len(batch):
                raise errors.Unavailable(
                    f"shard {lane.shard} answered {len(outs)} outcomes for {len(batch)} requests"
                )
            again: list[_Waiter] = []
            for waiter, out in zip(batch, outs, strict=True):
                fut = waiter[1]
                if fut.done():
                    continue
                if out.rejection is not None and out.rejection.error == errors.NotOwner.code:
                    tries = self._reroutes.get(fut, 0)
                    if tries < _REROUTES and not self._closed:
                        if not tries:
                            fut.add_done_callback(self._reroutes.pop)
                        self._reroutes[fut] = tries + 1
                        again.append(waiter)
                        continue
                fut.set_result(out)
            if again:
                task = asyncio.get_running_loop().create_task(self._reroute(lane.op, again))
                self._dial_tasks.add(task)
                task.add_done_callback(self._dial_tasks.discard)
            failed = False
        except errors.VoucherError as exc:
            if isinstance(exc, errors.Unavailable):
                self._refresh_topology()
            for _, fut, _ in batch:
                if not fut.done():
                    # One instance per waiter: a shared one would pile up tracebacks.
                    fut.set_exception(errors.rebuild(exc))
        except Exception as exc:
            # A bug or an undecodable answer.
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(exc)
        finally:
            took = time.perf_counter() - t0
            self.counters.call_seconds += took
            self.counters.record(lane.op, len(batch), failed)
            lane.inflight -= 1
            if lane.queue:  # what queued while the lane was full goes out at once
                self._pump(lane)
            if self.metrics is not None:
                m = self.metrics
                m.sent(lane.shard, lane.op, len(batch), took, failed)
                m.depth(lane.shard, lane.op, len(lane.queue), lane.inflight)


def _settle_future(settle: Callable[[Any], None], cf: concurrent.futures.Future[Any]) -> None:
    try:
        res: Any = settled(cf)
    except Exception as exc:
        res = exc
    settle(res)


async def _await(ref: Any, settle: Callable[[Any], None]) -> None:
    try:
        res: Any = await call(ref)
    except asyncio.CancelledError:
        settle(errors.Unavailable("gateway is shutting down"))
        raise
    except Exception as exc:
        res = exc
    settle(res)


def _cancel(timer: asyncio.TimerHandle, _: Any) -> None:
    timer.cancel()


def _expire(fut: asyncio.Future[Outcome], deadline_s: float) -> None:
    if not fut.done():
        fut.set_exception(
            errors.Unavailable(
                f"no answer within {deadline_s:g} s; the outcome is unknown: retry with the"
                " same Idempotency-Key"
            )
        )


def _node_id() -> str | None:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
