"""Kill a shard actor in the middle of a redemption run: it restarts, reloads from
Postgres, loses no acknowledged redemption, doubles none, and replays of the idempotency
keys that were in flight answer consistently."""

from __future__ import annotations

import asyncio
import random

import pytest
import ray

from engine.routing import shard_of
from engine.shard_state import RedeemRequest
from tests.engine_support import (
    campaign_codes,
    concurrent_batches,
    discount_campaign,
    fetch,
    redeem_with_retry,
    shared_code_campaign,
    uid,
)

pytestmark = pytest.mark.fault


async def _kill_mid_run(engine, shard: int, run: asyncio.Future, delay: float) -> None:
    await asyncio.sleep(delay)
    assert not run.done(), "the run ended before the kill: the test would prove nothing"
    ray.kill(engine.shards[shard], no_restart=False)


async def test_shard_killed_mid_run_loses_nothing_acknowledged(engine, services):
    db = services.database_url
    cid = await discount_campaign(engine, 4000)
    codes = await campaign_codes(db, cid)
    reqs = [
        RedeemRequest(
            code=code,
            amount=8000,
            currency="EUR",
            customer_id=f"k-{who}-{i}",
            idempotency_key=f"{cid}-{who}-{i}",
        )
        for i, code in enumerate(codes)
        for who in ("a", "b")
    ]
    random.Random(11).shuffle(reqs)
    victim = shard_of(codes[0], engine.n)
    run = asyncio.ensure_future(concurrent_batches(engine, reqs, batch=40, parallel=16))
    await _kill_mid_run(engine, victim, run, 0.3)
    outcomes = await run
    acked = {r.idempotency_key: o for r, o in zip(reqs, outcomes, strict=True)}
    wins = [o.redemption for o in outcomes if o.redemption is not None]
    # every code was attempted twice; exactly one attempt per code wins
    assert len(wins) == 4000 and len({w.code for w in wins}) == 4000
    info = await engine.shard_info()
    assert info[victim]["loaded_at"] is not None

    rows = await fetch(db, "SELECT id, code, status FROM redemptions WHERE campaign_id=$1", cid)
    assert {r["id"] for r in rows} == {w.id for w in wins}, "acknowledged == persisted"
    assert len({r["code"] for r in rows}) == len(rows) == 4000
    # replays of every key, in-flight ones included, return the first answer
    replay = await concurrent_batches(engine, reqs, batch=200, parallel=8)
    for r, o in zip(reqs, replay, strict=True):
        assert o == acked[r.idempotency_key]
    stats = await engine.stats(cid)
    assert (stats.redeemed, stats.available) == (4000, 0)


async def test_shared_code_limit_survives_a_kill(engine, services):
    code = uid("KILL").upper()
    cid = await shared_code_campaign(
        engine, code, id_prefix="kshared", name="kill shared",
        discount={"kind": "percent", "value": 20}, limits={"total": 500, "per_customer": 1},
    )
    reqs = [
        RedeemRequest(
            code=code,
            amount=1000,
            currency="EUR",
            customer_id=f"s{i % 1500}",
            idempotency_key=f"{cid}-{i}",
        )
        for i in range(3000)
    ]
    run = asyncio.ensure_future(concurrent_batches(engine, reqs, batch=25, parallel=16))
    await _kill_mid_run(engine, shard_of(code, engine.n), run, 0.05)
    outcomes = await run
    wins = [o.redemption for o in outcomes if o.redemption is not None]
    assert len(wins) == 500
    assert len({w.customer_id for w in wins}) == 500
    rows = await fetch(
        services.database_url, "SELECT id FROM redemptions WHERE campaign_id=$1 AND status=0", cid
    )
    assert {r["id"] for r in rows} == {w.id for w in wins}
    again = await redeem_with_retry(
        engine,
        [RedeemRequest(code=code, amount=1000, currency="EUR", customer_id="fresh-customer")],
    )
    assert again[0].rejection is not None and again[0].rejection.error == "exhausted"
