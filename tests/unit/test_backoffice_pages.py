"""The back-office pages with Streamlit's AppTest against an API fake in the same process
(``httpx.request`` replaced): what each role sees, and that a route the API lacks (its
OpenAPI document leaves it out, it answers 404 without an engine code, or 405) is a message
on the page, never a traceback. The same pages against the real engine:
tests/integration/test_backoffice_app.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from reporting.client import ApiError

APP = str(Path(__file__).resolve().parents[2] / "reporting" / "app.py")
PAGES = ("backoffice/new_campaign.py", "backoffice/campaign.py", "backoffice/codes.py",
         "backoffice/browse.py", "backoffice/voucher.py", "backoffice/customers.py",
         "backoffice/issue.py")
WRITE = {"backoffice/new_campaign.py", "backoffice/campaign.py", "backoffice/codes.py", "backoffice/issue.py"}
# Routes an engine may lack; the fake's OpenAPI document lists them only when asked to.
OPTIONAL = {
    ("GET", "/v1/campaigns/{campaign_id}/vouchers"),
    ("POST", "/v1/campaigns/{campaign_id}/exports"),
    ("PATCH", "/v1/campaigns/{campaign_id}"),
    ("POST", "/v1/campaigns/{campaign_id}/publications"),
    ("GET", "/v1/redemptions"),
    ("GET", "/v1/exports/{export_id}/download"),
}
CORE = {
    ("GET", "/v1/campaigns"), ("POST", "/v1/campaigns"), ("GET", "/v1/campaigns/{campaign_id}"),
    ("POST", "/v1/campaigns/{campaign_id}/generate"), ("GET", "/v1/jobs/{job_id}"),
    ("GET", "/v1/vouchers/{code}"), ("PATCH", "/v1/vouchers/{code}"),
    ("GET", "/v1/customers/{customer_id}"), ("POST", "/v1/redemptions"),
    ("GET", "/v1/campaigns/{campaign_id}/overview"),
}
CAMPAIGN = {"id": "c1", "name": "Spring", "type": "discount", "state": "draft", "currency": "EUR",
            "discount": {"kind": "percent", "value": 10}, "limits": {}, "min_order": 0, "version": 1}


class FakeApi:
    """Just enough of the engine's HTTP API for the pages; routes not in ``documented``
    answer as the engine does for an unknown route (404 problem without ``code``) or an
    unknown method on a known path (405)."""

    def __init__(self, documented: set[tuple[str, str]], lie_about: bool = False) -> None:
        self.documented = documented
        self.lie_about = lie_about  # document the optional routes but answer 404/405
        self.calls: list[tuple[str, str]] = []
        self.campaign = dict(CAMPAIGN)
        self.codes = [f"SPRING-{i:03d}" for i in range(7)]

    def openapi(self) -> dict[str, Any]:
        paths: dict[str, dict[str, Any]] = {}
        for method, path in self.documented | (OPTIONAL if self.lie_about else set()):
            paths.setdefault(path, {})[method.lower()] = {}
        return {"paths": paths}

    def __call__(self, method: str, url: str, **kw: Any) -> httpx.Response:
        path = "/" + url.split("/", 3)[3].split("?")[0]
        self.calls.append((method, path))
        req = httpx.Request(method, url)

        def ok(body: Any, status: int = 200) -> httpx.Response:
            return httpx.Response(status, json=body, request=req)

        def problem(status: int, detail: str, code: str | None = None) -> httpx.Response:
            body = {"type": "x", "title": detail, "status": status, "detail": detail}
            if code:
                body["code"] = code
            return httpx.Response(status, json=body, request=req)

        token = (kw.get("headers") or {}).get("Authorization", "")
        if path == "/openapi.json":
            return ok(self.openapi())
        if path == "/v1/auth/login":
            return ok({"access_token": kw["json"]["email"].split("@")[0]})  # the role, as token
        if path == "/v1/users/me":
            return ok({"id": "u", "roles": [token.removeprefix("Bearer ")]})
        if path == "/v1/reports/campaigns":
            return ok({"campaigns": 0, "totals": {"net_redemptions": 0, "by_currency": {}}, "rows": [], "top": []})
        template = re.sub(r"^/v1/campaigns/[^/]+", "/v1/campaigns/{campaign_id}", path)
        template = re.sub(r"^/v1/exports/[^/]+", "/v1/exports/{export_id}", template)
        template = re.sub(r"^/v1/(vouchers|customers|jobs)/[^/]+$",
                          lambda m: f"/v1/{m[1]}/{{{dict(vouchers='code', customers='customer_id', jobs='job_id')[m[1]]}}}",
                          template)
        params = kw.get("params") or {}
        if (method, template) not in self.documented:
            known = {p for _, p in self.documented}
            return problem(405, "Method Not Allowed") if template in known else problem(404, "Not Found")
        if template == "/v1/campaigns":
            return ok({"items": [CAMPAIGN], "total": 1}) if method == "GET" else ok(CAMPAIGN | kw["json"], 201)
        c = self.campaign
        if template == "/v1/campaigns/{campaign_id}" and method == "GET":
            return httpx.Response(200, json=c, headers={"ETag": f'"{c["version"]}"'}, request=req)
        if template == "/v1/campaigns/{campaign_id}":  # PATCH
            if (kw.get("headers") or {}).get("If-Match") != f'"{c["version"]}"':
                return problem(412, "the campaign changed", "version_mismatch")
            c.update(kw["json"], version=c["version"] + 1)
            return ok(c)
        if template == "/v1/campaigns/{campaign_id}/overview":
            return ok({"campaign": c, "stats": {"available": 5, "assigned": 2}, "delivery": {}})
        if template == "/v1/campaigns/{campaign_id}/vouchers":
            start = int(params.get("cursor", 0))
            end = start + int(params["limit"])
            rows = [{"code": x, "status": "available", "customer_id": None, "active": True,
                     "starts_at": None, "expires_at": None, "metadata": None} for x in self.codes[start:end]]
            return ok({"data": rows, "next_cursor": str(end) if end < len(self.codes) else None})
        if template == "/v1/campaigns/{campaign_id}/exports":
            return ok({"id": "exp-1", "state": "running", "rows": 0, "total": len(self.codes)}, 202)
        if template == "/v1/jobs/{job_id}" and path.endswith("exp-1"):
            return ok({"id": "exp-1", "state": "done", "rows": len(self.codes), "total": len(self.codes)})
        if template == "/v1/exports/{export_id}/download":
            return httpx.Response(200, text="code,status\n" + "".join(f"{x},available\n" for x in self.codes), request=req)
        if template == "/v1/campaigns/{campaign_id}/publications":
            return ok({"code": "SPRING-PUB", "customer_id": kw["json"]["customer_id"], "campaign_id": c["id"]}, 201)
        if template == "/v1/redemptions":
            return ok({"data": [{"id": "r1", "code": "SPRING-001", "order_id": params.get("order_id"),
                                 "customer_id": "k", "status": "succeeded"}], "next_cursor": None})
        if template == "/v1/vouchers/{code}":
            return problem(404, "no such code", "unknown_code")
        if template == "/v1/customers/{customer_id}":
            return problem(404, "no such customer", "unknown_customer")
        return ok({})


@pytest.fixture()
def app(monkeypatch: pytest.MonkeyPatch):
    def make(roles: str, documented: set[tuple[str, str]], lie_about: bool = False) -> tuple[AppTest, FakeApi]:
        fake = FakeApi(documented, lie_about)
        monkeypatch.setattr(httpx, "request", fake)
        monkeypatch.setenv("VOUCHER_API_URL", "http://api.test")
        at = AppTest.from_file(APP, default_timeout=30)
        at.run()
        at.text_input(key="email").input(f"{roles}@shop.test")
        at.text_input(key="password").input("pw")
        at.button[0].click()
        at.run()
        assert not at.exception, at.exception
        return at, fake
    return make


def _page(at: AppTest, page: str) -> AppTest:
    at.switch_page(page)
    at.run()
    assert not at.exception, (page, at.exception)
    return at


def _click(at: AppTest, label: str) -> None:
    next(b for b in at.button if b.label == label).click()
    at.run()
    assert not at.exception, at.exception


def _texts(els: Any) -> list[str]:
    return [str(e.value) for e in els]


def test_the_api_error_knows_a_missing_route_from_a_missing_thing() -> None:
    assert ApiError(405, "Method Not Allowed").missing_endpoint
    assert ApiError(404, "Not Found").missing_endpoint
    assert not ApiError(404, "no campaign has id 'x'", "unknown_campaign").missing_endpoint
    assert not ApiError(409, "paused", "campaign_paused").missing_endpoint


def test_roles_decide_the_pages(app) -> None:
    at, _ = app("analyst", CORE)
    assert at.session_state["roles"] == ["analyst"]
    for page in PAGES:
        if page in WRITE:
            with pytest.raises(ValueError):
                at.switch_page(page)
        else:
            _page(at, page)
    at, _ = app("admin", CORE | OPTIONAL)
    for page in PAGES:
        _page(at, page)
        assert not at.error, (page, _texts(at.error))


def test_pages_of_routes_the_document_leaves_out_say_so(app) -> None:
    at, fake = app("manager", CORE)
    _page(at, "backoffice/browse.py")
    info = " ".join(_texts(at.info))
    assert "/v1/campaigns/{campaign_id}/vouchers" in info and "/v1/campaigns/{campaign_id}/exports" in info
    _page(at, "backoffice/campaign.py")
    assert any("PATCH /v1/campaigns/{campaign_id}" in i for i in _texts(at.info))
    _page(at, "backoffice/issue.py")
    assert any("/publications" in i for i in _texts(at.info))
    _page(at, "backoffice/customers.py")
    at.text_input(key="bo_order_id").input("order-1")
    at.run()
    assert any("GET /v1/redemptions" in i for i in _texts(at.info))
    assert not at.error and not at.exception
    assert ("GET", "/v1/redemptions") not in fake.calls  # not even tried


def test_routes_that_answer_404_or_405_are_a_message_not_a_traceback(app) -> None:
    at, _ = app("admin", CORE, lie_about=True)
    _page(at, "backoffice/browse.py")
    assert any("cannot list a campaign's codes" in w for w in _texts(at.warning)), _texts(at.warning)
    _page(at, "backoffice/campaign.py")
    at.text_input(key="bo_edit_name").input("Renamed")
    _click(at, "Save changes")
    assert any("cannot edit campaigns" in w for w in _texts(at.warning)), _texts(at.warning)
    _page(at, "backoffice/issue.py")
    at.text_input(key="bo_publish_customer").input("cust-1")
    _click(at, "Publish")
    assert any("cannot publish codes" in w for w in _texts(at.warning)), _texts(at.warning)
    _page(at, "backoffice/customers.py")
    at.text_input(key="bo_order_id").input("order-1")
    at.run()
    assert any("cannot list redemptions" in w for w in _texts(at.warning)), _texts(at.warning)
    at.text_input(key="bo_customer_id").input("nobody")
    at.run()
    assert any("No customer 'nobody'" in w for w in _texts(at.warning))
    _page(at, "backoffice/voucher.py")
    at.text_input(key="bo_voucher_code").input("NOPE")
    at.run()
    assert any("No code 'NOPE'" in w for w in _texts(at.warning))
    assert not at.exception


def test_pages_of_the_routes_built_alongside_against_their_shapes(app) -> None:
    at, fake = app("admin", CORE | OPTIONAL)
    _page(at, "backoffice/browse.py")
    at.selectbox(key="bo_browse_limit").set_value(25)
    at.run()
    assert list(at.dataframe[0].value["code"]) == fake.codes
    assert {m.label: m.value for m in at.metric}["Available"] == "5"
    assert any("the last page" in c for c in _texts(at.caption))
    _click(at, "Export as CSV")
    assert any("ready: 7 codes" in s for s in _texts(at.success)), _texts(at.success)
    assert at.get("download_button")

    _page(at, "backoffice/campaign.py")
    at.text_input(key="bo_edit_name").input("Summer")
    _click(at, "Save changes")
    assert fake.campaign["name"] == "Summer" and fake.campaign["version"] == 2
    assert any("Saved name; version 2" in s for s in _texts(at.success))
    fake.campaign.update(name="Theirs", version=3)  # someone else saves in between
    at.number_input(key="bo_edit_total").set_value(100)
    _click(at, "Save changes")
    assert any("changed this in the meantime" in e for e in _texts(at.error)), _texts(at.error)
    assert fake.campaign["version"] == 3

    _page(at, "backoffice/issue.py")
    at.text_input(key="bo_publish_customer").input("cust-1")
    _click(at, "Publish")
    assert any("cust-1 has code SPRING-PUB" in s for s in _texts(at.success))

    _page(at, "backoffice/customers.py")
    at.text_input(key="bo_order_id").input("order-9")
    at.run()
    assert list(at.dataframe[0].value["order_id"]) == ["order-9"]


def _form(**over: Any) -> dict[str, Any]:
    v: dict[str, Any] = {
        "name": "Shoes", "type": "discount", "currency": "eur", "timezone": "", "kind": "percent",
        "value": 20, "target": "order", "gift_balance": 5000, "rules": "", "shared_code": "",
        "min_order": 0, "starts_at": "", "ends_at": "", "total": 0, "per_customer": 0,
        "prefix": "", "length": 0, "pattern": "",
    }
    v.update(over)
    return v


def test_the_new_campaign_form_sends_rules_targets_and_promotions_without_code() -> None:
    from reporting.backoffice.new_campaign import body_from_form

    body = body_from_form(_form(type="promotion", target="items", prefix="IGNORED",
                                rules='{"items": [{"any_of": {"categories": ["shoes"]}}]}'))
    assert body == {
        "name": "Shoes", "type": "promotion", "currency": "EUR", "timezone": "UTC",
        "discount": {"kind": "percent", "value": 20, "target": "items"},
        "rules": {"items": [{"any_of": {"categories": ["shoes"]}}]},
    }
    assert body_from_form(_form(kind="free_shipping"))["discount"] == {"kind": "free_shipping"}
    with pytest.raises(ValueError, match="Rules: not JSON"):
        body_from_form(_form(rules="{items"))
