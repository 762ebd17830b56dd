"""Publications in Postgres: one row per campaign x customer, written in one transaction
with its ``voucher.published`` event and its queued messages, so a publication, its event
and its deliveries exist together or not at all.

The unique key on (campaign_id, customer_id) decides concurrent repeats: every one inserts
with ``ON CONFLICT DO NOTHING``; the first commits, the others wait for it and then read its
row (a new statement under READ COMMITTED sees what committed meanwhile).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec

from engine.audit import Actor
from engine.customers import Customer
from engine.delivery import DeliveryMessage
from store import audit, events
from store import delivery as delivery_store
from store.pools import Db

_COLUMNS = "id, campaign_id, customer_id, code, channels, deliveries::text, created_at"
_CUSTOMER = (
    "SELECT id, email, phone, push_token, name, locale, time_zone, consent_email, consent_sms,"
    " consent_push, tags FROM customers WHERE id = $1"
)


async def customer(db: Db, customer_id: str) -> Customer | None:
    """The customer record a publication addresses, or None."""
    r = await db.fetchrow(_CUSTOMER, customer_id)
    if r is None:
        return None
    return Customer(**{**dict(r), "tags": tuple(r["tags"])})


def _row(r: asyncpg.Record) -> dict[str, Any]:
    d = dict(r)
    d["channels"] = list(d["channels"])
    d["deliveries"] = msgspec.json.decode(d.pop("deliveries"))
    return d


async def _with_states(db: Db, pub: dict[str, Any]) -> dict[str, Any]:
    """``pub`` with each queued message's current state (queued, sent, failed, dead)."""
    ids = [d["id"] for d in pub["deliveries"] if d.get("id")]
    states: dict[str, str] = {}
    if ids:
        rows = await db.fetch("SELECT id, state FROM deliveries WHERE id = ANY($1::text[])", ids)
        states = {r["id"]: r["state"] for r in rows}
    pub["deliveries"] = [
        {**d, "status": states.get(d["id"], "queued")} if d.get("id") else d
        for d in pub["deliveries"]
    ]
    return pub


async def find(db: Db, campaign_id: str, customer_id: str) -> dict[str, Any] | None:
    """The campaign's publication to the customer, or None."""
    r = await db.fetchrow(
        f"SELECT {_COLUMNS} FROM publications WHERE campaign_id = $1 AND customer_id = $2",
        campaign_id,
        customer_id,
    )
    return None if r is None else await _with_states(db, _row(r))


async def create(
    pool: asyncpg.Pool,
    pub: dict[str, Any],
    messages: Sequence[DeliveryMessage],
    actor: Actor | None = None,
) -> tuple[dict[str, Any], bool, list[DeliveryMessage]]:
    """Insert ``pub`` (id, campaign_id, customer_id, code, channels, deliveries) with its
    event, ``messages`` recorded as queued and the audit entry of ``actor``, in one
    transaction. Returns the publication
    as stored, whether this call created it, and the messages to add to the streams (those
    whose row is queued; none when the publication existed already)."""
    async with pool.acquire() as conn, conn.transaction():
        r = await conn.fetchrow(
            "INSERT INTO publications (id, campaign_id, customer_id, code, channels, deliveries)"
            " VALUES ($1, $2, $3, $4, $5, $6::jsonb)"
            f" ON CONFLICT (campaign_id, customer_id) DO NOTHING RETURNING {_COLUMNS}",
            pub["id"],
            pub["campaign_id"],
            pub["customer_id"],
            pub["code"],
            list(pub["channels"]),
            msgspec.json.encode(pub["deliveries"]).decode(),
        )
        if r is None:
            existing = await find(conn, pub["campaign_id"], pub["customer_id"])
            assert existing is not None  # the conflicting row committed before DO NOTHING
            return existing, False, []
        queued: set[str] = set()
        if messages:
            cols: list[list[str | None]] = [
                [m.id for m in messages],
                [m.campaign_id for m in messages],
                [m.customer_id for m in messages],
                [m.channel for m in messages],
                [m.recipient for m in messages],
                [m.code for m in messages],
                [m.job_id for m in messages],
            ]
            queued = await delivery_store.record_queued(conn, cols)
        await events.record(
            conn,
            "voucher.published",
            {
                "publication_id": pub["id"],
                "campaign_id": pub["campaign_id"],
                "customer_id": pub["customer_id"],
                "code": pub["code"],
                "channels": list(pub["channels"]),
            },
            campaign_id=pub["campaign_id"],
            resource_id=pub["code"],
            event_id=f"evt_{pub['id']}",
        )
        if actor is not None:
            await audit.record(
                conn,
                actor,
                "publications.create",
                "publication",
                pub["id"],
                {"campaign_id": pub["campaign_id"], "customer_id": pub["customer_id"],
                 "code": pub["code"], "channels": list(pub["channels"])},
            )
        out = await _with_states(conn, _row(r))
    return out, True, [m for m in messages if m.id in queued]
