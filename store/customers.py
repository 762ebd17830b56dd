"""Customers in Postgres: upsert in batches (``unnest`` arrays, one statement per batch),
look-ups, keyset listing, and the streamed import that ties the parser of
``engine.customers`` to a byte stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg

from engine import errors
from engine.audit import Actor
from engine.customers import Customer, Rejection, parser_for
from store import audit

MAX_REPORTED_REJECTIONS = 1000
_AUDITED_IDS = 100  # ids named in an import batch's audit entry
COLUMNS = (
    "id, email, phone, push_token, name, locale, time_zone, consent_email, consent_sms,"
    " consent_push, tags, created_at, updated_at"
)

_UPSERT = """
INSERT INTO customers (id, email, phone, push_token, name, locale, time_zone,
                       consent_email, consent_sms, consent_push, tags)
SELECT u.id, u.email, u.phone, u.push_token, u.name, u.locale, u.time_zone,
       u.consent_email, u.consent_sms, u.consent_push,
       coalesce(string_to_array(u.tags, E'\\x1f'), '{}')
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::text[], $8::bool[], $9::bool[], $10::bool[], $11::text[])
     AS u(id, email, phone, push_token, name, locale, time_zone, consent_email, consent_sms,
          consent_push, tags)
ON CONFLICT (id) DO UPDATE SET
    email = EXCLUDED.email, phone = EXCLUDED.phone, push_token = EXCLUDED.push_token,
    name = EXCLUDED.name, locale = EXCLUDED.locale, time_zone = EXCLUDED.time_zone,
    consent_email = EXCLUDED.consent_email, consent_sms = EXCLUDED.consent_sms,
    consent_push = EXCLUDED.consent_push, tags = EXCLUDED.tags, updated_at = now()
"""


def _columns(batch: Sequence[Customer]) -> list[list[Any]]:
    return [
        [c.id for c in batch],
        [c.email for c in batch],
        [c.phone for c in batch],
        [c.push_token for c in batch],
        [c.name for c in batch],
        [c.locale for c in batch],
        [c.time_zone for c in batch],
        [c.consent_email for c in batch],
        [c.consent_sms for c in batch],
        [c.consent_push for c in batch],
        # tags travel as one string per row (a text[][] cannot be ragged); \x1f never
        # occurs in a valid tag
        ["\x1f".join(c.tags) if c.tags else None for c in batch],
    ]


async def upsert(db: asyncpg.Pool | asyncpg.Connection, batch: Sequence[Customer]) -> int:
    """Insert or update ``batch`` in one statement; the last record of an id wins."""
    unique = list({c.id: c for c in batch}.values())
    if unique:
        await db.execute(_UPSERT, *_columns(unique))
    return len(unique)


async def create(
    db: asyncpg.Pool, customer: Customer, actor: Actor | None = None
) -> dict[str, Any]:
    """Insert one customer (with ``actor``'s audit entry); a taken id is a conflict."""
    cols = _columns([customer])
    async with audit.changing(db) as conn:
        row = await conn.fetchrow(
            "INSERT INTO customers (id, email, phone, push_token, name, locale, time_zone,"
            " consent_email, consent_sms, consent_push, tags)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,"
            " coalesce(string_to_array($11, E'\\x1f'), '{}'))"
            f" ON CONFLICT (id) DO NOTHING RETURNING {COLUMNS}",
            *[c[0] for c in cols],
        )
        if row is None:
            raise errors.Conflict(f"customer {customer.id} exists already")
        if actor is not None:
            change = {"customer": [None, customer.id]}
            await audit.record(conn, actor, "customer.create", "customer", customer.id, change)
    return dict(row)


async def get(db: asyncpg.Pool, customer_id: str) -> dict[str, Any]:
    row = await db.fetchrow(f"SELECT {COLUMNS} FROM customers WHERE id = $1", customer_id)
    if row is None:
        raise errors.NotFound(f"no customer has id {customer_id!r}")
    return dict(row)


async def page(
    db: asyncpg.Pool, *, tag: str | None, after: str | None, limit: int
) -> dict[str, Any]:
    """One page in id order (keyset: pass the last id as ``after``)."""
    rows = await db.fetch(
        f"SELECT {COLUMNS} FROM customers"
        " WHERE ($1::text IS NULL OR tags @> ARRAY[$1::text]) AND ($2::text IS NULL OR id > $2)"
        " ORDER BY id LIMIT $3",
        tag,
        after,
        limit,
    )
    items = [dict(r) for r in rows]
    return {"items": items, "next_after": items[-1]["id"] if len(items) == limit else None}


async def codes_of(db: asyncpg.Pool, customer_id: str, limit: int) -> list[str]:
    """The codes held by a customer, most recently changed first."""
    rows = await db.fetch(
        "SELECT code FROM vouchers WHERE customer_id = $1 ORDER BY updated_at DESC NULLS LAST"
        " LIMIT $2",
        customer_id,
        limit,
    )
    return [r["code"] for r in rows]


async def import_stream(
    db: asyncpg.Pool,
    content_type: str | None,
    chunks: AsyncIterator[bytes],
    batch_size: int,
    actor: Actor | None = None,
) -> dict[str, Any]:
    """Parse ``chunks`` as they arrive and upsert valid rows every ``batch_size``; holds
    one batch and the rejection report (capped) in memory, never the whole file. Each
    batch is written with one audit entry of ``actor`` (how many customers, the first
    ids) in its transaction."""
    parser = parser_for(content_type)
    batch: list[Customer] = []
    rejections: list[dict[str, Any]] = []
    rejected = imported = 0

    async def flush() -> None:
        nonlocal imported, batch
        if batch:
            async with audit.changing(db) as conn:
                n = await upsert(conn, batch)
                if actor is not None:
                    ids = list(dict.fromkeys(c.id for c in batch))
                    change = {"upserted": n, "ids": ids[:_AUDITED_IDS]}
                    await audit.record(conn, actor, "customers.import", "customer", "*", change)
            imported += len(batch)
            batch = []

    async def take(rows: list[tuple[int, Any]]) -> None:
        nonlocal rejected
        for line, result in rows:
            if isinstance(result, Customer):
                batch.append(result)
                continue
            rejected += 1
            for problem in result:
                if len(rejections) < MAX_REPORTED_REJECTIONS:
                    rejections.append(
                        msgspec_to_dict(Rejection(line, problem.field, problem.reason))
                    )
        if len(batch) >= batch_size:
            await flush()

    async for chunk in chunks:
        if chunk:
            await take(parser.feed(chunk))
    await take(parser.finish())
    await flush()
    return {
        "rows": parser.rows,
        "imported": imported,
        "rejected": rejected,
        "rejections": rejections,
        "rejections_truncated": len(rejections) >= MAX_REPORTED_REJECTIONS,
    }


def msgspec_to_dict(r: Rejection) -> dict[str, Any]:
    return {"line": r.line, "field": r.field, "reason": r.reason}
