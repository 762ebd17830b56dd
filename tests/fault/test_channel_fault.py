"""A shard killed while HTTP redemptions flow over the gateways' direct lines (Unix sockets,
``actors/shard_socket.py``): calls caught in flight answer 503 (retryable), never 500; retries
with the same Idempotency-Key get exactly one redemption each; once Ray has restarted the
shard, the gateways reconnect to its new socket."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import asyncpg
import httpx
import ray

from engine.routing import shard_of_bucket
from engine.shard_state import route_bucket
from tests.http_support import bearer, flash_sale_body, open_campaign_async

ATTEMPTS = 240


async def _peers(engine: Any, shard: int) -> int:
    """Gateway replicas connected to the shard's direct line."""
    return int((await engine.shard_info())[shard]["channel_peers"])


async def test_shard_killed_under_http_load_over_the_direct_line(http_api: Any, engine: Any) -> None:
    url = http_api.url
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=32)) as client:
        r = await client.post(
            f"{url}/v1/auth/login",
            json={"email": http_api.admin_email, "password": http_api.admin_password},
        )
        admin = bearer(r.json()["access_token"])
        key = (
            await client.post(
                f"{url}/v1/api-keys", json={"name": "kill", "roles": ["integration"]}, headers=admin
            )
        ).json()["key"]
        code = f"KILLLINE{os.urandom(4).hex()}".upper()
        cid = await open_campaign_async(client, url, admin, flash_sale_body("kill over the line", code))

        async def redeem(i: int) -> httpx.Response:
            return await client.post(
                f"{url}/v1/redemptions",
                headers={"X-API-Key": key, "Idempotency-Key": f"{cid}-{i}"},
                json={"code": code, "customer_id": f"c{i}",
                      "order": {"id": f"o{i}", "amount": 4000, "currency": "EUR"}},
            )

        shard = shard_of_bucket(route_bucket(code), engine.n)
        # Warm up until both gateway replicas reach the code's shard over its socket.
        for i in range(100):
            assert (await redeem(-1 - i)).status_code == 201
            if await _peers(engine, shard) == 2:
                break
            await asyncio.sleep(0.05)
        assert await _peers(engine, shard) == 2

        statuses: dict[int, list[int]] = {i: [] for i in range(ATTEMPTS)}
        sem = asyncio.Semaphore(16)

        async def until_answered(i: int) -> None:
            async with sem:
                for _ in range(100):
                    r = await redeem(i)
                    statuses[i].append(r.status_code)
                    if r.status_code != 503:
                        return
                    assert r.json()["code"] == "unavailable"
                    await asyncio.sleep(0.1)

        run = asyncio.gather(*[until_answered(i) for i in range(ATTEMPTS)])
        while sum(1 for s in statuses.values() if s) < ATTEMPTS // 4:
            await asyncio.sleep(0.005)
        assert not run.done(), "the run ended before the kill: the test would prove nothing"
        ray.kill(engine.shards[shard], no_restart=False)
        await run
        retried = sum(1 for s in statuses.values() if len(s) > 1)
        print(f"{retried} of {ATTEMPTS} redemptions were answered 503 first and retried")

        # Every attempt ended with one 201; on the way, only 503s.
        assert all(s[-1] == 201 for s in statuses.values()), statuses
        assert {x for s in statuses.values() for x in s} <= {201, 503}
        # Both gateways are back on the restarted shard's new socket.
        for i in range(100):
            assert (await redeem(10_000 + i)).status_code == 201
            if await _peers(engine, shard) == 2:
                break
            await asyncio.sleep(0.1)
        assert await _peers(engine, shard) == 2

    conn = await asyncpg.connect(http_api.database_url)
    try:
        rows = await conn.fetch(
            "SELECT customer_id, count(*) AS n FROM redemptions WHERE campaign_id = $1"
            " AND customer_id NOT LIKE 'c-%' GROUP BY customer_id",
            cid,
        )
    finally:
        await conn.close()
    per_customer = {r["customer_id"]: r["n"] for r in rows}
    wanted = {f"c{i}" for i in range(ATTEMPTS)}
    assert wanted <= set(per_customer), sorted(wanted - set(per_customer))[:5]
    assert all(per_customer[c] == 1 for c in wanted)  # exactly once each, retries included
