"""Every rule that decides on a shard's codes: the campaigns replicated here, a code's
check, validation, redemption and its rollback, and holds (reserve, confirm, release,
expiry at their TTL). Pure and synchronous, as :class:`engine.shard_state.ShardState`."""


from __future__ import annotations

import heapq

import msgspec

from engine import errors
from engine.campaigns import (
    Campaign,
    check_order,
    check_redeemable_now,
    supersedes,
)
from engine.checkouts import MAX_CODE_LEN, RedeemRequest
from engine.code_control import check_control
from engine.codes import normalize
from engine.events import (
    ASSIGNED,
    AVAILABLE,
    CONFIRMED,
    EXPIRED,
    HELD,
    R_ROLLED_BACK,
    REDEEMED,
    RELEASED,
    VOID,
    CodesVoided,
    Redemption,
    RedemptionRecorded,
    RedemptionRolledBack,
    Reservation,
    ReservationChanged,
    Validation,
    VoucherChanged,
)
from engine.pricing import Cart, Pricing, cart_json, detail_json, price, read_cart
from engine.promotions import is_key as is_promotion_key
from engine.promotions import stack
from engine.routing import bucket_of, new_id
from engine.shard_bank import CampaignSlot, ShardBank, check_ids, code_status, safe_code


class ShardDecisions(ShardBank):
    """The decisions of a shard, on its bank."""

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
        assigned *reads* as void (:func:`engine.shard_bank.code_status`); its row is voided in Postgres by the
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
        return code, slot, code_status(packed, slot)

    def _check(
        self, req: RedeemRequest, *, reservation: Reservation | None = None
    ) -> tuple[str, CampaignSlot, int, Pricing, int | None]:
        """Everything that must hold for ``req`` to redeem now; returns
        ``(code, slot, status, pricing, balance)`` or raises the reason it cannot."""
        check_ids(req.customer_id, req.order_id)
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
            return Validation(code=safe_code(req.code), valid=False, error=exc.code, message=exc.message)
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
            status = code_status(self.codes[r.code], slot)
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
