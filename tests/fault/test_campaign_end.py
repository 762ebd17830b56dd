"""Ending a campaign under load: once the end call has returned, no redemption of the
campaign succeeds anywhere -- not on a shard that was down during the end and came back,
not on a shard that never heard of it (the coordinator fences it). A repeated end answers
with the ended campaign. A replaced coordinator stops writing."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import pytest
import ray

from actors.coordinator import CoordinatorCore
from engine import errors
from engine.campaigns import Campaign, Discount
from engine.routing import shard_of
from engine.settings import Settings
from engine.shard_state import Outcome, RedeemRequest
from store import fencing
from tests.actor_fakes import RemoteMethod
from tests.engine_support import (
    campaign_codes,
    discount_campaign,
    fetch,
    fetchval,
    shared_code_campaign,
    uid,
)

pytestmark = pytest.mark.fault

CLIENTS = 32


@dataclass
class Attempt:
    campaign_id: str
    sent: float  # time.monotonic()
    answered: float
    outcome: Outcome | None  # None: the shard was unavailable


async def _load(
    engine: Any, unique: tuple[str, list[str]], shared: tuple[str, str], stop: asyncio.Event,
    log: list[Attempt],
) -> list[Attempt]:
    """``CLIENTS`` clients, one request at a time each, alternating a unique code (round
    after round: a code already redeemed is refused) and the shared code (a new customer
    every time)."""
    codes = itertools.cycle(unique[1])

    async def client(k: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            code = next(codes, None) if i % 2 else None
            if code is not None:
                cid, req = unique[0], RedeemRequest(code=code, amount=1000, currency="EUR")
            else:
                cid = shared[0]
                req = RedeemRequest(
                    code=shared[1], amount=1000, currency="EUR", customer_id=f"c{k}-{i}"
                )
            sent = time.monotonic()
            try:
                out: Outcome | None = (await engine.redeem_many([req]))[0]
            except errors.Unavailable:
                out = None
            log.append(Attempt(cid, sent, time.monotonic(), out))
            if out is None:
                await asyncio.sleep(0.02)

    await asyncio.gather(*[client(k) for k in range(CLIENTS)])
    return log


async def test_no_redemption_succeeds_after_the_end_returns(engine: Any, services: Any) -> None:
    db = services.database_url
    cid = await discount_campaign(engine, 6000)
    codes = await campaign_codes(db, cid)
    code = uid("ENDS").upper()
    scid = await shared_code_campaign(
        engine, code, id_prefix="endshared", name="shared, ended under load",
        discount={"kind": "percent", "value": 10},
    )
    # the shard owning the shared code is down while both campaigns end
    victim = shard_of(code, engine.n)
    victim_codes = [c for c in codes if shard_of(c, engine.n) == victim]
    others = [c for c in codes if shard_of(c, engine.n) != victim]
    # codes of the victim kept aside, to try once it is back
    spare = victim_codes[-20:]
    stop = asyncio.Event()
    log: list[Attempt] = []
    load = asyncio.ensure_future(
        _load(engine, (cid, victim_codes[:-20] + others), (scid, code), stop, log)
    )
    await asyncio.sleep(1.5)
    assert not load.done()

    async def end(campaign_id: str) -> tuple[Any, float, datetime]:
        result = await engine.transition_result(campaign_id, "end")
        return result, time.monotonic(), datetime.now(UTC)

    killed_at = datetime.now(UTC)
    ray.kill(engine.shards[victim], no_restart=False)
    ends = dict(zip((cid, scid), await asyncio.gather(end(cid), end(scid)), strict=True))
    await engine.wait_ready(timeout_s=120)

    def answered_after_end(campaign_id: str) -> bool:
        return any(
            a.campaign_id == campaign_id and a.sent > ends[campaign_id][1] and a.outcome is not None
            for a in log
        )

    # the load goes on against every shard, the victim back too, until both campaigns had
    # answers to requests sent after their end returned (at most 30 s on a busy machine)
    await asyncio.sleep(1.0)
    deadline = time.monotonic() + 30
    while not all(map(answered_after_end, ends)) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    stop.set()
    await load

    for campaign_id, (result, returned, returned_wall) in ends.items():
        assert result.campaign.state == "ended"
        assert set(result.confirmed) | set(result.fenced) == set(range(engine.n))
        mine = [a for a in log if a.campaign_id == campaign_id]
        wins = [a for a in mine if a.outcome is not None and a.outcome.redemption is not None]
        late = [a for a in wins if a.answered > returned]
        assert wins, "nothing was redeemed before the end: the test would prove nothing"
        assert late == [], f"{len(late)} redemption(s) of {campaign_id} succeeded after the end"
        refused = [
            a
            for a in mine
            if a.sent > returned
            and a.outcome is not None
            and a.outcome.rejection is not None
            and a.outcome.rejection.error == "campaign_ended"
        ]
        assert refused, "no request was tried after the end"
        # Postgres: every redemption was decided before the end returned, and every
        # acknowledged one is there
        rows = await fetch(
            db, "SELECT id, created_at FROM redemptions WHERE campaign_id = $1", campaign_id
        )
        assert [r for r in rows if r["created_at"] > returned_wall] == []
        assert {a.outcome.redemption.id for a in wins} <= {r["id"] for r in rows}  # type: ignore[union-attr]

    info = await engine.shard_info()
    assert datetime.fromisoformat(info[victim]["loaded_at"]) > killed_at, "the victim restarted"
    # the restarted shard sells neither campaign
    again = await engine.redeem_many(
        [RedeemRequest(code=c, amount=1000, currency="EUR") for c in spare]
        + [RedeemRequest(code=code, amount=1000, currency="EUR", customer_id="late-customer")]
    )
    assert {o.rejection.error for o in again if o.rejection is not None} == {"campaign_ended"}
    assert all(o.redemption is None for o in again)
    await engine.flush()
    unsold = await fetchval(
        db, "SELECT count(*) FROM vouchers WHERE campaign_id = $1 AND status IN (0, 1)", cid
    )
    assert unsold == 0, "every unredeemed code of the ended campaign is void in Postgres"
    # a repeated end answers with the ended campaign, it is not refused
    first = ends[cid][0].campaign
    repeat = await engine.transition_result(cid, "end")
    assert (repeat.campaign.state, repeat.campaign.version) == ("ended", first.version)


# --- a shard that never hears the end, driven in-process --------------------------------


class FakeShard:
    """A shard handle for an in-process coordinator: it claims its owner epoch as a real
    shard does, and can be made deaf to one campaign (its put never answers)."""

    def __init__(self, fence: fencing.Fence, deaf_to: str | None = None) -> None:
        self.fence = fence
        self.deaf_to = deaf_to
        self.held: dict[str, Campaign] = {}
        self.put_campaign = RemoteMethod(self._put)
        self.put_campaigns = RemoteMethod(self._put_many)
        self.codes_in_campaign = RemoteMethod(self._count)

    def _apply(self, c: Campaign) -> None:
        old = self.held.get(c.id)
        if old is None or c.version > old.version:
            self.held[c.id] = c

    async def _put(self, payload: bytes) -> int:
        c = msgspec.msgpack.decode(payload, type=Campaign)
        if c.id == self.deaf_to:
            await asyncio.Event().wait()  # frozen, partitioned: never answers
        self._apply(c)
        return self.held[c.id].version

    async def _put_many(self, payload: bytes) -> int:
        cs = msgspec.msgpack.decode(payload, type=list[Campaign])
        if any(c.id == self.deaf_to for c in cs):
            await asyncio.Event().wait()
        for c in cs:
            self._apply(c)
        return len(cs)

    async def _count(self, campaign_id: str) -> int:
        return 0


async def _shards(dsn: str, ns: str, n: int) -> list[fencing.Fence]:
    conn = await asyncpg.connect(dsn)
    try:
        await fencing.ensure_topology(conn, ns, n)
        return [await fencing.claim_shard(conn, ns, i, n) for i in range(n)]
    finally:
        await conn.close()


async def _commits(dsn: str, fence: fencing.Fence) -> bool:
    """Whether a write under ``fence`` still commits."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await fence.check(conn)
        return True
    except errors.Fenced:
        return False
    finally:
        await conn.close()


async def test_a_shard_that_misses_the_end_is_fenced(services: Any) -> None:
    dsn = services.database_url
    ns = uid("fence-ns")  # its own owners: the session's engine is not touched
    fences = await _shards(dsn, ns, 2)
    settings = Settings(shards=2, namespace=ns, campaign_confirm_timeout_s=0.5)
    cid = uid("deaf")
    shards = [FakeShard(fences[0]), FakeShard(fences[1], deaf_to=None)]
    exits: list[BaseException] = []
    core = CoordinatorCore(shards, dsn, settings, on_fenced=exits.append)
    try:
        await core.create_campaign(
            {"id": cid, "name": "deaf", "type": "discount", "currency": "EUR",
             "discount": Discount("percent", 5)}
        )
        await core.transition(cid, "activate")
        assert shards[1].held[cid].state == "active"
        shards[1].deaf_to = cid  # shard 1 freezes, or its link does

        t0 = time.monotonic()
        result = await core.transition(cid, "end")
        took = time.monotonic() - t0
        assert result.campaign.state == "ended"
        assert (result.confirmed, result.fenced) == ((0,), (1,))
        assert 0.5 <= took < 5.0, "answered after the confirmation timeout, not before"
        # the deaf shard can no longer commit anything; the one that confirmed still can
        assert not await _commits(dsn, fences[1])
        assert await _commits(dsn, fences[0])
        assert await fetchval(dsn, "SELECT state FROM campaigns WHERE id = $1", cid) == "ended"

        # a repeated end is answered with the same campaign (and the deaf shard fenced again)
        again = await core.transition(cid, "end")
        assert again.campaign.version == result.campaign.version and again.fenced == (1,)

        # the restarted shard hears again: the coordinator's background re-send reaches it
        shards[1].deaf_to = None
        deadline = time.monotonic() + 10
        while shards[1].held[cid].state != "ended":
            assert time.monotonic() < deadline, "the coordinator stopped re-sending the end"
            await asyncio.sleep(0.1)
        assert exits == []
    finally:
        await core.close()


async def test_a_replaced_coordinator_stops(services: Any) -> None:
    dsn = services.database_url
    ns = uid("coord-ns")
    settings = Settings(shards=1, namespace=ns, campaign_confirm_timeout_s=0.5)
    fences = await _shards(dsn, ns, 1)
    exits: list[BaseException] = []
    old = CoordinatorCore([FakeShard(fences[0])], dsn, settings, on_fenced=exits.append)
    new = CoordinatorCore([FakeShard(fences[0])], dsn, settings)
    try:
        await old.ready()
        await new.ready()  # claims the coordinator's epoch: the old one is stale
        fields = {"name": "x", "type": "discount", "currency": "EUR",
                  "discount": Discount("percent", 5)}
        with pytest.raises(errors.Fenced):
            await old.create_campaign({**fields, "id": uid("stale")})
        assert len(exits) == 1
        with pytest.raises(errors.Fenced):
            await old.campaign("anything")  # it stops answering
        c = await new.create_campaign({**fields, "id": uid("fresh")})
        assert (await new.transition(c.id, "activate")).campaign.state == "active"
    finally:
        await old.close()
        await new.close()


async def test_a_replaced_issuer_stops(services: Any) -> None:
    from actors.issuance import IssuerCore

    settings = Settings(namespace=uid("issuer-ns"))
    exits: list[BaseException] = []
    old = IssuerCore(None, services.database_url, services.redis_url, settings, on_fenced=exits.append)
    new = IssuerCore(None, services.database_url, services.redis_url, settings)
    try:
        await old.ready()
        await new.ready()  # claims the issuer's epoch: the old one's job rows are refused
        job = {
            "id": uid("iss"), "campaign_id": "c", "selection": {}, "channels": ["email"],
            "state": "running", "error": None, "counts": {}, "created_at": datetime.now(UTC),
            "finished_at": None,
        }
        with pytest.raises(errors.Fenced):
            await old._save(job)
        assert len(exits) == 1
        with pytest.raises(errors.Fenced):
            await old.job(job["id"])
        await new._save(job)
        assert await fetchval(services.database_url, "SELECT state FROM issuance_jobs WHERE id = $1", job["id"]) == "running"
    finally:
        for core in (old, new):
            if core.pool is not None:
                await core.pool.close()
            if core.redis is not None:
                await core.redis.aclose()
