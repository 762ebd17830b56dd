"""Issuance jobs: give a selection of customers a code each and queue their messages.

A job runs in the ``Issuer`` actor. It walks the selected customers in id order (keyset
pagination, ``VOUCHER_ISSUANCE_BATCH`` at a time), assigns codes through the shard actors
(``assign_many``: idempotent per campaign x customer, decided by the shard owning
``hash(campaign, customer)``, falling back to other shards' banks when that shard's part
runs dry), and records + queues one message per customer and consented channel
(``actors.delivery_queue.enqueue``; a message's id is its idempotency key, so a re-run adds
nothing). Codes come from the bank; when the bank runs low the job starts a generation
job ahead of need (a refill) and keeps issuing from what is left, and customers the bank
could not serve wait for the refill and are tried once more.

The issuer is a single writer: it claims its ownership epoch when it loads and checks it
in every write of its job rows (``store/fencing.py``); a replaced issuer stops answering
and exits.

Progress counters (``GET /v1/jobs/{id}``): ``total`` (selected at start), ``selected``
(read so far), ``assigned`` (customers holding a code: ``new_codes`` + earlier ones),
``exhausted`` (no code left and none could be made), ``skipped_no_consent`` /
``skipped_no_address`` (per customer x channel), ``unreachable`` (customers no requested
channel reaches: they get no code), ``messages`` (customer x channel with consent and
address), ``enqueued`` (queued for sending by this job: on the streams, or added by the
delivery workers once Redis is reachable), ``already_queued`` (queued by an earlier run), ``refills``, ``rate`` (customers/s) and ``eta_s``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import ray
from redis.asyncio import Redis

from actors.delivery_queue import enqueue
from actors.notifier import check_campaign, record
from actors.observability import configure_json_logging
from actors.startup import Startup
from engine import errors
from engine.customers import Customer, Selection, check_selection, route
from engine.delivery import new_message
from engine.notify import Notice
from engine.settings import Settings
from store import fencing
from store import issuance as issuance_store
from store.pools import open_pool

log = logging.getLogger("voucher.issuance")
JOB_PREFIX = "iss_"
COUNTERS = (
    "total",
    "selected",
    "assigned",
    "new_codes",
    "exhausted",
    "unreachable",
    "skipped_no_consent",
    "skipped_no_address",
    "messages",
    "enqueued",
    "already_queued",
    "refills",
)
def utcnow() -> datetime:
    return datetime.now(UTC)


def _exit_soon(exc: BaseException) -> None:
    # Let the refusal's answer leave first; Ray restarts the actor, which claims anew.
    asyncio.get_running_loop().call_later(0.05, os._exit, 1)


def job_view(job: dict[str, Any]) -> dict[str, Any]:
    """The job as ``GET /v1/jobs/{id}`` shows it (with its ETA)."""
    out = {k: v for k, v in job.items() if not k.startswith("_")}
    counts = dict(out.get("counts", {}))
    rate = out.get("rate") or 0.0
    left = max(0, counts.get("total", 0) - counts.get("selected", 0))
    out["eta_s"] = round(left / rate, 2) if rate and out["state"] == "running" else None
    return out


class IssuerCore:
    def __init__(
        self,
        engine: Any,
        dsn: str,
        redis_url: str,
        settings: Settings,
        *,
        on_fenced: Callable[[BaseException], None] = _exit_soon,
    ) -> None:
        self.engine = engine
        self.dsn = dsn
        self.redis_url = redis_url
        self.settings = settings
        self.jobs: dict[str, dict[str, Any]] = {}
        self.pool: asyncpg.Pool | None = None
        self.redis: Redis | None = None
        self._startup = Startup("the issuer", self._load, self._unload)
        self._tasks: set[asyncio.Task[None]] = set()
        self._refills: dict[str, str] = {}  # campaign -> running generation job id
        self.fence: fencing.Fence | None = None
        self._on_fenced = on_fenced
        self._fenced: BaseException | None = None

    async def ready(self) -> None:
        await self._startup()
        if self._fenced is not None:
            raise errors.Fenced(f"this issuer was replaced and stops: {self._fenced}")

    async def _unload(self) -> None:
        """Undo a failed load (the next call loads again from scratch)."""
        self.jobs.clear()
        self.fence = None
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None

    async def _load(self) -> None:
        self.pool = await open_pool(self.dsn, 4, writer=True)
        # A Redis that hangs must not hold a job: enqueue records the rows and moves on.
        self.redis = Redis.from_url(self.redis_url, socket_connect_timeout=5, socket_timeout=10)
        async with self.pool.acquire() as conn:
            # claimed (and committed) before anything else: an older issuer's job writes
            # are either done by now or refused
            owner = fencing.owner_name(self.settings.namespace, "issuer")
            self.fence = await fencing.claim(conn, owner)
        # A job marked running belonged to an issuer process that is gone. Re-running the
        # issuance finishes it (idempotent); say so instead of guessing.
        await self._write(issuance_store.fail_interrupted)

    async def _write(self, op: Callable[..., Awaitable[None]], *args: Any) -> None:
        """``op(pool, fence, *args)``, one fenced write; a refusal stops this issuer (every
        later call is refused)."""
        assert self.pool is not None and self.fence is not None
        try:
            await op(self.pool, self.fence, *args)
        except errors.Fenced as exc:
            self._die(exc)
            raise

    def _die(self, exc: BaseException) -> None:
        if self._fenced is not None:
            return
        self._fenced = exc
        log.error("issuer fenced, exiting: %s", exc)
        for task in list(self._tasks):
            task.cancel()
        self._on_fenced(exc)

    # --- starting ----------------------------------------------------------------------

    async def start(self, campaign_id: str, selection: Any, channels: Any) -> dict[str, Any]:
        """Validate everything, then run in the background; returns the job (202)."""
        await self.ready()
        assert self.pool is not None
        sel, chans = check_selection(selection, channels)
        campaign = await self.engine.campaign(campaign_id)  # UnknownCampaign: 404
        if campaign.state == "ended":
            raise errors.CannotIssueEnded(f"campaign {campaign_id} has ended")
        if campaign.is_promotion:
            raise errors.InvalidInput(f"campaign {campaign_id} is a promotion: it has no code to issue")
        if sel.customer_ids is not None:
            found = await issuance_store.known_customers(self.pool, list(sel.customer_ids))
            unknown = [c for c in sel.customer_ids if c not in found]
            if unknown:
                shown = ", ".join(repr(u) for u in unknown[:10])
                raise errors.InvalidInput(
                    f"selection.customer_ids names {len(unknown)} unknown customer(s): {shown}"
                    + (" ..." if len(unknown) > 10 else "")
                )
            total = len(found)
        else:
            total = await issuance_store.count_selected(self.pool, sel)
        job: dict[str, Any] = {
            "id": JOB_PREFIX + os.urandom(10).hex(),
            "kind": "issuance",
            "campaign_id": campaign_id,
            "selection": msgspec.to_builtins(sel),
            "channels": list(chans),
            "state": "running",
            "error": None,
            "counts": dict.fromkeys(COUNTERS, 0) | {"total": total},
            "rate": 0.0,
            "created_at": utcnow(),
            "finished_at": None,
        }
        await self._save(job)
        self.jobs[job["id"]] = job
        task = asyncio.ensure_future(self._run(job, sel, chans))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job_view(job)

    async def _save(self, job: dict[str, Any]) -> None:
        await self._write(issuance_store.save_job, job)

    async def job(self, job_id: str) -> dict[str, Any]:
        await self.ready()
        job = self.jobs.get(job_id)
        if job is not None:
            return job_view(job)
        assert self.pool is not None
        d = await issuance_store.load_job(self.pool, job_id)
        if d is None:
            raise errors.UnknownJob(f"no job has id {job_id!r}")
        d["kind"] = "issuance"
        d["rate"] = 0.0
        return job_view(d)

    # --- running -----------------------------------------------------------------------

    async def _run(self, job: dict[str, Any], sel: Selection, chans: tuple[str, ...]) -> None:
        assert self.pool is not None and self.redis is not None
        counts = job["counts"]
        cid = job["campaign_id"]
        started = time.perf_counter()
        after: str | None = None
        try:
            campaign = await self.engine.campaign(cid)
            while True:
                customers = await issuance_store.selected_page(
                    self.pool, sel, after, self.settings.issuance_batch
                )
                if not customers:
                    break
                after = customers[-1].id
                counts["selected"] += len(customers)
                # a customer no requested channel reaches gets no code (it would only
                # drain the bank); consent and address are counted per channel
                reachable: list[tuple[Customer, list[tuple[str, str]]]] = []
                for cust in customers:
                    targets, no_consent, no_address = route(cust, chans)
                    counts["skipped_no_consent"] += no_consent
                    counts["skipped_no_address"] += no_address
                    if targets:
                        reachable.append((cust, targets))
                    else:
                        counts["unreachable"] += 1
                await self._refill_if_low(job, campaign)
                codes = await self._assign(job, campaign, [c.id for c, _ in reachable])
                messages = []
                for cust, targets in reachable:
                    code = codes.get(cust.id)
                    if code is None:
                        continue
                    for channel, address in targets:
                        messages.append(
                            new_message(
                                cid,
                                cust.id,
                                channel,  # type: ignore[arg-type]
                                address,
                                code,
                                locale=cust.locale,
                                name=cust.name,
                                job_id=job["id"],
                            )
                        )
                counts["messages"] += len(messages)
                fresh = await self._not_yet_queued(messages)
                counts["already_queued"] += len(messages) - len(fresh)
                counts["enqueued"] += await enqueue(self.pool, self.redis, fresh)
                job["rate"] = counts["selected"] / max(1e-9, time.perf_counter() - started)
                await self._save(job)
            job["state"] = "done"
        except errors.Fenced:
            return  # a newer issuer owns the job's row now
        except Exception as exc:
            job["state"] = "failed"
            job["error"] = getattr(exc, "message", None) or repr(exc)
            log.exception("issuance job %s failed", job["id"], extra={"job_id": job["id"]})
        job["finished_at"] = utcnow()
        try:
            await self._save(job)
        except errors.Fenced:
            return
        await self._after(job)

    async def _not_yet_queued(self, messages: list[Any]) -> list[Any]:
        """The messages a re-run must still queue: those without a delivery record, and
        those recorded as queued by a job that did not finish (it may have died between
        recording and queueing; the sender drops a duplicate by its idempotency key).
        Messages of a finished job were queued, and sent/failed/dead ones are the
        delivery service's: a re-run never queues those again."""
        if not messages:
            return []
        assert self.pool is not None
        done = await issuance_store.handled_deliveries(self.pool, [m.id for m in messages])
        return [m for m in messages if m.id not in done]

    async def _assign(self, job: dict[str, Any], campaign: Any, ids: list[str]) -> dict[str, str]:
        """Codes of ``ids`` (new or earlier ones); customers the bank cannot serve wait for
        a running refill and are tried once more, then count as ``exhausted``."""
        counts = job["counts"]
        codes: dict[str, str] = {}
        todo = ids
        for attempt in range(2):
            outs = await self._assign_many(campaign.id, todo)
            dry: list[str] = []
            for cust, out in zip(todo, outs, strict=True):
                if out.assignment is not None:
                    codes[cust] = out.assignment.code
                    counts["assigned"] += 1
                    counts["new_codes"] += int(out.assignment.created)
                elif out.rejection is not None and out.rejection.error == "bank_exhausted":
                    dry.append(cust)
                elif out.rejection is not None:
                    raise errors.from_code(out.rejection.error, out.rejection.message)
            if not dry:
                break
            if attempt == 0 and await self._wait_refill(job, campaign, len(dry)):
                todo = dry
                continue
            counts["exhausted"] += len(dry)
            break
        return codes

    async def _assign_many(self, campaign_id: str, ids: list[str]) -> list[Any]:
        """``assign_many``, retried while a shard restarts (it is idempotent per campaign x
        customer, so a retry of a batch whose answer was lost returns the same codes)."""
        deadline = time.monotonic() + 60
        while True:
            try:
                return list(await self.engine.assign_many(campaign_id, ids))
            except errors.Unavailable:
                if time.monotonic() > deadline:
                    raise
                log.warning("a shard is unavailable; retrying the assignment batch")
                await asyncio.sleep(0.5)

    async def _refill_if_low(self, job: dict[str, Any], campaign: Any, need: int = 0) -> None:
        """Start a generation job ahead of need when the bank runs low."""
        if campaign.is_shared or campaign.id in self._refills:
            return
        try:
            stats = await self.engine.stats(campaign.id)
        except errors.Unavailable:
            log.warning("bank of %s not checked: a shard is unavailable", campaign.id)
            return  # checked again with the next batch
        counts = job["counts"]
        left = max(need, counts["total"] - counts["selected"] + self.settings.issuance_batch)
        if need == 0 and (
            stats.available >= self.settings.bank_low_threshold or stats.available >= left
        ):
            return  # not low, or enough for every customer still to come
        want = max(self.settings.refill_size, left - stats.available)
        total = campaign.limits.total
        if total is not None:
            want = min(want, total - (stats.available + stats.assigned + stats.redeemed + stats.void))
        if want <= 0:
            return
        try:
            # up_to: the coordinator cuts it to what limits.total allows once every other
            # running job's reservation is counted (this look at the bank is already old)
            gen = await self.engine.start_generation(campaign.id, want, up_to=True)
        except errors.VoucherError as exc:
            log.warning("bank refill of %s not started: %s", campaign.id, exc.message)
            return
        self._refills[campaign.id] = gen["id"]
        counts["refills"] += 1
        log.info("bank of %s low (%d available): refill of %d codes started", campaign.id, stats.available, want)

    async def _wait_refill(self, job: dict[str, Any], campaign: Any, need: int) -> bool:
        """Wait for the campaign's refill (starting one if none runs); False if none."""
        if campaign.id not in self._refills:
            await self._refill_if_low(job, campaign, need)
        gen_id = self._refills.get(campaign.id)
        if gen_id is None:
            return False
        try:
            while True:
                gen = await self.engine.job(gen_id)
                if gen["state"] != "running":
                    return bool(gen["state"] == "done")
                await asyncio.sleep(0.1)
        finally:
            self._refills.pop(campaign.id, None)

    async def _after(self, job: dict[str, Any]) -> None:
        """Notices: the job's end, and the bank/limit thresholds after it."""
        assert self.pool is not None
        c = job["counts"]
        try:
            if job["state"] == "done":
                await record(
                    self.pool,
                    Notice(
                        "job_finished",
                        job["campaign_id"],
                        f"issuance job {job['id']} finished: {c['assigned']} of {c['total']} "
                        f"customers hold a code ({c['new_codes']} new, {c['exhausted']} without: "
                        f"bank exhausted), {c['enqueued']} messages queued",
                    ),
                )
            else:
                await record(
                    self.pool,
                    Notice(
                        "job_failed",
                        job["campaign_id"],
                        f"issuance job {job['id']} failed after {c['selected']} customers: "
                        f"{job['error']}",
                    ),
                )
            campaign = await self.engine.campaign(job["campaign_id"])
            stats = await self.engine.stats(campaign.id)
            await check_campaign(self.pool, campaign, stats, self.settings)
        except Exception:
            log.exception("notices after issuance job %s failed", job["id"])


@ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=1000, num_cpus=0)
class Issuer:
    """Ray face of :class:`IssuerCore`."""

    def __init__(self, settings: bytes, dsn: str, redis_url: str) -> None:
        from actors.client import attach_engine

        decoded = msgspec.msgpack.decode(settings, type=Settings)
        configure_json_logging(decoded.log_level)
        self.core = IssuerCore(attach_engine(decoded), dsn, redis_url, decoded)

    async def ready(self) -> bool:
        await self.core.ready()
        return True

    async def start(self, campaign_id: str, selection: Any, channels: Any) -> Any:
        from actors.calls import Failure

        try:
            return await self.core.start(campaign_id, selection, channels)
        except errors.VoucherError as exc:
            return Failure(exc.code, exc.message)

    async def job(self, job_id: str) -> Any:
        from actors.calls import Failure

        try:
            return await self.core.job(job_id)
        except errors.VoucherError as exc:
            return Failure(exc.code, exc.message)


def issuer_handle(settings: Settings, dsn: str, redis_url: str) -> Any:
    """Create (or attach to) the named issuer actor."""
    return Issuer.options(  # type: ignore[attr-defined]
        name="issuer", namespace=settings.namespace, get_if_exists=True, lifetime="detached"
    ).remote(msgspec.msgpack.encode(settings), dsn, redis_url)


async def issue(
    handle: Any,
    campaign_id: str,
    selection: dict[str, Any],
    channels: list[str],
    progress: Any = None,
    poll_s: float = 0.25,
) -> dict[str, Any]:
    """Start an issuance and wait for its end (``progress(job)`` after every poll)."""
    from actors.calls import call

    job: dict[str, Any] = await call(handle.start.remote(campaign_id, selection, channels))
    while job["state"] == "running":
        await asyncio.sleep(poll_s)
        job = await call(handle.job.remote(job["id"]))
        if progress is not None:
            progress(job)
    return job
