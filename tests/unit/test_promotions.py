"""Automatic promotions in engine/promotions.py: stacking on what earlier discounts left,
the order promotions are asked in, and the campaign rules of the promotion type."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from engine import errors
from engine.campaigns import Discount, Limits, Window, new_campaign, transition
from engine.orders import Item, Order
from engine.pricing import Line, Pricing
from engine.promotions import Taken, add, candidates, key_of, stack
from engine.rules import ItemCondition, ItemFilter, Rules

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)  # a Monday, noon UTC
CART = Order(11500, "EUR", 495, (Item("SHOE", 2, 5000, None, ("shoes",)), Item("SOCK", 3, 500, None, ("socks",))))
SHOES = Rules(items=(ItemCondition(any_of=ItemFilter(categories=("shoes",))),))


def promo(id: str, discount: Discount, **extra: object) -> object:
    c = new_campaign(id=id, name=id, type="promotion", currency="EUR", now=NOW - timedelta(days=1),
                     discount=discount, **extra)  # type: ignore[arg-type]
    return transition(c, "activate", NOW)


def test_a_discount_after_others_gets_what_is_left_of_each_line_and_of_shipping() -> None:
    # a code took 6,000 of the shoes (10,000) and 400 of the shipping (495)
    taken = add(None, Pricing(6400, (Line(0, "SHOE", 6000),), 400), CART)
    assert taken == Taken((6000, 0), 400, 6000)
    # 50 % of the shoes would be 5,000: 4,000 is left; free shipping would be 495: 95 left
    p = stack(Pricing(5495, (Line(0, "SHOE", 5000),), 495), CART, taken)
    assert p == Pricing(4000 + 95, (Line(0, "SHOE", 4000),), 95)
    # an amount-only order: what is left of the amount
    order = Order(1000, "EUR")
    assert stack(Pricing(700), order, add(None, Pricing(600), order)) == Pricing(400)
    assert stack(Pricing(700), order, None) == Pricing(700)


def test_promotions_are_asked_best_first_and_only_those_that_apply_now() -> None:
    ten = promo("ten", Discount("percent", 10, target="items"), rules=SHOES)  # 1,000
    ship = promo("ship", Discount("free_shipping"))  # 495
    socks = promo("socks", Discount("percent", 50, target="items"),
                  rules=Rules(items=(ItemCondition(any_of=ItemFilter(categories=("hats",))),)))  # no hats
    usd = promo("usd", Discount("amount", 100), limits=Limits(total=5))
    usd = msgspec.structs.replace(usd, currency="USD")  # type: ignore[type-var]
    night = promo("night", Discount("amount", 2000), timezone_name="UTC",
                  windows=(Window((0,), "22:00", "23:00"),))  # not at noon
    later = promo("later", Discount("amount", 3000), starts_at=NOW + timedelta(hours=1))
    got = candidates([socks, ship, usd, ten, night, later], CART, None, None, NOW)
    assert [(c.id, p.discount) for c, p in got] == [("ten", 1000), ("ship", 495)]
    # on what a code left: 9,500 of the shoes taken leaves 500 for the ten per cent
    taken = Taken((9500, 0), 0, 9500)
    assert [(c.id, p.discount) for c, p in candidates([ten, ship], CART, None, taken, NOW)] == [
        ("ten", 500), ("ship", 495)]
    # at 22:30 the night window is open
    assert "night" in [c.id for c, _ in candidates([night], CART, None, None, NOW.replace(hour=22, minute=30))]


def test_a_promotion_has_no_code_and_is_keyed_by_its_id() -> None:
    c = promo("spring-promo", Discount("percent", 5))
    assert c.is_promotion and c.is_shared and c.shared_code == key_of("spring-promo") == "~spring-promo"
    with pytest.raises(errors.InvalidInput, match="a promotion has no code"):
        new_campaign(id="p", name="p", type="promotion", currency="EUR", now=NOW,
                     discount=Discount("percent", 5), shared_code="SPRING")
