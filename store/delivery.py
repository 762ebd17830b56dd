"""Postgres side of delivery that the HTTP API needs: templates, status counts, listings.

(The workers' own claim/record statements live in ``actors/delivery.py``.)
"""

from __future__ import annotations

from typing import Any

import asyncpg

from engine import errors, templates
from engine.sending import normalize_locale

STATES = ("queued", "sending", "sent", "failed", "dead")


async def campaign_exists(db: asyncpg.Pool, campaign_id: str) -> bool:
    return bool(await db.fetchval("SELECT 1 FROM campaigns WHERE id = $1", campaign_id))


async def put_template(
    db: asyncpg.Pool,
    campaign_id: str,
    channel: str,
    locale: str,
    subject: str | None,
    body: str,
    make_default: bool,
) -> dict[str, Any]:
    """Validate, then store (replace) one template. Unknown campaign -> ``UnknownCampaign``;
    a template that does not compile or render -> ``InvalidInput`` naming the error."""
    templates.validate(channel, subject, body)
    loc = normalize_locale(locale)
    async with db.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT 1 FROM campaigns WHERE id = $1 FOR SHARE", campaign_id):
            raise errors.UnknownCampaign(f"no campaign {campaign_id!r}")
        row = await conn.fetchrow(
            """
            INSERT INTO campaign_templates (campaign_id, channel, locale, subject, body)
            VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (campaign_id, channel, locale)
            DO UPDATE SET subject = EXCLUDED.subject, body = EXCLUDED.body, updated_at = now()
            RETURNING campaign_id, channel, locale, subject, body, updated_at
            """,
            campaign_id,
            channel,
            loc,
            subject,
            body,
        )
        if make_default:
            await conn.execute(
                "INSERT INTO campaign_delivery (campaign_id, default_locale) VALUES ($1, $2)"
                " ON CONFLICT (campaign_id) DO UPDATE SET default_locale = EXCLUDED.default_locale",
                campaign_id,
                loc,
            )
        default = await conn.fetchval(
            "SELECT default_locale FROM campaign_delivery WHERE campaign_id = $1", campaign_id
        )
    out = dict(row)
    out["updated_at"] = out["updated_at"].isoformat()
    out["default_locale"] = default
    return out


async def list_templates(db: asyncpg.Pool, campaign_id: str) -> dict[str, Any]:
    if not await campaign_exists(db, campaign_id):
        raise errors.UnknownCampaign(f"no campaign {campaign_id!r}")
    rows = await db.fetch(
        "SELECT channel, locale, subject, body, updated_at FROM campaign_templates"
        " WHERE campaign_id = $1 ORDER BY channel, locale",
        campaign_id,
    )
    default = await db.fetchval(
        "SELECT default_locale FROM campaign_delivery WHERE campaign_id = $1", campaign_id
    )
    items = []
    for r in rows:
        d = dict(r)
        d["updated_at"] = d["updated_at"].isoformat()
        items.append(d)
    return {"campaign_id": campaign_id, "default_locale": default, "items": items}


async def status(db: asyncpg.Pool, campaign_id: str) -> dict[str, Any]:
    """Counts per channel and state (every state present, zeros included)."""
    rows = await db.fetch(
        "SELECT channel, state, count(*) AS n FROM deliveries WHERE campaign_id = $1"
        " GROUP BY channel, state",
        campaign_id,
    )
    per: dict[str, dict[str, int]] = {}
    totals = dict.fromkeys(STATES, 0)
    for r in rows:
        per.setdefault(r["channel"], dict.fromkeys(STATES, 0))[r["state"]] = int(r["n"])
        totals[r["state"]] += int(r["n"])
    return {"campaign_id": campaign_id, "channels": per, **totals, "total": sum(totals.values())}


def _row(r: asyncpg.Record) -> dict[str, Any]:
    d = dict(r)
    for k in ("queued_at", "sent_at", "updated_at"):
        if d.get(k) is not None:
            d[k] = d[k].isoformat()
    return d


_COLUMNS = (
    "id, campaign_id, customer_id, channel, recipient, state, attempts, last_error,"
    " queued_at, sent_at, updated_at"
)


async def list_deliveries(
    db: asyncpg.Pool,
    campaign_id: str,
    state: str | None,
    channel: str | None,
    limit: int,
    offset: int,
) -> dict[str, Any]:
    if not await campaign_exists(db, campaign_id):
        raise errors.UnknownCampaign(f"no campaign {campaign_id!r}")
    rows = await db.fetch(
        f"SELECT {_COLUMNS} FROM deliveries WHERE campaign_id = $1"
        " AND ($2::text IS NULL OR state = $2) AND ($3::text IS NULL OR channel = $3)"
        " ORDER BY queued_at, id LIMIT $4 OFFSET $5",
        campaign_id,
        state,
        channel,
        limit,
        offset,
    )
    return {"items": [_row(r) for r in rows], "limit": limit, "offset": offset}


async def list_dead(db: asyncpg.Pool, campaign_id: str | None, limit: int) -> dict[str, Any]:
    rows = await db.fetch(
        f"SELECT {_COLUMNS} FROM deliveries WHERE state = 'dead'"
        " AND ($1::text IS NULL OR campaign_id = $1) ORDER BY updated_at DESC LIMIT $2",
        campaign_id,
        limit,
    )
    return {"items": [_row(r) for r in rows]}
