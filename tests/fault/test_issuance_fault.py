"""Kill a shard actor in the middle of an issuance: the job retries the batch while the
shard reloads, and ends with exactly one code and one message per customer."""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import asyncpg
import httpx
import pytest
import ray

from tests.http_support import admin_headers

pytestmark = pytest.mark.fault


def test_shard_killed_mid_issuance(http_api: Any, engine: Any, services: Any) -> None:
    h = admin_headers(http_api)
    url = http_api.url
    p = f"fault-{os.urandom(4).hex()}"
    n = 20_000
    body = "\n".join(
        json.dumps({"id": f"{p}-{i:05d}", "email": f"{i}@example.com", "consent_email": True, "tags": [p]})
        for i in range(n)
    ).encode()
    r = httpx.post(f"{url}/v1/customers/import", content=body, headers={**h, "Content-Type": "application/x-ndjson"}, timeout=120)
    assert r.json()["imported"] == n, r.text
    c = httpx.post(
        f"{url}/v1/campaigns",
        json={"name": "fault", "type": "discount", "currency": "EUR", "discount": {"kind": "percent", "value": 5}},
        headers=h,
    ).json()
    gen = httpx.post(f"{url}/v1/campaigns/{c['id']}/generate", json={"count": n + 2000}, headers=h).json()
    while httpx.get(f"{url}/v1/jobs/{gen['id']}", headers=h).json()["state"] == "running":
        time.sleep(0.1)
    job = httpx.post(
        f"{url}/v1/campaigns/{c['id']}/issuance",
        json={"selection": {"tag": p}, "channels": ["email"]},
        headers=h,
    ).json()
    killed = False
    deadline = time.monotonic() + 120
    while True:
        job = httpx.get(f"{url}/v1/jobs/{job['id']}", headers=h).json()
        if not killed and job["counts"]["selected"] >= 2000:
            assert job["state"] == "running", "the job ended before the kill: the test would prove nothing"
            ray.kill(engine.shards[1], no_restart=False)
            killed = True
        if job["state"] != "running":
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
    assert killed
    assert job["state"] == "done", job["error"]
    assert job["counts"]["assigned"] == n and job["counts"]["exhausted"] == 0, job

    async def check() -> tuple[int, int, int, int]:
        conn = await asyncpg.connect(services.database_url)
        try:
            row = await conn.fetchrow(
                "SELECT count(*) AS n, count(DISTINCT code) AS codes, count(DISTINCT customer_id) AS custs"
                " FROM vouchers WHERE campaign_id = $1 AND customer_id IS NOT NULL",
                c["id"],
            )
            dels = await conn.fetchval(
                "SELECT count(DISTINCT customer_id) FROM deliveries WHERE campaign_id = $1", c["id"]
            )
            return row["n"], row["codes"], row["custs"], dels
        finally:
            await conn.close()

    assert asyncio.run(check()) == (n, n, n, n)
    # and a re-run after the restart adds nothing
    again = httpx.post(
        f"{url}/v1/campaigns/{c['id']}/issuance",
        json={"selection": {"tag": p}, "channels": ["email"]},
        headers=h,
    ).json()
    while again["state"] == "running":
        time.sleep(0.1)
        again = httpx.get(f"{url}/v1/jobs/{again['id']}", headers=h).json()
    assert again["counts"]["new_codes"] == 0 and again["counts"]["enqueued"] == 0, again
