"""The audit log over HTTP: campaign changes, role changes, API keys and customer changes
each write their entry in the change's own transaction (checked in Postgres), naming the
user or the API key that acted; ``GET /v1/audit-log`` is for admins, filters by resource,
actor and time, and pages by cursor (a bad cursor is 422)."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.engine_support import fetch
from tests.http_support import admin_headers, create_campaign, discount_body, login

pytestmark = pytest.mark.integration


def _uid(prefix: str) -> str:
    return f"{prefix}{os.urandom(4).hex()}"


def _entries(dsn: str, resource_type: str, resource_id: str) -> list[tuple[Any, ...]]:
    rows = asyncio.run(fetch(
        dsn,
        "SELECT actor_kind, actor_id, actor_key_id, action, change FROM audit_log"
        " WHERE resource_type = $1 AND resource_id = $2 ORDER BY id",
        resource_type, resource_id,
    ))
    return [(r["actor_kind"], r["actor_id"], r["actor_key_id"], r["action"], json.loads(r["change"])) for r in rows]


def _register(url: str) -> tuple[str, str, str]:
    email = f"{_uid('aud-')}@test.example"
    r = httpx.post(f"{url}/v1/auth/register", json={"email": email, "password": "audit-pass-1", "name": "a"})
    assert r.status_code == 201, r.text
    return r.json()["id"], email, "audit-pass-1"


def _all_pages(url: str, headers: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        q = dict(params) | ({"cursor": cursor} if cursor else {})
        r = httpx.get(f"{url}/v1/audit-log", params=q, headers=headers)
        assert r.status_code == 200, r.text
        page = r.json()
        out += page["data"]
        cursor = page["next_cursor"]
        if cursor is None:
            return out


def test_roles_keys_customers_and_campaigns_are_audited_with_who_did_it(http_api: Any) -> None:
    url, dsn = http_api.url, http_api.database_url
    admin = admin_headers(http_api)
    admin_id = httpx.get(f"{url}/v1/users/me", headers=admin).json()["id"]

    # a role change, by the admin
    user_id, email, password = _register(url)
    r = httpx.put(f"{url}/v1/users/{user_id}/roles", json={"roles": ["manager"]}, headers=admin)
    assert r.status_code == 200, r.text
    assert _entries(dsn, "user", user_id) == [
        ("user", admin_id, None, "user.set_roles", {"roles": [["customer"], ["manager"]]})
    ]
    # a role change refused (the roles unknown) writes nothing
    r = httpx.put(f"{url}/v1/users/{user_id}/roles", json={"roles": ["emperor"]}, headers=admin)
    assert r.status_code == 422
    assert len(_entries(dsn, "user", user_id)) == 1

    # an API key, created by the manager; its actions name the key
    manager = login(url, email, password)
    r = httpx.post(f"{url}/v1/api-keys", json={"name": "shop", "roles": ["integration"]}, headers=manager)
    assert r.status_code == 201, r.text
    key_id = r.json()["id"]
    assert _entries(dsn, "api_key", key_id) == [
        ("user", user_id, None, "api_key.create",
         {"owner_id": [None, user_id], "name": [None, "shop"], "roles": [None, ["integration"]]})
    ]
    r = httpx.post(f"{url}/v1/api-keys", json={"name": "mgr", "roles": ["manager"]}, headers=admin)
    assert r.status_code == 201, r.text
    mgr_key_id, mgr_key = r.json()["id"], r.json()["key"]
    c = create_campaign(url, {"X-API-Key": mgr_key}, discount_body("audited"))
    r = httpx.patch(f"{url}/v1/campaigns/{c['id']}", json={"name": "audited 2"},
                    headers={"X-API-Key": mgr_key, "If-Match": '"1"'})
    assert r.status_code == 200, r.text
    assert _entries(dsn, "campaign", c["id"]) == [
        ("api_key", admin_id, mgr_key_id, "campaign.create", {"campaign": [None, c["id"]]}),
        ("api_key", admin_id, mgr_key_id, "campaign.update", {"name": ["audited", "audited 2"]}),
    ]
    r = httpx.delete(f"{url}/v1/api-keys/{key_id}", headers=manager)
    assert r.status_code == 200
    assert [e[3] for e in _entries(dsn, "api_key", key_id)] == ["api_key.create", "api_key.revoke"]

    # customers: one created, and an import's batch
    cust = _uid("cus-")
    r = httpx.post(f"{url}/v1/customers", json={"id": cust, "name": "Ada"}, headers=admin)
    assert r.status_code == 201, r.text
    assert _entries(dsn, "customer", cust) == [
        ("user", admin_id, None, "customer.create", {"customer": [None, cust]})
    ]
    r = httpx.post(f"{url}/v1/customers", json={"id": cust}, headers=admin)
    assert r.status_code == 409
    assert len(_entries(dsn, "customer", cust)) == 1
    imported = [_uid("imp-") for _ in range(3)]
    body = "id,name\n" + "".join(f"{i},Ada\n" for i in imported)
    r = httpx.post(f"{url}/v1/customers/import", content=body.encode(),
                   headers={**admin, "Content-Type": "text/csv"})
    assert r.status_code == 200 and r.json()["imported"] == 3, r.text
    rows = asyncio.run(fetch(dsn, "SELECT actor_id, change FROM audit_log WHERE action = 'customers.import'"
                                  " AND change->'ids' ? $1", imported[0]))
    assert [(r["actor_id"], json.loads(r["change"])) for r in rows] == [
        (admin_id, {"upserted": 3, "ids": imported})
    ]


def test_the_audit_log_lists_filters_and_pages(http_api: Any) -> None:
    url = http_api.url
    admin = admin_headers(http_api)
    admin_id = httpx.get(f"{url}/v1/users/me", headers=admin).json()["id"]
    start = datetime.now(UTC) - timedelta(seconds=1)
    c = create_campaign(url, admin, discount_body("listed"))
    cid = c["id"]
    for n in range(4):
        r = httpx.patch(f"{url}/v1/campaigns/{cid}", json={"min_order": 100 + n}, headers=admin)
        assert r.status_code == 200, r.text
    httpx.post(f"{url}/v1/campaigns/{cid}/activate", headers=admin).raise_for_status()

    r = httpx.get(f"{url}/v1/audit-log", params={"resource_type": "campaign", "resource_id": cid},
                  headers=admin)
    assert r.status_code == 200, r.text
    page = r.json()
    assert page["next_cursor"] is None
    actions = [e["action"] for e in page["data"]]
    assert actions == ["campaign.activate"] + ["campaign.update"] * 4 + ["campaign.create"]  # newest first
    first = page["data"][0]
    assert first["actor"] == {"kind": "user", "id": admin_id, "key_id": None}
    assert first["resource_type"] == "campaign" and first["change"] == {"state": ["draft", "active"]}
    assert datetime.fromisoformat(first["at"]) >= start
    ids = [e["id"] for e in page["data"]]
    assert ids == sorted(ids, reverse=True)

    # one entry a page, through the cursor: the same entries, each once
    paged = _all_pages(url, admin, resource_type="campaign", resource_id=cid, limit=1)
    assert [e["id"] for e in paged] == ids
    # by actor and time
    mine = _all_pages(url, admin, actor=admin_id, since=start.isoformat(), limit=500)
    assert set(ids) <= {e["id"] for e in mine}
    assert all(e["actor"]["id"] == admin_id for e in mine)
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    r = httpx.get(f"{url}/v1/audit-log", params={"resource_id": cid, "since": later}, headers=admin)
    assert r.json() == {"data": [], "next_cursor": None}

    # bad input: 422 problems
    for params in ({"cursor": "not-a-cursor"}, {"cursor": "YXVkaXQ6"}, {"limit": 0}, {"limit": 5000},
                   {"since": "yesterday"}, {"since": "2030-01-01T00:00:00"}):
        r = httpx.get(f"{url}/v1/audit-log", params=params, headers=admin)
        assert r.status_code == 422, (params, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
    r = httpx.get(f"{url}/v1/audit-log", params={"cursor": "bm9wZQ"}, headers=admin)
    assert r.json()["code"] == "invalid_cursor"


def test_only_admins_read_the_audit_log(http_api: Any) -> None:
    url = http_api.url
    admin = admin_headers(http_api)
    user_id, email, password = _register(url)
    assert httpx.get(f"{url}/v1/audit-log").status_code == 401
    for role in ("manager", "analyst", "integration", "customer"):
        r = httpx.put(f"{url}/v1/users/{user_id}/roles", json={"roles": [role]}, headers=admin)
        assert r.status_code == 200
        r = httpx.get(f"{url}/v1/audit-log", headers=login(url, email, password))
        assert r.status_code == 403, (role, r.text)
