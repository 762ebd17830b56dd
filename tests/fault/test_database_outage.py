"""A shard and a coordinator that start while Postgres is down answer ``unavailable`` in
bounded time, and load and serve by themselves once Postgres is back: a failed start is
never kept as the answer. Runs on a Postgres of its own (the session's shared one must
stay up)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from actors.coordinator import CoordinatorCore
from actors.shard import ShardCore
from engine import errors
from engine.campaigns import Discount
from engine.settings import Settings
from engine.shard_state import Outcome, RedeemRequest
from ops.servers import embedded_for_tests
from store.migrations import migrate
from tests.engine_support import redeem_on_core, stored_campaign, uid

pytestmark = pytest.mark.fault



async def _redeem(core: ShardCore, code: str) -> Outcome:
    req = RedeemRequest(code=code, amount=1000, currency="EUR")
    return (await redeem_on_core(core, req))[0]


async def _close(core: ShardCore) -> None:
    if core._housekeeping is not None:
        core._housekeeping.cancel()
    if core.store is not None:
        await core.store.close()


async def test_a_shard_started_during_an_outage_recovers_by_itself(tmp_path: Path) -> None:
    svc = await asyncio.to_thread(embedded_for_tests, tmp_path)
    try:
        dsn = svc.database_url
        await migrate(dsn)
        c = await stored_campaign(dsn, id=uid("outage"), type="discount", discount=Discount("amount", 100))
        settings = Settings(namespace=uid("outage-ns"), shards=1, batch_window_ms=1.0)
        first = ShardCore(0, 1, dsn, settings)
        codes = [uid("OUT").upper() for _ in range(3)]
        assert await first.add_codes(c.id, codes) == 3
        assert (await _redeem(first, codes[0])).redemption is not None
        await _close(first)

        await asyncio.to_thread(svc.stop)  # the database goes away
        core = ShardCore(0, 1, dsn, settings)
        core.exit_process = lambda code: None
        coordinator = CoordinatorCore([], dsn, settings, on_fenced=lambda exc: None)
        for _ in range(3):  # answered in bounded time, every time, never a hang
            t0 = time.monotonic()
            with pytest.raises(errors.Unavailable):
                await asyncio.wait_for(_redeem(core, codes[1]), 10)
            with pytest.raises(errors.Unavailable):
                await asyncio.wait_for(coordinator.list_campaigns(), 10)
            assert time.monotonic() - t0 < 5
            await asyncio.sleep(0.3)

        svc = await asyncio.to_thread(embedded_for_tests, tmp_path)  # ...and comes back
        assert svc.database_url == dsn
        deadline = time.monotonic() + 20
        while True:
            try:
                out = await _redeem(core, codes[1])
                break
            except errors.Unavailable:
                assert time.monotonic() < deadline, "the shard did not recover by itself"
                await asyncio.sleep(0.2)
        assert out.redemption is not None
        # what was committed before the outage is in the reloaded memory, once
        again = await _redeem(core, codes[0])
        assert again.rejection is not None and again.rejection.error == "already_redeemed"
        assert core.state.stats(c.id).redeemed == 2
        assert c.id in {x.id for x in await coordinator.list_campaigns()}
        await _close(core)
        await coordinator.close()
    finally:
        await asyncio.to_thread(svc.stop)
