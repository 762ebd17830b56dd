"""Assignment from another shard's bank when the deciding shard's part is empty: the pure
record (``ShardState.record_foreign``) and the shard's fallback protocol
(``ShardCore.assign_many`` with in-process peers: no Ray, no database)."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from actors.shard import ShardCore
from engine.campaigns import Discount, new_campaign, transition
from engine.codes import CodeSpec, generate
from engine.events import AssignmentRecorded
from engine.routing import assignment_key, bucket_of
from engine.settings import Settings
from engine.shard_state import Outcome, ShardState
from tests.actor_fakes import RemoteMethod

T0 = datetime(2026, 1, 1, tzinfo=UTC)
_outs = msgspec.msgpack.Decoder(list[Outcome])


def campaign(cid: str = "c1") -> Any:
    c = new_campaign(
        id=cid, name="n", type="discount", currency="EUR", now=T0,
        discount=Discount("percent", 10), ends_at=T0 + timedelta(days=30),
    )
    return transition(c, "activate", T0)


def state_with(codes: list[str], cid: str = "c1") -> ShardState:
    s = ShardState(clock=lambda: T0, random_bytes=os.urandom)
    s.put_campaign(campaign(cid))
    s.admit_codes(cid, s.claim_new_codes(codes))
    s.events.clear()
    return s


def test_record_foreign_keeps_the_first_code_and_emits_a_reloadable_event() -> None:
    decider = state_with([])
    assert decider.assign_one("c1", "alice").rejection.error == "bank_exhausted"  # type: ignore[union-attr]
    a = decider.record_foreign("c1", "alice", "CODE-FROM-B")
    assert a.created and a.code == "CODE-FROM-B"
    (event,) = decider.drain()
    assert event == AssignmentRecorded("c1", "alice", "CODE-FROM-B", bucket_of(assignment_key("c1", "alice")))
    # a second record (a racing run) never replaces the first code
    again = decider.record_foreign("c1", "alice", "OTHER")
    assert not again.created and again.code == "CODE-FROM-B"
    assert decider.assign("c1", "alice").code == "CODE-FROM-B"
    assert decider.assignments_of("c1", ["alice", "bob"]) == {"alice": "CODE-FROM-B"}
    # after a restart the row is loaded back
    fresh = state_with([])
    fresh.load_assignment("c1", "alice", "CODE-FROM-B")
    assert fresh.assign("c1", "alice") == msgspec.structs.replace(again, created=False)


class FakeWriter:
    def __init__(self, state: ShardState) -> None:
        self.state = state
        self.written: list[Any] = []
        self.failed = False

    def mark(self) -> None:
        pass

    def behind(self) -> float:
        return 0.0

    async def durable(self) -> None:
        self.written += self.state.drain()

    def poke(self) -> None:
        pass


class Peer:
    """A peer shard as the fallback sees it (``.assign_many.remote(...)``)."""

    def __init__(self, core: ShardCore, delay: float = 0.0) -> None:
        self.calls = 0

        async def assign(cid: str, customers: list[str], fallback: bool = True) -> bytes:
            self.calls += 1
            await asyncio.sleep(delay)
            return await core.assign_many(cid, customers, fallback)

        self.assign_many = RemoteMethod(assign)
        self.assignments_of = RemoteMethod(core.assignments_of)


def cores(codes_per_shard: list[list[str]], delay: float = 0.0) -> tuple[list[ShardCore], list[Peer]]:
    n = len(codes_per_shard)
    out = []
    for i, codes in enumerate(codes_per_shard):
        core = ShardCore(i, n, "postgresql://unused", Settings(shards=n))
        core.state = state_with(codes)
        core.writer = FakeWriter(core.state)  # type: ignore[assignment]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        core._ready = done
        out.append(core)
    peers = [Peer(c, delay) for c in out]
    for core in out:
        core.peer = lambda k: peers[k]
    return out, peers


async def test_empty_shard_takes_codes_from_peers_and_stays_idempotent() -> None:
    bank = generate(CodeSpec(), 30, os.urandom)
    (a, b, c), peers = cores([[], bank[:2], bank[2:30]])
    customers = [f"cust-{i}" for i in range(5)]
    outs = _outs.decode(await a.assign_many("c1", customers))
    codes = {o.assignment.customer_id: o.assignment.code for o in outs if o.assignment}
    assert len(codes) == 5 and len(set(codes.values())) == 5
    # peers in a fixed order: b (the next shard) first, then c for what b could not serve
    assert sum(code in bank[:2] for code in codes.values()) == 2
    recorded = [e for e in a.writer.written if isinstance(e, AssignmentRecorded)]  # type: ignore[union-attr]
    assert {e.customer_id: e.code for e in recorded} == codes
    # re-run: answered from the deciding shard's records, no peer is asked
    calls = sum(p.calls for p in peers)
    again = _outs.decode(await a.assign_many("c1", customers))
    assert {o.assignment.customer_id: o.assignment.code for o in again if o.assignment} == codes
    assert not any(o.assignment.created for o in again if o.assignment)
    assert sum(p.calls for p in peers) == calls


async def test_interrupted_fallback_is_found_again_on_the_peer() -> None:
    bank = generate(CodeSpec(), 10, os.urandom)
    (a, b), _ = cores([[], bank])
    # b gave alice a code, but a crashed before recording it
    given = b.state.assign("c1", "alice").code
    outs = _outs.decode(await a.assign_many("c1", ["alice"]))
    assert outs[0].assignment is not None and outs[0].assignment.code == given
    assert b.state.stats("c1").assigned == 1  # no second code was taken


async def test_concurrent_requests_for_one_customer_share_one_fallback() -> None:
    bank = generate(CodeSpec(), 10, os.urandom)
    (a, b), peers = cores([[], bank], delay=0.05)
    results = await asyncio.gather(*[a.assign_many("c1", ["alice", "bob"]) for _ in range(5)])
    seen = {(o.assignment.customer_id, o.assignment.code) for r in results for o in _outs.decode(r)}  # type: ignore[union-attr]
    assert len(seen) == 2  # one code each, whatever the concurrency
    assert b.state.stats("c1").assigned == 2
    assert peers[1].calls == 1  # the other four waited for the first one's answer


async def test_every_bank_empty_is_bank_exhausted() -> None:
    (a, b, c), _ = cores([[], [], []])
    (out,) = _outs.decode(await a.assign_many("c1", ["alice"]))
    assert out.rejection is not None and out.rejection.error == "bank_exhausted"
