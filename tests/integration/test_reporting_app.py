"""The Streamlit reporting app, driven by Streamlit's own harness (AppTest) against the
running HTTP API: log in, open a campaign, and read the numbers the funnel and the time
series show. Also: the demo data keeps the rollups exact."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from engine.shard_state import RedeemRequest
from store import reports as store
from tests.engine_support import uid
from tests.http_support import admin_headers

pytestmark = pytest.mark.integration

APP = str(Path(__file__).resolve().parents[2] / "reporting" / "app.py")


def analyst_user(api: Any) -> tuple[str, str]:
    admin = admin_headers(api)
    email, password = f"{uid('analyst')}@shop.example", "analyst-password"
    r = httpx.post(f"{api.url}/v1/auth/register", json={"email": email, "password": password, "name": "A"})
    assert r.status_code == 201, r.text
    r = httpx.put(f"{api.url}/v1/users/{r.json()['id']}/roles", json={"roles": ["analyst"]}, headers=admin)
    assert r.status_code == 200, r.text
    return email, password


async def settle(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(200):
            if await store.refresh(conn) is not None:
                return
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def known_campaign(engine: Any, dsn: str, name: str) -> str:
    """30 codes, 12 assigned, 9 deliveries sent (3 failed), 8 redeemed, 1 rolled back."""
    c = await engine.create_campaign(
        id=uid("app"), name=name, type="discount", currency="EUR",
        discount={"kind": "amount", "value": 250}, timezone="Europe/Berlin",
        ends_at=datetime.now(UTC) + timedelta(days=3),
    )
    await engine.generate(c.id, 30)
    await engine.activate(c.id)
    outs = await engine.assign_many(c.id, [f"{c.id}-p{i}" for i in range(12)])
    codes = [o.assignment.code for o in outs]
    reds = await engine.redeem_many(
        [RedeemRequest(code=code, amount=1000, currency="EUR", customer_id=f"{c.id}-p{i}")
         for i, code in enumerate(codes[:8])]
    )
    await engine.rollback(reds[0].redemption.id)
    await engine.flush()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(
            "INSERT INTO deliveries (id, campaign_id, customer_id, channel, recipient, code, state)"
            " VALUES ($1, $2, $3, $4, 'r', $5, $6)",
            [(f"{c.id}-d{i}", c.id, f"{c.id}-p{i}", "email" if i < 8 else "sms", codes[i],
              "failed" if i in (0, 8, 9) else "sent") for i in range(12)],
        )
    finally:
        await conn.close()
    await settle(dsn)
    return c.id


def chart_data(el: Any) -> list[dict[str, Any]]:
    """The rows an Altair chart element carries (its Arrow datasets)."""
    rows: list[dict[str, Any]] = []
    for ds in el.proto.datasets:
        rows += pa.ipc.open_stream(ds.data.data).read_all().to_pylist()
    return rows


def charts(at: AppTest) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    return [(json.loads(el.proto.spec), chart_data(el)) for el in at.get("vega_lite_chart")]


def test_app_login_campaign_funnel_and_timeseries(http_api, engine, services, monkeypatch):
    name = f"App test {uid('c')}"
    cid = asyncio.run(known_campaign(engine, services.database_url, name))
    email, password = analyst_user(http_api)
    monkeypatch.setenv("VOUCHER_API_URL", http_api.url)

    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception
    assert at.title[0].value == "Voucher engine reports"
    at.text_input(key="email").input(email)
    at.text_input(key="password").input("wrong-password")
    at.button[0].click()
    at.run()
    assert "Login failed" in at.error[0].value and "token" not in at.session_state

    at.text_input(key="password").input(password)
    at.button[0].click()
    at.run()
    assert not at.exception and not at.error
    assert at.session_state["token"]
    # overview: our campaign is in the table
    assert at.header[0].value == "All campaigns"
    table = at.dataframe[0].value
    assert name in set(table["name"])

    at.query_params["campaign"] = cid
    at.sidebar.radio(key="page").set_value("Campaign")
    at.run()
    assert not at.exception and not at.error
    assert at.header[0].value == name
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Generated"] == "30"
    assert metrics["Assigned"] == "12"
    assert metrics["Delivered"] == "9"
    assert metrics["Redeemed"] == "7"
    assert metrics["Rolled back"] == "1"
    assert metrics["Redemption rate"] == "58.3 %"  # 7 / 12
    assert metrics["Discount given"] == "17.50 EUR"

    drawn = charts(at)
    funnel = next(rows for spec, rows in drawn if any("stage" in r for r in rows))
    assert {r["stage"]: r["count"] for r in funnel} == {
        "generated": 30, "assigned": 12, "delivered": 9, "redeemed": 7
    }
    series = next(rows for spec, rows in drawn if any(r.get("series") == "net_redemptions" for r in rows))
    assert sum(r["count"] for r in series if r["series"] == "net_redemptions") == 7
    assert sum(r["count"] for r in series if r["series"] == "rolled_back") == 1
    assert any("8 redemptions in" in c.value for c in at.caption)
    channels = next(rows for spec, rows in drawn if any(r.get("state") == "failed" for r in rows))
    by = {(r["channel"], r["state"]): r["messages"] for r in channels}
    assert by[("email", "sent")] == 7 and by[("email", "failed")] == 1
    assert by[("sms", "sent")] == 2 and by[("sms", "failed")] == 2

    # minute buckets: the same eight redemptions
    at.radio(key="bucket").set_value("minute")
    at.run()
    assert not at.exception
    series = next(rows for spec, rows in charts(at) if any(r.get("series") == "net_redemptions" for r in rows))
    assert sum(r["count"] for r in series if r["series"] == "net_redemptions") == 7

    # live view: counters straight from the shards
    at.sidebar.radio(key="page").set_value("Live flash sale")
    at.run()
    at.sidebar.selectbox(key="campaign-Live flash sale").set_value(cid)
    at.run()
    assert not at.exception and not at.error
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Redeemed"] == "7" and metrics["Remaining"] == "23"


def test_demo_data_rollups_match_a_full_recount(engine, services):
    from ops.demo_data import create_demo_data

    made = asyncio.run(
        create_demo_data(engine, services.database_url, scale=0.05, days=3, seed=5, say=lambda s: None)
    )
    assert len(made["campaigns"]) == 8 and made["flash"] is not None

    async def check() -> None:
        await settle(services.database_url)
        conn = await asyncpg.connect(services.database_url)
        try:
            types = set()
            for cid in made["campaigns"]:
                full = await store.recount(conn, cid)
                assert await store.rollup(conn, cid) == full, cid
                types.add(await conn.fetchval("SELECT type FROM campaigns WHERE id = $1", cid))
                if not cid.startswith("demo-flashsale"):
                    # history spread over the past days, not all now
                    days = {m.date() for m, _ in full["minutes"]}
                    assert full["totals"].redemptions == 0 or len(days) >= 2, cid
            assert types == {"discount", "gift_card", "shared_code", "flash_sale"}
        finally:
            await conn.close()

    asyncio.run(check())
