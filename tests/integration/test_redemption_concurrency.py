"""Exactly-once redemption under concurrency, on real Ray and the embedded Postgres."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from engine import errors
from engine.shard_state import RedeemRequest
from tests.engine_support import (
    campaign_codes,
    concurrent_batches,
    discount_campaign,
    fetch,
    fetchval,
    later,
    shared_code_campaign,
    uid,
)

pytestmark = pytest.mark.integration


async def test_10000_attempts_on_5000_codes_give_exactly_5000(engine, services):
    cid = await discount_campaign(engine, 5000)
    codes = await campaign_codes(services.database_url, cid)
    assert len(codes) == 5000 == len(set(codes))
    reqs = [
        RedeemRequest(code=code, amount=10_000, currency="EUR", customer_id=f"cust-{who}-{i}")
        for i, code in enumerate(codes)
        for who in ("a", "b")
    ]
    random.Random(7).shuffle(reqs)
    # many small batches in flight at once, plus single-request calls racing them
    singles = reqs[:200]
    batched = reqs[200:]
    results = await asyncio.gather(
        concurrent_batches(engine, batched, batch=97, parallel=32),
        asyncio.gather(*[engine.redeem_many([r]) for r in singles]),
    )
    outcomes = results[0] + [o[0] for o in results[1]]
    wins = [o.redemption for o in outcomes if o.redemption is not None]
    losses = [o.rejection for o in outcomes if o.rejection is not None]
    assert len(wins) == 5000
    assert len({w.code for w in wins}) == 5000
    assert Counter(r.error for r in losses) == {"already_redeemed": 5000}
    assert all(w.discount_amount == 1000 for w in wins)

    db = services.database_url
    assert await fetchval(db, "SELECT count(*) FROM redemptions WHERE campaign_id=$1", cid) == 5000
    assert (
        await fetchval(db, "SELECT count(DISTINCT code) FROM redemptions WHERE campaign_id=$1", cid)
        == 5000
    )
    assert (
        await fetchval(db, "SELECT count(*) FROM vouchers WHERE campaign_id=$1 AND status=2", cid)
        == 5000
    )
    stats = await engine.stats(cid)
    assert (stats.redeemed, stats.available, stats.redemptions) == (5000, 0, 5000)
    db_ids = {
        r["id"] for r in await fetch(db, "SELECT id FROM redemptions WHERE campaign_id=$1", cid)
    }
    assert db_ids == {w.id for w in wins}


async def test_shared_code_global_limit_and_per_customer_limit(engine, services):
    code = uid("FLASH").upper()
    cid = await shared_code_campaign(
        engine, code, id_prefix="shared", name="flash 1000",
        discount={"kind": "amount", "value": 500}, limits={"total": 1000, "per_customer": 1},
    )
    # 2,000 customers, 5 attempts each: 10,000 attempts
    reqs = [
        RedeemRequest(code=code, amount=2000, currency="EUR", customer_id=f"c{i % 2000}")
        for i in range(10_000)
    ]
    random.Random(3).shuffle(reqs)
    outcomes = await concurrent_batches(engine, reqs, batch=50, parallel=32)
    wins = [o.redemption for o in outcomes if o.redemption is not None]
    assert len(wins) == 1000
    customers = Counter(w.customer_id for w in wins)
    assert max(customers.values()) == 1
    reasons = Counter(o.rejection.error for o in outcomes if o.rejection is not None)
    assert set(reasons) <= {"exhausted", "customer_limit_reached"}
    assert sum(reasons.values()) == 9000

    db = services.database_url
    rows = await fetch(
        db,
        "SELECT customer_id, count(*) AS n FROM redemptions WHERE campaign_id=$1 AND status=0"
        " GROUP BY customer_id",
        cid,
    )
    assert len(rows) == 1000 and all(r["n"] == 1 for r in rows)
    assert await fetchval(db, "SELECT uses FROM vouchers WHERE code=$1", code) == 1000
    # only redemptions were written: no per-customer rows up front (the alternative design would write them)
    assert await fetchval(db, "SELECT count(*) FROM vouchers WHERE campaign_id=$1", cid) == 1
    stats = await engine.stats(cid)
    assert stats.active_redemptions == 1000


async def test_idempotent_replay_rollback_and_restore(engine, services):
    # enough codes that the shard deciding alice's assignment surely owns some
    cid = await discount_campaign(engine, 200)
    code = (await engine.assign(cid, "alice")).code
    assert (await engine.assign(cid, "alice")).code == code  # a re-run gives the same code
    req = RedeemRequest(
        code=code,
        amount=3000,
        currency="EUR",
        customer_id="alice",
        order_id="o-1",
        idempotency_key=uid("key"),
    )
    first = await engine.redeem(req)
    again = await engine.redeem(req)
    assert again == first
    with pytest.raises(errors.IdempotencyConflict):
        await engine.redeem(RedeemRequest(**{**_fields(req), "amount": 3100}))
    back = await engine.rollback(first.id)
    assert back.status == 1
    v = await engine.voucher(code)
    assert v["status"] == "assigned" and v["customer_id"] == "alice"
    with pytest.raises(errors.AlreadyRolledBack):
        await engine.rollback(first.id)
    # the code can be used again by its owner, not by someone else
    with pytest.raises(errors.WrongCustomer):
        await engine.redeem(
            RedeemRequest(code=code, amount=3000, currency="EUR", customer_id="bob")
        )
    second = await engine.redeem(
        RedeemRequest(code=code, amount=3000, currency="EUR", customer_id="alice")
    )
    assert second.id != first.id
    row = await fetch(services.database_url, "SELECT status FROM redemptions WHERE id=$1", first.id)
    assert row[0]["status"] == 1


async def test_bad_input_is_typed_and_writes_nothing(engine, services):
    db = services.database_url
    with pytest.raises(errors.UnknownCampaign):
        await engine.activate("no-such-campaign")
    with pytest.raises(errors.InvalidInput, match="ends_at is in the past"):
        await engine.create_campaign(
            name="x",
            type="discount",
            currency="EUR",
            discount={"kind": "percent", "value": 5},
            ends_at=later(-1),
        )
    with pytest.raises(errors.InvalidInput, match="currency"):
        await engine.create_campaign(
            name="x",
            type="discount",
            currency="euro",
            discount={"kind": "percent", "value": 5},
        )
    cid = await discount_campaign(engine, 0, code={"length": 4})
    with pytest.raises(errors.InfeasibleGeneration):
        await engine.generate(cid, 1_000_000)
    assert await fetchval(db, "SELECT count(*) FROM vouchers WHERE campaign_id=$1", cid) == 0
    assert await fetchval(db, "SELECT count(*) FROM generation_jobs WHERE campaign_id=$1", cid) == 0
    with pytest.raises(errors.UnknownCode):
        await engine.redeem(RedeemRequest(code="NOPE-NOPE", amount=100, currency="EUR"))
    with pytest.raises(errors.MalformedCode):
        await engine.redeem(RedeemRequest(code="   ", amount=100, currency="EUR"))
    cid2 = await discount_campaign(engine, 3)
    code = (await campaign_codes(db, cid2))[0]
    with pytest.raises(errors.InvalidInput, match="amount"):
        await engine.redeem(RedeemRequest(code=code, amount=-5, currency="EUR"))
    with pytest.raises(errors.CurrencyMismatch):
        await engine.redeem(RedeemRequest(code=code, amount=500, currency="USD"))
    with pytest.raises(errors.InvalidInput):
        await engine.rollback("not-an-id")
    before = await fetchval(db, "SELECT count(*) FROM redemptions")
    await engine.flush()
    assert await fetchval(db, "SELECT count(*) FROM redemptions") == before


async def test_generation_is_persisted_unique_and_reports_progress(engine, services):
    c = await engine.create_campaign(
        id=uid("gen"),
        name="gen",
        type="gift_card",
        currency="EUR",
        gift_balance=5000,
        code={"pattern": "GIFT-####-####", "check_char": True},
    )
    seen: list[int] = []
    job = await engine.generate(c.id, 120_000, progress=lambda j: seen.append(j["generated"]))
    assert job["state"] == "done" and job["generated"] == 120_000
    assert job["plan"]["code_space"] > 0
    db = services.database_url
    assert await fetchval(db, "SELECT count(*) FROM vouchers WHERE campaign_id=$1", c.id) == 120_000
    assert (
        await fetchval(
            db, "SELECT count(*) FROM vouchers WHERE campaign_id=$1 AND balance=5000", c.id
        )
        == 120_000
    )
    row = await fetch(db, "SELECT state, generated FROM generation_jobs WHERE id=$1", job["id"])
    assert (row[0]["state"], row[0]["generated"]) == ("done", 120_000)
    stats = await engine.stats(c.id)
    assert stats.available == 120_000 and stats.gift_balance_outstanding == 120_000 * 5000
    code = (await campaign_codes(db, c.id))[0]
    assert code.startswith("GIFT-") and len(code) == len("GIFT-####-####") + 1


async def test_gift_card_partial_spends_and_refund(engine, services):
    c = await engine.create_campaign(
        id=uid("gift"),
        name="gift",
        type="gift_card",
        currency="EUR",
        gift_balance=5000,
    )
    await engine.generate(c.id, 5)
    await engine.activate(c.id)
    code = (await campaign_codes(services.database_url, c.id))[0]
    r1 = await engine.redeem(RedeemRequest(code=code, amount=3000, currency="EUR", customer_id="g"))
    r2 = await engine.redeem(RedeemRequest(code=code, amount=3000, currency="EUR", customer_id="g"))
    assert (r1.discount_amount, r1.balance_after) == (3000, 2000)
    assert (r2.discount_amount, r2.balance_after) == (2000, 0)
    with pytest.raises(errors.Exhausted):
        await engine.redeem(RedeemRequest(code=code, amount=10, currency="EUR", customer_id="g"))
    await engine.rollback(r1.id)
    v = await engine.voucher(code)
    assert v["balance"] == 3000 and v["status"] == "available"  # a bearer card, as before
    await engine.flush()
    row = await fetch(
        services.database_url, "SELECT balance, status FROM vouchers WHERE code=$1", code
    )
    assert (row[0]["balance"], row[0]["status"]) == (3000, 0)


async def test_ending_voids_unredeemed_codes_in_memory_and_db(engine, services):
    cid = await discount_campaign(engine, 20)
    db = services.database_url
    codes = await campaign_codes(db, cid)
    await engine.redeem(RedeemRequest(code=codes[0], amount=1000, currency="EUR"))
    ended = await engine.end(cid)
    assert await engine.end(cid) == ended  # a repeated end answers with the ended campaign
    with pytest.raises(errors.CannotActivateEnded):
        await engine.activate(cid)
    with pytest.raises(errors.CampaignEnded):
        await engine.redeem(RedeemRequest(code=codes[1], amount=1000, currency="EUR"))
    stats = await engine.stats(cid)
    assert (stats.redeemed, stats.void) == (1, 19)
    await engine.flush()  # the rows are voided in the background, chunk by chunk
    rows = await fetch(
        db, "SELECT status, count(*) AS n FROM vouchers WHERE campaign_id=$1 GROUP BY status", cid
    )
    assert {r["status"]: r["n"] for r in rows} == {2: 1, 3: 19}


def _fields(req: RedeemRequest) -> dict:
    return {f: getattr(req, f) for f in req.__struct_fields__}
