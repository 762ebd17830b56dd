"""Pricing worked out by hand: each kind on each target under each kind of condition, the
figures computed in the comments, and the refusals with their exact ``rule_not_met``
messages. Every case goes through :func:`engine.campaigns.pricing_for`, the function every
path (validation, reservation, redemption) takes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import msgspec
import pytest

from engine import errors
from engine.campaigns import Campaign, Discount, new_campaign, pricing_for
from engine.orders import Item, Order, build
from engine.pricing import Pricing, detail_json, spread
from engine.rules import CustomerCondition, ItemCondition, ItemFilter, Rules
from engine.shard_state import RedeemRequest
from tests.unit.test_pools import Shop, active

NOW = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)


def campaign(
    discount: Discount | None, rules: Rules | None = None, **kw: Any
) -> Campaign:
    args: dict[str, Any] = dict(
        id="c1", name="table", type="discount", currency="EUR", now=NOW, discount=discount,
        ends_at=NOW + timedelta(days=30), rules=rules,
    )
    args.update(kw)
    return new_campaign(**args)


def order(*items: Item, shipping: int | None = None, amount: int | None = None) -> Order:
    return build(currency="EUR", amount=amount, shipping=shipping, items=items or None)


def shoes(cat: str = "shoes") -> ItemFilter:
    return ItemFilter(categories=(cat,))


# Lines used below; the comment gives each line's total.
SHOE = Item("SHOE-1", 2, 4000, "P-SHOE", ("shoes",))          # 8000
BOOT = Item("BOOT-1", 1, 6000, "P-BOOT", ("shoes", "boots"))  # 6000
SHOE_SOCK = Item("SOCK-S", 1, 700, "P-SOCK", ("shoes", "socks"))  # 700: a sock sold as shoes
TEE = Item("TEE-1", 1, 1500, None, ("shirts",))               # 1500
SOCKS = Item("SOCK-1", 3, 500, "P-SOCK", ("socks",))          # 1500
FREEBIE = Item("GIFT-0", 1, 0, None, ("shoes",))              # 0


class Case(NamedTuple):
    discount: Discount | None
    rules: Rules | None
    order: Order
    tags: tuple[str, ...] | None
    discount_total: int
    lines: list[tuple[int, int]]  # (line index, discount), lines with 0 left out
    shipping: int = 0
    extra: dict[str, Any] = {}  # read only


CASES: dict[str, Case] = {
    # --- percent -----------------------------------------------------------------------
    # 20 % off category shoes, the shoe-sock excluded. Lines: SHOE 8000, BOOT 6000,
    # SOCK-S 700 (excluded), TEE 1500 (not shoes). 20 % of 8000 = 1600, of 6000 = 1200.
    "percent items, shoes, a sock excluded": Case(
        Discount("percent", 20, target="items"),
        Rules(items=(ItemCondition(any_of=shoes()),), exclude=ItemFilter(skus=("SOCK-S",))),
        order(SHOE, BOOT, SHOE_SOCK, TEE), None, 2800, [(0, 1600), (1, 1200)],
    ),
    # 20 % of the eligible subtotal 8000 + 6000 + 1500 = 15500 -> 3100, spread by totals:
    # 3100 * 8000/15500 = 1600, * 6000/15500 = 1200, * 1500/15500 = 300 (no remainder).
    "percent order, a sock excluded": Case(
        Discount("percent", 20), Rules(exclude=ItemFilter(skus=("SOCK-S",))),
        order(SHOE, BOOT, SHOE_SOCK, TEE), None, 3100, [(0, 1600), (1, 1200), (3, 300)],
    ),
    # 10 % of 333 + 333 + 334 = 1000 -> 100: 33.3, 33.3, 33.4 -> floors 33, 33, 33, one
    # left; remainders 300, 300, 400 -> the third line: 33, 33, 34.
    "percent order, largest remainder": Case(
        Discount("percent", 10), None,
        order(Item("A", 1, 333), Item("B", 1, 333), Item("C", 1, 334)), None, 100,
        [(0, 33), (1, 33), (2, 34)],
    ),
    # 50 % per line: 1500 -> 750, 999 -> 499 (floor); 1249 > max 1000, so 1000 spread over
    # [750, 499]: 600.48 -> 600, 399.52 -> 399, one left; remainders 600 and 649 -> B: 400.
    "percent items capped by max": Case(
        Discount("percent", 50, max=1000, target="items"), None,
        order(Item("A", 1, 1500), Item("B", 1, 999)), None, 1000, [(0, 600), (1, 400)],
    ),
    # 10 % of the cheapest unit: units 4000 (SHOE), 6000 (BOOT), 500 (SOCKS) -> 50 on SOCKS.
    "percent cheapest_item": Case(
        Discount("percent", 10, target="cheapest_item"), None,
        order(SHOE, BOOT, SOCKS), None, 50, [(2, 50)],
    ),
    # 50 % of shipping 495 -> 247 (floor).
    "percent shipping": Case(
        Discount("percent", 50, target="shipping"), None,
        order(TEE, shipping=495), None, 247, [], 247,
    ),
    # 10 % off an amount-only order of 2000 -> 200 (the formula every campaign always had).
    "percent amount-only order": Case(
        Discount("percent", 10, max=500), None, order(amount=2000), None, 200, [],
    ),
    # 10 % of 9000 is 900, capped at 500.
    "percent amount-only order capped": Case(
        Discount("percent", 10, max=500), None, order(amount=9000), None, 500, [],
    ),
    # --- amount ------------------------------------------------------------------------
    # 300 off each unit: A 2 x 300 = 600, B 3 x 300 = 900 -> 1500 > max 1001; 1001 over
    # [600, 900]: 400.4, 600.6 -> 400, 600, one left; remainders 600 and 900 -> B: 601.
    "amount per unit capped by max": Case(
        Discount("amount", 300, max=1001, target="items"), None,
        order(Item("A", 2, 1000), Item("B", 3, 500)), None, 1001, [(0, 400), (1, 601)],
    ),
    # 300 off each unit but a unit of 200 gives only 200: 2 x 300 + 1 x 200 = 800.
    "amount per unit never below zero": Case(
        Discount("amount", 300, target="items"), None,
        order(Item("A", 2, 1000), Item("B", 1, 200)), None, 800, [(0, 600), (1, 200)],
    ),
    # 100 off three lines of 100: 33.3 each -> 33, 33, 33 and one left; equal remainders,
    # so the earliest line takes it.
    "amount order, ties to the earlier line": Case(
        Discount("amount", 100), None,
        order(Item("A", 1, 100), Item("B", 1, 100), Item("C", 1, 100)), None, 100,
        [(0, 34), (1, 33), (2, 33)],
    ),
    # 700 off an amount-only order of 500: never more than the order.
    "amount off an amount-only order": Case(
        Discount("amount", 700), None, order(amount=500), None, 500, [],
    ),
    # 500 off the cheapest unit; the cheapest *matching* one (shoes): SHOE unit 4000.
    "amount cheapest_item among matching lines": Case(
        Discount("amount", 500, target="cheapest_item"),
        Rules(items=(ItemCondition(any_of=shoes()),)),
        order(SHOE, BOOT, SOCKS), None, 500, [(0, 500)],
    ),
    # 1000 off shipping 495 -> 495.
    "amount shipping": Case(
        Discount("amount", 1000, target="shipping"), None,
        order(TEE, shipping=495), None, 495, [], 495,
    ),
    # --- fixed_price -------------------------------------------------------------------
    # each unit costs 999: 1500 -> 501 off, x 3 = 1503; 800 is below 999: nothing off.
    "fixed_price per unit": Case(
        Discount("fixed_price", 999, target="items"), None,
        order(Item("SHIRT", 3, 1500), Item("SALE", 1, 800)), None, 1503, [(0, 1503)],
    ),
    # the lines cost 10000 together: 14000 -> 4000 off; 4000 x 8000/14000 = 2285.71,
    # x 6000/14000 = 1714.29 -> 2285 + 1714 = 3999; remainders 10000 and 4000 -> SHOE 2286.
    "fixed_price order": Case(
        Discount("fixed_price", 10000), None, order(SHOE, BOOT), None, 4000,
        [(0, 2286), (1, 1714)],
    ),
    # the cheapest unit (SOCKS, 500) costs 100: 400 off.
    "fixed_price cheapest_item": Case(
        Discount("fixed_price", 100, target="cheapest_item"), None,
        order(SHOE, SOCKS), None, 400, [(1, 400)],
    ),
    # shipping costs 0: all of 495 off. (A fixed price of 0 is only refused on the order.)
    "fixed_price shipping": Case(
        Discount("fixed_price", 0, target="shipping"), None,
        order(TEE, shipping=495), None, 495, [], 495,
    ),
    # --- free_units --------------------------------------------------------------------
    # cheapest item free: units 1200, 800 (B) and 800 (C); the tie goes to B, line 1.
    "cheapest item free": Case(
        Discount("percent", 100, target="cheapest_item"), None,
        order(Item("A", 2, 1200), Item("B", 1, 800), Item("C", 3, 800)), None, 800, [(1, 800)],
    ),
    "one free unit is the cheapest": Case(
        Discount("free_units", 1), None,
        order(Item("A", 2, 1200), Item("B", 1, 800), Item("C", 3, 800)), None, 800, [(1, 800)],
    ),
    # buy 2 get 1: 3 tees needed (2 x 1500 + 1 x 1200), the cheapest tee free: 1200; the
    # cap (hats) is no tee and stays out although it is cheaper.
    "buy 2 get 1": Case(
        Discount("free_units", 1, target="items"),
        Rules(items=(ItemCondition(any_of=shoes("tees"), min_quantity=3),)),
        order(Item("TEE-A", 2, 1500, None, ("tees",)), Item("TEE-B", 1, 1200, None, ("tees",)),
              Item("CAP", 1, 500, None, ("hats",))),
        None, 1200, [(1, 1200)],
    ),
    # two free units: the cheapest is TEE-B (1000, one unit), then one of TEE-A (1500).
    "two free units across lines": Case(
        Discount("free_units", 2, target="items"), None,
        order(Item("TEE-A", 3, 1500), Item("TEE-B", 1, 1000)), None, 2500,
        [(0, 1500), (1, 1000)],
    ),
    # free units of a sku: 2 of SOCK-1's 3 units at 500 = 1000, though TEE is no dearer.
    "free units of a sku": Case(
        Discount("free_units", 2, target="items", sku="SOCK-1"), None,
        order(TEE, SOCKS), None, 1000, [(1, 1000)],
    ),
    # 5 free units, only 3 units exist: all three (3 x 500) and no more.
    "more free units than the order has": Case(
        Discount("free_units", 5, target="items"), None, order(SOCKS), None, 1500, [(0, 1500)],
    ),
    # 2 free units of 500 = 1000, capped at 700 (one line takes it all).
    "free units capped by max": Case(
        Discount("free_units", 2, max=700, target="items"), None, order(SOCKS), None, 700,
        [(0, 700)],
    ),
    # a free line of price 0 is the cheapest unit: the free unit gives nothing.
    "a free unit of a line costing nothing": Case(
        Discount("free_units", 1, target="items"), None, order(SHOE, FREEBIE), None, 0, [],
    ),
    # --- free_shipping -----------------------------------------------------------------
    # free shipping over 5000: an order of exactly 5000 with shipping 495 gets 495 off.
    "free shipping over 5000": Case(
        Discount("free_shipping"), Rules(min_order=5000),
        order(amount=5000, shipping=495), None, 495, [], 495,
    ),
    # free shipping capped at 300 of 495.
    "free shipping capped": Case(
        Discount("free_shipping", max=300), None, order(TEE, shipping=495), None, 300, [], 300,
    ),
    # --- conditions that hold ----------------------------------------------------------
    # vip only: a vip customer gets 10 % of 1500 = 150.
    "vip only, a vip": Case(
        Discount("percent", 10), Rules(customer=CustomerCondition(tags_any=("vip", "gold"))),
        order(TEE), ("new", "gold"), 150, [(0, 150)],
    ),
    # not for staff: an unknown customer (no tags) is not staff.
    "not for staff, no tags": Case(
        Discount("percent", 10), Rules(customer=CustomerCondition(tags_none=("staff",))),
        order(TEE), None, 150, [(0, 150)],
    ),
    # max_order 10000: an order of exactly 10000 gets 5 % = 500.
    "max_order at the bound": Case(
        Discount("percent", 5), Rules(max_order=10000), order(amount=10000), None, 500, [],
    ),
    # max_order counts the eligible subtotal: 8000 + 6000 = 14000 with 6000 excluded is
    # 8000, under 10000; 5 % of 8000 = 400, all on SHOE.
    "max_order without the excluded lines": Case(
        Discount("percent", 5), Rules(max_order=10000, exclude=ItemFilter(skus=("BOOT-1",))),
        order(SHOE, BOOT), None, 400, [(0, 400)],
    ),
    # min_subtotal of shoes 14000: SHOE 8000 + BOOT 6000 = 14000 holds; 10 % of the
    # whole 15500 -> 1550: 800, 600, 150.
    "min_subtotal at the bound": Case(
        Discount("percent", 10), Rules(items=(ItemCondition(any_of=shoes(), min_subtotal=14000),)),
        order(SHOE, BOOT, TEE), None, 1550, [(0, 800), (1, 600), (2, 150)],
    ),
    # --- gift cards --------------------------------------------------------------------
    # a balance of 5000 over lines 3000 + 4000: 2142.86 and 2857.14 -> 2142 + 2857 = 4999,
    # remainders 6000 and 1000 -> the first: 2143, 2857.
    "gift card over lines": Case(
        None, None, order(Item("A", 1, 3000), Item("B", 2, 2000)), None, 5000,
        [(0, 2143), (1, 2857)], extra={"type": "gift_card", "gift_balance": 5000},
    ),
    # a balance of 5000 on lines of 1500 (one excluded line of 1500): covers 1500.
    "gift card skips excluded lines": Case(
        None, Rules(exclude=ItemFilter(skus=("SOCK-1",))), order(TEE, SOCKS), None, 1500,
        [(0, 1500)], extra={"type": "gift_card", "gift_balance": 5000},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_priced_by_hand(name: str) -> None:
    case = CASES[name]
    c = campaign(case.discount, case.rules, **case.extra)
    balance = c.gift_balance if c.is_gift_card else None
    p = pricing_for(c, case.order, case.tags, balance)
    assert p.discount == case.discount_total
    assert [(ln.line, ln.discount) for ln in p.items] == case.lines
    assert [ln.sku for ln in p.items] == [case.order.items[i].sku for i, _ in case.lines]
    assert p.shipping_discount == case.shipping
    if case.order.items:  # an amount-only order's discount is on its amount, not on lines
        assert p.discount == sum(d for _, d in case.lines) + case.shipping


class Refusal(NamedTuple):
    discount: Discount
    rules: Rules | None
    order: Order
    tags: tuple[str, ...] | None
    message: str


REFUSALS: dict[str, Refusal] = {
    # buy 2 get 1 with 2 tees
    "buy 2 get 1 with two": Refusal(
        Discount("free_units", 1, target="items"),
        Rules(items=(ItemCondition(any_of=shoes("tees"), min_quantity=3),)),
        order(Item("TEE-A", 2, 1500, None, ("tees",)), Item("CAP", 5, 500, None, ("hats",))),
        None, "needs 3 items in category tees, the order has 2",
    ),
    # 2 shoes needed; the excluded shoe-sock does not count
    "2 shoes, the excluded one not counted": Refusal(
        Discount("percent", 20, target="items"),
        Rules(items=(ItemCondition(any_of=shoes(), min_quantity=2),),
              exclude=ItemFilter(skus=("SOCK-S",))),
        order(BOOT, SHOE_SOCK), None, "needs 2 items in category shoes, the order has 1",
    ),
    "one item of a product": Refusal(
        Discount("percent", 20, target="items"),
        Rules(items=(ItemCondition(any_of=ItemFilter(products=("P-BOOT",))),)),
        order(SHOE), None, "needs 1 item of product P-BOOT, the order has 0",
    ),
    "any 6 items, 2 + 3 given": Refusal(
        Discount("percent", 20), Rules(items=(ItemCondition(min_quantity=6),)),
        order(SHOE, SOCKS), None, "needs 6 items, the order has 5",
    ),
    "items named by two routes": Refusal(
        Discount("percent", 20),
        Rules(items=(ItemCondition(any_of=ItemFilter(categories=("boots",), skus=("X-1",))),)),
        order(SHOE), None, "needs 1 item in category boots or of sku X-1, the order has 0",
    ),
    "min_subtotal of shoes": Refusal(
        Discount("percent", 10), Rules(items=(ItemCondition(any_of=shoes(), min_subtotal=14001),)),
        order(SHOE, BOOT, TEE), None, "needs 14001 of items in category shoes, the order has 14000",
    ),
    "item conditions on an amount-only order": Refusal(
        Discount("percent", 10), Rules(items=(ItemCondition(any_of=shoes()),)),
        order(amount=5000), None, "needs items in category shoes: the order lists no items",
    ),
    # free shipping over 5000
    "free shipping under 5000": Refusal(
        Discount("free_shipping"), Rules(min_order=5000), order(amount=4999, shipping=495),
        None, "needs an order of at least 5000, the order has 4999",
    ),
    # free shipping over 9000: SHOE 8000 + 20 excluded socks 10000 counts as 8000
    "free shipping over 9000, excluded lines not counted": Refusal(
        Discount("free_shipping"), Rules(min_order=9000, exclude=ItemFilter(skus=("SOCK-1",))),
        order(SHOE, Item("SOCK-1", 20, 500), shipping=495), None,
        "needs an order of at least 9000 (excluded items not counted), the order has 8000",
    ),
    "free shipping with no shipping": Refusal(
        Discount("free_shipping"), None, order(TEE),
        None, "discounts shipping: the order has no shipping to discount",
    ),
    "free shipping with shipping 0": Refusal(
        Discount("free_shipping"), None, order(TEE, shipping=0),
        None, "discounts shipping: the order has no shipping to discount",
    ),
    "max_order": Refusal(
        Discount("percent", 5), Rules(max_order=10000), order(amount=10001), None,
        "applies to orders up to 10000, the order has 10001",
    ),
    # customers
    "vip only, no tags known": Refusal(
        Discount("percent", 10), Rules(customer=CustomerCondition(tags_any=("vip",))),
        order(TEE), None, "needs a customer tagged vip, no customer tags are known",
    ),
    # the customer is known and has no tags: that is known, not unknown
    "vip only, a customer without tags": Refusal(
        Discount("percent", 10), Rules(customer=CustomerCondition(tags_any=("vip",))),
        order(TEE), (), "needs a customer tagged vip, the customer has none of them",
    ),
    "vip only, other tags": Refusal(
        Discount("percent", 10), Rules(customer=CustomerCondition(tags_any=("vip", "gold"))),
        order(TEE), ("new",), "needs a customer tagged vip or gold, the customer has none of them",
    ),
    "not for staff or banned": Refusal(
        Discount("percent", 10),
        Rules(customer=CustomerCondition(tags_none=("staff", "banned"))),
        order(TEE), ("staff", "vip", "banned"), "not for customers tagged banned",
    ),
    # item targets
    "items target on an amount-only order": Refusal(
        Discount("percent", 10, target="items"), None, order(amount=5000), None,
        "discounts items: the order lists no items",
    ),
    "cheapest_item on an amount-only order": Refusal(
        Discount("amount", 100, target="cheapest_item"), None, order(amount=5000), None,
        "discounts items: the order lists no items",
    ),
    "free units on an amount-only order": Refusal(
        Discount("free_units", 1), None, order(amount=5000), None,
        "discounts items: the order lists no items",
    ),
    "every line excluded on the items target": Refusal(
        Discount("percent", 10, target="items"), Rules(exclude=shoes()), order(SHOE, BOOT),
        None, "no item of the order is one this campaign discounts",
    ),
    # every line excluded: nothing to take a discount from, on the order target as on
    # the item targets (a single-use code is not spent for nothing)
    "every line excluded on the order target": Refusal(
        Discount("percent", 50), Rules(exclude=shoes()), order(SHOE, BOOT),
        None, "no item of the order is one this campaign discounts",
    ),
    "free units of a sku the order lacks": Refusal(
        Discount("free_units", 1, target="items", sku="SOCK-1"), None, order(TEE), None,
        "needs an item of sku SOCK-1 to give free, the order has none that counts",
    ),
    "free units of a sku excluded by category": Refusal(
        Discount("free_units", 1, target="items", sku="SOCK-1"),
        Rules(exclude=ItemFilter(categories=("socks",))), order(TEE, SOCKS), None,
        "needs an item of sku SOCK-1 to give free, the order has none that counts",
    ),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refused_with_the_rule_named(name: str) -> None:
    case = REFUSALS[name]
    c = campaign(case.discount, case.rules)
    with pytest.raises(errors.RuleNotMet) as info:
        pricing_for(c, case.order, case.tags)
    assert info.value.code == "rule_not_met"
    assert info.value.message == case.message


def test_a_gift_card_pays_for_no_order_whose_every_line_is_excluded() -> None:
    c = campaign(None, Rules(exclude=ItemFilter(skus=("SOCK-1",))), type="gift_card",
                 gift_balance=5000)
    with pytest.raises(errors.RuleNotMet, match="^no item of the order is one this campaign discounts$"):
        pricing_for(c, order(SOCKS), None, 5000)
    # shipping alone is no line: the campaign's shipping target still discounts it
    ship = campaign(Discount("free_shipping"), Rules(exclude=ItemFilter(skus=("SOCK-1",))))
    assert pricing_for(ship, order(SOCKS, shipping=495), None) == Pricing(495, (), 495)


def test_the_campaign_checks_come_before_its_rules() -> None:
    """Currency and the campaign's own ``min_order`` (on the whole amount) answer first."""
    c = campaign(Discount("percent", 10), Rules(customer=CustomerCondition(tags_any=("vip",))),
                 min_order=2000)
    with pytest.raises(errors.OrderTooSmall, match="order amount 1500 is below the minimum 2000"):
        pricing_for(c, order(TEE), None)
    with pytest.raises(errors.CurrencyMismatch):
        pricing_for(c, build(currency="USD", amount=5000), ("vip",))


def test_detail_json_explains_the_lines_and_shipping() -> None:
    p = Pricing(1900, (), 0)
    assert detail_json(p) == '{"items":[],"shipping_discount":0}'
    c = campaign(Discount("percent", 20, target="items"),
                 Rules(items=(ItemCondition(any_of=shoes()),)))
    p = pricing_for(c, order(TEE, SHOE, shipping=495), None)
    assert detail_json(p) == (
        '{"items":[{"line":1,"sku":"SHOE-1","discount":1600}],"shipping_discount":0}'
    )


SPREADS: list[tuple[int, Sequence[int], list[int]]] = [
    (0, [5, 5], [0, 0]),
    (10, [], []),
    (10, [0, 0], [0, 0]),
    (7, [1, 1, 1], [3, 2, 2]),  # 2.33 each: floors 2, one left, equal remainders -> the first
    (2, [1, 1, 1], [1, 1, 0]),  # 0.67 each: floors 0, two left -> the first two
    (5, [0, 3, 7], [0, 2, 3]),  # 0, 1.5, 3.5 -> 0, 1, 3; one left, remainders 15 % 10 = 5 and
    #                             35 % 10 = 5 tie -> the earlier (the 3): 0, 2, 3
    (10, [3, 7], [3, 7]),       # exactly the weights
    (1, [999, 1], [1, 0]),      # 0.999 and 0.001 -> the larger remainder
]


@pytest.mark.parametrize(("total", "weights", "shares"), SPREADS)
def test_spread_by_largest_remainder(total: int, weights: Sequence[int], shares: list[int]) -> None:
    assert spread(total, weights) == shares


# --- on the shard --------------------------------------------------------------------------


def test_the_shard_keeps_the_explanation_and_fingerprints_the_cart() -> None:
    """20 % off shoes on SHOE + TEE: 1600 on line 0, kept with the redemption; the same
    idempotency key with another cart is a conflict, not the first answer."""
    shop = Shop()
    c = active(campaign(Discount("percent", 20, target="items"),
                        Rules(items=(ItemCondition(any_of=shoes()),))))
    shop.install(c, ["SHOES-1", "SHOES-2"])
    o = order(SHOE, TEE)

    def req(code: str, items: tuple[Item, ...], key: str | None = None) -> RedeemRequest:
        return RedeemRequest(code, sum(it.total for it in items), "EUR", items=items,
                             idempotency_key=key)

    out = shop.state.redeem_one(req("SHOES-1", o.items, "k1"))
    assert out.redemption is not None
    assert out.redemption.discount_amount == 1600
    assert out.redemption.detail == (
        '{"items":[{"line":0,"sku":"SHOE-1","discount":1600}],"shipping_discount":0}'
    )
    assert shop.state.redeem_one(req("SHOES-1", o.items, "k1")) == out  # a replay
    other = shop.state.redeem_one(req("SHOES-1", (SHOE, SHOE), "k1"))
    assert other.rejection is not None and other.rejection.error == "idempotency_conflict"
    # without shoes the rule answers on every path, the code stays unspent
    refused = shop.state.redeem_one(req("SHOES-2", (TEE,)))
    assert refused.rejection is not None
    assert (refused.rejection.error, refused.rejection.message) == (
        "rule_not_met", "needs 1 item in category shoes, the order has 0"
    )
    assert shop.state.validate(req("SHOES-2", (SHOE,))).valid


class _RedeemRequestAsItWas(msgspec.Struct, frozen=True):
    """RedeemRequest before orders had lines: keys it recorded must still replay."""

    code: str
    amount: int
    currency: str
    customer_id: str | None = None
    order_id: str | None = None
    idempotency_key: str | None = None
    metadata: str | None = None


def test_an_amount_only_request_keeps_the_fingerprint_it_always_had() -> None:
    from engine.shard_state import fingerprint

    for fields in ({"code": "A-1", "amount": 500, "currency": "EUR"},
                   {"code": "A-1", "amount": 500, "currency": "EUR", "customer_id": "c", "order_id": "o",
                    "metadata": '{"k":1}'}):
        now = RedeemRequest(**fields)  # type: ignore[arg-type]
        assert fingerprint("redeem", now) == fingerprint("redeem", _RedeemRequestAsItWas(**fields))  # type: ignore[arg-type]
        # stored tags are the gateway's, not the caller's: the same fingerprint
        looked_up = msgspec.structs.replace(now, tags=("vip",), stored_tags=True)
        assert fingerprint("redeem", looked_up) == fingerprint("redeem", now)
        # a cart is part of what the key identifies
        cart = msgspec.structs.replace(now, shipping=100)
        assert fingerprint("redeem", cart) != fingerprint("redeem", now)
