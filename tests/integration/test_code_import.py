"""Importing a shop's own codes over HTTP: valid lines land on their owner shards and
redeem like generated codes; every refused line is reported with its reason (malformed,
duplicate in the file, existing in any campaign, over limits.total), and Postgres holds
exactly the imported ones."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.engine_support import campaign_codes, fetch, fetchval, uid
from tests.http_support import admin_headers, create_campaign, discount_body, generate_codes


def _import(url: str, headers: dict[str, str], cid: str, body: str, ctype: str = "text/csv") -> httpx.Response:
    return httpx.post(
        f"{url}/v1/campaigns/{cid}/vouchers/import",
        content=body.encode(),
        headers={**headers, "Content-Type": ctype},
        timeout=60,
    )


def test_import_reports_each_refused_line_and_imports_the_rest(http_api: Any) -> None:
    url, dsn = http_api.url, http_api.database_url
    admin = admin_headers(http_api)
    other = create_campaign(url, admin, discount_body("import other"))
    generate_codes(url, admin, other["id"], 2)
    taken = asyncio.run(campaign_codes(dsn, other["id"]))[0]
    c = create_campaign(url, admin, discount_body("import", limits={"total": 5}))
    cid = c["id"]
    p = uid("P").upper()
    csv = "\n".join([
        "code,customer_id,expires_at,metadata",
        f"{p}-1,,,",
        f"{p}-2,cus-{p},2031-01-01T00:00:00Z,\"{{\"\"batch\"\": 7}}\"",
        "bad code,,,",
        f"{p}-1,,,",
        f"{taken.lower()},,,",
        f"{p}-3,,not-a-date,",
        f"{p}-4,,,",
        f"{p}-5,,,",
        f"{p}-6,,,",
        f"{p}-7,,,",
    ]) + "\n"
    r = _import(url, admin, cid, csv)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["rows"], out["imported"], out["rejected"]) == (10, 5, 5), out
    reasons = {x["line"]: (x["field"], x["reason"]) for x in out["rejections"]}
    assert reasons[4][0] == "code"
    assert "duplicate" in reasons[5][1]
    assert "exists" in reasons[6][1]
    assert reasons[7][0] == "expires_at"
    assert "limits.total" in reasons[11][1]
    rows = asyncio.run(fetch(dsn, "SELECT code, status, customer_id, expires_at IS NOT NULL, metadata"
                                  " FROM vouchers WHERE campaign_id = $1 ORDER BY code", cid))
    assert [x[0] for x in rows] == [f"{p}-1", f"{p}-2", f"{p}-4", f"{p}-5", f"{p}-6"]
    assert tuple(rows[1])[1:4] == (1, f"cus-{p}", True) and "7" in rows[1][4]
    audit = asyncio.run(fetchval(dsn, "SELECT change FROM audit_log WHERE resource_id = $1"
                                      " AND action = 'vouchers.import'", cid))
    assert '"imported": 5' in audit

    httpx.post(f"{url}/v1/campaigns/{cid}/activate", headers=admin).raise_for_status()
    order = {"id": "o-imp", "amount": 5000, "currency": "EUR"}
    r = httpx.post(f"{url}/v1/redemptions", json={"code": f"{p}-1", "order": order}, headers=admin)
    assert r.status_code == 201, r.text
    r = httpx.post(f"{url}/v1/redemptions", json={"code": f"{p}-2", "order": order, "customer_id": "x"}, headers=admin)
    assert r.status_code == 409 and r.json()["code"] == "wrong_customer"
    r = httpx.post(f"{url}/v1/redemptions", json={"code": f"{p}-2", "order": order, "customer_id": f"cus-{p}"}, headers=admin)
    assert r.status_code == 201, r.text

    # sent again: every line is refused (the codes exist) and nothing changes
    again = _import(url, admin, cid, f'{{"code": "{p}-1"}}\n{{"code": "{p}-4"}}\n', "application/x-ndjson")
    assert again.status_code == 200 and again.json()["imported"] == 0 and again.json()["rejected"] == 2


def test_import_refusals_before_reading(http_api: Any) -> None:
    url = http_api.url
    admin = admin_headers(http_api)
    r = _import(url, admin, "cmp_nope", "code\nA1\n")
    assert r.status_code == 404 and r.json()["code"] == "unknown_campaign"
    c = create_campaign(url, admin, discount_body("import refusals"))
    r = _import(url, admin, c["id"], "code\nA1\n", "application/json")
    assert r.status_code == 415
    r = _import(url, admin, c["id"], "customer_id\nx\n")
    assert r.status_code == 422 and "code" in r.json()["detail"]
    shared = create_campaign(url, admin, discount_body("import shared", type="shared_code", shared_code=uid("S").upper()))
    r = _import(url, admin, shared["id"], "code\nA1\n")
    assert r.status_code == 422 and "shared code" in r.json()["detail"]
