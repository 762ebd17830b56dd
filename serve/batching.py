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

One batcher belongs to one event loop (the Serve replica's).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec

from actors.calls import call
from actors.observability import BatcherMetrics, request_id_var
from engine import errors
from engine.pools import Outcome, RedeemRequest, route_bucket
from engine.routing import shard_of_bucket

OPS = ("redeem", "validate", "reserve")

_enc = msgspec.msgpack.Encoder()
_outs = msgspec.msgpack.Decoder(list[Outcome])


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
    ) -> None:
        """``engine`` is an :class:`actors.client.VoucherEngine` (only ``.shards`` and ``.n``
        are used: anything with shard handles whose ``<op>_many.remote(blob)`` returns an
        awaitable will do; ``remote(blob, request_ids)`` when the requests carry ids).
        ``metrics``: where to record batches and queue depths (none by default)."""
        if max_batch < 1 or max_inflight < 1:
            raise ValueError("max_batch and max_inflight must be >= 1")
        self.engine = engine
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self.counters = BatcherStats()
        self.metrics = metrics
        self._lanes: dict[tuple[int, str], _Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

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
        shard = shard_of_bucket(route_bucket(req.code), self.engine.n)
        lane = self._lanes.get((shard, op))
        if lane is None:
            lane = self._lanes[(shard, op)] = _Lane(shard, op)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Outcome] = loop.create_future()
        lane.queue.append((req, fut, request_id or request_id_var.get()))
        self._schedule(lane, loop)
        return await fut

    async def submit_many(self, op: str, reqs: list[RedeemRequest]) -> list[Outcome | BaseException]:
        """Submit several requests at once; answers (or the call's error) in input order."""
        return list(
            await asyncio.gather(*[self.submit(op, r) for r in reqs], return_exceptions=True)
        )

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
            "queued": self.queued,
            "inflight": self.inflight,
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
        while self._tasks or self.queued:
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            else:
                await asyncio.sleep(0)

    # --- machinery ---------------------------------------------------------------------

    def _schedule(self, lane: _Lane, loop: asyncio.AbstractEventLoop) -> None:
        # call_soon, not a direct pump: submits of the same loop turn join one batch.
        if not lane.scheduled:
            lane.scheduled = True
            loop.call_soon(self._pump, lane)

    def _pump(self, lane: _Lane) -> None:
        lane.scheduled = False
        while lane.inflight < self.max_inflight and lane.queue:
            batch: list[_Waiter] = []
            while lane.queue and len(batch) < self.max_batch:
                waiter = lane.queue.popleft()
                if not waiter[1].done():  # a caller that gave up (cancelled) is not sent
                    batch.append(waiter)
            if not batch:
                continue
            lane.inflight += 1
            task = asyncio.get_running_loop().create_task(self._send(lane, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self.metrics is not None:
            self.metrics.depth(lane.shard, lane.op, len(lane.queue), lane.inflight)

    async def _send(self, lane: _Lane, batch: list[_Waiter]) -> None:
        failed = True
        t0 = time.perf_counter()
        try:
            blob = _enc.encode([w[0] for w in batch])
            method = getattr(self.engine.shards[lane.shard], lane.method)
            ids = [w[2] for w in batch]
            if any(ids):
                res = await call(method.remote(blob, ids))
            else:  # nothing to carry: the plain call shape
                res = await call(method.remote(blob))
            outs = _outs.decode(res)
            if len(outs) != len(batch):
                raise errors.Unavailable(
                    f"shard {lane.shard} answered {len(outs)} outcomes for {len(batch)} requests"
                )
            for (_, fut, _), out in zip(batch, outs, strict=True):
                if not fut.done():
                    fut.set_result(out)
            failed = False
        except errors.VoucherError as exc:
            for _, fut, _ in batch:
                if not fut.done():
                    # One instance per waiter: a shared one would pile up tracebacks.
                    fut.set_exception(_copy(exc))
        except asyncio.CancelledError:
            for _, fut, _ in batch:
                fut.cancel()
            raise
        except Exception as exc:
            # A bug or an undecodable answer: every waiter learns, none hangs.
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(exc)
        finally:
            self.counters.record(lane.op, len(batch), failed)
            lane.inflight -= 1
            if lane.queue:
                self._schedule(lane, asyncio.get_running_loop())
            if self.metrics is not None:
                m = self.metrics
                m.sent(lane.shard, lane.op, len(batch), time.perf_counter() - t0, failed)
                m.depth(lane.shard, lane.op, len(lane.queue), lane.inflight)


def _copy(exc: errors.VoucherError) -> errors.VoucherError:
    try:
        return type(exc)(exc.message)
    except Exception:
        return exc
