"""Campaigns, their revisions and generation jobs in Postgres (the coordinator's tables).

Every write here is the coordinator's and checks its fence first, in the same transaction
(``fence=None`` only for tools and tests writing outside any engine).
"""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec

from engine import errors
from engine.audit import Actor
from engine.campaigns import Campaign
from engine.events import AVAILABLE
from engine.routing import bucket_of
from store import audit, events
from store.fencing import Fence, bump, fenced

_campaign_decoder = msgspec.json.Decoder(Campaign)
_campaign_encoder = msgspec.json.Encoder()

_INSERT_SHARED_CODE = (
    "INSERT INTO vouchers (code, campaign_id, bucket, status)"
    f" VALUES ($1, $2, $3, {AVAILABLE:d})"
)


class History(msgspec.Struct, frozen=True):
    """What a campaign change writes beside the campaign's row, in its transaction: the
    ``event`` (``campaign.created|updated|activated|paused|ended``) and the audit entry
    (``actor`` did ``action``; ``change`` as ``{field: [before, after]}``)."""

    event: str
    actor: Actor
    action: str
    change: dict[str, Any]


def event_id(c: Campaign) -> str:
    """A campaign change's event id: one per version, so a retried write is one event."""
    return f"evt_{c.id}_v{c.version}"


def event_data(c: Campaign) -> dict[str, Any]:
    """The campaign as the API shows it (``code_spec`` is ``code`` at the edge)."""
    data: dict[str, Any] = msgspec.json.decode(_campaign_encoder.encode(c))
    data["code"] = data.pop("code_spec", {})
    if data.get("type") == "promotion":
        data["shared_code"] = None  # its key on its shard is no code anyone can use
    return data


async def _record(conn: asyncpg.Connection, c: Campaign, history: History | None) -> None:
    if history is None:
        return
    data = event_data(c) | {"changed": sorted(history.change)}
    await events.record(
        conn, history.event, data, campaign_id=c.id, resource_id=c.id, event_id=event_id(c)
    )
    await audit.record(conn, history.actor, history.action, "campaign", c.id, history.change)


async def insert_campaign(
    conn: asyncpg.Connection, c: Campaign, *, fence: Fence | None, history: History | None = None
) -> None:
    """Insert ``c`` (and its shared code's row, and ``history``). Raises
    :class:`errors.DuplicateCampaign` when its id or shared code is taken."""
    try:
        await _insert_campaign(conn, c, fence, history)
    except asyncpg.UniqueViolationError as exc:
        what = "code" if "vouchers" in str(exc) else "id"
        raise errors.DuplicateCampaign(
            f"campaign {what} already in use: {c.shared_code if what == 'code' else c.id}"
        ) from exc


async def _insert_campaign(
    conn: asyncpg.Connection, c: Campaign, fence: Fence | None, history: History | None
) -> None:
    async with fenced(conn, fence):
        await conn.execute(
            "INSERT INTO campaigns (id, name, type, state, spec, created_at, updated_at,"
            " version) VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8)",
            c.id,
            c.name,
            c.type,
            c.state,
            _campaign_encoder.encode(c).decode(),
            c.created_at,
            c.updated_at,
            c.version,
        )
        if c.shared_code is not None:
            await conn.execute(_INSERT_SHARED_CODE, c.shared_code, c.id, bucket_of(c.shared_code))
        await _record(conn, c, history)


async def update_campaign(
    conn: asyncpg.Connection,
    c: Campaign,
    *,
    was: int,
    fence: Fence | None,
    history: History | None = None,
) -> None:
    """Store ``c`` over the row at version ``was`` (with ``history``); raises
    :class:`errors.Unavailable` when the row moved on (another writer: this one must
    reload rather than overwrite it), and then writes nothing."""
    async with fenced(conn, fence):
        status = await conn.execute(
            "UPDATE campaigns SET state = $2, spec = $3::jsonb, updated_at = $4, version = $5,"
            " name = $7 WHERE id = $1 AND version = $6",
            c.id,
            c.state,
            _campaign_encoder.encode(c).decode(),
            c.updated_at,
            c.version,
            was,
            c.name,
        )
        if status != "UPDATE 1":
            raise errors.Unavailable(
                f"campaign {c.id} changed in storage since version {was}; not overwritten"
            )
        await _record(conn, c, history)


async def load_campaigns(conn: asyncpg.Connection) -> list[Campaign]:
    rows = await conn.fetch("SELECT spec FROM campaigns ORDER BY created_at, id")
    return [_campaign_decoder.decode(r["spec"]) for r in rows]


async def campaigns_since(conn: asyncpg.Connection, revision: int) -> list[tuple[int, Campaign]]:
    """``(revision, campaign)`` of every campaign changed after ``revision``, in change
    order (``0010_campaign_versions.sql`` makes revisions visible in that order)."""
    rows = await conn.fetch(
        "SELECT revision, spec FROM campaigns WHERE revision > $1 ORDER BY revision", revision
    )
    return [(int(r["revision"]), _campaign_decoder.decode(r["spec"])) for r in rows]


async def promotions_since(db: Any, revision: int) -> list[tuple[int, Campaign]]:
    """``(revision, campaign)`` of every promotion changed after ``revision``."""
    rows = await db.fetch(
        "SELECT revision, spec FROM campaigns WHERE type = 'promotion' AND revision > $1"
        " ORDER BY revision",
        revision,
    )
    return [(int(r["revision"]), _campaign_decoder.decode(r["spec"])) for r in rows]


async def fence_owner(conn: asyncpg.Connection, owner: str, *, fence: Fence | None) -> int:
    """Bump ``owner``'s epoch (a shard that did not confirm a campaign change): its next
    commit is refused, so it exits and reloads. The update waits for the owner's in-flight
    commit, so when this returns that commit is either done or will be refused."""
    async with fenced(conn, fence):
        epoch = await bump(conn, owner)
    return epoch


async def upsert_job(
    conn: asyncpg.Connection, job: dict[str, Any], *, fence: Fence | None
) -> None:
    async with fenced(conn, fence):
        await conn.execute(
            "INSERT INTO generation_jobs (id, campaign_id, requested, generated, state,"
            " error, created_at, finished_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            " ON CONFLICT (id) DO UPDATE SET generated = EXCLUDED.generated,"
            " state = EXCLUDED.state, error = EXCLUDED.error,"
            " finished_at = EXCLUDED.finished_at",
            job["id"],
            job["campaign_id"],
            job["requested"],
            job["generated"],
            job["state"],
            job["error"],
            job["created_at"],
            job["finished_at"],
        )


async def load_jobs(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT id, campaign_id, requested, generated, state, error, created_at, finished_at"
        " FROM generation_jobs"
    )
    return [dict(r) for r in rows]
