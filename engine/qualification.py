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
found so far are checked and priced. The keyed candidates, the same for every customer,
are kept by the shard between requests (:class:`KeyedIndex`, rebuilt when a campaign
changes), grouped so that they are read largest bound first without computing the
bound of each: a request touches the few it walks, not every shared code.

An answer crosses to the gateway as :class:`Ranked`: each offer's rank and its JSON as the
API writes it, so the gateway merges the shards' answers and writes its own without
decoding an offer. For the best ``limit`` of all, each shard is first asked for its
:func:`share` of it, and only a shard whose list was cut while its last offer still ranks
among the best is asked again for the whole (:func:`cut_short`): a shard checks and prices
fewer candidates (for the best 21 of 4 shards holding 1,000 campaigns: 17 checked and 11
priced instead of 24 and 13), and rarely twice.
"""

from __future__ import annotations

import bisect
import heapq
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, Literal

import msgspec

from engine import errors
from engine.campaigns import Campaign, Discount, check_order, check_redeemable_now
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
    more: bool = False  # with a limit: this shard may have offers beyond those listed


class Ranked(msgspec.Struct, frozen=True, array_like=True):
    """A shard's answer as it travels to the gateway, and the gateway's merge of them:
    per offer, best first, its rank (discount, campaign id, code or ``""``) and its JSON as
    the API writes it (:data:`offer_json`). So the gateway ranks the shards' offers and
    writes the answer without decoding an offer or encoding it again."""

    offers: list[tuple[int, str, str, bytes]]
    tags_needed: bool = False
    more: bool = False


_json = msgspec.json.Encoder()
offer_json = _json.encode  # an :class:`Offer` as the API writes it


def ranked(q: Qualified) -> Ranked:
    """``q`` as it travels: each offer's rank and JSON."""
    return Ranked(
        [(o.discount_amount, o.campaign_id, o.code or "", offer_json(o)) for o in q.offers],
        q.tags_needed,
        q.more,
    )


def merge_ranked(parts: Iterable[Ranked], limit: int | None = None) -> Ranked:
    """:func:`merge` of the shards' :class:`Ranked` answers."""
    seen: set[tuple[str, str]] = set()
    out: list[tuple[int, str, str, bytes]] = []
    needed = False
    for part in parts:
        needed = needed or part.tags_needed
        for o in part.offers:
            key = (o[1], o[2])
            if key not in seen:
                seen.add(key)
                out.append(o)
    out.sort(key=_key)
    return Ranked(out if limit is None else out[:limit], needed)


def share(limit: int, shards: int) -> int:
    """How many offers each of ``shards`` is first asked for when the best ``limit`` of all
    are wanted: twice an even share, and one more. Offers spread over the shards at
    random, one shard holds more than that of the best (and is asked again,
    :func:`cut_short`) for under 1 % of requests: the best 21 of 4 shards, 12 each."""
    return min(limit, -(-limit * 2 // shards) + 1)


def cut_short(parts: Sequence[Ranked], limit: int) -> list[int]:
    """The shards (indexes of ``parts``) whose answers may hide an offer of the best
    ``limit`` of all: those that have more than they listed (:attr:`Ranked.more`) and
    whose last listed offer ranks among the best ``limit`` of every part (or fewer than
    ``limit`` were listed in all). A shard's unlisted offers rank after its last listed
    one, so every other shard's answer holds all it has of the best ``limit``."""
    merged = merge_ranked(parts, limit).offers
    kth = _key(merged[limit - 1]) if len(merged) >= limit else None
    return [
        i for i, p in enumerate(parts)
        if p.more and (kth is None or not p.offers or _key(p.offers[-1]) < kth)
    ]


def _key(o: tuple[int, str, str, bytes]) -> tuple[int, str, str]:
    return (-o[0], o[1], o[2])


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

    __slots__ = ("req", "now", "_prices", "priced", "_amount", "_shipping", "_top_unit", "_units")

    def __init__(self, req: QualifyRequest, now: datetime) -> None:
        self.req = req
        self.now = now
        self._prices: dict[tuple[Any, Any, int | None], Pricing | tuple[type[errors.VoucherError], str]] = {}
        self.priced = 0  # prices computed (the rest came from the memo)
        order = req.order
        items = order.items
        self._amount = order.amount
        self._shipping = order.shipping or 0
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
        d = c.discount
        if d is None:  # a gift card: its balance, on at most the subtotal
            return min(balance or 0, self._amount)
        top = self.reach(family(d), d.value)
        return top if d.max is None else min(top, d.max)

    def reach(self, fam: int, value: int) -> int:
        """The bound of a discount of family ``fam`` and ``value`` before its cap: never
        less for a larger ``value`` (what :class:`KeyedIndex` relies on)."""
        amount = self._amount
        if fam == PERCENT:
            return amount * value // 100
        if fam == UP_TO_AMOUNT:
            return min(value, amount)
        if fam == PER_UNIT:
            return min(value * self._units, amount)
        if fam == UNITS:
            return min(amount, value * self._top_unit)
        if fam == SHIPPING:
            return self._shipping
        return amount  # WHOLE


# How a discount's bound grows with the order (:meth:`Context.reach`), by kind and target:
# shipping (whatever the kind), free units (on the dearest unit), a percent (of the
# amount), an amount up to the order's (on the order or its cheapest item), an amount per
# unit (on the items), the whole order (a fixed price).
SHIPPING, UNITS, PERCENT, UP_TO_AMOUNT, PER_UNIT, WHOLE = range(6)
_UNCAPPED = 1 << 62


def family(d: Discount) -> int:
    """The bound family of a discount (see :meth:`Context.reach`)."""
    if d.target == "shipping" or d.kind == "free_shipping":
        return SHIPPING
    if d.kind == "free_units":
        return UNITS
    if d.kind == "percent":
        return PERCENT
    if d.kind == "amount":
        return PER_UNIT if d.target == "items" else UP_TO_AMOUNT
    return WHOLE


class _Family:
    """The keyed candidates of one bound family, by value then cap, largest first;
    ``ceiling[i]``: the largest cap from ``i`` on. So ``min(reach(values[i]), ceiling[i])``
    bounds every candidate from ``i`` on."""

    __slots__ = ("fam", "values", "caps", "ceiling", "slots", "codes")

    def __init__(self, fam: int, rows: list[tuple[int, int, CampaignSlot, str]]) -> None:
        rows.sort(key=lambda r: (r[0], r[1]), reverse=True)
        self.fam = fam
        self.values = [r[0] for r in rows]
        self.caps = [r[1] for r in rows]
        self.slots = [r[2] for r in rows]
        self.codes = [r[3] for r in rows]
        ceiling = self.caps[:]
        for i in range(len(ceiling) - 2, -1, -1):
            ceiling[i] = max(ceiling[i], ceiling[i + 1])
        self.ceiling = ceiling


class KeyedIndex:
    """A shard's keyed candidates (the shared codes, flash sales and promotion keys of
    its active campaigns, the same for every customer), built once per
    :attr:`ShardState.catalog_version`: as :func:`candidates` lists them (``slots``,
    ``codes``), and by bound family (:meth:`by_bound`), so a request with a limit reads
    them largest bound first and computes the bounds of those it reaches, not of all."""

    __slots__ = ("version", "slots", "codes", "families", "__weakref__")

    def __init__(self, state: ShardState) -> None:
        self.version = state.catalog_version
        self.slots: list[CampaignSlot] = []
        self.codes: list[str] = []
        rows: dict[int, list[tuple[int, int, CampaignSlot, str]]] = {}
        for slot in state.keyed:
            c = slot.campaign
            if c.state == "active" and c.type in CANDIDATES and c.shared_code is not None:
                self.slots.append(slot)
                self.codes.append(c.shared_code)
                d = c.discount
                if d is None:  # not a keyed type today; bounded by the whole order
                    rows.setdefault(WHOLE, []).append((0, _UNCAPPED, slot, c.shared_code))
                else:
                    cap = _UNCAPPED if d.max is None else d.max
                    rows.setdefault(family(d), []).append((d.value, cap, slot, c.shared_code))
        self.families = [_Family(fam, r) for fam, r in sorted(rows.items())]

    def by_bound(
        self, ctx: Context, own: list[tuple[int, CampaignSlot, str]]
    ) -> Iterator[tuple[int, CampaignSlot, str]]:
        """``(bound, slot, code)`` of these candidates and of ``own`` (the customer's
        codes, with their bounds), largest bound first: what sorting them all by
        :meth:`Context.bound` gives, reading each family from its head only as far as
        the caller goes."""
        ready = [(-b, i, slot, code) for i, (b, slot, code) in enumerate(own)]
        heapq.heapify(ready)
        seq = len(ready)
        reach = ctx.reach
        frontier: list[tuple[int, int, int]] = []  # (-bound of what is left, family, position)
        for f, fm in enumerate(self.families):
            frontier.append((-min(reach(fm.fam, fm.values[0]), fm.ceiling[0]), f, 0))
        heapq.heapify(frontier)
        families = self.families
        while True:
            # take from the families until no bound left there beats the best one taken
            while frontier and (not ready or frontier[0][0] < ready[0][0]):
                _, f, i = heapq.heappop(frontier)
                fm = families[f]
                exact = min(reach(fm.fam, fm.values[i]), fm.caps[i])
                heapq.heappush(ready, (-exact, seq, fm.slots[i], fm.codes[i]))
                seq += 1
                i += 1
                if i < len(fm.values):
                    heapq.heappush(frontier, (-min(reach(fm.fam, fm.values[i]), fm.ceiling[i]), f, i))
            if not ready:
                return
            nb, _, slot, code = heapq.heappop(ready)
            yield -nb, slot, code


_indexes: weakref.WeakKeyDictionary[ShardState, KeyedIndex] = weakref.WeakKeyDictionary()


def keyed_index(state: ShardState) -> KeyedIndex:
    """The shard's :class:`KeyedIndex`, rebuilt when its catalog changed."""
    index = _indexes.get(state)
    if index is None or index.version != state.catalog_version:
        index = _indexes[state] = KeyedIndex(state)
    return index


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
    (:class:`KeyedIndex`, :meth:`ShardState.codes_of`), not from every campaign.
    (Two lists rather than a list of pairs: hundreds of pairs per request would be young
    objects for the garbage collector to walk.)"""
    index = keyed_index(state)
    slots, codes = index.slots[:], index.codes[:]
    for code in own_codes(state, customer_id):
        slots.append(state.slot_of(code))
        codes.append(code)
    return slots, codes


def own_codes(state: ShardState, customer_id: str) -> list[str]:
    """The codes this shard gave ``customer_id``, of active campaigns of a type
    :data:`CANDIDATES` lists."""
    out: list[str] = []
    for code in state.codes_of(customer_id):
        slot = state.slot_of(code)
        c = slot.campaign
        if c.state == "active" and c.type in CANDIDATES and slot.assigned_to.get(code) == customer_id:
            out.append(code)
    return out


def explain(state: ShardState, req: QualifyRequest) -> tuple[list[Offer], dict[str, str]]:
    """:func:`_explain` without whether the walk was cut."""
    offers, refused, _ = _explain(state, req)
    return offers, refused


def _explain(state: ShardState, req: QualifyRequest) -> tuple[list[Offer], dict[str, str], bool]:
    """This shard's offers for ``req`` (every one, or at least the best ``req.limit``;
    unsorted), and, per campaign whose candidate here was checked and does not apply, the
    error code a redemption would give.

    With a limit, the candidates are taken in the order of their :meth:`Context.bound`
    (cheap, from the campaign and the order's totals; the keyed ones read from the
    :class:`KeyedIndex` only as far as the walk goes), each checked and priced in turn,
    and the walk stops once no bound left can reach the ``limit``-th best offer found: the
    checks and prices of candidates that cannot make the list are never paid. So a
    campaign that needs the customer's tags is reported (``customer_tags_needed``) only
    when it could have made the list. The flag says whether the walk stopped with
    candidates left (offers below the best ``limit`` may be among them)."""
    state.expire_reservations()  # a hold past its TTL holds nothing
    ctx = Context(req, state.clock())
    refused: dict[str, str] = {}
    index = keyed_index(state)
    mine = own_codes(state, req.customer_id)
    limit = req.limit
    walk: Iterable[tuple[int, CampaignSlot, str]]
    if limit is not None and len(index.slots) + len(mine) > limit:
        own = []
        for code in mine:
            slot = state.slot_of(code)
            own.append((ctx.bound(slot.campaign, slot.balances.get(code)), slot, code))
        walk = index.by_bound(ctx, own)
    else:
        limit = None
        walk = [(0, slot, code) for slot, code in zip(index.slots, index.codes, strict=True)]
        walk += [(0, state.slot_of(code), code) for code in mine]
    offers: list[Offer] = []
    top: list[tuple[int, str, str]] = []  # ranks of the best `limit` so far, sorted
    for bound, slot, code in walk:
        if limit is not None and len(top) == limit and bound < -top[-1][0]:
            return offers, refused, True  # by bound, largest first: none left enters the best `limit`
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
    return offers, refused, False


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
    were needed and whether this shard may have more offers than the ``limit`` listed."""
    offers, refused, cut = _explain(state, req)
    needed = errors.TagsNeeded.code in refused.values()
    more = req.limit is not None and (cut or len(offers) > req.limit)
    return Qualified(best_first(offers, req.limit), needed, more)


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
