"""Delivery over HTTP: templates (validated when stored), delivery records and status,
dead letters, roles, and bad input answered with problems."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest

from tests.engine_support import uid
from tests.http_support import bearer
from tests.integration.test_http_api import _campaign, _login, _user_with_role

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def admin(http_api: Any) -> dict[str, str]:
    return bearer(_login(http_api, http_api.admin_email, http_api.admin_password))


def _problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    return dict(r.json())


def test_put_and_list_templates(http_api: Any, admin: dict[str, str]) -> None:
    c = _campaign(http_api, admin)
    url = f"{http_api.url}/v1/campaigns/{c['id']}/templates"
    r = httpx.put(
        f"{url}/email",
        json={"locale": "de_at", "subject": "Servus {{ customer_name }}", "body": "<b>{{ code }}</b>", "default": True},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    assert r.json()["locale"] == "de-AT" and r.json()["default_locale"] == "de-AT"
    r = httpx.put(f"{url}/sms", json={"locale": "en", "body": "{{ code }} {{ discount }}"}, headers=admin)
    assert r.status_code == 200, r.text
    # Replacing keeps one row per channel x locale.
    r = httpx.put(f"{url}/sms", json={"locale": "en", "body": "Code {{ code }}"}, headers=admin)
    assert r.status_code == 200
    listed = httpx.get(url, headers=admin).json()
    assert listed["default_locale"] == "de-AT"
    assert [(t["channel"], t["locale"], t["body"]) for t in listed["items"]] == [
        ("email", "de-AT", "<b>{{ code }}</b>"),
        ("sms", "en", "Code {{ code }}"),
    ]


@pytest.mark.parametrize(
    ("channel", "body", "needle"),
    [
        ("email", {"locale": "en", "subject": "Hi", "body": "{{ code"}, "syntax error"),
        ("email", {"locale": "en", "subject": "Hi", "body": "{{ voucher_code }}"}, "'voucher_code' is undefined"),
        ("email", {"locale": "en", "body": "{{ code }}"}, "needs a subject"),
        ("sms", {"locale": "en", "subject": "x", "body": "{{ code }}"}, "no subject"),
        ("push", {"locale": "en", "subject": "t", "body": "{{ ''.__class__ }}"}, "not allowed"),
        ("email", {"locale": "en us!", "subject": "Hi", "body": "x"}, "locale"),
        ("email", {"locale": "en", "subject": "Hi", "body": "x", "extra": 1}, "extra"),
        ("fax", {"locale": "en", "body": "x"}, "channel"),
    ],
)
def test_bad_templates_are_422_problems(http_api: Any, admin: dict[str, str], channel, body, needle) -> None:
    c = _campaign(http_api, admin)
    r = httpx.put(f"{http_api.url}/v1/campaigns/{c['id']}/templates/{channel}", json=body, headers=admin)
    p = _problem(r, 422)
    assert needle in r.text, p
    # Nothing was stored.
    assert httpx.get(f"{http_api.url}/v1/campaigns/{c['id']}/templates", headers=admin).json()["items"] == []


def test_unknown_campaign_is_404(http_api: Any, admin: dict[str, str]) -> None:
    base = f"{http_api.url}/v1/campaigns/{uid('nope')}"
    r = httpx.put(f"{base}/templates/email", json={"locale": "en", "subject": "s", "body": "b"}, headers=admin)
    assert _problem(r, 404)["code"] == "unknown_campaign"
    for path in ("templates", "deliveries", "delivery"):
        assert _problem(httpx.get(f"{base}/{path}", headers=admin), 404)["code"] == "unknown_campaign"


def test_roles_on_delivery_endpoints(http_api: Any, admin: dict[str, str]) -> None:
    c = _campaign(http_api, admin)
    _, analyst = _user_with_role(http_api, admin, "analyst")
    _, customer = _user_with_role(http_api, admin, "customer")
    put = {"locale": "en", "subject": "s", "body": "b {{ code }}"}
    url = f"{http_api.url}/v1/campaigns/{c['id']}"
    assert httpx.put(f"{url}/templates/email", json=put, headers=analyst).status_code == 403
    assert httpx.get(f"{url}/deliveries", headers=analyst).status_code == 200
    assert httpx.get(f"{url}/deliveries", headers=customer).status_code == 403
    assert httpx.get(f"{http_api.url}/v1/deliveries/dead", headers=customer).status_code == 403
    assert httpx.get(f"{url}/deliveries").status_code == 401


async def test_delivery_records_status_and_dead_letters(http_api: Any, admin: dict[str, str]) -> None:
    c = _campaign(http_api, admin)
    cid = c["id"]
    conn = await asyncpg.connect(http_api.database_url)
    try:
        rows = [
            (f"msg_{cid}_{i}", cid, f"cu-{i}", ch, f"r{i}", f"C{i}", st, None if st != "dead" else "SMTP 550 no")
            for i, (ch, st) in enumerate(
                [("email", "sent")] * 3 + [("email", "queued")] * 2 + [("sms", "dead")] + [("push", "failed")]
            )
        ]
        await conn.executemany(
            "INSERT INTO deliveries (id, campaign_id, customer_id, channel, recipient, code, state, last_error)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            rows,
        )
    finally:
        await conn.close()
    url = f"{http_api.url}/v1/campaigns/{cid}"
    status = httpx.get(f"{url}/delivery", headers=admin).json()
    assert (status["sent"], status["queued"], status["dead"], status["failed"], status["total"]) == (3, 2, 1, 1, 7)
    assert status["channels"]["email"]["sent"] == 3 and status["channels"]["sms"]["dead"] == 1
    overview = httpx.get(f"{url}/overview", headers=admin).json()
    assert overview["delivery"]["sent"] == 3 and overview["delivery"]["pipeline"] == "redis_streams"
    page = httpx.get(f"{url}/deliveries", params={"state": "sent", "limit": 2}, headers=admin).json()
    assert len(page["items"]) == 2 and all(d["state"] == "sent" for d in page["items"])
    page2 = httpx.get(f"{url}/deliveries", params={"state": "sent", "limit": 2, "offset": 2}, headers=admin).json()
    assert len(page2["items"]) == 1
    assert {d["channel"] for d in httpx.get(f"{url}/deliveries", params={"channel": "sms"}, headers=admin).json()["items"]} == {"sms"}
    _problem(httpx.get(f"{url}/deliveries", params={"state": "lost"}, headers=admin), 422)
    _problem(httpx.get(f"{url}/deliveries", params={"limit": 0}, headers=admin), 422)
    dead = httpx.get(f"{http_api.url}/v1/deliveries/dead", params={"campaign_id": cid}, headers=admin).json()
    assert [(d["channel"], d["last_error"]) for d in dead["items"]] == [("sms", "SMTP 550 no")]
