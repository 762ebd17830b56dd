"""Notifications in Postgres: recording one (every producer), threshold arming, webhooks,
the dispatcher's claims, sends and attempts, and the in-app list.

``record`` is the one way a row enters ``notifications``; the dispatcher
(``actors/notifier.py``) claims rows whose ``dispatched_at`` is NULL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import asyncpg
import msgspec

from engine import errors
from store.fencing import Fence, fenced
from store.pools import Db

_INSERT = (
    "INSERT INTO notifications (kind, campaign_id, message) VALUES ($1, $2, $3) RETURNING id"
)


async def record(
    db: Db, kind: str, campaign_id: str | None, message: str, *, fence: Fence | None = None
) -> int:
    """Record one notification; returns its id. With ``fence`` (``db`` then a connection)
    in a transaction that checks the writer's epoch first."""
    if fence is None:
        return int(await db.fetchval(_INSERT, kind, campaign_id, message))
    conn = cast(asyncpg.Connection, db)
    async with fenced(conn, fence):
        nid = await conn.fetchval(_INSERT, kind, campaign_id, message)
    return int(nid)


# --- thresholds --------------------------------------------------------------------------


async def armed(conn: asyncpg.Connection, key: str) -> bool | None:
    """Whether threshold ``key`` is armed (None: never observed)."""
    value = await conn.fetchval("SELECT armed FROM notification_thresholds WHERE key = $1", key)
    return None if value is None else bool(value)


async def disarm(conn: asyncpg.Connection, key: str) -> bool:
    """Disarm ``key`` if it is armed (or new); whether this call did it."""
    won = await conn.fetchval(
        "INSERT INTO notification_thresholds (key, armed) VALUES ($1, false)"
        " ON CONFLICT (key) DO UPDATE SET armed = false, updated_at = now()"
        " WHERE notification_thresholds.armed RETURNING key",
        key,
    )
    return won is not None


async def set_armed(conn: asyncpg.Connection, key: str, value: bool) -> None:
    await conn.execute(
        "INSERT INTO notification_thresholds (key, armed) VALUES ($1, $2)"
        " ON CONFLICT (key) DO UPDATE SET armed = EXCLUDED.armed, updated_at = now()",
        key,
        value,
    )


# --- webhooks ----------------------------------------------------------------------------

_WEBHOOK_COLUMNS = "id, url, kinds, active, created_at"


async def add_webhook(
    db: Db, wid: str, url: str, secret: str, kinds: list[str] | None
) -> dict[str, Any]:
    row = await db.fetchrow(
        "INSERT INTO notification_webhooks (id, url, secret, kinds) VALUES ($1, $2, $3, $4)"
        f" RETURNING {_WEBHOOK_COLUMNS}",
        wid,
        url,
        secret,
        kinds,
    )
    return dict(row)


async def list_webhooks(db: Db) -> list[dict[str, Any]]:
    rows = await db.fetch(
        f"SELECT {_WEBHOOK_COLUMNS} FROM notification_webhooks ORDER BY created_at"
    )
    return [dict(r) for r in rows]


async def remove_webhook(db: Db, webhook_id: str) -> dict[str, Any]:
    row = await db.fetchrow(
        f"UPDATE notification_webhooks SET active = false WHERE id = $1 RETURNING {_WEBHOOK_COLUMNS}",
        webhook_id,
    )
    if row is None:
        raise errors.NotFound(f"no webhook has id {webhook_id!r}")
    return dict(row)


async def webhook(db: Db, webhook_id: str) -> asyncpg.Record | None:
    """``url, secret, active`` of one webhook."""
    return await db.fetchrow(
        "SELECT url, secret, active FROM notification_webhooks WHERE id = $1", webhook_id
    )


async def sends_of(db: Db, notification_id: int) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT s.id, s.target, s.state, s.attempts, s.last_error, s.sent_at,"
        " coalesce(json_agg(json_build_object('attempt', a.attempt, 'at', a.at, 'ok', a.ok,"
        " 'status', a.status, 'error', a.error) ORDER BY a.attempt)"
        " FILTER (WHERE a.id IS NOT NULL), '[]')::text AS attempts_log"
        " FROM notification_sends s LEFT JOIN notification_attempts a ON a.send_id = s.id"
        " WHERE s.notification_id = $1 GROUP BY s.id ORDER BY s.id",
        notification_id,
    )
    out = []
    for r in rows:
        d = dict(r)
        d["attempts_log"] = msgspec.json.decode(d["attempts_log"])
        out.append(d)
    return out


# --- the dispatcher ----------------------------------------------------------------------


async def claim_new(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Mark up to 200 undispatched notifications dispatched (the caller's transaction);
    ``id, kind`` of each."""
    return await conn.fetch(
        "UPDATE notifications SET dispatched_at = now() WHERE id IN ("
        " SELECT id FROM notifications WHERE dispatched_at IS NULL ORDER BY id"
        " LIMIT 200 FOR UPDATE SKIP LOCKED) RETURNING id, kind"
    )


async def active_webhooks(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """``id, kinds`` of every active webhook."""
    return await conn.fetch("SELECT id, kinds FROM notification_webhooks WHERE active")


async def add_sends(conn: asyncpg.Connection, ids: Sequence[int], targets: Sequence[str]) -> None:
    await conn.execute(
        "INSERT INTO notification_sends (notification_id, target)"
        " SELECT * FROM unnest($1::int8[], $2::text[]) ON CONFLICT DO NOTHING",
        ids,
        targets,
    )


async def lease_due(db: Db, lease_s: int) -> list[asyncpg.Record]:
    """Take up to 50 due pending sends for ``lease_s`` seconds (one more attempt each):
    ``id, target, attempts`` and the notification's ``nid, kind, campaign_id, message,
    created_at``."""
    return await db.fetch(
        "UPDATE notification_sends s SET attempts = s.attempts + 1,"
        f" next_at = now() + interval '{int(lease_s)} seconds'"
        " FROM notifications n WHERE n.id = s.notification_id AND s.id IN ("
        " SELECT id FROM notification_sends WHERE state = 'pending' AND next_at <= now()"
        " ORDER BY next_at LIMIT 50 FOR UPDATE SKIP LOCKED)"
        " RETURNING s.id, s.target, s.attempts, n.id AS nid, n.kind, n.campaign_id,"
        " n.message, n.created_at"
    )


async def record_attempt(
    pool: asyncpg.Pool,
    send_id: int,
    attempt: int,
    *,
    ok: bool,
    status: int | None,
    error: str | None,
    state: str,
    delay_s: float,
) -> None:
    """One attempt's row and its send's new ``state`` (next try after ``delay_s``), in one
    transaction."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO notification_attempts (send_id, attempt, ok, status, error)"
            " VALUES ($1, $2, $3, $4, $5)",
            send_id,
            attempt,
            ok,
            status,
            error,
        )
        await conn.execute(
            "UPDATE notification_sends SET state = $2, last_error = $3,"
            " sent_at = CASE WHEN $4 THEN now() END,"
            " next_at = now() + make_interval(secs => $5) WHERE id = $1",
            send_id,
            state,
            error,
            ok,
            delay_s,
        )


async def staff_emails(db: Db) -> list[str]:
    """Addresses of every admin and manager."""
    rows = await db.fetch(
        "SELECT email FROM users WHERE roles && ARRAY['admin', 'manager']::text[] ORDER BY email"
    )
    return [r["email"] for r in rows]


# --- the in-app list ---------------------------------------------------------------------

_COLUMNS = "id, kind, campaign_id, message, created_at, read_at"


async def list_recent(db: Db, unread_only: bool, limit: int) -> list[dict[str, Any]]:
    rows = await db.fetch(
        f"SELECT {_COLUMNS} FROM notifications"
        " WHERE ($1::bool IS FALSE OR read_at IS NULL) ORDER BY id DESC LIMIT $2",
        unread_only,
        limit,
    )
    return [dict(r) for r in rows]


async def mark_read(db: Db, notification_id: int) -> dict[str, Any]:
    row = await db.fetchrow(
        "UPDATE notifications SET read_at = coalesce(read_at, now()) WHERE id = $1"
        f" RETURNING {_COLUMNS}",
        notification_id,
    )
    if row is None:
        raise errors.NotFound(f"no notification has id {notification_id}")
    return dict(row)
