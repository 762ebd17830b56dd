"""The redemption history over HTTP: filters by campaign, code, customer, order and time,
rolled back redemptions with when, metadata, keyset pages checked against Postgres, and
bad input refused with 4xx."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from tests.engine_support import campaign_codes, fetch, uid
from tests.http_support import admin_headers, create_campaign, discount_body, generate_codes


def _history(url: str, headers: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    """Every page of the filtered history."""
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        q = dict(params) | ({"cursor": cursor} if cursor else {})
        r = httpx.get(f"{url}/v1/redemptions", params=q, headers=headers)
        assert r.status_code == 200, r.text
        out += r.json()["data"]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return out


def test_history_filters_rollbacks_and_pages(http_api: Any) -> None:
    url, dsn = http_api.url, http_api.database_url
    admin = admin_headers(http_api)
    cid = create_campaign(url, admin, discount_body("history"))["id"]
    generate_codes(url, admin, cid, 12)
    httpx.post(f"{url}/v1/campaigns/{cid}/activate", headers=admin).raise_for_status()
    codes = sorted(asyncio.run(campaign_codes(dsn, cid)))
    tag = uid("h")
    ids: dict[str, str] = {}
    for i, code in enumerate(codes[:10]):
        order = {"id": f"{tag}-order-{i // 2}", "amount": 5000, "currency": "EUR"}
        body = {"code": code, "order": order, "customer_id": f"{tag}-cus-{i % 3}",
                "metadata": {"n": i, "channel": "pos"}}
        r = httpx.post(f"{url}/v1/redemptions", json=body, headers={**admin, "Idempotency-Key": f"{tag}-{i}"})
        assert r.status_code == 201, r.text
        ids[code] = r.json()["id"]
    rolled = ids[codes[4]]
    r = httpx.post(f"{url}/v1/redemptions/{rolled}/rollback", headers={**admin, "Idempotency-Key": f"{tag}-rb"})
    assert r.status_code == 200, r.text

    # one redemption, rolled back, with its metadata
    r = httpx.get(f"{url}/v1/redemptions/{rolled}", headers=admin)
    assert r.status_code == 200, r.text
    one = r.json()
    assert (one["status"], one["code"], one["campaign_id"]) == ("rolled_back", codes[4], cid)
    assert one["rolled_back_at"] is not None and one["metadata"] == {"n": 4, "channel": "pos"}
    assert one["order_id"] == f"{tag}-order-2" and one["customer_id"] == f"{tag}-cus-1"
    assert one["order_amount"] == 5000 and one["discount_amount"] == 500 and one["currency"] == "EUR"
    fine = httpx.get(f"{url}/v1/redemptions/{ids[codes[0]]}", headers=admin).json()
    assert fine["status"] == "redeemed" and fine["rolled_back_at"] is None

    # a campaign's history, two at a time: every redemption once, in id order, as Postgres has it
    pages = _history(url, admin, campaign_id=cid, limit=2)
    rows = asyncio.run(fetch(dsn, "SELECT id, code, status, customer_id, order_id FROM redemptions"
                                  " WHERE campaign_id = $1 ORDER BY id", cid))
    assert [x["id"] for x in pages] == [r["id"] for r in rows] == sorted(ids.values())
    assert [x["status"] for x in pages] == ["rolled_back" if r["status"] == 1 else "redeemed" for r in rows]

    def found(**params: Any) -> set[str]:
        return {x["id"] for x in _history(url, admin, **params)}

    assert found(order_id=f"{tag}-order-2") == {ids[codes[4]], ids[codes[5]]}
    assert found(customer_id=f"{tag}-cus-0") == {ids[codes[i]] for i in (0, 3, 6, 9)}
    assert found(code=codes[4]) == {rolled}
    assert found(code=f" {codes[4].lower()} ") == {rolled}  # as checkout reads a code
    assert found(code=codes[4], campaign_id=cid, customer_id=f"{tag}-cus-1") == {rolled}
    assert found(code=codes[4], customer_id=f"{tag}-cus-0") == set()
    assert found(code=codes[11]) == set()  # never redeemed
    assert found(campaign_id="cmp_nope") == set()
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert found(campaign_id=cid, since=future) == set()
    assert found(campaign_id=cid, since=past) == set(ids.values())

    # an integration key (a checkout service) may read the history too
    r = httpx.post(f"{url}/v1/api-keys", headers=admin, json={"name": uid("k"), "roles": ["integration"]})
    key = {"X-API-Key": r.json()["key"]}
    r = httpx.get(f"{url}/v1/redemptions", params={"order_id": f"{tag}-order-0"}, headers=key)
    assert r.status_code == 200 and len(r.json()["data"]) == 2


def test_history_refusals(http_api: Any) -> None:
    url = http_api.url
    admin = admin_headers(http_api)
    r = httpx.get(f"{url}/v1/redemptions/red_nope", headers=admin)
    assert r.status_code == 404 and r.json()["code"] == "unknown_redemption"
    for bad in ("garbage", "eyJ4IjoxfQ", "WyJ2IiwiYyIsImsiXQ"):  # the last is a code list's cursor
        r = httpx.get(f"{url}/v1/redemptions", params={"cursor": bad}, headers=admin)
        assert r.status_code == 422 and r.json()["code"] == "invalid_cursor", r.text
    for params in ({"limit": 0}, {"limit": 5000}, {"since": "yesterday"}, {"since": "2030-01-01T00:00:00"},
                   {"order_id": ""}, {"code": "x" * 300}):
        r = httpx.get(f"{url}/v1/redemptions", params=params, headers=admin)
        assert r.status_code == 422, (params, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
    assert httpx.get(f"{url}/v1/redemptions").status_code == 401
