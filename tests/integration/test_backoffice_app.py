"""The back office of the reporting app, driven by Streamlit's harness (AppTest) against the
running HTTP API: create a campaign, generate and import its codes, pause and end it,
switch a code off (and see checkout refuse it), issue codes to a segment, look up codes,
customers and orders, and what an analyst may see. Pages whose route the API does not
document say so instead of failing; their tests skip, naming the route, until it exists."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from tests.engine_support import fetch, uid
from tests.http_support import admin_headers, create_campaign, discount_body, generate_codes
from tests.integration.test_reporting_app import analyst_user

pytestmark = pytest.mark.integration

APP = str(Path(__file__).resolve().parents[2] / "reporting" / "app.py")
WRITE_PAGES = ("backoffice/new_campaign.py", "backoffice/campaign.py", "backoffice/codes.py", "backoffice/issue.py")
READ_PAGES = ("backoffice/browse.py", "backoffice/voucher.py", "backoffice/customers.py")


@pytest.fixture(scope="module")
def admin(http_api: Any) -> dict[str, str]:
    return admin_headers(http_api)


def routes(api: Any) -> dict[str, set[str]]:
    doc = httpx.get(f"{api.url}/openapi.json").json()
    return {path: {m.upper() for m in item} for path, item in doc["paths"].items()}


def need_route(api: Any, method: str, path: str) -> None:
    """Skip, naming the route, when the API's OpenAPI document lacks it."""
    if method not in routes(api).get(path, set()):
        pytest.skip(f"the API's OpenAPI document has no {method} {path}")


def logged_in(api: Any, monkeypatch: Any, email: str, password: str) -> AppTest:
    """The app after logging in as ``email`` through its login form."""
    monkeypatch.setenv("VOUCHER_API_URL", api.url)
    at = AppTest.from_file(APP, default_timeout=90)
    at.run()
    at.text_input(key="email").input(email)
    at.text_input(key="password").input(password)
    at.button[0].click()
    at.run()
    assert not at.exception and at.session_state["token"], [e.value for e in at.error]
    return at


def as_admin(api: Any, monkeypatch: Any) -> AppTest:
    return logged_in(api, monkeypatch, api.admin_email, api.admin_password)


def open_page(at: AppTest, page: str) -> AppTest:
    at.switch_page(page)
    at.run()
    assert not at.exception, at.exception
    return at


def click(at: AppTest, label: str) -> AppTest:
    """Click the (form) button labelled ``label`` and run the app."""
    button = next(b for b in at.button if b.label == label)
    button.click()
    at.run()
    assert not at.exception, at.exception
    return at


def texts(els: Any) -> list[str]:
    return [str(e.value) for e in els]


def sql(services: Any, query: str, *args: Any) -> list[Any]:
    return asyncio.run(fetch(services.database_url, query, *args))


def new_campaign(api: Any, admin: dict[str, str], codes: int = 0, activate: bool = False) -> str:
    c = create_campaign(api.url, admin, discount_body(f"back office {uid('c')}"))
    if codes:
        generate_codes(api.url, admin, c["id"], codes)
    if activate:
        httpx.post(f"{api.url}/v1/campaigns/{c['id']}/activate", headers=admin).raise_for_status()
    return str(c["id"])


def pick(at: AppTest, key: str, cid: str) -> AppTest:
    at.selectbox(key=key).set_value(cid)
    at.run()
    assert not at.exception, at.exception
    return at


# --- writing ---------------------------------------------------------------------------


def test_create_generate_import_activate_pause_end(http_api, admin, services, monkeypatch):
    at = open_page(as_admin(http_api, monkeypatch), "backoffice/new_campaign.py")
    assert at.header[0].value == "New campaign"
    name = f"Back office {uid('new')}"
    ends = (datetime.now(UTC) + timedelta(days=10)).replace(microsecond=0)
    at.text_input(key="bo_new_name").input(name)
    at.selectbox(key="bo_new_kind").set_value("amount")
    at.number_input(key="bo_new_value").set_value(250)
    at.text_input(key="bo_new_ends").input(ends.isoformat())
    at.number_input(key="bo_new_per_customer").set_value(1)
    at.text_input(key="bo_new_prefix").input("BO-")
    click(at, "Create campaign")
    assert not at.error, texts(at.error)
    assert any(name in s for s in texts(at.success)), texts(at.success)
    cid = at.session_state["bo_campaign"]
    c = httpx.get(f"{http_api.url}/v1/campaigns/{cid}", headers=admin).json()
    assert (c["name"], c["state"], c["type"]) == (name, "draft", "discount")
    assert c["discount"] == {"kind": "amount", "value": 250} or c["discount"]["value"] == 250
    assert c["limits"].get("per_customer") == 1
    assert datetime.fromisoformat(c["ends_at"]) == ends

    # a bad date never reaches the API
    at.text_input(key="bo_new_name").input("x")
    at.text_input(key="bo_new_ends").input("next tuesday")
    click(at, "Create campaign")
    assert any("not a date-time" in e for e in texts(at.error))

    # generate, with the job's progress
    at = open_page(at, "backoffice/codes.py")
    pick(at, "bo_codes_pick", cid)
    at.number_input(key="bo_gen_count").set_value(500)
    click(at, "Generate")
    assert not at.error, texts(at.error)
    assert any("Generated 500 codes" in s for s in texts(at.success)), texts(at.success)
    rows = sql(services, "SELECT code FROM vouchers WHERE campaign_id = $1", cid)
    assert len(rows) == 500 and all(r["code"].startswith("BO-") for r in rows)

    # import: two good lines, a duplicate in the file, one code that exists already
    p = uid("OWN").upper()
    pasted = f"code,customer_id\n{p}-1,\n{p}-2,cust-{p}\n{p}-1,\n{rows[0]['code']},\n"
    at.text_area(key="bo_import_text").input(pasted)
    click(at, "Import")
    metrics = {m.label: m.value for m in at.metric}
    assert (metrics["Lines read"], metrics["Imported"], metrics["Refused"]) == ("4", "2", "2"), metrics
    refused = at.dataframe[0].value
    assert sorted(refused["line"]) == [4, 5]
    got = sql(services, "SELECT code, customer_id FROM vouchers WHERE campaign_id = $1 AND code LIKE $2", cid, f"{p}%")
    assert {(r["code"], r["customer_id"]) for r in got} == {(f"{p}-1", None), (f"{p}-2", f"cust-{p}")}

    # lifecycle
    at = open_page(at, "backoffice/campaign.py")
    pick(at, "bo_campaign_pick", cid)
    assert {m.label: m.value for m in at.metric}["State"] == "draft"
    click(at, "Activate")
    assert {m.label: m.value for m in at.metric}["State"] == "active"
    click(at, "Pause")
    assert {m.label: m.value for m in at.metric}["State"] == "paused"
    assert httpx.get(f"{http_api.url}/v1/campaigns/{cid}", headers=admin).json()["state"] == "paused"
    click(at, "End")  # not without the box ticked
    assert any("cannot be undone" in w for w in texts(at.warning))
    assert httpx.get(f"{http_api.url}/v1/campaigns/{cid}", headers=admin).json()["state"] == "paused"
    at.checkbox(key="bo_end_sure").check()
    at.run()
    click(at, "End")
    assert {m.label: m.value for m in at.metric}["State"] == "ended"
    assert httpx.get(f"{http_api.url}/v1/campaigns/{cid}", headers=admin).json()["state"] == "ended"
    assert not at.error and not at.exception


def test_switch_a_code_off_and_on_validation_follows(http_api, admin, services, monkeypatch):
    cid = new_campaign(http_api, admin, codes=20, activate=True)
    code = sql(services, "SELECT code FROM vouchers WHERE campaign_id = $1 ORDER BY code LIMIT 1", cid)[0]["code"]

    def validate() -> dict[str, Any]:
        r = httpx.post(f"{http_api.url}/v1/validations", headers=admin,
                       json={"code": code, "order": {"id": uid("o"), "amount": 5000, "currency": "EUR"}})
        assert r.status_code == 200, r.text
        return dict(r.json())

    assert validate()["valid"] is True
    at = open_page(as_admin(http_api, monkeypatch), "backoffice/voucher.py")
    at.text_input(key="bo_voucher_code").input(code)
    at.run()
    assert not at.error, texts(at.error)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Status"] == "available" and metrics["Active"] == "on"
    assert any(f"campaign {cid}" in c for c in texts(at.caption))
    click(at, "Switch off")
    assert any("switched off" in s for s in texts(at.success)), texts(at.success)
    assert {m.label: m.value for m in at.metric}["Active"] == "off"
    v = httpx.get(f"{http_api.url}/v1/vouchers/{code}", headers=admin).json()
    assert v["active"] is False
    answer = validate()
    assert answer["valid"] is False and answer["reason"] == "voucher_disabled", answer

    click(at, "Switch on")
    assert {m.label: m.value for m in at.metric}["Active"] == "on"
    assert validate()["valid"] is True

    # an unknown code is a message, not a traceback
    at.text_input(key="bo_voucher_code").input("NO-SUCH-" + uid("x").upper())
    at.run()
    assert not at.exception and any("No code" in w for w in texts(at.warning))


def test_issue_to_a_segment_with_job_progress(http_api, admin, services, monkeypatch):
    tag = uid("seg").lower()
    people = [f"{tag}-{i}" for i in range(5)]
    for i, p in enumerate(people):
        r = httpx.post(f"{http_api.url}/v1/customers", headers=admin, json={
            "id": p, "email": f"c{i}@example.com", "consent_email": True, "tags": [tag]})
        assert r.status_code in (200, 201), r.text
    cid = new_campaign(http_api, admin, codes=50, activate=True)
    at = open_page(as_admin(http_api, monkeypatch), "backoffice/issue.py")
    pick(at, "bo_issue_pick", cid)
    at.radio(key="bo_issue_kind").set_value("tag")
    at.text_input(key="bo_issue_tag").input(tag)
    click(at, "Issue")
    assert not at.error, texts(at.error)
    assert any("Issued to 5 customers: 5 have a code (5 new)" in s for s in texts(at.success)), texts(at.success)
    rows = sql(services, "SELECT customer_id FROM vouchers WHERE campaign_id = $1 AND customer_id IS NOT NULL", cid)
    assert sorted(r["customer_id"] for r in rows) == sorted(people)

    # nothing selected: said on the page, nothing sent
    at.text_input(key="bo_issue_tag").input("")
    click(at, "Issue")
    assert any("Name a tag" in e for e in texts(at.error))


# --- roles -----------------------------------------------------------------------------


def test_analyst_sees_no_write_pages_and_cannot_switch_codes_off(http_api, admin, services, monkeypatch):
    cid = new_campaign(http_api, admin, codes=5, activate=True)
    code = sql(services, "SELECT code FROM vouchers WHERE campaign_id = $1 LIMIT 1", cid)[0]["code"]
    email, password = analyst_user(http_api)
    at = logged_in(http_api, monkeypatch, email, password)
    assert at.session_state["roles"] == ["analyst"]
    assert at.header[0].value == "All campaigns"  # the reports stay the first page
    for page in WRITE_PAGES:
        with pytest.raises(ValueError, match="navigation page"):
            at.switch_page(page)
    for page in READ_PAGES:
        open_page(at, page)
        assert not at.error, (page, texts(at.error))
    at = open_page(at, "backoffice/voucher.py")
    at.text_input(key="bo_voucher_code").input(code)
    at.run()
    assert {m.label: m.value for m in at.metric}["Status"] == "available"
    assert not [b for b in at.button if b.label in ("Switch off", "Switch on", "Save window")]
    at = open_page(at, "backoffice/browse.py")
    pick(at, "bo_browse_pick", cid)
    metrics = {m.label: m.value for m in at.metric}
    assert (metrics["Available"], metrics["Redeemed"]) == ("5", "0"), metrics
    assert not [b for b in at.button if b.label == "Export as CSV"]

    # the admin gets every page
    at = as_admin(http_api, monkeypatch)
    for page in WRITE_PAGES + READ_PAGES:
        open_page(at, page)


# --- look-ups --------------------------------------------------------------------------


def test_look_up_a_customer_and_an_order(http_api, admin, services, monkeypatch):
    cid = new_campaign(http_api, admin, codes=5, activate=True)
    code = sql(services, "SELECT code FROM vouchers WHERE campaign_id = $1 LIMIT 1", cid)[0]["code"]
    person, order = uid("cust"), uid("order")
    r = httpx.post(f"{http_api.url}/v1/customers", headers=admin,
                   json={"id": person, "email": "who@example.com", "consent_email": True, "name": "Kim"})
    assert r.status_code in (200, 201), r.text
    r = httpx.post(f"{http_api.url}/v1/redemptions", headers=admin | {"Idempotency-Key": order},
                   json={"code": code, "customer_id": person, "order": {"id": order, "amount": 5000, "currency": "EUR"}})
    assert r.status_code == 201, r.text
    email, password = analyst_user(http_api)
    at = open_page(logged_in(http_api, monkeypatch, email, password), "backoffice/customers.py")
    at.text_input(key="bo_customer_id").input(person)
    at.text_input(key="bo_order_id").input(order)
    at.run()
    assert not at.exception and not at.error, texts(at.error)
    assert at.json[0].value and person in str(at.json[0].value) and "Kim" in str(at.json[0].value)
    if "GET" in routes(http_api).get("/v1/redemptions", set()):
        tables = [d.value for d in at.dataframe]
        assert len(tables) == 2
        for t in tables:
            assert list(t["code"]) == [code]
    else:  # the page says the API lists no redemptions
        assert any("cannot list redemptions" in i for i in texts(at.info))
    at.text_input(key="bo_customer_id").input("nobody-" + uid("x"))
    at.run()
    assert not at.exception and any("No customer" in w for w in texts(at.warning))


# --- code lists, exports, editing, publications and redemption look-ups ------------------


def test_browse_codes_page_by_page(http_api, admin, services, monkeypatch):
    need_route(http_api, "GET", "/v1/campaigns/{campaign_id}/vouchers")
    cid = new_campaign(http_api, admin, codes=60, activate=True)
    every = sorted(r["code"] for r in sql(services, "SELECT code FROM vouchers WHERE campaign_id = $1", cid))
    at = open_page(as_admin(http_api, monkeypatch), "backoffice/browse.py")
    pick(at, "bo_browse_pick", cid)
    at.selectbox(key="bo_browse_limit").set_value(25)
    at.run()
    seen: list[str] = []
    for _ in range(3):
        assert not at.error, texts(at.error)
        seen += list(at.dataframe[0].value["code"])
        if not next(b for b in at.button if b.label == "Next page").disabled:
            click(at, "Next page")
    assert sorted(seen) == every and len(seen) == 60
    assert any("the last page" in c for c in texts(at.caption))
    at.selectbox(key="bo_browse_status").set_value("redeemed")
    at.run()
    assert len(at.dataframe[0].value) == 0


def test_export_codes_as_csv(http_api, admin, services, monkeypatch):
    need_route(http_api, "POST", "/v1/campaigns/{campaign_id}/exports")
    cid = new_campaign(http_api, admin, codes=40)
    at = open_page(as_admin(http_api, monkeypatch), "backoffice/browse.py")
    pick(at, "bo_browse_pick", cid)
    click(at, "Export as CSV")
    assert not at.error, texts(at.error)
    assert any("40 codes" in s for s in texts(at.success)), texts(at.success)
    assert at.get("download_button")
    export_id = at.session_state["bo_export_done"]["id"]
    if "GET" in routes(http_api).get("/v1/campaigns/{campaign_id}/exports", set()):
        # an export made elsewhere is listed too, newest first, and can be opened
        r = httpx.post(f"{http_api.url}/v1/campaigns/{cid}/exports", json={"status": "available"}, headers=admin)
        assert r.status_code == 202, r.text
        other = r.json()["id"]
        deadline = time.monotonic() + 30
        while httpx.get(f"{http_api.url}/v1/exports/{other}", headers=admin).json()["state"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        at.run()
        listed = [d.value for d in at.dataframe if "state" in d.value.columns]
        assert listed and list(listed[0]["id"]) == [other, export_id], listed
        at.selectbox(key="bo_export_pick").set_value(other)
        click(at, "Open this export")
        assert not at.error, texts(at.error)
        assert any(f"Export {other} is ready" in s for s in texts(at.success)), texts(at.success)
        click(at, "Delete this export")
        assert httpx.get(f"{http_api.url}/v1/exports/{other}", headers=admin).status_code == 404
        at.selectbox(key="bo_export_pick").set_value(export_id)
        click(at, "Open this export")
        assert at.session_state["bo_export_done"]["id"] == export_id
    click(at, "Delete this export")
    assert not at.error, texts(at.error)
    assert any(f"Export {export_id} deleted" in s for s in texts(at.success)), texts(at.success)
    assert httpx.get(f"{http_api.url}/v1/exports/{export_id}", headers=admin).status_code == 404


def test_publish_a_code_to_a_customer(http_api, admin, services, monkeypatch):
    need_route(http_api, "POST", "/v1/campaigns/{campaign_id}/publications")
    cid = new_campaign(http_api, admin, codes=10, activate=True)
    person = uid("pub")
    r = httpx.post(f"{http_api.url}/v1/customers", headers=admin,
                   json={"id": person, "email": "pub@example.com", "consent_email": True})
    assert r.status_code in (200, 201), r.text
    at = open_page(as_admin(http_api, monkeypatch), "backoffice/issue.py")
    pick(at, "bo_issue_pick", cid)
    at.text_input(key="bo_publish_customer").input(person)
    click(at, "Publish")
    assert not at.error, texts(at.error)
    first = texts(at.success)
    rows = sql(services, "SELECT code FROM vouchers WHERE campaign_id = $1 AND customer_id = $2", cid, person)
    assert len(rows) == 1 and any(rows[0]["code"] in s for s in first)
    click(at, "Publish")  # the same code again
    again = texts(at.success)
    assert any(rows[0]["code"] in s and "published to them before" in s for s in again), again
    assert len(sql(services, "SELECT code FROM vouchers WHERE campaign_id = $1 AND customer_id = $2", cid, person)) == 1

    # an unknown customer: the API's problem on the page
    at.text_input(key="bo_publish_customer").input(uid("nobody"))
    click(at, "Publish")
    assert any("404" in e for e in texts(at.error)), texts(at.error)


def test_edit_a_campaign_and_a_stale_version_is_refused(http_api, admin, monkeypatch):
    need_route(http_api, "PATCH", "/v1/campaigns/{campaign_id}")
    cid = new_campaign(http_api, admin)
    at = open_page(as_admin(http_api, monkeypatch), "backoffice/campaign.py")
    pick(at, "bo_campaign_pick", cid)
    at.text_input(key="bo_edit_name").input("Renamed in the back office")
    at.number_input(key="bo_edit_total").set_value(1000)
    click(at, "Save changes")
    assert not at.error, texts(at.error)
    c = httpx.get(f"{http_api.url}/v1/campaigns/{cid}", headers=admin).json()
    assert c["name"] == "Renamed in the back office" and c["limits"]["total"] == 1000
    # someone else edits between reading and saving: 412, said on the page
    at.text_input(key="bo_edit_name").input("Mine")
    etag = httpx.get(f"{http_api.url}/v1/campaigns/{cid}", headers=admin).headers.get("etag") or f'"{c["version"]}"'
    r = httpx.patch(f"{http_api.url}/v1/campaigns/{cid}", headers=admin | {"If-Match": etag}, json={"name": "Theirs"})
    assert r.status_code == 200, r.text
    click(at, "Save changes")
    assert any("changed this in the meantime" in e for e in texts(at.error)), texts(at.error)
    assert httpx.get(f"{http_api.url}/v1/campaigns/{cid}", headers=admin).json()["name"] == "Theirs"
