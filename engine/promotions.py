"""Automatic promotions: campaigns of type ``promotion`` with rules and no code, applied to
every qualifying order whose checkout asks for them (``apply_promotions``).

A promotion is decided like a shared code, by the shard owning its key (``~`` and the
campaign id, a string no code can be: codes never hold ``~``), so its limits and windows
hold as every campaign's do, and its redemptions are records like any other.

Stacking: every discount of one order is computed on the list prices, and they add up;
one given after others (a promotion after the code, a promotion after another) gets at
most what is left of each line and of shipping (:func:`stack`), so no line and no total
ever goes below zero. The code comes first, then the promotions, best first
(:func:`candidates`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import msgspec

from engine import errors
from engine.campaigns import PROMOTION_PREFIX, Campaign, check_redeemable_now, pricing_for
from engine.orders import Order
from engine.pricing import Line, Pricing

PREFIX = PROMOTION_PREFIX


def key_of(campaign_id: str) -> str:
    """The promotion's key on its shard (where a shared code's code would be)."""
    return PREFIX + campaign_id


def is_key(code: str) -> bool:
    return code[:1] == PREFIX


class Taken(msgspec.Struct, frozen=True, array_like=True):
    """What discounts given before took of an order: per line, of shipping, and of the
    amount of an order without lines."""

    lines: tuple[int, ...] = ()
    shipping: int = 0
    amount: int = 0


def stack(p: Pricing, order: Order, taken: Taken | None) -> Pricing:
    """``p`` cut to what ``taken`` left of each line and of shipping."""
    if taken is None:
        return p
    ship_room = max(0, (order.shipping or 0) - taken.shipping)
    ship = min(p.shipping_discount, ship_room)
    if not order.items:
        goods = min(p.discount - p.shipping_discount, max(0, order.amount - taken.amount))
        return Pricing(goods + ship, (), ship)
    items = order.items
    lines = []
    for ln in p.items:
        before = taken.lines[ln.line] if ln.line < len(taken.lines) else 0
        d = min(ln.discount, max(0, items[ln.line].total - before))
        if d > 0:
            lines.append(Line(ln.line, ln.sku, d))
    return Pricing(sum(ln.discount for ln in lines) + ship, tuple(lines), ship)


def add(taken: Taken | None, p: Pricing, order: Order) -> Taken:
    """``taken`` with ``p`` given too."""
    t = taken or Taken(lines=(0,) * len(order.items))
    lines = list(t.lines) if t.lines else [0] * len(order.items)
    for ln in p.items:
        lines[ln.line] += ln.discount
    return Taken(tuple(lines), t.shipping + p.shipping_discount, t.amount + p.discount - p.shipping_discount)


def explained_pricing(discount: int, detail: str | None) -> Pricing:
    """A decision's pricing from its answer: ``discount_amount`` and its ``detail``
    (engine.pricing.detail_json)."""
    if detail is None:
        return Pricing(discount)
    d: dict[str, Any] = msgspec.json.decode(detail)
    lines = tuple(Line(ln["line"], ln["sku"], ln["discount"]) for ln in d["items"])
    return Pricing(discount, lines, d["shipping_discount"])


def candidates(
    promotions: Iterable[Campaign],
    order: Order,
    tags: Sequence[str] | None,
    taken: Taken | None,
    now: datetime,
) -> list[tuple[Campaign, Pricing]]:
    """The promotions that would apply to ``order`` now on what ``taken`` left, each with
    its discount, best first (ties by campaign id). Their shards decide for good (limits
    and per-customer use live there); this only chooses whom to ask, and in what order."""
    out: list[tuple[Campaign, Pricing]] = []
    for c in promotions:
        if c.type != "promotion" or c.currency != order.currency:
            continue
        try:
            check_redeemable_now(c, now)
            p = stack(pricing_for(c, order, tags), order, taken)
        except errors.VoucherError:
            continue
        if p.discount > 0:
            out.append((c, p))
    out.sort(key=lambda cp: (-cp[1].discount, cp[0].id))
    return out
