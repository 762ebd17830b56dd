"""Helpers of the delivery tests: embedded sinks + delivery workers over the session's
Postgres, Valkey and Ray, customers inserted directly, messages enqueued through the
producer contract (``actors.delivery_queue.enqueue``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
from redis.asyncio import Redis

from actors.delivery_queue import enqueue
from engine.delivery import DeliveryMessage, new_message
from engine.settings import Settings
from ops.sinks import Sinks


def delivery_settings(base: Settings, **overrides: Any) -> Settings:
    """Fast retries and reclaims so tests finish in seconds."""
    fields: dict[str, Any] = {
        "delivery_workers": 2,
        "delivery_batch": 100,
        "delivery_connections": 4,
        "delivery_max_attempts": 4,
        "delivery_backoff_base_s": 0.05,
        "delivery_backoff_max_s": 0.4,
        "delivery_claim_idle_s": 2.0,
        "delivery_send_timeout_s": 5.0,
        "delivery_rate_email": 0.0,
        "delivery_rate_sms": 0.0,
        "delivery_rate_push": 0.0,
        "delivery_failure_min_attempts": 20,
        "delivery_failure_window_s": 60,
    }
    fields.update(overrides)
    return msgspec.structs.replace(base, **fields)


class Pipeline:
    def __init__(self, sinks: Sinks, handles: Any, settings: Settings, dsn: str, redis_url: str) -> None:
        self.sinks = sinks
        self.handles = handles
        self.settings = settings
        self.dsn = dsn
        self.redis_url = redis_url

    def restart_workers(self, n: int | None = None) -> None:
        from actors.delivery import start_delivery

        self.handles.stop()
        self.handles = start_delivery(
            self.settings, self.dsn, self.redis_url, urls=self.handles.urls, workers=n
        )


@contextmanager
def running_pipeline(
    services: Any, settings: Settings, outbox: Path, **overrides: Any
) -> Iterator[Pipeline]:
    from actors.delivery import provider_urls, start_delivery
    from actors.outbound import allowing

    sinks = Sinks(outbox).start()
    s = allowing(delivery_settings(settings, **overrides), [sinks.urls["page"]])
    handles = start_delivery(
        s, services.database_url, services.redis_url, urls=provider_urls(s, sinks.urls)
    )
    p = Pipeline(sinks, handles, s, services.database_url, services.redis_url)
    try:
        yield p
    finally:
        p.handles.stop()
        sinks.stop()


async def add_customers(
    dsn: str, prefix: str, n: int, *, locale: str = "en", email_domain: str = "shop.example"
) -> list[dict[str, Any]]:
    rows = [
        {
            "id": f"{prefix}-{i}",
            "email": f"{prefix}-{i}@{email_domain}",
            "phone": f"+49151{i:08d}",
            "push_token": f"tok-{prefix}-{i}",
            "name": f"Customer {i}",
            "locale": locale,
        }
        for i in range(n)
    ]
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(
            "INSERT INTO customers (id, email, phone, push_token, name, locale, consent_email,"
            " consent_sms, consent_push) VALUES ($1, $2, $3, $4, $5, $6, true, true, true)",
            [(r["id"], r["email"], r["phone"], r["push_token"], r["name"], r["locale"]) for r in rows],
        )
    finally:
        await conn.close()
    return rows


def messages_for(
    campaign_id: str, customers: list[dict[str, Any]], channel: str = "email"
) -> list[DeliveryMessage]:
    field = {"email": "email", "sms": "phone", "push": "push_token"}[channel]
    return [
        new_message(
            campaign_id,
            c["id"],
            channel,  # type: ignore[arg-type]
            c[field],
            f"CODE-{c['id']}",
            locale=c["locale"],
            name=c["name"],
        )
        for c in customers
    ]


async def enqueue_all(dsn: str, redis_url: str, msgs: list[DeliveryMessage], chunk: int = 2000) -> int:
    db = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    redis = Redis.from_url(redis_url)
    try:
        n = 0
        for i in range(0, len(msgs), chunk):
            n += await enqueue(db, redis, msgs[i : i + chunk])
        return n
    finally:
        await redis.aclose()
        await db.close()


async def wait_states(
    dsn: str, campaign_id: str, want: dict[str, int], timeout_s: float = 40.0
) -> dict[str, int]:
    """Poll until the campaign's delivery rows reach ``want`` counts (per state)."""
    deadline = time.monotonic() + timeout_s
    got: dict[str, int] = {}
    while time.monotonic() < deadline:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT state, count(*) AS n FROM deliveries WHERE campaign_id = $1 GROUP BY state",
                campaign_id,
            )
        finally:
            await conn.close()
        got = {r["state"]: int(r["n"]) for r in rows}
        if all(got.get(k, 0) == v for k, v in want.items()):
            return got
        await asyncio.sleep(0.2)
    raise AssertionError(f"delivery states {got} did not reach {want} within {timeout_s} s")


def receipts_of(sinks: Sinks, campaign_prefix: str) -> list[dict[str, Any]]:
    with sinks.outbox._lock:
        return [r for r in sinks.outbox.receipts if (r["to"] or "").startswith(campaign_prefix)]
