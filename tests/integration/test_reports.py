"""Reporting rollups on the real engine and Postgres: they follow redemptions, rollbacks,
assignments, gift card spending and deliveries incrementally (change logs written in the
shards' group commits, folded by the refresher), and always agree with a full recount.
Then the reports endpoints over HTTP: roles, CSV export, bad input."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest

from engine.reports import CodeCounts, Counts
from engine.shard_state import RedeemRequest
from store import reports as store
from tests.engine_support import later, uid
from tests.http_support import admin_headers, login

pytestmark = pytest.mark.integration


async def _settle(conn: asyncpg.Connection) -> None:
    """Fold everything pending (another refresher may hold the lock: then wait for it)."""
    for _ in range(200):
        if await store.refresh(conn) is not None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the refresh lock was never free")


async def _customers(conn: asyncpg.Connection, rows: list[tuple[str, list[str]]]) -> None:
    await conn.executemany(
        "INSERT INTO customers (id, email, tags) VALUES ($1, $2, $3)",
        [(cid, f"{cid}@shop.example", tags) for cid, tags in rows],
    )


async def _agree(conn: asyncpg.Connection, cid: str) -> dict[str, Any]:
    await _settle(conn)
    full = await store.recount(conn, cid)
    rolled = await store.rollup(conn, cid)
    assert rolled == full
    return rolled


async def test_rollups_follow_redemptions_rollbacks_and_deliveries(engine, services):
    conn = await asyncpg.connect(services.database_url)
    try:
        c = await engine.create_campaign(
            id=uid("rep"),
            name="report test",
            type="discount",
            currency="EUR",
            discount={"kind": "percent", "value": 10, "max": 700},
            ends_at=later(),
            timezone="Europe/Berlin",
        )
        cid = c.id
        await engine.generate(cid, 120)
        await engine.activate(cid)
        empty = await _agree(conn, cid)
        assert empty["codes"] == CodeCounts(available=120)
        assert empty["totals"] == Counts() and empty["minutes"] == []

        people = [(f"{cid}-c{i}", ["vip"] if i % 3 == 0 else (["new", "eu"] if i % 3 == 1 else []))
                  for i in range(40)]
        await _customers(conn, people)
        assigned = await engine.assign_many(cid, [p for p, _ in people])
        codes = {a.assignment.customer_id: a.assignment.code for a in assigned}
        reqs = [
            RedeemRequest(code=codes[p], amount=2000 + 500 * i, currency="EUR", customer_id=p)
            for i, (p, _) in enumerate(people[:25])
        ]
        outs = await engine.redeem_many(reqs)
        reds = [o.redemption for o in outs]
        assert all(r is not None for r in reds)
        await engine.flush()
        first = await _agree(conn, cid)
        assert first["codes"] == CodeCounts(available=80, assigned=15, redeemed=25)
        discounts = [min(700, (2000 + 500 * i) // 10) for i in range(25)]
        assert first["totals"] == Counts(25, 0, sum(discounts), sum(2000 + 500 * i for i in range(25)))
        assert first["first_redemption_at"] == min(r.created_at for r in reds)  # type: ignore[union-attr]
        # vip: customers 0, 3, ..., 24 (9); new and eu: 1, 4, ..., 22 (8 each); untagged: 8
        assert {s: v.redemptions for s, v in first["segments"].items()} == {
            "vip": 9, "new": 8, "eu": 8, "(untagged)": 8
        }

        # rollbacks are updates of old rows: the minute they were made loses them
        for r in reds[:6]:
            await engine.rollback(r.id)  # type: ignore[union-attr]
        more = await engine.redeem_many(
            [RedeemRequest(code=codes[p], amount=9000, currency="EUR", customer_id=p) for p, _ in people[25:30]]
        )
        assert all(o.redemption is not None for o in more)
        # anonymous redemption of an unassigned code
        free = await conn.fetchval(
            "SELECT code FROM vouchers WHERE campaign_id = $1 AND status = 0 LIMIT 1", cid
        )
        anon = await engine.redeem(RedeemRequest(code=free, amount=3000, currency="EUR"))
        await engine.flush()
        second = await _agree(conn, cid)
        assert second["totals"].redemptions == 31 and second["totals"].rolled_back == 6
        assert second["totals"].net == 25
        assert second["codes"] == CodeCounts(available=79, assigned=16, redeemed=25)
        assert second["segments"]["(anonymous)"] == Counts(1, 0, 300, 3000)
        assert anon.customer_id is None

        # deliveries written by hand (the delivery workers write the same rows)
        await conn.executemany(
            "INSERT INTO deliveries (id, campaign_id, customer_id, channel, recipient, code, state)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            [
                (f"{cid}-d{i}", cid, p, ("email", "sms", "push")[i % 3], "x", codes[p],
                 "sent" if i % 4 else "failed")
                for i, (p, _) in enumerate(people)
            ],
        )
        await conn.execute(
            "UPDATE deliveries SET state = 'dead' WHERE campaign_id = $1 AND state = 'failed'"
            " AND channel = 'email'",
            cid,
        )
        third = await _agree(conn, cid)
        assert sum(third["channels"].values()) == 40
        assert third["channels"][("email", "dead")] == 4  # i = 0, 12, 24, 36
        assert ("email", "failed") not in third["channels"]
    finally:
        await conn.close()


async def test_gift_card_balance_and_shared_code(engine, services):
    conn = await asyncpg.connect(services.database_url)
    try:
        g = await engine.create_campaign(
            id=uid("gift"), name="gift", type="gift_card", currency="EUR", gift_balance=5000,
            ends_at=later(),
        )
        await engine.generate(g.id, 200)  # the customer's shard must have cards in its bank
        await engine.activate(g.id)
        a = await engine.assign(g.id, f"{g.id}-buyer")
        r1 = await engine.redeem(RedeemRequest(code=a.code, amount=1200, currency="EUR", customer_id=a.customer_id))
        await engine.redeem(RedeemRequest(code=a.code, amount=9999, currency="EUR", customer_id=a.customer_id))
        await engine.rollback(r1.id)
        await engine.flush()
        got = await _agree(conn, g.id)
        stats = await engine.stats(g.id)
        # 199 untouched cards + this one at 1200 (5000 spent, then 1200 given back)
        assert got["codes"].gift_balance == stats.gift_balance_outstanding == 199 * 5000 + 1200
        assert got["totals"] == Counts(2, 1, 3800, 9999)  # 1200 + 3800 spent, 1200 back

        s = await engine.create_campaign(
            id=uid("shared"), name="shared", type="shared_code", currency="EUR",
            discount={"kind": "amount", "value": 500}, shared_code=uid("SHR").upper(),
            ends_at=later(),
        )
        await engine.activate(s.id)
        rs = await engine.redeem_many(
            [RedeemRequest(code=s.shared_code or "", amount=4000, currency="EUR") for _ in range(7)]
        )
        await engine.rollback(rs[0].redemption.id)  # type: ignore[union-attr]
        await engine.flush()
        got = await _agree(conn, s.id)
        assert got["totals"] == Counts(7, 1, 3000, 24000)
        assert got["codes"] == CodeCounts(available=1)
    finally:
        await conn.close()


async def test_refresh_folds_the_log_not_the_base_tables(engine, services):
    """The rollups are the sum of what the change log carried: a log row for a campaign
    with no base rows at all shows up in the rollups, and the log is emptied."""
    conn = await asyncpg.connect(services.database_url)
    try:
        ghost = uid("ghost")
        minute = datetime(2026, 3, 29, 0, 59, tzinfo=UTC)
        await conn.execute(
            "INSERT INTO report_redemption_log (campaign_id, minute, first_at, redemptions,"
            " rolled_back, discount, order_amount, customers, c_redemptions, c_rolled_back,"
            " c_discount, c_order) VALUES ($1, $2, $2, 3, 1, 200, 9000, ARRAY[NULL, 'x'],"
            " ARRAY[1, 2], ARRAY[0, 1], ARRAY[50, 150], ARRAY[4000, 5000])",
            ghost,
            minute,
        )
        await _settle(conn)
        assert await conn.fetchval("SELECT count(*) FROM report_redemption_log WHERE campaign_id = $1", ghost) == 0
        rolled = await store.rollup(conn, ghost)
        assert rolled["minutes"] == [(minute, Counts(3, 1, 200, 9000))]
        assert rolled["totals"] == Counts(3, 1, 200, 9000)
        assert rolled["segments"] == {"(anonymous)": Counts(1, 0, 50, 4000), "(untagged)": Counts(2, 1, 150, 5000)}
        assert (await store.recount(conn, ghost))["totals"] == Counts()
    finally:
        await conn.close()


# --- HTTP --------------------------------------------------------------------------------


def _user(api: Any, admin: dict[str, str], role: str) -> dict[str, str]:
    email = f"{uid(role)}@shop.example"
    r = httpx.post(f"{api.url}/v1/auth/register", json={"email": email, "password": "a-long-password", "name": role})
    assert r.status_code == 201, r.text
    if role != "customer":
        r = httpx.put(f"{api.url}/v1/users/{r.json()['id']}/roles", json={"roles": [role]}, headers=admin)
        assert r.status_code == 200, r.text
    return login(api.url, email, "a-long-password")


def _wait_for(check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.2)


def test_reports_over_http(http_api, engine, services):
    api = http_api
    admin = admin_headers(api)
    analyst = _user(api, admin, "analyst")
    url = api.url

    c = httpx.post(
        f"{url}/v1/campaigns",
        json={
            "name": "http report", "type": "discount", "currency": "EUR",
            "discount": {"kind": "amount", "value": 250}, "timezone": "America/New_York",
            "ends_at": (datetime.now(UTC) + timedelta(days=5)).isoformat(),
        },
        headers=admin,
    ).json()
    cid = c["id"]
    job = httpx.post(f"{url}/v1/campaigns/{cid}/generate", json={"count": 30}, headers=admin).json()
    _wait_for(lambda: httpx.get(f"{url}/v1/jobs/{job['id']}", headers=admin).json()["state"] == "done")
    httpx.post(f"{url}/v1/campaigns/{cid}/activate", headers=admin).raise_for_status()

    async def work() -> list[datetime]:
        out = await engine.assign_many(cid, [f"{cid}-p{i}" for i in range(12)])
        codes = [o.assignment.code for o in out]
        reds = await engine.redeem_many(
            [RedeemRequest(code=code, amount=1000, currency="EUR", customer_id=f"{cid}-p{i}")
             for i, code in enumerate(codes[:8])]
        )
        await engine.rollback(reds[0].redemption.id)  # type: ignore[union-attr]
        await engine.flush()
        return [o.redemption.created_at for o in reds]  # type: ignore[union-attr]

    made_at = asyncio.run(work())

    # the Reports replicas' periodic refresh picks it up
    def ready() -> Any:
        r = httpx.get(f"{url}/v1/reports/campaigns/{cid}", headers=analyst)
        assert r.status_code == 200, r.text
        body = r.json()
        return body if body["redemptions"]["net_redemptions"] == 7 else None

    body = _wait_for(ready)
    assert body["funnel"] == {"generated": 30, "assigned": 12, "delivered": 0, "redeemed": 7}
    assert body["money"]["discount_given"] == 7 * 250
    assert body["money"]["order_value_influenced"] == 7 * 1000
    assert body["rates"]["redemption_rate"] == pytest.approx(7 / 12)
    assert body["rates"]["rollback_rate"] == pytest.approx(1 / 8)
    assert body["time_to_first_redemption_s"] >= 0

    ts = httpx.get(f"{url}/v1/reports/campaigns/{cid}/timeseries?bucket=minute", headers=analyst).json()
    assert sum(r["redemptions"] for r in ts["rows"]) == 8
    assert sum(r["net_redemptions"] for r in ts["rows"]) == 7
    hours = httpx.get(f"{url}/v1/reports/campaigns/{cid}/hours", headers=analyst).json()
    assert len(hours["rows"]) == 24 and sum(r["net_redemptions"] for r in hours["rows"]) == 7
    ny = ZoneInfo("America/New_York")
    expected = Counter(t.astimezone(ny).hour for t in made_at)
    assert {r["hour"]: r["redemptions"] for r in hours["rows"] if r["redemptions"]} == expected
    segs = httpx.get(f"{url}/v1/reports/campaigns/{cid}/segments", headers=analyst).json()
    assert segs["rows"] == [
        {"segment": "(untagged)", "redemptions": 8, "rolled_back": 1, "net_redemptions": 7,
         "discount": 1750, "order_amount": 7000}
    ]
    chans = httpx.get(f"{url}/v1/reports/campaigns/{cid}/channels", headers=analyst).json()
    assert chans["rows"] == []
    live = httpx.get(f"{url}/v1/reports/campaigns/{cid}/live", headers=analyst).json()
    assert live["redemptions"] == 8 and live["rollbacks"] == 1 and live["remaining"] == 30 - 7
    overview = httpx.get(f"{url}/v1/reports/campaigns", headers=analyst).json()
    mine = [r for r in overview["rows"] if r["id"] == cid]
    assert mine and mine[0]["net_redemptions"] == 7 and mine[0]["generated"] == 30
    # money adds up per currency only
    assert overview["totals"]["by_currency"]["EUR"]["discount"] >= 1750
    assert "discount" not in overview["totals"]

    # CSV: ?format=csv and Accept: text/csv, parsed back
    r = httpx.get(f"{url}/v1/reports/campaigns/{cid}/timeseries?bucket=minute&format=csv", headers=analyst)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert sum(int(x["redemptions"]) for x in rows) == 8
    r = httpx.get(f"{url}/v1/reports/campaigns/{cid}", headers={**analyst, "Accept": "text/csv"})
    (row,) = list(csv.DictReader(io.StringIO(r.text)))
    assert row["funnel.generated"] == "30" and row["funnel.redeemed"] == "7"
    assert row["campaign.name"] == "http report"
    r = httpx.get(f"{url}/v1/reports/campaigns?format=csv", headers=analyst)
    assert any(x["id"] == cid for x in csv.DictReader(io.StringIO(r.text)))

    # roles: analyst and up read; integration and customer are refused; no credentials 401
    for role in ("integration", "customer"):
        h = _user(api, admin, role)
        for path in ("", f"/{cid}", f"/{cid}/timeseries", f"/{cid}/live", f"/{cid}/channels"):
            r = httpx.get(f"{url}/v1/reports/campaigns{path}", headers=h)
            assert r.status_code == 403, (role, path, r.text)
    assert httpx.get(f"{url}/v1/reports/campaigns").status_code == 401
    assert httpx.get(f"{url}/v1/reports/campaigns/{cid}", headers=_user(api, admin, "manager")).status_code == 200

    # bad input: problems, never a 500
    r = httpx.get(f"{url}/v1/reports/campaigns/nope-{cid}", headers=analyst)
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")
    assert httpx.get(f"{url}/v1/reports/campaigns/{cid}/timeseries?bucket=week", headers=analyst).status_code == 422
    assert httpx.get(f"{url}/v1/reports/campaigns/{cid}?format=xml", headers=analyst).status_code == 422
    r = httpx.get(
        f"{url}/v1/reports/campaigns/{cid}/timeseries",
        params={"bucket": "minute", "since": "2026-01-01T00:00:00"},
        headers=analyst,
    )
    assert r.status_code == 422 and "offset" in r.json()["detail"]
    r = httpx.get(
        f"{url}/v1/reports/campaigns/{cid}/timeseries",
        params={"bucket": "minute", "since": "2020-01-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
        headers=analyst,
    )
    assert r.status_code == 422 and "buckets" in r.json()["detail"]
    r = httpx.get(
        f"{url}/v1/reports/campaigns/{cid}/timeseries",
        params={"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
        headers=analyst,
    )
    assert r.status_code == 422
