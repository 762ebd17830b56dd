"""Two live owners of one shard, for real: the shard's process is frozen (SIGSTOP) with
requests queued in it, a replacement actor claims the same shard and serves, and the
frozen process is then thawed (SIGCONT) and decides its queue from stale memory. Clients
redeem unique codes, a shared code with a limit and gift cards throughout, retrying with
their idempotency keys on whichever owner answers. Afterwards, checked against Postgres:
no code twice, the limit held, no card below zero, every acknowledged redemption
persisted; and the thawed process refused to answer and exited.

The deployment runs one shard in its own namespace (the session's engine is untouched)."""

from __future__ import annotations

import asyncio
import os
import random
import signal

import msgspec
import psutil
import pytest
import ray

from actors.client import VoucherEngine, start_engine
from actors.shard_actor import VoucherShard
from engine import errors
from engine.settings import Settings
from engine.shard_state import Outcome, RedeemRequest
from tests.engine_support import uid
from tests.invariants import Mixed

pytestmark = pytest.mark.fault

async def _try(engine: VoucherEngine, req: RedeemRequest) -> Outcome | None:
    """One attempt; None when the owner did not answer in time or is unavailable."""
    try:
        return (await asyncio.wait_for(engine.redeem_many([req]), 3.0))[0]
    except (TimeoutError, errors.Unavailable):
        return None


async def test_frozen_owner_and_its_replacement(services, ray_cluster) -> None:
    dsn = services.database_url
    settings = Settings(shards=1, namespace=uid("split"), batch_window_ms=1.0)
    engine = await asyncio.to_thread(start_engine, settings, dsn)
    load = await Mixed.create(engine, dsn, codes=300, cards=6)
    old_pid = (await engine.shard_info())[0]["pid"]

    owners: list[VoucherEngine] = [engine]  # clients try these in turn
    answers: dict[str, Outcome] = {}
    stop = asyncio.Event()

    async def client(k: int) -> None:
        rng = random.Random(k)
        for n in range(2000):  # bounded; stopped long before
            if stop.is_set():
                return
            key = f"{settings.namespace}-{k}-{n}"
            req = load.request(rng, key, f"c{k}")
            for attempt in range(200):  # same key on whichever owner answers
                out = await _try(owners[(k + attempt) % len(owners)], req)
                if out is not None:
                    answers[key] = out
                    break
                await asyncio.sleep(0.05)

    clients = [asyncio.ensure_future(client(k)) for k in range(16)]
    await asyncio.sleep(1.0)
    os.kill(old_pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(0.5)  # requests pile up in the frozen owner
        blob = msgspec.msgpack.encode(settings)
        replacement = VoucherShard.options(  # type: ignore[attr-defined]
            name=uid("replacement"), namespace=settings.namespace, max_restarts=0
        ).remote(0, 1, dsn, blob)
        await asyncio.wait_for(replacement.ready.remote(), 60)
        owners.append(VoucherEngine([replacement], engine.coordinator))
        await asyncio.sleep(2.0)  # the replacement serves while the old one is frozen
    finally:
        os.kill(old_pid, signal.SIGCONT)
    await asyncio.sleep(3.0)  # the thawed owner decides its queue, is refused, exits
    stop.set()
    await asyncio.gather(*clients)

    acked = [o.redemption for o in answers.values() if o.redemption is not None]
    counts = await load.check(acked)
    assert counts["acked"] > 100, counts
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE, (
        "the fenced owner kept running"
    )

    ray.kill(replacement, no_restart=True)
    for handle in [*engine.shards, engine.coordinator]:
        ray.kill(handle, no_restart=True)
