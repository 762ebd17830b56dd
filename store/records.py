"""A shop's records read from Postgres: a campaign's codes a page at a time, and the
redemption history.

Both are keyset pages: a page starts after the last key of the one before (a code; a
redemption id) and is one index range, so a page costs the same at the millionth code as
at the first, and a row that changes between pages (a code redeemed meanwhile) is still
seen exactly once. Filters become SQL only when given, so each query is planned for the
filters it has.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from engine.events import STATUS_NAMES
from engine.routing import bucket_of
from store.pools import Db

VOUCHER_COLUMNS = "code, status, customer_id, active, starts_at, expires_at, metadata"
REDEMPTION_COLUMNS = (
    "id, campaign_id, code, customer_id, order_id, order_amount, currency, discount_amount,"
    " balance_after, status, created_at, rolled_back_at, metadata, detail"
)


async def campaign_exists(db: Db, campaign_id: str) -> bool:
    return bool(await db.fetchval("SELECT 1 FROM campaigns WHERE id = $1", campaign_id))


def _meta(raw: str | None) -> dict[str, Any] | None:
    return None if raw is None else dict(json.loads(raw))


def voucher_row(r: Any) -> dict[str, Any]:
    return {
        "code": r["code"],
        "status": STATUS_NAMES[r["status"]],
        "customer_id": r["customer_id"],
        "active": r["active"],
        "starts_at": r["starts_at"],
        "expires_at": r["expires_at"],
        "metadata": _meta(r["metadata"]),
    }


async def voucher_page(
    db: Db,
    campaign_id: str,
    *,
    after: str | None,
    limit: int,
    status: int | None = None,
    customer_id: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], bool]:
    """Up to ``limit`` codes of the campaign after the code ``after``, in code order, and
    whether more follow."""
    where = ["campaign_id = $1"]
    args: list[Any] = [campaign_id]

    def add(clause: str, value: Any) -> None:
        args.append(value)
        where.append(clause.format(f"${len(args)}"))

    if after is not None:
        add("code > {}", after)
    if status is not None:
        add("status = {}", status)
    if customer_id is not None:
        add("customer_id = {}", customer_id)
    if metadata is not None:
        add("metadata @> {}::jsonb", json.dumps(metadata))
    args.append(limit + 1)
    rows = await db.fetch(
        f"SELECT {VOUCHER_COLUMNS} FROM vouchers WHERE {' AND '.join(where)}"
        f" ORDER BY code LIMIT ${len(args)}",
        *args,
    )
    return [voucher_row(r) for r in rows[:limit]], len(rows) > limit


def redemption_row(r: Any) -> dict[str, Any]:
    return {
        "id": r["id"],
        "campaign_id": r["campaign_id"],
        "code": r["code"],
        "customer_id": r["customer_id"],
        "order_id": r["order_id"],
        "order_amount": r["order_amount"],
        "currency": r["currency"],
        "discount_amount": r["discount_amount"],
        "balance": r["balance_after"],
        "status": "rolled_back" if r["status"] == 1 else "redeemed",
        "created_at": r["created_at"],
        "rolled_back_at": r["rolled_back_at"],
        "metadata": _meta(r["metadata"]),
        **(_meta(r["detail"]) or {"items": [], "shipping_discount": 0}),
    }


async def redemption(db: Db, redemption_id: str) -> dict[str, Any] | None:
    r = await db.fetchrow(f"SELECT {REDEMPTION_COLUMNS} FROM redemptions WHERE id = $1", redemption_id)
    return None if r is None else redemption_row(r)


async def redemption_page(
    db: Db,
    *,
    after: str | None,
    limit: int,
    campaign_id: str | None = None,
    code: str | None = None,
    customer_id: str | None = None,
    order_id: str | None = None,
    since: datetime | None = None,
) -> tuple[list[dict[str, Any]], bool]:
    """Up to ``limit`` redemptions (rolled back ones too) after the id ``after``, in id
    order, and whether more follow. A code is found through its bucket's index (the
    bucket is the code's hash), a customer and an order through their own."""
    where: list[str] = []
    args: list[Any] = []

    def add(clause: str, value: Any) -> None:
        args.append(value)
        where.append(clause.format(f"${len(args)}"))

    if after is not None:
        add("id > {}", after)
    if campaign_id is not None:
        add("campaign_id = {}", campaign_id)
    if code is not None:
        add("bucket = {}", bucket_of(code))
        add("code = {}", code)
    if customer_id is not None:
        add("customer_id = {}", customer_id)
    if order_id is not None:
        add("order_id = {}", order_id)
    if since is not None:
        add("created_at >= {}", since)
    args.append(limit + 1)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    rows = await db.fetch(
        f"SELECT {REDEMPTION_COLUMNS} FROM redemptions{clause} ORDER BY id LIMIT ${len(args)}",
        *args,
    )
    return [redemption_row(r) for r in rows[:limit]], len(rows) > limit
