"""Customers in Postgres: upsert in batches (``unnest`` arrays, one statement per batch),
look-ups, keyset listing, and the streamed import that ties the parser of
``engine.customers`` to a byte stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg

from engine import errors
from engine.audit import Actor
from engine.customers import FIELDS, Customer, Rejection, parser_for, validate_or_raise
from store import audit
from store.pools import Db

MAX_REPORTED_REJECTIONS = 1000
_AUDITED_IDS = 100  # ids named in an import batch's audit entry
COLUMNS = (
    "id, email, phone, push_token, name, locale, time_zone, consent_email, consent_sms,"
    " consent_push, tags, metadata::text AS metadata, user_id, created_at, updated_at"
)

_UPSERT = """
INSERT INTO customers (id, email, phone, push_token, name, locale, time_zone,
                       consent_email, consent_sms, consent_push, tags, metadata)
SELECT u.id, u.email, u.phone, u.push_token, u.name, u.locale, u.time_zone,
       u.consent_email, u.consent_sms, u.consent_push,
       coalesce(string_to_array(u.tags, E'\\x1f'), '{}'), u.metadata::jsonb
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::text[], $8::bool[], $9::bool[], $10::bool[], $11::text[], $12::text[])
     AS u(id, email, phone, push_token, name, locale, time_zone, consent_email, consent_sms,
          consent_push, tags, metadata)
ON CONFLICT (id) DO UPDATE SET
    email = EXCLUDED.email, phone = EXCLUDED.phone, push_token = EXCLUDED.push_token,
    name = EXCLUDED.name, locale = EXCLUDED.locale, time_zone = EXCLUDED.time_zone,
    consent_email = EXCLUDED.consent_email, consent_sms = EXCLUDED.consent_sms,
    consent_push = EXCLUDED.consent_push, tags = EXCLUDED.tags,
    metadata = coalesce(EXCLUDED.metadata, customers.metadata), updated_at = now()
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
        [c.metadata for c in batch],
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
            " consent_email, consent_sms, consent_push, tags, metadata)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,"
            " coalesce(string_to_array($11, E'\\x1f'), '{}'), $12::jsonb)"
            f" ON CONFLICT (id) DO NOTHING RETURNING {COLUMNS}",
            *[c[0] for c in cols],
        )
        if row is None:
            raise errors.Conflict(f"customer {customer.id} exists already")
        if actor is not None:
            change = {"customer": [None, customer.id]}
            await audit.record(conn, actor, "customer.create", "customer", customer.id, change)
    return _out(row)


def _out(row: asyncpg.Record) -> dict[str, Any]:
    """A customer row as the API shows it (``metadata`` decoded)."""
    d = dict(row)
    if d.get("metadata") is not None:
        d["metadata"] = json.loads(d["metadata"])
    return d


async def get(db: Db, customer_id: str) -> dict[str, Any]:
    row = await db.fetchrow(f"SELECT {COLUMNS} FROM customers WHERE id = $1", customer_id)
    if row is None:
        raise errors.NotFound(f"no customer has id {customer_id!r}")
    return _out(row)


async def page(
    db: asyncpg.Pool,
    *,
    tag: str | None,
    after: str | None,
    limit: int,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One page in id order (keyset: pass the last id as ``after``); ``metadata``: only
    customers whose metadata contains that object (``engine.metadata.parse_filter``)."""
    meta = " AND metadata @> $4::jsonb" if metadata is not None else ""
    args: list[Any] = [tag, after, limit]
    if metadata is not None:
        args.append(json.dumps(metadata))
    rows = await db.fetch(
        f"SELECT {COLUMNS} FROM customers"
        " WHERE ($1::text IS NULL OR tags @> ARRAY[$1::text]) AND ($2::text IS NULL OR id > $2)"
        f"{meta} ORDER BY id LIMIT $3",
        *args,
    )
    items = [_out(r) for r in rows]
    return {"items": items, "next_after": items[-1]["id"] if len(items) == limit else None}


# The fields of a customer record a change may set (``id`` names it; ``user_id`` links the
# user account that signs in as this customer).
EDITABLE = (*(f for f in FIELDS if f != "id"), "user_id")


async def update(
    pool: asyncpg.Pool, customer_id: str, changes: dict[str, Any], actor: Actor
) -> dict[str, Any]:
    """Apply ``changes`` (fields absent stay, ``None`` clears) to a customer: the merged
    record is validated as a whole (consent rules included), written with its audit entry
    in one transaction. ``user_id`` must name a user account that no other customer is
    linked to."""
    unknown = sorted(set(changes) - set(EDITABLE))
    if unknown:
        raise errors.InvalidInput(f"unknown field(s) {', '.join(unknown)}; fields are {', '.join(EDITABLE)}")
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"SELECT {COLUMNS} FROM customers WHERE id = $1 FOR UPDATE", customer_id
        )
        if row is None:
            raise errors.NotFound(f"no customer has id {customer_id!r}")
        before = _out(row)
        merged = {f: before[f] for f in FIELDS} | {
            k: v for k, v in changes.items() if k != "user_id"
        }
        merged["tags"] = list(merged["tags"] or [])
        customer = validate_or_raise(merged)
        user_id = changes.get("user_id", before["user_id"])
        if "user_id" in changes and user_id is not None:
            if not await conn.fetchval("SELECT true FROM users WHERE id = $1", user_id):
                raise errors.InvalidInput(f"user_id: no user account has id {user_id!r}")
            other = await conn.fetchval(
                "SELECT id FROM customers WHERE user_id = $1 AND id <> $2", user_id, customer_id
            )
            if other is not None:
                raise errors.Conflict(
                    f"user {user_id} is linked to customer {other} already; unlink it there first"
                )
        cols = _columns([customer])
        try:
            row = await conn.fetchrow(
                "UPDATE customers SET email = $2, phone = $3, push_token = $4, name = $5,"
                " locale = $6, time_zone = $7, consent_email = $8, consent_sms = $9,"
                " consent_push = $10, tags = coalesce(string_to_array($11, E'\\x1f'), '{}'),"
                f" metadata = $12::jsonb, user_id = $13, updated_at = now() WHERE id = $1"
                f" RETURNING {COLUMNS}",
                *[c[0] for c in cols],
                user_id,
            )
        except asyncpg.UniqueViolationError:
            # linked elsewhere by a concurrent change since the check above
            raise errors.Conflict(f"user {user_id} is linked to another customer already") from None
        assert row is not None
        after = _out(row)
        diff = {
            k: [_jsonable(before[k]), _jsonable(after[k])]
            for k in (*FIELDS, "user_id")
            if before[k] != after[k]
        }
        if diff:
            await audit.record(conn, actor, "customers.update", "customer", customer_id, diff)
    return after


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


async def tags_of(db: Db, customer_id: str) -> tuple[str, ...]:
    """The customer's stored tags (none for a customer with no row)."""
    tags = await db.fetchval("SELECT tags FROM customers WHERE id = $1", customer_id)
    return tuple(tags or ())


async def linked_customer(db: Db, user_id: str) -> str | None:
    """The customer record a user account is linked to, if any."""
    found: str | None = await db.fetchval("SELECT id FROM customers WHERE user_id = $1", user_id)
    return found


async def codes_of(db: Db, customer_id: str, limit: int) -> list[str]:
    """The codes held by a customer (a user's own id, and the customer record linked to
    that user account), most recently changed first."""
    rows = await db.fetch(
        "SELECT code FROM vouchers WHERE customer_id = ANY(ARRAY("
        "SELECT $1::text UNION SELECT id FROM customers WHERE user_id = $1))"
        " ORDER BY updated_at DESC NULLS LAST LIMIT $2",
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
