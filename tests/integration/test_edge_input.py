"""Input Postgres cannot store never reaches a shard: a NUL character or an unpaired
surrogate in a checkout (customer id, order id, code, idempotency key), on the fast lane or
the FastAPI route, is a 422 naming the field, and the shard owning the code keeps serving:
a redemption right after is acknowledged, and Postgres holds exactly the acknowledged ones.
The same for the other inputs that used to answer 500: a template body, the customers
list's tag filter, a notification id past 64 bits."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from tests.http_support import login

pytestmark = pytest.mark.integration


def _assert_refused(r: httpx.Response, loc: list[Any]) -> None:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["type"].endswith("/validation-error")
    assert any(e["loc"] == loc for e in body["errors"]), body


def _chunked(data: bytes) -> Any:
    # no Content-Length: the fast lane hands the request to the FastAPI route
    yield data[:7]
    yield data[7:]


async def test_unstorable_checkout_is_refused_and_the_shard_keeps_serving(http_api: Any) -> None:
    url = http_api.url
    admin = login(url, http_api.admin_email, http_api.admin_password)
    key = httpx.post(f"{url}/v1/api-keys", json={"name": "nul", "roles": ["integration"]}, headers=admin)
    assert key.status_code == 201, key.text
    integ = {"X-API-Key": key.json()["key"], "Content-Type": "application/json"}
    code = f"NUL{os.urandom(4).hex()}".upper()
    r = httpx.post(
        f"{url}/v1/campaigns",
        headers=admin,
        json={
            "name": "nul", "type": "shared_code", "currency": "EUR", "shared_code": code,
            "discount": {"kind": "amount", "value": 100}, "limits": {"total": 1000},
            "starts_at": (datetime.now(UTC) - timedelta(minutes=1)).isoformat(),
            "ends_at": (datetime.now(UTC) + timedelta(days=1)).isoformat(),
        },
    )
    assert r.status_code == 201, r.text
    cid = r.json()["id"]
    httpx.post(f"{url}/v1/campaigns/{cid}/activate", headers=admin).raise_for_status()

    def checkout(customer: str = "shopper", order: str = "order-1", at: str = code) -> dict[str, Any]:
        return {"code": at, "customer_id": customer, "order": {"id": order, "amount": 5000, "currency": "EUR"}}

    acked = 0

    def redeem_ok(i: int) -> None:
        nonlocal acked
        ok = httpx.post(f"{url}/v1/redemptions", json=checkout(f"ok-{i}", f"o-{i}"), headers=integ)
        assert ok.status_code == 201, ok.text
        acked += 1

    redeem_ok(0)
    bad_bodies = [
        (checkout(customer="evil\x00"), ["body", "customer_id"]),
        (checkout(order="o\x00rder"), ["body", "order", "id"]),
        (checkout(at=code + "\x00"), ["body", "code"]),
    ]
    for i, (body, loc) in enumerate(bad_bodies):
        raw = json.dumps(body).encode()  # "\u0000" on the wire, as a client sends it
        for op in ("redemptions", "reservations", "validations"):
            _assert_refused(httpx.post(f"{url}/v1/{op}", content=raw, headers=integ), loc)  # fast lane
            _assert_refused(httpx.post(f"{url}/v1/{op}", content=_chunked(raw), headers=integ), loc)
        redeem_ok(i + 1)  # the code's shard still serves, right after
    # an unpaired surrogate: valid JSON, not storable text
    raw = json.dumps(checkout()).replace("order-1", "order-\\ud800").encode()
    _assert_refused(httpx.post(f"{url}/v1/redemptions", content=raw, headers=integ), ["body", "order", "id"])
    # the idempotency key is stored with the redemption: bounded and checked too
    long_key = httpx.post(f"{url}/v1/redemptions", json=checkout(), headers={**integ, "Idempotency-Key": "k" * 256})
    assert long_key.status_code == 422, long_key.text
    redeem_ok(99)

    conn = await asyncpg.connect(http_api.database_url)
    try:
        stored = await conn.fetchval("SELECT count(*) FROM redemptions WHERE campaign_id = $1", cid)
    finally:
        await conn.close()
    assert stored == acked == 5


def test_other_unstorable_inputs_are_refused(http_api: Any) -> None:
    url = http_api.url
    admin = login(url, http_api.admin_email, http_api.admin_password)
    r = httpx.post(
        f"{url}/v1/campaigns", headers=admin,
        json={"name": "tpl", "type": "discount", "discount": {"kind": "percent", "value": 5}},
    )
    assert r.status_code == 201, r.text
    cid = r.json()["id"]
    template = {"locale": "en", "subject": "Hi", "body": "Your code: {{ code }}\x00"}
    _assert_refused(httpx.put(f"{url}/v1/campaigns/{cid}/templates/email", json=template, headers=admin), ["body", "body"])
    template["body"] = "Your code: {{ code }}"
    ok = httpx.put(f"{url}/v1/campaigns/{cid}/templates/email", json=template, headers=admin)
    assert ok.status_code == 200, ok.text

    _assert_refused(httpx.get(f"{url}/v1/customers", params={"tag": "vip\x00"}, headers=admin), ["query", "tag"])
    assert httpx.get(f"{url}/v1/customers", params={"tag": "vip"}, headers=admin).status_code == 200
    _assert_refused(httpx.get(f"{url}/v1/customers/c%00x", headers=admin), ["path", "customer_id"])
    for path in (f"/v1/notifications/{2**64}/read", f"/v1/notifications/{2**63}/read"):
        _assert_refused(httpx.post(f"{url}{path}", headers=admin), ["path", "notification_id"])
    _assert_refused(httpx.get(f"{url}/v1/notifications/{2**64}/deliveries", headers=admin), ["path", "notification_id"])
    assert httpx.post(f"{url}/v1/notifications/{2**63 - 1}/read", headers=admin).status_code == 404
    # integers are JSON integers
    r = httpx.post(f"{url}/v1/campaigns/{cid}/generate", json={"count": "3"}, headers=admin)
    _assert_refused(r, ["body", "count"])
    # a 405 lists every method of the path
    r = httpx.request("OPTIONS", f"{url}/v1/campaigns", headers=admin)
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
