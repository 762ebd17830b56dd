"""A redemption (and a reservation, into the redemption it becomes) carries the shop's
metadata to Postgres and back; metadata over 4 KB or not an object is a 422 on the fast
lane too, with nothing written."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.engine_support import campaign_codes, fetch, fetchval
from tests.http_support import admin_headers, create_campaign, discount_body, generate_codes


def test_redemption_and_reservation_metadata(http_api: Any) -> None:
    url, dsn = http_api.url, http_api.database_url
    admin = admin_headers(http_api)
    c = create_campaign(url, admin, discount_body("metadata"))
    generate_codes(url, admin, c["id"], 3)
    httpx.post(f"{url}/v1/campaigns/{c['id']}/activate", headers=admin).raise_for_status()
    a, b, spare = sorted(asyncio.run(campaign_codes(dsn, c["id"])))
    order = {"id": "o-m1", "amount": 5000, "currency": "EUR"}
    meta = {"channel": "pos", "store": 17, "tags": ["a", "b"]}
    r = httpx.post(f"{url}/v1/redemptions", json={"code": a, "order": order, "metadata": meta}, headers=admin)
    assert r.status_code == 201, r.text
    assert r.json()["metadata"] == meta
    rid = r.json()["id"]
    res = httpx.post(
        f"{url}/v1/reservations",
        json={"code": b, "order": {**order, "id": "o-m2"}, "metadata": {"cart": "c-9"}},
        headers=admin,
    )
    assert res.status_code == 201 and res.json()["metadata"] == {"cart": "c-9"}
    conf = httpx.post(f"{url}/v1/reservations/{res.json()['id']}/confirm", headers=admin)
    assert conf.status_code == 201 and conf.json()["metadata"] == {"cart": "c-9"}
    rows = asyncio.run(fetch(dsn, "SELECT id, metadata FROM redemptions WHERE campaign_id = $1 ORDER BY created_at", c["id"]))
    assert [(x[0], x[1] is not None) for x in rows] == [(rid, True), (conf.json()["id"], True)]
    assert '"store": 17' in rows[0][1]

    before = asyncio.run(fetchval(dsn, "SELECT count(*) FROM redemptions WHERE campaign_id = $1", c["id"]))
    for bad in ({"note": "x" * 4100}, "plain", [1, 2], {"": 1}):
        r = httpx.post(f"{url}/v1/redemptions", json={"code": spare, "order": order, "metadata": bad}, headers=admin)
        assert r.status_code == 422, (bad, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert any(e["loc"][-1] == "metadata" or "metadata" in e["loc"] for e in r.json()["errors"]), r.json()
    after = asyncio.run(fetchval(dsn, "SELECT count(*) FROM redemptions WHERE campaign_id = $1", c["id"]))
    assert before == after == 2
