"""Helpers shared by the integration and fault tiers: one engine per test session, direct
database checks, and concurrent load with bounded loops."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from actors.client import VoucherEngine
from engine import errors
from engine.campaigns import Campaign, new_campaign, transition
from engine.shard_state import Outcome, RedeemRequest
from store.campaigns import insert_campaign


async def stored_campaign(dsn: str, *, paused: bool = False, **fields: Any) -> Campaign:
    """An active (or paused) campaign written straight to Postgres, for shards driven
    in-process without a coordinator."""
    now = datetime.now(UTC)
    fields.setdefault("id", uid("stored"))
    fields.setdefault("name", "stored")
    fields.setdefault("currency", "EUR")
    c = transition(new_campaign(now=now, **fields), "activate", now)
    if paused:
        c = transition(c, "pause", now)
    conn = await asyncpg.connect(dsn)
    try:
        await insert_campaign(conn, c, fence=None)
    finally:
        await conn.close()
    return c


def uid(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


def later(days: int = 30) -> datetime:
    return datetime.now(UTC) + timedelta(days=days)


async def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def fetchval(dsn: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def campaign_codes(dsn: str, campaign_id: str) -> list[str]:
    rows = await fetch(
        dsn, "SELECT code FROM vouchers WHERE campaign_id = $1 ORDER BY code", campaign_id
    )
    return [r["code"] for r in rows]


async def discount_campaign(engine: VoucherEngine, codes: int, **extra: Any) -> str:
    c = await engine.create_campaign(
        id=uid("disc"),
        name="ten percent",
        type="discount",
        currency="EUR",
        discount={"kind": "percent", "value": 10},
        ends_at=later(),
        **extra,
    )
    if codes:
        await engine.generate(c.id, codes)
    await engine.activate(c.id)
    return c.id


async def shared_code_campaign(
    engine: VoucherEngine,
    code: str,
    *,
    id_prefix: str,
    name: str,
    discount: dict[str, Any],
    limits: dict[str, Any] | None = None,
) -> str:
    """An active shared-code campaign on ``code``, ending in thirty days; its id."""
    c = await engine.create_campaign(
        id=uid(id_prefix),
        name=name,
        type="shared_code",
        currency="EUR",
        discount=discount,
        limits=limits,
        shared_code=code,
        ends_at=later(),
    )
    await engine.activate(c.id)
    return c.id


_OUTCOMES = msgspec.msgpack.Decoder(list[Outcome])


async def redeem_on_core(core: Any, *reqs: RedeemRequest) -> list[Outcome]:
    """Redeem ``reqs`` on a shard core driven in-process, through its msgpack interface."""
    return _OUTCOMES.decode(await core.redeem_many(msgspec.msgpack.encode(list(reqs))))


async def redeem_with_retry(
    engine: VoucherEngine, reqs: list[RedeemRequest], attempts: int = 200
) -> list[Outcome]:
    """Redeem a batch; while a shard is down, retry the same requests (same idempotency
    keys) — the retry loop is bounded."""
    for _ in range(attempts):
        try:
            return await engine.redeem_many(reqs)
        except errors.Unavailable:
            await asyncio.sleep(0.1)
    raise AssertionError("shard never came back")


async def concurrent_batches(
    engine: VoucherEngine, reqs: list[RedeemRequest], batch: int, parallel: int
) -> list[Outcome]:
    """Send ``reqs`` as batches of ``batch`` with ``parallel`` callers in flight."""
    out: list[Outcome | None] = [None] * len(reqs)
    sem = asyncio.Semaphore(parallel)

    async def one(start: int) -> None:
        async with sem:
            chunk = reqs[start : start + batch]
            res = await redeem_with_retry(engine, chunk)
            out[start : start + len(chunk)] = res

    await asyncio.gather(*[one(i) for i in range(0, len(reqs), batch)])
    assert all(o is not None for o in out)
    return [o for o in out if o is not None]
