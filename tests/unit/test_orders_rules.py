"""Bad input, refused where it enters: an order that :func:`engine.orders.build` cannot
take, and campaign rules that :func:`engine.campaigns.new_campaign` refuses because they
could never hold (or do not fit their discount), each with its error class and a message
that names the field and why."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from engine import errors
from engine.campaigns import Campaign, Discount, edit, new_campaign, pricing_for
from engine.orders import MAX_AMOUNT, MAX_ITEMS, MAX_QUANTITY, MAX_TAGS, Item, build, check_tags
from engine.rules import CustomerCondition, ItemCondition, ItemFilter, Rules

NOW = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)

SHOE = Item("SHOE-1", 1, 5000, "P-SHOE", ("shoes",))
SOCK = Item("SOCK-1", 2, 500, "P-SOCK", ("socks",))


def campaign(
    discount: Discount | None = None, rules: Rules | None = None, **kw: Any
) -> Campaign:
    args: dict[str, Any] = dict(
        id="c1", name="rules", type="discount", currency="EUR", now=NOW,
        discount=discount or Discount("percent", 10), ends_at=NOW + timedelta(days=30),
        rules=rules,
    )
    args.update(kw)
    return new_campaign(**args)


# --- orders ------------------------------------------------------------------------------


BAD_ORDERS: list[tuple[dict[str, Any], type[errors.VoucherError], str]] = [
    # prices, quantities, amounts
    ({"items": [Item("A", 1, -1)]}, errors.InvalidOrder,
     "order.items[0].unit_price must not be negative, got -1"),
    ({"items": [SHOE, Item("B", 1, -500)]}, errors.InvalidOrder,
     "order.items[1].unit_price must not be negative, got -500"),
    ({"items": [Item("A", 0, 100)]}, errors.InvalidOrder,
     f"order.items[0].quantity must be an integer from 1 to {MAX_QUANTITY}, got 0"),
    ({"items": [Item("A", -2, 100)]}, errors.InvalidOrder,
     f"order.items[0].quantity must be an integer from 1 to {MAX_QUANTITY}, got -2"),
    ({"items": [Item("A", MAX_QUANTITY + 1, 1)]}, errors.InvalidOrder,
     f"order.items[0].quantity must be an integer from 1 to {MAX_QUANTITY}, got {MAX_QUANTITY + 1}"),
    ({"items": [Item("A", True, 100)]}, errors.InvalidOrder,  # a bool is no quantity
     "order.items[0].quantity must be an integer from 1 to"),
    ({"items": [Item("A", 1, 10.5)]}, errors.InvalidOrder,  # type: ignore[arg-type]
     "order.items[0].unit_price must be an integer in minor units"),
    ({"items": [Item("A", 1, MAX_AMOUNT + 1)]}, errors.InvalidOrder,
     f"order.items[0].unit_price is larger than {MAX_AMOUNT}"),
    ({"items": [Item("A", 2, MAX_AMOUNT)]}, errors.InvalidOrder,
     f"the items' subtotal is larger than {MAX_AMOUNT}"),
    ({"amount": -1}, errors.InvalidOrder, "order.amount must not be negative, got -1"),
    ({"amount": None}, errors.InvalidOrder, "the order needs an amount or items"),
    ({"amount": None, "items": []}, errors.InvalidOrder, "the order needs an amount or items"),
    ({"amount": 100, "shipping": -5}, errors.InvalidOrder,
     "order.shipping must not be negative, got -5"),
    ({"amount": 100, "shipping": 1.5}, errors.InvalidOrder,
     "order.shipping must be an integer in minor units"),
    ({"amount": True}, errors.InvalidOrder, "order.amount must be an integer in minor units"),
    ({"amount": 100.0}, errors.InvalidOrder, "order.amount must be an integer in minor units"),
    ({"amount": 100, "shipping": False}, errors.InvalidOrder,
     "order.shipping must be an integer in minor units"),
    ({"amount": MAX_AMOUNT + 1}, errors.InvalidOrder, f"order.amount is larger than {MAX_AMOUNT}"),
    ({"items": [Item("A", 1.0, 100)]}, errors.InvalidOrder,  # type: ignore[arg-type]
     "order.items[0].quantity must be an integer from 1 to"),
    ({"items": [Item("A", 1, False)]}, errors.InvalidOrder,
     "order.items[0].unit_price must be an integer in minor units"),
    # names
    ({"items": [Item("", 1, 100)]}, errors.InvalidOrder,
     "order.items[0].sku must be 1-128 characters without control characters"),
    ({"items": [Item("A\n", 1, 100)]}, errors.InvalidOrder,
     "order.items[0].sku must be 1-128 characters"),
    ({"items": [Item("A", 1, 100, "")]}, errors.InvalidOrder,
     "order.items[0].product_id must be 1-128 characters"),
    ({"items": [Item("A", 1, 100, None, ("x" * 129,))]}, errors.InvalidOrder,
     "order.items[0].categories[0] must be 1-128 characters"),
    ({"items": [Item("A", 1, 100, None, tuple(f"c{i}" for i in range(21)))]}, errors.InvalidOrder,
     "order.items[0].categories holds at most 20 names"),
    # too many lines
    ({"items": [Item(f"S{i}", 1, 1) for i in range(MAX_ITEMS + 1)]}, errors.InvalidOrder,
     f"order.items holds at most {MAX_ITEMS} lines"),
    # the amount disagrees with the lines: 1 x 5000 + 2 x 500 = 6000
    ({"amount": 5999, "items": [SHOE, SOCK]}, errors.OrderAmountMismatch,
     "order.amount 5999 does not match the items' subtotal 6000"),
    ({"amount": 0, "items": [SHOE]}, errors.OrderAmountMismatch,
     "order.amount 0 does not match the items' subtotal 5000"),
]


@pytest.mark.parametrize(("fields", "error", "message"), BAD_ORDERS)
def test_build_refuses_a_bad_order_naming_the_field(
    fields: dict[str, Any], error: type[errors.VoucherError], message: str
) -> None:
    args: dict[str, Any] = {"currency": "EUR", "amount": 100}
    if "items" in fields:
        args.pop("amount")
    args.update(fields)
    with pytest.raises(error) as info:
        build(**args)
    assert type(info.value) is error
    assert info.value.message.startswith(message), info.value.message
    assert isinstance(info.value, errors.InvalidInput)  # every one answers 4xx


@pytest.mark.parametrize("currency", ["eur", "EUD", "XTS", "XAU", "", "EURO", None, 978])
def test_build_refuses_an_unknown_currency(currency: Any) -> None:
    with pytest.raises(errors.UnknownCurrency) as info:
        build(currency=currency, amount=100)
    assert info.value.code == "unknown_currency"
    assert info.value.message == (
        f"order.currency must be an ISO 4217 currency code such as EUR, got {currency!r}"
    )


def test_an_order_at_the_edges_is_taken() -> None:
    # exactly MAX_ITEMS lines, a price of 0, a quantity of MAX_QUANTITY, shipping 0
    lines = [Item(f"S{i}", 1, 0) for i in range(MAX_ITEMS - 1)] + [Item("Z", MAX_QUANTITY, 3)]
    order = build(currency="JPY", shipping=0, items=lines)
    assert (order.amount, order.shipping, len(order.items)) == (3 * MAX_QUANTITY, 0, MAX_ITEMS)
    # the amount given agrees; an amount-only order keeps its amount
    assert build(currency="EUR", amount=6000, items=[SHOE, SOCK]).amount == 6000
    assert build(currency="EUR", items=(SHOE, SOCK)).amount == 6000
    assert build(currency="EUR", amount=0) .items == ()
    assert build(currency="EUR", amount=MAX_AMOUNT).amount == MAX_AMOUNT


def test_customer_tags_are_checked() -> None:
    assert check_tags(None) is None
    assert check_tags(["vip", "staff"]) == ("vip", "staff")
    with pytest.raises(errors.InvalidOrder, match=f"customer_tags holds at most {MAX_TAGS} tags"):
        check_tags([f"t{i}" for i in range(MAX_TAGS + 1)])
    with pytest.raises(errors.InvalidOrder, match=r"customer_tags\[1\] must be 1-128 characters"):
        check_tags(["vip", ""])


# --- rules that could never hold ---------------------------------------------------------

SHOES = ItemFilter(categories=("shoes",))

BAD_RULES: list[tuple[dict[str, Any], str]] = [
    # a category both required and excluded
    ({"rules": Rules(items=(ItemCondition(any_of=SHOES),), exclude=SHOES)},
     "rules.items[0] requires items in category shoes, which rules.exclude excludes: it can never hold"),
    ({"rules": Rules(items=(ItemCondition(any_of=SHOES, min_quantity=0, min_subtotal=1),),
                     exclude=SHOES)},
     "rules.items[0] requires items in category shoes, which rules.exclude excludes"),
    ({"rules": Rules(items=(ItemCondition(any_of=ItemFilter(skus=("A", "B"))),),
                     exclude=ItemFilter(skus=("B", "A", "C")))},
     "rules.items[0] requires items of skus A, B, which rules.exclude excludes: it can never hold"),
    ({"rules": Rules(items=(ItemCondition(min_quantity=1),
                            ItemCondition(any_of=ItemFilter(products=("P",)))),
                     exclude=ItemFilter(products=("P",), categories=("x",)))},
     "rules.items[1] requires items of product P, which rules.exclude excludes"),
    # max_order below a minimum
    ({"rules": Rules(min_order=5000, max_order=4999)},
     "rules.max_order 4999 is below the minimum order 5000: no order fits"),
    ({"min_order": 3000, "rules": Rules(max_order=2000)},
     "rules.max_order 2000 is below the minimum order 3000: no order fits"),
    ({"rules": Rules(max_order=1000, items=(ItemCondition(min_subtotal=1001),))},
     "rules.items[0].min_subtotal 1001 is above rules.max_order 1000: it can never hold"),
    # tags
    ({"rules": Rules(customer=CustomerCondition(tags_any=("vip",), tags_none=("vip", "banned")))},
     "rules.customer: every tag of tags_any is in tags_none; it can never hold"),
    ({"rules": Rules(customer=CustomerCondition(tags_any=("a", "b"), tags_none=("b", "a")))},
     "rules.customer: every tag of tags_any is in tags_none"),
    ({"rules": Rules(customer=CustomerCondition())}, "rules.customer names no tag"),
    # free units of an excluded sku
    ({"discount": Discount("free_units", 1, target="items", sku="SOCK-1"),
      "rules": Rules(exclude=ItemFilter(skus=("SOCK-1",)))},
     "discount.sku SOCK-1 is excluded by rules.exclude: no unit could be free"),
    # a kind that does not fit its target
    ({"discount": Discount("free_shipping", target="items")},
     "free_shipping discounts shipping: use target shipping"),
    ({"discount": Discount("free_shipping", target="cheapest_item")},
     "free_shipping discounts shipping: use target shipping"),
    ({"discount": Discount("free_units", 1, target="shipping")},
     "free_units gives items, not shipping: use target items"),
    ({"discount": Discount("fixed_price", 0, target="order")},
     "a fixed_price of 0 on the whole order makes it free: use percent 100"),
    # malformed
    ({"rules": Rules(exclude=ItemFilter())}, "rules.exclude names no sku, product or category"),
    ({"rules": Rules(items=(ItemCondition(any_of=ItemFilter()),))},
     "rules.items[0].any_of names no sku, product or category"),
    ({"rules": Rules(exclude=ItemFilter(skus=("A", "A")))}, "rules.exclude.skus names something twice"),
    ({"rules": Rules(exclude=ItemFilter(categories=("",)))},
     "rules.exclude.categories[0] must be 1-128 characters"),
    ({"rules": Rules(min_order=-1)}, f"rules.min_order must be an integer from 0 to {MAX_AMOUNT}"),
    ({"rules": Rules(max_order=MAX_AMOUNT + 1)},
     f"rules.max_order must be an integer from 0 to {MAX_AMOUNT}"),
    ({"rules": Rules(items=(ItemCondition(min_quantity=MAX_QUANTITY + 1),))},
     f"rules.items[0].min_quantity must be an integer from 0 to {MAX_QUANTITY}"),
    ({"rules": Rules(items=(ItemCondition(min_subtotal=-5),))},
     f"rules.items[0].min_subtotal must be an integer from 0 to {MAX_AMOUNT}"),
    ({"rules": Rules(items=tuple(ItemCondition() for _ in range(21)))},
     "rules.items holds at most 20 conditions"),
    ({"rules": Rules(customer=CustomerCondition(tags_none=tuple(f"t{i}" for i in range(1001))))},
     "rules.customer.tags_none holds at most 1000 names"),
    ({"min_order": 1000, "rules": Rules(min_order=2000)},
     "min_order is given twice: as min_order and rules.min_order"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_RULES)
def test_new_campaign_refuses_rules_that_can_never_hold(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(errors.InvalidRule) as info:
        campaign(**fields)
    assert info.value.code == "invalid_rule"
    assert info.value.message.startswith(message), info.value.message


@pytest.mark.parametrize(("fields", "message"), BAD_RULES)
def test_an_edit_refuses_the_same_rules(fields: dict[str, Any], message: str) -> None:
    """An edit runs the same checks: the bad rules (or discount) sent as a change."""
    base = campaign()
    changes = {k: v for k, v in fields.items() if k in ("rules", "discount", "min_order")}
    with pytest.raises(errors.InvalidInput) as info:
        edit(base, changes, NOW)
    assert info.value.code == "invalid_rule", info.value.message
    assert info.value.message.startswith(message), info.value.message


BAD_DISCOUNTS: list[tuple[Discount, str]] = [
    (Discount("free_units", 0, target="items"),
     f"discount.value is the number of free units for free_units: 1 to {MAX_QUANTITY}"),
    (Discount("free_units", MAX_QUANTITY + 1), "discount.value is the number of free units"),
    (Discount("free_shipping", 5), "a free_shipping discount has no value"),
    (Discount("percent", 10, sku="A"), "discount.sku only picks the free units of free_units"),
    (Discount("free_units", 1, sku=""), "discount.sku must be 1-128 characters"),
    (Discount("fixed_price", -1, target="items"), "discount.value must be >= 0"),
    (Discount("percent", 101, target="cheapest_item"), "discount.value must be 1..100"),
    (Discount("amount", 0, target="shipping"), "discount.value must be positive"),
    (Discount("percent", 10, target="basket"),  # type: ignore[arg-type]
     "discount.target must be one of order, items, cheapest_item, shipping"),
]


@pytest.mark.parametrize(("discount", "message"), BAD_DISCOUNTS)
def test_new_campaign_refuses_a_malformed_discount(discount: Discount, message: str) -> None:
    with pytest.raises(errors.InvalidInput) as info:
        campaign(discount)
    assert info.value.message.startswith(message), info.value.message


GOOD_RULES: list[dict[str, Any]] = [
    # shoes excluded but a sku route to the required items stays open
    {"rules": Rules(items=(ItemCondition(any_of=ItemFilter(categories=("shoes",), skus=("X",))),),
                    exclude=SHOES)},
    # a minimum equal to the maximum: exactly one subtotal fits
    {"rules": Rules(min_order=5000, max_order=5000)},
    {"min_order": 5000, "rules": Rules(min_order=5000, max_order=5000)},
    # one tag of tags_any is not refused
    {"rules": Rules(customer=CustomerCondition(tags_any=("vip", "staff"), tags_none=("staff",)))},
    {"rules": Rules(customer=CustomerCondition(tags_none=("banned",)))},
    # free units of a sku whose category is excluded: refused only at pricing
    {"discount": Discount("free_units", 1, target="items", sku="SOCK-1"),
     "rules": Rules(exclude=ItemFilter(categories=("socks",)))},
    {"rules": Rules(items=(ItemCondition(min_quantity=0, min_subtotal=0),))},
    # minimums of 0 on excluded items ask for nothing of them: no rule that can never hold
    {"rules": Rules(items=(ItemCondition(any_of=SHOES, min_subtotal=0),), exclude=SHOES)},
    {"rules": Rules(items=(ItemCondition(any_of=SHOES, min_quantity=0),), exclude=SHOES)},
]


@pytest.mark.parametrize("fields", GOOD_RULES)
def test_rules_that_can_hold_are_taken(fields: dict[str, Any]) -> None:
    c = campaign(**fields)
    assert c.rules == fields["rules"]


def test_a_campaign_minimum_on_the_whole_order_fits_a_maximum_on_the_eligible_part() -> None:
    """The campaign's ``min_order`` bounds the whole amount, ``rules.max_order`` the eligible
    subtotal: with lines excluded an order fits both (3500 in all, 2000 of it eligible),
    so the pair is no rule that can never hold. Without exclusions the two are the same
    subtotal, and only then is a maximum below the minimum refused."""
    c = campaign(min_order=3000, rules=Rules(max_order=2000, exclude=ItemFilter(skus=("SALE",))))
    fits = build(currency="EUR", items=[Item("A", 1, 2000), Item("SALE", 1, 1500)])
    # 10 % of the eligible 2000
    assert pricing_for(c, fits, None).discount == 200
    with pytest.raises(errors.InvalidRule, match="rules.max_order 2000 is below the minimum order 3000"):
        campaign(min_order=3000, rules=Rules(max_order=2000))
    with pytest.raises(errors.InvalidRule, match="rules.max_order 2000 is below the minimum order 2001"):
        campaign(rules=Rules(min_order=2001, max_order=2000, exclude=ItemFilter(skus=("SALE",))))


def test_free_shipping_on_the_order_target_means_shipping() -> None:
    c = campaign(discount=Discount("free_shipping"))
    assert c.discount == Discount("free_shipping", target="shipping")


def test_an_edit_takes_rules_as_json_and_names_what_is_wrong() -> None:
    base = campaign()
    edited, diff = edit(base, {"rules": {
        "items": [{"any_of": {"categories": ["shoes"]}, "min_quantity": 2}],
        "exclude": {"skus": ["SOCK-S"]},
        "customer": {"tags_any": ["vip"]},
    }}, NOW)
    assert edited.rules == Rules(
        items=(ItemCondition(any_of=SHOES, min_quantity=2),),
        exclude=ItemFilter(skus=("SOCK-S",)),
        customer=CustomerCondition(tags_any=("vip",)),
    )
    assert diff["rules"] == [None, {
        "items": [{"any_of": {"categories": ["shoes"]}, "min_quantity": 2}],
        "exclude": {"skus": ["SOCK-S"]},
        "customer": {"tags_any": ["vip"]},
    }]
    cleared, diff = edit(edited, {"rules": None}, NOW)
    assert cleared.rules is None and diff["rules"][1] is None
    for bad, message in [
        ({"items": [{"any_of": {"colour": ["red"]}}]}, "rules: Object contains unknown field `colour`"),
        ({"min_order": "ten"}, "rules: Expected `int | null`, got `str`"),
        ({"exclude": {"skus": "SOCK-S"}}, "rules: Expected `array`, got `str`"),
    ]:
        with pytest.raises(errors.InvalidInput) as info:
            edit(base, {"rules": bad}, NOW)
        assert info.value.message.startswith(message), info.value.message
