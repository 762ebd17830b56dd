"""The state of one shard: its vouchers, shared codes, redemptions, reservations and
idempotency records, and every rule that decides a redemption.

Pure: no I/O, clock and randomness injected. Every change appends an event to
``self.events``; the actor hands them to the write-behind path. A ``ShardState`` is
driven by one thread of control (the actor's event loop), so no method awaits and each
decision is atomic.

Memory: the code index is one ``dict[str, int]`` whose value packs the campaign slot and
the status (``slot << 2 | status``), with the packed ints interned, so a code held costs
its string, a dict entry and a list slot (the available stack): about 110 bytes for a
10-character code. Per-code extras (assignee, gift balance) live in sparse dicts. An
assigned code costs about 107 bytes more (measured over a million): its owner, the
campaign's customer -> code entry, and the shard's customer -> codes index qualification
reads (:meth:`ShardState.codes_of`, about 40 of those bytes).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import msgspec

from engine import errors, metadata
from engine.audit import Actor
from engine.campaigns import (
    Campaign,
    check_order,
    check_redeemable_now,
    supersedes,
)
from engine.checkouts import MAX_CODE_LEN, RedeemRequest, fingerprint, route_bucket
from engine.code_control import change_control, check_control, usable
from engine.codes import normalize
from engine.events import (
    ASSIGNED,
    AVAILABLE,
    CONFIRMED,
    DEFAULT_CONTROL,
    EXPIRED,
    HELD,
    R_ROLLED_BACK,
    REDEEMED,
    RELEASED,
    STATUS_NAMES,
    VOID,
    Assignment,
    AssignmentRecorded,
    CodesVoided,
    Control,
    Event,
    IdempotencyRecorded,
    ImportedCode,
    Redemption,
    RedemptionRecorded,
    RedemptionRolledBack,
    Rejection,
    Reservation,
    ReservationChanged,
    Validation,
    VoucherChanged,
    VoucherControlled,
)
from engine.idempotency import Claim, Settled, Stored, Verdict, settle
from engine.pricing import Cart, Pricing, cart_json, detail_json, price, read_cart
from engine.promotions import is_key as is_promotion_key
from engine.promotions import stack
from engine.routing import BUCKETS, assignment_key, bucket_of, bucket_of_id, new_id

Clock = Callable[[], datetime]
RandomBytes = Callable[[int], bytes]
MAX_ID_LEN = 128
# A key as the shard sees it: the caller's key (at most 255 characters) behind the
# gateway's caller scope.
MAX_KEY_LEN = 512


class Outcome(msgspec.Struct, frozen=True):
    """One answer of a batch: exactly one field is set."""

    redemption: Redemption | None = None
    reservation: Reservation | None = None
    validation: Validation | None = None
    assignment: Assignment | None = None
    rejection: Rejection | None = None

    def unwrap(self) -> Any:
        """The result, or the typed error it carries raised."""
        if self.rejection is not None:
            raise errors.from_code(self.rejection.error, self.rejection.message)
        return self.redemption or self.reservation or self.validation or self.assignment


_outcome_encoder = msgspec.msgpack.Encoder()
_outcome_decoder = msgspec.msgpack.Decoder(Outcome)


class CampaignSlot:
    """Per-campaign state within one shard."""

    __slots__ = (
        "campaign",
        "index",
        "available",
        "counts",
        "uses",
        "per_customer",
        "held_units",
        "held_by_customer",
        "balances",
        "gift_uses",
        "assigned_to",
        "by_customer",
        "discount_total",
        "order_total",
        "redemption_count",
        "rollback_count",
    )

    def __init__(self, campaign: Campaign, index: int) -> None:
        self.campaign = campaign
        self.index = index
        self.available: list[str] = []
        self.counts = [0, 0, 0, 0]  # by voucher status, unique codes only
        self.uses = 0  # active redemptions
        self.per_customer: dict[str, int] = {}
        self.held_units = 0
        self.held_by_customer: dict[str, int] = {}
        self.balances: dict[str, int] = {}
        self.gift_uses: dict[str, int] = {}
        self.assigned_to: dict[str, str] = {}
        self.by_customer: dict[str, str] = {}
        self.discount_total = 0
        self.order_total = 0
        self.redemption_count = 0
        self.rollback_count = 0


class CampaignStats(msgspec.Struct):
    campaign_id: str
    available: int = 0
    assigned: int = 0
    redeemed: int = 0
    void: int = 0
    redemptions: int = 0
    rollbacks: int = 0
    active_redemptions: int = 0
    held: int = 0
    discount_total: int = 0
    order_total: int = 0
    gift_balance_outstanding: int = 0

    def merge(self, other: CampaignStats) -> CampaignStats:
        fields = [f for f in self.__struct_fields__ if f != "campaign_id"]
        return CampaignStats(
            self.campaign_id, *(getattr(self, f) + getattr(other, f) for f in fields)
        )


class ShardState:
    def __init__(
        self,
        *,
        clock: Clock,
        random_bytes: RandomBytes,
        reservation_ttl: timedelta = timedelta(minutes=15),
        owned: Iterable[int] | None = None,
        idempotency_ttl: timedelta | None = None,
    ) -> None:
        """``owned``: the buckets this shard owns (every bucket when None). A code, a shared
        code or a redemption id of another bucket is refused with ``not_owner``, so two
        shards never decide for one code whatever their callers think the topology is.
        ``idempotency_ttl``: how long a key replays its answer (forever when None); an
        older key runs again."""
        self.clock = clock
        self.idempotency_ttl = idempotency_ttl
        self._owned: bytes | None = None
        if owned is not None:
            flags = bytearray(BUCKETS)
            for b in owned:
                flags[b] = 1
            self._owned = bytes(flags)
        self.random_bytes = random_bytes
        self.reservation_ttl = reservation_ttl
        self.campaigns: dict[str, CampaignSlot] = {}
        self._slots: list[CampaignSlot] = []
        self.codes: dict[str, int] = {}
        # What qualification walks instead of every campaign (engine/qualification.py):
        # the slots whose shared code (or promotion key) lives here, and per customer the
        # codes of this shard assigned to them (one code as such, several as a list).
        self.keyed: list[CampaignSlot] = []
        self.catalog_version = 0  # moves whenever a campaign here changes (put_campaign)
        self.customer_codes: dict[str, str | list[str]] = {}
        # codes switched off or with a window of their own (sparse: most codes have none)
        self.controls: dict[str, Control] = {}
        self._interned: dict[int, int] = {}
        self._pending: set[str] = set()
        self.redemptions: dict[str, Redemption] = {}
        self.reservations: dict[str, Reservation] = {}
        self.held: dict[str, str] = {}
        self._expiry: list[tuple[datetime, str]] = []  # heap of open holds by expiry
        self.idem: dict[str, tuple[bytes, bytes, datetime]] = {}
        # storage's verdicts on the keys of the batches being decided (see accept_claims)
        self._claims: dict[str, Settled] = {}
        self.events: list[Event] = []

    # --- campaigns ---------------------------------------------------------------------

    def put_campaign(self, campaign: Campaign) -> bool:
        """Install or update this shard's replica of a campaign; returns whether it changed.

        Copies arrive from the coordinator's broadcast, its re-broadcasts and this shard's
        own re-sync from Postgres, in any order and more than once: only a newer version
        applies, and an ended campaign stays ended (:func:`engine.campaigns.supersedes`)."""
        slot = self.campaigns.get(campaign.id)
        if slot is not None and not supersedes(campaign, slot.campaign):
            return False
        if slot is None:
            slot = CampaignSlot(campaign, len(self._slots))
            self._slots.append(slot)
            self.campaigns[campaign.id] = slot
            if campaign.shared_code is not None and self.owns(bucket_of(campaign.shared_code)):
                # a shared code lives only on the shard owning its bucket
                self.codes[campaign.shared_code] = self._pack(slot.index, AVAILABLE)
                self.keyed.append(slot)
        was_ended = slot.campaign.state == "ended"
        slot.campaign = campaign
        self.catalog_version += 1
        if campaign.state == "ended" and not was_ended:
            self._void_unredeemed(slot)
        return True

    def _void_unredeemed(self, slot: CampaignSlot) -> None:
        """End: every unredeemed code is void. O(1) however many codes the campaign has:
        the counts move at once, and a code of an ended campaign still packed available or
        assigned *reads* as void (:meth:`_status`); its row is voided in Postgres by the
        shard's background void (the ``CodesVoided`` event), chunk by chunk."""
        slot.counts[VOID] += slot.counts[AVAILABLE] + slot.counts[ASSIGNED]
        slot.counts[AVAILABLE] = slot.counts[ASSIGNED] = 0
        slot.available.clear()
        for res_id in [r for r, res in self.reservations.items() if res.campaign_id == slot.campaign.id]:
            if self.reservations[res_id].state == HELD:
                self._close_reservation(res_id, RELEASED)
        self.events.append(CodesVoided(slot.campaign.id))

    def owns(self, bucket: int) -> bool:
        return self._owned is None or self._owned[bucket] == 1

    def _check_owner(self, bucket: int) -> None:
        if self._owned is not None and self._owned[bucket] != 1:
            raise errors.NotOwner(f"bucket {bucket} belongs to another shard; retry")

    def campaign(self, campaign_id: str) -> Campaign:
        slot = self.campaigns.get(campaign_id)
        if slot is None:
            raise errors.UnknownCampaign(f"unknown campaign {campaign_id!r}")
        return slot.campaign

    # --- the voucher bank --------------------------------------------------------------

    def _pack(self, slot: int, status: int) -> int:
        value = slot << 2 | status
        return self._interned.setdefault(value, value)

    def claim_new_codes(self, codes: Iterable[str]) -> list[str]:
        """Codes not yet known here (nor being added), now reserved until admitted."""
        fresh: list[str] = []
        for code in codes:
            if code in self.codes or code in self._pending:
                continue
            self._pending.add(code)
            fresh.append(code)
        return fresh

    def abandon_codes(self, codes: Iterable[str]) -> None:
        """Release a claim whose persistence failed."""
        self._release_claims(codes)

    def _release_claims(self, codes: Iterable[str]) -> None:
        self._pending.difference_update(codes)
        if not self._pending:
            self._pending = set()  # a set never shrinks its table; drop the big one

    def admit_codes(self, campaign_id: str, codes: list[str]) -> None:
        """Add claimed codes, already persisted as available, to the bank. Codes of a
        campaign that ended while they were being persisted enter void, and their rows are
        voided again by the next commit (the end's void may have committed before them)."""
        slot = self.campaigns[campaign_id]
        ended = slot.campaign.state == "ended"
        status = VOID if ended else AVAILABLE
        packed = self._pack(slot.index, status)
        gift = slot.campaign.gift_balance if slot.campaign.is_gift_card else None
        for code in codes:
            self.codes[code] = packed
            if gift is not None:
                slot.balances[code] = gift
        self._release_claims(codes)
        slot.counts[status] += len(codes)
        if ended:
            self.events.append(CodesVoided(campaign_id))
        else:
            slot.available.extend(codes)

    def admit_imported(self, campaign_id: str, rows: Sequence[ImportedCode]) -> None:
        """Add claimed imported codes, already persisted, to the bank: a code with a
        customer is theirs (assigned), one with its own end gets that window."""
        slot = self.campaigns[campaign_id]
        gift = slot.campaign.gift_balance if slot.campaign.is_gift_card else None
        codes = []
        for row in rows:
            code = row.code
            codes.append(code)
            status = ASSIGNED if row.customer_id is not None else AVAILABLE
            self.codes[code] = self._pack(slot.index, status)
            slot.counts[status] += 1
            if gift is not None:
                slot.balances[code] = gift
            if row.customer_id is not None:
                self._give(slot, code, row.customer_id)
                slot.by_customer.setdefault(row.customer_id, code)
            else:
                slot.available.append(code)
            if row.expires_at is not None:
                self.controls[code] = Control(expires_at=row.expires_at)
        self._release_claims(codes)

    def codes_in_campaign(self, campaign_id: str) -> int:
        slot = self.campaigns.get(campaign_id)
        return sum(slot.counts) if slot else 0

    def limit_usage(self, campaign_id: str) -> tuple[int, int]:
        """What counts against a shared code's limits here: its active redemptions with
        the open holds, and the most of those that one customer has (a limit may not be
        lowered below either)."""
        slot = self.campaigns.get(campaign_id)
        if slot is None:
            return 0, 0
        customers = set(slot.per_customer) | set(slot.held_by_customer)
        most = max(
            (slot.per_customer.get(c, 0) + slot.held_by_customer.get(c, 0) for c in customers),
            default=0,
        )
        return slot.uses + slot.held_units, most

    # --- recovery ----------------------------------------------------------------------

    def load_voucher(
        self,
        code: str,
        campaign_id: str,
        status: int,
        customer_id: str | None,
        balance: int | None,
        uses: int,
    ) -> None:
        """Rebuild one voucher from its persisted row (no event)."""
        slot = self.campaigns.get(campaign_id)
        if slot is None:
            return
        if slot.campaign.shared_code == code:
            return  # shared-code counters are rebuilt from redemptions
        if slot.campaign.state == "ended" and status in (AVAILABLE, ASSIGNED):
            status = VOID
        self.codes[code] = self._pack(slot.index, status)
        slot.counts[status] += 1
        if status == AVAILABLE:
            slot.available.append(code)
        if customer_id is not None:
            self._give(slot, code, customer_id)
            slot.by_customer.setdefault(customer_id, code)
        if balance is not None and slot.campaign.is_gift_card:
            slot.balances[code] = balance
            if uses:
                slot.gift_uses[code] = uses

    def load_control(self, code: str, control: Control) -> None:
        """Rebuild a code's own switch and window from its persisted row (no event)."""
        if code in self.codes and not control.is_default():
            self.controls[code] = control

    def load_redemption(self, r: Redemption) -> None:
        self.redemptions[r.id] = r
        slot = self.campaigns.get(r.campaign_id)
        if slot is None:
            return
        slot.redemption_count += 1
        if r.status == R_ROLLED_BACK:
            slot.rollback_count += 1
            return
        slot.uses += 1
        slot.discount_total += r.discount_amount
        slot.order_total += r.order_amount
        if slot.campaign.is_shared and r.customer_id is not None:
            slot.per_customer[r.customer_id] = slot.per_customer.get(r.customer_id, 0) + 1

    def load_reservation(self, r: Reservation) -> None:
        self.reservations[r.id] = r
        if r.state == HELD:
            self._hold(r)

    def load_idempotency(self, key: str, fp: bytes, response: bytes, at: datetime) -> None:
        self.idem[key] = (fp, response, at)

    def finish_recovery(self) -> None:
        """After loading: void what an ``end`` left unpersisted, expire stale holds."""
        self.events.clear()
        for slot in self._slots:
            if slot.campaign.state == "ended":
                self.events.append(CodesVoided(slot.campaign.id))
                for r in list(self.reservations.values()):
                    if r.campaign_id == slot.campaign.id and r.state == HELD:
                        self._close_reservation(r.id, RELEASED)
        self.expire_reservations()

    # --- the decision ------------------------------------------------------------------

    def _locate(self, raw_code: str, promotion: bool = False) -> tuple[str, CampaignSlot, int]:
        if not isinstance(raw_code, str) or not raw_code.strip() or len(raw_code) > MAX_CODE_LEN:
            raise errors.MalformedCode("code must be a non-empty string of at most 128 characters")
        code = raw_code if promotion else normalize(raw_code)
        if is_promotion_key(code) != promotion:
            raise errors.UnknownCode(f"no voucher has code {code!r}")
        packed = self.codes.get(code)
        if packed is None:
            self._check_owner(bucket_of(code))
            raise errors.UnknownCode(f"no voucher has code {code!r}")
        slot = self._slots[packed >> 2]
        return code, slot, _status(packed, slot)

    def _check(
        self, req: RedeemRequest, *, reservation: Reservation | None = None
    ) -> tuple[str, CampaignSlot, int, Pricing, int | None]:
        """Everything that must hold for ``req`` to redeem now; returns
        ``(code, slot, status, pricing, balance)`` or raises the reason it cannot."""
        _check_ids(req.customer_id, req.order_id)
        self.expire_reservations()
        code, slot, status = self._locate(req.code, req.promotion)
        c = slot.campaign
        check_redeemable_now(c, self.clock())
        if self.controls:
            ctl = self.controls.get(code)
            if ctl is not None:
                check_control(code, ctl, self.clock())
        order = req.order()
        check_order(c, order)
        cust = req.customer_id
        if req.tags is None and cust is not None and c.rules is not None and c.rules.customer is not None:
            raise errors.TagsNeeded(f"campaign {c.id} has customer rules: the customer's tags are needed")
        if c.is_shared:
            if c.limits.per_customer is not None and cust is None:
                raise errors.InvalidInput("customer_id is required: this code has a per-customer limit")
            self.check_shared_limits(code, slot, cust, reservation)
            return code, slot, status, stack(price(c, order, req.tags), order, req.taken), None
        balance = self.check_unique(code, slot, status, cust, reservation)
        return code, slot, status, stack(price(c, order, req.tags, balance), order, req.taken), balance

    def check_shared_limits(
        self, code: str, slot: CampaignSlot, cust: str | None, reservation: Reservation | None = None
    ) -> None:
        """A shared code's total and per-customer limit, open holds counted (a hold being
        confirmed counts once). Qualification asks the same (engine/qualification.py)."""
        c = slot.campaign
        total, per = c.limits.total, c.limits.per_customer
        mine = 1 if reservation is not None else 0
        if total is not None and slot.uses + slot.held_units - mine >= total:
            raise errors.Exhausted(f"code {code} reached its limit of {total} redemptions")
        if per is not None and cust is not None:
            used = slot.per_customer.get(cust, 0) + slot.held_by_customer.get(cust, 0) - mine
            if used >= per:
                raise errors.CustomerLimitReached(f"customer {cust} used code {code} {per} time(s) already")

    def check_unique(
        self,
        code: str,
        slot: CampaignSlot,
        status: int,
        cust: str | None,
        reservation: Reservation | None = None,
    ) -> int | None:
        """A unique code's status, hold, owner and a gift card's balance left (returned).
        Qualification asks the same (engine/qualification.py)."""
        c = slot.campaign
        if status == REDEEMED:
            if c.is_gift_card:
                raise errors.Exhausted(f"gift card {code} has no balance left")
            raise errors.AlreadyRedeemed(f"code {code} was redeemed already")
        if status == VOID:
            raise errors.CodeVoid(f"code {code} is void")
        holder = self.held.get(code)
        if holder is not None and (reservation is None or holder != reservation.id):
            raise errors.CodeReserved(f"code {code} is held by an open reservation")
        owner = slot.assigned_to.get(code)
        if owner is not None and owner != cust:
            raise errors.WrongCustomer(f"code {code} belongs to another customer")
        balance: int | None = None
        if c.is_gift_card:
            balance = slot.balances.get(code, 0)
            if balance <= 0:
                raise errors.Exhausted(f"gift card {code} has no balance left")
        return balance

    def validate(self, req: RedeemRequest) -> Validation:
        """Explain whether ``req`` would redeem now, without changing anything."""
        try:
            code, slot, _status, pricing, balance = self._check(req)
        except errors.TagsNeeded:
            raise
        except errors.VoucherError as exc:
            return Validation(code=_safe_code(req.code), valid=False, error=exc.code, message=exc.message)
        return Validation(
            code=code,
            valid=True,
            campaign_id=slot.campaign.id,
            discount_amount=pricing.discount,
            balance=balance,
            detail=detail_json(pricing) if req.has_cart() else None,
        )

    def redeem(self, req: RedeemRequest, *, reservation: Reservation | None = None) -> Redemption:
        code, slot, status, pricing, balance = self._check(req, reservation=reservation)
        discount = pricing.discount
        c = slot.campaign
        now = self.clock()
        cust = req.customer_id
        balance_after: int | None = None
        if c.is_shared:
            slot.uses += 1
            if cust is not None:
                slot.per_customer[cust] = slot.per_customer.get(cust, 0) + 1
            self.events.append(VoucherChanged(code, AVAILABLE, None, None, slot.uses))
        else:
            new_status: int = REDEEMED
            if c.is_gift_card:
                assert balance is not None
                balance_after = balance - discount
                slot.balances[code] = balance_after
                uses = slot.gift_uses[code] = slot.gift_uses.get(code, 0) + 1
                if balance_after > 0:
                    new_status = status  # a partly spent card stays what it was
            else:
                uses = 1
            # The code is not tied to the redeeming customer: the redemption record says
            # who used it, and a rollback puts the code back exactly as it was.
            self._set_status(code, slot, status, new_status)
            slot.uses += 1
            self.events.append(
                VoucherChanged(code, new_status, slot.assigned_to.get(code), balance_after, uses)
            )
        slot.discount_total += discount
        slot.order_total += req.amount
        slot.redemption_count += 1
        r = Redemption(
            id=new_id("red", bucket_of(code), self.random_bytes),
            campaign_id=c.id,
            code=code,
            customer_id=cust,
            order_id=req.order_id,
            order_amount=req.amount,
            currency=req.currency,
            discount_amount=discount,
            balance_after=balance_after,
            created_at=now,
            metadata=req.metadata,
            detail=detail_json(pricing) if req.has_cart() else None,
        )
        self.redemptions[r.id] = r
        self.events.append(RedemptionRecorded(r))
        return r

    def _set_status(self, code: str, slot: CampaignSlot, old: int, new: int) -> None:
        if old == new:
            return
        self.codes[code] = self._pack(slot.index, new)
        slot.counts[old] -= 1
        slot.counts[new] += 1
        if new == AVAILABLE:
            slot.available.append(code)

    def rollback(self, redemption_id: str) -> Redemption:
        """Undo a redemption exactly: the code, the quota and the balance come back."""
        r = self.redemptions.get(redemption_id)
        if r is None:
            raise errors.UnknownRedemption(f"no redemption has id {redemption_id!r}")
        if r.status == R_ROLLED_BACK:
            raise errors.AlreadyRolledBack(f"redemption {redemption_id} was rolled back already")
        slot = self.campaigns[r.campaign_id]
        now = self.clock()
        c = slot.campaign
        if c.is_shared:
            slot.uses -= 1
            if r.customer_id is not None:
                slot.per_customer[r.customer_id] -= 1
            self.events.append(VoucherChanged(r.code, AVAILABLE, None, None, slot.uses))
        else:
            status = _status(self.codes[r.code], slot)
            balance: int | None = None
            uses = 0
            if c.is_gift_card:
                balance = slot.balances.get(r.code, 0) + r.discount_amount
                slot.balances[r.code] = balance
                uses = slot.gift_uses[r.code] = max(0, slot.gift_uses.get(r.code, 0) - 1)
            owner = slot.assigned_to.get(r.code)
            if c.state == "ended":
                new_status: int = VOID
            elif c.is_gift_card and status != REDEEMED:
                new_status = status
            else:
                new_status = ASSIGNED if owner is not None else AVAILABLE
            self._set_status(r.code, slot, status, new_status)
            if new_status == status == AVAILABLE and not uses:
                slot.available.append(r.code)  # an untouched gift card is assignable again
            slot.uses -= 1
            self.events.append(VoucherChanged(r.code, new_status, owner, balance, uses))
        slot.discount_total -= r.discount_amount
        slot.order_total -= r.order_amount
        slot.rollback_count += 1
        rolled = msgspec.structs.replace(r, status=R_ROLLED_BACK, rolled_back_at=now)
        self.redemptions[r.id] = rolled
        self.events.append(RedemptionRolledBack(r.id, now))
        return rolled

    # --- reservations (hold → confirm / release, auto-release at TTL) -------------------

    def reserve(self, req: RedeemRequest) -> Reservation:
        self.expire_reservations()
        code, slot, _status, pricing, _balance = self._check(req)
        cart = req.has_cart() or req.tags is not None
        r = Reservation(
            id=new_id("res", bucket_of(code), self.random_bytes),
            campaign_id=slot.campaign.id,
            code=code,
            customer_id=req.customer_id,
            order_id=req.order_id,
            order_amount=req.amount,
            currency=req.currency,
            discount_amount=pricing.discount,
            expires_at=self.clock() + self.reservation_ttl,
            metadata=req.metadata,
            detail=detail_json(pricing) if req.has_cart() else None,
            cart=cart_json(req.shipping, req.items, req.tags) if cart else None,
        )
        self.reservations[r.id] = r
        self._hold(r)
        self.events.append(ReservationChanged(r))
        return r

    def _hold(self, r: Reservation) -> None:
        slot = self.campaigns.get(r.campaign_id)
        if slot is None:
            return
        if slot.campaign.is_shared:
            slot.held_units += 1
            if r.customer_id is not None:
                slot.held_by_customer[r.customer_id] = slot.held_by_customer.get(r.customer_id, 0) + 1
        else:
            self.held[r.code] = r.id
        heapq.heappush(self._expiry, (r.expires_at, r.id))

    def _unhold(self, r: Reservation) -> None:
        slot = self.campaigns[r.campaign_id]
        if slot.campaign.is_shared:
            slot.held_units -= 1
            if r.customer_id is not None:
                slot.held_by_customer[r.customer_id] -= 1
        elif self.held.get(r.code) == r.id:
            del self.held[r.code]

    def _open_reservation(self, reservation_id: str) -> Reservation:
        r = self.reservations.get(reservation_id)
        if r is None:
            raise errors.UnknownReservation(f"no reservation has id {reservation_id!r}")
        if r.state == HELD and r.expires_at <= self.clock():
            self._close_reservation(r.id, EXPIRED)
            r = self.reservations[r.id]
        if r.state != HELD:
            names = ("held", "confirmed", "released", "expired")
            raise errors.ReservationClosed(f"reservation {reservation_id} is {names[r.state]}")
        return r

    def _close_reservation(self, reservation_id: str, state: int, redemption_id: str | None = None) -> Reservation:
        r = self.reservations[reservation_id]
        self._unhold(r)
        closed = msgspec.structs.replace(r, state=state, redemption_id=redemption_id)
        self.reservations[r.id] = closed
        self.events.append(ReservationChanged(closed))
        return closed

    def confirm(self, reservation_id: str) -> Redemption:
        r = self._open_reservation(reservation_id)
        cart = read_cart(r.cart) if r.cart is not None else Cart()
        req = RedeemRequest(
            code=r.code,
            amount=r.order_amount,
            currency=r.currency,
            customer_id=r.customer_id,
            order_id=r.order_id,
            metadata=r.metadata,
            shipping=cart.shipping,
            items=cart.items,
            tags=cart.tags,
        )
        redemption = self.redeem(req, reservation=r)
        self._close_reservation(r.id, CONFIRMED, redemption.id)
        return redemption

    def release(self, reservation_id: str) -> Reservation:
        r = self._open_reservation(reservation_id)
        return self._close_reservation(r.id, RELEASED)

    def expire_reservations(self) -> int:
        """Expire every hold past its TTL; O(log n) per expired hold, O(1) when none is due,
        so every decision can call it and a stale hold never blocks a code."""
        now = self.clock()
        n = 0
        while self._expiry and self._expiry[0][0] <= now:
            _, rid = heapq.heappop(self._expiry)
            r = self.reservations.get(rid)
            if r is not None and r.state == HELD:
                self._close_reservation(rid, EXPIRED)
                n += 1
        return n

    # --- assignment ----------------------------------------------------------------------

    def assign(self, campaign_id: str, customer_id: str) -> Assignment:
        """Give the customer a code from this shard's bank; the same one on a re-run."""
        _check_ids(customer_id, None)
        if not customer_id:
            raise errors.InvalidInput("customer_id is required")
        slot = self.campaigns.get(campaign_id)
        if slot is None:
            raise errors.UnknownCampaign(f"unknown campaign {campaign_id!r}")
        c = slot.campaign
        if c.state == "ended":
            raise errors.CampaignEnded(f"campaign {campaign_id} has ended")
        if c.is_promotion:
            raise errors.InvalidInput(f"campaign {campaign_id} is a promotion: it has no code to give")
        if c.shared_code is not None:
            return Assignment(campaign_id, customer_id, c.shared_code, False)
        existing = slot.by_customer.get(customer_id)
        if existing is not None:
            return Assignment(campaign_id, customer_id, existing, False)
        self.expire_reservations()
        available = self._pack(slot.index, AVAILABLE)
        held_back: list[str] = []
        found: str | None = None
        while slot.available:
            code = slot.available.pop()
            if self.codes.get(code) != available or slot.gift_uses.get(code):
                continue  # stale entry, or a gift card someone has started spending
            if code in self.held:
                held_back.append(code)  # back on the stack: the hold may be released
                continue
            ctl = self.controls.get(code)
            if ctl is not None and not usable(ctl, self.clock()):
                continue  # off or past its window: back on the stack if switched on
            found = code
            break
        slot.available.extend(reversed(held_back))
        if found is None:
            raise errors.BankExhausted(f"campaign {campaign_id} has no available code left here")
        code = found
        self._set_status(code, slot, AVAILABLE, ASSIGNED)
        self._give(slot, code, customer_id)
        slot.by_customer[customer_id] = code
        self.events.append(
            VoucherChanged(code, ASSIGNED, customer_id, slot.balances.get(code), 0)
        )
        return Assignment(campaign_id, customer_id, code, True)

    def _give(self, slot: CampaignSlot, code: str, customer_id: str) -> None:
        """``code`` (this shard's) now belongs to ``customer_id``: its owner, and an entry
        of :meth:`codes_of`."""
        if slot.assigned_to.get(code) == customer_id:
            return
        slot.assigned_to[code] = customer_id
        have = self.customer_codes.get(customer_id)
        if have is None:
            self.customer_codes[customer_id] = code
        elif isinstance(have, str):
            self.customer_codes[customer_id] = [have, code]
        else:
            have.append(code)

    def codes_of(self, customer_id: str) -> list[str]:
        """The codes of this shard assigned to ``customer_id``, every campaign (several of
        one campaign when an import gave them), in the order they were given."""
        have = self.customer_codes.get(customer_id)
        if have is None:
            return []
        return [have] if isinstance(have, str) else list(have)

    def slot_of(self, code: str) -> CampaignSlot:
        """The campaign slot of one of this shard's codes."""
        return self._slots[self.codes[code] >> 2]

    def assignments_of(self, campaign_id: str, customers: Iterable[str]) -> dict[str, str]:
        """The codes this shard knows the customers were given (its own or recorded)."""
        slot = self.campaigns.get(campaign_id)
        if slot is None:
            return {}
        return {c: slot.by_customer[c] for c in customers if c in slot.by_customer}

    def record_foreign(self, campaign_id: str, customer_id: str, code: str) -> Assignment:
        """Record, on the deciding shard, that the customer got ``code`` from another
        shard's bank (that shard assigned it). A customer who already has a code keeps it:
        the first record wins, so a re-run never gives a second one."""
        slot = self.campaigns.get(campaign_id)
        if slot is None:
            raise errors.UnknownCampaign(f"unknown campaign {campaign_id!r}")
        existing = slot.by_customer.get(customer_id)
        if existing is not None:
            return Assignment(campaign_id, customer_id, existing, False)
        slot.by_customer[customer_id] = code
        self.events.append(
            AssignmentRecorded(
                campaign_id, customer_id, code, bucket_of(assignment_key(campaign_id, customer_id))
            )
        )
        return Assignment(campaign_id, customer_id, code, True)

    def load_assignment(self, campaign_id: str, customer_id: str, code: str) -> None:
        """Rebuild a recorded foreign assignment (no event)."""
        slot = self.campaigns.get(campaign_id)
        if slot is not None:
            slot.by_customer.setdefault(customer_id, code)

    # --- a code's own switch, window and metadata ----------------------------------------

    def control(self, raw_code: str, changes: dict[str, Any], actor: Actor) -> dict[str, Any]:
        """Apply a shop's change to one code: ``active``, ``starts_at``, ``expires_at``
        (``None`` clears the code's own bound) and ``metadata`` (a JSON object, ``None``
        clears it); fields absent from ``changes`` stay. Returns the code as
        :meth:`voucher` shows it, with the metadata when this change set it."""
        code, slot, status = self._locate(raw_code)
        old = self.controls.get(code, DEFAULT_CONTROL)
        applied = change_control(old, changes)
        new = applied.control
        if new.is_default():
            self.controls.pop(code, None)
        else:
            self.controls[code] = new
        if not old.active and new.active and status == AVAILABLE and not slot.campaign.is_shared:
            slot.available.append(code)  # assignable again (a stale duplicate is skipped)
        now = self.clock()
        self.events.append(
            VoucherControlled(
                code=code,
                campaign_id=slot.campaign.id,
                control=new,
                metadata=applied.metadata_text,
                metadata_set=applied.metadata_set,
                change=metadata.encoded(applied.change),
                actor=actor,
                event_id=new_id("evt", bucket_of(code), self.random_bytes),
                at=now,
            )
        )
        out = self.voucher(code)
        if applied.metadata_set:
            out["metadata"] = changes["metadata"]
        return out

    # --- idempotent entry points used by the actor --------------------------------------

    def run(
        self, op: str, req: Any, key: str | None, route: int, fn: Callable[[], Outcome]
    ) -> Outcome:
        """Run ``fn`` once per idempotency key: a replay gets the first answer back.

        ``route`` is the bucket the request was routed by (its code's or its id's), stored
        with the key so the shard that owns that bucket reloads it after a restart. A
        request routed to a bucket this shard does not own is refused (``not_owner``,
        not recorded): its caller's topology is stale.

        Keys this shard does not remember are decided by storage first (the actor's
        claim, applied with :meth:`accept_claims`); without a claim the key is decided
        by memory alone. Only final answers are recorded: a transient rejection ("not
        now") is answered, and a retry with the same key runs for real."""
        if self._owned is not None and self._owned[route] != 1:
            return _reject(errors.NotOwner(f"bucket {route} belongs to another shard; retry"))
        if key is not None:
            if not _valid_key(key):
                return _reject(
                    errors.InvalidInput(f"an idempotency key must be 1-{MAX_KEY_LEN} characters")
                )
            fp = fingerprint(op, req)
            seen = self._remembered(key)
            if seen is not None:
                if seen[0] != fp:
                    return _reject(_conflict(key))
                return _outcome_decoder.decode(seen[1])
            held = self._claims.get(key)
            if held is not None:
                if held.fingerprint != fp:
                    return _reject(_conflict(key))
                if held.verdict is not Verdict.MINE:
                    return _reject(
                        errors.IdempotencyInProgress(
                            f"a request with idempotency key {key!r} is being decided; retry"
                        )
                    )
        try:
            out = fn()
        except errors.Unavailable:
            raise
        except errors.VoucherError as exc:
            out = _reject(exc)
        if key is not None and not (
            out.rejection is not None and errors.is_transient(out.rejection.error)
        ):
            now = self.clock()
            body = _outcome_encoder.encode(out)
            self.idem[key] = (fp, body, now)
            self.events.append(IdempotencyRecorded(key, route, fp, body, now))
        return out

    def _remembered(self, key: str) -> tuple[bytes, bytes, datetime] | None:
        seen = self.idem.get(key)
        ttl = self.idempotency_ttl
        if seen is not None and ttl is not None and seen[2] < self.clock() - ttl:
            del self.idem[key]  # expired: the key may run again
            return None
        return seen

    def claims_for(self, op: str, items: Iterable[Any]) -> list[Claim]:
        """The keys of a batch that storage must decide before this shard may: keyed,
        well-formed, routed to a bucket owned here, not remembered (each key once)."""
        out: list[Claim] = []
        seen: set[str] = set()
        now = self.clock()
        for item in items:
            body, key, route = _spec(op, item)
            if key is None or key in seen or not _valid_key(key):
                continue
            if self._owned is not None and self._owned[route] != 1:
                continue
            if self._remembered(key) is not None:
                continue
            seen.add(key)
            out.append(Claim(key, route, fingerprint(op, body), now))
        return out

    def accept_claims(self, claims: Sequence[Claim], stored: Iterable[Stored]) -> None:
        """Apply storage's answer to :meth:`claims_for`'s claims until :meth:`end_claims`.
        A committed answer found there is remembered like one decided here."""
        for key, settled in settle(claims, stored).items():
            if settled.verdict is Verdict.FINAL:
                assert settled.response is not None and settled.at is not None
                self.idem[key] = (settled.fingerprint, settled.response, settled.at)
            else:
                self._claims[key] = settled

    def end_claims(self, keys: Iterable[str]) -> None:
        """Forget the verdicts of a decided batch: what it recorded is remembered now, and
        a key it left unrecorded (a transient answer) must be claimed again."""
        for key in keys:
            self._claims.pop(key, None)

    def redeem_one(self, req: RedeemRequest) -> Outcome:
        body, key, route = _spec("redeem", req)
        return self.run("redeem", body, key, route, lambda: Outcome(redemption=self.redeem(req)))

    def validate_one(self, req: RedeemRequest) -> Outcome:
        route = route_bucket(req.code)
        if self._owned is not None and self._owned[route] != 1:
            return _reject(errors.NotOwner(f"bucket {route} belongs to another shard; retry"))
        try:
            return Outcome(validation=self.validate(req))
        except errors.TagsNeeded as exc:
            return _reject(exc)

    def reserve_one(self, req: RedeemRequest) -> Outcome:
        body, key, route = _spec("reserve", req)
        return self.run("reserve", body, key, route, lambda: Outcome(reservation=self.reserve(req)))

    def rollback_one(self, redemption_id: str, key: str | None = None) -> Outcome:
        body, key, route = _spec("rollback", (redemption_id, key))
        return self.run(
            "rollback", body, key, route, lambda: Outcome(redemption=self.rollback(redemption_id))
        )

    def confirm_one(self, reservation_id: str, key: str | None = None) -> Outcome:
        body, key, route = _spec("confirm", (reservation_id, key))
        return self.run(
            "confirm", body, key, route, lambda: Outcome(redemption=self.confirm(reservation_id))
        )

    def release_one(self, reservation_id: str, key: str | None = None) -> Outcome:
        body, key, route = _spec("release", (reservation_id, key))
        return self.run(
            "release", body, key, route, lambda: Outcome(reservation=self.release(reservation_id))
        )

    def assign_one(self, campaign_id: str, customer_id: str) -> Outcome:
        try:
            return Outcome(assignment=self.assign(campaign_id, customer_id))
        except errors.VoucherError as exc:
            return _reject(exc)

    def prune_idempotency(self, older_than: datetime) -> int:
        stale = [k for k, (_, _, at) in self.idem.items() if at < older_than]
        for k in stale:
            del self.idem[k]
        return len(stale)

    # --- reads ---------------------------------------------------------------------------

    def stats(self, campaign_id: str) -> CampaignStats:
        slot = self.campaigns.get(campaign_id)
        if slot is None:
            return CampaignStats(campaign_id)
        return CampaignStats(
            campaign_id=campaign_id,
            available=slot.counts[AVAILABLE],
            assigned=slot.counts[ASSIGNED],
            redeemed=slot.counts[REDEEMED],
            void=slot.counts[VOID],
            redemptions=slot.redemption_count,
            rollbacks=slot.rollback_count,
            active_redemptions=slot.uses,
            held=slot.held_units + sum(1 for c in self.held if self.codes[c] >> 2 == slot.index),
            discount_total=slot.discount_total,
            order_total=slot.order_total,
            gift_balance_outstanding=sum(
                b for c, b in slot.balances.items() if self.codes.get(c, VOID) & 3 != VOID
            )
            if slot.campaign.is_gift_card and slot.campaign.state != "ended"
            else 0,
        )

    def voucher(self, raw_code: str) -> dict[str, Any]:
        code, slot, status = self._locate(raw_code)
        c = slot.campaign
        out: dict[str, Any] = {
            "code": code,
            "campaign_id": c.id,
            "status": STATUS_NAMES[status],
            "customer_id": slot.assigned_to.get(code),
            "reserved": code in self.held,
        }
        ctl = self.controls.get(code, DEFAULT_CONTROL)
        out["active"] = ctl.active
        out["starts_at"] = ctl.starts_at
        out["expires_at"] = ctl.expires_at
        if c.is_gift_card:
            out["balance"] = slot.balances.get(code, 0)
        if c.is_shared:
            out["redemptions"] = slot.uses
            out["limit"] = c.limits.total
        return out

    def drain(self, limit: int | None = None) -> list[Event]:
        """Take the pending events, the oldest ``limit`` of them when given."""
        if limit is None or limit >= len(self.events):
            out, self.events = self.events, []
            return out
        out = self.events[:limit]
        del self.events[:limit]
        return out


def bucket_of_reference(ident: str) -> int:
    """The bucket of a redemption or reservation id; raises if the id is malformed."""
    b = bucket_of_id(ident) if isinstance(ident, str) else None
    if b is None:
        raise errors.InvalidInput(f"{ident!r} is not a redemption or reservation id")
    return b


def _spec(op: str, item: Any) -> tuple[Any, str | None, int]:
    """``(body, key, route)`` of one request of a batch: the body its fingerprint covers
    (without the key), its idempotency key, and the bucket it is routed by. ``item`` is a
    :class:`RedeemRequest` for ``redeem``/``reserve``, an ``(id, key)`` pair otherwise."""
    if op in ("redeem", "reserve"):
        body = msgspec.structs.replace(item, idempotency_key=None)
        return body, item.idempotency_key, route_bucket(item.code)
    ref, key = item
    return ref, key, (bucket_of_id(ref) if isinstance(ref, str) else None) or 0


def _valid_key(key: Any) -> bool:
    return isinstance(key, str) and 1 <= len(key) <= MAX_KEY_LEN


def _conflict(key: str) -> errors.IdempotencyConflict:
    return errors.IdempotencyConflict(f"idempotency key {key!r} was used with a different request")


def _status(packed: int, slot: CampaignSlot) -> int:
    """A code's status: an unredeemed code of an ended campaign is void."""
    status = packed & 3
    if status < REDEEMED and slot.campaign.state == "ended":
        return VOID
    return status


def _check_ids(customer_id: str | None, order_id: str | None) -> None:
    for name, value in (("customer_id", customer_id), ("order_id", order_id)):
        if value is not None and (not isinstance(value, str) or len(value) > MAX_ID_LEN):
            raise errors.InvalidInput(f"{name} must be a string of at most {MAX_ID_LEN} characters")
        if value is not None and "\x00" in value:  # Postgres text cannot hold it
            raise errors.InvalidInput(f"{name} must not contain NUL characters")


def _safe_code(raw: Any) -> str:
    return normalize(raw)[:MAX_CODE_LEN] if isinstance(raw, str) else ""


def _reject(exc: errors.VoucherError) -> Outcome:
    return Outcome(rejection=Rejection(exc.code, exc.message))

