"""The voucher bank of one shard: its campaigns' slots, its codes packed with their
status, and whose each code is. What :class:`engine.shard_decisions.ShardDecisions` decides
on and :class:`engine.shard_state.ShardState` serves; no decision here.

Memory: the code index is one ``dict[str, int]`` whose value packs the campaign slot and
the status (``slot << 2 | status``), with the packed ints interned, so a code held costs
its string, a dict entry and a list slot (the available stack): about 110 bytes for a
10-character code. Per-code extras (assignee, gift balance) live in sparse dicts. An
assigned code costs about 107 bytes more (measured over a million): its owner, the
campaign's customer -> code entry, and the shard's customer -> codes index qualification
reads (:meth:`ShardBank.codes_of`, about 40 of those bytes).
"""


from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from engine import errors
from engine.campaigns import (
    Campaign,
)
from engine.checkouts import MAX_CODE_LEN
from engine.codes import normalize
from engine.events import (
    ASSIGNED,
    AVAILABLE,
    REDEEMED,
    VOID,
    CodesVoided,
    Control,
    Event,
    ImportedCode,
    Redemption,
    Reservation,
)
from engine.idempotency import Settled
from engine.routing import BUCKETS

Clock = Callable[[], datetime]
RandomBytes = Callable[[int], bytes]
MAX_ID_LEN = 128
# A key as the shard sees it: the caller's key (at most 255 characters) behind the
# gateway's caller scope.
MAX_KEY_LEN = 512


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


class ShardBank:
    """A shard's campaigns, codes and holders, as its decisions read them."""

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

    # --- who holds which code ---------------------------------------------------------

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

def code_status(packed: int, slot: CampaignSlot) -> int:
    """A code's status: an unredeemed code of an ended campaign is void."""
    status = packed & 3
    if status < REDEEMED and slot.campaign.state == "ended":
        return VOID
    return status

def check_ids(customer_id: str | None, order_id: str | None) -> None:
    for name, value in (("customer_id", customer_id), ("order_id", order_id)):
        if value is not None and (not isinstance(value, str) or len(value) > MAX_ID_LEN):
            raise errors.InvalidInput(f"{name} must be a string of at most {MAX_ID_LEN} characters")
        if value is not None and "\x00" in value:  # Postgres text cannot hold it
            raise errors.InvalidInput(f"{name} must not contain NUL characters")


def safe_code(raw: Any) -> str:
    return normalize(raw)[:MAX_CODE_LEN] if isinstance(raw, str) else ""
