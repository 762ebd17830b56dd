"""What a campaign takes off an order, and from which lines: the kinds (``percent``,
``amount``, ``fixed_price``, ``free_units``, ``free_shipping``) on their targets
(``order``, ``items``, ``cheapest_item``, ``shipping``), capped by ``max``.

:func:`price` is the one decision every path takes (validation, reservation, redemption,
qualification): it evaluates the campaign's rules (:mod:`engine.rules`), then prices the
eligible lines. Its answer explains itself: the discount, how it falls on the lines (the
line discounts sum to the items' part, each between zero and its line's total) and the
shipping part. All arithmetic is on integers; a split of an amount over lines goes by
largest remainder, ties to the earlier line, so the same order always splits the same way.

Meanings, per target:

* ``order``: the eligible subtotal (every line not excluded; the amount of an order
  without lines). ``percent`` of it, ``amount`` off it, ``fixed_price``: the eligible
  lines cost ``value`` together. Spread over the eligible lines by their totals. An order
  whose every line is excluded is refused (so is a gift card's), as on the item targets.
* ``items``: each matching line (eligible and matching an item condition's ``any_of``;
  every eligible line when none names items). ``percent`` of each line, ``amount`` off
  each unit, ``fixed_price``: each unit costs ``value``.
* ``cheapest_item``: the one cheapest matching unit, priced as for ``items``.
* ``shipping``: the order's shipping; ``free_shipping`` takes all of it.
* ``free_units`` (on ``order``, ``items`` or ``cheapest_item``): the ``value`` cheapest
  matching units are free; with ``sku``, units of that sku (excluded ones never).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from engine import errors
from engine.orders import Item, Order
from engine.rules import eligible, eligible_subtotal, evaluate, matching

if TYPE_CHECKING:
    from engine.campaigns import Campaign, Discount


class Line(msgspec.Struct, frozen=True, gc=False):
    """The discount on one line of the order (``line``: its index in ``order.items``),
    encoded as the API writes it, ``{"line", "sku", "discount"}`` (a qualification's offer
    goes from its shard to the client as JSON written once, on the shard).
    Not tracked by the garbage collector (``gc=False``), nor is :class:`Pricing`: they hold
    no container that could close a cycle, and a qualification makes hundreds of them."""

    line: int
    sku: str
    discount: int


class Pricing(msgspec.Struct, frozen=True, gc=False):
    """``discount`` is the whole discount: the lines' discounts plus ``shipping_discount``
    (an order without lines has no line discounts: its discount is on the amount)."""

    discount: int
    items: tuple[Line, ...] = ()
    shipping_discount: int = 0


def spread(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` over ``weights`` in proportion, by largest remainder (ties to the
    earlier weight). Each share is at most its weight when ``total <= sum(weights)``."""
    whole = sum(weights)
    if whole <= 0 or total <= 0:
        return [0] * len(weights)
    shares = [total * w // whole for w in weights]
    left = total - sum(shares)
    if left:
        order = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
        for i in order[:left]:
            shares[i] += 1
    return shares


_ON_AMOUNT = frozenset(("percent", "amount", "fixed_price"))


def _one(kind: str, value: int, base: int) -> int:
    """``percent``/``amount``/``fixed_price`` of one base amount (a unit, a line, a total)."""
    if kind == "percent":
        return base * value // 100
    if kind == "amount":
        return min(value, base)
    return max(0, base - value)  # fixed_price


def _free_units(order: Order, lines: Sequence[int], n: int) -> dict[int, int]:
    """The ``n`` cheapest units among ``lines``: line index -> their discount."""
    items = order.items
    out: dict[int, int] = {}
    for i in sorted(lines, key=lambda i: (items[i].unit_price, i)):
        if n <= 0:
            break
        take = min(n, items[i].quantity)
        if take and items[i].unit_price:
            out[i] = take * items[i].unit_price
        n -= take
    return out


def _cap(per_line: dict[int, int], cap: int | None) -> dict[int, int]:
    total = sum(per_line.values())
    if cap is None or total <= cap:
        return per_line
    keys = sorted(per_line)
    shares = spread(cap, [per_line[k] for k in keys])
    return dict(zip(keys, shares, strict=True))


def _result(order: Order, per_line: dict[int, int], shipping: int = 0) -> Pricing:
    items = order.items
    lines = tuple(Line(i, items[i].sku, d) for i, d in sorted(per_line.items()) if d > 0)
    return Pricing(sum(ln.discount for ln in lines) + shipping, lines, shipping)


def _needs_items(order: Order, what: str) -> None:
    if not order.items:
        raise errors.RuleNotMet(f"discounts {what}: the order lists no items")


def price(campaign: Campaign, order: Order, tags: Sequence[str] | None = None, balance: int | None = None) -> Pricing:
    """The discount ``campaign`` gives ``order`` (gift cards: what ``balance`` covers of the
    eligible subtotal), or :class:`errors.RuleNotMet` naming the first failed rule."""
    rules = campaign.rules
    d = campaign.discount
    if rules is None and not order.items and order.shipping is None:
        # An amount-only order on a campaign without rules (most checkouts): the general
        # path below gives the same, with no lines to look at.
        if d is None:
            return Pricing(min(balance or 0, order.amount))
        if d.target == "order" and d.kind in _ON_AMOUNT:
            value = _one(d.kind, d.value, order.amount)
            if d.max is not None:
                value = min(value, d.max)
            return Pricing(min(value, order.amount))
    lines = eligible(rules, order)
    if rules is not None:
        evaluate(rules, order, tags, lines)
    if d is None:  # a gift card
        base = eligible_subtotal(order, lines)
        covered = min(balance or 0, base)
        return _spread_over(order, lines, covered)
    if d.target == "shipping" or d.kind == "free_shipping":
        return _shipping(d, order)
    if d.kind == "free_units":
        _needs_items(order, "items")
        if d.sku is None:
            pool = matching(rules, order, lines)
        else:
            pool = [i for i in lines if order.items[i].sku == d.sku]
        if not pool:
            raise errors.RuleNotMet(_no_match(d.sku))
        return _result(order, _cap(_free_units(order, pool, d.value), d.max))
    if d.target == "order":
        base = eligible_subtotal(order, lines)
        value = _one(d.kind, d.value, base)
        if d.max is not None:
            value = min(value, d.max)
        return _spread_over(order, lines, min(value, base))
    _needs_items(order, "items")
    pool = matching(rules, order, lines)
    if not pool:
        raise errors.RuleNotMet(_no_match(None))
    items = order.items
    per_line: dict[int, int] = {}
    if d.target == "cheapest_item":
        i = min(pool, key=lambda i: (items[i].unit_price, i))
        per_line[i] = _one(d.kind, d.value, items[i].unit_price)
    elif d.kind == "percent":
        for i in pool:
            per_line[i] = items[i].total * d.value // 100
    else:  # amount or fixed_price, per unit
        for i in pool:
            per_line[i] = _one(d.kind, d.value, items[i].unit_price) * items[i].quantity
    return _result(order, _cap(per_line, d.max))


def _no_match(sku: str | None) -> str:
    if sku is not None:
        return f"needs an item of sku {sku} to give free, the order has none that counts"
    return "no item of the order is one this campaign discounts"


def _spread_over(order: Order, lines: Sequence[int], value: int) -> Pricing:
    if not order.items:
        return Pricing(value)
    if not lines:  # every line excluded: refused as on the item targets, not a 0 discount
        raise errors.RuleNotMet(_no_match(None))
    items = order.items
    shares = spread(value, [items[i].total for i in lines])
    return _result(order, dict(zip(lines, shares, strict=True)))


def _shipping(d: Discount, order: Order) -> Pricing:
    ship = order.shipping or 0
    if ship <= 0:
        raise errors.RuleNotMet("discounts shipping: the order has no shipping to discount")
    value = ship if d.kind == "free_shipping" else _one(d.kind, d.value, ship)
    if d.max is not None:
        value = min(value, d.max)
    return Pricing(value, (), value)


_encoder = msgspec.json.Encoder()


def detail_json(p: Pricing) -> str:
    """The explanation a redemption keeps: ``{"items": [{"line", "sku", "discount"}],
    "shipping_discount"}`` as compact JSON."""
    items = [{"line": ln.line, "sku": ln.sku, "discount": ln.discount} for ln in p.items]
    return _encoder.encode({"items": items, "shipping_discount": p.shipping_discount}).decode()


class Cart(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a reservation keeps of its order beyond the amount, for its confirm."""

    shipping: int | None = None
    items: tuple[Item, ...] | None = None
    tags: tuple[str, ...] | None = None


_cart_decoder = msgspec.json.Decoder(Cart)


def cart_json(shipping: int | None, items: tuple[Item, ...] | None, tags: tuple[str, ...] | None) -> str:
    return _encoder.encode(Cart(shipping, items, tags)).decode()


def read_cart(raw: str) -> Cart:
    return _cart_decoder.decode(raw)
