"""What a shard tells the persistence layer, and the records it answers with.

Events are facts about state that already changed in memory; the write-behind path
persists them in order, one transaction per batch. They are msgspec Structs so they
cross process boundaries cheaply and encode to msgpack without custom code.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum

import msgspec

from engine.audit import Actor


class VoucherStatus(IntEnum):
    """A code's state: the integer stored in ``vouchers.status`` and in the shard's packed
    code table (two low bits), its lower-case name on the wire of the HTTP API."""

    AVAILABLE = 0
    ASSIGNED = 1
    REDEEMED = 2
    VOID = 3


class RedemptionStatus(IntEnum):
    """``redemptions.status``."""

    ACTIVE = 0
    ROLLED_BACK = 1


class ReservationState(IntEnum):
    """``reservations.state``."""

    HELD = 0
    CONFIRMED = 1
    RELEASED = 2
    EXPIRED = 3


AVAILABLE, ASSIGNED, REDEEMED, VOID = VoucherStatus
STATUS_NAMES = tuple(s.name.lower() for s in VoucherStatus)
R_ACTIVE, R_ROLLED_BACK = RedemptionStatus
HELD, CONFIRMED, RELEASED, EXPIRED = ReservationState
RESERVATION_STATES = tuple(s.name.lower() for s in ReservationState)


class Redemption(msgspec.Struct, frozen=True):
    id: str
    campaign_id: str
    code: str
    customer_id: str | None
    order_id: str | None
    order_amount: int
    currency: str
    discount_amount: int
    balance_after: int | None
    created_at: datetime
    status: int = R_ACTIVE
    rolled_back_at: datetime | None = None
    metadata: str | None = None  # compact JSON, as the request gave it
    #: how the discount falls on the order's lines and shipping, as compact JSON
    #: (engine.pricing.detail_json); None for an amount-only order
    detail: str | None = None


class Reservation(msgspec.Struct, frozen=True):
    id: str
    campaign_id: str
    code: str
    customer_id: str | None
    order_id: str | None
    order_amount: int
    currency: str
    discount_amount: int
    expires_at: datetime
    state: int = HELD
    redemption_id: str | None = None
    metadata: str | None = None  # compact JSON, carried into its redemption
    detail: str | None = None  # as Redemption.detail
    #: the order's lines, shipping and customer tags (engine.pricing.cart_json), so its
    #: confirm prices the order it held; None for an amount-only order
    cart: str | None = None


class Validation(msgspec.Struct, frozen=True):
    """The answer to "may this order use this code now?" with the reason when not."""

    code: str
    valid: bool
    campaign_id: str | None = None
    discount_amount: int = 0
    balance: int | None = None
    error: str | None = None
    message: str | None = None
    detail: str | None = None  # as Redemption.detail


class ImportedCode(msgspec.Struct, frozen=True):
    """One of a shop's own codes brought into a campaign (engine/code_import.py)."""

    code: str
    customer_id: str | None = None
    expires_at: datetime | None = None
    metadata: str | None = None  # compact JSON


class Rejection(msgspec.Struct, frozen=True):
    """A typed engine error, as it crosses the actor boundary."""

    error: str
    message: str


class Assignment(msgspec.Struct, frozen=True):
    campaign_id: str
    customer_id: str
    code: str
    created: bool


# --- events the write-behind path persists ---------------------------------------------


class VoucherChanged(msgspec.Struct, frozen=True, tag=True):
    """Latest state of one voucher row (coalesced per batch: last one wins)."""

    code: str
    status: int
    customer_id: str | None
    balance: int | None
    uses: int


class RedemptionRecorded(msgspec.Struct, frozen=True, tag=True):
    redemption: Redemption


class RedemptionRolledBack(msgspec.Struct, frozen=True, tag=True):
    id: str
    at: datetime


class ReservationChanged(msgspec.Struct, frozen=True, tag=True):
    reservation: Reservation


class IdempotencyRecorded(msgspec.Struct, frozen=True, tag=True):
    key: str
    bucket: int
    fingerprint: bytes
    response: bytes
    at: datetime


class CodesVoided(msgspec.Struct, frozen=True, tag=True):
    """Every unredeemed code of the campaign in this shard's buckets became void."""

    campaign_id: str


class AssignmentRecorded(msgspec.Struct, frozen=True, tag=True):
    """The deciding shard's record of an assignment served from another shard's bank
    (the code lives there; ``bucket`` is the assignment key's, so this shard reloads it)."""

    campaign_id: str
    customer_id: str
    code: str
    bucket: int


class Control(msgspec.Struct, frozen=True):
    """A code's own switch and window (narrowing its campaign's). The default -- on, no
    window of its own -- is not kept per code."""

    active: bool = True
    starts_at: datetime | None = None
    expires_at: datetime | None = None

    def is_default(self) -> bool:
        return self.active and self.starts_at is None and self.expires_at is None


DEFAULT_CONTROL = Control()


class VoucherControlled(msgspec.Struct, frozen=True, tag=True):
    """A shop changed one code on its own: its switch, window or metadata. Persisted with
    its ``voucher.updated`` event and its audit entry in one transaction.

    ``metadata`` is the code's compact JSON metadata when this change set it
    (``metadata_set``; ``None`` then clears it); ``change`` is ``{field: [before, after]}``
    as JSON (metadata's "before" is not held in memory and is written as ``null``)."""

    code: str
    campaign_id: str
    control: Control
    metadata: str | None
    metadata_set: bool
    change: str
    actor: Actor
    event_id: str
    at: datetime


Event = (
    VoucherChanged
    | VoucherControlled
    | RedemptionRecorded
    | RedemptionRolledBack
    | ReservationChanged
    | IdempotencyRecorded
    | CodesVoided
    | AssignmentRecorded
)


@dataclass
class Batch:
    """One group commit's events sorted by the table they change: the last change of a
    code or a reservation wins, the rest keep their order."""

    vouchers: dict[str, VoucherChanged] = field(default_factory=dict)
    redemptions: list[Redemption] = field(default_factory=list)
    rollbacks: list[RedemptionRolledBack] = field(default_factory=list)
    reservations: dict[str, Reservation] = field(default_factory=dict)
    idempotency: list[IdempotencyRecorded] = field(default_factory=list)
    voided: list[str] = field(default_factory=list)  # campaigns whose codes were voided
    foreign: list[AssignmentRecorded] = field(default_factory=list)
    controls: list[VoucherControlled] = field(default_factory=list)  # in order

    @classmethod
    def of(cls, events: Iterable[Event]) -> Batch:
        b = cls()
        for e in events:
            if isinstance(e, VoucherChanged):
                b.vouchers[e.code] = e
            elif isinstance(e, RedemptionRecorded):
                b.redemptions.append(e.redemption)
            elif isinstance(e, RedemptionRolledBack):
                b.rollbacks.append(e)
            elif isinstance(e, ReservationChanged):
                b.reservations[e.reservation.id] = e.reservation
            elif isinstance(e, IdempotencyRecorded):
                b.idempotency.append(e)
            elif isinstance(e, CodesVoided):
                b.voided.append(e.campaign_id)
            elif isinstance(e, AssignmentRecorded):
                b.foreign.append(e)
            elif isinstance(e, VoucherControlled):
                b.controls.append(e)
        return b

    def writes_rows(self) -> bool:
        """Whether a statement is needed (voided codes are written off the commit)."""
        return bool(
            self.vouchers or self.redemptions or self.rollbacks or self.reservations
            or self.idempotency or self.foreign or self.controls
        )
