"""Changing the shard count under load: 4 -> 8 -> 3 while clients redeem unique codes, a
shared code with a limit and gift cards, retrying with their idempotency keys whenever the
engine says "unavailable". Afterwards no code is redeemed twice, the limit held, no card
went below zero, every acknowledged redemption is in Postgres, and replays of every
acknowledged key return the first answer. The deployment runs in its own namespace, so
the session's engine is untouched."""

from __future__ import annotations

import asyncio
import random

import pytest
import ray

from actors.client import VoucherEngine, reshard, start_engine
from engine import errors
from engine.settings import Settings
from engine.shard_state import Outcome, RedeemRequest
from tests.engine_support import uid
from tests.invariants import Mixed

pytestmark = pytest.mark.fault

async def _answer(engine: VoucherEngine, req: RedeemRequest) -> Outcome:
    """The engine's answer, retrying (same idempotency key) while it is unavailable or the
    request reached a shard of the old topology; bounded."""
    for _ in range(600):
        try:
            out = (await engine.redeem_many([req]))[0]
        except errors.Unavailable:
            await asyncio.sleep(0.05)
            continue
        if out.rejection is not None and out.rejection.error == errors.NotOwner.code:
            await asyncio.sleep(0.05)
            continue
        return out
    raise AssertionError("the engine did not come back within 30 s")


async def test_reshard_4_8_3_under_load(services, ray_cluster) -> None:
    dsn = services.database_url
    settings = Settings(shards=4, namespace=uid("reshard"), batch_window_ms=1.0)
    engine = await asyncio.to_thread(start_engine, settings, dsn)
    load = await Mixed.create(engine, dsn, codes=400, cards=12)

    sent: dict[str, RedeemRequest] = {}
    answers: dict[str, Outcome] = {}
    stop = asyncio.Event()

    async def client(k: int) -> None:
        rng = random.Random(k)
        for n in range(1000):  # bounded; the test stops the clients long before
            if stop.is_set():
                return
            key = f"{settings.namespace}-{k}-{n}"
            req = load.request(rng, key, f"cust-{k}")
            sent[key] = req
            answers[key] = await _answer(engine, req)

    clients = [asyncio.ensure_future(client(k)) for k in range(16)]
    await asyncio.sleep(1.0)
    before = len(answers)
    # the returned engines own the new (non-detached) actors: keep them referenced
    eight = await asyncio.to_thread(reshard, settings, dsn, 8)
    await asyncio.sleep(1.5)
    three = await asyncio.to_thread(reshard, settings, dsn, 3)
    await asyncio.sleep(1.5)
    stop.set()
    await asyncio.gather(*clients)

    assert before > 0 and len(answers) > before, "no load ran across the reshards"
    assert (eight.n, three.n, engine.n) == (8, 3, 3), "the clients' engine followed the topology"
    acked = [o.redemption for o in answers.values() if o.redemption is not None]
    counts = await load.check(acked)
    assert counts["acked"] > 50
    # every answer is final: a replay after both reshards answers exactly as the first time
    keys = list(sent)
    replays = await asyncio.gather(*[_answer(engine, sent[k]) for k in keys])
    for k, again in zip(keys, replays, strict=True):
        assert again == answers[k], f"replay of {k} answered differently"

    for handle in [*three.shards, three.coordinator]:
        ray.kill(handle, no_restart=True)
