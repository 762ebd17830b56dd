"""MicroBatcher against fake shard handles: no Ray, same call shape as the real actors.

A fake shard's ``<op>_many.remote(blob)`` returns a coroutine (standing in for an
ObjectRef) that decodes the msgpack batch, records it, optionally waits on a gate (to hold
a call "in flight"), and answers one Outcome per request, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest

from actors.calls import Failure
from engine import errors
from engine.events import Rejection
from engine.routing import shard_of_bucket
from engine.shard_state import Outcome, RedeemRequest, route_bucket
from serve.batching import MicroBatcher

_reqs = msgspec.msgpack.Decoder(list[RedeemRequest])
_enc = msgspec.msgpack.Encoder()


def answer(req: RedeemRequest, op: str) -> Outcome:
    # The rejection carries the code back, so a test can check who got which answer.
    return Outcome(rejection=Rejection(error=f"{op}_echo", message=req.code))


class FakeMethod:
    def __init__(self, shard: FakeShard, op: str) -> None:
        self.shard = shard
        self.op = op

    def remote(self, blob: bytes) -> Awaitable[Any]:
        reqs = _reqs.decode(blob)
        self.shard.calls.append((self.op, [r.code for r in reqs]))
        return self.shard.respond(self.op, reqs)


class FakeShard:
    def __init__(self, index: int) -> None:
        self.index = index
        self.calls: list[tuple[str, list[str]]] = []
        self.gate: asyncio.Event | None = None  # when set, calls wait for it
        self.inflight = 0
        self.max_inflight_seen = 0
        self.fail: Callable[[], Any] | None = None  # raise or return a Failure
        self.redeem_many = FakeMethod(self, "redeem")
        self.validate_many = FakeMethod(self, "validate")
        self.reserve_many = FakeMethod(self, "reserve")

    async def respond(self, op: str, reqs: list[RedeemRequest]) -> Any:
        self.inflight += 1
        self.max_inflight_seen = max(self.max_inflight_seen, self.inflight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(0.001)
            if self.fail is not None:
                return self.fail()
            return _enc.encode([answer(r, op) for r in reqs])
        finally:
            self.inflight -= 1


class FakeEngine:
    def __init__(self, n: int) -> None:
        self.shards = [FakeShard(i) for i in range(n)]
        self.n = n

    def shard_of(self, code: str) -> FakeShard:
        return self.shards[shard_of_bucket(route_bucket(code), self.n)]

    @property
    def calls(self) -> list[tuple[str, list[str]]]:
        return [c for s in self.shards for c in s.calls]


def _raise(exc: Exception) -> Any:
    raise exc


def req(code: str) -> RedeemRequest:
    return RedeemRequest(code=code, amount=1000, currency="EUR", customer_id="c1")


def _gated_batcher(**options: Any) -> tuple[FakeShard, MicroBatcher]:
    """A batcher over one shard that holds every call until ``shard.gate`` is set."""
    engine = FakeEngine(1)
    shard = engine.shards[0]
    shard.gate = asyncio.Event()
    return shard, MicroBatcher(engine, **options)


def codes_on_shard(engine: FakeEngine, shard: int, count: int) -> list[str]:
    out: list[str] = []
    i = 0
    while len(out) < count:
        code = f"CODE{i:06d}"
        if engine.shard_of(code).index == shard:
            out.append(code)
        i += 1
    return out


async def test_idle_submit_goes_out_immediately() -> None:
    engine = FakeEngine(4)
    batcher = MicroBatcher(engine)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    out = await batcher.submit("redeem", req("ABC123"))
    assert loop.time() - t0 < 0.05  # no timer: the fake's ~1 ms, nothing added
    assert out.rejection is not None and out.rejection.message == "ABC123"
    assert engine.calls == [("redeem", ["ABC123"])]


async def test_idle_submit_is_sent_before_the_caller_awaits_anything_else() -> None:
    engine = FakeEngine(1)
    engine.shards[0].gate = asyncio.Event()
    batcher = MicroBatcher(engine)
    task = asyncio.create_task(batcher.submit("validate", req("A1")))
    for _ in range(3):
        await asyncio.sleep(0)
    assert engine.calls == [("validate", ["A1"])]  # already flying, no wait for company
    engine.shards[0].gate.set()
    await task


async def test_concurrent_submits_coalesce_and_answers_keep_order() -> None:
    engine = FakeEngine(4)
    batcher = MicroBatcher(engine, max_batch=256, max_inflight=1)
    codes = [f"C{i:05d}" for i in range(400)]
    outs = await asyncio.gather(*[batcher.submit("redeem", req(c)) for c in codes])
    # every caller got the answer to its own request
    assert [o.rejection.message for o in outs if o.rejection] == codes
    # 400 concurrent requests over 4 shards: one call per shard (<=256 each)
    per_shard = {s.index: len(s.calls) for s in engine.shards}
    assert all(n == 1 for n in per_shard.values()), per_shard
    assert sum(len(c[1]) for c in engine.calls) == 400
    stats = batcher.stats()
    assert stats["batches"] == 4 and stats["items"] == 400
    assert stats["max_batch"] == max(len(c[1]) for c in engine.calls)


async def test_requests_go_to_the_shard_that_owns_the_code() -> None:
    engine = FakeEngine(3)
    batcher = MicroBatcher(engine)
    codes = [f"K{i}" for i in range(60)]
    await asyncio.gather(*[batcher.submit("redeem", req(c)) for c in codes])
    for shard in engine.shards:
        for _, sent in shard.calls:
            assert all(engine.shard_of(c) is shard for c in sent)


async def test_requests_queue_while_a_call_flies_and_go_out_together() -> None:
    shard, batcher = _gated_batcher(max_inflight=1)
    first = asyncio.create_task(batcher.submit("redeem", req("FIRST")))
    await asyncio.sleep(0.01)
    assert shard.calls == [("redeem", ["FIRST"])]
    later = [asyncio.create_task(batcher.submit("redeem", req(f"L{i}"))) for i in range(50)]
    await asyncio.sleep(0.01)
    assert len(shard.calls) == 1  # one in flight per lane: the rest waits
    assert batcher.queued == 50 and batcher.inflight == 1
    shard.gate.set()
    await asyncio.gather(first, *later)
    assert shard.calls == [("redeem", ["FIRST"]), ("redeem", [f"L{i}" for i in range(50)])]
    assert [t.result().rejection.message for t in later] == [f"L{i}" for i in range(50)]  # type: ignore[union-attr]


async def test_max_batch_caps_the_call_size() -> None:
    engine = FakeEngine(1)
    batcher = MicroBatcher(engine, max_batch=10, max_inflight=1)
    outs = await asyncio.gather(*[batcher.submit("redeem", req(f"X{i}")) for i in range(35)])
    sizes = [len(c[1]) for c in engine.calls]
    assert sizes == [10, 10, 10, 5]
    assert [o.rejection.message for o in outs if o.rejection] == [f"X{i}" for i in range(35)]


async def test_max_inflight_overlaps_calls_per_lane() -> None:
    shard, batcher = _gated_batcher(max_batch=5, max_inflight=3)
    tasks = [asyncio.create_task(batcher.submit("redeem", req(f"Y{i}"))) for i in range(40)]
    await asyncio.sleep(0.01)
    assert shard.inflight == 3 and len(shard.calls) == 3
    assert [len(c[1]) for c in shard.calls] == [5, 5, 5]
    shard.gate.set()
    await asyncio.gather(*tasks)
    assert shard.max_inflight_seen == 3
    assert sum(len(c[1]) for c in shard.calls) == 40


async def test_ops_use_separate_lanes_and_methods() -> None:
    engine = FakeEngine(1)
    batcher = MicroBatcher(engine)
    r, v, s = await asyncio.gather(
        batcher.submit("redeem", req("A")),
        batcher.submit("validate", req("B")),
        batcher.submit("reserve", req("C")),
    )
    assert r.rejection and r.rejection.error == "redeem_echo"
    assert v.rejection and v.rejection.error == "validate_echo"
    assert s.rejection and s.rejection.error == "reserve_echo"
    assert sorted(engine.calls) == [("redeem", ["A"]), ("reserve", ["C"]), ("validate", ["B"])]
    with pytest.raises(ValueError):
        await batcher.submit("rollback", req("D"))


@pytest.mark.parametrize(
    "fail",
    [
        lambda: _raise(errors.Unavailable("shard 0 is reloading")),
        lambda: Failure("unavailable", "shard 0 is reloading"),  # as a guarded actor answers
    ],
    ids=["raised", "failure-value"],
)
async def test_unavailable_reaches_every_waiter_of_the_batch(fail: Callable[[], Any]) -> None:
    engine = FakeEngine(2)
    bad = engine.shards[0]
    bad.fail = fail
    batcher = MicroBatcher(engine, max_inflight=1)
    bad_codes = codes_on_shard(engine, 0, 20)
    good_codes = codes_on_shard(engine, 1, 20)
    results = await batcher.submit_many("redeem", [req(c) for c in bad_codes + good_codes])
    for res in results[:20]:
        assert isinstance(res, errors.Unavailable)
        assert res.message == "shard 0 is reloading"
    # one exception object per waiter, so tracebacks do not pile up on a shared one
    assert len({id(r) for r in results[:20]}) == 20
    for code, res in zip(good_codes, results[20:]):
        assert isinstance(res, Outcome) and res.rejection and res.rejection.message == code
    assert batcher.stats()["failed_batches"] == 1
    # the lane recovers: the next call succeeds
    bad.fail = None
    out = await batcher.submit("redeem", req(bad_codes[0]))
    assert out.rejection and out.rejection.message == bad_codes[0]


async def test_wrong_number_of_answers_is_unavailable() -> None:
    engine = FakeEngine(1)
    engine.shards[0].fail = lambda: _enc.encode([])
    batcher = MicroBatcher(engine)
    with pytest.raises(errors.Unavailable):
        await batcher.submit("redeem", req("A"))


async def test_unexpected_error_does_not_leave_waiters_hanging() -> None:
    engine = FakeEngine(1)
    engine.shards[0].fail = lambda: b"\xc1 not msgpack"
    batcher = MicroBatcher(engine)
    results = await asyncio.wait_for(
        batcher.submit_many("redeem", [req(f"Z{i}") for i in range(5)]), 2.0
    )
    assert all(isinstance(r, Exception) for r in results)


async def test_a_cancelled_waiter_is_not_sent_and_does_not_block_others() -> None:
    shard, batcher = _gated_batcher(max_inflight=1)
    first = asyncio.create_task(batcher.submit("redeem", req("FIRST")))
    await asyncio.sleep(0.01)
    gone = asyncio.create_task(batcher.submit("redeem", req("GONE")))
    stays = asyncio.create_task(batcher.submit("redeem", req("STAYS")))
    await asyncio.sleep(0.01)
    gone.cancel()
    shard.gate.set()
    await asyncio.gather(first, stays)
    assert shard.calls == [("redeem", ["FIRST"]), ("redeem", ["STAYS"])]


async def test_close_drains_and_then_refuses() -> None:
    engine = FakeEngine(2)
    batcher = MicroBatcher(engine)
    tasks = [asyncio.create_task(batcher.submit("redeem", req(f"Q{i}"))) for i in range(30)]
    await asyncio.sleep(0)
    await batcher.close()
    assert all(t.done() for t in tasks)
    assert batcher.queued == 0 and batcher.inflight == 0
    with pytest.raises(errors.Unavailable):
        await batcher.submit("redeem", req("LATE"))


async def test_sustained_load_batches_naturally() -> None:
    # Many callers in a loop: calls carry many requests each without any timer.
    engine = FakeEngine(2)
    batcher = MicroBatcher(engine, max_inflight=2)

    async def caller(i: int) -> None:
        for j in range(20):
            await batcher.submit("validate", req(f"W{i}-{j}"))

    await asyncio.gather(*[caller(i) for i in range(100)])
    stats = batcher.stats()
    assert stats["items"] == 2000
    assert stats["batches"] < 2000 / 10  # mean batch well above 10
    assert stats["by_op"]["validate"]["items"] == 2000


class ReplacedShard(FakeShard):
    """A shard of a replaced topology: it refuses every request as not_owner."""

    async def respond(self, op: str, reqs: list[RedeemRequest]) -> Any:
        await asyncio.sleep(0.001)
        return _enc.encode(
            [Outcome(rejection=Rejection(errors.NotOwner.code, "retry")) for _ in reqs]
        )


class ReshardedEngine(FakeEngine):
    """Four shards that were replaced by two; ``refresh`` finds the two (once allowed)."""

    def __init__(self, moves: bool = True) -> None:
        self.shards = [ReplacedShard(i) for i in range(4)]
        self.n = 4
        self.moves = moves
        self.refreshes = 0
        self.on_topology: list[Callable[[], None]] = []

    async def refresh(self) -> bool:
        self.refreshes += 1
        if not self.moves or self.n == 2:
            return False
        self.shards = [FakeShard(i) for i in range(2)]
        self.n = 2
        for listener in self.on_topology:
            listener()
        return True


async def test_requests_refused_as_not_owner_follow_the_new_topology() -> None:
    engine = ReshardedEngine()
    batcher = MicroBatcher(engine, max_inflight=1)
    codes = [f"R{i:04d}" for i in range(60)]
    outs = await asyncio.gather(*[batcher.submit("redeem", req(c)) for c in codes])
    # every request was decided once, by the shard of the new topology that owns it
    assert [o.rejection.message for o in outs if o.rejection] == codes
    assert all(o.rejection.error == "redeem_echo" for o in outs if o.rejection)
    assert sorted(c for s in engine.shards for _, batch in s.calls for c in batch) == sorted(codes)
    for s in engine.shards:
        assert all(shard_of_bucket(route_bucket(c), 2) == s.index for _, b in s.calls for c in b)
    # lanes of shards 2 and 3 (gone) were emptied into the new ones
    assert batcher.queued == 0 and batcher.inflight == 0


async def test_not_owner_is_answered_after_a_few_reroutes_when_nothing_moves() -> None:
    engine = ReshardedEngine(moves=False)
    batcher = MicroBatcher(engine)
    out = await asyncio.wait_for(batcher.submit("redeem", req("STUCK1")), 5)
    assert out.rejection is not None and out.rejection.error == errors.NotOwner.code
    assert engine.refreshes == 3  # bounded: the caller gets a 503 and retries later


async def test_a_shard_that_never_answers_gets_its_callers_unavailable_by_the_deadline() -> None:
    engine = FakeEngine(1)
    shard = engine.shards[0]
    frozen = shard.gate = asyncio.Event()  # a frozen shard process: calls never return
    b = MicroBatcher(engine, max_inflight=1, deadline_s=0.2)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    got = await asyncio.gather(
        *[b.submit("redeem", req(f"C{i}")) for i in range(3)], return_exceptions=True
    )
    assert all(isinstance(g, errors.Unavailable) for g in got), got
    assert "retry with the same Idempotency-Key" in str(got[0])
    assert loop.time() - t0 < 0.6
    # the stuck call gave its lane slot back: once the shard answers again, so does the lane
    shard.gate = None
    out = await asyncio.wait_for(b.submit("redeem", req("D1")), 2)
    assert out.rejection is not None and out.rejection.message == "D1"
    # the frozen calls' late answers are dropped without touching anyone
    frozen.set()
    await asyncio.sleep(0.05)
    assert b.inflight == 0
