"""Generation against ``limits.total``: concurrent jobs and an issuance refill together
never put more codes in the bank than the limit (counted in Postgres), and a job stops
when its campaign ends."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest

from actors.calls import call
from actors.coordinator import CoordinatorCore
from actors.issuance import IssuerCore
from engine import errors
from engine.campaigns import Campaign, Discount, Limits
from engine.settings import Settings
from engine.shard_state import CampaignStats
from tests.actor_fakes import RemoteMethod
from tests.engine_support import discount_campaign, fetchval, uid

pytestmark = pytest.mark.integration


async def _campaign(engine: Any, total: int | None = None) -> str:
    return await discount_campaign(engine, 0, limits={"total": total} if total is not None else None)


async def _finished(engine: Any, job_id: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job: dict[str, Any] = await engine.job(job_id)
        if job["state"] != "running":
            return job
        assert time.monotonic() < deadline, f"job {job_id} still running"
        await asyncio.sleep(0.1)


class BankShard:
    """One shard handle for an in-process coordinator, its bank kept as rows in Postgres.
    Its code count can answer late (taken at once, answered ``count_delay`` later, as a
    busy shard's does), and its second ``add_codes`` can be held at ``gate``."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.held: dict[str, Campaign] = {}
        self.count_delay = 0.0
        self.gate: asyncio.Event | None = None
        self.at_gate = asyncio.Event()
        self.adds = 0
        self.put_campaign = RemoteMethod(self._put)
        self.put_campaigns = RemoteMethod(self._put_many)
        self.codes_in_campaign = RemoteMethod(self._count)
        self.codes_held = RemoteMethod(self._held)
        self.add_codes = RemoteMethod(self._add)

    async def _put(self, payload: bytes) -> int:
        c = msgspec.msgpack.decode(payload, type=Campaign)
        old = self.held.get(c.id)
        if old is None or c.version > old.version:
            self.held[c.id] = c
        return self.held[c.id].version

    async def _put_many(self, payload: bytes) -> int:
        for c in msgspec.msgpack.decode(payload, type=list[Campaign]):
            await self._put(msgspec.msgpack.encode(c))
        return 0

    async def _count(self, campaign_id: str) -> int:
        n = int(await fetchval(
            self.dsn, "SELECT count(*) FROM vouchers WHERE campaign_id = $1", campaign_id
        ))
        await asyncio.sleep(self.count_delay)
        return n

    async def _held(self) -> int:
        return int(await fetchval(
            self.dsn, "SELECT count(*) FROM vouchers WHERE campaign_id = ANY($1)", list(self.held)
        ))

    async def _add(self, campaign_id: str, codes: list[str]) -> int:
        self.adds += 1
        if self.adds == 2 and self.gate is not None:
            self.at_gate.set()
            await self.gate.wait()
        if self.held[campaign_id].state == "ended":
            raise errors.CannotGenerateEnded(f"campaign {campaign_id} has ended")
        status = await fetchval(
            self.dsn,
            "WITH i AS (INSERT INTO vouchers (code, campaign_id, bucket)"
            " SELECT c, $2, 0 FROM unnest($1::text[]) c ON CONFLICT DO NOTHING RETURNING 1)"
            " SELECT count(*) FROM i",
            codes,
            campaign_id,
        )
        return int(status)


class _Engine:
    """What the issuer's refill asks of the engine, answered by an in-process coordinator."""

    def __init__(self, core: CoordinatorCore, dsn: str) -> None:
        self.core = core
        self.dsn = dsn

    async def stats(self, campaign_id: str) -> CampaignStats:
        n = await fetchval(self.dsn, "SELECT count(*) FROM vouchers WHERE campaign_id = $1", campaign_id)
        return CampaignStats(campaign_id, available=int(n))

    async def start_generation(self, campaign_id: str, count: int, **kw: Any) -> dict[str, Any]:
        return await self.core.start_generation(campaign_id, count, **kw)


async def _wait(core: CoordinatorCore, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while (job := await core.job(job_id))["state"] == "running":
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.02)
    return job


async def test_jobs_and_a_refill_never_exceed_the_total(services: Any) -> None:
    dsn = services.database_url
    settings = Settings(shards=1, namespace=uid("gen-ns"), generation_chunk=50)
    bank = BankShard(dsn)
    core = CoordinatorCore([bank], dsn, settings)
    issuer = IssuerCore(_Engine(core, dsn), dsn, services.redis_url, settings)
    try:
        fields = {"name": "limit", "type": "discount", "currency": "EUR",
                  "discount": Discount("percent", 5), "limits": Limits(total=100)}
        cid = uid("limit")
        await core.create_campaign({**fields, "id": cid})
        await core.transition(cid, "activate")

        # Job A takes the whole limit; while its second chunk is in flight, job B asks
        # for 50 and its code count answers only after A has finished.
        bank.gate = asyncio.Event()
        a = await core.start_generation(cid, 100)
        await asyncio.wait_for(bank.at_gate.wait(), 10)
        bank.count_delay = 0.3
        b = asyncio.ensure_future(core.start_generation(cid, 50))
        await asyncio.sleep(0.05)
        bank.gate.set()
        assert (await _wait(core, a["id"]))["state"] == "done"
        with pytest.raises(errors.InvalidInput):
            job_b = await b
            await _wait(core, job_b["id"])
        bank.count_delay = 0.0
        # the issuer's refill finds the bank full
        issuance = {"id": "iss_x", "counts": {"total": 1000, "selected": 0, "refills": 0}}
        await issuer._refill_if_low(issuance, await core.campaign(cid), need=100)
        assert cid not in issuer._refills
        assert await fetchval(dsn, "SELECT count(*) FROM vouchers WHERE campaign_id = $1", cid) == 100

        # A job and a refill started together share what the limit allows.
        cid2 = uid("limit")
        await core.create_campaign({**fields, "id": cid2})
        await core.transition(cid2, "activate")
        campaign = await core.campaign(cid2)
        started = await asyncio.gather(
            core.start_generation(cid2, 60),
            issuer._refill_if_low(issuance, campaign, need=100),
            return_exceptions=True,
        )
        ids = [started[0]["id"]] if isinstance(started[0], dict) else []
        ids += [issuer._refills[cid2]] if cid2 in issuer._refills else []
        assert ids, started
        jobs = [await _wait(core, i) for i in ids]
        assert sum(j["requested"] for j in jobs) <= 100, jobs
        assert await fetchval(dsn, "SELECT count(*) FROM vouchers WHERE campaign_id = $1", cid2) <= 100
    finally:
        await core.close()


async def test_generation_beyond_the_shards_memory_is_refused(services: Any) -> None:
    dsn = services.database_url
    fields = {"name": "capacity", "type": "discount", "currency": "EUR",
              "discount": Discount("percent", 5)}
    cid = uid("cap")
    # the shard's bank holds the codes of every campaign other tests left in this database
    # too: its capacity is set to those plus 1,000
    probe_bank = BankShard(dsn)
    probe = CoordinatorCore([probe_bank], dsn, Settings(shards=1, namespace=uid("gen-ns")))
    try:
        await probe.create_campaign({**fields, "id": cid})
        base = await probe_bank._held()
    finally:
        await probe.close()
    settings = Settings(
        shards=1, namespace=uid("gen-ns"), generation_chunk=500, max_codes_per_shard=base + 1000
    )
    bank = BankShard(dsn)
    core = CoordinatorCore([bank], dsn, settings)
    try:
        await core.ready()
        assert await bank._held() == base
        room = 1000
        with pytest.raises(errors.CapacityExceeded, match=f"at most {room} more"):
            await core.start_generation(cid, room + 1)
        running = await core.start_generation(cid, 500)
        # what is being generated counts as well as what is held
        with pytest.raises(errors.CapacityExceeded, match="500 are being generated"):
            await core.start_generation(cid, room - 499)
        assert (await _wait(core, running["id"]))["state"] == "done"
        with pytest.raises(errors.CapacityExceeded, match=f"hold {base + 500} codes"):
            await core.start_generation(cid, room)
        # a refill takes what still fits
        refill = await core.start_generation(cid, room, up_to=True)
        assert refill["requested"] == room - 500
        assert (await _wait(core, refill["id"]))["state"] == "done"
        assert await bank._held() == base + 1000
    finally:
        await core.close()


async def test_a_job_stops_when_its_campaign_ends(
    engine: Any, services: Any, engine_settings: Any
) -> None:
    db = services.database_url
    cid = await _campaign(engine)
    requested = 400_000
    job = await engine.start_generation(cid, requested)
    deadline = time.monotonic() + 60
    while (await engine.job(job["id"]))["generated"] == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await engine.end(cid)
    ended_rows = await fetchval(db, "SELECT count(*) FROM vouchers WHERE campaign_id = $1", cid)
    job = await _finished(engine, job["id"], timeout_s=30)
    assert job["state"] == "cancelled" and "ended" in job["error"], job
    assert job["generated"] < requested, "the job finished before the end: nothing proven"
    await engine.flush()
    rows = await fetchval(db, "SELECT count(*) FROM vouchers WHERE campaign_id = $1", cid)
    # at most the chunk in flight when the end arrived went in after it, and void
    assert rows - ended_rows <= engine_settings.generation_chunk
    assert rows == job["generated"]
    sellable = await fetchval(
        db, "SELECT count(*) FROM vouchers WHERE campaign_id = $1 AND status IN (0, 1)", cid
    )
    assert sellable == 0
    # a shard takes no code for an ended campaign, and no new job starts
    with pytest.raises(errors.CannotGenerateEnded):
        await call(engine.shards[0].add_codes.remote(cid, ["LATECODE123"]))
    with pytest.raises(errors.CannotGenerateEnded):
        await engine.start_generation(cid, 10)

