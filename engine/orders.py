"""An order as checkout describes it: a currency, a subtotal, optional shipping and
optional line items, all amounts integers in minor units.

An order with items has ``amount`` equal to their subtotal (given or derived); an order
without items is the amount-only order every campaign has always taken. :func:`build` is
the one place an order is checked, on every path that takes one (the gateway's checkout,
reservations, qualification), so bad input is refused before any shard sees it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import msgspec

from engine import errors
from engine.currencies import check_currency

MAX_AMOUNT = 10**12  # minor units; far above any real order, keeps sums in int64
MAX_ITEMS = 500
MAX_QUANTITY = 1_000_000
MAX_CATEGORIES = 20
MAX_TAGS = 50
_TEXT_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,128}\Z")


class Item(msgspec.Struct, frozen=True, array_like=True):
    """One line: ``quantity`` units of ``sku`` at ``unit_price`` each. Array-like, so a
    10-line order crosses the actor boundary as ten short msgpack arrays."""

    sku: str
    quantity: int
    unit_price: int
    product_id: str | None = None
    categories: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return self.quantity * self.unit_price


class Order(msgspec.Struct, frozen=True):
    """What the pricing rules see: the subtotal, shipping (``None``: not given) and lines."""

    amount: int
    currency: str
    shipping: int | None = None
    items: tuple[Item, ...] = ()


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _TEXT_RE.match(value):
        raise errors.InvalidOrder(f"{field} must be 1-128 characters without control characters")
    return value


def _amount(value: Any, field: str, *, positive: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.InvalidOrder(f"{field} must be an integer in minor units")
    if value < 0:
        raise errors.InvalidOrder(f"{field} must not be negative, got {value}")
    if positive and value == 0:
        raise errors.InvalidOrder(f"{field} must be positive")
    if value > MAX_AMOUNT:
        raise errors.InvalidOrder(f"{field} is larger than {MAX_AMOUNT}")
    return value


def check_item(item: Item, i: int) -> Item:
    """One line, checked: names are text, quantity 1..10^6, unit price 0..10^12."""
    f = f"order.items[{i}]"
    _text(item.sku, f"{f}.sku")
    if item.product_id is not None:
        _text(item.product_id, f"{f}.product_id")
    q = item.quantity
    if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= MAX_QUANTITY:
        raise errors.InvalidOrder(f"{f}.quantity must be an integer from 1 to {MAX_QUANTITY}, got {q!r}")
    _amount(item.unit_price, f"{f}.unit_price")
    if len(item.categories) > MAX_CATEGORIES:
        raise errors.InvalidOrder(f"{f}.categories holds at most {MAX_CATEGORIES} names")
    for j, cat in enumerate(item.categories):
        _text(cat, f"{f}.categories[{j}]")
    return item


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _plainly_valid(items: Sequence[Item]) -> bool:
    """Whether every line passes :func:`check_item`, checked in one pass over all the
    names (one regular-expression search instead of one per name: a 10-line cart is the
    checkout's hot path). False only sends the lines through :func:`check_item`, which
    names the field that is wrong."""
    names: list[str] = []
    for it in items:
        q, p = it.quantity, it.unit_price
        if type(q) is not int or type(p) is not int or not 1 <= q <= MAX_QUANTITY or not 0 <= p <= MAX_AMOUNT:
            return False
        if len(it.categories) > MAX_CATEGORIES:
            return False
        names.append(it.sku)
        if it.product_id is not None:
            names.append(it.product_id)
        names.extend(it.categories)
    for n in names:
        if type(n) is not str or not 0 < len(n) <= 128:
            return False
    return _CONTROL.search("".join(names)) is None


def build(
    *,
    currency: str,
    amount: int | None = None,
    shipping: int | None = None,
    items: Sequence[Item] | None = None,
) -> Order:
    """The order checkout sent, checked. With items, ``amount`` is their subtotal; a given
    ``amount`` must agree with it. Raises :class:`errors.InvalidOrder` (or
    :class:`errors.OrderAmountMismatch`, :class:`errors.UnknownCurrency`) naming the field."""
    check_currency(currency, "order.currency")
    if shipping is not None:
        _amount(shipping, "order.shipping")
    lines: tuple[Item, ...] = ()
    if items:
        if len(items) > MAX_ITEMS:
            raise errors.InvalidOrder(f"order.items holds at most {MAX_ITEMS} lines")
        lines = tuple(items) if _plainly_valid(items) else tuple(check_item(it, i) for i, it in enumerate(items))
        subtotal = sum(it.total for it in lines)
        if subtotal > MAX_AMOUNT:
            raise errors.InvalidOrder(f"the items' subtotal is larger than {MAX_AMOUNT}")
        if amount is not None and amount != subtotal:
            raise errors.OrderAmountMismatch(
                f"order.amount {amount} does not match the items' subtotal {subtotal}"
            )
        amount = subtotal
    elif amount is None:
        raise errors.InvalidOrder("the order needs an amount or items")
    _amount(amount, "order.amount")
    return Order(amount=amount, currency=currency, shipping=shipping, items=lines)


def check_tags(tags: Sequence[str] | None, field: str = "customer_tags") -> tuple[str, ...] | None:
    """Customer tags as a caller sends them: at most 50 names of 1-128 characters."""
    if tags is None:
        return None
    if len(tags) > MAX_TAGS:
        raise errors.InvalidOrder(f"{field} holds at most {MAX_TAGS} tags")
    for i, t in enumerate(tags):
        _text(t, f"{field}[{i}]")
    return tuple(tags)
