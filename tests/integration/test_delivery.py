"""Delivery pipeline with real components: messages enqueued through the producer contract,
delivery worker actors, the real aiosmtpd SMTP sink and the HTTP webhook sink."""

from __future__ import annotations

import asyncio
import email
import email.policy
import time
from collections import Counter
from typing import Any

import pytest

from engine import keys
from tests.delivery_support import (
    add_customers,
    enqueue_all,
    messages_for,
    receipts_of,
    running_pipeline,
    wait_states,
)
from tests.engine_support import discount_campaign, fetch, uid

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pipeline(services: Any, engine: Any, engine_settings: Any, tmp_path_factory: Any) -> Any:
    with running_pipeline(services, engine_settings, tmp_path_factory.mktemp("outbox")) as p:
        yield p


async def test_email_batch_arrives_exactly_once_and_reenqueue_sends_nothing(pipeline, engine, services):
    db = services.database_url
    cid = await discount_campaign(engine, 0)
    prefix = uid("ex1")
    customers = await add_customers(db, prefix, 2000)
    msgs = messages_for(cid, customers)
    t0 = time.monotonic()
    assert await enqueue_all(db, services.redis_url, msgs) == 2000
    await wait_states(db, cid, {"sent": 2000})
    elapsed = time.monotonic() - t0
    got = receipts_of(pipeline.sinks, prefix)
    receipts = Counter(r["key"] for r in got)
    assert set(receipts) == {m.id for m in msgs}
    assert all(n == 1 for n in receipts.values()), [k for k, n in receipts.items() if n > 1][:5]
    assert all(r["status"] == "accepted" for r in got)
    # Each customer got its own code, addressed to them.
    by_key = {m.id: m for m in msgs}
    eml = (pipeline.sinks.outbox.root / "email" / f"{msgs[0].id}.eml").read_bytes()
    parsed = email.message_from_bytes(eml, policy=email.policy.default)
    assert parsed["Message-ID"] == f"<{msgs[0].id}@voucher-engine>"
    assert parsed["To"] == by_key[msgs[0].id].recipient
    assert msgs[0].code in parsed.get_content()
    rows = await fetch(db, "SELECT state, attempts, sent_at FROM deliveries WHERE campaign_id = $1", cid)
    assert all(r["state"] == "sent" and r["attempts"] == 1 and r["sent_at"] for r in rows)
    print(f"2000 emails sent in {elapsed:.2f}s")

    # The same messages again (an issuance re-run): rows are sent, nothing is re-queued or sent.
    assert await enqueue_all(db, services.redis_url, msgs) == 0
    # ... and even entries that reach the stream anyway (a producer crash replay) are skipped.
    from redis.asyncio import Redis

    from engine import delivery

    r = Redis.from_url(services.redis_url)
    try:
        for m in msgs[:50]:
            await r.xadd(keys.stream("email"), {delivery.FIELD: delivery.encode(m)})
    finally:
        await r.aclose()
    await asyncio.sleep(2.0)
    again = receipts_of(pipeline.sinks, prefix)
    assert len(again) == 2000


async def test_sms_and_push_through_the_webhook_sink(pipeline, engine, services):
    db = services.database_url
    cid = await discount_campaign(engine, 0)
    prefix = uid("wh")
    customers = await add_customers(db, prefix, 30)
    sms = messages_for(cid, customers, "sms")
    push = messages_for(cid, customers, "push")
    await enqueue_all(db, services.redis_url, sms + push)
    await wait_states(db, cid, {"sent": 60})
    got = [r for r in pipeline.sinks.outbox.receipts if r["key"] in {m.id for m in sms + push}]
    assert Counter(r["channel"] for r in got) == {"sms": 30, "push": 30}
    assert all(r["status"] == "accepted" for r in got)
    doc = (pipeline.sinks.outbox.root / "sms" / f"{sms[0].id}.json").read_text()
    assert sms[0].code in doc and sms[0].recipient in doc


async def test_templates_render_per_locale_with_fallback(pipeline, engine, services):
    from actors.delivery_queue import enqueue  # noqa: F401  (the contract the test goes through)
    from store import delivery as delivery_store

    db = services.database_url
    cid = await discount_campaign(engine, 0)
    import asyncpg

    pool = await asyncpg.create_pool(db, min_size=1, max_size=2)
    try:
        await delivery_store.put_template(
            pool, cid, "email", "en", "Your code, {{ customer_name }}", "<p>EN {{ code }} {{ discount }}</p>", True
        )
        await delivery_store.put_template(
            pool, cid, "email", "de", "Ihr Gutschein", "<p>DE {{ code }} für {{ customer_name }}</p>", False
        )
        await delivery_store.put_template(
            pool, cid, "email", "de-AT", "Servus", "<p>AT {{ code }}</p>", False
        )
    finally:
        await pool.close()
    prefix = uid("loc")
    groups = {
        "de-AT": await add_customers(db, f"{prefix}-at", 3, locale="de-AT"),
        "de-CH": await add_customers(db, f"{prefix}-ch", 3, locale="de-CH"),  # -> de
        "fr": await add_customers(db, f"{prefix}-fr", 3, locale="fr"),  # -> campaign default en
    }
    # A customer whose name would be markup stays text in the HTML email.
    evil = await add_customers(db, f"{prefix}-x", 1, locale="de")
    evil[0]["name"] = "<script>alert(1)</script>"
    msgs = [m for cs in groups.values() for m in messages_for(cid, cs)] + messages_for(cid, evil)
    await enqueue_all(db, services.redis_url, msgs)
    await wait_states(db, cid, {"sent": len(msgs)})
    root = pipeline.sinks.outbox.root / "email"

    def mail(m: Any) -> Any:
        return email.message_from_bytes((root / f"{m.id}.eml").read_bytes(), policy=email.policy.default)

    for m in messages_for(cid, groups["de-AT"]):
        assert mail(m)["Subject"] == "Servus" and f"AT {m.code}" in mail(m).get_content()
    for m in messages_for(cid, groups["de-CH"]):
        assert mail(m)["Subject"] == "Ihr Gutschein" and f"DE {m.code}" in mail(m).get_content()
    for m in messages_for(cid, groups["fr"]):
        assert mail(m)["Subject"] == f"Your code, {m.name}"
        assert f"EN {m.code} 10%" in mail(m).get_content()
    body = mail(messages_for(cid, evil)[0]).get_content()
    assert "<script>" not in body and "&lt;script&gt;" in body


async def test_builtin_template_when_campaign_has_none(pipeline, engine, services):
    db = services.database_url
    cid = await discount_campaign(engine, 0)
    prefix = uid("bi")
    customers = await add_customers(db, prefix, 2, locale="ja")
    msgs = messages_for(cid, customers)
    await enqueue_all(db, services.redis_url, msgs)
    await wait_states(db, cid, {"sent": 2})
    m = email.message_from_bytes(
        (pipeline.sinks.outbox.root / "email" / f"{msgs[0].id}.eml").read_bytes(),
        policy=email.policy.default,
    )
    assert m["Subject"] == "Your voucher for ten percent"
    assert msgs[0].code in m.get_content() and "10%" in m.get_content()


async def test_rate_limit_is_shared_by_the_workers(pipeline, engine, services):
    """SMS limited to 40/s across both workers: 120 messages take about 2 s or more
    (the bucket starts full with one second's worth)."""

    db = services.database_url
    import msgspec

    pipeline.settings = msgspec.structs.replace(pipeline.settings, delivery_rate_sms=40.0)
    pipeline.restart_workers()
    from redis.asyncio import Redis

    r = Redis.from_url(services.redis_url)
    await r.delete(keys.send_rate("sms"))
    await r.aclose()
    cid = await discount_campaign(engine, 0)
    customers = await add_customers(db, uid("rl"), 120)
    msgs = messages_for(cid, customers, "sms")
    t0 = time.monotonic()
    await enqueue_all(db, services.redis_url, msgs)
    await wait_states(db, cid, {"sent": 120})
    elapsed = time.monotonic() - t0
    assert elapsed >= 1.8, f"120 SMS at 40/s (burst 40) took only {elapsed:.2f}s"
    print(f"120 SMS at 40/s took {elapsed:.2f}s")


async def test_silent_consumers_holding_nothing_are_forgotten(services, engine_settings):
    import msgspec

    from actors.delivery import DeliveryCore, WorkerConfig
    from tests.delivery_support import delivery_settings

    s = delivery_settings(engine_settings, delivery_claim_idle_s=0.1)
    cfg = WorkerConfig(
        settings=msgspec.to_builtins(s),
        dsn=services.database_url,
        redis_url=services.redis_url,
        urls={"push": "http://127.0.0.1:9/push"},
        channels=("push",),
    )
    core = DeliveryCore(cfg, "cleanup-test")
    await core.open()
    try:
        assert core.redis is not None
        stream = keys.stream("push")
        ghost = f"ghost-{uid('c')}"
        await core.redis.xgroup_createconsumer(stream, keys.GROUP, ghost)
        await core._forget_dead_consumers(stream)  # not silent long enough yet
        names = {c["name"] for c in await core.redis.xinfo_consumers(stream, keys.GROUP)}
        assert ghost.encode() in names
        await asyncio.sleep(1.2)  # 10 idle periods of 0.1 s
        await core._forget_dead_consumers(stream)
        names = {c["name"] for c in await core.redis.xinfo_consumers(stream, keys.GROUP)}
        assert ghost.encode() not in names
    finally:
        await core.close()
