"""Exports of a campaign's codes as CSV: a job that Postgres runs a chunk at a time.

Each step is one transaction: it reads the next ``CHUNK_ROWS`` codes after the last one
written (keyset on ``(campaign_id, code)``), has Postgres format them as CSV lines into one
``export_chunks`` row, and moves the export's ``after`` and counters on, if (and only if)
the caller still holds the export's lease. So a runner may stop anywhere: what is
committed is whole, and whoever takes the lease over next continues from ``after``. The
step that finds the last codes marks the export done and records its ``export.completed``
event in the same transaction. No statement ever reads more than a chunk, so none runs
long whatever the campaign's size.

The download reads the chunks back one row at a time (:func:`chunks`).

An export deleted (``DELETE /v1/exports/{id}``, or when it is older than the retention) is
marked ``deleted`` at once and is gone for every reader; its chunks are deleted afterwards
a few per statement (:func:`purge`), then its row.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg

from engine.events import STATUS_NAMES
from store import events
from store.pools import Db

CHUNK_ROWS = 50_000
PURGE_CHUNKS = 8  # chunks of deleted exports one purge deletes (50,000 codes each)
HEADER = "code,status,customer_id,active,starts_at,expires_at,metadata\n"

_STATUS_ARRAY = "ARRAY[" + ",".join(f"'{s}'" for s in STATUS_NAMES) + "]"
_TIME = "to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
_LINE = (
    "csv_field(code) || ',' || (" + _STATUS_ARRAY + ")[status + 1] || ','"
    " || csv_field(customer_id) || ',' || CASE WHEN active THEN 'true' ELSE 'false' END"
    " || ',' || coalesce(" + _TIME.format("starts_at") + ", '')"
    " || ',' || coalesce(" + _TIME.format("expires_at") + ", '')"
    " || ',' || csv_field(metadata::text) || E'\\n'"
)

# $1 campaign, $2 after, $3 status or null, $4 rows, $5 export id, $6 seq
_CHUNK = f"""
WITH page AS (
    SELECT code, {_LINE} AS line FROM vouchers
    WHERE campaign_id = $1 AND code > $2 AND ($3::smallint IS NULL OR status = $3)
    ORDER BY code LIMIT $4
), chunk AS (
    INSERT INTO export_chunks (export_id, seq, rows, body)
    SELECT $5, $6, count(*), string_agg(line, '' ORDER BY code) FROM page HAVING count(*) > 0
    RETURNING rows, octet_length(body) AS bytes
)
SELECT (SELECT max(code) FROM page) AS last,
       coalesce((SELECT rows FROM chunk), 0) AS n,
       coalesce((SELECT bytes FROM chunk), 0) AS bytes
"""

_COLUMNS = (
    "id, campaign_id, format, status, state, total, rows, bytes, chunks, error, created_at,"
    " finished_at"
)


def export_json(r: Any) -> dict[str, Any]:
    return {
        "id": r["id"],
        "campaign_id": r["campaign_id"],
        "format": r["format"],
        "status": None if r["status"] is None else STATUS_NAMES[r["status"]],
        "state": r["state"],
        "total": r["total"],
        "rows": r["rows"],
        "bytes": r["bytes"],
        "error": r["error"],
        "created_at": r["created_at"],
        "finished_at": r["finished_at"],
        "download": f"/v1/exports/{r['id']}/download" if r["state"] == "done" else None,
    }


async def create(
    db: Db,
    export_id: str,
    campaign_id: str,
    fmt: str,
    status: int | None,
    runner: str,
    lease_s: float,
    created_by: str | None,
) -> dict[str, Any]:
    """A running export held by ``runner``; ``total`` is the count of matching codes now."""
    total = await db.fetchval(
        "SELECT count(*) FROM vouchers WHERE campaign_id = $1"
        " AND ($2::smallint IS NULL OR status = $2)",
        campaign_id,
        status,
    )
    r = await db.fetchrow(
        "INSERT INTO exports (id, campaign_id, format, status, total, runner, lease_until,"
        " created_by) VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7), $8)"
        f" RETURNING {_COLUMNS}",
        export_id,
        campaign_id,
        fmt,
        status,
        total,
        runner,
        lease_s,
        created_by,
    )
    return export_json(r)


async def get(db: Db, export_id: str) -> dict[str, Any] | None:
    """The export, or None when there is none (or it was deleted)."""
    r = await db.fetchrow(
        f"SELECT {_COLUMNS} FROM exports WHERE id = $1 AND state <> 'deleted'", export_id
    )
    return None if r is None else export_json(r)


async def page(
    db: Db, campaign_id: str, *, before: tuple[datetime, str] | None, limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """The campaign's exports (not deleted), newest first, from just after ``before``
    (the ``created_at`` and ``id`` of the last one seen); whether there are more."""
    at, last = before if before is not None else (None, "")
    rows = await db.fetch(
        f"SELECT {_COLUMNS} FROM exports WHERE campaign_id = $1 AND state <> 'deleted'"
        " AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))"
        " ORDER BY created_at DESC, id DESC LIMIT $4",
        campaign_id,
        at,
        last,
        limit + 1,
    )
    return [export_json(r) for r in rows[:limit]], len(rows) > limit


async def delete(db: Db, export_id: str) -> tuple[str, str] | None:
    """Mark the export deleted, whatever its state: its campaign and the state it was in,
    or None when there is none. A running one stops: its runner's next step finds it no
    longer running and writes nothing. Its chunks go later, a few at a time
    (:func:`purge`), so deleting a file of millions of codes is one short statement."""
    r = await db.fetchrow(
        "UPDATE exports e SET state = 'deleted', runner = NULL, lease_until = NULL,"
        " finished_at = coalesce(e.finished_at, now())"
        " FROM (SELECT id, state FROM exports WHERE id = $1 FOR UPDATE) AS before"
        " WHERE e.id = before.id AND before.state <> 'deleted'"
        " RETURNING e.campaign_id, before.state",
        export_id,
    )
    return None if r is None else (r["campaign_id"], r["state"])


async def expire(db: Db, older_than: datetime) -> int:
    """Mark deleted the exports that finished (done or failed) before ``older_than``."""
    done = await db.execute(
        "UPDATE exports SET state = 'deleted' WHERE state IN ('done', 'failed')"
        " AND finished_at < $1",
        older_than,
    )
    return int(done.split()[-1])


async def purge(db: asyncpg.Pool, chunks: int = PURGE_CHUNKS) -> int:
    """Delete up to ``chunks`` stored chunks of deleted exports, then the deleted exports
    with none left; how many chunks went. Replicas purging at once skip each other's rows."""
    async with db.acquire() as conn, conn.transaction():
        done = await conn.execute(
            "DELETE FROM export_chunks WHERE (export_id, seq) IN (SELECT c.export_id, c.seq"
            " FROM export_chunks c JOIN exports e ON e.id = c.export_id"
            " WHERE e.state = 'deleted' LIMIT $1 FOR UPDATE OF c SKIP LOCKED)",
            chunks,
        )
        await conn.execute(
            "DELETE FROM exports e WHERE e.state = 'deleted'"
            " AND NOT EXISTS (SELECT 1 FROM export_chunks c WHERE c.export_id = e.id)"
        )
    return int(done.split()[-1])


async def claim(db: Db, runner: str, lease_s: float, limit: int = 4) -> list[str]:
    """Take over running exports whose lease ran out (their runner stopped)."""
    rows = await db.fetch(
        "UPDATE exports SET runner = $1, lease_until = now() + make_interval(secs => $2)"
        " WHERE id IN (SELECT id FROM exports WHERE state = 'running'"
        "  AND (lease_until IS NULL OR lease_until < now())"
        "  ORDER BY lease_until NULLS FIRST LIMIT $3 FOR UPDATE SKIP LOCKED)"
        " RETURNING id",
        runner,
        lease_s,
        limit,
    )
    return [r["id"] for r in rows]


async def step(
    conn: asyncpg.Connection, export_id: str, runner: str, lease_s: float, rows: int = CHUNK_ROWS
) -> str:
    """Write the export's next chunk; ``"more"``, ``"done"`` (this step finished it) or
    ``"lost"`` (the export is no longer this runner's, or not running)."""
    async with conn.transaction():
        job = await conn.fetchrow(
            "SELECT campaign_id, status, after, chunks, rows FROM exports"
            " WHERE id = $1 AND runner = $2 AND state = 'running' FOR UPDATE",
            export_id,
            runner,
        )
        if job is None:
            return "lost"
        got = await conn.fetchrow(
            _CHUNK, job["campaign_id"], job["after"], job["status"], rows, export_id, job["chunks"]
        )
        n = int(got["n"])
        finished = n < rows
        await conn.execute(
            "UPDATE exports SET after = coalesce($2, after), rows = rows + $3,"
            " bytes = bytes + $4, chunks = chunks + $5,"
            " lease_until = now() + make_interval(secs => $6),"
            " state = CASE WHEN $7 THEN 'done' ELSE state END,"
            " finished_at = CASE WHEN $7 THEN now() END,"
            " runner = CASE WHEN $7 THEN NULL ELSE runner END"
            " WHERE id = $1",
            export_id,
            got["last"],
            n,
            int(got["bytes"]),
            1 if n else 0,
            lease_s,
            finished,
        )
        if finished:
            await events.record(
                conn,
                "export.completed",
                {
                    "export_id": export_id,
                    "campaign_id": job["campaign_id"],
                    "rows": int(job["rows"]) + n,
                    "download": f"/v1/exports/{export_id}/download",
                },
                campaign_id=job["campaign_id"],
                resource_id=export_id,
            )
            return "done"
    return "more"


async def fail(db: Db, export_id: str, runner: str, error: str) -> None:
    await db.execute(
        "UPDATE exports SET state = 'failed', error = $3, finished_at = now(), runner = NULL"
        " WHERE id = $1 AND runner = $2 AND state = 'running'",
        export_id,
        runner,
        error[:1000],
    )


async def chunks(db: Any, export_id: str, count: int) -> AsyncIterator[str]:
    """The export's CSV body, one stored chunk at a time (never more in memory)."""
    for seq in range(count):
        body = await db.fetchval(
            "SELECT body FROM export_chunks WHERE export_id = $1 AND seq = $2", export_id, seq
        )
        if body is None:
            return
        yield body


async def chunk_count(db: Db, export_id: str) -> int:
    return int(await db.fetchval("SELECT chunks FROM exports WHERE id = $1", export_id) or 0)
