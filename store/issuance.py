"""Issuance in Postgres: the issuer's jobs (every write fenced by the issuer's epoch), the
customers a selection names, page by page, and what an earlier run already queued."""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec

from engine.customers import Customer, Selection
from store.fencing import Fence
from store.pools import Db

_CUSTOMER_COLS = (
    "id, email, phone, push_token, name, locale, time_zone, consent_email, consent_sms,"
    " consent_push, tags"
)


def _where(sel: Selection) -> tuple[str, list[Any]]:
    """SQL condition and args ($1...) of a selection."""
    if sel.customer_ids is not None:
        return "id = ANY($1::text[])", [list(sel.customer_ids)]
    if sel.tag is not None:
        return "tags @> ARRAY[$1::text]", [sel.tag]
    return "true", []


def _customer(r: asyncpg.Record) -> Customer:
    return Customer(
        id=r["id"],
        email=r["email"],
        phone=r["phone"],
        push_token=r["push_token"],
        name=r["name"],
        locale=r["locale"],
        time_zone=r["time_zone"],
        consent_email=r["consent_email"],
        consent_sms=r["consent_sms"],
        consent_push=r["consent_push"],
        tags=tuple(r["tags"]),
    )


# --- jobs --------------------------------------------------------------------------------


async def fail_interrupted(pool: asyncpg.Pool, fence: Fence) -> None:
    """Mark every running job failed: the issuer process that ran it is gone."""
    await fence.execute(
        pool,
        "UPDATE issuance_jobs SET state = 'failed', finished_at = now(), error ="
        " 'interrupted by an issuer restart; run the issuance again (re-runs add nothing"
        " twice)' WHERE state = 'running'",
    )


async def save_job(pool: asyncpg.Pool, fence: Fence, job: dict[str, Any]) -> None:
    """Insert a job, or store its state, counts, error and end."""
    await fence.execute(
        pool,
        "INSERT INTO issuance_jobs (id, campaign_id, selection, channels, state, counts,"
        " error, created_at, finished_at) VALUES ($1, $2, $3::jsonb, $4, $5, $6::jsonb,"
        " $7, $8, $9) ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state,"
        " counts = EXCLUDED.counts, error = EXCLUDED.error,"
        " finished_at = EXCLUDED.finished_at",
        job["id"],
        job["campaign_id"],
        msgspec.json.encode(job["selection"]).decode(),
        job["channels"],
        job["state"],
        msgspec.json.encode(job["counts"]).decode(),
        job["error"],
        job["created_at"],
        job["finished_at"],
    )


async def load_job(db: Db, job_id: str) -> dict[str, Any] | None:
    """A stored job (``selection`` and ``counts`` decoded), or None."""
    row = await db.fetchrow(
        "SELECT id, campaign_id, selection::text, channels, state, counts::text, error,"
        " created_at, finished_at FROM issuance_jobs WHERE id = $1",
        job_id,
    )
    if row is None:
        return None
    d = dict(row)
    d["selection"] = msgspec.json.decode(d["selection"])
    d["counts"] = msgspec.json.decode(d["counts"])
    return d


# --- selections --------------------------------------------------------------------------


async def known_customers(db: Db, ids: list[str]) -> set[str]:
    """The ids of ``ids`` that have a customer row."""
    rows = await db.fetch("SELECT id FROM customers WHERE id = ANY($1::text[])", ids)
    return {r["id"] for r in rows}


async def count_selected(db: Db, sel: Selection) -> int:
    where, args = _where(sel)
    return int(await db.fetchval(f"SELECT count(*) FROM customers WHERE {where}", *args))


async def selected_page(db: Db, sel: Selection, after: str | None, limit: int) -> list[Customer]:
    """The next ``limit`` customers of ``sel`` in id order, after id ``after``."""
    where, args = _where(sel)
    n = len(args)
    rows = await db.fetch(
        f"SELECT {_CUSTOMER_COLS} FROM customers WHERE {where}"
        f" AND (${n + 1}::text IS NULL OR id > ${n + 1}) ORDER BY id LIMIT ${n + 2}",
        *args,
        after,
        limit,
    )
    return [_customer(r) for r in rows]


async def handled_deliveries(db: Db, ids: list[str]) -> set[str]:
    """The delivery ids of ``ids`` a re-run must not queue again: recorded and no longer
    queued, or recorded by a job that finished or is running."""
    rows = await db.fetch(
        "SELECT d.id FROM deliveries d LEFT JOIN issuance_jobs j ON j.id = d.job_id"
        " WHERE d.id = ANY($1::text[]) AND (d.state <> 'queued'"
        " OR j.state IN ('done', 'running'))",
        ids,
    )
    return {r["id"] for r in rows}
