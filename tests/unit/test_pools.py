"""The shard state: redemption rules per campaign type, reservations, idempotency,
validation reasons, assignment, the events it emits and recovery from persisted rows.

``store.memory.MemoryShardStore`` stands in for Postgres: it keeps drained events the way
``store.shards.PgShardStore.write`` does and rebuilds a ``ShardState`` the way
``PgShardStore.load`` does, so recovery can be tested without a database.
"""

from __future__ import annotations

import random
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import msgspec
import pytest

from engine import errors
from engine.campaigns import Campaign, Discount, Limits, Window, new_campaign, transition
from engine.codes import CodeSpec, generate
from engine.events import (
    ASSIGNED,
    AVAILABLE,
    CONFIRMED,
    EXPIRED,
    HELD,
    R_ACTIVE,
    R_ROLLED_BACK,
    REDEEMED,
    RELEASED,
    Assignment,
    CodesVoided,
    Event,
    IdempotencyRecorded,
    RedemptionRecorded,
    RedemptionRolledBack,
    ReservationChanged,
    Validation,
    VoucherChanged,
)
from engine.routing import BUCKETS, bucket_of, bucket_of_id
from engine.shard_state import CampaignStats, Outcome, RedeemRequest, ShardState, fingerprint
from store.memory import MemoryShardStore

T = TypeVar("T")
T0 = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)  # a Monday, noon
ALL_BUCKETS = list(range(BUCKETS))
TTL = timedelta(minutes=15)


class FakeClock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> datetime:
        self.now += timedelta(**kw)
        return self.now


def done(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never waits (every ``MemoryShardStore`` method)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return cast(T, stop.value)
    raise AssertionError("the in-memory store waited")


def rebuild(
    db: MemoryShardStore, clock: FakeClock, seed: int = 99, ttl: timedelta = TTL
) -> ShardState:
    """A fresh shard loaded from the rows only, every key however old."""
    state = ShardState(clock=clock, random_bytes=random.Random(seed).randbytes, reservation_ttl=ttl)
    done(db.load(state, ALL_BUCKETS, datetime.min.replace(tzinfo=UTC)))
    return state


class Shop:
    """A shard with a fake clock and the in-memory store that follows it."""

    def __init__(self, seed: int = 1, ttl: timedelta = TTL) -> None:
        self.clock = FakeClock()
        self.ttl = ttl
        self.state = ShardState(
            clock=self.clock, random_bytes=random.Random(seed).randbytes, reservation_ttl=ttl
        )
        self.db = MemoryShardStore()

    def install(self, campaign: Campaign, codes: list[str] | None = None) -> Campaign:
        self.state.put_campaign(campaign)
        self.db.put_campaign(campaign)
        if codes:
            fresh = self.state.claim_new_codes(codes)
            balance = campaign.gift_balance if campaign.is_gift_card else None
            done(self.db.copy_codes(campaign.id, fresh, balance))
            self.state.admit_codes(campaign.id, fresh)
        return campaign

    def move(self, campaign_id: str, action: str) -> Campaign:
        c = transition(self.state.campaign(campaign_id), action, self.clock())
        self.state.put_campaign(c)
        self.db.put_campaign(c)
        return c

    def sync(self) -> list[Event]:
        """One group commit, then the void of the campaigns it ended, as a shard does."""
        events = self.state.drain()
        for campaign_id in done(self.db.write(events, ALL_BUCKETS)):
            while done(self.db.void_chunk(campaign_id, ALL_BUCKETS, 2)) == 2:
                pass
        return events

    def restart(self, seed: int = 99) -> ShardState:
        self.sync()
        self.state = rebuild(self.db, self.clock, seed, self.ttl)
        return self.state


def active(campaign: Campaign) -> Campaign:
    return transition(campaign, "activate", campaign.created_at or T0)


def discount_campaign(cid: str = "disc", **kw: Any) -> Campaign:
    args: dict[str, Any] = dict(
        id=cid, name="ten percent", type="discount", currency="EUR", now=T0,
        discount=Discount("percent", 10, max=500), ends_at=T0 + timedelta(days=30),
    )
    args.update(kw)
    return active(new_campaign(**args))


def gift_campaign(cid: str = "gift", balance: int = 5000, **kw: Any) -> Campaign:
    return active(
        new_campaign(
            id=cid, name="gift card", type="gift_card", currency="EUR", now=T0,
            gift_balance=balance, **kw,
        )
    )


def shared_campaign(
    cid: str = "shared", code: str = "SAVE5", total: int | None = 3, per: int | None = 2,
    **kw: Any,
) -> Campaign:
    return active(
        new_campaign(
            id=cid, name="five off", type="shared_code", currency="EUR", now=T0,
            discount=Discount("amount", 500), shared_code=code,
            limits=Limits(total=total, per_customer=per), **kw,
        )
    )


def req(code: str, amount: int = 2000, cust: str | None = None, **kw: Any) -> RedeemRequest:
    return RedeemRequest(code=code, amount=amount, currency=kw.pop("currency", "EUR"),
                         customer_id=cust, **kw)


CODES = ["DISC-A", "DISC-B", "DISC-C"]
GIFTS = ["GIFT-A", "GIFT-B"]


@pytest.fixture
def shop() -> Shop:
    s = Shop()
    s.install(discount_campaign(), CODES)
    s.install(gift_campaign(), GIFTS)
    s.install(shared_campaign())
    s.sync()
    return s


def stats(shop: Shop, cid: str) -> CampaignStats:
    return shop.state.stats(cid)


# --- discount codes ------------------------------------------------------------------


def test_percent_discount_with_cap(shop: Shop) -> None:
    r = shop.state.redeem(req("DISC-A", 2000, "alice", order_id="o1"))
    assert (r.discount_amount, r.order_amount, r.currency) == (200, 2000, "EUR")
    assert (r.campaign_id, r.code, r.customer_id, r.order_id) == ("disc", "DISC-A", "alice", "o1")
    assert r.status == R_ACTIVE and r.balance_after is None and r.created_at == T0
    assert bucket_of_id(r.id) == bucket_of("DISC-A") and r.id.startswith("red_")
    capped = shop.state.redeem(req("DISC-B", 9000))
    assert capped.discount_amount == 500  # 10 % of 9000 is 900, capped at 500


def test_min_order_and_amount_discount() -> None:
    s = Shop()
    s.install(discount_campaign(discount=Discount("amount", 700), min_order=1000), ["M-1"])
    with pytest.raises(errors.OrderTooSmall, match="order amount 999 is below the minimum 1000"):
        s.state.redeem(req("M-1", 999))
    assert s.state.redeem(req("M-1", 1000)).discount_amount == 700


def test_single_use_code_redeems_once(shop: Shop) -> None:
    shop.state.redeem(req("DISC-A"))
    with pytest.raises(errors.AlreadyRedeemed, match="code DISC-A was redeemed already"):
        shop.state.redeem(req("DISC-A"))
    assert shop.state.voucher("disc-a")["status"] == "redeemed"
    st = stats(shop, "disc")
    assert (st.available, st.redeemed, st.redemptions, st.active_redemptions) == (2, 1, 1, 1)
    assert (st.discount_total, st.order_total) == (200, 2000)


def test_generated_codes_are_redeemable() -> None:
    s = Shop()
    c = s.install(discount_campaign())
    codes = generate(CodeSpec(), 50, random.Random(5).randbytes)
    s.install(c, codes)
    assert s.state.codes_in_campaign("disc") == len(set(codes)) == 50
    r = s.state.redeem(req(codes[7].lower(), 1000))
    assert (r.code, r.discount_amount) == (codes[7], 100)
    assert s.state.stats("disc").available == 49


def test_codes_are_normalized(shop: Shop) -> None:
    r = shop.state.redeem(req("  disc-b "))
    assert r.code == "DISC-B"


def test_rollback_makes_the_code_redeemable_again(shop: Shop) -> None:
    before = stats(shop, "disc")
    r = shop.state.redeem(req("DISC-A", 3000))
    rolled = shop.state.rollback(r.id)
    assert rolled.status == R_ROLLED_BACK and rolled.rolled_back_at == T0
    assert msgspec.structs.replace(rolled, status=R_ACTIVE, rolled_back_at=None) == r
    after = stats(shop, "disc")
    assert (after.available, after.redeemed, after.active_redemptions) == (3, 0, 0)
    assert (after.discount_total, after.order_total) == (0, 0)
    assert (after.redemptions, after.rollbacks) == (1, 1)
    assert msgspec.structs.replace(after, redemptions=0, rollbacks=0) == before
    with pytest.raises(errors.AlreadyRolledBack):
        shop.state.rollback(r.id)
    assert shop.state.redeem(req("DISC-A", 3000)).discount_amount == 300


def test_rollback_of_assigned_code_gives_it_back_to_its_owner(shop: Shop) -> None:
    code = shop.state.assign("disc", "alice").code
    r = shop.state.redeem(req(code, cust="alice"))
    shop.state.rollback(r.id)
    assert shop.state.voucher(code)["status"] == "assigned"
    assert shop.state.voucher(code)["customer_id"] == "alice"
    with pytest.raises(errors.WrongCustomer):
        shop.state.redeem(req(code, cust="bob"))


def test_rollback_of_unassigned_code_restores_it_exactly(shop: Shop) -> None:
    """Redeeming a bearer code does not tie it to the redeemer, so "redeem + rollback"
    leaves it available to anyone, exactly as it was."""
    before = (stats(shop, "disc"), shop.state.voucher("DISC-A"))
    r = shop.state.redeem(req("DISC-A", cust="alice"))
    assert shop.state.voucher("DISC-A")["customer_id"] is None
    shop.state.rollback(r.id)
    after = (stats(shop, "disc"), shop.state.voucher("DISC-A"))
    assert after[1] == before[1]  # status available, customer None
    assert msgspec.structs.replace(after[0], redemptions=0, rollbacks=0) == before[0]
    assert shop.state.redeem(req("DISC-A", cust="bob")).customer_id == "bob"


def test_unknown_redemption(shop: Shop) -> None:
    with pytest.raises(errors.UnknownRedemption, match="no redemption has id 'red_nope'"):
        shop.state.rollback("red_nope")


# --- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "cls", "message"),
    [
        (req("DISC-A", -1), errors.InvalidInput, "order.amount must be >= 0"),
        (req("DISC-A", 10**13), errors.InvalidInput, "order.amount is larger than"),
        (req("DISC-A", currency="USD"), errors.CurrencyMismatch,
         "order currency USD does not match campaign currency EUR"),
        (req("NOPE-1"), errors.UnknownCode, "no voucher has code 'NOPE-1'"),
        (req("nope-1"), errors.UnknownCode, "no voucher has code 'NOPE-1'"),
        (req(""), errors.MalformedCode, "code must be a non-empty string"),
        (req("   "), errors.MalformedCode, "code must be a non-empty string"),
        (req("X" * 129), errors.MalformedCode, "at most 128 characters"),
        (RedeemRequest(code=123, amount=1, currency="EUR"),  # type: ignore[arg-type]
         errors.MalformedCode, "code must be a non-empty string"),
        (req("DISC-A", cust="c" * 129), errors.InvalidInput,
         "customer_id must be a string of at most 128 characters"),
        (req("DISC-A", order_id="o" * 129), errors.InvalidInput, "order_id must be a string"),
        (req("SAVE5"), errors.InvalidInput, "customer_id is required"),
    ],
)
def test_bad_input_raises_typed_errors(
    shop: Shop, request_: RedeemRequest, cls: type[errors.VoucherError], message: str
) -> None:
    before = stats(shop, "disc")
    with pytest.raises(cls) as info:
        shop.state.redeem(request_)
    assert type(info.value) is cls
    assert message in info.value.message
    with pytest.raises(cls):
        shop.state.reserve(request_)
    out = shop.state.redeem_one(request_)
    assert out.rejection is not None and out.rejection.error == cls.code
    assert shop.state.drain() == [] and stats(shop, "disc") == before


def test_unknown_campaign(shop: Shop) -> None:
    with pytest.raises(errors.UnknownCampaign, match="unknown campaign 'nope'"):
        shop.state.campaign("nope")
    with pytest.raises(errors.UnknownCampaign):
        shop.state.assign("nope", "alice")
    assert shop.state.stats("nope") == CampaignStats("nope")


def test_unknown_reservation(shop: Shop) -> None:
    with pytest.raises(errors.UnknownReservation, match="no reservation has id 'res_x'"):
        shop.state.confirm("res_x")
    with pytest.raises(errors.UnknownReservation):
        shop.state.release("res_x")


# --- gift cards ----------------------------------------------------------------------


def test_gift_card_partial_spends_and_rollbacks(shop: Shop) -> None:
    s = shop.state
    assert stats(shop, "gift").gift_balance_outstanding == 10_000
    r1 = s.redeem(req("GIFT-A", 2000, "alice"))
    assert (r1.discount_amount, r1.balance_after, r1.customer_id) == (2000, 3000, "alice")
    assert s.voucher("GIFT-A") == {  # a partial spend does not tie the card to alice
        "code": "GIFT-A", "campaign_id": "gift", "status": "available",
        "customer_id": None, "reserved": False, "balance": 3000,
        "active": True, "starts_at": None, "expires_at": None,
    }
    r2 = s.redeem(req("GIFT-A", 4500, "alice"))
    assert (r2.discount_amount, r2.balance_after) == (3000, 0)
    assert s.voucher("GIFT-A")["status"] == "redeemed"
    with pytest.raises(errors.Exhausted, match="gift card GIFT-A has no balance left"):
        s.redeem(req("GIFT-A", 100, "alice"))
    assert stats(shop, "gift").gift_balance_outstanding == 5000
    s.rollback(r1.id)
    assert s.voucher("GIFT-A")["balance"] == 2000
    assert s.voucher("GIFT-A")["status"] == "available"  # nobody owns it: back to available
    assert s.voucher("GIFT-A")["customer_id"] is None
    assert s.assign("gift", "bob").code == "GIFT-B"  # untouched; GIFT-A has an active spend
    with pytest.raises(errors.BankExhausted):
        s.assign("gift", "carol")
    s.rollback(r2.id)
    assert s.voucher("GIFT-A")["balance"] == 5000
    st = stats(shop, "gift")
    assert (st.gift_balance_outstanding, st.discount_total, st.active_redemptions) == (10_000, 0, 0)
    assert (st.redemptions, st.rollbacks, st.redeemed, st.available, st.assigned) == (2, 2, 0, 1, 1)
    a = s.assign("gift", "carol")  # every spend undone: the card is untouched again
    assert (a.code, a.created) == ("GIFT-A", True)
    assert s.voucher("GIFT-A")["customer_id"] == "carol"


def test_bearer_gift_card_is_for_anyone(shop: Shop) -> None:
    s = shop.state
    assert s.redeem(req("GIFT-B", 1000, "alice")).balance_after == 4000
    assert s.redeem(req("GIFT-B", 1000, "bob")).balance_after == 3000
    assert s.redeem(req("GIFT-B", 1000)).balance_after == 2000
    assert (s.voucher("GIFT-B")["status"], s.voucher("GIFT-B")["customer_id"]) == ("available", None)
    assert s.validate(req("GIFT-B", 5000, "carol")).discount_amount == 2000


def test_assigned_gift_card_is_only_for_its_owner(shop: Shop) -> None:
    s = shop.state
    code = s.assign("gift", "alice").code
    partial = s.redeem(req(code, 1000, "alice"))
    assert (s.voucher(code)["status"], s.voucher(code)["customer_id"]) == ("assigned", "alice")
    with pytest.raises(errors.WrongCustomer, match="belongs to another customer"):
        s.redeem(req(code, 1000, "bob"))
    with pytest.raises(errors.WrongCustomer):
        s.redeem(req(code, 1000))
    full = s.redeem(req(code, 9000, "alice"))
    assert (full.discount_amount, s.voucher(code)["status"]) == (4000, "redeemed")
    assert s.voucher(code)["customer_id"] == "alice"
    s.rollback(full.id)
    assert (s.voucher(code)["status"], s.voucher(code)["customer_id"]) == ("assigned", "alice")
    assert s.voucher(code)["balance"] == 4000
    s.rollback(partial.id)
    assert (s.voucher(code)["status"], s.voucher(code)["balance"]) == ("assigned", 5000)
    assert s.assign("gift", "alice").code == code
    assert s.validate(req(code, 100, "bob")).error == "wrong_customer"


def test_anonymous_gift_card_spends(shop: Shop) -> None:
    s = shop.state
    assert s.redeem(req("GIFT-B", 1500)).balance_after == 3500
    assert s.voucher("GIFT-B")["status"] == "available"
    assert s.redeem(req("GIFT-B", 9999)).discount_amount == 3500
    assert s.voucher("GIFT-B")["status"] == "redeemed"
    assert s.voucher("GIFT-B")["customer_id"] is None


def test_assignment_hands_out_only_untouched_gift_cards(shop: Shop) -> None:
    """A partly spent bearer card stays available, but ``assign`` must not hand it to a new
    customer (who would get less than the full balance and lock out the card's holder);
    once its spends are all rolled back it is untouched and assignable again."""
    s = shop.state
    spend = s.redeem(req("GIFT-B", 1500))  # GIFT-B is the top of the stack
    a = s.assign("gift", "alice")
    assert (a.code, s.voucher(a.code)["balance"]) == ("GIFT-A", 5000)
    with pytest.raises(errors.BankExhausted):
        s.assign("gift", "bob")
    assert s.redeem(req("GIFT-B", 500, "bob")).balance_after == 3000  # still a bearer card
    s.rollback(spend.id)
    with pytest.raises(errors.BankExhausted):  # bob's spend is still active
        s.assign("gift", "bob")
    s.rollback(next(r.id for r in s.redemptions.values() if r.customer_id == "bob"))
    s.drain()
    b = s.assign("gift", "bob")
    assert (b.code, s.voucher("GIFT-B")["balance"]) == ("GIFT-B", 5000)
    assert s.drain() == [VoucherChanged("GIFT-B", ASSIGNED, "bob", 5000, 0)]


# --- shared codes and flash sales ----------------------------------------------------


def test_shared_code_global_and_per_customer_limits(shop: Shop) -> None:
    s = shop.state
    a1 = s.redeem(req("save5", 2000, "alice"))
    assert (a1.code, a1.discount_amount) == ("SAVE5", 500)
    s.redeem(req("SAVE5", 2000, "alice"))
    with pytest.raises(errors.CustomerLimitReached, match="customer alice used code SAVE5 2"):
        s.redeem(req("SAVE5", 2000, "alice"))
    s.redeem(req("SAVE5", 2000, "bob"))
    with pytest.raises(errors.Exhausted, match="reached its limit of 3 redemptions"):
        s.redeem(req("SAVE5", 2000, "carol"))
    assert s.voucher("SAVE5")["redemptions"] == 3 and s.voucher("SAVE5")["limit"] == 3
    s.rollback(a1.id)
    s.redeem(req("SAVE5", 2000, "carol"))
    with pytest.raises(errors.Exhausted):
        s.redeem(req("SAVE5", 2000, "dave"))
    st = stats(shop, "shared")
    assert (st.active_redemptions, st.redemptions, st.rollbacks) == (3, 4, 1)
    assert (st.discount_total, st.order_total) == (1500, 6000)
    assert (st.available, st.assigned, st.redeemed, st.void) == (0, 0, 0, 0)


def test_shared_code_amount_discount_never_exceeds_order(shop: Shop) -> None:
    assert shop.state.redeem(req("SAVE5", 300, "alice")).discount_amount == 300


def test_duplicate_shared_code_is_not_claimed_as_a_unique_code(shop: Shop) -> None:
    assert shop.state.claim_new_codes(["SAVE5", "DISC-A", "NEW-1", "NEW-1"]) == ["NEW-1"]


def flash_campaign() -> Campaign:
    return active(
        new_campaign(
            id="flash", name="flash", type="flash_sale", currency="EUR", now=T0,
            discount=Discount("percent", 50), shared_code="FLASH", limits=Limits(total=2),
            starts_at=T0 + timedelta(hours=1), ends_at=T0 + timedelta(days=7),
            timezone_name="Europe/Berlin", windows=(Window((0, 1, 2, 3, 4), "14:00", "16:00"),),
        )
    )


def test_flash_sale_quantity_and_time_box() -> None:
    s = Shop()
    s.install(flash_campaign())
    st = s.state
    with pytest.raises(errors.CampaignNotStarted):
        st.redeem(req("FLASH", 1000, "a"))
    s.clock.advance(hours=1)  # 13:00 UTC = 14:00 Berlin, window opens
    assert st.redeem(req("FLASH", 1000, "a")).discount_amount == 500
    s.clock.advance(hours=1, minutes=59)  # 15:59 Berlin
    st.redeem(req("FLASH", 1000, "b"))
    assert st.validate(req("FLASH", 1000, "c")).error == "exhausted"
    s.clock.advance(minutes=1)  # 16:00 Berlin: window closed
    assert st.validate(req("FLASH", 1000, "c")).error == "outside_window"
    s.clock.now = T0 + timedelta(days=5, hours=1)  # Saturday 14:00 Berlin
    assert st.validate(req("FLASH", 1000, "c")).error == "outside_window"
    s.clock.now = T0 + timedelta(days=7)
    assert st.validate(req("FLASH", 1000, "c")).error == "expired"


# --- lifecycle in the shard ----------------------------------------------------------


def test_paused_and_draft_campaigns_refuse(shop: Shop) -> None:
    shop.move("disc", "pause")
    assert shop.state.validate(req("DISC-A")).error == "campaign_paused"
    with pytest.raises(errors.CampaignPaused, match="campaign disc is paused"):
        shop.state.redeem(req("DISC-A"))
    shop.move("disc", "activate")
    shop.state.redeem(req("DISC-A"))
    draft = new_campaign(id="draft", name="d", type="discount", currency="EUR", now=T0,
                         discount=Discount("amount", 100))
    shop.install(draft, ["DRAFT-1"])
    assert shop.state.validate(req("DRAFT-1")).error == "campaign_not_active"


def test_ending_voids_unredeemed_codes(shop: Shop) -> None:
    s = shop.state
    kept = s.redeem(req("DISC-A"))
    assigned = s.assign("disc", "alice").code
    held = s.reserve(req([c for c in CODES if c not in ("DISC-A", assigned)][0]))
    s.drain()
    shop.move("disc", "end")
    events = s.drain()
    assert events == [
        ReservationChanged(msgspec.structs.replace(held, state=RELEASED)),
        CodesVoided("disc"),
    ]
    st = stats(shop, "disc")
    assert (st.available, st.assigned, st.redeemed, st.void, st.held) == (0, 0, 1, 2, 0)
    for code in CODES:
        assert s.voucher(code)["status"] == ("redeemed" if code == "DISC-A" else "void")
    assert s.validate(req(assigned, cust="alice")).error == "campaign_ended"
    with pytest.raises(errors.CampaignEnded):
        s.assign("disc", "bob")
    with pytest.raises(errors.ReservationClosed, match="is released"):
        s.confirm(held.id)
    s.rollback(kept.id)  # a refund after the end still works, but the code stays dead
    assert s.voucher("DISC-A")["status"] == "void"
    assert (stats(shop, "disc").void, stats(shop, "disc").redeemed) == (3, 0)


def test_ending_a_gift_card_campaign_voids_partly_spent_cards(shop: Shop) -> None:
    spend = shop.state.redeem(req("GIFT-A", 1000, "alice"))
    full = shop.state.redeem(req("GIFT-B", 9000))
    assert stats(shop, "gift").gift_balance_outstanding == 4000
    shop.move("gift", "end")
    assert shop.state.voucher("GIFT-A")["status"] == "void"
    assert shop.state.validate(req("GIFT-A", 100, "alice")).error == "campaign_ended"
    assert stats(shop, "gift").gift_balance_outstanding == 0  # void cards are worth nothing
    shop.state.rollback(spend.id)
    shop.state.rollback(full.id)  # refunds after the end: the balance comes back, dead
    assert [shop.state.voucher(c)["status"] for c in GIFTS] == ["void", "void"]
    assert [shop.state.voucher(c)["balance"] for c in GIFTS] == [5000, 5000]
    assert stats(shop, "gift").gift_balance_outstanding == 0


# --- reservations --------------------------------------------------------------------


def test_hold_then_confirm(shop: Shop) -> None:
    s = shop.state
    res = s.reserve(req("DISC-A", 3000, "alice", order_id="o1"))
    assert (res.state, res.discount_amount, res.expires_at) == (HELD, 300, T0 + TTL)
    assert bucket_of_id(res.id) == bucket_of("DISC-A")
    assert s.voucher("DISC-A")["reserved"] is True
    assert stats(shop, "disc").held == 1
    assert s.validate(req("DISC-A", 3000, "bob")).error == "code_reserved"
    with pytest.raises(errors.CodeReserved):
        s.redeem(req("DISC-A", 3000, "alice"))  # only through the reservation
    with pytest.raises(errors.CodeReserved):
        s.reserve(req("DISC-A", 3000, "bob"))
    shop.clock.advance(minutes=14, seconds=59)
    r = s.confirm(res.id)
    assert (r.code, r.customer_id, r.order_id, r.discount_amount) == ("DISC-A", "alice", "o1", 300)
    assert s.reservations[res.id].state == CONFIRMED
    assert s.reservations[res.id].redemption_id == r.id
    assert s.voucher("DISC-A")["status"] == "redeemed"
    assert s.voucher("DISC-A")["reserved"] is False
    with pytest.raises(errors.ReservationClosed, match="is confirmed"):
        s.confirm(res.id)
    with pytest.raises(errors.ReservationClosed, match="is confirmed"):
        s.release(res.id)


def test_hold_then_release(shop: Shop) -> None:
    res = shop.state.reserve(req("DISC-B"))
    released = shop.state.release(res.id)
    assert released == msgspec.structs.replace(res, state=RELEASED)
    assert shop.state.voucher("DISC-B")["reserved"] is False
    assert shop.state.redeem(req("DISC-B")).code == "DISC-B"
    with pytest.raises(errors.ReservationClosed, match="is released"):
        shop.state.confirm(res.id)


def test_hold_expires_at_ttl(shop: Shop) -> None:
    res = shop.state.reserve(req("DISC-C"))
    shop.clock.advance(minutes=15)
    with pytest.raises(errors.ReservationClosed, match="is expired"):
        shop.state.confirm(res.id)
    assert shop.state.reservations[res.id].state == EXPIRED
    assert shop.state.redeem(req("DISC-C")).code == "DISC-C"


def test_sweep_expires_due_holds_only(shop: Shop) -> None:
    first = shop.state.reserve(req("DISC-A"))
    shop.clock.advance(minutes=10)
    second = shop.state.reserve(req("DISC-B"))
    shop.state.drain()
    shop.clock.advance(minutes=5)
    assert shop.state.expire_reservations() == 1
    assert shop.state.drain() == [
        ReservationChanged(msgspec.structs.replace(first, state=EXPIRED))
    ]
    assert shop.state.reservations[second.id].state == HELD
    assert shop.state.expire_reservations() == 0


def test_expired_hold_does_not_block_before_the_sweep(shop: Shop) -> None:
    """Every decision (validate, redeem, reserve, confirm, assign) first expires the holds
    past their TTL, so a stale hold never blocks, without waiting for the housekeeping."""
    s = shop.state
    h = s.reserve(req("DISC-A", cust="alice"))
    shop.clock.advance(minutes=15)
    assert s.voucher("DISC-A")["reserved"] is True  # a read does not sweep
    s.drain()
    assert s.validate(req("DISC-A", cust="bob")).valid is True
    assert s.drain() == [ReservationChanged(msgspec.structs.replace(h, state=EXPIRED))]
    assert s.redeem(req("DISC-A", cust="bob")).customer_id == "bob"
    assert stats(shop, "disc").held == 0


@pytest.mark.parametrize("decision", ["redeem", "reserve", "confirm", "assign"])
def test_each_decision_expires_due_holds_first(decision: str) -> None:
    s = Shop()
    s.install(discount_campaign(), ["ONLY-1", "OTHER-2"])
    stale = s.state.reserve(req("ONLY-1", cust="alice"))
    s.clock.advance(minutes=5)
    fresh = s.state.reserve(req("OTHER-2", cust="carol"))
    s.clock.advance(minutes=10)  # stale is due, fresh is not
    if decision == "redeem":
        assert s.state.redeem(req("ONLY-1", cust="bob")).code == "ONLY-1"
    elif decision == "reserve":
        assert s.state.reserve(req("ONLY-1", cust="bob")).code == "ONLY-1"
    elif decision == "confirm":
        assert s.state.confirm(fresh.id).code == "OTHER-2"
    else:
        assert s.state.assign("disc", "bob").code == "ONLY-1"  # the only unheld code
    assert s.state.reservations[stale.id].state == EXPIRED
    assert s.state.voucher("ONLY-1")["reserved"] is (decision == "reserve")


def test_shared_code_holds_count_against_the_limits() -> None:
    s = Shop()
    s.install(shared_campaign(total=2, per=1))
    st = s.state
    a = st.reserve(req("SAVE5", 1000, "alice"))
    with pytest.raises(errors.CustomerLimitReached):
        st.reserve(req("SAVE5", 1000, "alice"))
    b = st.reserve(req("SAVE5", 1000, "bob"))
    assert stats(s, "shared").held == 2
    assert st.validate(req("SAVE5", 1000, "carol")).error == "exhausted"
    st.confirm(a.id)  # the hold becomes the redemption: counted once
    assert (stats(s, "shared").held, stats(s, "shared").active_redemptions) == (1, 1)
    st.release(b.id)
    assert st.validate(req("SAVE5", 1000, "carol")).valid is True
    st.redeem(req("SAVE5", 1000, "carol"))
    assert st.validate(req("SAVE5", 1000, "dave")).error == "exhausted"


def test_shared_code_hold_expiry_frees_quota() -> None:
    s = Shop()
    s.install(shared_campaign(total=1, per=None))
    s.state.reserve(req("SAVE5", 1000, "alice"))
    s.clock.advance(minutes=15)
    assert s.state.expire_reservations() == 1
    s.state.redeem(req("SAVE5", 1000, "bob"))


def test_confirm_in_paused_campaign_keeps_the_hold(shop: Shop) -> None:
    res = shop.state.reserve(req("DISC-A"))
    shop.move("disc", "pause")
    with pytest.raises(errors.CampaignPaused):
        shop.state.confirm(res.id)
    assert shop.state.reservations[res.id].state == HELD
    shop.move("disc", "activate")
    assert shop.state.confirm(res.id).code == "DISC-A"


def test_gift_card_hold_and_confirm(shop: Shop) -> None:
    res = shop.state.reserve(req("GIFT-A", 7000, "alice"))
    assert res.discount_amount == 5000
    r = shop.state.confirm(res.id)
    assert (r.discount_amount, r.balance_after) == (5000, 0)


# --- idempotency ---------------------------------------------------------------------


def test_replay_returns_the_first_answer(shop: Shop) -> None:
    s = shop.state
    first = s.redeem_one(req("DISC-A", 2000, "alice", idempotency_key="k1"))
    assert first.redemption is not None
    s.drain()
    shop.clock.advance(minutes=1)
    again = s.redeem_one(req("DISC-A", 2000, "alice", idempotency_key="k1"))
    assert again == first
    assert s.drain() == []
    assert stats(shop, "disc").redemptions == 1
    assert again.unwrap() == first.redemption


def test_replay_of_a_final_rejection_is_the_same_rejection(shop: Shop) -> None:
    first = shop.state.redeem_one(req("DISC-A", currency="USD", idempotency_key="k2"))
    assert first.rejection is not None and first.rejection.error == "currency_mismatch"
    assert shop.state.redeem_one(req("DISC-A", currency="USD", idempotency_key="k2")) == first
    with pytest.raises(errors.CurrencyMismatch):
        first.unwrap()


def test_same_key_different_body_conflicts(shop: Shop) -> None:
    shop.state.redeem_one(req("DISC-A", 2000, idempotency_key="k3"))
    shop.state.drain()
    out = shop.state.redeem_one(req("DISC-A", 2001, idempotency_key="k3"))
    assert out.rejection is not None
    assert out.rejection.error == "idempotency_conflict"
    assert out.rejection.message == "idempotency key 'k3' was used with a different request"
    with pytest.raises(errors.IdempotencyConflict):
        out.unwrap()
    assert shop.state.drain() == []
    # the same key on another operation is a different body too
    r = shop.state.redeem(req("DISC-B"))
    assert shop.state.rollback_one(r.id, "k3").rejection.error == "idempotency_conflict"  # type: ignore[union-attr]


@pytest.mark.parametrize("key", ["", "k" * 513])
def test_bad_idempotency_key(shop: Shop, key: str) -> None:
    out = shop.state.redeem_one(req("DISC-A", idempotency_key=key))
    assert out.rejection is not None and out.rejection.error == "invalid_input"
    assert stats(shop, "disc").redemptions == 0


def test_rollback_confirm_release_replay(shop: Shop) -> None:
    s = shop.state
    r = s.redeem(req("DISC-A"))
    out = s.rollback_one(r.id, "rb")
    assert s.rollback_one(r.id, "rb") == out
    assert s.rollback_one(r.id).rejection.error == "already_rolled_back"  # type: ignore[union-attr]
    res = s.reserve_one(req("DISC-B", idempotency_key="rs")).reservation
    assert res is not None
    assert s.reserve_one(req("DISC-B", idempotency_key="rs")).reservation == res
    conf = s.confirm_one(res.id, "cf")
    assert conf.redemption is not None and s.confirm_one(res.id, "cf") == conf
    res2 = s.reserve(req("DISC-C"))
    rel = s.release_one(res2.id, "rl")
    assert rel.reservation is not None and rel.reservation.state == RELEASED
    assert s.release_one(res2.id, "rl") == rel


def test_prune_idempotency(shop: Shop) -> None:
    shop.state.redeem_one(req("DISC-A", idempotency_key="old"))
    shop.clock.advance(hours=1)
    shop.state.redeem_one(req("DISC-B", idempotency_key="new"))
    assert shop.state.prune_idempotency(T0 + timedelta(minutes=30)) == 1
    assert set(shop.state.idem) == {"new"}


# --- validation ----------------------------------------------------------------------


def test_validation_of_a_good_code(shop: Shop) -> None:
    before = (stats(shop, "disc"), stats(shop, "gift"))
    assert shop.state.validate(req(" disc-a", 3000)) == Validation(
        code="DISC-A", valid=True, campaign_id="disc", discount_amount=300
    )
    assert shop.state.validate(req("GIFT-A", 7000)) == Validation(
        code="GIFT-A", valid=True, campaign_id="gift", discount_amount=5000, balance=5000
    )
    assert shop.state.validate_one(req("SAVE5", 100, "a")).validation == Validation(
        code="SAVE5", valid=True, campaign_id="shared", discount_amount=100
    )
    assert shop.state.drain() == []
    assert (stats(shop, "disc"), stats(shop, "gift")) == before


def test_validation_explains_why_not() -> None:
    s = Shop()
    st = s.state
    s.install(discount_campaign(min_order=1000), ["D-1", "D-2", "D-3"])
    s.install(discount_campaign("later", starts_at=T0 + timedelta(days=1)), ["L-1"])
    s.install(discount_campaign("soon", ends_at=T0 + timedelta(hours=1)), ["S-1"])
    s.install(shared_campaign(total=1, per=1))
    st.redeem(req("D-1", 1000))
    st.assign("disc", "alice")  # takes D-3, the top of the stack
    st.redeem(req("SAVE5", 1000, "bob"))

    def why(r: RedeemRequest) -> tuple[str | None, str | None]:
        v = st.validate(r)
        assert v.valid is False and v.campaign_id is None and v.discount_amount == 0
        return v.error, v.message

    assert why(req("D-1", 1000)) == ("already_redeemed", "code D-1 was redeemed already")
    assert why(req("D-2", 999)) == ("order_too_small", "order amount 999 is below the minimum 1000")
    assert why(req("D-3", 1000, "bob"))[0] == "wrong_customer"
    assert why(req("D-3", 1000))[0] == "wrong_customer"
    assert why(req("L-1"))[0] == "not_started"
    assert why(req("SAVE5", 1000, "carol"))[0] == "exhausted"
    assert why(req("D-2", 1000, currency="GBP"))[0] == "currency_mismatch"
    assert why(req("ZZZ"))[0] == "unknown_code"
    assert why(req(""))[0] == "malformed_code"
    s.clock.advance(hours=1)
    assert why(req("S-1")) == ("expired", "campaign soon expired at 2025-01-06T13:00:00+00:00")
    s.move("disc", "pause")
    assert why(req("D-2", 1000)) == ("campaign_paused", "campaign disc is paused")
    assert st.validate(req("D-3", 1000, "alice")).error == "campaign_paused"
    s.move("disc", "activate")
    assert st.validate(req("D-3", 1000, "alice")).valid is True


def test_validation_customer_limit(shop: Shop) -> None:
    shop.state.redeem(req("SAVE5", 1000, "alice"))
    shop.state.redeem(req("SAVE5", 1000, "alice"))
    v = shop.state.validate(req("SAVE5", 1000, "alice"))
    assert (v.code, v.error) == ("SAVE5", "customer_limit_reached")


# --- assignment ----------------------------------------------------------------------


def test_assignment_is_stable_and_exhausts(shop: Shop) -> None:
    s = shop.state
    a = s.assign("disc", "alice")
    assert (a.campaign_id, a.customer_id, a.created) == ("disc", "alice", True)
    assert s.assign("disc", "alice") == msgspec.structs.replace(a, created=False)
    b = s.assign("disc", "bob").code
    c = s.assign("disc", "carol").code
    assert sorted([a.code, b, c]) == CODES
    with pytest.raises(errors.BankExhausted, match="campaign disc has no available code left"):
        s.assign("disc", "dave")
    assert s.assign_one("disc", "dave").rejection.error == "bank_exhausted"  # type: ignore[union-attr]
    assert s.assign("disc", "alice").code == a.code
    st = stats(shop, "disc")
    assert (st.available, st.assigned) == (0, 3)
    assert s.assign("shared", "zoe") == msgspec.structs.replace(
        a, campaign_id="shared", customer_id="zoe", code="SAVE5", created=False
    )


def test_assign_needs_a_customer(shop: Shop) -> None:
    with pytest.raises(errors.InvalidInput, match="customer_id is required"):
        shop.state.assign("disc", "")
    with pytest.raises(errors.InvalidInput):
        shop.state.assign("disc", "x" * 129)


def test_assignment_skips_held_codes_and_redeemed_codes(shop: Shop) -> None:
    s = shop.state
    s.redeem(req("DISC-C"))
    s.reserve(req("DISC-B"))
    assert s.assign("disc", "alice").code == "DISC-A"
    with pytest.raises(errors.BankExhausted):
        s.assign("disc", "bob")


def test_code_held_during_assignment_is_assignable_after_release(shop: Shop) -> None:
    """``assign`` skips a held code but keeps it on the available stack, so once the hold
    is released the code can be assigned."""
    s = shop.state
    res = s.reserve(req("DISC-C"))  # DISC-C is the top of the stack
    assert s.assign("disc", "alice").code == "DISC-B"
    s.release(res.id)
    assert stats(shop, "disc").available == 2
    assert s.assign("disc", "bob").code in ("DISC-A", "DISC-C")
    assert s.assign("disc", "carol").code in ("DISC-A", "DISC-C")


def test_assigned_code_is_only_for_its_customer(shop: Shop) -> None:
    code = shop.state.assign("disc", "alice").code
    assert shop.state.voucher(code)["customer_id"] == "alice"
    with pytest.raises(errors.WrongCustomer):
        shop.state.redeem(req(code, cust="bob"))
    assert shop.state.redeem(req(code, cust="alice")).customer_id == "alice"


# --- events --------------------------------------------------------------------------


def test_redemption_events(shop: Shop) -> None:
    r = shop.state.redeem(req("DISC-A", 2000, "alice"))
    assert shop.state.drain() == [  # the row keeps no customer: the redemption says who
        VoucherChanged("DISC-A", REDEEMED, None, None, 1),
        RedemptionRecorded(r),
    ]
    assert shop.state.drain() == [] and shop.state.events == []


def test_events_of_an_assigned_code_carry_its_owner(shop: Shop) -> None:
    code = shop.state.assign("disc", "bob").code
    assert shop.state.drain() == [VoucherChanged(code, ASSIGNED, "bob", None, 0)]
    r = shop.state.redeem(req(code, 2000, "bob"))
    shop.state.rollback(r.id)
    assert shop.state.drain() == [
        VoucherChanged(code, REDEEMED, "bob", None, 1),
        RedemptionRecorded(r),
        VoucherChanged(code, ASSIGNED, "bob", None, 0),
        RedemptionRolledBack(r.id, T0),
    ]


def test_redemption_with_key_records_the_answer(shop: Shop) -> None:
    request_ = req("DISC-A", 2000, "alice", idempotency_key="key-1")
    out = shop.state.redeem_one(request_)
    r = out.redemption
    assert r is not None
    fp = fingerprint("redeem", msgspec.structs.replace(request_, idempotency_key=None))
    assert shop.state.drain() == [
        VoucherChanged("DISC-A", REDEEMED, None, None, 1),
        RedemptionRecorded(r),
        IdempotencyRecorded("key-1", bucket_of("DISC-A"), fp, msgspec.msgpack.encode(out), T0),
    ]


def test_rejection_with_key_is_recorded_too(shop: Shop) -> None:
    out = shop.state.redeem_one(req("NOPE", idempotency_key="key-2"))
    events = shop.state.drain()
    assert len(events) == 1 and isinstance(events[0], IdempotencyRecorded)
    assert msgspec.msgpack.decode(events[0].response, type=Outcome) == out
    assert events[0].bucket == bucket_of("NOPE")


def test_rollback_events(shop: Shop) -> None:
    r = shop.state.redeem(req("DISC-A", 2000))
    shop.state.drain()
    shop.clock.advance(minutes=3)
    shop.state.rollback(r.id)
    assert shop.state.drain() == [
        VoucherChanged("DISC-A", AVAILABLE, None, None, 0),
        RedemptionRolledBack(r.id, T0 + timedelta(minutes=3)),
    ]


def test_gift_and_shared_events(shop: Shop) -> None:
    g = shop.state.redeem(req("GIFT-A", 1200, "alice"))
    sh = shop.state.redeem(req("SAVE5", 1200, "bob"))
    assert shop.state.drain() == [
        VoucherChanged("GIFT-A", AVAILABLE, None, 3800, 1),
        RedemptionRecorded(g),
        VoucherChanged("SAVE5", AVAILABLE, None, None, 1),
        RedemptionRecorded(sh),
    ]
    shop.state.rollback(g.id)
    assert shop.state.drain() == [
        VoucherChanged("GIFT-A", AVAILABLE, None, 5000, 0),
        RedemptionRolledBack(g.id, T0),
    ]
    b = shop.state.assign("gift", "bob").code
    full = shop.state.redeem(req(b, 9000, "bob"))
    shop.state.rollback(full.id)
    assert shop.state.drain() == [
        VoucherChanged(b, ASSIGNED, "bob", 5000, 0),
        VoucherChanged(b, REDEEMED, "bob", 0, 1),
        RedemptionRecorded(full),
        VoucherChanged(b, ASSIGNED, "bob", 5000, 0),
        RedemptionRolledBack(full.id, T0),
    ]


def test_reservation_and_assignment_events(shop: Shop) -> None:
    res = shop.state.reserve(req("DISC-A"))
    assert shop.state.drain() == [ReservationChanged(res)]
    r = shop.state.confirm(res.id)
    assert shop.state.drain() == [
        VoucherChanged("DISC-A", REDEEMED, None, None, 1),
        RedemptionRecorded(r),
        ReservationChanged(msgspec.structs.replace(res, state=CONFIRMED, redemption_id=r.id)),
    ]
    a = shop.state.assign("gift", "zoe")
    assert shop.state.drain() == [VoucherChanged(a.code, ASSIGNED, "zoe", 5000, 0)]
    assert shop.state.validate(req("DISC-B")).valid and shop.state.drain() == []


# --- recovery ------------------------------------------------------------------------


KEYED = {
    "k-disc": req("DISC-A", 2000, "alice", idempotency_key="k-disc"),
    "k-gift": req("GIFT-A", 1200, "carol", idempotency_key="k-gift"),
    "k-res": req("DISC-C", 1000, "bob", idempotency_key="k-res"),
    "k-bad": req("DISC-A", 2000, "bob", idempotency_key="k-bad"),
}


def _busy_shop() -> tuple[Shop, dict[str, Outcome]]:
    s = Shop()
    s.install(discount_campaign(), CODES)
    s.install(gift_campaign(), GIFTS)
    s.install(shared_campaign(total=5, per=2))
    s.install(discount_campaign("gone", discount=Discount("amount", 100)), ["G-1", "G-2", "G-3"])
    st = s.state
    replies: dict[str, Outcome] = {}
    replies["k-disc"] = st.redeem_one(KEYED["k-disc"])
    assert st.assign("disc", "bob").code == "DISC-C"
    replies["k-gift"] = st.redeem_one(KEYED["k-gift"])
    st.redeem(req("GIFT-A", 800, "carol"))
    s.sync()  # a batch boundary in the middle
    st.redeem(req("GIFT-B", 9000))
    rolled = st.redeem(req("SAVE5", 1000, "alice"))
    st.redeem(req("SAVE5", 1000, "alice"))
    st.rollback(rolled.id)
    st.redeem(req("SAVE5", 1000, "bob"))
    st.reserve(req("SAVE5", 1000, "dan"))
    replies["k-res"] = st.reserve_one(KEYED["k-res"])
    replies["k-bad"] = st.redeem_one(KEYED["k-bad"])
    st.redeem(req("G-1"))
    st.assign("gone", "erin")
    s.move("gone", "end")
    assert replies["k-res"].reservation is not None
    assert replies["k-bad"].rejection is not None
    return s, replies


def _snapshot(st: ShardState) -> dict[str, Any]:
    return {
        "stats": {cid: st.stats(cid) for cid in st.campaigns},
        "vouchers": {code: st.voucher(code) for code in sorted(st.codes)},
        "redemptions": dict(st.redemptions),
        "reservations": dict(st.reservations),
    }


def test_recovery_rebuilds_the_same_state() -> None:
    s, replies = _busy_shop()
    s.sync()
    before = _snapshot(s.state)
    assert before["stats"]["gone"].void == 2 and before["stats"]["disc"].held == 1
    rebuilt = s.restart()
    assert rebuilt.drain() == [CodesVoided("gone")]  # re-applied, idempotent in the DB
    assert _snapshot(rebuilt) == before
    assert rebuilt.redeem_one(KEYED["k-disc"]) == replies["k-disc"]
    assert rebuilt.redeem_one(KEYED["k-gift"]) == replies["k-gift"]
    assert rebuilt.reserve_one(KEYED["k-res"]) == replies["k-res"]
    assert rebuilt.redeem_one(KEYED["k-bad"]) == replies["k-bad"]
    conflict = rebuilt.redeem_one(req("DISC-A", 1, idempotency_key="k-disc"))
    assert conflict.rejection is not None and conflict.rejection.error == "idempotency_conflict"
    assert rebuilt.validate(req("DISC-A", cust="alice")).error == "already_redeemed"
    assert rebuilt.validate(req("DISC-C", cust="bob")).error == "code_reserved"
    assert rebuilt.validate(req("GIFT-B")).error == "exhausted"
    assert rebuilt.voucher("GIFT-A")["balance"] == 3000
    rebuilt.redeem(req("SAVE5", 1000, "alice"))  # her rolled-back use does not count
    assert rebuilt.validate(req("SAVE5", 1000, "alice")).error == "customer_limit_reached"
    rebuilt.redeem(req("SAVE5", 1000, "zed"))  # 4 used + 1 held: the limit of 5
    assert rebuilt.validate(req("SAVE5", 1000, "yan")).error == "exhausted"


def test_recovery_then_more_work_matches_the_original() -> None:
    s, _ = _busy_shop()
    s.sync()
    twin = rebuild(s.db, FakeClock(s.clock()), seed=7)
    twin.drain()
    for st in (s.state, twin):
        res = next(r for r in st.reservations.values() if r.code == "DISC-C")
        st.confirm(res.id)
        red = next(r for r in st.redemptions.values() if r.code == "GIFT-A")
        st.rollback(red.id)
        st.assign("disc", "zoe")
        st.drain()
    a, b = _snapshot(s.state), _snapshot(twin)
    assert a["stats"] == b["stats"] and a["vouchers"] == b["vouchers"]


def test_recovery_voids_what_an_unpersisted_end_left() -> None:
    s = Shop()
    s.install(discount_campaign(), CODES)
    s.state.redeem(req("DISC-A"))
    s.sync()
    s.move("disc", "end")
    s.state.drain()  # the campaign row says ended but the void batch was lost
    assert [row[1] for row in s.db.vouchers.values()] == [REDEEMED, AVAILABLE, AVAILABLE]
    rebuilt = s.restart()
    st = rebuilt.stats("disc")
    assert (st.available, st.redeemed, st.void) == (0, 1, 2)
    assert rebuilt.drain() == [CodesVoided("disc")]


def test_recovery_releases_holds_an_unpersisted_end_left() -> None:
    """When the end's batch was lost, ``finish_recovery`` re-applies both the void of the
    ended campaign's codes and the release of its open holds."""
    s = Shop()
    s.install(discount_campaign(), CODES)
    h = s.state.reserve(req("DISC-A"))
    s.sync()
    s.move("disc", "end")
    assert s.state.stats("disc").held == 0
    s.state.drain()  # lost: the void and the release of the hold
    rebuilt = s.restart()
    assert rebuilt.stats("disc").held == 0
    assert rebuilt.voucher("DISC-A")["reserved"] is False
    assert rebuilt.reservations[h.id].state == RELEASED


def test_recovery_expires_stale_holds() -> None:
    s = Shop()
    s.install(discount_campaign(), CODES)
    s.install(shared_campaign(total=1, per=None))
    h1 = s.state.reserve(req("DISC-A"))
    h2 = s.state.reserve(req("SAVE5", 100, "a"))
    s.sync()
    s.clock.advance(minutes=20)  # the shard was down longer than the TTL
    rebuilt = s.restart()
    events = rebuilt.drain()  # in (expires_at, id) order: compare as a set
    assert len(events) == 2 and set(events) == {
        ReservationChanged(msgspec.structs.replace(h1, state=EXPIRED)),
        ReservationChanged(msgspec.structs.replace(h2, state=EXPIRED)),
    }
    assert rebuilt.stats("disc").held == 0 and rebuilt.stats("shared").held == 0
    rebuilt.redeem(req("DISC-A"))
    rebuilt.redeem(req("SAVE5", 100, "b"))


def test_recovered_hold_can_be_confirmed() -> None:
    s = Shop()
    s.install(shared_campaign(total=1, per=1))
    h = s.state.reserve(req("SAVE5", 100, "a"))
    rebuilt = s.restart()
    assert rebuilt.validate(req("SAVE5", 100, "b")).error == "exhausted"
    r = rebuilt.confirm(h.id)
    assert rebuilt.stats("shared").active_redemptions == 1 and r.customer_id == "a"


def test_assignment_survives_recovery() -> None:
    """Only ``assign`` ties a code to a customer, so the rows rebuild exactly the
    assignments: bob's re-run returns the code he was assigned, not the bearer code he
    redeemed at checkout (loaded first), also once his own code is redeemed."""
    s = Shop()
    s.install(discount_campaign(), ["AAA-1", "BBB-2", "CCC-3"])
    assert s.state.assign("disc", "bob").code == "CCC-3"
    s.state.redeem(req("AAA-1", cust="bob"))
    s.state.redeem(req("CCC-3", cust="bob"))
    assert s.state.assign("disc", "bob").code == "CCC-3"
    rebuilt = s.restart()
    assert rebuilt.voucher("AAA-1")["customer_id"] is None
    assert rebuilt.voucher("CCC-3")["customer_id"] == "bob"
    assert rebuilt.assign("disc", "bob") == Assignment("disc", "bob", "CCC-3", False)
    assert rebuilt.assign("disc", "alice").code == "BBB-2"


def test_rows_follow_the_state() -> None:
    s, _ = _busy_shop()
    s.sync()
    for code in s.db.vouchers:
        v = s.state.voucher(code)
        row = s.db.vouchers[code]
        assert ("available", "assigned", "redeemed", "void")[row[1]] == v["status"], code
        assert row[2] == v["customer_id"], code
        if "balance" in v:
            assert row[3] == v["balance"], code
    assert {k: r.status for k, r in s.db.redemptions.items()} == {
        k: r.status for k, r in s.state.redemptions.items()
    }
    assert s.db.reservations == s.state.reservations
