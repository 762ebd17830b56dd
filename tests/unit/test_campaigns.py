"""Campaign definitions, the lifecycle state machine, the discount rule and the flash-sale
time windows (DST and past-midnight included), plus the error hierarchy they raise."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from engine import errors
from engine.campaigns import (
    MAX_AMOUNT,
    Campaign,
    Discount,
    Limits,
    Window,
    check_order,
    check_redeemable_now,
    discount_for,
    in_windows,
    new_campaign,
    next_window_start,
    transition,
)
from engine.orders import Order

NOW = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)  # a Monday
LATER = NOW + timedelta(days=30)
TEN_PERCENT = Discount("percent", 10)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def make(**overrides: Any) -> Campaign:
    kw: dict[str, Any] = dict(
        id="c1", name="ten percent", type="discount", currency="EUR", now=NOW,
        discount=TEN_PERCENT, ends_at=LATER,
    )
    kw.update(overrides)
    return new_campaign(**kw)


def flash(windows: tuple[Window, ...], tz: str = "Europe/Berlin", **kw: Any) -> Campaign:
    c = make(
        type="flash_sale", shared_code="FLASH", limits=Limits(total=100),
        starts_at=utc(2025, 1, 1), ends_at=utc(2026, 1, 1), timezone_name=tz,
        windows=windows, now=utc(2024, 12, 1), **kw,
    )
    return transition(c, "activate", utc(2024, 12, 1))


# --- definitions ---------------------------------------------------------------------


def test_new_campaign_is_a_draft_with_normalized_fields() -> None:
    berlin_start = datetime.fromisoformat("2025-02-01T10:00:00+01:00")
    c = make(
        type="shared_code", shared_code="  summer-25 ", starts_at=berlin_start,
        limits=Limits(total=5, per_customer=1),
    )
    assert c.state == "draft"
    assert c.shared_code == "SUMMER-25"
    assert c.is_shared and not c.is_gift_card
    assert c.starts_at == utc(2025, 2, 1, 9, 0)
    assert c.starts_at.utcoffset() == timedelta(0)
    assert c.created_at == NOW and c.updated_at == NOW
    assert c.limits == Limits(total=5, per_customer=1)


def test_new_gift_card_campaign() -> None:
    c = make(type="gift_card", discount=None, gift_balance=5000)
    assert c.is_gift_card and not c.is_shared
    assert c.gift_balance == 5000 and c.discount is None


BAD_DEFINITIONS: list[tuple[dict[str, Any], str]] = [
    ({"id": "has space"}, "id must be 1-64 characters"),
    ({"id": "x" * 65}, "id must be 1-64 characters"),
    ({"name": ""}, "name must be 1-200 characters"),
    ({"type": "coupon"}, "type must be one of discount, gift_card, shared_code, flash_sale"),
    ({"timezone_name": "Mars/Olympus"}, "timezone 'Mars/Olympus' is not a known IANA zone"),
    ({"starts_at": datetime(2025, 2, 1)}, "starts_at must carry a time zone offset"),
    ({"ends_at": NOW - timedelta(seconds=1)}, "ends_at is in the past"),
    ({"ends_at": NOW}, "ends_at is in the past"),
    ({"starts_at": LATER, "ends_at": LATER - timedelta(hours=1)}, "ends_at must be after"),
    ({"min_order": -1}, "min_order must be >= 0"),
    ({"min_order": MAX_AMOUNT + 1}, f"min_order is larger than {MAX_AMOUNT}"),
    ({"limits": Limits(total=0)}, "limits.total must be a positive integer"),
    ({"limits": Limits(per_customer=-2)}, "limits.per_customer must be a positive integer"),
    ({"discount": None}, "discount is required for a discount campaign"),
    ({"discount": Discount("percent", 0)}, "discount.value must be 1..100"),
    ({"discount": Discount("percent", 101)}, "discount.value must be 1..100"),
    ({"discount": Discount("amount", -500)}, "discount.value must be positive"),
    ({"discount": Discount("amount", 0)}, "discount.value must be positive"),
    ({"discount": Discount("percent", 10, max=0)}, "discount.max must be positive"),
    ({"discount": Discount("bogus", 10)}, "discount.kind must be one of percent, amount, fixed_price"),  # type: ignore[arg-type]
    ({"gift_balance": 100}, "gift_balance is only for gift_card campaigns"),
    ({"type": "gift_card", "discount": None}, "gift_balance is required"),
    ({"type": "gift_card"}, "a gift_card campaign has gift_balance, not discount"),
    ({"type": "gift_card", "discount": None, "gift_balance": 0}, "gift_balance must be positive"),
    ({"type": "gift_card", "discount": None, "gift_balance": -5}, "gift_balance must be positive"),
    ({"type": "shared_code"}, "shared_code is required for a shared_code campaign"),
    ({"shared_code": "ABC"}, "a discount campaign uses unique codes, not shared_code"),
    ({"type": "shared_code", "shared_code": "A B C"}, "shared_code must be 3-64 characters"),
    ({"type": "shared_code", "shared_code": "AB"}, "shared_code must be 3-64 characters"),
    ({"type": "flash_sale", "starts_at": NOW}, "a flash_sale needs limits.total"),
    ({"type": "flash_sale", "limits": Limits(total=5)}, "a flash_sale needs starts_at and ends_at"),
    ({"windows": (Window((0,), "09:00", "10:00"),)}, "windows are only for flash_sale"),
]


@pytest.mark.parametrize("currency", ["eur", "EUD", "XTS", "", "EURO"])
def test_a_currency_must_be_an_iso_4217_code(currency: str) -> None:
    with pytest.raises(errors.UnknownCurrency, match="ISO 4217"):
        make(currency=currency)


@pytest.mark.parametrize(("overrides", "message"), BAD_DEFINITIONS)
def test_bad_definitions_raise_invalid_input_naming_the_field(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(errors.InvalidInput) as info:
        make(**overrides)
    assert type(info.value) is errors.InvalidInput
    assert info.value.code == "invalid_input"
    assert message in info.value.message


@pytest.mark.parametrize(
    ("window", "message"),
    [
        (Window((), "09:00", "10:00"), "windows[0].days must be weekdays 0 (Mon) to 6 (Sun)"),
        (Window((7,), "09:00", "10:00"), "windows[0].days must be weekdays"),
        (Window((-1,), "09:00", "10:00"), "windows[0].days must be weekdays"),
        (Window((1,), "9:00", "10:00"), "windows[0].start must be HH:MM (24h), got '9:00'"),
        (Window((1,), "09:00", "24:00"), "windows[0].end must be HH:MM (24h), got '24:00'"),
        (Window((1,), "10:00", "10:00"), "windows[0] is empty: start equals end"),
    ],
)
def test_bad_windows(window: Window, message: str) -> None:
    with pytest.raises(errors.InvalidInput) as info:
        flash((window,))
    assert message in info.value.message


# --- lifecycle -----------------------------------------------------------------------


def _in_state(state: str) -> Campaign:
    c = make()
    return msgspec.structs.replace(c, state=state)


@pytest.mark.parametrize(
    ("state", "action", "after"),
    [
        ("draft", "activate", "active"),
        ("paused", "activate", "active"),
        ("active", "pause", "paused"),
        ("draft", "end", "ended"),
        ("active", "end", "ended"),
        ("paused", "end", "ended"),
    ],
)
def test_legal_moves(state: str, action: str, after: str) -> None:
    c = _in_state(state)
    moved_at = NOW + timedelta(hours=1)
    out = transition(c, action, moved_at)
    assert out.state == after
    assert out.updated_at == moved_at
    assert c.state == state  # frozen: the old value is untouched
    assert out.version == c.version + 1
    assert msgspec.structs.replace(out, state=state, updated_at=c.updated_at, version=c.version) == c


@pytest.mark.parametrize(
    ("state", "action", "cls"),
    [
        ("ended", "activate", errors.CannotActivateEnded),
        ("draft", "pause", errors.CannotPauseDraft),
        ("ended", "pause", errors.CannotPauseEnded),
    ],
)
def test_each_illegal_move_has_its_own_error(
    state: str, action: str, cls: type[errors.IllegalTransition]
) -> None:
    with pytest.raises(errors.IllegalTransition) as info:
        transition(_in_state(state), action, NOW)
    assert type(info.value) is cls
    assert info.value.message == f"cannot {action} campaign c1: it is {state}"


def test_illegal_move_classes_are_distinct() -> None:
    classes = [
        errors.CannotActivateEnded, errors.CannotPauseDraft, errors.CannotPauseEnded,
    ]
    assert len({c.code for c in classes}) == len(classes)
    assert all(issubclass(c, errors.Conflict) for c in classes)


@pytest.mark.parametrize("state", ["draft", "active", "paused", "ended"])
def test_unknown_action_is_invalid_input(state: str) -> None:
    with pytest.raises(errors.InvalidInput, match="unknown action 'resume'"):
        transition(_in_state(state), "resume", NOW)


def test_full_lifecycle() -> None:
    c = make()
    for action, state in [("activate", "active"), ("pause", "paused"), ("activate", "active"),
                          ("end", "ended")]:
        c = transition(c, action, NOW)
        assert c.state == state
    for action in ("activate", "pause"):
        with pytest.raises(errors.IllegalTransition):
            transition(c, action, NOW)
    assert transition(c, "end", NOW) is c  # a repeated end answers with the campaign


# --- when a campaign accepts redemptions ---------------------------------------------


@pytest.mark.parametrize(
    ("state", "cls", "code"),
    [
        ("draft", errors.CampaignNotActive, "campaign_not_active"),
        ("paused", errors.CampaignPaused, "campaign_paused"),
        ("ended", errors.CampaignEnded, "campaign_ended"),
    ],
)
def test_state_gates_redemption(state: str, cls: type[errors.NotRedeemable], code: str) -> None:
    with pytest.raises(cls) as info:
        check_redeemable_now(_in_state(state), NOW)
    assert type(info.value) is cls and info.value.code == code


def test_start_and_end_boundaries() -> None:
    start, end = utc(2025, 2, 1), utc(2025, 3, 1)
    c = transition(make(starts_at=start, ends_at=end), "activate", NOW)
    with pytest.raises(errors.CampaignNotStarted, match="starts at 2025-02-01T00:00:00"):
        check_redeemable_now(c, start - timedelta(microseconds=1))
    check_redeemable_now(c, start)
    check_redeemable_now(c, end - timedelta(microseconds=1))
    with pytest.raises(errors.CampaignExpired, match="expired at 2025-03-01T00:00:00"):
        check_redeemable_now(c, end)


# --- the discount rule and orders ----------------------------------------------------


@pytest.mark.parametrize(
    ("discount", "amount", "expected"),
    [
        (Discount("percent", 10), 2000, 200),
        (Discount("percent", 10), 1999, 199),  # rounds down, never in the customer's favour
        (Discount("percent", 10, max=150), 2000, 150),
        (Discount("percent", 10, max=150), 1000, 100),
        (Discount("percent", 100), 777, 777),
        (Discount("amount", 500), 2000, 500),
        (Discount("amount", 500), 300, 300),  # never more than the order
        (Discount("amount", 500, max=200), 2000, 200),
        (Discount("percent", 25), 0, 0),
    ],
)
def test_discount_for(discount: Discount, amount: int, expected: int) -> None:
    assert discount_for(make(discount=discount), amount) == expected


def test_gift_card_covers_up_to_its_balance() -> None:
    g = make(type="gift_card", discount=None, gift_balance=5000)
    assert discount_for(g, 2000, 5000) == 2000
    assert discount_for(g, 2000, 1500) == 1500
    assert discount_for(g, 2000, 0) == 0


def test_check_order() -> None:
    c = make(min_order=1000)
    check_order(c, Order(1000, "EUR"))
    with pytest.raises(errors.OrderTooSmall, match="order amount 999 is below the minimum 1000"):
        check_order(c, Order(999, "EUR"))
    with pytest.raises(errors.CurrencyMismatch) as info:
        check_order(c, Order(5000, "USD"))
    assert info.value.message == "order currency USD does not match campaign currency EUR"
    assert isinstance(info.value, errors.InvalidInput)
    with pytest.raises(errors.InvalidInput, match="order.amount must be >= 0"):
        check_order(c, Order(-1, "EUR"))
    with pytest.raises(errors.InvalidInput, match="order.amount must be an integer"):
        check_order(c, Order(True, "EUR"))  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidInput, match="order.amount must be an integer"):
        check_order(c, Order(10.5, "EUR"))  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidInput, match="order.amount is larger than"):
        check_order(c, Order(MAX_AMOUNT + 1, "EUR"))


# --- flash-sale windows --------------------------------------------------------------

WEEKDAYS_9_TO_11 = (Window((0, 1, 2, 3, 4), "09:00", "11:00"),)


@pytest.mark.parametrize(
    ("instant", "is_open"),
    [
        # winter (CET, UTC+1): 09:00-11:00 local is 08:00-10:00 UTC
        (utc(2025, 3, 24, 7, 59, 59), False),
        (utc(2025, 3, 24, 8, 0), True),
        (utc(2025, 3, 24, 9, 59, 59), True),
        (utc(2025, 3, 24, 10, 0), False),
        # Berlin switched to CEST (UTC+2) on Sunday 2025-03-30: 07:00-09:00 UTC
        (utc(2025, 3, 31, 6, 59, 59), False),
        (utc(2025, 3, 31, 7, 0), True),
        (utc(2025, 3, 31, 8, 59, 59), True),
        (utc(2025, 3, 31, 9, 0), False),
        # and back to CET on Sunday 2025-10-26
        (utc(2025, 10, 24, 7, 0), True),
        (utc(2025, 10, 24, 9, 0), False),
        (utc(2025, 10, 27, 7, 0), False),
        (utc(2025, 10, 27, 8, 0), True),
        (utc(2025, 10, 27, 10, 0), False),
        # the weekend is closed
        (utc(2025, 3, 29, 8, 30), False),
        (utc(2025, 3, 30, 8, 30), False),
    ],
)
def test_window_keeps_local_hours_across_dst(instant: datetime, is_open: bool) -> None:
    assert in_windows(flash(WEEKDAYS_9_TO_11), instant) is is_open


def _open_minutes(c: Campaign, start: datetime, hours: int) -> int:
    return sum(in_windows(c, start + timedelta(minutes=m)) for m in range(hours * 60))


def test_window_over_the_spring_forward_night_lasts_two_real_hours() -> None:
    # Sunday 01:00-04:00 local; 02:00-03:00 does not exist on 2025-03-30
    c = flash((Window((6,), "01:00", "04:00"),))
    assert _open_minutes(c, utc(2025, 3, 29, 12), 24) == 120
    assert in_windows(c, utc(2025, 3, 30, 0, 59)) is True  # 01:59 CET
    assert in_windows(c, utc(2025, 3, 30, 1, 0)) is True  # 03:00 CEST
    assert in_windows(c, utc(2025, 3, 30, 2, 0)) is False  # 04:00 CEST


def test_window_over_the_fall_back_night_lasts_four_real_hours() -> None:
    # Sunday 01:00-04:00 local; 02:00-03:00 happens twice on 2025-10-26
    c = flash((Window((6,), "01:00", "04:00"),))
    assert _open_minutes(c, utc(2025, 10, 25, 12), 24) == 240
    assert in_windows(c, utc(2025, 10, 25, 22, 59)) is False  # 00:59 CEST
    assert in_windows(c, utc(2025, 10, 25, 23, 0)) is True  # 01:00 CEST
    assert in_windows(c, utc(2025, 10, 26, 2, 59)) is True  # 03:59 CET
    assert in_windows(c, utc(2025, 10, 26, 3, 0)) is False  # 04:00 CET


def test_window_past_midnight_belongs_to_the_day_it_starts() -> None:
    # Friday 22:00 to Saturday 02:00, Berlin winter time (UTC+1)
    c = flash((Window((4,), "22:00", "02:00"),))
    assert utc(2025, 1, 10).weekday() == 4
    assert in_windows(c, utc(2025, 1, 10, 20, 59)) is False  # Fri 21:59
    assert in_windows(c, utc(2025, 1, 10, 21, 0)) is True  # Fri 22:00
    assert in_windows(c, utc(2025, 1, 10, 22, 59)) is True  # Fri 23:59
    assert in_windows(c, utc(2025, 1, 10, 23, 0)) is True  # Sat 00:00
    assert in_windows(c, utc(2025, 1, 11, 0, 59)) is True  # Sat 01:59
    assert in_windows(c, utc(2025, 1, 11, 1, 0)) is False  # Sat 02:00
    assert in_windows(c, utc(2025, 1, 9, 21, 30)) is False  # Thu 22:30: not a sale day
    assert in_windows(c, utc(2025, 1, 10, 0, 30)) is False  # Fri 01:30: Thursday's night
    assert in_windows(c, utc(2025, 1, 11, 21, 30)) is False  # Sat 22:30
    assert _open_minutes(c, utc(2025, 1, 6), 7 * 24) == 240


def test_window_past_midnight_wraps_sunday_to_monday() -> None:
    c = flash((Window((6,), "23:00", "01:00"),), tz="UTC")
    assert in_windows(c, utc(2025, 1, 12, 23, 30)) is True  # Sunday
    assert in_windows(c, utc(2025, 1, 13, 0, 30)) is True  # Monday morning = Sunday's night
    assert in_windows(c, utc(2025, 1, 13, 1, 0)) is False
    assert in_windows(c, utc(2025, 1, 6, 0, 30)) is True  # the Monday before, too
    assert in_windows(c, utc(2025, 1, 7, 0, 30)) is False  # Tuesday


def test_window_past_midnight_across_spring_forward() -> None:
    # Saturday 23:00 CET to Sunday 03:00 CEST: 22:00 to 01:00 UTC, three real hours
    c = flash((Window((5,), "23:00", "03:00"),))
    assert _open_minutes(c, utc(2025, 3, 29, 12), 24) == 180
    assert in_windows(c, utc(2025, 3, 29, 21, 59)) is False
    assert in_windows(c, utc(2025, 3, 29, 22, 0)) is True
    assert in_windows(c, utc(2025, 3, 30, 0, 59)) is True
    assert in_windows(c, utc(2025, 3, 30, 1, 0)) is False


def test_outside_window_is_a_typed_reason() -> None:
    c = flash(WEEKDAYS_9_TO_11)
    with pytest.raises(errors.OutsideSaleWindow) as info:
        check_redeemable_now(c, utc(2025, 3, 24, 12, 0))
    assert info.value.code == "outside_window"
    assert "Europe/Berlin" in info.value.message
    check_redeemable_now(c, utc(2025, 3, 24, 9, 0))


def test_next_window_start() -> None:
    c = flash(WEEKDAYS_9_TO_11)
    # Saturday before the spring switch -> Monday 09:00 CEST = 07:00 UTC
    assert next_window_start(c, utc(2025, 3, 29, 12)) == utc(2025, 3, 31, 7, 0)
    # Friday noon in winter -> Monday 09:00 CET = 08:00 UTC
    assert next_window_start(c, utc(2025, 1, 10, 12)) == utc(2025, 1, 13, 8, 0)
    # inside a window -> the next opening, not the current one
    assert next_window_start(c, utc(2025, 1, 7, 8, 30)) == utc(2025, 1, 8, 8, 0)
    assert next_window_start(make(), NOW) is None


# --- the error hierarchy -------------------------------------------------------------


def test_error_codes_are_unique_and_rebuildable() -> None:
    reg = errors.registry()
    classes = set(reg.values())
    assert len(reg) == len(classes)  # no two classes share a code
    for code, cls in reg.items():
        rebuilt = errors.from_code(code, "why")
        assert type(rebuilt) is cls and rebuilt.message == "why" and str(rebuilt) == "why"
    assert type(errors.from_code("no_such_code", "m")) is errors.VoucherError


@pytest.mark.parametrize(
    "cls", [errors.CannotPauseDraft, errors.CurrencyMismatch, errors.Exhausted, errors.UnknownCode]
)
def test_errors_pickle_with_class_and_message(cls: type[errors.VoucherError]) -> None:
    back = pickle.loads(pickle.dumps(cls("boom")))
    assert type(back) is cls and back.message == "boom"


def test_validation_reason_codes() -> None:
    expected = {
        "expired": errors.CampaignExpired, "not_started": errors.CampaignNotStarted,
        "exhausted": errors.Exhausted, "wrong_customer": errors.WrongCustomer,
        "order_too_small": errors.OrderTooSmall, "already_redeemed": errors.AlreadyRedeemed,
        "campaign_paused": errors.CampaignPaused, "customer_limit_reached":
        errors.CustomerLimitReached, "outside_window": errors.OutsideSaleWindow,
    }
    reg = errors.registry()
    for code, cls in expected.items():
        assert reg[code] is cls and issubclass(cls, errors.NotRedeemable)
