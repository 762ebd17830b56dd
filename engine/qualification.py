"""Qualification: every offer one shard would apply now to a customer's order, each with
the discount it gives, best first.

Pure and read-only (beyond expiring holds past their TTL, as every decision does): it
reads the shard's campaign slots and decides each candidate with the rules a redemption
applies, in the same order (:meth:`engine.shard_state.ShardState._check`): the campaign's
state, start, end and sale windows (:func:`engine.campaigns.check_redeemable_now`), the
code's own switch and window (:func:`engine.code_control.check_control`), the order's
currency and minimum (:func:`engine.campaigns.check_order`), the customer's tags for a
campaign with customer rules (none given: ``customer_tags_needed``, and the answer says so,
:attr:`Qualified.tags_needed`, for the gateway to ask again with the stored ones), the limits (a shared code's
total with its open holds, its per-customer uses with theirs), the code's status (not
redeemed, void or held; assigned to this customer; a gift card's balance left), then the
price (:func:`engine.pricing.price`: rules, lines, shipping). So an offer is exactly what a
redemption of it would give at that instant.

Candidates come from the shard's indexes, not from a walk of every campaign
(:func:`candidates`): the shared codes and promotion keys this shard holds
(:attr:`engine.shard_state.ShardState.keyed`) and the codes it gave this customer
(:meth:`engine.shard_state.ShardState.codes_of`: every one, several of one campaign
included), each of an active campaign. How each is checked goes by campaign type
(:data:`CANDIDATES`):

* ``shared_code`` and ``flash_sale``: the campaign's one code, on the shard owning its
  bucket (the only shard that holds it, so each is offered once).
* ``discount`` and ``gift_card``: a code the customer was given, on the shard owning
  that code (a foreign record of the assignment on another shard is not a code there).
  Gift cards come with their balance.
* ``promotion``: an automatic campaign without a code, decided like a shared code under
  its key on the shard owning that key, offered with ``kind="promotion"`` and no code.

A campaign type joins qualification as one more entry of :data:`CANDIDATES`: a function
from the shard, the campaign slot, the code and the request's :class:`Context` to the
:class:`Candidate` it makes (raising why it makes none); pricing is common. Each offer is
priced on its own, on the order's list prices (checkout stacks a promotion after a code:
it then gets at most what the code left, :func:`engine.promotions.stack`).

Cost per shard: O(candidates here), not O(campaigns). Without a ``limit``, every
candidate is checked and priced, one pricing of the order per candidate shape
(:class:`Context`: campaigns with the same discount and rules share one). With a
``limit``, candidates are taken by a cheap upper bound of their discount
(:meth:`Context.bound`), and only those whose bound can still reach the best ``limit``
found so far are checked and priced.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, Literal

import msgspec

from engine import errors
from engine.campaigns import Campaign, check_order, check_redeemable_now
from engine.code_control import check_control
from engine.orders import Order
from engine.pricing import Line, Pricing, price
from engine.shard_state import CampaignSlot, ShardState

OfferKind = Literal["shared_code", "unique_code", "promotion"]
MAX_OFFERS = 1000  # the most one answer lists
DEFAULT_OFFERS = 20  # what an answer lists when the caller names no limit


class QualifyRequest(msgspec.Struct, frozen=True):
    """What a shard is asked: the customer, their order (checked by
    :func:`engine.orders.build` at the edge), their tags for customer rules, and at most
    how many offers to answer (the best ``limit``; all when None)."""

    customer_id: str
    order: Order
    tags: tuple[str, ...] | None = None
    limit: int | None = None


class Offer(msgspec.Struct, frozen=True, gc=False):
    """One offer: the code to send at checkout (``None`` for a campaign without codes),
    what it takes off (``discount_amount``: the lines' part plus ``shipping_discount``),
    how it falls on the order's lines, and a gift card's balance. Like
    :class:`engine.pricing.Line`, not tracked by the garbage collector (no cycle can pass
    through it), nor is :class:`Candidate`."""

    kind: str
    campaign_id: str
    campaign_name: str
    campaign_type: str
    code: str | None
    discount_amount: int
    items: tuple[Line, ...] = ()
    shipping_discount: int = 0
    balance: int | None = None


class Qualified(msgspec.Struct, frozen=True):
    """A shard's (or the merged) answer: the offers, best first, and whether a campaign
    with customer rules was left out because the request carried no tags."""

    offers: list[Offer]
    tags_needed: bool = False


class Candidate(msgspec.Struct, frozen=True, gc=False):
    """A code that passed every check but the price: what :func:`explain` prices."""

    kind: str
    slot: CampaignSlot
    code: str | None
    balance: int | None = None


class Context:
    """One request as the candidates see it: the request, the shard's clock reading, and
    the prices computed for it so far. A price depends only on the campaign's discount and
    rules (and a gift card's balance), so campaigns of the same shape (every "10% off"
    without rules, say) share one pricing of the order."""

    __slots__ = ("req", "now", "_prices", "priced", "_top_unit", "_units")

    def __init__(self, req: QualifyRequest, now: datetime) -> None:
        self.req = req
        self.now = now
        self._prices: dict[tuple[Any, Any, int | None], Pricing | tuple[type[errors.VoucherError], str]] = {}
        self.priced = 0  # prices computed (the rest came from the memo)
        items = req.order.items
        self._top_unit = max((it.unit_price for it in items), default=0)
        self._units = sum(it.quantity for it in items)

    def price(self, c: Campaign, balance: int | None = None) -> Pricing:
        """:func:`engine.pricing.price` of the request's order for ``c``, or its error.

        A refusal is remembered as its class and message and raised afresh each time: an
        exception kept in the memo would hold, through its traceback, the frames that hold
        the memo, a reference cycle per request left for the garbage collector."""
        key = (c.discount, c.rules, balance)
        hit = self._prices.get(key)
        if hit is None:
            self.priced += 1
            try:
                hit = price(c, self.req.order, self.req.tags, balance)
            except errors.VoucherError as exc:
                hit = (type(exc), exc.message)
            self._prices[key] = hit
        if isinstance(hit, tuple):
            raise hit[0](hit[1])
        return hit

    def bound(self, c: Campaign, balance: int | None) -> int:
        """At least the discount :meth:`price` can give (cheap, from the discount's kind
        and the order's totals): a candidate whose bound cannot reach the offers found so
        far is never checked nor priced when only the best ``limit`` are asked for.
        ``balance``: a gift card's balance left (``None`` reads as none)."""
        order = self.req.order
        amount = order.amount
        d = c.discount
        if d is None:  # a gift card: its balance, on at most the subtotal
            return min(balance or 0, amount)
        if d.target == "shipping" or d.kind == "free_shipping":
            top = order.shipping or 0
        elif d.kind == "free_units":
            top = min(amount, d.value * self._top_unit)
        elif d.kind == "percent":
            top = amount * d.value // 100
        elif d.kind == "amount" and d.target == "order":
            top = min(d.value, amount)
        elif d.kind == "amount" and d.target == "items":
            top = min(d.value * self._units, amount)
        else:  # amount off the cheapest item, a fixed price: never more than the order
            top = min(d.value, amount) if d.kind == "amount" else amount
        return top if d.max is None else min(top, d.max)


Check = Callable[[ShardState, CampaignSlot, str, Context], Candidate]


def _check_tags(slot: CampaignSlot, req: QualifyRequest) -> None:
    c = slot.campaign
    if req.tags is None and c.rules is not None and c.rules.customer is not None:
        raise errors.TagsNeeded(f"campaign {c.id} has customer rules: the customer's tags are needed")


def _check_common(state: ShardState, slot: CampaignSlot, code: str, ctx: Context) -> None:
    """The campaign's state and windows, the code's switch, the order, the tags."""
    c = slot.campaign
    check_redeemable_now(c, ctx.now)
    ctl = state.controls.get(code) if state.controls else None
    if ctl is not None:
        check_control(code, ctl, ctx.now)
    check_order(c, ctx.req.order)
    _check_tags(slot, ctx.req)


def shared_code(state: ShardState, slot: CampaignSlot, code: str, ctx: Context) -> Candidate:
    """The campaign's shared code (this shard holds it), when every check but the price
    passes."""
    _check_common(state, slot, code, ctx)
    state.check_shared_limits(code, slot, ctx.req.customer_id)
    return Candidate("shared_code", slot, code)


def assigned_code(state: ShardState, slot: CampaignSlot, code: str, ctx: Context) -> Candidate:
    """A unique code of this shard given to the customer, when every check but the price
    passes (gift cards: with the balance left)."""
    _check_common(state, slot, code, ctx)
    balance = state.check_unique(code, slot, state.codes[code] & 3, ctx.req.customer_id)
    return Candidate("unique_code", slot, code, balance)


def promotion(state: ShardState, slot: CampaignSlot, code: str, ctx: Context) -> Candidate:
    """An automatic promotion: decided like a shared code, under its key
    (:mod:`engine.promotions`), on the shard owning that key; offered without a code."""
    shared_code(state, slot, code, ctx)
    return Candidate("promotion", slot, None)


CANDIDATES: dict[str, Check] = {
    "shared_code": shared_code,
    "flash_sale": shared_code,
    "discount": assigned_code,
    "gift_card": assigned_code,
    "promotion": promotion,
}
"""Campaign type -> how a code of that type is checked (a type not listed is never
offered). Each raises the engine error a redemption would give, for a code that does not
apply now; :func:`explain` keeps those reasons, :func:`qualify` drops them. A candidate is
priced by :meth:`Context.price`, the same for every type."""


def best_first(offers: Iterable[Offer], limit: int | None = None) -> list[Offer]:
    """Largest discount first; ties by campaign id, then code. The best ``limit``."""
    ranked = sorted(offers, key=lambda o: (-o.discount_amount, o.campaign_id, o.code or ""))
    return ranked if limit is None else ranked[:limit]


def _rank(o: Offer) -> tuple[int, str, str]:
    return (-o.discount_amount, o.campaign_id, o.code or "")


def candidates(state: ShardState, customer_id: str) -> tuple[list[CampaignSlot], list[str]]:
    """What may be offered on this shard, as two parallel lists, slots and codes: the
    shared codes and promotion keys it holds, then the codes it gave ``customer_id``; only
    of active campaigns of a type :data:`CANDIDATES` lists. Read from the shard's indexes
    (:attr:`ShardState.keyed`, :meth:`ShardState.codes_of`), not from every campaign.
    (Two lists rather than a list of pairs: hundreds of pairs per request would be young
    objects for the garbage collector to walk.)"""
    slots: list[CampaignSlot] = []
    codes: list[str] = []
    for slot in state.keyed:
        c = slot.campaign
        if c.state == "active" and c.type in CANDIDATES and c.shared_code is not None:
            slots.append(slot)
            codes.append(c.shared_code)
    for code in state.codes_of(customer_id):
        slot = state.slot_of(code)
        c = slot.campaign
        if c.state == "active" and c.type in CANDIDATES and slot.assigned_to.get(code) == customer_id:
            slots.append(slot)
            codes.append(code)
    return slots, codes


def explain(state: ShardState, req: QualifyRequest) -> tuple[list[Offer], dict[str, str]]:
    """This shard's offers for ``req`` (every one, or at least the best ``req.limit``;
    unsorted), and, per campaign whose candidate here was checked and does not apply, the
    error code a redemption would give.

    With a limit, the candidates are taken in the order of their :meth:`Context.bound`
    (cheap, from the campaign and the order's totals), each checked and priced in turn,
    and the walk stops once no bound left can reach the ``limit``-th best offer found: the
    checks and prices of candidates that cannot make the list are never paid. So a
    campaign that needs the customer's tags is reported (``customer_tags_needed``) only
    when it could have made the list."""
    state.expire_reservations()  # a hold past its TTL holds nothing
    ctx = Context(req, state.clock())
    refused: dict[str, str] = {}
    slots, codes = candidates(state, req.customer_id)
    limit = req.limit
    if limit is not None and len(slots) > limit:
        bound = ctx.bound
        bounds = [bound(slot.campaign, slot.balances.get(code)) for slot, code in zip(slots, codes)]
        order = sorted(range(len(slots)), key=bounds.__getitem__, reverse=True)
    else:
        limit, bounds, order = None, [], list(range(len(slots)))
    offers: list[Offer] = []
    top: list[tuple[int, str, str]] = []  # ranks of the best `limit` so far, sorted
    for i in order:
        if limit is not None and len(top) == limit and bounds[i] < -top[-1][0]:
            break  # sorted by bound: nothing left can enter the best `limit`
        slot, code = slots[i], codes[i]
        c = slot.campaign
        try:
            p = CANDIDATES[c.type](state, slot, code, ctx)
            pr = ctx.price(c, p.balance)
        except errors.VoucherError as exc:
            refused[c.id] = exc.code
            continue
        if pr.discount <= 0:
            refused[c.id] = "no_discount"
            continue
        o = Offer(p.kind, c.id, c.name, c.type, p.code, pr.discount, pr.items, pr.shipping_discount, p.balance)
        offers.append(o)
        if limit is not None:
            bisect.insort(top, _rank(o))
            del top[limit:]
    return offers, refused


def qualify(
    state: ShardState,
    customer_id: str,
    order: Order,
    tags: Sequence[str] | None = None,
    limit: int | None = None,
) -> list[Offer]:
    """Every offer this shard would apply now to ``customer_id``'s ``order``, best first
    (see :func:`best_first`); an offer that takes nothing off is left out."""
    req = QualifyRequest(customer_id, order, tuple(tags) if tags is not None else None, limit)
    return best_first(explain(state, req)[0], limit)


def qualify_request(state: ShardState, req: QualifyRequest) -> Qualified:
    """:func:`qualify` for a request as the shard actor receives it, saying whether tags
    were needed."""
    offers, refused = explain(state, req)
    needed = errors.TagsNeeded.code in refused.values()
    return Qualified(best_first(offers, req.limit), needed)


def merge(parts: Iterable[Qualified], limit: int | None = None) -> Qualified:
    """The shards' answers as one, best first; an offer answered twice (a shard answering
    during a topology change) counts once."""
    seen: set[tuple[str, str | None]] = set()
    out: list[Offer] = []
    needed = False
    for part in parts:
        needed = needed or part.tags_needed
        for o in part.offers:
            key = (o.campaign_id, o.code)
            if key not in seen:
                seen.add(key)
                out.append(o)
    return Qualified(best_first(out, limit), needed)
