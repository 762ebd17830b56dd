"""Publications over the real HTTP API, shard actors, Postgres and Valkey: one customer given
a code now (201, then 200 with the same code on a repeat, also for 20 concurrent repeats:
one code, one row, one event), its message through the delivery pipeline to the SMTP sink,
a user account linked to an imported customer seeing the code in "my vouchers", customer
metadata, and bad requests answered with problems that leave nothing behind."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.delivery_support import receipts_of, running_pipeline, wait_states
from tests.engine_support import fetch, uid
from tests.http_support import (
    admin_headers,
    bearer,
    create_campaign,
    discount_body,
    flash_sale_body,
    generate_codes,
    open_campaign,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def admin(http_api: Any) -> dict[str, str]:
    return admin_headers(http_api)


def _sql(api: Any, query: str, *args: Any) -> list[Any]:
    return asyncio.run(fetch(api.database_url, query, *args))


def _problem(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body = dict(r.json())
    if code is not None:
        assert body["code"] == code, body
    return body


def _customer(api: Any, admin: dict[str, str], **fields: Any) -> dict[str, Any]:
    body = {"id": uid("cust"), **fields}
    r = httpx.post(f"{api.url}/v1/customers", json=body, headers=admin)
    assert r.status_code == 201, r.text
    return dict(r.json())


def _open(api: Any, admin: dict[str, str], codes: int) -> str:
    c = create_campaign(api.url, admin, discount_body("publication test"))
    if codes:
        generate_codes(api.url, admin, c["id"], codes)
    r = httpx.post(f"{api.url}/v1/campaigns/{c['id']}/activate", headers=admin)
    assert r.status_code == 200, r.text
    return str(c["id"])


def _publish(api: Any, headers: dict[str, str], cid: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{api.url}/v1/campaigns/{cid}/publications", json=body, headers=headers, timeout=60)


def _written(api: Any, cid: str) -> tuple[int, int, int]:
    """(publications, voucher.published events, deliveries) of campaign ``cid``."""
    pubs = _sql(api, "SELECT count(*) AS n FROM publications WHERE campaign_id = $1", cid)[0]["n"]
    events = _sql(
        api, "SELECT count(*) AS n FROM events WHERE campaign_id = $1 AND type = 'voucher.published'", cid
    )[0]["n"]
    sent = _sql(api, "SELECT count(*) AS n FROM deliveries WHERE campaign_id = $1", cid)[0]["n"]
    return pubs, events, sent


def test_publish_gives_a_code_and_a_repeat_the_same_one(http_api: Any, admin: dict[str, str]) -> None:
    cid = _open(http_api, admin, 10)
    cust = _customer(http_api, admin)
    r = _publish(http_api, admin, cid, {"customer_id": cust["id"]})
    assert r.status_code == 201, r.text
    first = r.json()
    assert first["campaign_id"] == cid and first["customer_id"] == cust["id"] and first["created"] is True
    assert first["channels"] == [] and first["deliveries"] == []
    # the code is the customer's on its shard and in Postgres
    v = httpx.get(f"{http_api.url}/v1/vouchers/{first['code']}", headers=admin).json()
    assert v["customer_id"] == cust["id"] and v["status"] == "assigned"
    rows = _sql(http_api, "SELECT code FROM vouchers WHERE campaign_id = $1 AND customer_id = $2", cid, cust["id"])
    assert [r["code"] for r in rows] == [first["code"]]
    again = _publish(http_api, admin, cid, {"customer_id": cust["id"]})
    assert again.status_code == 200, again.text
    assert again.json()["code"] == first["code"] and again.json()["id"] == first["id"]
    assert again.json()["created"] is False
    assert _written(http_api, cid) == (1, 1, 0)
    [event] = _sql(
        http_api,
        "SELECT id, resource_id, data::text AS data FROM events WHERE campaign_id = $1"
        " AND type = 'voucher.published'",
        cid,
    )
    assert event["id"] == f"evt_{first['id']}" and event["resource_id"] == first["code"]
    assert json.loads(event["data"]) == {
        "publication_id": first["id"], "campaign_id": cid, "customer_id": cust["id"],
        "code": first["code"], "channels": [],
    }
    [entry] = _sql(
        http_api, "SELECT action, actor_kind, change::text AS change FROM audit_log WHERE resource_id = $1",
        first["id"],
    )
    assert (entry["action"], entry["actor_kind"]) == ("publications.create", "user")
    assert json.loads(entry["change"])["code"] == first["code"]


def test_20_concurrent_repeats_give_one_code_and_one_row(http_api: Any, admin: dict[str, str]) -> None:
    cid = _open(http_api, admin, 50)
    cust = _customer(http_api, admin)
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: _publish(http_api, admin, cid, {"customer_id": cust["id"]}), range(20)))
    assert sorted(a.status_code for a in answers) == [200] * 19 + [201], [a.text for a in answers]
    assert len({a.json()["code"] for a in answers}) == 1
    assert len({a.json()["id"] for a in answers}) == 1
    assert _written(http_api, cid) == (1, 1, 0)
    held = _sql(http_api, "SELECT code FROM vouchers WHERE campaign_id = $1 AND customer_id IS NOT NULL", cid)
    assert [r["code"] for r in held] == [answers[0].json()["code"]]


def test_customer_already_holding_a_code_is_published_that_code(http_api: Any, admin: dict[str, str]) -> None:
    cid = _open(http_api, admin, 10)
    cust = _customer(http_api, admin, email=f"{uid('held')}@shop.example", consent_email=True)
    r = httpx.post(
        f"{http_api.url}/v1/campaigns/{cid}/issuance",
        json={"selection": {"customer_ids": [cust["id"]]}, "channels": ["email"]},
        headers=admin,
    )
    assert r.status_code == 202, r.text
    from tests.http_support import finished_job

    assert finished_job(http_api.url, admin, r.json()["id"])["state"] == "done"
    [held] = _sql(http_api, "SELECT code FROM vouchers WHERE campaign_id = $1 AND customer_id = $2", cid, cust["id"])
    r = _publish(http_api, admin, cid, {"customer_id": cust["id"]})
    assert r.status_code == 201 and r.json()["code"] == held["code"], r.text


def test_channels_queue_a_message_that_reaches_the_sink(
    http_api: Any, admin: dict[str, str], services: Any, engine_settings: Any, tmp_path: Any
) -> None:
    cid = _open(http_api, admin, 10)
    p = uid("pubmail").lower()
    cust = _customer(
        http_api, admin, id=p, email=f"{p}@shop.example", consent_email=True,
        phone="+4915112345678", consent_sms=False, name="Ada",
    )
    with running_pipeline(services, engine_settings, tmp_path / "outbox") as pipeline:
        r = _publish(http_api, admin, cid, {"customer_id": cust["id"], "channels": ["email", "sms", "push"]})
        assert r.status_code == 201, r.text
        pub = r.json()
        assert pub["channels"] == ["email", "sms", "push"]
        by = {d["channel"]: d for d in pub["deliveries"]}
        assert by["email"]["id"] and by["email"]["status"] in ("queued", "sending", "sent")
        assert by["sms"] == {"channel": "sms", "id": None, "status": "skipped_no_consent"}
        assert by["push"] == {"channel": "push", "id": None, "status": "skipped_no_address"}
        states = asyncio.run(wait_states(services.database_url, cid, {"sent": 1}, timeout_s=60))
        assert states == {"sent": 1}, states
        [row] = _sql(http_api, "SELECT id, code, job_id, recipient FROM deliveries WHERE campaign_id = $1", cid)
        assert (row["id"], row["code"], row["job_id"]) == (by["email"]["id"], pub["code"], pub["id"])
        got = receipts_of(pipeline.sinks, p)
        assert len(got) == 1 and got[0]["to"] == f"{p}@shop.example"
        # a repeat sends nothing more and shows the message as sent
        again = _publish(http_api, admin, cid, {"customer_id": cust["id"], "channels": ["email"]})
        assert again.status_code == 200
        assert {d["channel"]: d["status"] for d in again.json()["deliveries"]}["email"] == "sent"
        assert len(receipts_of(pipeline.sinks, p)) == 1
    assert _written(http_api, cid) == (1, 1, 1)


def test_a_linked_user_sees_the_code_in_my_vouchers(http_api: Any, admin: dict[str, str]) -> None:
    cid = _open(http_api, admin, 10)
    # an imported customer with its own id, and a user account signing up separately
    cust_id = uid("imported")
    r = httpx.post(
        f"{http_api.url}/v1/customers/import",
        content=f'id,name,metadata\n{cust_id},Bo,"{{""tier"": ""gold""}}"\n'.encode(),
        headers={**admin, "content-type": "text/csv"},
    )
    assert r.status_code == 200 and r.json()["imported"] == 1, r.text
    email = f"{uid('shopper')}@shop.example"
    r = httpx.post(f"{http_api.url}/v1/auth/register", json={"email": email, "password": "a-long-password", "name": "Bo"})
    assert r.status_code == 201, r.text
    user_id = r.json()["id"]
    login = httpx.post(f"{http_api.url}/v1/auth/login", json={"email": email, "password": "a-long-password"})
    me = bearer(login.json()["access_token"])

    code = _publish(http_api, admin, cid, {"customer_id": cust_id}).json()["code"]
    mine = httpx.get(f"{http_api.url}/v1/users/me/vouchers", headers=me)
    assert mine.status_code == 200 and mine.json()["items"] == []
    _problem(httpx.get(f"{http_api.url}/v1/vouchers/{code}", headers=me), 404)

    r = httpx.patch(f"{http_api.url}/v1/customers/{cust_id}", json={"user_id": user_id}, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json()["user_id"] == user_id and r.json()["metadata"] == {"tier": "gold"} and r.json()["name"] == "Bo"
    mine = httpx.get(f"{http_api.url}/v1/users/me/vouchers", headers=me).json()["items"]
    assert [v["code"] for v in mine] == [code] and mine[0]["customer_id"] == cust_id
    r = httpx.get(f"{http_api.url}/v1/vouchers/{code}", headers=me)
    assert r.status_code == 200 and r.json()["code"] == code, r.text
    [audit] = _sql(
        http_api,
        "SELECT action, change::text AS change FROM audit_log WHERE resource_id = $1"
        " AND action = 'customers.update'",
        cust_id,
    )
    assert audit["action"] == "customers.update" and json.loads(audit["change"]) == {"user_id": [None, user_id]}

    # one customer per user account; unknown users are refused; nothing changes
    other = _customer(http_api, admin)
    r = httpx.patch(f"{http_api.url}/v1/customers/{other['id']}", json={"user_id": user_id}, headers=admin)
    _problem(r, 409, "conflict")
    r = httpx.patch(f"{http_api.url}/v1/customers/{other['id']}", json={"user_id": uid("nobody")}, headers=admin)
    _problem(r, 422, "invalid_input")
    assert httpx.get(f"{http_api.url}/v1/customers/{other['id']}", headers=admin).json()["user_id"] is None

    # unlinked: the code is no longer the user's
    r = httpx.patch(f"{http_api.url}/v1/customers/{cust_id}", json={"user_id": None}, headers=admin)
    assert r.status_code == 200 and r.json()["user_id"] is None
    assert httpx.get(f"{http_api.url}/v1/users/me/vouchers", headers=me).json()["items"] == []


def test_customer_metadata_is_set_returned_and_filtered(http_api: Any, admin: dict[str, str]) -> None:
    tag = uid("meta").lower()
    gold = _customer(http_api, admin, metadata={"tier": "gold", "n": 3}, tags=[tag])
    silver = _customer(http_api, admin, metadata={"tier": "silver"}, tags=[tag])
    plain = _customer(http_api, admin, tags=[tag])
    assert gold["metadata"] == {"tier": "gold", "n": 3} and plain["metadata"] is None

    def listed(flt: str) -> list[str]:
        r = httpx.get(f"{http_api.url}/v1/customers", params={"tag": tag, "metadata": flt}, headers=admin)
        assert r.status_code == 200, r.text
        return [c["id"] for c in r.json()["items"]]

    assert listed("tier=gold") == [gold["id"]]
    assert listed("n=3") == [gold["id"]]
    assert listed('n="3"') == []
    r = httpx.patch(f"{http_api.url}/v1/customers/{silver['id']}", json={"metadata": {"tier": "gold"}}, headers=admin)
    assert r.status_code == 200 and r.json()["metadata"] == {"tier": "gold"}
    assert sorted(listed("tier=gold")) == sorted([gold["id"], silver["id"]])
    _problem(httpx.get(f"{http_api.url}/v1/customers", params={"metadata": "tier"}, headers=admin), 422)
    # an import without a metadata column keeps what a customer has
    r = httpx.post(
        f"{http_api.url}/v1/customers/import",
        content=f"id,name,tags\n{gold['id']},Gold,{tag}\n".encode(),
        headers={**admin, "content-type": "text/csv"},
    )
    assert r.status_code == 200 and r.json()["imported"] == 1, r.text
    got = httpx.get(f"{http_api.url}/v1/customers/{gold['id']}", headers=admin).json()
    assert got["name"] == "Gold" and got["metadata"] == {"tier": "gold", "n": 3}
    # bad changes are refused whole
    for body, status in (
        ({"metadata": {"x": "y" * 5000}}, 422),
        ({"email": "not-an-email"}, 422),
        ({"consent_email": "yes"}, 422),
        ({"tags": ["Not a tag!"]}, 422),
        ({"id": "other"}, 422),
    ):
        _problem(httpx.patch(f"{http_api.url}/v1/customers/{gold['id']}", json=body, headers=admin), status)
    assert httpx.get(f"{http_api.url}/v1/customers/{gold['id']}", headers=admin).json() == got
    _problem(httpx.patch(f"{http_api.url}/v1/customers/{uid('nope')}", json={"name": "x"}, headers=admin), 404)


def test_shared_code_campaigns_publish_their_shared_code(http_api: Any, admin: dict[str, str]) -> None:
    shared = uid("SHARED").upper().replace("_", "-")
    cid = open_campaign(http_api.url, admin, flash_sale_body("shared publication", shared))
    cust = _customer(http_api, admin)
    r = _publish(http_api, admin, cid, {"customer_id": cust["id"]})
    assert r.status_code == 201, r.text
    assert r.json()["code"] == shared


def test_refusals_leave_nothing_behind(http_api: Any, admin: dict[str, str]) -> None:
    cid = _open(http_api, admin, 1)
    cust = _customer(http_api, admin)
    _problem(_publish(http_api, admin, uid("nope"), {"customer_id": cust["id"]}), 404, "unknown_campaign")
    _problem(_publish(http_api, admin, cid, {"customer_id": uid("nobody")}), 404, "not_found")
    for body in ({}, {"customer_id": ""}, {"customer_id": cust["id"], "channels": ["fax"]},
                 {"customer_id": cust["id"], "extra": True}, {"customer_id": 7}):
        _problem(_publish(http_api, admin, cid, body), 422)
    r = httpx.post(f"{http_api.url}/v1/campaigns/{cid}/publications", content=b"{nope", headers={**admin, "content-type": "application/json"})
    assert r.status_code in (400, 422), r.text
    assert _written(http_api, cid) == (0, 0, 0)
    # the one code goes to the first customer; the campaign is then out of codes
    assert _publish(http_api, admin, cid, {"customer_id": cust["id"]}).status_code == 201
    second = _customer(http_api, admin, email=f"{uid('x')}@shop.example", consent_email=True)
    p = _problem(_publish(http_api, admin, cid, {"customer_id": second["id"], "channels": ["email"]}), 409, "bank_exhausted")
    assert "generate" in p["detail"]
    assert _written(http_api, cid) == (1, 1, 0)
    # paused, draft and ended campaigns publish nothing new (a repeat still answers)
    assert httpx.post(f"{http_api.url}/v1/campaigns/{cid}/pause", headers=admin).status_code == 200
    _problem(_publish(http_api, admin, cid, {"customer_id": second["id"]}), 409, "campaign_paused")
    assert _publish(http_api, admin, cid, {"customer_id": cust["id"]}).status_code == 200
    assert httpx.post(f"{http_api.url}/v1/campaigns/{cid}/end", headers=admin).status_code == 200
    _problem(_publish(http_api, admin, cid, {"customer_id": second["id"]}), 409, "cannot_issue_ended")
    draft = create_campaign(http_api.url, admin, discount_body("draft publication"))
    generate_codes(http_api.url, admin, draft["id"], 1)
    _problem(_publish(http_api, admin, draft["id"], {"customer_id": cust["id"]}), 409, "campaign_not_active")
    assert _written(http_api, draft["id"]) == (0, 0, 0)
    assert _written(http_api, cid) == (1, 1, 0)


def test_who_may_publish(http_api: Any, admin: dict[str, str]) -> None:
    from tests.integration.test_http_api import _user_with_role

    cid = _open(http_api, admin, 5)
    cust = _customer(http_api, admin)
    for role, status in (("analyst", 403), ("customer", 403), ("integration", 201)):
        _, headers = _user_with_role(http_api, admin, role)
        r = _publish(http_api, headers, cid, {"customer_id": cust["id"]})
        assert r.status_code == status, r.text
    r = httpx.post(f"{http_api.url}/v1/campaigns/{cid}/publications", json={"customer_id": cust["id"]})
    _problem(r, 401)
