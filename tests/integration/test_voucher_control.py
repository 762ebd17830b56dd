"""Control of single codes over HTTP: a code switched off is refused on every path, also
after its shard restarts; its own window narrows its campaign's; each change is in
Postgres with its event and its audit entry (the actor a user or an API key); bad input is
a 4xx with nothing written."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import ray

from engine.routing import shard_of_bucket
from engine.shard_state import route_bucket
from tests.engine_support import campaign_codes, fetch, fetchval
from tests.http_support import admin_headers, create_campaign, discount_body, generate_codes


def _order(code: str, n: int) -> dict[str, Any]:
    return {"code": code, "customer_id": f"c-{n}", "order": {"id": f"o-{n}", "amount": 5000, "currency": "EUR"}}


def _post(url: str, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
    """``body`` posted as a client honouring Retry-After would: a 503 (a shard restarting,
    the gateway reconnecting to it) is asked again, for at most 60 s."""
    deadline = time.monotonic() + 60
    while True:
        r = httpx.post(url, json=body, headers=headers, timeout=30)
        if r.status_code != 503 or time.monotonic() > deadline:
            return r
        time.sleep(min(float(r.headers.get("retry-after", "1")), 1.0))


def _reasons(url: str, headers: dict[str, str], code: str, n: int) -> list[Any]:
    """What validation, reservation and redemption answer for ``code``."""
    body = _order(code, n)
    r = _post(f"{url}/v1/validations", body, headers)
    assert r.status_code == 200, r.text
    v = r.json()
    out: list[Any] = [v.get("reason") if not v["valid"] else "valid"]
    for path in ("reservations", "redemptions"):
        r = _post(f"{url}/v1/{path}", body, headers)
        out.append(r.json()["code"] if r.status_code >= 400 else r.status_code)
    return out


def _audit(dsn: str, code: str) -> list[Any]:
    return asyncio.run(
        fetch(dsn, "SELECT actor_kind, actor_id, actor_key_id, action, change FROM audit_log"
              " WHERE resource_type = 'voucher' AND resource_id = $1 ORDER BY id", code)
    )


@pytest.fixture(scope="module")
def campaign(http_api: Any) -> tuple[str, list[str]]:
    admin = admin_headers(http_api)
    c = create_campaign(http_api.url, admin, discount_body("control"))
    generate_codes(http_api.url, admin, c["id"], 6)
    httpx.post(f"{http_api.url}/v1/campaigns/{c['id']}/activate", headers=admin).raise_for_status()
    return c["id"], sorted(asyncio.run(campaign_codes(http_api.database_url, c["id"])))


def test_a_switched_off_code_is_refused_everywhere_and_after_its_shard_restarts(
    http_api: Any, engine: Any, campaign: tuple[str, list[str]]
) -> None:
    url, dsn = http_api.url, http_api.database_url
    admin = admin_headers(http_api)
    _, codes = campaign
    code = codes[0]
    r = httpx.patch(f"{url}/v1/vouchers/{code.lower()}", json={"active": False}, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json()["active"] is False and r.json()["code"] == code
    assert asyncio.run(fetchval(dsn, "SELECT active FROM vouchers WHERE code = $1", code)) is False
    assert _reasons(url, admin, code, 1) == ["voucher_disabled"] * 3
    assert httpx.get(f"{url}/v1/vouchers/{code}", headers=admin).json()["active"] is False

    shard = engine.shards[shard_of_bucket(route_bucket(code), engine.n)]
    ray.kill(shard, no_restart=False)
    asyncio.run(engine.wait_ready(120))
    assert _reasons(url, admin, code, 2) == ["voucher_disabled"] * 3

    r = httpx.patch(f"{url}/v1/vouchers/{code}", json={"active": True}, headers=admin)
    assert r.status_code == 200 and r.json()["active"] is True
    r = httpx.post(f"{url}/v1/redemptions", json=_order(code, 3), headers=admin)
    assert r.status_code == 201, r.text

    rows = _audit(dsn, code)
    assert [(a[0], a[3], a[4]) for a in rows] == [
        ("user", "voucher.update", '{"active": [true, false]}'),
        ("user", "voucher.update", '{"active": [false, true]}'),
    ]
    events = asyncio.run(
        fetch(dsn, "SELECT type, data FROM events WHERE resource_id = $1 ORDER BY created_at", code)
    )
    assert [e[0] for e in events] == ["voucher.updated", "voucher.updated"]


def test_a_codes_window_and_metadata_set_by_an_api_key(
    http_api: Any, campaign: tuple[str, list[str]]
) -> None:
    url, dsn = http_api.url, http_api.database_url
    admin = admin_headers(http_api)
    _, codes = campaign
    code = codes[1]
    r = httpx.post(f"{url}/v1/api-keys", json={"name": "back office", "roles": ["manager"]}, headers=admin)
    assert r.status_code == 201, r.text
    key = {"X-API-Key": r.json()["key"]}
    later = datetime.now(UTC) + timedelta(days=2)
    r = httpx.patch(
        f"{url}/v1/vouchers/{code}",
        json={"starts_at": later.isoformat(), "metadata": {"printed": "flyer-7", "batch": 3}},
        headers=key,
    )
    assert r.status_code == 200, r.text
    assert r.json()["metadata"] == {"printed": "flyer-7", "batch": 3}
    assert _reasons(url, admin, code, 4) == ["voucher_not_started"] * 3
    past = datetime.now(UTC) - timedelta(minutes=1)
    r = httpx.patch(f"{url}/v1/vouchers/{code}", json={"starts_at": None, "expires_at": past.isoformat()}, headers=key)
    assert r.status_code == 200, r.text
    assert _reasons(url, admin, code, 5) == ["voucher_expired"] * 3
    got = httpx.get(f"{url}/v1/vouchers/{code}", headers=admin).json()
    assert got["metadata"] == {"printed": "flyer-7", "batch": 3} and "starts_at" not in got
    (kind, actor, key_id, *_), _second = _audit(dsn, code)
    assert kind == "api_key" and key_id is not None and actor
    stored = asyncio.run(fetchval(dsn, "SELECT metadata FROM vouchers WHERE code = $1", code))
    assert stored is not None and "flyer-7" in stored


def test_bad_changes_are_4xx_problems_and_write_nothing(
    http_api: Any, campaign: tuple[str, list[str]]
) -> None:
    url, dsn = http_api.url, http_api.database_url
    admin = admin_headers(http_api)
    _, codes = campaign
    code = codes[2]
    soon, later = datetime.now(UTC) + timedelta(days=1), datetime.now(UTC) + timedelta(days=2)
    bad = [
        ({"active": "off"}, 422, "validation-error"),
        ({}, 422, "invalid_input"),
        ({"metadata": {"note": "x" * 4100}}, 422, "validation-error"),
        ({"metadata": "plain"}, 422, "validation-error"),
        ({"starts_at": later.isoformat(), "expires_at": soon.isoformat()}, 422, "invalid_input"),
        ({"expires_at": "2030-01-01T00:00:00"}, 422, "invalid_input"),
        ({"colour": "red"}, 422, "validation-error"),
    ]
    for body, status, kind in bad:
        r = httpx.patch(f"{url}/v1/vouchers/{code}", json=body, headers=admin)
        assert r.status_code == status, (body, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert kind in (r.json().get("code"), r.json()["type"].rsplit("/", 1)[-1]), (body, r.json())
    r = httpx.patch(f"{url}/v1/vouchers/NO-SUCH-CODE-1", json={"active": False}, headers=admin)
    assert r.status_code == 404 and r.json()["code"] == "unknown_code"
    assert _audit(dsn, code) == []
    row = asyncio.run(fetch(dsn, "SELECT active, starts_at, expires_at, metadata FROM vouchers WHERE code = $1", code))
    assert tuple(row[0]) == (True, None, None, None)
