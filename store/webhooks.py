"""Postgres side of shop webhooks: the event stream, endpoints, retries and the log.

The event stream is the union of the ``events`` table (0014) and two views of the
``redemptions`` table (0016): every redemption is a ``redemption.succeeded`` event
(``evt_<redemption id>``, at the writing transaction ``txid``) and every rolled back one
also a ``redemption.rolled_back`` event (``evt_rb_<redemption id>``, at ``rb_txid``). So
the group commit writes no row for its events. Reads go in commit order (see
:class:`engine.webhooks.Position`) and stop below the snapshot's xmin.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from engine import webhooks as wh
from engine.webhooks import Position
from store.pools import Db

_XMIN = "SELECT txid_snapshot_xmin(txid_current_snapshot())"

# $1 txid, $2 kind, $3 id of the position; $4 upper txid bound (exclusive); $5 since;
# $6 limit; $7 types of the events table.
_AFTER = "({t} >= {lo} AND {t} < {hi} AND ({t} > {lo} OR {k} > $2 OR ({k} = $2 AND {i} > $3)))"

_REDEMPTION_JSON = (
    "jsonb_build_object('id', r.id, 'code', r.code, 'campaign_id', r.campaign_id,"
    " 'customer_id', r.customer_id, 'order_id', r.order_id, 'order_amount', r.order_amount,"
    " 'currency', r.currency, 'discount_amount', r.discount_amount, 'balance', r.balance_after,"
    " 'created_at', r.created_at, 'metadata', r.metadata,"
    " 'items', coalesce(r.detail -> 'items', '[]'::jsonb),"
    " 'shipping_discount', coalesce((r.detail ->> 'shipping_discount')::int8, 0)"
)

_FROM_EVENTS = (
    "SELECT e.txid::text::int8 AS t, 0 AS k, e.id, e.type, e.campaign_id, e.resource_id,"
    " e.created_at, e.data FROM events e WHERE "
    + _AFTER.format(t="e.txid", k="0", i="e.id", lo="$1::text::xid8", hi="$4::text::xid8")
    + " AND ($5::timestamptz IS NULL OR e.created_at >= $5) AND e.type = ANY($7::text[])"
    " ORDER BY e.txid, e.id LIMIT $6"
)
# A redemption event's columns, built from its row ``r``. The page reads pick their rows
# by position first (``q``: two columns, sorted and cut to the limit) and build these for
# the picked rows only: a slice can hold far more rows than a page takes.
_SUCCEEDED_COLUMNS = (
    f"r.txid AS t, 0 AS k, '{wh.SUCCEEDED_PREFIX}' || r.id AS id,"
    f" '{wh.SUCCEEDED}' AS type, r.campaign_id, r.id AS resource_id, r.created_at,"
    f" {_REDEMPTION_JSON}, 'status', 'redeemed') AS data"
)
_ROLLED_BACK_COLUMNS = (
    f"r.rb_txid AS t, 1 AS k, '{wh.ROLLED_BACK_PREFIX}' || r.id AS id,"
    f" '{wh.ROLLED_BACK}' AS type, r.campaign_id, r.id AS resource_id, r.rolled_back_at AS created_at,"
    f" {_REDEMPTION_JSON}, 'status', 'rolled_back', 'rolled_back_at', r.rolled_back_at) AS data"
)
_FROM_SUCCEEDED = (
    f"SELECT {_SUCCEEDED_COLUMNS} FROM (SELECT q.id FROM redemptions q WHERE "
    + _AFTER.format(t="q.txid", k="0", i=f"('{wh.SUCCEEDED_PREFIX}' || q.id)", lo="$1::text::int8", hi="$4::text::int8")
    + " AND ($5::timestamptz IS NULL OR q.created_at >= $5)"
    " ORDER BY q.txid, q.id LIMIT $6) AS p JOIN redemptions r ON r.id = p.id"
)
_FROM_ROLLED_BACK = (
    f"SELECT {_ROLLED_BACK_COLUMNS} FROM (SELECT q.id FROM redemptions q WHERE q.rb_txid IS NOT NULL AND "
    + _AFTER.format(
        t="q.rb_txid", k="1", i=f"('{wh.ROLLED_BACK_PREFIX}' || q.id)", lo="$1::text::int8", hi="$4::text::int8"
    )
    + " AND ($5::timestamptz IS NULL OR q.rolled_back_at >= $5)"
    " ORDER BY q.rb_txid, q.id LIMIT $6) AS p JOIN redemptions r ON r.id = p.id"
)

_EVENT_COLUMNS = "t, k, id, type, campaign_id, resource_id, created_at, data"


class Page(msgspec.Struct, frozen=True):
    """Events after a position, and where the next read starts. ``complete``: every
    event up to the snapshot was read (nothing more to read now)."""

    events: list[dict[str, Any]]
    next: Position
    complete: bool


def _event(r: asyncpg.Record) -> dict[str, Any]:
    data = r["data"]
    if isinstance(data, str):
        data = msgspec.json.decode(data)
    return {
        "id": r["id"],
        "type": r["type"],
        "created_at": r["created_at"],
        "campaign_id": r["campaign_id"],
        "resource_id": r["resource_id"],
        "data": data,
    }


async def snapshot_xmin(db: Db) -> int:
    """The oldest transaction still running: every one below it has ended."""
    return int(await db.fetchval(_XMIN))


async def read_events(
    db: Db,
    after: Position,
    *,
    types: frozenset[str] | None = None,
    since: datetime | None = None,
    limit: int = 100,
    window: int | None = None,
) -> Page:
    """Up to ``limit`` events after ``after`` in commit order (``types``: only those;
    ``since``: created at or after). ``window`` bounds how many transaction ids one read
    looks through, so a reader far behind scans a slice, not the whole backlog."""
    xmin = await snapshot_xmin(db)
    lo = max(after.txid, 0)
    hi = xmin if window is None else min(xmin, lo + window)
    wanted = wh.expand(types) if types is not None else frozenset(wh.EVENT_TYPES)
    parts: list[str] = []
    table_types = sorted(wanted - {wh.SUCCEEDED, wh.ROLLED_BACK})
    if table_types:
        parts.append(_FROM_EVENTS)
    if wh.SUCCEEDED in wanted:
        parts.append(_FROM_SUCCEEDED)
    if wh.ROLLED_BACK in wanted:
        parts.append(_FROM_ROLLED_BACK)
    rows: list[asyncpg.Record] = []
    if parts and hi > lo - 1:
        sql = (
            f"SELECT {_EVENT_COLUMNS} FROM ("
            + " UNION ALL ".join(f"({p})" for p in parts)
            + ") AS u ORDER BY t, k, id LIMIT $6"
        )
        # positions go as text: one parameter is compared with xid8 and int8 columns
        args: list[Any] = [str(lo), after.kind, after.id, str(hi), since, limit]
        if table_types:
            args.append(table_types)
        rows = await db.fetch(sql, *args)
    events = [_event(r) for r in rows]
    if len(rows) >= limit:
        last = rows[-1]
        return Page(events, Position(int(last["t"]), int(last["k"]), last["id"]), False)
    # Everything below ``hi`` was read: the next read starts there.
    nxt = Position(hi, -1, "") if hi > after.txid else after
    return Page(events, nxt, hi >= xmin)


#: transaction ids the first slice of a page looks through (see :func:`read_page`)
FIRST_SLICE = 100
#: a slice read faster than this leaves room for one twice as wide
CHEAP_SLICE_S = 0.05


async def read_page(
    db: Db,
    after: Position,
    *,
    types: frozenset[str] | None = None,
    since: datetime | None = None,
    limit: int = 100,
    window: int,
    budget_s: float,
) -> Page:
    """Up to ``limit`` events after ``after``, read slice by slice until the page is full,
    the stream's end is reached or ``budget_s`` is spent.

    A slice's cost grows with the rows in it, and a transaction id can hold thousands (a
    group commit), so the first slice looks through :data:`FIRST_SLICE` ids only, and each
    slice that leaves the page short and took less than :data:`CHEAP_SLICE_S` doubles the
    next, up to ``window``: a dense stretch is read in small slices, a sparse one (a quiet
    night, a filter few events pass) in large ones. A page far behind costs about what a
    page near the end does, not a read of the whole backlog; it may hold fewer than
    ``limit`` events, even none, without being ``complete``."""
    deadline = time.monotonic() + budget_s
    events: list[dict[str, Any]] = []
    span = min(FIRST_SLICE, window)
    while True:
        started = time.monotonic()
        page = await read_events(
            db, after, types=types, since=since, limit=limit - len(events), window=span
        )
        events += page.events
        after = page.next
        now = time.monotonic()
        if page.complete or len(events) >= limit or now >= deadline:
            return Page(events, after, page.complete)
        if now - started < CHEAP_SLICE_S:
            span = min(span * 2, window)


_BY_ID_TABLE = (
    f"SELECT {_EVENT_COLUMNS} FROM (SELECT e.txid::text::int8 AS t, 0 AS k, e.id, e.type,"
    " e.campaign_id, e.resource_id, e.created_at, e.data FROM events e WHERE e.id = $1) AS u"
)


async def get_event(db: Db, event_id: str) -> dict[str, Any] | None:
    """One event by its id (the redemption events are read from their redemption)."""
    red = wh.redemption_of(event_id)
    if red is None:
        row = await db.fetchrow(_BY_ID_TABLE, event_id)
        return None if row is None else _event(row)
    kind, rid = red
    if kind == wh.SUCCEEDED:
        sql = f"SELECT {_SUCCEEDED_COLUMNS} FROM redemptions r WHERE r.id = $1"
    else:
        sql = f"SELECT {_ROLLED_BACK_COLUMNS} FROM redemptions r WHERE r.id = $1 AND r.rb_txid IS NOT NULL"
    row = await db.fetchrow(sql, rid)
    return None if row is None else _event(row)


# --- endpoints -------------------------------------------------------------------------

_ENDPOINT = "id, url, events, enabled, created_at, updated_at"


def _endpoint(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": r["id"],
        "url": r["url"],
        "events": list(r["events"]),
        "enabled": r["enabled"],
        "created_at": r["created_at"],
        "updated_at": r["updated_at"],
    }


async def create_endpoint(
    db: Db, endpoint_id: str, url: str, secret: str, events: Sequence[str]
) -> dict[str, Any]:
    """A subscription starts at the stream's present: it receives events of transactions
    from the snapshot's xmin on (nothing older)."""
    row = await db.fetchrow(
        f"INSERT INTO webhook_endpoints (id, url, secret, events, pos_txid) VALUES"
        f" ($1, $2, $3, $4, ({_XMIN})) RETURNING {_ENDPOINT}",
        endpoint_id,
        url,
        secret,
        list(events),
    )
    return _endpoint(row)


async def list_endpoints(db: Db) -> list[dict[str, Any]]:
    rows = await db.fetch(f"SELECT {_ENDPOINT} FROM webhook_endpoints ORDER BY created_at, id")
    return [_endpoint(r) for r in rows]


async def get_endpoint(db: Db, endpoint_id: str) -> dict[str, Any] | None:
    row = await db.fetchrow(f"SELECT {_ENDPOINT} FROM webhook_endpoints WHERE id = $1", endpoint_id)
    return None if row is None else _endpoint(row)


async def update_endpoint(
    db: Db,
    endpoint_id: str,
    *,
    url: str | None = None,
    events: Sequence[str] | None = None,
    enabled: bool | None = None,
) -> dict[str, Any] | None:
    row = await db.fetchrow(
        "UPDATE webhook_endpoints SET url = COALESCE($2, url), events = COALESCE($3, events),"
        " enabled = COALESCE($4, enabled), updated_at = now() WHERE id = $1"
        f" RETURNING {_ENDPOINT}",
        endpoint_id,
        url,
        None if events is None else list(events),
        enabled,
    )
    return None if row is None else _endpoint(row)


async def delete_endpoint(db: Db, endpoint_id: str) -> bool:
    status = await db.execute("DELETE FROM webhook_endpoints WHERE id = $1", endpoint_id)
    return bool(status.endswith(" 1"))


class Endpoint(msgspec.Struct, frozen=True):
    """What the dispatcher needs of an endpoint."""

    id: str
    url: str
    secret: str
    events: tuple[str, ...]
    position: Position


async def active_endpoints(db: Db) -> list[Endpoint]:
    rows = await db.fetch(
        "SELECT id, url, secret, events, pos_txid, pos_kind, pos_id FROM webhook_endpoints"
        " WHERE enabled ORDER BY id"
    )
    return [
        Endpoint(r[0], r[1], r[2], tuple(r[3]), Position(int(r[4]), int(r[5]), r[6])) for r in rows
    ]


async def endpoint_secret(db: Db, endpoint_id: str) -> tuple[str, str, bool] | None:
    """``(url, secret, enabled)`` of an endpoint (a retry reads them afresh)."""
    row = await db.fetchrow(
        "SELECT url, secret, enabled FROM webhook_endpoints WHERE id = $1", endpoint_id
    )
    return None if row is None else (row[0], row[1], row[2])


# --- attempts --------------------------------------------------------------------------


class Attempt(msgspec.Struct, frozen=True):
    """One delivery attempt's outcome. ``next_at``: when the next attempt is due (None when
    it succeeded or was the last one)."""

    endpoint_id: str
    event_id: str
    event_type: str
    attempt: int
    at: datetime
    ok: bool
    status_code: int | None
    error: str | None
    duration_ms: int
    next_at: datetime | None


def _outcome(a: Attempt) -> str:
    if a.ok:
        return "succeeded"
    return "retrying" if a.next_at is not None else "failed"


_LOG = (
    "INSERT INTO webhook_deliveries (endpoint_id, event_id, event_type, attempt, at, outcome,"
    " status_code, error, duration_ms) SELECT * FROM unnest($1::text[], $2::text[], $3::text[],"
    " $4::int4[], $5::timestamptz[], $6::text[], $7::int4[], $8::text[], $9::int4[])"
    # an endpoint deleted meanwhile takes its log with it
    " AS u(e, ev, ty, n, at, o, sc, er, d) WHERE EXISTS (SELECT 1 FROM webhook_endpoints w WHERE w.id = u.e)"
)
_RETRY = (
    "INSERT INTO webhook_retries (endpoint_id, event_id, attempts, next_at)"
    " SELECT u.e, u.ev, u.n, u.at FROM unnest($1::text[], $2::text[], $3::int4[],"
    " $4::timestamptz[]) AS u(e, ev, n, at)"
    " WHERE EXISTS (SELECT 1 FROM webhook_endpoints w WHERE w.id = u.e)"
    " ON CONFLICT (endpoint_id, event_id) DO UPDATE SET attempts = EXCLUDED.attempts,"
    " next_at = EXCLUDED.next_at"
)
_DONE = (
    "DELETE FROM webhook_retries AS t USING unnest($1::text[], $2::text[]) AS u(e, ev)"
    " WHERE t.endpoint_id = u.e AND t.event_id = u.ev"
)


async def record_attempts(
    conn: asyncpg.Connection,
    attempts: Sequence[Attempt],
    *,
    endpoint_id: str | None = None,
    position: Position | None = None,
) -> None:
    """Log ``attempts``, schedule their retries, forget the finished ones and (for a first
    delivery round) move the endpoint's position on, all in one transaction: a crash before
    it commits sends the round again (at least once), never loses it."""
    async with conn.transaction():
        if attempts:
            await conn.execute(
                _LOG,
                [a.endpoint_id for a in attempts],
                [a.event_id for a in attempts],
                [a.event_type for a in attempts],
                [a.attempt for a in attempts],
                [a.at for a in attempts],
                [_outcome(a) for a in attempts],
                [a.status_code for a in attempts],
                [a.error for a in attempts],
                [a.duration_ms for a in attempts],
            )
            later = [a for a in attempts if a.next_at is not None]
            if later:
                await conn.execute(
                    _RETRY,
                    [a.endpoint_id for a in later],
                    [a.event_id for a in later],
                    [a.attempt for a in later],
                    [a.next_at for a in later],
                )
            done = [a for a in attempts if a.next_at is None]
            if done:
                await conn.execute(
                    _DONE, [a.endpoint_id for a in done], [a.event_id for a in done]
                )
        if endpoint_id is not None and position is not None:
            await conn.execute(
                "UPDATE webhook_endpoints SET pos_txid = $2, pos_kind = $3, pos_id = $4"
                " WHERE id = $1",
                endpoint_id,
                position.txid,
                position.kind,
                position.id,
            )


async def due_retries(db: Db, now: datetime, limit: int) -> list[tuple[str, str, int]]:
    """``(endpoint id, event id, attempts so far)`` of retries due at ``now``."""
    rows = await db.fetch(
        "SELECT t.endpoint_id, t.event_id, t.attempts FROM webhook_retries t"
        " JOIN webhook_endpoints w ON w.id = t.endpoint_id AND w.enabled"
        " WHERE t.next_at <= $1 ORDER BY t.next_at LIMIT $2",
        now,
        limit,
    )
    return [(r[0], r[1], int(r[2])) for r in rows]


async def deliveries(
    db: Db, endpoint_id: str, *, before: int | None, limit: int, event_id: str | None = None
) -> list[dict[str, Any]]:
    """An endpoint's attempts, newest first (``before``: ids below it, the cursor)."""
    rows = await db.fetch(
        "SELECT id, event_id, event_type, attempt, at, outcome, status_code, error, duration_ms"
        " FROM webhook_deliveries WHERE endpoint_id = $1 AND ($2::int8 IS NULL OR id < $2)"
        " AND ($3::text IS NULL OR event_id = $3) ORDER BY id DESC LIMIT $4",
        endpoint_id,
        before,
        event_id,
        limit,
    )
    return [dict(r) for r in rows]


async def prune_log(db: Db, before: datetime, chunk: int = 10_000) -> int:
    """Delete up to ``chunk`` log rows older than ``before`` (oldest first); how many."""
    status = await db.execute(
        "DELETE FROM webhook_deliveries WHERE id = ANY(ARRAY(SELECT id FROM webhook_deliveries"
        " WHERE at < $1 ORDER BY id LIMIT $2))",
        before,
        chunk,
    )
    return int(status.split()[-1])
