"""Property tests of cart-aware pricing: random orders (up to twelve lines from small
alphabets of skus, products and categories, prices of 0 included, optional shipping) under
random valid campaigns (every kind on every target, optional ``max``, optional rules with
exclusions, item conditions and customer tags).

What must hold for every one: the answer explains itself (the line discounts plus the
shipping part make the discount, each line between 0 and its total, shipping between 0 and
the shipping), nothing excluded is ever discounted, ``max`` holds, the total agrees with a
reference written the plain way (units expanded one by one, rules read straight from their
docstring), an amount-only order gets exactly the formula campaigns always had, the same
input always gets the same answer, the order of the lines changes no verdict and no total,
an excluded line changes nothing, a rule refused as one that can never hold holds for no
order, and the shard's paths (validate, reserve + confirm after a restart, redeem) decide
the same request the same way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import msgspec
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st

from engine import errors
from engine import rules as rules_module
from engine.campaigns import Campaign, Discount, discount_for, new_campaign, transition
from engine.orders import MAX_AMOUNT, Item, Order, build
from engine.pricing import Pricing, detail_json, price, spread
from engine.rules import CustomerCondition, ItemCondition, ItemFilter, Rules, eligible
from engine.shard_state import RedeemRequest
from tests.unit.test_pools import T0, Shop

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
FEWER = settings(SETTINGS, max_examples=120)  # the slower draws: keep the unit tier quick

SKUS = ("A", "B", "C", "D", "E")
PRODUCTS = ("P1", "P2", "P3")
CATEGORIES = ("shoes", "socks", "tees", "hats")
TAGS = ("vip", "staff", "new", "banned")

PRICES = st.one_of(
    st.sampled_from([0, 0, 1, 2, 3, 99, 100, 333, 500, 999, 1000]), st.integers(0, 5000)
)


def names(values: Sequence[str], max_size: int = 2) -> st.SearchStrategy[tuple[str, ...]]:
    return st.lists(st.sampled_from(values), unique=True, max_size=max_size).map(tuple)


ITEMS = st.builds(
    Item,
    sku=st.sampled_from(SKUS),
    quantity=st.integers(1, 5),
    unit_price=PRICES,
    product_id=st.none() | st.sampled_from(PRODUCTS),
    categories=names(CATEGORIES),
)


@st.composite
def orders(draw: st.DrawFn) -> Order:
    items = draw(st.lists(ITEMS, max_size=12))
    shipping = draw(st.none() | st.sampled_from([0, 1, 495]) | st.integers(0, 2000))
    amount = None if items else draw(st.integers(0, 20000))
    return build(currency="EUR", amount=amount, shipping=shipping, items=items)


TAG_SETS = st.none() | names(TAGS, 3)


def sometimes(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """None three times in four: a rule set of many optional parts still lets orders pass."""
    return st.one_of(st.none(), st.none(), st.none(), strategy)


def some(values: Sequence[str], max_size: int = 2) -> st.SearchStrategy[tuple[str, ...]]:
    return st.lists(st.sampled_from(values), unique=True, min_size=1, max_size=max_size).map(tuple)


FILTERS = st.one_of(
    st.builds(ItemFilter, categories=some(CATEGORIES)),
    st.builds(ItemFilter, skus=some(SKUS)),
    st.builds(ItemFilter, products=some(PRODUCTS, 1)),
    st.builds(ItemFilter, skus=names(SKUS), products=names(PRODUCTS, 1), categories=some(CATEGORIES)),
)

CONDITIONS = st.builds(
    ItemCondition,
    any_of=st.none() | FILTERS,
    min_quantity=sometimes(st.integers(0, 6)),
    min_subtotal=sometimes(st.integers(0, 8000)),
)

CUSTOMERS = st.one_of(
    st.builds(CustomerCondition, tags_any=some(TAGS)),
    st.builds(CustomerCondition, tags_none=some(TAGS, 1)),
    st.builds(CustomerCondition, tags_any=some(TAGS), tags_none=some(TAGS, 1)),
)


@st.composite
def rule_sets(draw: st.DrawFn) -> Rules | None:
    if draw(st.sampled_from([True, False, False, False])):
        return None
    low = draw(sometimes(st.integers(0, 6000)))
    high = draw(sometimes(st.integers(low or 0, (low or 0) + 40000)))
    return Rules(
        min_order=low,
        max_order=high,
        items=tuple(draw(st.lists(CONDITIONS, max_size=2))),
        exclude=draw(st.none() | FILTERS),
        customer=draw(sometimes(CUSTOMERS)),
    )


_VALUES: dict[str, st.SearchStrategy[int]] = {
    "percent": st.integers(1, 100),
    "amount": st.integers(1, 3000),
    "fixed_price": st.integers(0, 3000),
    "free_units": st.integers(1, 6),
    "free_shipping": st.just(0),
}
#: every kind on every target it takes (free_shipping on the order means shipping)
KIND_TARGETS: list[tuple[str, str]] = [
    *((k, t) for k in ("percent", "amount", "fixed_price")
      for t in ("order", "items", "cheapest_item", "shipping")),
    *(("free_units", t) for t in ("order", "items", "cheapest_item")),
    ("free_shipping", "order"),
    ("free_shipping", "shipping"),
]


@st.composite
def discounts(draw: st.DrawFn) -> Discount:
    kind, target = draw(st.sampled_from(KIND_TARGETS))
    value = draw(_VALUES[kind])
    if kind == "fixed_price" and target == "order":
        value = max(value, 1)
    sku = draw(st.none() | st.sampled_from(SKUS)) if kind == "free_units" else None
    cap = draw(st.none() | st.integers(1, 5000))
    return Discount(kind, value, cap, target, sku)  # type: ignore[arg-type]


def make_campaign(
    cid: str,
    discount: Discount | None,
    rules: Rules | None,
    *,
    type: str = "discount",
    min_order: int = 0,
    gift_balance: int | None = None,
    shared_code: str | None = None,
) -> Campaign:
    """An active campaign, or ``reject()`` when the drawn rules are refused (rules that
    could never hold are tested in ``test_orders_rules.py``)."""
    try:
        c = new_campaign(
            id=cid, name="property", type=type, currency="EUR", now=T0,
            discount=discount, min_order=min_order, gift_balance=gift_balance,
            shared_code=shared_code, ends_at=T0 + timedelta(days=30), rules=rules,
        )
    except errors.InvalidRule:
        reject()
    return transition(c, "activate", T0)


@st.composite
def campaigns(draw: st.DrawFn) -> Campaign:
    rules = draw(rule_sets())
    if draw(st.sampled_from([True] + [False] * 7)):
        return make_campaign("gift", None, rules, type="gift_card",
                             gift_balance=draw(st.integers(1, 20000)))
    return make_campaign("c", draw(discounts()), rules)


# --- the reference: the docstrings, read the plain way -------------------------------------


def matches(f: ItemFilter, it: Item) -> bool:
    return (
        it.sku in f.skus
        or (it.product_id is not None and it.product_id in f.products)
        or bool(set(it.categories) & set(f.categories))
    )


def counted(rules: Rules | None, order: Order) -> list[int]:
    ex = rules.exclude if rules is not None else None
    return [i for i, it in enumerate(order.items) if ex is None or not matches(ex, it)]


def holds(rules: Rules | None, order: Order, tags: Sequence[str] | None) -> bool:
    """Whether every rule holds."""
    if rules is None:
        return True
    lines = [order.items[i] for i in counted(rules, order)]
    subtotal = sum(it.quantity * it.unit_price for it in lines) if order.items else order.amount
    if rules.min_order is not None and subtotal < rules.min_order:
        return False
    if rules.max_order is not None and subtotal > rules.max_order:
        return False
    for cond in rules.items:
        if not order.items:
            return False
        hit = [it for it in lines if cond.any_of is None or matches(cond.any_of, it)]
        units = sum(it.quantity for it in hit)
        need = cond.min_quantity
        if need is None and cond.min_subtotal is None:
            need = 1
        if need is not None and units < need:
            return False
        if cond.min_subtotal is not None and sum(it.quantity * it.unit_price for it in hit) < cond.min_subtotal:
            return False
    if rules.customer is not None:
        have = set(tags or ())
        if rules.customer.tags_any and not have & set(rules.customer.tags_any):
            return False
        if have & set(rules.customer.tags_none):
            return False
    return True


def one(kind: str, value: int, base: int) -> int:
    if kind == "percent":
        return base * value // 100
    if kind == "amount":
        return min(value, base)
    return max(0, base - value)


def capped(value: int, cap: int | None) -> int:
    return value if cap is None else min(value, cap)


def reference(c: Campaign, order: Order, tags: Sequence[str] | None, balance: int | None) -> int | None:
    """The whole discount, or None where the campaign refuses the order."""
    rules = c.rules
    if not holds(rules, order, tags):
        return None
    lines = counted(rules, order)
    items = order.items
    base = sum(items[i].quantity * items[i].unit_price for i in lines) if items else order.amount
    d = c.discount
    if items and not lines and (d is None or d.target != "shipping"):
        return None  # every line excluded: nothing to take from
    if d is None:
        return min(balance or 0, base)
    if d.target == "shipping":
        ship = order.shipping or 0
        if ship == 0:
            return None
        return capped(ship if d.kind == "free_shipping" else one(d.kind, d.value, ship), d.max)
    if d.target == "order" and d.kind != "free_units":
        return min(capped(one(d.kind, d.value, base), d.max), base)
    if not items:
        return None
    filters = [cond.any_of for cond in (rules.items if rules else ()) if cond.any_of is not None]
    if d.kind == "free_units" and d.sku is not None:
        pool = [i for i in lines if items[i].sku == d.sku]
    else:
        pool = [i for i in lines if not filters or any(matches(f, items[i]) for f in filters)]
    if not pool:
        return None
    if d.kind == "free_units":
        units = sorted(items[i].unit_price for i in pool for _ in range(items[i].quantity))
        return capped(sum(units[: d.value]), d.max)
    if d.target == "cheapest_item":
        return capped(one(d.kind, d.value, min(items[i].unit_price for i in pool)), d.max)
    if d.kind == "percent":
        return capped(sum(items[i].quantity * items[i].unit_price * d.value // 100 for i in pool), d.max)
    return capped(sum(one(d.kind, d.value, items[i].unit_price) * items[i].quantity for i in pool), d.max)


def old_discount_for(c: Campaign, amount: int, balance: int | None = None) -> int:
    """The formula of an amount-only order, as campaigns had it before orders had lines."""
    if c.is_gift_card:
        return min(balance or 0, amount)
    d = c.discount
    assert d is not None
    value = amount * d.value // 100 if d.kind == "percent" else d.value
    if d.max is not None:
        value = min(value, d.max)
    return min(value, amount)


# --- price() -------------------------------------------------------------------------------


def priced(c: Campaign, order: Order, tags: tuple[str, ...] | None) -> Pricing | str:
    balance = c.gift_balance if c.is_gift_card else None
    try:
        return price(c, order, tags, balance)
    except errors.RuleNotMet as exc:
        return exc.message


@SETTINGS
@given(c=campaigns(), order=orders(), tags=TAG_SETS)
def test_the_answer_explains_itself_and_keeps_every_bound(
    c: Campaign, order: Order, tags: tuple[str, ...] | None
) -> None:
    balance = c.gift_balance if c.is_gift_card else None
    p = priced(c, order, tags)
    expected = reference(c, order, tags, balance)
    d = c.discount
    event(f"{d.kind} on {d.target}" if d else "gift card")
    event(f"refused: {re.sub(r'[0-9]+', 'N', p.split(',')[0].split(':')[0])}" if isinstance(p, str)
          else "priced, discount > 0" if p.discount else "priced, 0")
    if isinstance(p, str):
        assert expected is None, (p, expected)
        return
    assert expected is not None, p
    assert p.discount == expected

    items, ship = order.items, order.shipping or 0
    subtotal = sum(it.total for it in items) if items else order.amount
    # the parts make the whole
    assert 0 <= p.shipping_discount <= ship
    if items:
        assert p.discount == sum(ln.discount for ln in p.items) + p.shipping_discount
    else:
        assert p.items == ()
    assert 0 <= p.discount <= subtotal + ship
    # every line once, in order, named by its sku, between 0 (left out) and its total
    assert [ln.line for ln in p.items] == sorted({ln.line for ln in p.items})
    for ln in p.items:
        assert ln.sku == items[ln.line].sku
        assert 0 < ln.discount <= items[ln.line].total
    # nothing excluded is ever discounted
    assert {ln.line for ln in p.items} <= set(eligible(c.rules, order))
    # the items' part never above the eligible subtotal
    if items:
        assert p.discount - p.shipping_discount <= sum(items[i].total for i in counted(c.rules, order))
    if d is None:
        assert p.discount <= (balance or 0) and p.shipping_discount == 0
        return
    if d.max is not None:
        assert p.discount <= d.max
    if d.target == "shipping":
        assert p.items == () and p.discount == p.shipping_discount
    else:
        assert p.shipping_discount == 0
    if d.kind == "percent" and d.target != "shipping":
        assert p.discount <= subtotal * d.value // 100  # floors per line sum to no more
    if d.target == "cheapest_item" and d.kind != "free_units":
        assert len(p.items) <= 1
    if d.kind == "free_units" and d.max is None:
        # whole units: each line's discount is a number of its units, at most the free ones
        assert sum(ln.discount // items[ln.line].unit_price for ln in p.items) <= d.value
        assert all(ln.discount % items[ln.line].unit_price == 0 for ln in p.items)


@SETTINGS
@given(c=campaigns(), order=orders(), tags=TAG_SETS)
def test_the_same_input_gets_the_same_answer(
    c: Campaign, order: Order, tags: tuple[str, ...] | None
) -> None:
    """Twice, and once more after the order and campaign crossed msgpack (as they cross
    the actor boundary) and JSON (as a reservation keeps its cart)."""
    first = priced(c, order, tags)
    again = priced(c, order, tags)
    c2 = msgspec.msgpack.decode(msgspec.msgpack.encode(c), type=Campaign)
    o2 = msgspec.json.decode(msgspec.json.encode(order), type=Order)
    moved = priced(c2, o2, tags)
    assert first == again == moved
    if isinstance(first, Pricing) and isinstance(again, Pricing):
        assert detail_json(first) == detail_json(again)


@FEWER
@given(c=campaigns(), order=orders(), tags=TAG_SETS, data=st.data())
def test_the_order_of_the_lines_changes_no_verdict_and_no_total(
    c: Campaign, order: Order, tags: tuple[str, ...] | None, data: st.DataObject
) -> None:
    """Only how a total falls on the lines may depend on their order (ties go to the
    earlier line); whether the campaign applies, why not, and how much it takes may not."""
    shuffled = msgspec.structs.replace(order, items=tuple(data.draw(st.permutations(order.items))))
    first, second = priced(c, order, tags), priced(c, shuffled, tags)
    if isinstance(first, str) or isinstance(second, str):
        assert first == second
        return
    assert first.discount == second.discount
    assert first.shipping_discount == second.shipping_discount


@st.composite
def excluded_lines(draw: st.DrawFn, ex: ItemFilter) -> Item:
    """A line ``ex`` excludes, by any of the routes it names."""
    routes = [r for r, names_ in (("sku", ex.skus), ("product", ex.products),
                                  ("category", ex.categories)) if names_]
    route = draw(st.sampled_from(routes))
    item = draw(ITEMS)
    if route == "sku":
        item = msgspec.structs.replace(item, sku=draw(st.sampled_from(ex.skus)))
    elif route == "product":
        item = msgspec.structs.replace(item, product_id=draw(st.sampled_from(ex.products)))
    else:
        cats = (draw(st.sampled_from(ex.categories)), *item.categories)
        item = msgspec.structs.replace(item, categories=tuple(dict.fromkeys(cats)))
    assert ex.matches(item)
    return item


@FEWER
@given(c=campaigns(), order=orders(), tags=TAG_SETS, ex=FILTERS, data=st.data())
def test_an_excluded_line_changes_nothing(
    c: Campaign, order: Order, tags: tuple[str, ...] | None, ex: ItemFilter, data: st.DataObject
) -> None:
    """A line the rules exclude neither counts toward a condition nor takes a discount:
    adding one (to an order that has lines) leaves the answer exactly as it was."""
    rules = c.rules or Rules()
    if rules.exclude is None:
        rules = msgspec.structs.replace(rules, exclude=ex)
        try:
            c = make_campaign(c.id, c.discount, rules, type=c.type, gift_balance=c.gift_balance)
        except errors.InvalidInput:
            reject()
    assert rules.exclude is not None
    if not order.items:
        order = build(currency="EUR", shipping=order.shipping, items=[data.draw(ITEMS)])
    extra = data.draw(st.lists(excluded_lines(rules.exclude), min_size=1, max_size=3))
    more = build(currency="EUR", shipping=order.shipping, items=[*order.items, *extra])
    assert priced(c, more, tags) == priced(c, order, tags)


@SETTINGS
@given(rules=rule_sets(), min_order=st.sampled_from([0, 0, 500, 3000]),
       cases=st.lists(st.tuples(orders(), TAG_SETS), min_size=1, max_size=6))
def test_rules_refused_as_never_holding_hold_for_no_order(
    rules: Rules | None, min_order: int, cases: list[tuple[Order, tuple[str, ...] | None]]
) -> None:
    """A refusal that says a rule can never hold is true of every order tried."""
    if rules is None:
        return
    try:
        rules_module.check(rules, min_order=min_order)
    except errors.InvalidRule as exc:
        if "never hold" not in exc.message and "no order fits" not in exc.message:
            return
        event("refused as never holding")
        for order, tags in cases:
            assert not (order.amount >= min_order and holds(rules, order, tags)), (exc, order)


AMOUNT_ONLY = st.one_of(
    st.integers(0, 20000), st.sampled_from([0, 1, 99, 100, 101, MAX_AMOUNT]), st.integers(0, MAX_AMOUNT)
)


@st.composite
def plain_campaigns(draw: st.DrawFn) -> Campaign:
    """The campaigns every shop had: percent or amount off the order, maybe capped, or a
    gift card."""
    if draw(st.booleans()):
        kind = draw(st.sampled_from(["percent", "amount"]))
        value = draw(st.integers(1, 100)) if kind == "percent" else draw(st.integers(1, 10**6))
        cap = draw(st.none() | st.integers(1, 10**6))
        return make_campaign("plain", Discount(kind, value, cap), None)  # type: ignore[arg-type]
    return make_campaign("gift", None, None, type="gift_card",
                         gift_balance=draw(st.integers(1, 10**6)))


@SETTINGS
@given(c=plain_campaigns(), amount=AMOUNT_ONLY, balance=st.integers(1, 10**6),
       shipping=st.none() | st.integers(0, 2000))
def test_an_amount_only_order_gets_the_formula_it_always_had(
    c: Campaign, amount: int, balance: int, shipping: int | None
) -> None:
    bal = balance if c.is_gift_card else None
    assert discount_for(c, amount, bal) == old_discount_for(c, amount, bal)
    # shipping given beside the amount changes nothing for a discount on the order
    p = price(c, build(currency="EUR", amount=amount, shipping=shipping), None, bal)
    assert p == Pricing(old_discount_for(c, amount, bal))


@SETTINGS
@given(weights=st.lists(st.integers(0, 10**6), max_size=12), data=st.data())
def test_spread_splits_exactly_in_proportion(weights: list[int], data: st.DataObject) -> None:
    whole = sum(weights)
    total = data.draw(st.integers(0, whole))
    shares = spread(total, weights)
    assert len(shares) == len(weights)
    if whole == 0:
        assert shares == [0] * len(weights)
        return
    assert sum(shares) == total
    for w, s in zip(weights, shares, strict=True):
        assert 0 <= s <= w
        assert abs(s * whole - total * w) < whole  # within one unit of its exact share
    assert spread(total, weights) == shares


# --- the shard's paths ---------------------------------------------------------------------


def request(
    code: str, order: Order, tags: tuple[str, ...] | None, currency: str, customer: str | None
) -> RedeemRequest:
    return RedeemRequest(
        code=code, amount=order.amount, currency=currency, customer_id=customer,
        order_id="order-1", shipping=order.shipping, items=order.items or None, tags=tags,
    )


def attempt(fn: Any, *args: Any) -> tuple[bool, str | None, Any]:
    try:
        return True, None, fn(*args)
    except errors.VoucherError as exc:
        return False, exc.code, exc.message


@st.composite
def shop_setups(draw: st.DrawFn) -> tuple[list[Campaign], list[tuple[str, str]]]:
    """A unique-code campaign, a shared-code campaign and a gift card, all carrying the same
    rules; each with two codes of its own for the two paths that spend one."""
    rules = draw(rule_sets())
    discount = draw(discounts())
    min_order = draw(st.sampled_from([0, 0, 0, 1000]))
    if rules is not None and rules.min_order is not None and min_order:
        rules = msgspec.structs.replace(rules, min_order=None)
    unique = make_campaign("uniq", discount, rules, min_order=min_order)
    shared = make_campaign("shared", discount, rules, type="shared_code", min_order=min_order,
                           shared_code="SHARED-1")
    gift = make_campaign("gift", None, rules, type="gift_card", min_order=min_order,
                         gift_balance=draw(st.integers(1, 20000)))
    return [unique, shared, gift], [("U-1", "U-2"), ("SHARED-1", "SHARED-1"), ("G-1", "G-2")]


@SETTINGS
@given(setup=shop_setups(), order=orders(), tags=TAG_SETS,
       currency=st.sampled_from(["EUR", "EUR", "EUR", "USD"]), customer=st.sampled_from([None, "cust-1"]))
def test_every_path_decides_the_same(
    setup: tuple[list[Campaign], list[tuple[str, str]]],
    order: Order,
    tags: tuple[str, ...] | None,
    currency: str,
    customer: str | None,
) -> None:
    """Validation, redemption and a hold confirmed after the shard restarted from its rows
    give one verdict, one reason and one discount with one explanation. (A known customer
    without tags, on a campaign with customer rules, is answered customer_tags_needed on
    every path: the gateway asks again with the stored tags.)"""
    campaigns_, codes = setup
    shop = Shop()
    for c, (first, second) in zip(campaigns_, codes, strict=True):
        shop.install(c, [first, second] if not c.is_shared else None)
    answers = []
    for first, second in codes:
        valid_v, err_v, validation = attempt(
            shop.state.validate, request(first, order, tags, currency, customer)
        )
        if valid_v:
            err_v = validation.error
            valid_v = validation.valid
            message = validation.message
        else:
            message, validation = validation, None
        redeemed = attempt(shop.state.redeem, request(first, order, tags, currency, customer))
        held_ = attempt(shop.state.reserve, request(second, order, tags, currency, customer))
        answers.append(((valid_v, err_v, message, validation), redeemed, held_))
    # the holds are confirmed by a shard rebuilt from the rows: the cart went with them
    shop.restart()
    for c, answer in zip(campaigns_, answers, strict=True):
        (ok_v, err_v, message, validation), (ok_r, err_r, red), (ok_h, err_h, held) = answer
        ok_c, err_c, confirmed = (ok_h, err_h, held)
        if ok_h:
            ok_c, err_c, confirmed = attempt(shop.state.confirm, held.id)
            assert ok_c, (c.id, err_c, confirmed)
        event(f"{c.type}: {err_v or 'valid'}")
        # the same verdict and the same reason on every path
        assert ok_v == ok_r == ok_h, (c.id, err_v, err_r, err_h)
        assert err_v == err_r == err_h, (c.id, message, red, held)
        if not ok_v:
            assert message == red == held
            continue
        # the same discount and explanation on every path
        amounts = {validation.discount_amount, red.discount_amount, held.discount_amount,
                   confirmed.discount_amount}
        assert len(amounts) == 1, (c.id, validation, red, held, confirmed)
        details = {validation.detail, red.detail, held.detail, confirmed.detail}
        assert len(details) == 1, (c.id, details)
        has_cart = bool(order.items) or order.shipping is not None
        assert (validation.detail is not None) == has_cart
        # and what pricing says, with the balance the card had before it was spent
        balance = c.gift_balance if c.is_gift_card else None
        p = price(c, order, tags, balance)
        assert validation.discount_amount == p.discount
        if has_cart:
            assert validation.detail == detail_json(p)
        if c.is_gift_card:
            assert red.balance_after == confirmed.balance_after == (c.gift_balance or 0) - p.discount


@SETTINGS
@given(setup=shop_setups(), order=orders(), tags=TAG_SETS,
       currency=st.sampled_from(["EUR", "EUR", "EUR", "USD"]), used=st.booleans())
def test_qualification_decides_as_validation_does(
    setup: tuple[list[Campaign], list[tuple[str, str]]],
    order: Order,
    tags: tuple[str, ...] | None,
    currency: str,
    used: bool,
) -> None:
    """For the customer's own codes and the shared code, a qualification offers exactly
    what a validation of that code accepts, with the same discount and explanation, and
    refuses the others for the reason the validation gives (a shared code the customer
    already used included)."""
    from engine.qualification import QualifyRequest, explain

    campaigns_, codes = setup
    shop = Shop()
    customer = "cust-1"
    mine: dict[str, str] = {}
    for c, (first, _) in zip(campaigns_, codes, strict=True):
        shop.install(c, [first] if not c.is_shared else None)
        mine[c.id] = first if c.is_shared else shop.state.assign(c.id, customer).code
    if used:  # the shared code's per-customer limit, once reached, refuses on both paths
        shared = next(c for c in campaigns_ if c.is_shared)
        shop.install(msgspec.structs.replace(shared, limits=msgspec.structs.replace(
            shared.limits, per_customer=1), version=shared.version + 1))
        attempt(shop.state.redeem, request(mine[shared.id], order, tags, currency, customer))
    ordered = Order(order.amount, currency, order.shipping, order.items)
    offers, refused = explain(shop.state, QualifyRequest(customer, ordered, tags))
    offered = {o.campaign_id: o for o in offers}
    for c in campaigns_:
        ok, err, v = attempt(shop.state.validate, request(mine[c.id], order, tags, currency, customer))
        if ok and not v.valid:
            ok, err = False, v.error
        event(f"qualification, {c.type}: {err or 'offered'}")
        if not ok:
            assert c.id not in offered and refused.get(c.id) == err, (c.id, err, refused, offered)
            continue
        if v.discount_amount == 0:
            assert refused.get(c.id) == "no_discount"
            continue
        o = offered[c.id]
        assert (o.code, o.discount_amount, o.shipping_discount) == (mine[c.id], v.discount_amount,
                                                                     json.loads(v.detail)["shipping_discount"] if v.detail else 0)
        if v.detail is not None:
            assert [[ln.line, ln.sku, ln.discount] for ln in o.items] == [
                [d["line"], d["sku"], d["discount"]] for d in json.loads(v.detail)["items"]]
