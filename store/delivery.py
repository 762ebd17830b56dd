"""Postgres side of delivery: templates, status counts and listings (the HTTP API), the
producer's recording of queued messages (``actors/delivery_queue.py``) and the workers'
claims, outcomes and re-queue scans (``actors/delivery.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from engine import errors, templates
from engine.sending import normalize_locale
from store.pools import Db

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


# --- the producer ------------------------------------------------------------------------

_INSERT = """
INSERT INTO deliveries (id, campaign_id, customer_id, channel, recipient, code, job_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[])
ON CONFLICT (id) DO NOTHING
"""
_QUEUED = "SELECT id FROM deliveries WHERE id = ANY($1::text[]) AND state = 'queued'"
# SKIP LOCKED: a row locked meanwhile is being claimed by a sender (it leaves `queued`); waiting
# for it, with the rows locked in another order than the sender's, could deadlock.
_ADDED = """
UPDATE deliveries SET stream_gen = $2
WHERE id IN (SELECT id FROM deliveries WHERE id = ANY($1::text[]) AND state = 'queued'
             FOR UPDATE SKIP LOCKED)
"""



async def record_queued(db: Db, columns: Sequence[Sequence[str | None]]) -> set[str]:
    """Record messages (``id, campaign_id, customer_id, channel, recipient, code, job_id``
    as seven columns; a message that has a row keeps it); the ids whose row is queued."""
    await db.execute(_INSERT, *columns)
    return {r["id"] for r in await db.fetch(_QUEUED, columns[0])}


async def mark_added(db: Db, ids: list[str], stream_gen: str) -> None:
    """Write the streams' incarnation on the rows of ``ids`` still queued."""
    await db.execute(_ADDED, ids, stream_gen)


# --- the workers -------------------------------------------------------------------------

# Rows are locked in id order, so two claims of overlapping batches cannot deadlock.
_CLAIM = """
WITH locked AS (SELECT id FROM deliveries WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE)
UPDATE deliveries AS d SET state = 'sending', attempts = d.attempts + 1, claimed_by = $2,
       claimed_at = now(), updated_at = now()
FROM locked
WHERE d.id = locked.id
  AND (d.state = 'queued'
       OR (d.state = 'failed' AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= now()))
       OR (d.state = 'sending' AND d.claimed_at < now() - make_interval(secs => $3)))
RETURNING d.id, d.attempts
"""
_UNCLAIMED = """
SELECT id, state, extract(epoch FROM next_attempt_at) AS due FROM deliveries
WHERE id = ANY($1::text[])
"""
_SENT = """
UPDATE deliveries SET state = 'sent', sent_at = now(), last_error = NULL, updated_at = now(),
       next_attempt_at = NULL
WHERE id = ANY($1::text[]) AND state = 'sending' AND claimed_by = $2
"""
_SENT_RECOVERED = """
UPDATE deliveries SET state = 'sent', sent_at = now(), last_error = NULL, updated_at = now(),
       next_attempt_at = NULL
WHERE id = ANY($1::text[]) AND state IN ('sending', 'failed', 'queued')
"""
_FAILED = """
UPDATE deliveries AS d SET state = 'failed', last_error = u.err, updated_at = now(),
       next_attempt_at = now() + make_interval(secs => u.delay)
FROM unnest($1::text[], $2::text[], $3::float8[]) AS u(id, err, delay)
WHERE d.id = u.id AND d.state = 'sending' AND d.claimed_by = $4
"""
_DEAD = """
UPDATE deliveries AS d SET state = 'dead', last_error = u.err, updated_at = now(),
       next_attempt_at = NULL
FROM unnest($1::text[], $2::text[]) AS u(id, err)
WHERE d.id = u.id AND d.state = 'sending' AND d.claimed_by = $3
"""
_MESSAGE_COLS = """
SELECT d.id, d.campaign_id, d.customer_id, d.channel, d.recipient, d.code, d.job_id,
       coalesce(c.locale, 'en') AS locale, c.name
FROM deliveries d LEFT JOIN customers c ON c.id = d.customer_id
"""
_SWEEP = _MESSAGE_COLS + """
WHERE d.channel = $1 AND (
      (d.state = 'sending' AND d.claimed_at < now() - make_interval(secs => $2))
   OR (d.state = 'failed' AND d.next_attempt_at < now() - make_interval(secs => $2)))
LIMIT 1000
"""
# Queued rows never added to a stream (Redis was down, or the producer died), older than
# the grace a producer needs between recording a row and adding it. Checked every second;
# cheap, as a partial index holds only such rows.
_NOT_ADDED = _MESSAGE_COLS + """
WHERE d.channel = $1 AND d.state = 'queued' AND d.stream_gen IS NULL AND d.id > $2
  AND d.updated_at < now() - make_interval(secs => $3)
ORDER BY d.id
LIMIT 1000
"""
# Queued rows added to another Redis server than the current one: once per worker and server.
_NOT_ON_SERVER = _MESSAGE_COLS + """
WHERE d.channel = $1 AND d.state = 'queued' AND d.stream_gen <> $3 AND d.id > $2
ORDER BY d.id
LIMIT 1000
"""
_RENEW = """
UPDATE deliveries SET claimed_at = now()
WHERE id IN (SELECT id FROM deliveries WHERE id = ANY($1::text[]) AND state = 'sending'
             AND claimed_by = $2 FOR UPDATE SKIP LOCKED)
"""


async def claim(db: Db, ids: list[str], consumer: str, takeover_s: float) -> dict[str, int]:
    """Claim the sendable rows of ``ids`` for ``consumer`` (a claim older than
    ``takeover_s`` is taken over); ``id -> attempts`` of those claimed."""
    return {r["id"]: int(r["attempts"]) for r in await db.fetch(_CLAIM, ids, consumer, takeover_s)}


async def unclaimed(db: Db, ids: list[str]) -> list[asyncpg.Record]:
    """``id, state, due`` (epoch seconds of the next attempt) of ``ids``."""
    return await db.fetch(_UNCLAIMED, ids)


async def renew_claims(db: Db, ids: list[str], consumer: str) -> None:
    await db.execute(_RENEW, ids, consumer)


async def record_outcomes(
    pool: asyncpg.Pool,
    consumer: str,
    sent: list[str],
    recovered: list[str],
    retry: Sequence[tuple[str, str, float]],
    dead: Sequence[tuple[str, str]],
) -> None:
    """One round's outcomes in one transaction: ``sent`` (by this consumer's claims),
    ``recovered`` (sent before, by anyone), ``retry`` ``(id, error, delay_s)`` and ``dead``
    ``(id, error)``."""
    async with pool.acquire() as conn, conn.transaction():
        if sent:
            await conn.execute(_SENT, sent, consumer)
        if recovered:
            await conn.execute(_SENT_RECOVERED, recovered)
        if retry:
            await conn.execute(
                _FAILED, [i for i, _, _ in retry], [e for _, e, _ in retry], [d for _, _, d in retry], consumer
            )
        if dead:
            await conn.execute(_DEAD, [i for i, _ in dead], [e for _, e in dead], consumer)


async def swept(db: Db, channel: str, idle_s: float) -> list[asyncpg.Record]:
    """Messages of ``channel`` whose claim or retry made no progress for ``idle_s``."""
    return await db.fetch(_SWEEP, channel, idle_s)


async def not_added(db: Db, channel: str, after: str, grace_s: float) -> list[asyncpg.Record]:
    """A page (ids after ``after``) of queued messages never added to a stream, recorded
    more than ``grace_s`` ago."""
    return await db.fetch(_NOT_ADDED, channel, after, grace_s)


async def not_on_server(db: Db, channel: str, after: str, run_id: str) -> list[asyncpg.Record]:
    """A page (ids after ``after``) of queued messages added to another Redis server than
    ``run_id``."""
    return await db.fetch(_NOT_ON_SERVER, channel, after, run_id)


async def campaign_sources(
    db: Db, ids: list[str]
) -> tuple[list[asyncpg.Record], list[asyncpg.Record], list[asyncpg.Record]]:
    """What rendering needs of campaigns ``ids``: ``id, name, spec`` rows, ``campaign_id,
    default_locale`` rows and template rows (``campaign_id, channel, locale, subject,
    body``)."""
    camps = await db.fetch("SELECT id, name, spec FROM campaigns WHERE id = ANY($1::text[])", ids)
    defaults = await db.fetch(
        "SELECT campaign_id, default_locale FROM campaign_delivery WHERE campaign_id = ANY($1::text[])", ids
    )
    tpl_rows = await db.fetch(
        "SELECT campaign_id, channel, locale, subject, body FROM campaign_templates WHERE campaign_id = ANY($1::text[])",
        ids,
    )
    return camps, defaults, tpl_rows
