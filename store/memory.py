"""The in-memory twin of :class:`store.shards.PgShardStore`: the same tables in dicts, the
same statement semantics, for tests that need a shard's storage without a database.

What it keeps, as Postgres would:

* ``campaigns``: the coordinator's rows (:meth:`MemoryShardStore.put_campaign` stands in
  for ``store/campaigns.py``: a new shared-code campaign gets its code's row), each with
  the revision of its last change;
* ``vouchers``: ``code -> [campaign_id, status, customer_id, balance, uses]`` (a code's
  bucket is ``bucket_of(code)``, as stored);
* ``redemptions``, ``reservations``, ``assignments`` and ``idempotency`` rows;
* ``controls`` (a code's own switch and window, when not the default), ``metadata``
  (a code's, as JSON text), ``events`` (``(id, type)`` of the events written) and
  ``audit`` (``(actor, action, resource_id)``);
* ``owners``: the epochs of the writers. Every write checks the store's ``fence`` first
  and is refused as a whole (:class:`engine.errors.Fenced`, or
  :class:`engine.errors.ClaimLost` when the stored epoch went back) like
  ``voucher_fence``; :meth:`MemoryShardStore.bump` is another owner taking over.

A write is all or nothing: it is checked (fence, duplicate keys) before any row changes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec

from engine import errors
from engine.audit import Actor
from engine.campaigns import Campaign
from engine.events import (
    ASSIGNED,
    AVAILABLE,
    R_ROLLED_BACK,
    VOID,
    Batch,
    Control,
    Event,
    ImportedCode,
    Redemption,
    Reservation,
)
from engine.idempotency import Claim, Stored
from engine.routing import bucket_of
from engine.shard_state import ShardState
from store.fencing import Fence, shard_owner


@dataclass
class KeyRow:
    """One row of ``idempotency_keys``."""

    bucket: int
    fingerprint: bytes
    response: bytes | None
    created_at: datetime
    claim_token: bytes | None = None


class MemoryShardStore:
    """A :class:`store.shards.ShardStore` over dicts (see the module docstring)."""

    def __init__(self, fence: Fence | None = None) -> None:
        self.fence = fence
        self.owners: dict[str, int] = {} if fence is None else {fence.owner: fence.epoch}
        self.topology: dict[str, int] = {}
        #: what identifies the "server": a new value is a restart or failover
        self.server: object = object()
        self.revision = 0
        self.campaigns: dict[str, tuple[int, Campaign]] = {}
        self.vouchers: dict[str, list[Any]] = {}
        self.redemptions: dict[str, Redemption] = {}
        self.reservations: dict[str, Reservation] = {}
        #: ``(campaign_id, customer_id) -> (code, bucket)``; the bucket is the assignment's
        self.assignments: dict[tuple[str, str], tuple[str, int]] = {}
        self.idempotency: dict[str, KeyRow] = {}
        self.controls: dict[str, Control] = {}
        self.metadata: dict[str, str | None] = {}
        self.events: list[tuple[str, str]] = []
        self.audit: list[tuple[Actor, str, str]] = []
        self.closed = False

    # --- the coordinator's side and the owners --------------------------------------

    def put_campaign(self, c: Campaign) -> None:
        """Insert or update a campaign row (a new revision)."""
        self.revision += 1
        is_new = c.id not in self.campaigns
        self.campaigns[c.id] = (self.revision, c)
        if is_new and c.shared_code is not None:
            self._add_codes(c.id, [c.shared_code], None)

    def bump(self, owner: str) -> int:
        """A new epoch for ``owner``: its holder's next write is refused."""
        self.owners[owner] = self.owners.get(owner, 0) + 1
        return self.owners[owner]

    def _check(self, fence: Fence | None) -> None:
        if fence is None:
            return
        held = self.owners.get(fence.owner)
        if held is None or held < fence.epoch:
            raise errors.ClaimLost(
                f"writer {fence.owner} at epoch {fence.epoch} lost its claim: the database"
                f" holds epoch {held}"
            )
        if held != fence.epoch:
            raise errors.Fenced(
                f"writer {fence.owner} at epoch {fence.epoch} is fenced: a newer owner holds it"
            )

    async def claim(self, namespace: str, shard_id: int, shards: int) -> Any:
        stored = self.topology.setdefault(namespace, shards)
        if stored != shards or not 0 <= shard_id < shards:
            raise errors.Fenced(
                f"shard {shard_id} of {shards} belongs to a replaced topology: "
                f"deployment {namespace!r} has {stored} shards"
            )
        owner = shard_owner(namespace, shard_id)
        self.fence = Fence(owner, self.bump(owner))
        return self.server

    async def check_epoch(self, timeout: float) -> tuple[int | None, Any]:
        assert self.fence is not None
        return self.owners.get(self.fence.owner), self.server

    async def campaigns_since(self, revision: int) -> list[tuple[int, Campaign]]:
        return sorted((rc for rc in self.campaigns.values() if rc[0] > revision), key=lambda rc: rc[0])

    async def close(self) -> None:
        self.closed = True

    def terminate(self) -> None:
        self.closed = True

    # --- the shard's side ------------------------------------------------------------

    async def load(self, state: ShardState, buckets: list[int], idem_since: datetime) -> None:
        """Rebuild ``state`` from the rows of ``buckets`` (campaigns first)."""
        mine = set(buckets)
        for _, c in sorted(self.campaigns.values(), key=lambda rc: (rc[1].created_at, rc[1].id)):
            state.put_campaign(c)
        state.events.clear()
        for code, (cid, status, customer_id, balance, uses) in self.vouchers.items():
            if bucket_of(code) in mine:
                state.load_voucher(code, cid, status, customer_id, balance, uses)
        for code, ctl in self.controls.items():
            if bucket_of(code) in mine:
                state.load_control(code, ctl)
        for r in sorted(self.redemptions.values(), key=lambda r: r.created_at):
            if bucket_of(r.code) in mine:
                state.load_redemption(r)
        for res in self.reservations.values():
            if bucket_of(res.code) in mine:
                state.load_reservation(res)
        for key, row in self.idempotency.items():
            if row.bucket in mine and row.created_at >= idem_since and row.response is not None:
                state.load_idempotency(key, row.fingerprint, row.response, row.created_at)
        for (cid, customer_id), (code, bucket) in self.assignments.items():
            if bucket in mine:
                state.load_assignment(cid, customer_id, code)
        state.finish_recovery()

    async def write(self, events: Sequence[Event], buckets: list[int]) -> list[str]:
        """Persist one batch as ``PgShardStore.write`` does; returns the campaigns whose
        codes the batch voided (their rows are voided by :meth:`void_chunk`)."""
        b = Batch.of(events)
        vouchers, redemptions, rollbacks = b.vouchers, b.redemptions, b.rollbacks
        reservations, voided, foreign = b.reservations, b.voided, b.foreign
        idem = {e.key: e for e in b.idempotency}
        if not b.writes_rows():
            return voided
        self._check(self.fence)
        new_ids = [r.id for r in redemptions]
        if len(set(new_ids)) != len(new_ids) or any(i in self.redemptions for i in new_ids):
            raise ValueError("duplicate key value violates unique constraint on redemptions")
        for v in vouchers.values():
            row = self.vouchers.get(v.code)
            if row is not None:  # UPDATE ... WHERE code: no row, nothing changes
                row[1:] = [v.status, v.customer_id, v.balance, v.uses]
        for r in redemptions:
            self.redemptions[r.id] = r
        for rb in rollbacks:  # after the inserts: a batch may roll back what it records
            old = self.redemptions.get(rb.id)
            if old is not None:
                self.redemptions[rb.id] = msgspec.structs.replace(
                    old, status=R_ROLLED_BACK, rolled_back_at=rb.at
                )
        for res in reservations.values():
            was = self.reservations.get(res.id)
            self.reservations[res.id] = res if was is None else msgspec.structs.replace(
                was, state=res.state, redemption_id=res.redemption_id
            )
        for a in foreign:
            self.assignments.setdefault((a.campaign_id, a.customer_id), (a.code, a.bucket))
        for x in idem.values():
            key_row = self.idempotency.get(x.key)
            if key_row is None:
                self.idempotency[x.key] = KeyRow(x.bucket, x.fingerprint, x.response, x.at)
            elif key_row.response is None and key_row.fingerprint == x.fingerprint:
                key_row.response, key_row.created_at, key_row.claim_token = x.response, x.at, None
        for c in b.controls:
            if c.code not in self.vouchers:
                continue  # UPDATE ... WHERE code: no row, nothing changes
            if c.control.is_default():
                self.controls.pop(c.code, None)
            else:
                self.controls[c.code] = c.control
            if c.metadata_set:
                self.metadata[c.code] = c.metadata
            if c.event_id not in {e[0] for e in self.events}:
                self.events.append((c.event_id, "voucher.updated"))
            self.audit.append((c.actor, "voucher.update", c.code))
        return voided

    async def void_chunk(self, campaign_id: str, buckets: list[int], chunk: int) -> int:
        """Void up to ``chunk`` unredeemed codes of ``campaign_id`` in ``buckets``."""
        self._check(self.fence)
        mine = set(buckets)
        n = 0
        for code, row in self.vouchers.items():
            if n == chunk:
                break
            if row[0] == campaign_id and row[1] in (AVAILABLE, ASSIGNED) and bucket_of(code) in mine:
                row[1] = VOID
                n += 1
        return n

    async def copy_imported(
        self, campaign_id: str, rows: Sequence[ImportedCode], balance: int | None
    ) -> None:
        """A shop's own codes (a code that has a row refuses the whole copy)."""
        self._check(self.fence)
        self._add_codes(campaign_id, [r.code for r in rows], balance)
        for r in rows:
            if r.customer_id is not None:
                self.vouchers[r.code][1:3] = [ASSIGNED, r.customer_id]
            if r.expires_at is not None:
                self.controls[r.code] = Control(expires_at=r.expires_at)
            if r.metadata is not None:
                self.metadata[r.code] = r.metadata

    async def copy_codes(self, campaign_id: str, codes: list[str], balance: int | None) -> None:
        """New available codes (a code that has a row refuses the whole copy)."""
        self._check(self.fence)
        self._add_codes(campaign_id, codes, balance)

    def _add_codes(self, campaign_id: str, codes: list[str], balance: int | None) -> None:
        if len(set(codes)) != len(codes) or any(c in self.vouchers for c in codes):
            raise ValueError("duplicate key value violates unique constraint on vouchers")
        for c in codes:
            self.vouchers[c] = [campaign_id, AVAILABLE, None, balance, 0]

    async def claim_keys(
        self,
        claims: Sequence[Claim],
        buckets: list[int],
        expired_before: datetime,
        stale_before: datetime,
        fence: Fence | None = None,
    ) -> list[Stored]:
        """Claim idempotency keys as ``PgShardStore.claim_keys`` does: a new key, or one
        whose row can no longer answer for it (expired; pending in one of ``buckets`` or
        older than ``stale_before``), is taken; any other comes back as it stands."""
        self._check(fence)
        token = os.urandom(16)
        mine = set(buckets)
        out: list[Stored] = []
        for c in claims:
            row = self.idempotency.get(c.key)
            if row is None or row.created_at < expired_before or (
                row.response is None and (row.bucket in mine or row.created_at < stale_before)
            ):
                row = KeyRow(c.bucket, c.fingerprint, None, c.at, token)
                self.idempotency[c.key] = row
            out.append(
                Stored(c.key, row.claim_token == token, row.fingerprint, row.response, row.created_at)
            )
        return out

    async def delete_expired_keys(
        self,
        buckets: list[int],
        before: datetime,
        chunk: int = 5000,
        fence: Fence | None = None,
    ) -> int:
        """Delete the keys of ``buckets`` created before ``before``, ``chunk`` at a time
        (each chunk checks the fence); returns how many went."""
        mine = set(buckets)
        total = 0
        while True:
            self._check(fence)
            gone = [
                k for k, row in self.idempotency.items()
                if row.bucket in mine and row.created_at < before
            ][:chunk]
            for k in gone:
                del self.idempotency[k]
            total += len(gone)
            if len(gone) < chunk:
                return total
