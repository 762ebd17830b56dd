"""The in-memory twin of the shard's Postgres store (``store/memory.py``): what a shard
writes comes back on its restart, writes of a fenced owner are refused whole, ended
campaigns are voided chunk by chunk, rows are loaded per bucket, and idempotency keys are
claimed, answered and expired as ``PgShardStore`` does."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest

from engine import errors
from engine.campaigns import Campaign, Discount, new_campaign, transition
from engine.events import (
    AVAILABLE,
    CONFIRMED,
    HELD,
    R_ROLLED_BACK,
    REDEEMED,
    VOID,
    AssignmentRecorded,
    IdempotencyRecorded,
    Reservation,
    ReservationChanged,
    VoucherChanged,
)
from engine.idempotency import Claim
from engine.routing import BUCKETS, bucket_of
from engine.shard_state import RedeemRequest, ShardState
from store.fencing import Fence
from store.memory import MemoryShardStore
from store.shards import ShardStore

T = TypeVar("T")
T0 = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)
ALL = list(range(BUCKETS))
LONG_AGO = datetime.min.replace(tzinfo=UTC)
CODES = ["DISC-A", "DISC-B", "DISC-C", "DISC-D"]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def campaign(cid: str = "disc") -> Campaign:
    c = new_campaign(
        id=cid, name="ten percent", type="discount", currency="EUR", now=T0,
        discount=Discount("percent", 10, max=500), ends_at=T0 + timedelta(days=30),
    )
    return transition(c, "activate", T0)


def new_state(seed: int = 1) -> ShardState:
    return ShardState(clock=lambda: T0, random_bytes=random.Random(seed).randbytes)


def req(code: str, cust: str | None = None) -> RedeemRequest:
    return RedeemRequest(code=code, amount=2000, currency="EUR", customer_id=cust)


def stocked(store: MemoryShardStore, state: ShardState, c: Campaign, codes: list[str]) -> None:
    state.put_campaign(c)
    store.put_campaign(c)
    fresh = state.claim_new_codes(codes)
    run(store.copy_codes(c.id, fresh, None))
    state.admit_codes(c.id, fresh)
    state.drain()


def reloaded(store: MemoryShardStore, buckets: list[int] = ALL) -> ShardState:
    state = new_state(seed=2)
    run(store.load(state, buckets, LONG_AGO))
    return state


def test_it_is_a_shard_store() -> None:
    store: ShardStore = MemoryShardStore()
    assert store.fence is None


def test_a_restart_restores_redeemed_codes_and_rollbacks() -> None:
    store, state = MemoryShardStore(), new_state()
    stocked(store, state, campaign(), CODES)
    kept = state.redeem(req("DISC-A", "ann"))
    undone = state.redeem(req("DISC-B", "bob"))
    state.rollback(undone.id)
    run(store.write(state.drain(), ALL))
    assert store.vouchers["DISC-A"][1] == REDEEMED
    assert store.redemptions[undone.id].status == R_ROLLED_BACK

    again = reloaded(store)
    assert again.validate(req("DISC-A", "cid")).error == "already_redeemed"
    assert again.voucher("DISC-A")["status"] == "redeemed"
    assert again.voucher("DISC-B")["status"] == "available"
    assert again.redemptions[kept.id] == kept
    assert again.stats("disc").active_redemptions == 1


def test_load_reads_only_the_shards_buckets() -> None:
    store, state = MemoryShardStore(), new_state()
    stocked(store, state, campaign(), CODES)
    mine = [bucket_of("DISC-A")]
    again = reloaded(store, mine)
    assert again.voucher("DISC-A")["status"] == "available"
    others = [c for c in CODES if bucket_of(c) not in mine]
    assert again.stats("disc").available == len(CODES) - len(others)


def test_writes_of_a_fenced_owner_are_refused_whole() -> None:
    store, state = MemoryShardStore(), new_state()
    run(store.claim("ns", 0, 1))
    stocked(store, state, campaign(), CODES)
    state.redeem(req("DISC-A"))
    events = state.drain()
    assert store.fence is not None
    store.bump(store.fence.owner)  # a newer owner took over
    with pytest.raises(errors.Fenced):
        run(store.write(events, ALL))
    with pytest.raises(errors.Fenced):
        run(store.copy_codes("disc", ["DISC-Z"], None))
    with pytest.raises(errors.Fenced):
        run(store.void_chunk("disc", ALL, 10))
    assert store.vouchers["DISC-A"][1] == AVAILABLE and not store.redemptions
    assert "DISC-Z" not in store.vouchers


def test_a_lost_claim_is_not_a_fence() -> None:
    store = MemoryShardStore(Fence("ns/shard-0", 3))
    store.owners["ns/shard-0"] = 2  # the database went back in time
    with pytest.raises(errors.ClaimLost):
        run(store.copy_codes("disc", ["DISC-Z"], None))


def test_claim_checks_the_topology_and_bumps_the_epoch() -> None:
    store = MemoryShardStore()
    server = run(store.claim("ns", 1, 2))
    assert store.fence == Fence("ns/shard-1", 1)
    assert run(store.check_epoch(5)) == (1, server)
    run(store.claim("ns", 1, 2))
    assert store.fence == Fence("ns/shard-1", 2)
    with pytest.raises(errors.Fenced):
        run(store.claim("ns", 0, 4))


def test_an_ended_campaign_is_voided_chunk_by_chunk() -> None:
    store, state = MemoryShardStore(), new_state()
    stocked(store, state, campaign(), CODES)
    state.redeem(req("DISC-A"))
    ended = transition(state.campaign("disc"), "end", T0)
    state.put_campaign(ended)
    store.put_campaign(ended)
    assert run(store.write(state.drain(), ALL)) == ["disc"]
    # the batch leaves the rows to the background void
    assert [store.vouchers[c][1] for c in CODES] == [REDEEMED, AVAILABLE, AVAILABLE, AVAILABLE]
    assert run(store.void_chunk("disc", ALL, 2)) == 2
    assert run(store.void_chunk("disc", ALL, 2)) == 1
    assert run(store.void_chunk("disc", ALL, 2)) == 0
    assert [store.vouchers[c][1] for c in CODES] == [REDEEMED, VOID, VOID, VOID]


def test_a_reservation_upsert_changes_only_its_state_and_redemption() -> None:
    store = MemoryShardStore()
    held = Reservation("res-1", "disc", "DISC-A", "ann", "o-1", 2000, "EUR", 200, T0, HELD, None)
    run(store.write([ReservationChanged(held)], ALL))
    changed = Reservation("res-1", "other", "DISC-B", None, None, 1, "USD", 1, T0, CONFIRMED, "red-1")
    run(store.write([ReservationChanged(changed)], ALL))
    row = store.reservations["res-1"]
    assert (row.state, row.redemption_id) == (CONFIRMED, "red-1")
    assert (row.campaign_id, row.code, row.customer_id) == ("disc", "DISC-A", "ann")


def test_voucher_changes_touch_existing_rows_only_and_the_last_wins() -> None:
    store = MemoryShardStore()
    run(store.copy_codes("disc", ["DISC-A"], None))
    run(store.write([
        VoucherChanged("DISC-A", 1, "ann", None, 0),
        VoucherChanged("DISC-A", REDEEMED, "ann", None, 1),
        VoucherChanged("NO-ROW", REDEEMED, None, None, 1),
    ], ALL))
    assert store.vouchers == {"DISC-A": ["disc", REDEEMED, "ann", None, 1]}


def test_a_foreign_assignment_is_loaded_by_its_own_bucket() -> None:
    store, state = MemoryShardStore(), new_state()
    stocked(store, state, campaign(), CODES)
    code_bucket = bucket_of("DISC-C")
    key_bucket = (code_bucket + 1) % BUCKETS
    run(store.write([AssignmentRecorded("disc", "zoe", "DISC-C", key_bucket)], ALL))
    run(store.write([AssignmentRecorded("disc", "zoe", "DISC-D", key_bucket)], ALL))
    assert store.assignments == {("disc", "zoe"): ("DISC-C", key_bucket)}


def claim(key: str, fp: bytes, at: datetime, bucket: int = 7) -> Claim:
    return Claim(key=key, bucket=bucket, fingerprint=fp, at=at)


def test_keys_are_claimed_answered_and_taken_over_when_stale() -> None:
    store = MemoryShardStore()
    first = run(store.claim_keys([claim("k", b"fp", T0)], [7], LONG_AGO, LONG_AGO))
    assert first[0].won and first[0].response is None
    # pending in a bucket the claimer does not own, and fresh: left to its holder
    other = run(store.claim_keys([claim("k", b"fp2", T0)], [8], LONG_AGO, LONG_AGO))
    assert not other[0].won and other[0].fingerprint == b"fp"
    # pending and older than the stale limit: taken over
    stale = run(store.claim_keys([claim("k", b"fp2", T0)], [8], LONG_AGO, T0 + timedelta(seconds=1)))
    assert stale[0].won and stale[0].fingerprint == b"fp2"
    # the answer of the row's holder is stored; a later claim gets it back
    run(store.write([IdempotencyRecorded("k", 7, b"fp2", b"answer", T0)], ALL))
    answered = run(store.claim_keys([claim("k", b"fp2", T0)], [7], LONG_AGO, T0 + timedelta(days=1)))
    assert not answered[0].won and answered[0].response == b"answer"
    assert store.idempotency["k"].claim_token is None


def test_an_answer_never_overwrites_another_fingerprints_row() -> None:
    store = MemoryShardStore()
    run(store.claim_keys([claim("k", b"fp", T0)], [7], LONG_AGO, LONG_AGO))
    run(store.write([IdempotencyRecorded("k", 7, b"other", b"answer", T0)], ALL))
    assert store.idempotency["k"].response is None


def test_only_answered_recent_keys_are_loaded() -> None:
    store, state = MemoryShardStore(), new_state()
    stocked(store, state, campaign(), CODES)
    run(store.write([
        IdempotencyRecorded("old", 7, b"fp", b"a", T0 - timedelta(hours=1)),
        IdempotencyRecorded("new", 7, b"fp", b"b", T0),
    ], ALL))
    run(store.claim_keys([claim("pending", b"fp", T0)], [7], LONG_AGO, LONG_AGO))
    again = new_state()
    run(store.load(again, ALL, T0 - timedelta(minutes=1)))
    assert set(again.idem) == {"new"}


def test_expired_keys_are_deleted_in_chunks() -> None:
    store = MemoryShardStore(Fence("ns/shard-0", 1))
    run(store.write([IdempotencyRecorded(f"k{i}", 7, b"fp", b"a", T0) for i in range(5)], ALL))
    run(store.write([IdempotencyRecorded("other", 8, b"fp", b"a", T0)], ALL))
    assert run(store.delete_expired_keys([7], T0 + timedelta(seconds=1), chunk=2)) == 5
    assert set(store.idempotency) == {"other"}
    store.bump("ns/shard-0")
    with pytest.raises(errors.Fenced):
        run(store.delete_expired_keys([8], T0 + timedelta(seconds=1), fence=store.fence))


def test_campaign_changes_come_back_in_revision_order() -> None:
    store = MemoryShardStore()
    a, b = campaign("a"), campaign("b")
    store.put_campaign(a)
    store.put_campaign(b)
    ended = transition(a, "end", T0)
    store.put_campaign(ended)
    assert run(store.campaigns_since(1)) == [(2, b), (3, ended)]
