"""The coordinator actor: the single writer of campaigns and generation jobs.

Campaign definitions and lifecycle moves are persisted here first, then pushed to every
shard's replica; a shard that misses a push reloads campaigns from Postgres when it
restarts. Generation jobs run here: codes are drawn in chunks with a CSPRNG, split by
owning shard, and each shard COPYs its part (deduplicating against every code it knows)
before the codes become redeemable.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import ray

from actors.calls import guarded
from actors.observability import configure_json_logging
from actors.persistence import (
    create_pool,
    insert_campaign,
    load_campaigns,
    load_jobs,
    update_campaign,
    upsert_job,
)
from engine import codes, errors
from engine.campaigns import Campaign, new_campaign, transition
from engine.routing import new_id, shard_of
from engine.settings import Settings

log = logging.getLogger(__name__)
_enc = msgspec.msgpack.Encoder()


def utcnow() -> datetime:
    return datetime.now(UTC)


class CoordinatorCore:
    def __init__(self, shards: list[Any], dsn: str, settings: Settings) -> None:
        self.shards = shards
        self.dsn = dsn
        self.settings = settings
        self.campaigns: dict[str, Campaign] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self._pool: asyncpg.Pool | None = None
        self._ready: asyncio.Future[None] | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def ready(self) -> None:
        if self._ready is None:
            self._ready = asyncio.ensure_future(self._load())
        await asyncio.shield(self._ready)

    async def _load(self) -> None:
        self._pool = await create_pool(self.dsn, size=4)
        async with self._pool.acquire() as conn:
            for c in await load_campaigns(conn):
                self.campaigns[c.id] = c
            for job in await load_jobs(conn):
                if job["state"] == "running":
                    # The process that ran it is gone; say so rather than guess.
                    job["state"] = "failed"
                    job["error"] = "interrupted by a coordinator restart"
                    job["finished_at"] = utcnow()
                    await upsert_job(conn, job)
                self.jobs[job["id"]] = job

    def _lock(self, campaign_id: str) -> asyncio.Lock:
        return self._locks.setdefault(campaign_id, asyncio.Lock())

    async def _broadcast(self, c: Campaign) -> None:
        payload = _enc.encode(c)
        await asyncio.gather(*[s.put_campaign.remote(payload) for s in self.shards])

    def get(self, campaign_id: str) -> Campaign:
        c = self.campaigns.get(campaign_id)
        if c is None:
            raise errors.UnknownCampaign(f"unknown campaign {campaign_id!r}")
        return c

    # --- campaigns ---------------------------------------------------------------------

    async def create_campaign(self, fields: dict[str, Any]) -> Campaign:
        await self.ready()
        if "id" not in fields or fields["id"] is None:
            fields = {**fields, "id": new_id("cmp", 0, os.urandom)[4:]}
        if "timezone" in fields:
            fields = {**fields}
            fields["timezone_name"] = fields.pop("timezone")
        try:
            c = new_campaign(now=utcnow(), **fields)
        except TypeError as exc:
            raise errors.InvalidInput(f"bad campaign fields: {exc}") from exc
        async with self._lock(c.id):
            if c.id in self.campaigns:
                raise errors.DuplicateCampaign(f"campaign {c.id} exists already")
            assert self._pool is not None
            async with self._pool.acquire() as conn:
                try:
                    await insert_campaign(conn, c)
                except asyncpg.UniqueViolationError as exc:
                    what = "code" if "vouchers" in str(exc) else "id"
                    raise errors.DuplicateCampaign(
                        f"campaign {what} already in use: {c.shared_code if what == 'code' else c.id}"
                    ) from exc
            self.campaigns[c.id] = c
            await self._broadcast(c)
        return c

    async def transition(self, campaign_id: str, action: str) -> Campaign:
        await self.ready()
        async with self._lock(campaign_id):
            c = transition(self.get(campaign_id), action, utcnow())
            assert self._pool is not None
            async with self._pool.acquire() as conn:
                await update_campaign(conn, c)
            self.campaigns[c.id] = c
            await self._broadcast(c)
        return c

    async def campaign(self, campaign_id: str) -> Campaign:
        await self.ready()
        return self.get(campaign_id)

    async def list_campaigns(self) -> list[Campaign]:
        await self.ready()
        return list(self.campaigns.values())

    # --- generation --------------------------------------------------------------------

    async def _count_codes(self, campaign_id: str) -> int:
        counts = await asyncio.gather(
            *[s.codes_in_campaign.remote(campaign_id) for s in self.shards]
        )
        return int(sum(counts))

    async def start_generation(self, campaign_id: str, count: int) -> dict[str, Any]:
        """Check the request, then generate in the background; returns the job."""
        await self.ready()
        c = self.get(campaign_id)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise errors.InvalidInput("count must be a positive integer")
        if count > 50_000_000:
            raise errors.InvalidInput("count must be at most 50,000,000 per job")
        if c.state == "ended":
            raise errors.CannotGenerateEnded(f"campaign {campaign_id} has ended")
        if c.is_shared:
            raise errors.InvalidInput(f"campaign {campaign_id} uses one shared code")
        existing = await self._count_codes(campaign_id)
        pending = sum(
            j["requested"] - j["generated"]
            for j in self.jobs.values()
            if j["campaign_id"] == campaign_id and j["state"] == "running"
        )
        total = c.limits.total
        if total is not None and existing + pending + count > total:
            raise errors.InvalidInput(
                f"campaign {campaign_id} allows {total} codes; {existing + pending} exist or "
                f"are being generated, so at most {max(0, total - existing - pending)} more"
            )
        plan = codes.plan(c.code_spec, count, existing=existing + pending)
        job = {
            "id": new_id("job", 0, os.urandom)[4:],
            "campaign_id": campaign_id,
            "requested": count,
            "generated": 0,
            "state": "running",
            "error": None,
            "created_at": utcnow(),
            "finished_at": None,
            "plan": msgspec.to_builtins(plan),
            "rate": 0.0,
        }
        self.jobs[job["id"]] = job
        assert self._pool is not None
        async with self._pool.acquire() as conn:
            await upsert_job(conn, job)
        task = asyncio.ensure_future(self._generate(job, c))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return dict(job)

    async def _generate(self, job: dict[str, Any], c: Campaign) -> None:
        n_shards = len(self.shards)
        chunk = self.settings.generation_chunk
        started = time.perf_counter()
        stalls = 0
        assert self._pool is not None
        try:
            while job["generated"] < job["requested"]:
                want = min(chunk, job["requested"] - job["generated"])
                batch = codes.generate(c.code_spec, want, os.urandom)
                parts: list[list[str]] = [[] for _ in range(n_shards)]
                for code in batch:
                    parts[shard_of(code, n_shards)].append(code)
                added = await asyncio.gather(
                    *[
                        self.shards[i].add_codes.remote(c.id, part)
                        for i, part in enumerate(parts)
                        if part
                    ]
                )
                got = int(sum(added))
                job["generated"] += got
                job["rate"] = job["generated"] / max(1e-9, time.perf_counter() - started)
                stalls = stalls + 1 if got < want // 100 else 0
                if stalls >= 5:
                    raise errors.InfeasibleGeneration(
                        "the code space is too crowded: new codes keep colliding"
                    )
                async with self._pool.acquire() as conn:
                    await upsert_job(conn, job)
            job["state"] = "done"
        except Exception as exc:
            job["state"] = "failed"
            job["error"] = getattr(exc, "message", None) or repr(exc)
            log.exception(
                "generation job %s failed",
                job["id"],
                extra={"job_id": job["id"], "campaign_id": job["campaign_id"]},
            )
        job["finished_at"] = utcnow()
        async with self._pool.acquire() as conn:
            await upsert_job(conn, job)
            # admins hear about it (the notification dispatcher fans it out)
            try:
                await conn.execute(
                    "INSERT INTO notifications (kind, campaign_id, message) VALUES ($1, $2, $3)",
                    "job_finished" if job["state"] == "done" else "job_failed",
                    job["campaign_id"],
                    f"generation job {job['id']} {job['state']}: {job['generated']} of "
                    f"{job['requested']} codes" + (f" ({job['error']})" if job["error"] else ""),
                )
            except Exception:
                log.exception("recording the notification of job %s failed", job["id"])

    async def job(self, job_id: str) -> dict[str, Any]:
        await self.ready()
        job = self.jobs.get(job_id)
        if job is None:
            raise errors.UnknownJob(f"no job has id {job_id!r}")
        return dict(job)


@ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=1000, num_cpus=0)
class Coordinator:
    """Ray face of :class:`CoordinatorCore`."""

    def __init__(self, shard_names: list[str], namespace: str, dsn: str, settings: bytes) -> None:
        decoded = msgspec.msgpack.decode(settings, type=Settings)
        configure_json_logging(decoded.log_level)
        shards = [ray.get_actor(n, namespace=namespace) for n in shard_names]
        self.core = CoordinatorCore(shards, dsn, decoded)

    async def ready(self) -> bool:
        await self.core.ready()
        return True

    @guarded
    async def create_campaign(self, fields: dict[str, Any]) -> Campaign:
        return await self.core.create_campaign(fields)

    @guarded
    async def transition(self, campaign_id: str, action: str) -> Campaign:
        return await self.core.transition(campaign_id, action)

    @guarded
    async def campaign(self, campaign_id: str) -> Campaign:
        return await self.core.campaign(campaign_id)

    @guarded
    async def list_campaigns(self) -> list[Campaign]:
        return await self.core.list_campaigns()

    @guarded
    async def start_generation(self, campaign_id: str, count: int) -> dict[str, Any]:
        return await self.core.start_generation(campaign_id, count)

    @guarded
    async def job(self, job_id: str) -> dict[str, Any]:
        return await self.core.job(job_id)

    async def shard_count(self) -> int:
        """The number of shards this coordinator drives (the deployment's topology)."""
        return len(self.core.shards)
