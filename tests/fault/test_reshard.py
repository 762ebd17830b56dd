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
from engine.pools import Outcome, RedeemRequest
from engine.settings import Settings
from tests.engine_support import campaign_codes, discount_campaign, later, uid
from tests.invariants import check_redemptions

pytestmark = pytest.mark.fault

GIFT = 10_000
SHARED_LIMIT = 150


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
    disc = await discount_campaign(engine, 400)
    shared = await engine.create_campaign(
        id=uid("rs-shared"), name="shared", type="shared_code", currency="EUR",
        discount={"kind": "amount", "value": 100}, shared_code=uid("RS").upper(),
        limits={"total": SHARED_LIMIT}, ends_at=later(),
    )
    await engine.activate(shared.id)
    gift = await engine.create_campaign(
        id=uid("rs-gift"), name="gift", type="gift_card", currency="EUR",
        gift_balance=GIFT, ends_at=later(),
    )
    await engine.generate(gift.id, 12)
    await engine.activate(gift.id)
    codes = await campaign_codes(dsn, disc)
    cards = await campaign_codes(dsn, gift.id)

    sent: dict[str, RedeemRequest] = {}
    answers: dict[str, Outcome] = {}
    stop = asyncio.Event()

    async def client(k: int) -> None:
        rng = random.Random(k)
        for n in range(1000):  # bounded; the test stops the clients long before
            if stop.is_set():
                return
            key = f"{settings.namespace}-{k}-{n}"
            pick = rng.random()
            if pick < 0.5:
                req = RedeemRequest(code=rng.choice(codes), amount=5000, currency="EUR", idempotency_key=key)
            elif pick < 0.8:
                req = RedeemRequest(code=shared.shared_code or "", amount=5000, currency="EUR",
                                    customer_id=f"cust-{k}", idempotency_key=key)
            else:
                req = RedeemRequest(code=rng.choice(cards), amount=1500, currency="EUR", idempotency_key=key)
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
    counts = await check_redemptions(
        dsn,
        acked,
        unique=[disc],
        shared={shared.id: (SHARED_LIMIT, None)},
        gift={gift.id: GIFT},
    )
    assert counts["acked"] > 50
    # every answer is final: a replay after both reshards answers exactly as the first time
    keys = list(sent)
    replays = await asyncio.gather(*[_answer(engine, sent[k]) for k in keys])
    for k, again in zip(keys, replays, strict=True):
        assert again == answers[k], f"replay of {k} answered differently"

    for handle in [*three.shards, three.coordinator]:
        ray.kill(handle, no_restart=True)
