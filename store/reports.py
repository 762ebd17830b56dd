"""Reporting storage: folds the change logs into the rollups, and reads the rollups.

Triggers (store/sql/0006_reports.sql) log every change to vouchers, redemptions and
deliveries in the writer's own transaction; :func:`refresh` moves those log rows into the
rollup tables and deletes them in one transaction, so every change counts exactly once
and rows of transactions still open wait for a later refresh. Reads touch only rollups:
their cost depends on the number of minutes, segments and channels of a campaign, never
on its number of codes or redemptions. :func:`recount` is the full-scan version of the
same figures, for tests and the benchmark's baseline.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from engine.events import ASSIGNED, AVAILABLE, R_ACTIVE, R_ROLLED_BACK, REDEEMED, VOID
from engine.reports import CodeCounts, Counts

# Any constant: one refresher at a time per database ("vreports" as an int64).
REFRESH_LOCK = int.from_bytes(b"vreports", "big", signed=True)
FOLD_BATCH = 100_000

# A fold takes up to $1 of a change log's oldest rows out and adds them into rollups, in
# one statement: every change counts once.


def _take(log: str) -> str:
    return f"DELETE FROM {log} WHERE id IN (SELECT id FROM {log} ORDER BY id LIMIT $1) RETURNING *"


_ADD_FIGURES = (
    "redemptions = t.redemptions + EXCLUDED.redemptions, "
    "rolled_back = t.rolled_back + EXCLUDED.rolled_back, "
    "discount = t.discount + EXCLUDED.discount, order_amount = t.order_amount + EXCLUDED.order_amount"
)

_FOLD_REDEMPTIONS = f"""
WITH d AS ({_take('report_redemption_log')}), m AS (
    INSERT INTO report_minutes AS t
        (campaign_id, minute, redemptions, rolled_back, discount, order_amount)
    SELECT campaign_id, minute, sum(redemptions), sum(rolled_back), sum(discount),
           sum(order_amount)
    FROM d GROUP BY campaign_id, minute
    ON CONFLICT (campaign_id, minute) DO UPDATE SET
        {_ADD_FIGURES}
), q AS (
    INSERT INTO report_quarters AS t
        (campaign_id, quarter, redemptions, rolled_back, discount, order_amount)
    SELECT campaign_id, date_bin('15 minutes', minute, timestamptz '2000-01-01 00:00+00'),
           sum(redemptions), sum(rolled_back), sum(discount), sum(order_amount)
    FROM d GROUP BY 1, 2
    ON CONFLICT (campaign_id, quarter) DO UPDATE SET
        {_ADD_FIGURES}
), tot AS (
    INSERT INTO report_totals AS t
        (campaign_id, redemptions, rolled_back, discount, order_amount, first_redemption_at)
    SELECT campaign_id, sum(redemptions), sum(rolled_back), sum(discount), sum(order_amount),
           min(first_at)
    FROM d GROUP BY campaign_id
    ON CONFLICT (campaign_id) DO UPDATE SET
        {_ADD_FIGURES},
        first_redemption_at = LEAST(t.first_redemption_at, EXCLUDED.first_redemption_at)
), seg AS (
    INSERT INTO report_segments AS t
        (campaign_id, segment, redemptions, rolled_back, discount, order_amount)
    SELECT d.campaign_id, s.segment, sum(u.n), sum(u.rb), sum(u.dc), sum(u.oa)
    FROM d
    CROSS JOIN LATERAL unnest(d.customers, d.c_redemptions, d.c_rolled_back, d.c_discount,
                              d.c_order) AS u(customer_id, n, rb, dc, oa)
    LEFT JOIN customers c ON c.id = u.customer_id
    CROSS JOIN LATERAL unnest(
        CASE WHEN u.customer_id IS NULL THEN ARRAY['(anonymous)']
             WHEN c.tags IS NULL OR cardinality(c.tags) = 0 THEN ARRAY['(untagged)']
             ELSE c.tags END
    ) AS s(segment)
    GROUP BY d.campaign_id, s.segment
    ON CONFLICT (campaign_id, segment) DO UPDATE SET
        {_ADD_FIGURES}
)
SELECT count(*) FROM d
"""

_FOLD_VOUCHERS = f"""
WITH d AS ({_take('report_voucher_log')}), up AS (
    INSERT INTO report_codes AS t (campaign_id, available, assigned, redeemed, void, gift_balance)
    SELECT campaign_id, sum(d_available), sum(d_assigned), sum(d_redeemed), sum(d_void),
           sum(d_balance)
    FROM d GROUP BY campaign_id
    ON CONFLICT (campaign_id) DO UPDATE SET
        available = t.available + EXCLUDED.available,
        assigned = t.assigned + EXCLUDED.assigned,
        redeemed = t.redeemed + EXCLUDED.redeemed,
        void = t.void + EXCLUDED.void,
        gift_balance = t.gift_balance + EXCLUDED.gift_balance
)
SELECT count(*) FROM d
"""

_FOLD_DELIVERIES = f"""
WITH d AS ({_take('report_delivery_log')}), up AS (
    INSERT INTO report_channels AS t (campaign_id, channel, state, n)
    SELECT campaign_id, channel, state, sum(n) FROM d GROUP BY campaign_id, channel, state
    ON CONFLICT (campaign_id, channel, state) DO UPDATE SET n = t.n + EXCLUDED.n
)
SELECT count(*) FROM d
"""


async def refresh(conn: asyncpg.Connection, batch: int = FOLD_BATCH) -> int | None:
    """Fold pending change-log rows into the rollups; returns how many log rows were
    folded, or None when another refresher holds the lock (it does the same work)."""
    folded = 0
    while True:
        async with conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", REFRESH_LOCK):
                return None
            n = 0
            for sql in (_FOLD_VOUCHERS, _FOLD_REDEMPTIONS, _FOLD_DELIVERIES):
                n += int(await conn.fetchval(sql, batch))
        folded += n
        if n < batch:
            return folded


# --- reads -------------------------------------------------------------------------------


def _counts(r: Any) -> Counts:
    if r is None:
        return Counts()
    return Counts(
        int(r["redemptions"]), int(r["rolled_back"]), int(r["discount"]), int(r["order_amount"])
    )


async def campaign_row(conn: asyncpg.Connection, campaign_id: str) -> dict[str, Any] | None:
    r = await conn.fetchrow(
        "SELECT id, name, type, state, spec FROM campaigns WHERE id = $1", campaign_id
    )
    return None if r is None else _campaign(r)


def _campaign(r: Any) -> dict[str, Any]:
    import json

    spec = r["spec"] if isinstance(r["spec"], dict) else json.loads(r["spec"])
    return {
        "id": r["id"],
        "name": r["name"],
        "type": r["type"],
        "state": r["state"],
        "currency": spec.get("currency"),
        "timezone": spec.get("timezone") or "UTC",
        "shared_code": spec.get("shared_code"),
        "limits": spec.get("limits") or {},
        "starts_at": _ts(spec.get("starts_at")),
        "ends_at": _ts(spec.get("ends_at")),
        "created_at": _ts(spec.get("created_at")),
    }


def _ts(v: Any) -> datetime | None:
    if v is None or isinstance(v, datetime):
        return v
    return datetime.fromisoformat(str(v).replace("Z", "+00:00"))


async def campaign_figures(
    conn: asyncpg.Connection, campaign_id: str
) -> tuple[CodeCounts, Counts, datetime | None, dict[tuple[str, str], int]]:
    """Rollup figures of one campaign: codes by status, redemption totals, first
    redemption, deliveries by (channel, state)."""
    codes = await conn.fetchrow(
        "SELECT available, assigned, redeemed, void, gift_balance FROM report_codes"
        " WHERE campaign_id = $1",
        campaign_id,
    )
    tot = await conn.fetchrow(
        "SELECT redemptions, rolled_back, discount, order_amount, first_redemption_at"
        " FROM report_totals WHERE campaign_id = $1",
        campaign_id,
    )
    chans = await conn.fetch(
        "SELECT channel, state, n FROM report_channels WHERE campaign_id = $1", campaign_id
    )
    cc = CodeCounts(*(int(codes[k]) for k in range(5))) if codes is not None else CodeCounts()
    return (
        cc,
        _counts(tot),
        tot["first_redemption_at"] if tot is not None else None,
        {(r["channel"], r["state"]): int(r["n"]) for r in chans if r["n"]},
    )


async def overview_rows(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """One row per campaign from the rollups (campaigns x a few rollup rows each)."""
    rows = await conn.fetch(
        """
        SELECT c.id, c.name, c.type, c.state, c.spec,
               coalesce(k.available + k.assigned + k.redeemed + k.void, 0) AS generated,
               coalesce(k.assigned + k.redeemed, 0) AS assigned,
               coalesce(t.redemptions, 0) AS redemptions,
               coalesce(t.rolled_back, 0) AS rolled_back,
               coalesce(t.discount, 0) AS discount,
               coalesce(t.order_amount, 0) AS order_amount,
               coalesce(dl.sent, 0) AS delivered
        FROM campaigns c
        LEFT JOIN report_codes k ON k.campaign_id = c.id
        LEFT JOIN report_totals t ON t.campaign_id = c.id
        LEFT JOIN (SELECT campaign_id, sum(n) AS sent FROM report_channels
                   WHERE state = 'sent' GROUP BY campaign_id) dl ON dl.campaign_id = c.id
        ORDER BY c.created_at DESC, c.id
        """
    )
    out = []
    for r in rows:
        c = _campaign(r)
        out.append(
            {
                "id": c["id"],
                "name": c["name"],
                "type": c["type"],
                "state": c["state"],
                "currency": c["currency"],
                "generated": None if c["shared_code"] else int(r["generated"]),
                "assigned": None if c["shared_code"] else int(r["assigned"]),
                "delivered": int(r["delivered"]),
                "redemptions": int(r["redemptions"]),
                "rolled_back": int(r["rolled_back"]),
                "net_redemptions": int(r["redemptions"]) - int(r["rolled_back"]),
                "discount": int(r["discount"]),
                "order_amount": int(r["order_amount"]),
            }
        )
    return out


async def minute_points(
    conn: asyncpg.Connection, campaign_id: str, since: datetime, until: datetime, grain_s: int
) -> list[tuple[datetime, Counts]]:
    """Rollup minutes (``grain_s`` 60) or quarter hours (900) in [since, until)."""
    table, col = ("report_minutes", "minute") if grain_s == 60 else ("report_quarters", "quarter")
    rows = await conn.fetch(
        f"SELECT {col} AS t, redemptions, rolled_back, discount, order_amount FROM {table}"
        f" WHERE campaign_id = $1 AND {col} >= $2 AND {col} < $3 ORDER BY {col}",
        campaign_id,
        since,
        until,
    )
    return [(r["t"], _counts(r)) for r in rows]


async def all_quarter_points(
    conn: asyncpg.Connection, campaign_id: str
) -> list[tuple[datetime, Counts]]:
    rows = await conn.fetch(
        "SELECT quarter AS t, redemptions, rolled_back, discount, order_amount"
        " FROM report_quarters WHERE campaign_id = $1",
        campaign_id,
    )
    return [(r["t"], _counts(r)) for r in rows]


async def activity_range(
    conn: asyncpg.Connection, campaign_id: str
) -> tuple[datetime | None, datetime | None]:
    r = await conn.fetchrow(
        "SELECT min(minute) AS lo, max(minute) AS hi FROM report_minutes WHERE campaign_id = $1",
        campaign_id,
    )
    return (r["lo"], r["hi"]) if r is not None else (None, None)


async def segments(conn: asyncpg.Connection, campaign_id: str) -> dict[str, Counts]:
    rows = await conn.fetch(
        "SELECT segment, redemptions, rolled_back, discount, order_amount FROM report_segments"
        " WHERE campaign_id = $1",
        campaign_id,
    )
    return {r["segment"]: _counts(r) for r in rows if r["redemptions"] or r["rolled_back"]}


# --- the same figures by full scan (tests, benchmark baseline) ---------------------------

# Statuses spelled from engine.events (stored as their integers).
_RECOUNT_CODES = f"""
    SELECT count(*) FILTER (WHERE status = {AVAILABLE:d}) AS available,
           count(*) FILTER (WHERE status = {ASSIGNED:d}) AS assigned,
           count(*) FILTER (WHERE status = {REDEEMED:d}) AS redeemed,
           count(*) FILTER (WHERE status = {VOID:d}) AS void,
           coalesce(sum(balance) FILTER (WHERE status <> {VOID:d}), 0) AS gift_balance
    FROM vouchers WHERE campaign_id = $1
"""

_RECOUNT_TOTALS = f"""
    SELECT count(*) AS redemptions, count(*) FILTER (WHERE status = {R_ROLLED_BACK:d}) AS rolled_back,
           coalesce(sum(discount_amount) FILTER (WHERE status = {R_ACTIVE:d}), 0) AS discount,
           coalesce(sum(order_amount) FILTER (WHERE status = {R_ACTIVE:d}), 0) AS order_amount,
           min(created_at) AS first_redemption_at
    FROM redemptions WHERE campaign_id = $1
"""

_RECOUNT_MINUTES = f"""
    SELECT date_trunc('minute', created_at) AS minute, count(*) AS redemptions,
           count(*) FILTER (WHERE status = {R_ROLLED_BACK:d}) AS rolled_back,
           coalesce(sum(discount_amount) FILTER (WHERE status = {R_ACTIVE:d}), 0) AS discount,
           coalesce(sum(order_amount) FILTER (WHERE status = {R_ACTIVE:d}), 0) AS order_amount
    FROM redemptions WHERE campaign_id = $1 GROUP BY 1 ORDER BY 1
"""

_RECOUNT_QUARTERS = f"""
    SELECT date_bin('15 minutes', created_at, timestamptz '2000-01-01 00:00+00') AS q,
           count(*) AS redemptions, count(*) FILTER (WHERE status = {R_ROLLED_BACK:d}) AS rolled_back,
           coalesce(sum(discount_amount) FILTER (WHERE status = {R_ACTIVE:d}), 0) AS discount,
           coalesce(sum(order_amount) FILTER (WHERE status = {R_ACTIVE:d}), 0) AS order_amount
    FROM redemptions WHERE campaign_id = $1 GROUP BY 1 ORDER BY 1
"""

_RECOUNT_SEGMENTS = f"""
    SELECT s.segment, count(*) AS redemptions,
           count(*) FILTER (WHERE r.status = {R_ROLLED_BACK:d}) AS rolled_back,
           coalesce(sum(r.discount_amount) FILTER (WHERE r.status = {R_ACTIVE:d}), 0) AS discount,
           coalesce(sum(r.order_amount) FILTER (WHERE r.status = {R_ACTIVE:d}), 0) AS order_amount
    FROM redemptions r LEFT JOIN customers c ON c.id = r.customer_id
    CROSS JOIN LATERAL unnest(
        CASE WHEN r.customer_id IS NULL THEN ARRAY['(anonymous)']
             WHEN c.tags IS NULL OR cardinality(c.tags) = 0 THEN ARRAY['(untagged)']
             ELSE c.tags END
    ) AS s(segment)
    WHERE r.campaign_id = $1 GROUP BY 1
"""


async def recount(conn: asyncpg.Connection, campaign_id: str) -> dict[str, Any]:
    """Every rollup figure of a campaign recomputed from the base tables."""
    codes = await conn.fetchrow(_RECOUNT_CODES, campaign_id)
    tot = await conn.fetchrow(_RECOUNT_TOTALS, campaign_id)
    minutes = await conn.fetch(_RECOUNT_MINUTES, campaign_id)
    quarters = await conn.fetch(_RECOUNT_QUARTERS, campaign_id)
    segs = await conn.fetch(_RECOUNT_SEGMENTS, campaign_id)
    chans = await conn.fetch(
        "SELECT channel, state, count(*) AS n FROM deliveries WHERE campaign_id = $1"
        " GROUP BY 1, 2",
        campaign_id,
    )
    return {
        "codes": CodeCounts(*(int(codes[k]) for k in range(5))),
        "totals": _counts(tot),
        "first_redemption_at": tot["first_redemption_at"],
        "minutes": [(r["minute"], _counts(r)) for r in minutes],
        "quarters": [(r["q"], _counts(r)) for r in quarters],
        "segments": {r["segment"]: _counts(r) for r in segs},
        "channels": {(r["channel"], r["state"]): int(r["n"]) for r in chans},
    }


async def rollup(conn: asyncpg.Connection, campaign_id: str) -> dict[str, Any]:
    """The same shape as :func:`recount`, read from the rollups."""
    codes, totals, first, chans = await campaign_figures(conn, campaign_id)
    minutes = await conn.fetch(
        "SELECT minute, redemptions, rolled_back, discount, order_amount FROM report_minutes"
        " WHERE campaign_id = $1 AND (redemptions <> 0 OR rolled_back <> 0 OR discount <> 0"
        " OR order_amount <> 0) ORDER BY minute",
        campaign_id,
    )
    quarters = await conn.fetch(
        "SELECT quarter, redemptions, rolled_back, discount, order_amount FROM report_quarters"
        " WHERE campaign_id = $1 AND (redemptions <> 0 OR rolled_back <> 0 OR discount <> 0"
        " OR order_amount <> 0) ORDER BY quarter",
        campaign_id,
    )
    return {
        "codes": codes,
        "totals": totals,
        "first_redemption_at": first,
        "minutes": [(r["minute"], _counts(r)) for r in minutes],
        "quarters": [(r["quarter"], _counts(r)) for r in quarters],
        "segments": await segments(conn, campaign_id),
        "channels": chans,
    }
