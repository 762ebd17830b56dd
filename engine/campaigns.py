"""Campaigns: their definition, validation of a new campaign, the lifecycle state machine,
the discount rule and the flash-sale time windows.

Amounts are integers in minor units (cents). Times are timezone-aware UTC datetimes; the
campaign's ``timezone`` only matters for recurring flash-sale windows, which are local
wall-clock hours (so a 09:00-11:00 window stays 09:00-11:00 across a DST change).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, time, timedelta, timezone
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from engine import errors
from engine import metadata as metadata_module
from engine import rules as rules_module
from engine.codes import CodeSpec, normalize
from engine.currencies import check_currency
from engine.orders import MAX_AMOUNT, MAX_QUANTITY, Order
from engine.pricing import Pricing, price
from engine.rules import Rules

CampaignType = Literal["discount", "gift_card", "shared_code", "flash_sale", "promotion"]
State = Literal["draft", "active", "paused", "ended"]
Action = Literal["activate", "pause", "end"]

CAMPAIGN_TYPES: tuple[str, ...] = ("discount", "gift_card", "shared_code", "flash_sale", "promotion")
PROMOTION_PREFIX = "~"  # engine.promotions.PREFIX: a promotion's key on its shard
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


DiscountKind = Literal["percent", "amount", "fixed_price", "free_units", "free_shipping"]
Target = Literal["order", "items", "cheapest_item", "shipping"]
KINDS: tuple[str, ...] = ("percent", "amount", "fixed_price", "free_units", "free_shipping")
TARGETS: tuple[str, ...] = ("order", "items", "cheapest_item", "shipping")


class Discount(msgspec.Struct, frozen=True):
    """What the campaign takes off, on which ``target`` (see :mod:`engine.pricing`):
    ``percent`` (``value`` 1..100), ``amount`` (``value`` in minor units), ``fixed_price``
    (the target costs ``value``), ``free_units`` (``value`` units free; ``sku`` picks
    which), ``free_shipping`` (no ``value``). ``max`` caps the discount (minor units)."""

    kind: DiscountKind
    value: int = 0
    max: int | None = None
    target: Target = "order"
    sku: str | None = None


class Limits(msgspec.Struct, frozen=True):
    """``total``: global number of redemptions (shared codes) or of codes in circulation
    (unique codes). ``per_customer``: redemptions per customer (shared codes) or codes
    assigned per customer (unique codes)."""

    total: int | None = None
    per_customer: int | None = None


class Window(msgspec.Struct, frozen=True):
    """A recurring local-time window: ``days`` 0=Monday..6=Sunday, ``start``/``end`` as
    ``HH:MM`` in the campaign's time zone; ``end`` <= ``start`` means it runs past midnight."""

    days: tuple[int, ...]
    start: str
    end: str


class Campaign(msgspec.Struct, frozen=True):
    id: str
    name: str
    type: CampaignType
    currency: str
    state: State = "draft"
    discount: Discount | None = None
    min_order: int = 0
    gift_balance: int | None = None
    limits: Limits = Limits()
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    timezone: str = "UTC"
    windows: tuple[Window, ...] = ()
    code_spec: CodeSpec = CodeSpec()
    shared_code: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    #: bumped by every change; replicas apply only a newer version (see :func:`supersedes`)
    version: int = 0
    #: the shop's own JSON object (:mod:`engine.metadata`)
    metadata: dict[str, Any] | None = None
    #: conditions on the order and customer (:mod:`engine.rules`)
    rules: Rules | None = None

    @property
    def is_shared(self) -> bool:
        """One code for the whole offer; redemptions recorded only when they happen."""
        return self.shared_code is not None

    @property
    def is_gift_card(self) -> bool:
        return self.type == "gift_card"

    @property
    def is_promotion(self) -> bool:
        """Applied by itself to orders that fit (engine/promotions.py): no code to give."""
        return self.type == "promotion"


def _parse_hhmm(value: str, field: str) -> time:
    m = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)", value)
    if not m:
        raise errors.InvalidInput(f"{field} must be HH:MM (24h), got {value!r}")
    return time(int(m.group(1)), int(m.group(2)))


def _require_aware(value: datetime | None, field: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise errors.InvalidInput(f"{field} must be an ISO 8601 date-time, got {value!r}")
    if value.tzinfo is None:
        raise errors.InvalidInput(f"{field} must carry a time zone offset, got {value!r}")
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise errors.InvalidInput(f"{field} is too close to the ends of the calendar") from None


def _check_amount(value: int | None, field: str, *, positive: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.InvalidInput(f"{field} must be an integer in minor units")
    if value < 0 or (positive and value == 0):
        raise errors.InvalidInput(f"{field} must be {'positive' if positive else '>= 0'}")
    if value > MAX_AMOUNT:
        raise errors.InvalidInput(f"{field} is larger than {MAX_AMOUNT}")


def new_campaign(
    *,
    id: str,
    name: str,
    type: str,
    currency: str,
    now: datetime,
    discount: Discount | None = None,
    min_order: int = 0,
    gift_balance: int | None = None,
    limits: Limits | None = None,
    starts_at: datetime | None = None,
    ends_at: datetime | None = None,
    timezone_name: str = "UTC",
    windows: tuple[Window, ...] = (),
    code_spec: CodeSpec | None = None,
    shared_code: str | None = None,
    metadata: dict[str, Any] | None = None,
    rules: Rules | None = None,
) -> Campaign:
    """Validate a campaign definition and return it in ``draft``.

    Raises :class:`errors.InvalidInput` naming the first field that is wrong."""
    if not _ID_RE.match(id):
        raise errors.InvalidInput("id must be 1-64 characters of letters, digits, '_' or '-'")
    if not name or len(name) > 200:
        raise errors.InvalidInput("name must be 1-200 characters")
    if type not in CAMPAIGN_TYPES:
        raise errors.InvalidInput(f"type must be one of {', '.join(CAMPAIGN_TYPES)}")
    check_currency(currency, "currency")
    try:
        ZoneInfo(timezone_name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise errors.InvalidInput(f"timezone {timezone_name!r} is not a known IANA zone") from exc
    starts = _require_aware(starts_at, "starts_at")
    ends = _require_aware(ends_at, "ends_at")
    if ends is not None and ends <= now:
        raise errors.InvalidInput("ends_at is in the past")
    if starts is not None and ends is not None and ends <= starts:
        raise errors.InvalidInput("ends_at must be after starts_at")
    _check_amount(min_order, "min_order")
    lim = limits or Limits()
    _check_limits(lim)

    if type == "gift_card":
        if discount is not None:
            raise errors.InvalidInput("a gift_card campaign has gift_balance, not discount")
        if gift_balance is None:
            raise errors.InvalidInput("gift_balance is required for a gift_card campaign")
        _check_amount(gift_balance, "gift_balance", positive=True)
    else:
        if gift_balance is not None:
            raise errors.InvalidInput("gift_balance is only for gift_card campaigns")
        if discount is None:
            raise errors.InvalidInput(f"discount is required for a {type} campaign")
        _check_discount(discount)

    if type == "shared_code" and shared_code is None:
        raise errors.InvalidInput("shared_code is required for a shared_code campaign")
    if type == "promotion":
        if shared_code is not None:
            raise errors.InvalidInput("a promotion has no code: it applies to every order it fits")
        if code_spec is not None and code_spec != CodeSpec():
            raise errors.InvalidInput("a promotion has no code: it takes no code pattern")
    if type in ("discount", "gift_card") and shared_code is not None:
        raise errors.InvalidInput(f"a {type} campaign uses unique codes, not shared_code")
    if shared_code is not None:
        shared_code = normalize(shared_code)
        if not re.fullmatch(r"[A-Z0-9_-]{3,64}", shared_code):
            raise errors.InvalidInput("shared_code must be 3-64 characters of A-Z, 0-9, '_', '-'")
    _check_flash_sale(type, lim, starts, ends)
    _check_windows(type, windows)
    if metadata is not None:
        metadata = metadata_module.check(metadata)
    rules, discount = _check_rules(rules, discount, min_order)
    if type == "promotion":
        # decided like a shared code, under a key no code can be (engine/promotions.py)
        shared_code = PROMOTION_PREFIX + id

    return Campaign(
        id=id,
        name=name,
        type=type,  # type: ignore[arg-type]
        currency=currency,
        discount=discount,
        min_order=min_order,
        gift_balance=gift_balance,
        limits=lim,
        starts_at=starts,
        ends_at=ends,
        timezone=timezone_name,
        windows=tuple(windows),
        code_spec=code_spec or CodeSpec(),
        shared_code=shared_code,
        created_at=now,
        updated_at=now,
        version=1,
        metadata=metadata,
        rules=rules,
    )


def _check_limits(lim: Limits) -> None:
    for fname in ("total", "per_customer"):
        v = getattr(lim, fname)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise errors.InvalidInput(f"limits.{fname} must be a positive integer")


def _check_flash_sale(
    type: str, lim: Limits, starts: datetime | None, ends: datetime | None
) -> None:
    if type == "flash_sale":
        if lim.total is None:
            raise errors.InvalidInput("a flash_sale needs limits.total (the quantity on sale)")
        if starts is None or ends is None:
            raise errors.InvalidInput("a flash_sale needs starts_at and ends_at")


def _check_windows(type: str, windows: tuple[Window, ...] | list[Window]) -> None:
    if windows and type not in ("flash_sale", "promotion"):
        raise errors.InvalidInput("recurring windows are only for flash_sale and promotion campaigns")
    for i, w in enumerate(windows):
        if not w.days or any(d not in range(7) for d in w.days):
            raise errors.InvalidInput(f"windows[{i}].days must be weekdays 0 (Mon) to 6 (Sun)")
        s = _parse_hhmm(w.start, f"windows[{i}].start")
        e = _parse_hhmm(w.end, f"windows[{i}].end")
        if s == e:
            raise errors.InvalidInput(f"windows[{i}] is empty: start equals end")


def _check_discount(d: Discount) -> None:
    if d.kind not in KINDS:
        raise errors.InvalidInput(f"discount.kind must be one of {', '.join(KINDS)}")
    if d.target not in TARGETS:
        raise errors.InvalidInput(f"discount.target must be one of {', '.join(TARGETS)}")
    v = d.value
    if isinstance(v, bool) or not isinstance(v, int):
        raise errors.InvalidInput("discount.value must be an integer")
    if d.kind == "percent":
        if not 1 <= v <= 100:
            raise errors.InvalidInput("discount.value must be 1..100 for a percent discount")
    elif d.kind == "amount":
        _check_amount(v, "discount.value", positive=True)
    elif d.kind == "fixed_price":
        _check_amount(v, "discount.value")
    elif d.kind == "free_units":
        if not 1 <= v <= MAX_QUANTITY:
            raise errors.InvalidInput(
                f"discount.value is the number of free units for free_units: 1 to {MAX_QUANTITY}"
            )
        if d.target == "shipping":
            raise errors.InvalidRule("free_units gives items, not shipping: use target items")
    elif v != 0:
        raise errors.InvalidInput("a free_shipping discount has no value")
    if d.kind == "free_shipping" and d.target not in ("order", "shipping"):
        raise errors.InvalidRule("free_shipping discounts shipping: use target shipping")
    if d.kind == "fixed_price" and d.target == "order" and v == 0:
        raise errors.InvalidRule("a fixed_price of 0 on the whole order makes it free: use percent 100")
    if d.sku is not None:
        if d.kind != "free_units":
            raise errors.InvalidInput("discount.sku only picks the free units of free_units")
        if not isinstance(d.sku, str) or not 1 <= len(d.sku) <= 128:
            raise errors.InvalidInput("discount.sku must be 1-128 characters")
    _check_amount(d.max, "discount.max", positive=True)


def _check_rules(
    rules: Rules | None, discount: Discount | None, min_order: int
) -> tuple[Rules | None, Discount | None]:
    """The rules and discount of a campaign, checked together: a rule that can never hold,
    or a discount whose free units the rules exclude, is refused (``invalid_rule``).
    ``free_shipping`` always targets shipping."""
    if rules is not None:
        rules_module.check(rules, min_order=min_order)
        if rules.min_order is not None and min_order and rules.min_order != min_order:
            raise errors.InvalidRule("min_order is given twice: as min_order and rules.min_order")
    if discount is not None:
        if discount.kind == "free_shipping" and discount.target != "shipping":
            discount = msgspec.structs.replace(discount, target="shipping")
        ex = rules.exclude if rules is not None else None
        if discount.sku is not None and ex is not None and discount.sku in ex.skus:
            raise errors.InvalidRule(
                f"discount.sku {discount.sku} is excluded by rules.exclude: no unit could be free"
            )
    return rules, discount


# --- lifecycle -------------------------------------------------------------------------

_ILLEGAL: dict[tuple[str, str], type[errors.IllegalTransition]] = {
    ("ended", "activate"): errors.CannotActivateEnded,
    ("draft", "pause"): errors.CannotPauseDraft,
    ("ended", "pause"): errors.CannotPauseEnded,
}
_NEXT: dict[tuple[str, str], State] = {
    ("draft", "activate"): "active",
    ("paused", "activate"): "active",
    ("active", "pause"): "paused",
    ("draft", "end"): "ended",
    ("active", "end"): "ended",
    ("paused", "end"): "ended",
}
# A repeated move (a client retrying an answer it never got, or re-sending an end to make
# sure every replica heard it) is not an error: it answers with the campaign as it is.
_ALREADY: frozenset[tuple[str, str]] = frozenset(
    {("active", "activate"), ("paused", "pause"), ("ended", "end")}
)


def transition(campaign: Campaign, action: str, now: datetime) -> Campaign:
    """Apply a lifecycle action; each illegal move raises its own error class. A move to
    the state the campaign is already in returns ``campaign`` itself (same version)."""
    key = (campaign.state, action)
    if key in _ALREADY:
        return campaign
    if key in _ILLEGAL:
        raise _ILLEGAL[key](f"cannot {action} campaign {campaign.id}: it is {campaign.state}")
    if key not in _NEXT:
        raise errors.InvalidInput(f"unknown action {action!r}; use activate, pause or end")
    return msgspec.structs.replace(
        campaign, state=_NEXT[key], updated_at=now, version=campaign.version + 1
    )


def supersedes(incoming: Campaign, current: Campaign) -> bool:
    """Whether a replica holding ``current`` must apply ``incoming``: only a newer version,
    and nothing takes a campaign out of ``ended`` (its codes are void, its end announced),
    so a late or replayed copy can never revive it."""
    if incoming.version <= current.version:
        return False
    return not (current.state == "ended" and incoming.state != "ended")


# --- editing ---------------------------------------------------------------------------

EDITABLE: tuple[str, ...] = (
    "name",
    "starts_at",
    "ends_at",
    "limits",
    "discount",
    "min_order",
    "windows",
    "metadata",
    "rules",
)
"""The fields a shop may change after creation. The rest (id, type, currency, time zone,
gift balance, code pattern, shared code) define what was issued and stay as created."""


class Usage(msgspec.Struct, frozen=True):
    """What a campaign already used, so an edit never lowers a limit below it.

    ``codes``: unique codes in circulation (in the bank, or reserved by running generation
    jobs and imports); ``redemptions``: a shared code's active redemptions and open holds;
    ``per_customer``: the most any one customer holds of those."""

    codes: int = 0
    redemptions: int = 0
    per_customer: int = 0


def _builtin(value: Any) -> Any:
    return msgspec.json.decode(msgspec.json.encode(value))


def _convert(value: Any, typ: Any, field: str) -> Any:
    try:
        return msgspec.convert(value, typ, from_attributes=True)
    except msgspec.ValidationError as exc:
        raise errors.InvalidInput(f"{field}: {exc}") from None


def _edited_limits(current: Limits, change: Any) -> Limits:
    """``limits`` merged like a JSON merge patch: a key sent sets that limit, ``null``
    removes it, a key left out stays."""
    if change is None:
        return Limits()
    if isinstance(change, Limits):
        change = {f: getattr(change, f) for f in Limits.__struct_fields__}
    if not isinstance(change, Mapping):
        raise errors.InvalidInput("limits must be an object of total and per_customer")
    unknown = set(change) - set(Limits.__struct_fields__)
    if unknown:
        raise errors.InvalidInput(f"limits has no field {sorted(unknown)[0]!r}")
    merged = {f: change.get(f, getattr(current, f)) for f in Limits.__struct_fields__}
    lim = Limits(**merged)
    _check_limits(lim)
    return lim


def _check_usage(c: Campaign, lim: Limits, usage: Usage | None) -> None:
    """Refuse a limit lowered (or set where there was none) below what is used."""
    lowered = [
        f
        for f in Limits.__struct_fields__
        if getattr(lim, f) is not None
        and (getattr(c.limits, f) is None or getattr(lim, f) < getattr(c.limits, f))
    ]
    if not lowered:
        return
    if usage is None:
        raise ValueError("lowering a limit needs the campaign's usage")
    if "total" in lowered:
        assert lim.total is not None
        used, what = (
            (usage.redemptions, "redemptions (with open reservations)")
            if c.is_shared
            else (usage.codes, "codes in circulation (or being generated)")
        )
        if lim.total < used:
            raise errors.LimitBelowUsage(
                f"limits.total {lim.total} is below what campaign {c.id} already used: "
                f"{used} {what}"
            )
    if "per_customer" in lowered:
        assert lim.per_customer is not None
        if lim.per_customer < usage.per_customer:
            raise errors.LimitBelowUsage(
                f"limits.per_customer {lim.per_customer} is below what one customer of "
                f"campaign {c.id} already used: {usage.per_customer}"
            )


def edit(
    campaign: Campaign, changes: Mapping[str, Any], now: datetime, usage: Usage | None = None
) -> tuple[Campaign, dict[str, list[Any]]]:
    """Apply a shop's change to ``campaign`` if it is safe for its state; returns the new
    campaign (next version) and what changed as ``{field: [before, after]}`` (JSON values).
    A change that changes nothing returns ``campaign`` itself and ``{}``.

    ``changes`` holds some of :data:`EDITABLE`; ``None`` clears an optional field
    (``ends_at``, ``starts_at``, ``metadata``), ``limits`` merges. Safe means: nothing of
    an ended campaign changes; ``starts_at`` of a campaign that has started selling
    (activated once, its start passed) stays; a limit is never lowered below ``usage``
    (needed only when one is lowered); every rule of a new campaign still holds. An
    ``ends_at`` in the past is allowed: it closes the campaign to redemptions at once.
    """
    if campaign.state == "ended":
        raise errors.CannotEditEnded(f"campaign {campaign.id} has ended: it cannot change")
    unknown = [k for k in changes if k not in EDITABLE]
    if unknown:
        raise errors.InvalidInput(
            f"{unknown[0]} cannot be changed; editable fields are {', '.join(EDITABLE)}"
        )
    if not changes:
        raise errors.InvalidInput(f"nothing to change: send one of {', '.join(EDITABLE)}")
    c = campaign
    new: dict[str, Any] = {}
    if "name" in changes:
        name = changes["name"]
        if not isinstance(name, str) or not name or len(name) > 200:
            raise errors.InvalidInput("name must be 1-200 characters")
        new["name"] = name
    starts = c.starts_at
    if "starts_at" in changes:
        starts = _require_aware(changes["starts_at"], "starts_at")
        selling = c.state != "draft" and (c.starts_at is None or c.starts_at <= now)
        if starts != c.starts_at and selling:
            raise errors.StartAlreadyPassed(
                f"campaign {c.id} has started selling: starts_at cannot move"
            )
        new["starts_at"] = starts
    ends = c.ends_at
    if "ends_at" in changes:
        ends = _require_aware(changes["ends_at"], "ends_at")
        new["ends_at"] = ends
    if starts is not None and ends is not None and ends <= starts:
        raise errors.InvalidInput("ends_at must be after starts_at")
    if "min_order" in changes:
        min_order = changes["min_order"]
        if min_order is None:
            raise errors.InvalidInput("min_order must be an integer in minor units (0: none)")
        _check_amount(min_order, "min_order")
        new["min_order"] = min_order
    lim = c.limits
    if "limits" in changes:
        lim = _edited_limits(c.limits, changes["limits"])
        _check_usage(c, lim, usage)
        new["limits"] = lim
    if "discount" in changes:
        if c.is_gift_card:
            raise errors.InvalidInput("a gift_card campaign has gift_balance, not discount")
        if changes["discount"] is None:
            raise errors.InvalidInput(f"discount is required for a {c.type} campaign")
        discount = _convert(changes["discount"], Discount, "discount")
        _check_discount(discount)
        new["discount"] = discount
    windows = c.windows
    if "windows" in changes:
        raw = changes["windows"] or ()
        windows = tuple(_convert(w, Window, f"windows[{i}]") for i, w in enumerate(raw))
        _check_windows(c.type, windows)
        new["windows"] = windows
    _check_flash_sale(c.type, lim, starts, ends)
    if "rules" in changes:
        raw_rules = changes["rules"]
        new["rules"] = None if raw_rules is None else _convert(raw_rules, Rules, "rules")
    if {"rules", "discount", "min_order"} & set(new):
        rules, discount = _check_rules(
            new.get("rules", c.rules), new.get("discount", c.discount), new.get("min_order", c.min_order)
        )
        if "discount" in new:
            new["discount"] = discount
    if "metadata" in changes:
        md = changes["metadata"]
        new["metadata"] = None if md is None else metadata_module.check(md)
    diff = {
        f: [_builtin(getattr(c, f)), _builtin(v)]
        for f, v in new.items()
        if _builtin(getattr(c, f)) != _builtin(v)
    }
    if not diff:
        return campaign, {}
    edited = msgspec.structs.replace(
        c, **{f: new[f] for f in diff}, updated_at=now, version=c.version + 1
    )
    return edited, diff


def has_metadata(campaign: Campaign, wanted: Mapping[str, Any]) -> bool:
    """Whether the campaign's metadata holds every key of ``wanted`` with that value (a
    JSON equality: ``1`` matches neither ``true`` nor ``"1"``)."""
    md = campaign.metadata or {}
    for key, value in wanted.items():
        if key not in md:
            return False
        have = md[key]
        if type(have) is not type(value) and not (
            isinstance(have, (int, float))
            and isinstance(value, (int, float))
            and not isinstance(have, bool)
            and not isinstance(value, bool)
        ):
            return False
        if have != value:
            return False
    return True


# --- rules at redemption time ----------------------------------------------------------


def check_redeemable_now(campaign: Campaign, now: datetime) -> None:
    """Raise the reason the campaign does not accept redemptions at ``now``."""
    if campaign.state == "draft":
        raise errors.CampaignNotActive(f"campaign {campaign.id} is not active yet")
    if campaign.state == "paused":
        raise errors.CampaignPaused(f"campaign {campaign.id} is paused")
    if campaign.state == "ended":
        raise errors.CampaignEnded(f"campaign {campaign.id} has ended")
    if campaign.starts_at is not None and now < campaign.starts_at:
        raise errors.CampaignNotStarted(
            f"campaign {campaign.id} starts at {campaign.starts_at.isoformat()}"
        )
    if campaign.ends_at is not None and now >= campaign.ends_at:
        raise errors.CampaignExpired(
            f"campaign {campaign.id} expired at {campaign.ends_at.isoformat()}"
        )
    if campaign.windows and not in_windows(campaign, now):
        raise errors.OutsideSaleWindow(
            f"flash sale {campaign.id} is outside its sale hours ({campaign.timezone})"
        )


def in_windows(campaign: Campaign, now: datetime) -> bool:
    """Whether ``now`` falls in one of the campaign's recurring local-time windows."""
    local = now.astimezone(ZoneInfo(campaign.timezone))
    t = local.time().replace(tzinfo=None)
    wd = local.weekday()
    for w in campaign.windows:
        s, e = _parse_hhmm(w.start, "start"), _parse_hhmm(w.end, "end")
        if s < e:
            if wd in w.days and s <= t < e:
                return True
        else:  # runs past midnight: the part after midnight belongs to the previous day
            if wd in w.days and t >= s:
                return True
            if (wd - 1) % 7 in w.days and t < e:
                return True
    return False


def next_window_start(campaign: Campaign, now: datetime) -> datetime | None:
    """The next UTC instant a window opens (for "opens at" messages); None if no windows."""
    if not campaign.windows:
        return None
    tz = ZoneInfo(campaign.timezone)
    local_day = now.astimezone(tz).date()
    best: datetime | None = None
    for offset in range(8):
        day = local_day + timedelta(days=offset)
        for w in campaign.windows:
            if day.weekday() in w.days:
                start = datetime.combine(day, _parse_hhmm(w.start, "start"), tzinfo=tz)
                start_utc = start.astimezone(timezone.utc)
                if start_utc > now and (best is None or start_utc < best):
                    best = start_utc
    return best


def discount_for(campaign: Campaign, amount: int, balance: int | None = None) -> int:
    """The discount an amount-only order of ``amount`` gets (gift cards: what the balance
    covers); :func:`pricing_for` prices any order."""
    order = Order(amount=amount, currency=campaign.currency)
    return price(campaign, order, None, balance).discount


def check_order(campaign: Campaign, order: Order) -> None:
    """Reject orders the campaign does not take: a malformed amount, another currency,
    below ``min_order``."""
    _check_amount(order.amount, "order.amount")
    if order.currency != campaign.currency:
        raise errors.CurrencyMismatch(
            f"order currency {order.currency} does not match campaign currency {campaign.currency}"
        )
    if order.amount < campaign.min_order:
        raise errors.OrderTooSmall(
            f"order amount {order.amount} is below the minimum {campaign.min_order}"
        )


def pricing_for(
    campaign: Campaign, order: Order, tags: Sequence[str] | None = None, balance: int | None = None
) -> Pricing:
    """Whether ``campaign`` takes ``order`` (for a customer with ``tags``) and what it takes
    off: the one rule every path applies (:func:`engine.pricing.price`)."""
    check_order(campaign, order)
    return price(campaign, order, tags, balance)


Clock = Callable[[], datetime]
