"""Idempotency keys without a database: storage's verdicts on claimed keys and how the
shard applies them, which answers a key keeps (only final ones), expiry, and the
gateway's scoping of keys to their caller."""

from __future__ import annotations

import random
from datetime import timedelta

import msgspec
import pytest

from engine import errors
from engine.events import IdempotencyRecorded, Rejection
from engine.idempotency import Claim, Settled, Stored, Verdict, settle
from engine.routing import bucket_of
from engine.shard_state import Outcome, RedeemRequest, ShardState, fingerprint
from serve.auth import Principal
from serve.idempotency import scoped_key
from tests.unit.test_pools import (
    T0,
    FakeClock,
    Shop,
    discount_campaign,
    gift_campaign,
    req,
)

FP_A = b"a" * 16
FP_B = b"b" * 16


def _claim(key: str, fp: bytes = FP_A) -> Claim:
    return Claim(key, 7, fp, T0)


# --- the pure verdict ------------------------------------------------------------------


def test_settle_turns_claimed_rows_into_verdicts() -> None:
    claims = [_claim("won"), _claim("final"), _claim("pending"), _claim("missing")]
    stored = [
        Stored("won", True, FP_A, None, T0),
        Stored("final", False, FP_B, b"answer", T0),
        Stored("pending", False, FP_B, None, T0),
    ]
    assert settle(claims, stored) == {
        "won": Settled(Verdict.MINE, FP_A),
        "final": Settled(Verdict.FINAL, FP_B, b"answer", T0),
        "pending": Settled(Verdict.PENDING, FP_B),
        # a key storage did not answer for may be held elsewhere: never "run"
        "missing": Settled(Verdict.PENDING, FP_A),
    }


# --- which answers a key keeps ---------------------------------------------------------


def test_every_not_now_error_is_transient_and_final_ones_are_not() -> None:
    transient = {code for code, cls in errors.registry().items() if cls.transient}
    assert transient == {
        "campaign_not_active",
        "campaign_paused",
        "not_started",
        "outside_window",
        "code_reserved",
        "voucher_disabled",
        "voucher_not_started",
        "unavailable",
        "fenced",
        "claim_lost",
        "not_owner",
        "idempotency_in_progress",
        "customer_tags_needed",
    }
    for final in ("already_redeemed", "exhausted", "expired", "campaign_ended", "currency_mismatch"):
        assert not errors.is_transient(final)


def test_a_paused_campaign_answers_but_does_not_keep_the_key() -> None:
    shop = Shop()
    shop.install(discount_campaign(), ["DISC-A"])
    shop.sync()
    shop.move("disc", "pause")
    first = shop.state.redeem_one(req("DISC-A", idempotency_key="k"))
    assert first.rejection is not None and first.rejection.error == "campaign_paused"
    assert not any(isinstance(e, IdempotencyRecorded) for e in shop.sync())
    shop.move("disc", "activate")
    again = shop.state.redeem_one(req("DISC-A", idempotency_key="k"))
    assert again.redemption is not None  # the retry ran for real
    # ... and that answer is final: kept, replayed, also after a restart
    assert any(isinstance(e, IdempotencyRecorded) for e in shop.sync())
    assert shop.restart().redeem_one(req("DISC-A", idempotency_key="k")) == again


def test_a_reserved_code_answers_but_does_not_keep_the_key() -> None:
    shop = Shop()
    shop.install(discount_campaign(), ["DISC-A"])
    hold = shop.state.reserve(req("DISC-A"))
    first = shop.state.redeem_one(req("DISC-A", idempotency_key="k"))
    assert first.rejection is not None and first.rejection.error == "code_reserved"
    shop.state.release(hold.id)
    assert shop.state.redeem_one(req("DISC-A", idempotency_key="k")).redemption is not None


def test_a_key_older_than_the_ttl_runs_again() -> None:
    clock = FakeClock()
    state = ShardState(
        clock=clock, random_bytes=random.Random(1).randbytes, idempotency_ttl=timedelta(hours=1)
    )
    state.put_campaign(gift_campaign(balance=5000))
    state.admit_codes("gift", state.claim_new_codes(["GIFT-A"]))
    first = state.redeem_one(req("GIFT-A", 1000, idempotency_key="k"))
    assert state.redeem_one(req("GIFT-A", 1000, idempotency_key="k")) == first
    state.drain()
    clock.advance(hours=1, seconds=1)
    again = state.redeem_one(req("GIFT-A", 1000, idempotency_key="k"))
    assert again.redemption is not None and first.redemption is not None
    assert again.redemption.id != first.redemption.id
    assert again.redemption.balance_after == 3000
    recorded = [e for e in state.drain() if isinstance(e, IdempotencyRecorded)]
    assert [e.key for e in recorded] == ["k"]


# --- claims: what the shard asks storage, and what it does with the answer --------------


def _shop() -> Shop:
    shop = Shop()
    shop.install(discount_campaign(), ["DISC-A", "DISC-B"])
    shop.sync()
    return shop


def _fp(r: RedeemRequest) -> bytes:
    return fingerprint("redeem", msgspec.structs.replace(r, idempotency_key=None))


def test_claims_cover_each_unremembered_key_once() -> None:
    shop = _shop()
    shop.state.redeem_one(req("DISC-A", idempotency_key="known"))
    batch = [
        req("DISC-B", idempotency_key="new"),
        req("DISC-A", idempotency_key="new"),  # same key again: one claim, the first body
        req("DISC-A", idempotency_key="known"),
        req("DISC-B"),
        req("DISC-B", idempotency_key=""),  # malformed: refused when decided, not claimed
    ]
    claims = shop.state.claims_for("redeem", batch)
    assert [(c.key, c.bucket, c.fingerprint) for c in claims] == [
        ("new", bucket_of("DISC-B"), _fp(batch[0]))
    ]
    refs = shop.state.claims_for("rollback", [("red_00a" + "x" * 20, "rb"), ("red_00b" + "y" * 20, None)])
    assert [(c.key, c.bucket) for c in refs] == [("rb", 10)]


def test_claims_skip_buckets_the_shard_does_not_own() -> None:
    mine = bucket_of("DISC-A")
    state = ShardState(clock=FakeClock(), random_bytes=random.Random(1).randbytes, owned=[mine])
    batch = [req("DISC-A", idempotency_key="a"), req("DISC-B", idempotency_key="b")]
    assert [c.key for c in state.claims_for("redeem", batch)] == ["a"]


def _decide(shop: Shop, batch: list[RedeemRequest], stored: list[Stored]) -> list[Outcome]:
    claims = shop.state.claims_for("redeem", batch)
    shop.state.accept_claims(claims, stored)
    try:
        return [shop.state.redeem_one(r) for r in batch]
    finally:
        shop.state.end_claims(c.key for c in claims)


def test_a_key_pending_elsewhere_says_retry_or_conflict_and_changes_nothing() -> None:
    shop = _shop()
    mine, other = req("DISC-A", idempotency_key="k"), req("DISC-B", idempotency_key="k")
    outs = _decide(shop, [mine], [Stored("k", False, _fp(mine), None, T0)])
    assert outs[0].rejection is not None and outs[0].rejection.error == "idempotency_in_progress"
    outs = _decide(shop, [other], [Stored("k", False, _fp(mine), None, T0)])
    assert outs[0].rejection is not None and outs[0].rejection.error == "idempotency_conflict"
    assert shop.sync() == []
    assert shop.state.stats("disc").redemptions == 0
    # the verdicts lasted one batch: the next one claims again
    assert [c.key for c in shop.state.claims_for("redeem", [mine])] == ["k"]


def test_a_final_answer_found_in_storage_is_replayed_and_remembered() -> None:
    shop = _shop()
    first = req("DISC-A", idempotency_key="k")
    answer = Outcome(rejection=Rejection("already_redeemed", "code DISC-A was redeemed already"))
    body = msgspec.msgpack.encode(answer)
    other = req("DISC-B", idempotency_key="k")
    outs = _decide(shop, [first, other], [Stored("k", False, _fp(first), body, T0)])
    assert outs[0] == answer
    assert outs[1].rejection is not None and outs[1].rejection.error == "idempotency_conflict"
    assert shop.sync() == []
    assert shop.state.claims_for("redeem", [first]) == []  # remembered now


def test_a_won_claim_runs_and_holds_its_body_even_when_the_answer_is_transient() -> None:
    shop = _shop()
    shop.move("disc", "pause")
    first, other = req("DISC-A", idempotency_key="k"), req("DISC-B", idempotency_key="k")
    outs = _decide(shop, [first, other], [Stored("k", True, _fp(first), None, T0)])
    assert outs[0].rejection is not None and outs[0].rejection.error == "campaign_paused"
    # the claim in storage holds the first body: another body must not run under it
    assert outs[1].rejection is not None and outs[1].rejection.error == "idempotency_conflict"
    shop.move("disc", "activate")
    outs = _decide(shop, [first], [Stored("k", True, _fp(first), None, T0)])
    assert outs[0].redemption is not None
    recorded = [e for e in shop.sync() if isinstance(e, IdempotencyRecorded)]
    assert [(e.key, e.fingerprint) for e in recorded] == [("k", _fp(first))]


# --- scoping at the gateway -------------------------------------------------------------


def test_keys_are_scoped_to_the_api_key_or_the_user() -> None:
    owner = Principal(user_id="usr_1", roles=("admin",), kind="user")
    key_a = Principal(user_id="usr_1", roles=("integration",), kind="api_key", api_key_id="key_a")
    key_b = Principal(user_id="usr_1", roles=("integration",), kind="api_key", api_key_id="key_b")
    scoped = {scoped_key(p, "order-1") for p in (owner, key_a, key_b)}
    assert len(scoped) == 3
    assert scoped_key(owner, "order-1") == "u:usr_1:order-1"
    assert scoped_key(key_a, "order-1") == "k:key_a:order-1"
    assert scoped_key(owner, None) is None
    # a user id cannot spell an API key's scope (distinct prefixes)
    tricky = Principal(user_id="key_a", roles=("admin",), kind="user")
    assert scoped_key(tricky, "order-1") != scoped_key(key_a, "order-1")


@pytest.mark.parametrize("key", ["", "k" * 256])
def test_scoped_keys_keep_the_header_length_rule(key: str) -> None:
    with pytest.raises(errors.InvalidInput):
        scoped_key(Principal(user_id="u", roles=("admin",)), key)
    longest = scoped_key(Principal(user_id="u" * 128, roles=("admin",)), "k" * 255)
    assert longest is not None
    out = ShardState(clock=FakeClock(), random_bytes=random.Random(1).randbytes).redeem_one(
        req("NOPE", idempotency_key=longest)
    )
    assert out.rejection is not None and out.rejection.error == "unknown_code"
