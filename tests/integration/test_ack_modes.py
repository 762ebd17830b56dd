"""The two ack modes of a shard, driven in-process (ShardCore, no Ray) on the real
Postgres: ``durable`` answers after the group commit, ``fast`` answers from memory and
commits within the batch window (its documented loss window)."""

from __future__ import annotations

import pytest

from actors.shard import ShardCore
from engine.campaigns import Discount
from engine.settings import Settings
from engine.shard_state import Outcome, RedeemRequest
from tests.engine_support import fetchval, redeem_on_core, stored_campaign, uid

pytestmark = pytest.mark.integration

# One shard owning every bucket, in its own campaign: the session's engine shards never
# see this campaign's codes, so the two writers never touch the same rows.
WINDOW_MS = 300.0


async def _core(dsn: str, mode: str) -> tuple[ShardCore, str, str]:
    c = await stored_campaign(dsn, id=uid(f"ack-{mode}"), type="discount", discount=Discount("amount", 100))
    settings = Settings(namespace=uid("ack-ns"), ack_mode=mode, batch_window_ms=WINDOW_MS)  # type: ignore[arg-type]
    core = ShardCore(0, 1, dsn, settings)
    await core.ready()
    code = uid("ACK").upper()
    assert await core.add_codes(c.id, [code]) == 1
    return core, c.id, code


async def _redeem(core: ShardCore, code: str) -> Outcome:
    return (await redeem_on_core(core, RedeemRequest(code=code, amount=1000, currency="EUR")))[0]


async def test_durable_answers_only_after_the_commit(services) -> None:
    core, cid, code = await _core(services.database_url, "durable")
    out = await _redeem(core, code)
    assert out.redemption is not None
    # the answer left after the commit: the row is there the moment we look
    assert await fetchval(services.database_url, "SELECT count(*) FROM redemptions WHERE campaign_id=$1", cid) == 1
    await core.store.close()  # type: ignore[union-attr]


async def test_fast_answers_before_the_commit_and_commits_within_the_window(services) -> None:
    core, cid, code = await _core(services.database_url, "fast")
    out = await _redeem(core, code)
    assert out.redemption is not None
    # answered from memory: the group commit is still waiting out its window
    assert await fetchval(services.database_url, "SELECT count(*) FROM redemptions WHERE campaign_id=$1", cid) == 0
    await core.flush()
    assert await fetchval(services.database_url, "SELECT count(*) FROM redemptions WHERE campaign_id=$1", cid) == 1
    assert await fetchval(services.database_url, "SELECT status FROM vouchers WHERE code=$1", code) == 2
    await core.store.close()  # type: ignore[union-attr]
