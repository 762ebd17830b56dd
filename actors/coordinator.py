"""The coordinator actor: the single writer of campaigns and generation jobs.

It claims its ownership epoch when it loads and checks it in every write
(``store/fencing.py``); a replaced coordinator stops answering and exits.

Campaign definitions, lifecycle moves and edits are persisted here first (each change a new
version, written with its ``campaign.*`` event and its audit entry in one transaction),
then pushed to every shard's replica. A move or an edit answers only once every shard has
confirmed it; a shard that has not confirmed within ``campaign_confirm_timeout_s`` is
fenced (its owner epoch is bumped, so its next commit is refused and it exits, and its
restart reloads the campaign from Postgres) and the answer names it. Shards that missed a
change get it again in the background, and every shard also pulls changed campaigns from
Postgres by itself. When the coordinator starts it re-sends every campaign to every shard.

Generation jobs run here: codes are drawn in chunks with a CSPRNG, split by owning shard,
and each shard COPYs its part (deduplicating against every code it knows) before the codes
become redeemable. A job reserves its count against ``limits.total`` under the campaign's
lock (codes admitted plus what running jobs still may add never exceed it), and stops when
the campaign ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import msgspec
import ray

from actors.calls import call as _call
from actors.calls import guarded
from actors.observability import configure_json_logging
from actors.startup import Startup
from engine import codes, errors
from engine.audit import SYSTEM, Actor
from engine.campaigns import Campaign, Usage, edit, new_campaign, transition
from engine.events import ImportedCode
from engine.routing import assignment_key, new_id, shard_of
from engine.settings import Settings
from store import fencing, notifications
from store.campaigns import (
    History,
    fence_owner,
    insert_campaign,
    load_campaigns,
    load_jobs,
    update_campaign,
    upsert_job,
)
from store.pools import open_pool

log = logging.getLogger(__name__)
_enc = msgspec.msgpack.Encoder()
T = TypeVar("T")

# a lifecycle action's event type
_MOVED = {"activate": "campaign.activated", "pause": "campaign.paused", "end": "campaign.ended"}

# backoff of the background re-sends to a shard that missed campaign changes
_CATCH_UP_FIRST_S = 0.5
_CATCH_UP_MAX_S = 5.0


def utcnow() -> datetime:
    return datetime.now(UTC)


class TransitionResult(msgspec.Struct, frozen=True):
    """A lifecycle move's answer: the campaign, and which shards confirmed it and which
    were fenced (they exit, restart and reload it; the coordinator keeps re-sending it)."""

    campaign: Campaign
    confirmed: tuple[int, ...] = ()
    fenced: tuple[int, ...] = ()


def _exit_soon(exc: BaseException) -> None:
    # Let the refusal's answer leave first; Ray restarts the actor, which claims anew.
    asyncio.get_running_loop().call_later(0.05, os._exit, 1)


class CoordinatorCore:
    def __init__(
        self,
        shards: list[Any],
        dsn: str,
        settings: Settings,
        *,
        on_fenced: Callable[[BaseException], None] = _exit_soon,
    ) -> None:
        self.shards = shards
        self.dsn = dsn
        self.settings = settings
        self.campaigns: dict[str, Campaign] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.fence: fencing.Fence | None = None
        self._pool: asyncpg.Pool | None = None
        self._startup = Startup("the coordinator", self._load, self._unload)
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_fenced = on_fenced
        self._fenced: BaseException | None = None
        # campaigns each shard has not confirmed yet, and the task re-sending them
        self._unconfirmed: dict[int, set[str]] = {}
        self._catching_up: dict[int, asyncio.Task[None]] = {}
        # codes in the bank per campaign, as counted when no job of it was running and
        # advanced by every chunk since (the limit check needs it without a shard round)
        self._admitted: dict[str, int] = {}

    async def ready(self) -> None:
        await self._startup()
        self._alive()

    def _alive(self) -> None:
        if self._fenced is not None:
            raise errors.Fenced(f"this coordinator was replaced and stops: {self._fenced}")

    async def _load(self) -> None:
        self._pool = await open_pool(self.dsn, 4, writer=True)
        async with self._pool.acquire() as conn:
            # claimed (and committed) before anything is read: an older coordinator's
            # writes are either in what follows or refused
            owner = fencing.owner_name(self.settings.namespace, "coordinator")
            self.fence = await fencing.claim(conn, owner)
            for c in await load_campaigns(conn):
                self.campaigns[c.id] = c
            for job in await load_jobs(conn):
                if job["state"] == "running":
                    # The process that ran it is gone; say so rather than guess.
                    job["state"] = "failed"
                    job["error"] = "interrupted by a coordinator restart"
                    job["finished_at"] = utcnow()
                    await self._fenced_write(upsert_job(conn, job, fence=self.fence))
                self.jobs[job["id"]] = job
        # A previous coordinator may have died between persisting a change and pushing it:
        # every shard gets every campaign again (in the background: a down shard must not
        # keep this one from starting).
        for i in range(len(self.shards)):
            self._unconfirmed[i] = set(self.campaigns)
            self._catch_up(i)

    async def _unload(self) -> None:
        """Undo a failed load (the next call loads again from scratch)."""
        for task in list(self._catching_up.values()):
            task.cancel()
        self._catching_up.clear()
        self._unconfirmed.clear()
        self.campaigns.clear()
        self.jobs.clear()
        self.fence = None
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    async def close(self) -> None:
        """Stop the background work and close the pool (in-process use)."""
        for task in list(self._tasks) + list(self._catching_up.values()):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._catching_up.values(), return_exceptions=True)
        if self._pool is not None:
            await self._pool.close()

    # --- fenced writes -----------------------------------------------------------------

    async def _fenced_write(self, op: Awaitable[T]) -> T:
        try:
            return await op
        except errors.Fenced as exc:
            self._die(exc)
            raise

    async def _write(self, op: Callable[..., Awaitable[T]], *args: Any, **kw: Any) -> T:
        """``op(conn, *args, fence=..., **kw)`` on a pooled connection; a refusal by the
        fence stops this coordinator."""
        self._alive()
        assert self._pool is not None
        async with self._pool.acquire() as conn:
            return await self._fenced_write(op(conn, *args, fence=self.fence, **kw))

    def _die(self, exc: BaseException) -> None:
        if self._fenced is not None:
            return
        self._fenced = exc
        log.error("coordinator fenced, exiting: %s", exc)
        for task in list(self._tasks) + list(self._catching_up.values()):
            task.cancel()
        self._on_fenced(exc)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _lock(self, campaign_id: str) -> asyncio.Lock:
        return self._locks.setdefault(campaign_id, asyncio.Lock())

    # --- pushing campaigns to the shards -----------------------------------------------

    async def _push(self, i: int, c: Campaign) -> bool:
        """Whether shard ``i`` confirmed holding ``c`` (or newer) in time."""
        try:
            held = await asyncio.wait_for(
                _call(self.shards[i].put_campaign.remote(_enc.encode(c))),
                self.settings.campaign_confirm_timeout_s,
            )
        except (TimeoutError, errors.VoucherError) as exc:
            log.warning(
                "shard %d did not confirm campaign %s v%d: %r",
                i,
                c.id,
                c.version,
                exc,
                extra={"shard": i, "campaign_id": c.id},
            )
            return False
        return int(held) >= c.version

    async def _deliver(self, c: Campaign, *, fence_late: bool) -> TransitionResult:
        """Push ``c`` to every shard; with ``fence_late``, fence the ones that did not
        confirm before answering. Either way they get it again in the background."""
        oks = await asyncio.gather(*[self._push(i, c) for i in range(len(self.shards))])
        late = tuple(i for i, ok in enumerate(oks) if not ok)
        for i, ok in enumerate(oks):
            if ok:
                self._unconfirmed.get(i, set()).discard(c.id)
        if late and fence_late:
            ns = self.settings.namespace
            epochs = await asyncio.gather(
                *[self._write(fence_owner, fencing.shard_owner(ns, i)) for i in late]
            )
            for i, epoch in zip(late, epochs, strict=True):
                log.warning(
                    "shard %d fenced (epoch %d): it missed campaign %s v%d (%s)",
                    i,
                    epoch,
                    c.id,
                    c.version,
                    c.state,
                    extra={"shard": i, "campaign_id": c.id},
                )
        for i in late:
            self._unconfirmed.setdefault(i, set()).add(c.id)
            self._catch_up(i)
        confirmed = tuple(i for i, ok in enumerate(oks) if ok)
        return TransitionResult(c, confirmed, late if fence_late else ())

    def _catch_up(self, i: int) -> None:
        task = self._catching_up.get(i)
        if task is None or task.done():
            self._catching_up[i] = asyncio.ensure_future(self._resend(i))

    async def _resend(self, i: int) -> None:
        """Re-send shard ``i`` the current version of every campaign it has not confirmed,
        until it confirms them all (a restarted shard does, after its reload)."""
        delay = _CATCH_UP_FIRST_S
        while self._unconfirmed.get(i):
            pending = [self.campaigns[cid] for cid in sorted(self._unconfirmed[i])]
            try:
                await asyncio.wait_for(
                    _call(self.shards[i].put_campaigns.remote(_enc.encode(pending))),
                    max(self.settings.campaign_confirm_timeout_s, 10.0),
                )
            except (TimeoutError, errors.VoucherError) as exc:
                log.info("re-sending campaigns to shard %d: %r; retrying", i, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _CATCH_UP_MAX_S)
                continue
            for c in pending:
                # a newer change made meanwhile stays pending until it is confirmed too
                if self.campaigns[c.id] is c:
                    self._unconfirmed[i].discard(c.id)

    def get(self, campaign_id: str) -> Campaign:
        c = self.campaigns.get(campaign_id)
        if c is None:
            raise errors.UnknownCampaign(f"unknown campaign {campaign_id!r}")
        return c

    # --- campaigns ---------------------------------------------------------------------

    async def create_campaign(self, fields: dict[str, Any], actor: Actor = SYSTEM) -> Campaign:
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
            created = History(
                "campaign.created", actor, "campaign.create", {"campaign": [None, c.id]}
            )
            await self._write(insert_campaign, c, history=created)
            self.campaigns[c.id] = c
            # A draft sells nothing, so a shard that misses it is not fenced: it gets it
            # in the background or from its own re-sync.
            await self._deliver(c, fence_late=False)
        return c

    async def transition(
        self, campaign_id: str, action: str, actor: Actor = SYSTEM
    ) -> TransitionResult:
        """Persist a lifecycle move, then answer once every shard applied it or was
        fenced. A repeated move changes nothing and is pushed again all the same."""
        await self.ready()
        async with self._lock(campaign_id):
            current = self.get(campaign_id)
            c = transition(current, action, utcnow())
            if c is not current:
                moved = History(
                    _MOVED[action], actor, f"campaign.{action}", {"state": [current.state, c.state]}
                )
                await self._write(update_campaign, c, was=current.version, history=moved)
                self.campaigns[c.id] = c
            return await self._deliver(c, fence_late=True)

    async def edit_campaign(
        self,
        campaign_id: str,
        changes: dict[str, Any],
        if_version: int | None = None,
        actor: Actor = SYSTEM,
    ) -> TransitionResult:
        """Apply a shop's change (:func:`engine.campaigns.edit`) made against version
        ``if_version`` (any, when None), persist it, then answer like a lifecycle move:
        once every shard applied the new version or was fenced. Limits are checked against
        the usage counted under the campaign's lock, which generation jobs and imports
        also take to reserve their codes."""
        await self.ready()
        async with self._lock(campaign_id):
            current = self.get(campaign_id)
            if if_version is not None and if_version != current.version:
                raise errors.VersionMismatch(
                    f"campaign {campaign_id} is at version {current.version}, not {if_version}"
                )
            usage = await self._usage(current) if "limits" in changes else None
            c, diff = edit(current, changes, utcnow(), usage)
            if c is not current:
                edited = History("campaign.updated", actor, "campaign.update", diff)
                await self._write(update_campaign, c, was=current.version, history=edited)
                self.campaigns[c.id] = c
            return await self._deliver(c, fence_late=True)

    async def _usage(self, c: Campaign) -> Usage:
        """What the campaign used: codes in circulation (counted by the shards, or more
        while jobs and imports hold reservations) or a shared code's redemptions."""
        if not c.is_shared:
            counted = await self._count_codes(c.id)
            reserved = self._admitted.get(c.id, 0) + self._reserved(c.id)
            return Usage(codes=max(counted, reserved))
        used = await asyncio.gather(*[_call(s.limit_usage.remote(c.id)) for s in self.shards])
        return Usage(
            redemptions=sum(int(u[0]) for u in used),
            per_customer=max((int(u[1]) for u in used), default=0),
        )

    async def campaign(self, campaign_id: str) -> Campaign:
        await self.ready()
        return self.get(campaign_id)

    async def list_campaigns(self) -> list[Campaign]:
        await self.ready()
        return list(self.campaigns.values())

    # --- generation --------------------------------------------------------------------

    async def _count_codes(self, campaign_id: str) -> int:
        counts = await asyncio.gather(
            *[_call(s.codes_in_campaign.remote(campaign_id)) for s in self.shards]
        )
        return int(sum(counts))

    def _running(self, campaign_id: str) -> list[dict[str, Any]]:
        return [
            j
            for j in self.jobs.values()
            if j["campaign_id"] == campaign_id and j["state"] == "running"
        ]

    def _reserved(self, campaign_id: str, but: str | None = None) -> int:
        """Codes the running jobs of the campaign (but ``but``) may still add."""
        return sum(
            j["requested"] - j["generated"] for j in self._running(campaign_id) if j["id"] != but
        )

    async def start_generation(
        self, campaign_id: str, count: int, up_to: bool = False
    ) -> dict[str, Any]:
        """Check the request, reserve its count, then generate in the background; returns
        the job. ``up_to``: generate as many of ``count`` as ``limits.total`` still allows
        instead of refusing (a bank refill)."""
        await self.ready()
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise errors.InvalidInput("count must be a positive integer")
        if count > 50_000_000:
            raise errors.InvalidInput("count must be at most 50,000,000 per job")
        async with self._lock(campaign_id):
            # Check and reservation under the campaign's lock: a concurrent job, refill or
            # end sees this job's reservation, or this job sees theirs.
            c = self.get(campaign_id)
            if c.state == "ended":
                raise errors.CannotGenerateEnded(f"campaign {campaign_id} has ended")
            if c.is_shared:
                raise errors.InvalidInput(f"campaign {campaign_id} uses one shared code")
            if not self._running(campaign_id):
                self._admitted[campaign_id] = await self._count_codes(campaign_id)
            used = self._admitted[campaign_id] + self._reserved(campaign_id)
            total = c.limits.total
            if total is not None and used + count > total:
                room = max(0, total - used)
                if not up_to or room == 0:
                    raise errors.InvalidInput(
                        f"campaign {campaign_id} allows {total} codes; {used} exist or are "
                        f"being generated, so at most {room} more"
                    )
                count = room
            count = await self._fits(campaign_id, count, up_to)
            plan = codes.plan(c.code_spec, count, existing=used)
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
            await self._write(upsert_job, job)
            self.jobs[job["id"]] = job
        self._spawn(self._generate(job, c))
        return dict(job)

    async def _fits(self, campaign_id: str, count: int, up_to: bool) -> int:
        """``count``, or as much of it as the shards' memory still holds (``up_to``);
        refuses a generation that would not fit."""
        per_shard = self.settings.max_codes_per_shard
        capacity = per_shard * len(self.shards)
        held = sum(await asyncio.gather(*[_call(s.codes_held.remote()) for s in self.shards]))
        coming = sum(
            j["requested"] - j["generated"] for j in self.jobs.values() if j["state"] == "running"
        )
        room = max(0, capacity - held - coming)
        if count <= room:
            return count
        if up_to and room > 0:
            return room
        raise errors.CapacityExceeded(
            f"{count} more codes do not fit: the shards hold {held} codes and {coming} are"
            f" being generated, of {capacity} at most ({len(self.shards)} shards x"
            f" {per_shard}, about 100 bytes of shard memory per code), so at most {room}"
            " more; add shards (voucher-engine reshard) or raise VOUCHER_MAX_CODES_PER_SHARD"
        )

    async def _next_chunk(self, job: dict[str, Any]) -> tuple[Campaign, int]:
        """The campaign as it is now and the size of the job's next chunk, capped by what
        ``limits.total`` still allows; raises when the campaign ended."""
        cid = job["campaign_id"]
        async with self._lock(cid):
            c = self.get(cid)
            if c.state == "ended":
                raise errors.CannotGenerateEnded(f"campaign {cid} has ended")
            want = min(self.settings.generation_chunk, job["requested"] - job["generated"])
            if c.limits.total is not None:
                room = c.limits.total - self._admitted.get(cid, 0) - self._reserved(cid, job["id"])
                if room <= 0:
                    raise errors.InvalidInput(
                        f"campaign {cid} reached its limit of {c.limits.total} codes"
                    )
                want = min(want, room)
            return c, want

    async def _generate(self, job: dict[str, Any], c: Campaign) -> None:
        n_shards = len(self.shards)
        started = time.perf_counter()
        stalls = 0
        cid = job["campaign_id"]
        try:
            while job["generated"] < job["requested"]:
                c, want = await self._next_chunk(job)
                batch = codes.generate(c.code_spec, want, os.urandom)
                parts: list[list[str]] = [[] for _ in range(n_shards)]
                for code in batch:
                    parts[shard_of(code, n_shards)].append(code)
                added = await asyncio.gather(
                    *[
                        _call(self.shards[i].add_codes.remote(c.id, part))
                        for i, part in enumerate(parts)
                        if part
                    ],
                    return_exceptions=True,
                )
                got = sum(a for a in added if isinstance(a, int))
                # count what went in before raising what did not
                job["generated"] += got
                self._admitted[cid] = self._admitted.get(cid, 0) + got
                job["rate"] = job["generated"] / max(1e-9, time.perf_counter() - started)
                failed = [a for a in added if isinstance(a, BaseException)]
                if failed:
                    raise failed[0]
                stalls = stalls + 1 if got < want // 100 else 0
                if stalls >= 5:
                    raise errors.InfeasibleGeneration(
                        "the code space is too crowded: new codes keep colliding"
                    )
                await self._write(upsert_job, job)
            job["state"] = "done"
        except errors.Fenced:
            return  # a newer coordinator owns the job's row now
        except errors.CannotGenerateEnded as exc:
            job["state"] = "cancelled"
            job["error"] = exc.message
            log.info(
                "generation job %s cancelled: %s",
                job["id"],
                exc.message,
                extra={"job_id": job["id"], "campaign_id": cid},
            )
        except Exception as exc:
            job["state"] = "failed"
            job["error"] = getattr(exc, "message", None) or repr(exc)
            log.exception(
                "generation job %s failed",
                job["id"],
                extra={"job_id": job["id"], "campaign_id": cid},
            )
        job["finished_at"] = utcnow()
        try:
            await self._write(upsert_job, job)
            # admins hear about it (the notification dispatcher fans it out)
            await self._write(
                notifications.record,
                "job_finished" if job["state"] == "done" else "job_failed",
                cid,
                f"generation job {job['id']} {job['state']}: {job['generated']} of "
                f"{job['requested']} codes" + (f" ({job['error']})" if job["error"] else ""),
            )
        except errors.Fenced:
            pass
        except Exception:
            log.exception("recording the end of job %s failed", job["id"])

    async def import_codes(self, campaign_id: str, rows: list[ImportedCode]) -> dict[str, Any]:
        """Bring one chunk of a shop's own codes (distinct, well-formed) into the campaign:
        each code goes to its owner shard, which refuses a code that exists in any
        campaign. Within ``limits.total`` and the shards' memory, counted with the running
        generation jobs and other imports: rows beyond either are refused (a refused
        existing code frees its place for the next row). Customers given a code are
        recorded where their assignments are decided. Returns
        ``{"imported": n, "refused": {code: reason}}``."""
        await self.ready()
        refused: dict[str, str] = {}
        imported: list[ImportedCode] = []
        left = list(rows)
        while left:
            async with self._lock(campaign_id):
                take, why = await self._import_room(campaign_id, len(left))
                # counted before the shards answer, so a concurrent import or job sees them
                self._admitted[campaign_id] += take
            if not take:
                refused.update((r.code, why) for r in left)
                break
            batch, left = left[:take], left[take:]
            taken = await self._import_to_shards(campaign_id, batch)
            for code in taken:
                refused[code] = "exists: a code of that name is in this or another campaign"
            imported += [r for r in batch if r.code not in taken]
        by_shard: dict[int, list[tuple[str, str]]] = {}
        for r in imported:
            if r.customer_id is not None:
                shard = shard_of(assignment_key(campaign_id, r.customer_id), len(self.shards))
                by_shard.setdefault(shard, []).append((r.customer_id, r.code))
        await asyncio.gather(
            *[_call(self.shards[i].record_assignments.remote(campaign_id, p)) for i, p in by_shard.items()]
        )
        return {"imported": len(imported), "refused": refused}

    async def _import_room(self, campaign_id: str, want: int) -> tuple[int, str]:
        """How many of ``want`` imported codes fit now, and the reason for the rest."""
        c = self.get(campaign_id)
        if c.state == "ended":
            raise errors.CannotGenerateEnded(f"campaign {campaign_id} has ended")
        if c.is_shared:
            raise errors.InvalidInput(f"campaign {campaign_id} uses one shared code")
        if campaign_id not in self._admitted or not self._running(campaign_id):
            self._admitted[campaign_id] = await self._count_codes(campaign_id)
        total = c.limits.total
        if total is not None:
            room = total - self._admitted[campaign_id] - self._reserved(campaign_id)
            if room <= 0:
                return 0, f"over limits.total: the campaign allows {total} codes"
            want = min(want, room)
        try:
            return await self._fits(campaign_id, want, up_to=True), ""
        except errors.CapacityExceeded:
            return 0, "capacity_exceeded: the shards' memory holds no more codes"

    async def _import_to_shards(self, campaign_id: str, rows: list[ImportedCode]) -> set[str]:
        """Each row to its owner shard; the codes refused as existing."""
        parts: dict[int, list[ImportedCode]] = {}
        for r in rows:
            parts.setdefault(shard_of(r.code, len(self.shards)), []).append(r)
        answers = await asyncio.gather(
            *[_call(self.shards[i].import_codes.remote(campaign_id, p)) for i, p in parts.items()],
            return_exceptions=True,
        )
        taken = {code for a in answers if not isinstance(a, BaseException) for code in a}
        lost = sum(len(p) for p, a in zip(parts.values(), answers, strict=True) if isinstance(a, BaseException))
        async with self._lock(campaign_id):
            self._admitted[campaign_id] -= len(taken) + lost
        for a in answers:
            if isinstance(a, BaseException):
                raise a
        return taken

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
    async def create_campaign(self, fields: dict[str, Any], actor: Actor = SYSTEM) -> Campaign:
        return await self.core.create_campaign(fields, actor)

    @guarded
    async def transition(
        self, campaign_id: str, action: str, actor: Actor = SYSTEM
    ) -> TransitionResult:
        return await self.core.transition(campaign_id, action, actor)

    @guarded
    async def edit_campaign(
        self,
        campaign_id: str,
        changes: dict[str, Any],
        if_version: int | None = None,
        actor: Actor = SYSTEM,
    ) -> TransitionResult:
        return await self.core.edit_campaign(campaign_id, changes, if_version, actor)

    @guarded
    async def campaign(self, campaign_id: str) -> Campaign:
        return await self.core.campaign(campaign_id)

    @guarded
    async def list_campaigns(self) -> list[Campaign]:
        return await self.core.list_campaigns()

    @guarded
    async def start_generation(
        self, campaign_id: str, count: int, up_to: bool = False
    ) -> dict[str, Any]:
        return await self.core.start_generation(campaign_id, count, up_to)

    @guarded
    async def job(self, job_id: str) -> dict[str, Any]:
        return await self.core.job(job_id)

    @guarded
    async def import_codes(self, campaign_id: str, rows: list[ImportedCode]) -> dict[str, Any]:
        return await self.core.import_codes(campaign_id, rows)

    async def shard_count(self) -> int:
        """The number of shards this coordinator drives (the deployment's topology)."""
        return len(self.core.shards)
