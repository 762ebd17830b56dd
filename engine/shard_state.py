"""The state of one shard: its vouchers, shared codes, redemptions, reservations and
idempotency records, and every rule that decides a redemption.

Pure: no I/O, clock and randomness injected. Every change appends an event to
``self.events``; the actor hands them to the write-behind path. A ``ShardState`` is
driven by one thread of control (the actor's event loop), so no method awaits and each
decision is atomic.

In three layers, each on the one before: :class:`engine.shard_bank.ShardBank` (the codes,
their slots and holders, and their memory), :class:`engine.shard_decisions.ShardDecisions`
(the campaigns here and every decision), and :class:`ShardState` here: assignment, a code's
own switch, recovery from Postgres, the idempotent entry points the actor calls, and reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

import msgspec

from engine import errors, metadata
from engine.audit import Actor
from engine.checkouts import RedeemRequest, fingerprint, route_bucket
from engine.code_control import change_control, usable
from engine.events import (
    ASSIGNED,
    AVAILABLE,
    DEFAULT_CONTROL,
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
    Redemption,
    Rejection,
    Reservation,
    Validation,
    VoucherChanged,
    VoucherControlled,
)
from engine.idempotency import Claim, Stored, Verdict, settle
from engine.routing import assignment_key, bucket_of, bucket_of_id, new_id
from engine.shard_bank import MAX_KEY_LEN, CampaignSlot, Clock, RandomBytes, ShardBank, check_ids
from engine.shard_decisions import ShardDecisions

__all__ = [
    "CampaignSlot",
    "CampaignStats",
    "Clock",
    "Outcome",
    "RandomBytes",
    "RedeemRequest",
    "ShardBank",
    "ShardDecisions",
    "ShardState",
    "bucket_of_reference",
    "fingerprint",
    "route_bucket",
]


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


class ShardState(ShardDecisions):
    """One shard's state, as its actor drives it."""

    # --- assignment ----------------------------------------------------------------------

    def assign(self, campaign_id: str, customer_id: str) -> Assignment:
        """Give the customer a code from this shard's bank; the same one on a re-run."""
        check_ids(customer_id, None)
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








def _reject(exc: errors.VoucherError) -> Outcome:
    return Outcome(rejection=Rejection(exc.code, exc.message))
