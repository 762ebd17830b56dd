"""Delivery when Redis loses its data, is down, or a round is slow: every queued message is
still delivered exactly once. Checked from the outside: the SMTP sink's receipts (a repeated
hand-over is recorded as ``duplicate``) against the rows in Postgres.

Runs on a Postgres and a Valkey of its own (the session's must stay up), with the delivery
workers in this process (``DeliveryCore``, what the Ray actor wraps).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from actors.delivery import DeliveryCore, WorkerConfig, provider_urls
from actors.delivery_queue import enqueue
from engine import keys
from engine.campaigns import Discount
from engine.settings import Settings
from ops.servers import Services, start_services
from ops.sinks import Sinks
from store.migrations import migrate
from tests.delivery_support import add_customers, delivery_settings, messages_for, wait_states
from tests.engine_support import fetch, stored_campaign, uid
from tests.support import PrivateValkey

pytestmark = pytest.mark.fault


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    # Only Postgres is started: the Redis URL is a placeholder that no one dials.
    root = tmp_path_factory.mktemp("pg-valkey-delivery")
    svc = start_services(Settings(redis_url="redis://127.0.0.1:1/0"), data_dir=root)
    try:
        asyncio.run(migrate(svc.database_url))
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[PrivateValkey]:
    vk = PrivateValkey(tmp_path / "valkey").start()
    try:
        yield vk
    finally:
        vk.stop()


@pytest.fixture
def sinks(tmp_path: Path) -> Iterator[Sinks]:
    s = Sinks(tmp_path / "outbox").start()
    try:
        yield s
    finally:
        s.stop()


@asynccontextmanager
async def workers(
    dsn: str, redis_url: str, sinks: Sinks, n: int = 2, **overrides: Any
) -> AsyncIterator[list[DeliveryCore]]:
    """``n`` delivery workers on the email channel, stopped gracefully at the end."""
    s = delivery_settings(Settings(), delivery_workers=n, **overrides)
    cfg = WorkerConfig(
        settings=msgspec.to_builtins(s),
        dsn=dsn,
        redis_url=redis_url,
        urls=provider_urls(s, sinks.urls),
        channels=("email",),
    )
    cores = [DeliveryCore(cfg, f"w{i}") for i in range(n)]
    tasks = [asyncio.create_task(c.run()) for c in cores]
    try:
        while not all(c.opened.is_set() for c in cores):
            assert not any(t.done() for t in tasks), "a worker failed to start"
            await asyncio.sleep(0.02)
        yield cores
    finally:
        for c in cores:
            c.stopping.set()
        await asyncio.wait(tasks, timeout=20)


async def _campaign_with_messages(dsn: str, n: int) -> tuple[str, str, list[Any]]:
    c = await stored_campaign(dsn, id=uid("vkd"), type="discount", discount=Discount("amount", 100))
    prefix = uid("vk")
    customers = await add_customers(dsn, prefix, n)
    return c.id, prefix, messages_for(c.id, customers)


async def _enqueue(dsn: str, redis_url: str, msgs: list[Any]) -> int:
    import asyncpg

    db = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    redis = Redis.from_url(redis_url, socket_connect_timeout=1.0)
    try:
        return await enqueue(db, redis, msgs)
    finally:
        await redis.aclose()
        await db.close()


async def _sent(dsn: str, cid: str) -> int:
    rows = await fetch(dsn, "SELECT count(*) AS n FROM deliveries WHERE campaign_id = $1 AND state = 'sent'", cid)
    return int(rows[0]["n"])


def _exactly_once(sinks: Sinks, prefix: str, ids: set[str]) -> None:
    with sinks.outbox._lock:
        got = [r for r in sinks.outbox.receipts if (r["to"] or "").startswith(prefix)]
    handed = Counter(r["key"] for r in got if r["status"] in ("accepted", "duplicate"))
    assert set(handed) == ids, f"missing {len(ids - set(handed))}, unexpected {len(set(handed) - ids)}"
    twice = {k: n for k, n in handed.items() if n > 1}
    assert not twice, f"{len(twice)} messages handed to the provider more than once"


async def test_queued_messages_are_delivered_once_after_valkey_restarts_empty(
    postgres: Services, valkey: PrivateValkey, sinks: Sinks
) -> None:
    dsn = postgres.database_url
    cid, prefix, msgs = await _campaign_with_messages(dsn, 600)
    # 200/s and 20 per round: most messages wait in the stream when it is lost.
    async with workers(dsn, valkey.url, sinks, delivery_rate_email=200.0, delivery_batch=20) as cores:
        assert await _enqueue(dsn, valkey.url, msgs) == 600
        while await _sent(dsn, cid) < 100:
            await asyncio.sleep(0.05)
        # Valkey loses everything: streams, consumer group, pending entries, sent marks.
        await asyncio.to_thread(valkey.restart, keep_data=False)
        at_loss = await _sent(dsn, cid)
        assert at_loss < 600, "every message was sent before the loss: the test proves nothing"
        t0 = time.monotonic()
        await wait_states(dsn, cid, {"sent": 600, "queued": 0, "sending": 0}, timeout_s=40)
        requeued = sum(c.counts["requeued"] for c in cores)
        print(
            f"lost the streams at {at_loss}/600 sent; {requeued} re-queued from Postgres; "
            f"all sent {time.monotonic() - t0:.1f} s later"
        )
        assert requeued >= 600 - at_loss - 4 * 20, "the lost entries were not re-queued"
    _exactly_once(sinks, prefix, {m.id for m in msgs})


async def test_messages_recorded_while_valkey_is_down_are_delivered_once(
    postgres: Services, valkey: PrivateValkey, sinks: Sinks
) -> None:
    dsn = postgres.database_url
    cid, prefix, msgs = await _campaign_with_messages(dsn, 50)
    async with workers(dsn, valkey.url, sinks):
        await asyncio.to_thread(valkey.stop)
        # The producer records the messages (Postgres is the truth) and does not fail.
        assert await _enqueue(dsn, valkey.url, msgs) == 50
        await asyncio.sleep(1.0)
        assert await _sent(dsn, cid) == 0
        await asyncio.to_thread(valkey.start)  # back, with its data (no entries of these)
        t0 = time.monotonic()
        await wait_states(dsn, cid, {"sent": 50}, timeout_s=30)
        print(f"recorded while Valkey was down: all sent {time.monotonic() - t0:.1f} s after it came back")
    _exactly_once(sinks, prefix, {m.id for m in msgs})


async def test_a_lost_consumer_group_is_created_again(
    postgres: Services, valkey: PrivateValkey, sinks: Sinks
) -> None:
    dsn = postgres.database_url
    cid, prefix, msgs = await _campaign_with_messages(dsn, 40)
    async with workers(dsn, valkey.url, sinks):
        await _enqueue(dsn, valkey.url, msgs[:20])
        await wait_states(dsn, cid, {"sent": 20}, timeout_s=20)
        r = Redis.from_url(valkey.url)
        try:
            assert await r.xgroup_destroy(keys.stream("email"), keys.GROUP)
            await _enqueue(dsn, valkey.url, msgs[20:])
            await wait_states(dsn, cid, {"sent": 40}, timeout_s=20)
            groups = await r.xinfo_groups(keys.stream("email"))
            assert [g["name"] for g in groups] == [keys.GROUP.encode()]
        finally:
            await r.aclose()
    _exactly_once(sinks, prefix, {m.id for m in msgs})


async def test_a_round_slower_than_the_claim_idle_time_is_not_taken_over(
    postgres: Services, valkey: PrivateValkey, sinks: Sinks
) -> None:
    """Each message takes the provider 0.6 s, a worker sends 2 at a time and reads 8 per
    round: a round lasts ~2.4 s, over twice ``claim_idle_s`` (1 s). The other worker must
    not take the claims of a worker that is still sending."""
    dsn = postgres.database_url
    cid, prefix, msgs = await _campaign_with_messages(dsn, 24)
    sinks.mode.delay_s = 0.6
    async with workers(
        dsn, valkey.url, sinks, delivery_claim_idle_s=1.0, delivery_batch=8, delivery_connections=2
    ) as cores:
        await _enqueue(dsn, valkey.url, msgs)
        await wait_states(dsn, cid, {"sent": 24}, timeout_s=30)
        renewed = sum(c.counts["renewed"] for c in cores)
    rows = await fetch(dsn, "SELECT attempts FROM deliveries WHERE campaign_id = $1", cid)
    assert renewed > 0, "no round outlived the idle time: the test proves nothing"
    assert all(r["attempts"] == 1 for r in rows), "a claim was taken over from a live worker"
    _exactly_once(sinks, prefix, {m.id for m in msgs})
