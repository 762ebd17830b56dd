"""Postgres side of a shard and of the coordinator (asyncpg).

Batches are written set-based: one statement per kind of change, arrays through
``unnest`` and new codes through ``COPY`` — never a row-at-a-time loop.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from operator import attrgetter
from typing import Any, Protocol

import asyncpg
import msgspec

from engine.campaigns import Campaign
from engine.events import (
    ASSIGNED,
    AVAILABLE,
    R_ACTIVE,
    R_ROLLED_BACK,
    VOID,
    Batch,
    Control,
    Event,
    ImportedCode,
    Redemption,
    Reservation,
    VoucherControlled,
)
from engine.idempotency import Claim, Stored
from engine.routing import bucket_of
from engine.shard_state import ShardState
from store import audit, campaigns, events, manifests
from store.fencing import Fence, claim_shard, current_epoch, fenced, fenced_error

_SERVER_STARTED = "SELECT pg_postmaster_start_time()"


class ShardStore(Protocol):
    """What a shard needs from storage. ``fence`` is the epoch :meth:`claim` took; every
    write checks it and raises :class:`engine.errors.Fenced` (or
    :class:`engine.errors.ClaimLost`) when the stored epoch moved on (or back)."""

    fence: Fence | None

    async def claim(self, namespace: str, shard_id: int, shards: int) -> Any:
        """Claim the shard's epoch (sets ``fence``); returns what identifies the database
        server now (it changes when the server restarts or fails over)."""
        ...

    async def check_epoch(self, timeout: float) -> tuple[int | None, Any]:
        """``(stored epoch of the fence's owner, server identity)``."""
        ...

    async def load(self, state: ShardState, buckets: list[int], idem_since: datetime) -> None: ...

    async def write(self, events: Sequence[Event], buckets: list[int]) -> list[str]: ...

    async def void_chunk(self, campaign_id: str, buckets: list[int], chunk: int) -> int: ...

    async def copy_imported(
        self, campaign_id: str, rows: Sequence[ImportedCode], balance: int | None
    ) -> None: ...

    async def copy_codes(
        self, campaign_id: str, codes: list[str], balance: int | None
    ) -> None: ...

    async def claim_keys(
        self,
        claims: Sequence[Claim],
        buckets: list[int],
        expired_before: datetime,
        stale_before: datetime,
        fence: Fence | None = None,
    ) -> list[Stored]: ...

    async def delete_expired_keys(
        self,
        buckets: list[int],
        before: datetime,
        chunk: int = 5000,
        fence: Fence | None = None,
    ) -> int: ...

    async def campaigns_since(self, revision: int) -> list[tuple[int, Campaign]]: ...

    async def close(self) -> None: ...

    def terminate(self) -> None:
        """Close at once (connections cut, nothing awaited)."""
        ...


# One batch's statements. ``{}`` marks a parameter; :func:`_numbered` turns them into
# ``$1, $2...`` for a statement of its own, :func:`_one_statement` numbers them across the
# CTEs of one combined statement.
_UPDATE_VOUCHERS = (
    "UPDATE vouchers AS t SET status = u.status, customer_id = u.customer_id,"
    " balance = u.balance, uses = u.uses, updated_at = now()"
    " FROM unnest({}::text[], {}::int2[], {}::text[], {}::int8[], {}::int4[])"
    " AS u(code, status, customer_id, balance, uses) WHERE t.code = u.code"
)
# One chunk of an ended campaign's void: the next unredeemed rows of the shard's buckets,
# found through the partial index of unsold codes (0012), so each chunk costs its own rows
# whatever the campaign's size and however much of it is void already.
_UNSOLD = f"status IN ({AVAILABLE:d}, {ASSIGNED:d})"
_VOID_CHUNK = (
    f"UPDATE vouchers SET status = {VOID:d}, updated_at = now() WHERE code = ANY(ARRAY("
    "SELECT code FROM vouchers WHERE campaign_id = $1 AND bucket = ANY($2::int2[])"
    f" AND {_UNSOLD} LIMIT $3)) AND {_UNSOLD}"
)
_INSERT_REDEMPTIONS = (
    "INSERT INTO redemptions (id, campaign_id, code, bucket, customer_id, order_id,"
    " order_amount, currency, discount_amount, balance_after, status, created_at,"
    " rolled_back_at, metadata, detail)"
    " SELECT * FROM unnest({}::text[], {}::text[], {}::text[], {}::int2[], {}::text[],"
    " {}::text[], {}::int8[], {}::text[], {}::int8[], {}::int8[], {}::int2[],"
    " {}::timestamptz[], {}::timestamptz[], {}::jsonb[], {}::jsonb[])"
)
_ROLL_BACK = (
    f"UPDATE redemptions AS t SET status = {R_ROLLED_BACK:d}, rolled_back_at = u.at,"
    " rb_txid = txid_current()"  # the redemption.rolled_back event's position (0016)
    " FROM unnest({}::text[], {}::timestamptz[]) AS u(id, at) WHERE t.id = u.id"
)
_UPSERT_RESERVATIONS = (
    "INSERT INTO reservations (id, campaign_id, code, bucket, customer_id,"
    " order_id, order_amount, currency, discount_amount, expires_at, state,"
    " redemption_id, metadata, detail, cart)"
    " SELECT * FROM unnest({}::text[], {}::text[], {}::text[], {}::int2[],"
    " {}::text[], {}::text[], {}::int8[], {}::text[], {}::int8[],"
    " {}::timestamptz[], {}::int2[], {}::text[], {}::jsonb[], {}::jsonb[], {}::jsonb[])"
    " ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state,"
    " redemption_id = EXCLUDED.redemption_id"
)
_INSERT_ASSIGNMENTS = (
    "INSERT INTO assignments (campaign_id, customer_id, code, bucket)"
    " SELECT * FROM unnest({}::text[], {}::text[], {}::text[], {}::int2[])"
    " ON CONFLICT (campaign_id, customer_id) DO NOTHING"
)
# The answer goes into the row the shard claimed (store/shards.py claim_keys), and
# only while that row still waits for this very request: a claim taken over meanwhile
# (stale, another body) keeps its new holder's row.
_INSERT_IDEMPOTENCY = (
    "INSERT INTO idempotency_keys AS t (key, bucket, fingerprint, response, created_at)"
    " SELECT * FROM unnest({}::text[], {}::int2[], {}::bytea[], {}::bytea[],"
    " {}::timestamptz[]) ON CONFLICT (key) DO UPDATE SET response = EXCLUDED.response,"
    " created_at = EXCLUDED.created_at, claim_token = NULL"
    " WHERE t.response IS NULL AND t.fingerprint = EXCLUDED.fingerprint"
)

# A claim takes a key's row over when the row can no longer answer for it: expired ($6),
# or pending (no committed answer) and either in a bucket of the claiming shard ($7), whose
# earlier owner can no longer commit and whose live claims the shard keeps in memory and
# never re-claims, or older than the stale limit ($8).
_TAKE_OVER = (
    "(t.created_at < $6 OR (t.response IS NULL"
    " AND (t.bucket = ANY($7::int2[]) OR t.created_at < $8)))"
)
# Every claimed key comes back: a new or taken-over row with this statement's token, any
# other as it stands, read under its row lock (the always-taken DO UPDATE sees the latest
# committed version, where a plain read could miss a concurrent claim's row).
_CLAIM_ROWS = (
    "INSERT INTO idempotency_keys AS t"
    " (key, bucket, fingerprint, response, created_at, claim_token)"
    " SELECT u.key, u.bucket, u.fingerprint, NULL, u.at, $5::bytea"
    " FROM unnest($1::text[], $2::int2[], $3::bytea[], $4::timestamptz[])"
    " AS u(key, bucket, fingerprint, at)"
    " ON CONFLICT (key) DO UPDATE SET"
    + ", ".join(
        f" {col} = CASE WHEN {_TAKE_OVER} THEN EXCLUDED.{col} ELSE t.{col} END"
        for col in ("bucket", "fingerprint", "response", "created_at", "claim_token")
    )
    + " RETURNING t.key, t.claim_token = $5::bytea AS won, t.fingerprint, t.response,"
    " t.created_at"
)
# A claim commits without waiting for its WAL flush (synchronous_commit off for this one
# transaction; it is then as durable as the decision's own commit that follows it in the
# WAL): a claim lost in a crash only held a key whose decision was not committed either,
# and only committed answers are ever replayed. That saves a keyed batch one disk flush.
_CLAIM_KEYS = (
    f"WITH c AS ({_CLAIM_ROWS})"
    " SELECT c.* FROM c CROSS JOIN (SELECT set_config('synchronous_commit', 'off', true)) AS s"
)
# The fenced variant checks the writer's epoch in the same statement; every claimed key
# returns a row, so the join evaluates the fence.
_CLAIM_KEYS_FENCED = _CLAIM_KEYS + " CROSS JOIN (SELECT voucher_fence($9, $10)) AS f"
# Expired keys of a shard's buckets, one chunk per statement; the outer condition is
# checked again on a row a concurrent claim just took over, so a fresh claim survives.
_DELETE_EXPIRED_KEYS = (
    "DELETE FROM idempotency_keys WHERE key = ANY(ARRAY("
    "SELECT key FROM idempotency_keys WHERE bucket = ANY($1::int2[]) AND created_at < $2"
    " LIMIT $3)) AND created_at < $2"
)


# The unnest arrays of the group commit's statements, in their parameters' order;
# ``code_bucket`` is the bucket of the row's code.
_VOUCHER_COLUMNS = "code status customer_id balance uses"
_REDEMPTION_COLUMNS = (
    "id campaign_id code code_bucket customer_id order_id order_amount currency "
    "discount_amount balance_after status created_at rolled_back_at metadata detail"
)
_RESERVATION_COLUMNS = (
    "id campaign_id code code_bucket customer_id order_id order_amount currency "
    "discount_amount expires_at state redemption_id metadata detail cart"
)


def _columns(rows: Sequence[Any], names: str) -> list[list[Any]]:
    """One list per name of ``names``: that field of every row."""
    return [
        [bucket_of(r.code) for r in rows] if name == "code_bucket" else list(map(attrgetter(name), rows))
        for name in names.split()
    ]


def _numbered(sql: str, first: int = 1) -> str:
    n = sql.count("{}")
    return sql.format(*[f"${i}" for i in range(first, first + n)])


def _one_statement(
    parts: list[tuple[str, list[list[Any]]]], fence: Fence | None = None
) -> tuple[str, list[Any]]:
    """``WITH w0 AS (...), w1 AS (...) SELECT voucher_fence(owner, epoch)``: every part as a
    data-modifying CTE of one statement, which Postgres runs (and its statement-level
    triggers) atomically, so a stale epoch refused by the final SELECT undoes every part.
    Only for parts that do not need to see each other's rows: all CTEs share one snapshot.
    Without a fence (tools, tests) the statement ends in ``SELECT 1``."""
    ctes: list[str] = []
    args: list[Any] = []
    for i, (sql, part_args) in enumerate(parts):
        ctes.append(f"w{i} AS ({_numbered(sql, len(args) + 1)})")
        args.extend(part_args)
    if fence is None:
        return "WITH " + ", ".join(ctes) + " SELECT 1", args
    n = len(args)
    args.extend(fence.args)
    return "WITH " + ", ".join(ctes) + f" SELECT voucher_fence(${n + 1}, ${n + 2})", args


_CONTROL = (
    "UPDATE vouchers SET active = $2, starts_at = $3, expires_at = $4,"
    " metadata = CASE WHEN $5 THEN $6::jsonb ELSE metadata END, updated_at = now()"
    " WHERE code = $1"
)
# Codes with a switch or window of their own, read through their partial index (0014).
_LOAD_CONTROLS = (
    "SELECT code, active, starts_at, expires_at FROM vouchers WHERE bucket = ANY($1::int2[])"
    " AND (NOT active OR starts_at IS NOT NULL OR expires_at IS NOT NULL)"
)


async def _write_control(conn: asyncpg.Connection, c: VoucherControlled) -> None:
    """One code's change, its ``voucher.updated`` event and its audit entry."""
    ctl = c.control
    await conn.execute(
        _CONTROL, c.code, ctl.active, ctl.starts_at, ctl.expires_at, c.metadata_set, c.metadata
    )
    change = msgspec.json.decode(c.change)
    data = {
        "code": c.code,
        "campaign_id": c.campaign_id,
        "active": ctl.active,
        "starts_at": ctl.starts_at.isoformat() if ctl.starts_at else None,
        "expires_at": ctl.expires_at.isoformat() if ctl.expires_at else None,
        "changed": sorted(change),
    }
    if c.metadata_set:
        data["metadata"] = None if c.metadata is None else msgspec.json.decode(c.metadata)
    await events.record(
        conn,
        "voucher.updated",
        data,
        campaign_id=c.campaign_id,
        resource_id=c.code,
        event_id=c.event_id,
    )
    await audit.record(conn, c.actor, "voucher.update", "voucher", c.code, change)


# Rows per round trip of a load's cursors: each fetch is its own short command (never one
# statement for a whole table under the command timeout).
_LOAD_PREFETCH = 20_000


class PgShardStore:
    """``fence``: the shard's claimed epoch; every write checks it in its own statement or
    transaction and raises :class:`engine.errors.Fenced` when a newer owner took over."""

    def __init__(self, pool: asyncpg.Pool, fence: Fence | None = None) -> None:
        self.pool = pool
        self.fence = fence

    async def close(self) -> None:
        await self.pool.close()

    def terminate(self) -> None:
        self.pool.terminate()

    async def claim(self, namespace: str, shard_id: int, shards: int) -> Any:
        """Claim the shard before reading anything: the claim waits for the old owner's
        in-flight commit and fences it, so what is loaded next is all it will ever commit.
        Returns the server's start time."""
        async with self.pool.acquire() as conn:
            self.fence = await claim_shard(conn, namespace, shard_id, shards)
            return await conn.fetchval(_SERVER_STARTED)

    async def check_epoch(self, timeout: float) -> tuple[int | None, Any]:
        assert self.fence is not None
        async with self.pool.acquire(timeout=timeout) as conn:
            epoch = await current_epoch(conn, self.fence.owner)
            server = await conn.fetchval(_SERVER_STARTED, timeout=timeout)
        return epoch, server

    async def campaigns_since(self, revision: int) -> list[tuple[int, Campaign]]:
        async with self.pool.acquire() as conn:
            return await campaigns.campaigns_since(conn, revision)

    async def load(self, state: ShardState, buckets: list[int], idem_since: datetime) -> None:
        """Rebuild ``state`` from the rows of ``buckets`` (campaigns first)."""
        async with self.pool.acquire() as conn:
            for c in await campaigns.load_campaigns(conn):
                state.put_campaign(c)
            state.events.clear()
            async with conn.transaction(readonly=True, isolation="repeatable_read"):
                cur = conn.cursor(
                    "SELECT code, campaign_id, status, customer_id, balance, uses FROM vouchers"
                    " WHERE bucket = ANY($1::int2[])",
                    buckets,
                    prefetch=_LOAD_PREFETCH,
                )
                async for r in cur:
                    state.load_voucher(r[0], r[1], r[2], r[3], r[4], r[5])
                async for r in conn.cursor(_LOAD_CONTROLS, buckets, prefetch=_LOAD_PREFETCH):
                    state.load_control(r[0], Control(r[1], r[2], r[3]))
                # Redemptions in the order they were made (a rollback's counters follow
                # its redemption); the table's own order is close to it, so the sort is
                # cheap, and rows stream through a cursor like everything else here. An
                # active one keeps its metadata and lines, as it had before the restart,
                # for its rollback's answer; a rolled-back one needs neither.
                async for r in conn.cursor(
                    "SELECT id, campaign_id, code, customer_id, order_id, order_amount, currency,"
                    " discount_amount, balance_after, created_at, status, rolled_back_at,"
                    f" CASE WHEN status = {R_ACTIVE:d} THEN metadata::text END,"
                    f" CASE WHEN status = {R_ACTIVE:d} THEN detail::text END"
                    " FROM redemptions WHERE bucket = ANY($1::int2[]) ORDER BY created_at",
                    buckets,
                    prefetch=_LOAD_PREFETCH,
                ):
                    state.load_redemption(Redemption(*r))
                async for r in conn.cursor(
                    "SELECT id, campaign_id, code, customer_id, order_id, order_amount, currency,"
                    " discount_amount, expires_at, state, redemption_id, metadata, detail, cart"
                    " FROM reservations WHERE bucket = ANY($1::int2[])",
                    buckets,
                    prefetch=_LOAD_PREFETCH,
                ):
                    state.load_reservation(Reservation(*r))
                async for r in conn.cursor(
                    "SELECT key, fingerprint, response, created_at FROM idempotency_keys"
                    " WHERE bucket = ANY($1::int2[]) AND created_at >= $2"
                    " AND response IS NOT NULL",
                    buckets,
                    idem_since,
                    prefetch=_LOAD_PREFETCH,
                ):
                    state.load_idempotency(r[0], bytes(r[1]), bytes(r[2]), r[3])
                async for r in conn.cursor(
                    "SELECT campaign_id, customer_id, code FROM assignments"
                    " WHERE bucket = ANY($1::int2[])",
                    buckets,
                    prefetch=_LOAD_PREFETCH,
                ):
                    state.load_assignment(r[0], r[1], r[2])
        state.finish_recovery()

    async def write(self, events: Sequence[Event], buckets: list[int]) -> list[str]:
        """Persist one batch of events in one transaction. Returns the campaigns whose
        codes the batch voided: their rows are voided by :meth:`void_chunk`, chunk by
        chunk, off the group commit."""
        b = Batch.of(events)
        vouchers, redemptions, rollbacks = b.vouchers, b.redemptions, b.rollbacks
        reservations, idem, voided, foreign = b.reservations, b.idempotency, b.voided, b.foreign
        controls = b.controls
        parts: list[tuple[str, list[list[Any]]]] = []
        if vouchers:
            parts.append((_UPDATE_VOUCHERS, _columns(list(vouchers.values()), _VOUCHER_COLUMNS)))
        if redemptions:
            parts.append((_INSERT_REDEMPTIONS, _columns(redemptions, _REDEMPTION_COLUMNS)))
        if rollbacks:
            # after the inserts: a batch may roll back a redemption it also records
            parts.append((_ROLL_BACK, _columns(rollbacks, "id at")))
        if reservations:
            rs = list(reservations.values())
            parts.append((_UPSERT_RESERVATIONS, _columns(rs, _RESERVATION_COLUMNS)))
        if foreign:
            parts.append((_INSERT_ASSIGNMENTS, _columns(foreign, "campaign_id customer_id code bucket")))
        if idem:
            # one row per key: an upsert may not touch a row twice in one statement
            idem = list({x.key: x for x in idem}.values())
            parts.append((_INSERT_IDEMPOTENCY, _columns(idem, "key bucket fingerprint response at")))
        if not parts and not controls:
            return voided
        async with self.pool.acquire() as conn:
            if rollbacks or controls:
                # These must see the batch's earlier changes (a code's control may follow
                # its redemption in one batch): one statement after another, in one
                # transaction that checks the fence first.
                async with fenced(conn, self.fence):
                    for sql, args in parts:
                        await conn.execute(_numbered(sql), *args)
                    for c in controls:
                        await _write_control(conn, c)
                return voided
            # The usual batch (decisions on vouchers, new redemptions, reservations,
            # assignments, idempotency records) touches each row once: one statement of
            # data-modifying CTEs ending in the fence check, committed on its own -- one
            # round trip to the server instead of one per table plus BEGIN and COMMIT.
            sql, args = _one_statement(parts, self.fence)
            try:
                await conn.execute(sql, *args)
            except asyncpg.PostgresError as exc:
                raise fenced_error(exc) from None
        return voided

    async def void_chunk(self, campaign_id: str, buckets: list[int], chunk: int) -> int:
        """Void up to ``chunk`` unredeemed codes of an ended campaign in ``buckets``, in a
        transaction of its own that checks the fence; returns how many."""
        async with self.pool.acquire() as conn, fenced(conn, self.fence):
            status = await conn.execute(_VOID_CHUNK, campaign_id, buckets, chunk)
        return int(status.split()[-1])

    async def claim_keys(
        self,
        claims: Sequence[Claim],
        buckets: list[int],
        expired_before: datetime,
        stale_before: datetime,
        fence: Fence | None = None,
    ) -> list[Stored]:
        """Claim idempotency keys before deciding their requests: one statement for the
        whole batch (see :mod:`engine.idempotency`). ``buckets``: the claiming shard's."""
        token = os.urandom(16)
        args: list[Any] = [
            [c.key for c in claims],
            [c.bucket for c in claims],
            [c.fingerprint for c in claims],
            [c.at for c in claims],
            token,
            expired_before,
            buckets,
            stale_before,
        ]
        sql = _CLAIM_KEYS
        if fence is not None:
            sql = _CLAIM_KEYS_FENCED
            args.extend(fence.args)
        async with self.pool.acquire() as conn:
            try:
                rows = await conn.fetch(sql, *args)
            except asyncpg.PostgresError as exc:
                raise fenced_error(exc) from None
        return [
            Stored(r[0], bool(r[1]), bytes(r[2]), None if r[3] is None else bytes(r[3]), r[4])
            for r in rows
        ]

    async def delete_expired_keys(
        self,
        buckets: list[int],
        before: datetime,
        chunk: int = 5000,
        fence: Fence | None = None,
    ) -> int:
        """Delete the idempotency keys of ``buckets`` created before ``before``, and the
        promotion manifests kept with them, ``chunk`` rows per statement (each its own
        short transaction, so the table is never locked for long); returns how many keys
        went."""
        total = 0
        async with self.pool.acquire() as conn:
            while True:
                async with fenced(conn, fence):
                    status = await conn.execute(_DELETE_EXPIRED_KEYS, buckets, before, chunk)
                n = int(status.split()[-1])
                total += n
                if n < chunk:
                    break
            while True:
                async with fenced(conn, fence):
                    n = await manifests.delete_expired(conn, buckets, before, chunk)
                if n < chunk:
                    return total

    async def copy_imported(
        self, campaign_id: str, rows: Sequence[ImportedCode], balance: int | None
    ) -> None:
        """Stream a shop's own codes into the bank, as :meth:`copy_codes` does (a code
        with a customer is stored assigned to them, with its own end and metadata)."""
        records = [
            (
                r.code,
                campaign_id,
                bucket_of(r.code),
                balance,
                ASSIGNED if r.customer_id is not None else AVAILABLE,
                r.customer_id,
                r.expires_at,
                r.metadata,
            )
            for r in rows
        ]
        columns = ["code", "campaign_id", "bucket", "balance", "status", "customer_id", "expires_at", "metadata"]
        async with self.pool.acquire() as conn, fenced(conn, self.fence):
            await conn.copy_records_to_table("vouchers", records=records, columns=columns)

    async def copy_codes(self, campaign_id: str, codes: list[str], balance: int | None) -> None:
        """Stream new available codes into the bank (one COPY after the fence check, in one
        transaction)."""
        async with self.pool.acquire() as conn, fenced(conn, self.fence):
            await conn.copy_records_to_table(
                "vouchers",
                records=[(c, campaign_id, bucket_of(c), balance) for c in codes],
                columns=["code", "campaign_id", "bucket", "balance"],
            )
