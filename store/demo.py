"""The demo loader's direct writes (``ops/demo_data.py``): customers, delivery records and
redemptions moved back in time."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from engine.events import R_ROLLED_BACK

_BACKDATE = (
    "UPDATE redemptions AS r SET created_at = u.t,"
    f" rolled_back_at = CASE WHEN r.status = {R_ROLLED_BACK:d} THEN u.rb ELSE r.rolled_back_at END"
    " FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[]) AS u(id, t, rb)"
    " WHERE r.id = u.id"
)


async def add_customers(conn: asyncpg.Connection, rows: Sequence[tuple[str, str, list[str]]]) -> None:
    """``(id, email, tags)`` customers who consent to email; existing ids are kept."""
    await conn.executemany(
        "INSERT INTO customers (id, email, tags, consent_email) VALUES ($1, $2, $3, true)"
        " ON CONFLICT (id) DO NOTHING",
        rows,
    )


async def backdate(
    conn: asyncpg.Connection,
    ids: list[str],
    created: list[datetime],
    rolled_back: list[datetime],
) -> None:
    """Move redemptions ``ids`` to ``created`` (a rolled-back one's rollback to
    ``rolled_back``)."""
    await conn.execute(_BACKDATE, ids, created, rolled_back)


async def add_deliveries(conn: asyncpg.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """``(id, campaign_id, customer_id, channel, recipient, code, state, attempts,
    queued_at, sent_at)`` records; existing ids are kept."""
    await conn.executemany(
        "INSERT INTO deliveries (id, campaign_id, customer_id, channel, recipient, code, state,"
        " attempts, queued_at, sent_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        " ON CONFLICT (id) DO NOTHING",
        rows,
    )
