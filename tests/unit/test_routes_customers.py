"""Customers, bulk import and issuance (serve/routes/customers.py) over fake services."""

from typing import Any

import pytest

from tests.route_fakes import assert_refused, gateway, problem_of

CUSTOMER: dict[str, Any] = {
    "id": "c/1", "locale": "en", "time_zone": "UTC", "consent_email": True, "consent_sms": False,
    "consent_push": False, "tags": ["vip"],
}


def test_customers_are_created_by_staff_who_write() -> None:
    with gateway(customers={"create": CUSTOMER}) as (client, fakes):
        assert_refused(client, fakes, "POST", "/v1/customers", "customers.write", "analyst", json={"id": "c/1"})
        r = client.post("/v1/customers", json={"id": "c/1", "tags": ["vip"]}, headers=fakes.token("manager"))
        assert r.status_code == 201, r.text
        assert r.headers["location"] == "/v1/customers/c%2F1"
        assert fakes.customers.called("create") == [({"id": "c/1", "tags": ["vip"]},)]
        r = client.post("/v1/customers", json={"id": ""}, headers=fakes.token("manager"))
        assert any(e["loc"] == ["body", "id"] for e in problem_of(r, 422)["errors"])


def test_customers_are_listed_by_lower_case_tag_and_read() -> None:
    with gateway(customers={"list": {"items": []}, "get": CUSTOMER}) as (client, fakes):
        assert_refused(client, fakes, "GET", "/v1/customers", "customers.read", "customer")
        r = client.get("/v1/customers?tag=VIP&after=c0&limit=3", headers=fakes.token("analyst"))
        assert r.json() == {"items": []}
        assert fakes.customers.called("list") == [("vip", "c0", 3, None)]
        client.get("/v1/customers", headers=fakes.token("analyst"))
        assert fakes.customers.called("list")[-1] == (None, None, 100, None)
        client.get("/v1/customers?metadata=tier=3", headers=fakes.token("analyst"))
        assert fakes.customers.called("list")[-1] == (None, None, 100, {"tier": 3})
        client.get("/v1/customers?metadata=tier=gold", headers=fakes.token("analyst"))
        assert fakes.customers.called("list")[-1] == (None, None, 100, {"tier": "gold"})
        for bad in ("tier", "n=1e999", "n=NaN", "=1"):
            r = client.get("/v1/customers", params={"metadata": bad}, headers=fakes.token("analyst"))
            assert problem_of(r, 422)["code"] == "invalid_metadata", bad
        r = client.get("/v1/customers/c1", headers=fakes.token("analyst"))
        assert r.json()["id"] == "c/1" and fakes.customers.called("get") == [("c1",)]


def test_import_is_refused_before_its_body_is_read() -> None:
    with gateway() as (client, fakes):
        assert_refused(client, fakes, "POST", "/v1/customers/import", "customers.write", "analyst",
                       content=b"id\nc1\n", headers={"content-type": "text/csv"})
        r = client.post("/v1/customers/import", content=b"<x/>",
                        headers={**fakes.token("manager"), "content-type": "application/xml"})
        problem_of(r, 415)
        assert fakes.services.import_db.opened == 0  # type: ignore[attr-defined]


def test_import_streams_into_the_gateways_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    async def import_stream(pool: Any, ctype: str, chunks: Any, batch: int) -> dict[str, Any]:
        body = b"".join([c async for c in chunks])
        seen.update(pool=pool, ctype=ctype, body=body, batch=batch)
        return {"rows": 1, "imported": 1, "rejected": 0, "rejections": [], "rejections_truncated": False}

    import store.customers

    monkeypatch.setattr(store.customers, "import_stream", import_stream)
    with gateway() as (client, fakes):
        r = client.post("/v1/customers/import", content=b"id\nc1\n",
                        headers={**fakes.token("manager"), "content-type": "text/csv"})
    assert r.status_code == 200, r.text
    assert seen == {"pool": "pool", "ctype": "text/csv", "body": b"id\nc1\n",
                    "batch": fakes.services.settings.import_batch}


def test_issuance_starts_a_job() -> None:
    job = {"kind": "issuance", "id": "iss_1", "campaign_id": "cmp_1", "selection": {"tag": "vip"},
           "channels": ["email"], "state": "queued", "counts": {}}
    body = {"selection": {"tag": "vip"}, "channels": ["email"]}
    with gateway(issuance={"start": job}) as (client, fakes):
        assert_refused(client, fakes, "POST", "/v1/campaigns/cmp_1/issuance", "issuance.create", "analyst", json=body)
        r = client.post("/v1/campaigns/cmp_1/issuance", json=body, headers=fakes.token("manager"))
        assert r.status_code == 202 and r.headers["location"] == "/v1/jobs/iss_1"
        [(campaign, selection, channels)] = fakes.issuance.called("start")
        assert (campaign, selection, channels) == ("cmp_1", {"tag": "vip"}, ["email"])
        r = client.post("/v1/campaigns/cmp_1/issuance", json={**body, "channels": ["fax"]},
                        headers=fakes.token("manager"))
        problem_of(r, 422)


def test_customer_patch_sends_only_the_fields_given() -> None:
    with gateway(customers={"update": CUSTOMER}) as (client, fakes):
        assert_refused(client, fakes, "PATCH", "/v1/customers/c1", "customers.write", "analyst",
                       json={"user_id": "u1"})
        body = {"user_id": "u1", "metadata": {"tier": "gold"}, "name": None}
        r = client.patch("/v1/customers/c1", json=body, headers=fakes.token("manager"))
        assert r.status_code == 200, r.text
        [(cid, changes, actor)] = fakes.customers.called("update")
        assert cid == "c1" and changes == body and actor.kind == "user"
        r = client.patch("/v1/customers/c1", json={"metadata": {"": 1}}, headers=fakes.token("manager"))
        problem_of(r, 422)
        r = client.patch("/v1/customers/c1", json={"id": "c2"}, headers=fakes.token("manager"))
        problem_of(r, 422)
