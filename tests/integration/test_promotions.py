"""Automatic promotions over HTTP: given with a code or alone when the checkout asks,
best first on what the code left (no line below zero), within their limits and states;
each one a redemption record, replayed once under the checkout's idempotency key; never
reachable as a code, never generated, issued or published.

The promotions here are in SEK, a currency no other test uses, so the promotions other
tests create never fit these orders."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.engine_support import fetch
from tests.http_support import admin_headers, open_campaign

CUR = "SEK"


def _tag() -> str:
    return uuid.uuid4().hex[:8]


def _promotion(name: str, discount: dict[str, Any], rules: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    body = {"name": name, "type": "promotion", "currency": CUR, "discount": discount, **extra}
    if rules is not None:
        body["rules"] = rules
    return body


def _cart(cat: str) -> dict[str, Any]:
    # line 0: 2 shoes at 5,000 (10,000); line 1: 3 socks at 500 (1,500); shipping 495
    return {"currency": CUR, "shipping": 495, "items": [
        {"sku": "SHOE", "categories": [cat], "quantity": 2, "unit_price": 5000},
        {"sku": "SOCK", "categories": ["socks"], "quantity": 3, "unit_price": 500},
    ]}


def _post(url: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{url}/v1/{path}", json=body, headers=headers, timeout=30)


def _until(url: str, headers: dict[str, str], body: dict[str, Any], want: set[str]) -> dict[str, Any]:
    """The validation of ``body`` once every promotion of ``want`` is in it, at most 20 s.

    One replica answering with them does not mean the other has refreshed: a replica's
    catalog is at most its refresh (2 s) older than the request it answers. So once seen,
    this waits that long again, after which every replica answers with them."""
    deadline = time.monotonic() + 20
    while True:
        r = _post(url, "validations", body, headers)
        assert r.status_code == 200, r.text
        got = {p["campaign_id"] for p in r.json().get("promotions") or []}
        if want <= got:
            time.sleep(2.5)
            return dict(r.json())
        assert time.monotonic() < deadline, f"no replica gives {want - got} after 20 s: {r.text}"
        time.sleep(0.3)


def test_promotions_stack_on_a_code_and_alone_within_their_limits(http_api: Any) -> None:
    url, dsn, admin = http_api.url, http_api.database_url, admin_headers(http_api)
    cat = f"shoes-{_tag()}"
    shoes = {"items": [{"any_of": {"categories": [cat]}}]}
    pct = open_campaign(url, admin, _promotion("10 % shoes", {"kind": "percent", "value": 10, "target": "items"}, shoes))
    ship = open_campaign(url, admin, _promotion("free shipping", {"kind": "free_shipping"},
                                                {**shoes, "min_order": 5000}))
    once = open_campaign(url, admin, _promotion("first buyer", {"kind": "amount", "value": 300},
                                                shoes, limits={"total": 1}))
    r = httpx.post(f"{url}/v1/campaigns", json=_promotion("draft", {"kind": "percent", "value": 50}, shoes),
                   headers=admin)
    assert r.status_code == 201, r.text
    assert (r.json()["type"], r.json()["shared_code"]) == ("promotion", None)
    draft = r.json()["id"]
    code = f"PROMO-{_tag().upper()}"
    open_campaign(url, admin, {"name": "coupon", "type": "shared_code", "currency": CUR, "shared_code": code,
                               "discount": {"kind": "percent", "value": 60, "target": "items"}, "rules": shoes})

    # with the code: 60 % of the shoes (6,000) first; 10 % (1,000) fits in the 4,000 left;
    # 300 off fits; free shipping 495. The draft is never given.
    body = {"code": code, "customer_id": "p-1", "order": _cart(cat), "apply_promotions": True}
    v = _until(url, admin, body, {pct, ship, once})
    given = {p["campaign_id"]: p for p in v["promotions"]}
    assert draft not in given and set(given) == {pct, ship, once}, v
    assert v["discount_amount"] == 6000
    assert (given[pct]["discount_amount"], given[ship]["shipping_discount"], given[once]["discount_amount"]) == (1000, 495, 300)
    assert v["total_discount"] == 6000 + 1000 + 495 + 300
    per_line = {0: 6000}
    for p in v["promotions"]:
        for ln in p["items"]:
            per_line[ln["line"]] = per_line.get(ln["line"], 0) + ln["discount"]
    assert per_line[0] <= 10000 and per_line.get(1, 0) <= 1500

    # promotions alone, redeemed: each a record; the limited one only once
    key = {"Idempotency-Key": f"promo-{uuid.uuid4().hex}"}
    alone = {"customer_id": "p-2", "order": _cart(cat), "apply_promotions": True}
    r1 = _post(url, "redemptions", alone, {**admin, **key})
    assert r1.status_code == 201, r1.text
    a = r1.json()
    assert a["id"] is None and a["code"] is None
    got = {p["campaign_id"]: p for p in a["promotions"]}
    assert set(got) == {pct, ship, once} and a["total_discount"] == 1000 + 495 + 300
    ids = sorted(p["redemption_id"] for p in a["promotions"])
    rows = asyncio.run(fetch(dsn, "SELECT id, campaign_id, code, discount_amount FROM redemptions"
                                  " WHERE id = ANY($1::text[]) ORDER BY id", ids))
    assert [r["id"] for r in rows] == ids
    assert {r["campaign_id"]: r["discount_amount"] for r in rows} == {pct: 1000, ship: 495, once: 300}
    # the replay gives the same records, and writes none
    r2 = _post(url, "redemptions", alone, {**admin, **key})
    assert r2.status_code == 201 and sorted(p["redemption_id"] for p in r2.json()["promotions"]) == ids
    # another order: the one-time promotion is used up
    r3 = _post(url, "redemptions", {**alone, "customer_id": "p-3"}, admin)
    assert r3.status_code == 201, r3.text
    assert {p["campaign_id"] for p in r3.json()["promotions"]} == {pct, ship}
    n = asyncio.run(fetch(dsn, "SELECT count(*) AS n FROM redemptions WHERE campaign_id = $1", once))[0]["n"]
    assert n == 1

    # an order none fits
    other = {"customer_id": "p-4", "order": {"currency": CUR, "amount": 100}, "apply_promotions": True}
    r = _post(url, "redemptions", other, admin)
    assert r.status_code == 409 and r.json()["code"] == "rule_not_met", r.text
    v = _post(url, "validations", other, admin).json()
    assert (v["valid"], v["reason"], v["promotions"]) == (False, "rule_not_met", [])


def test_a_promotion_is_no_code(http_api: Any) -> None:
    url, admin = http_api.url, admin_headers(http_api)
    cid = open_campaign(url, admin, _promotion("nocode", {"kind": "percent", "value": 5}))
    r = _post(url, "redemptions", {"code": f"~{cid}", "order": {"currency": CUR, "amount": 1000}}, admin)
    assert r.status_code == 404 and r.json()["code"] == "unknown_code", r.text
    r = httpx.post(f"{url}/v1/campaigns/{cid}/generate", json={"count": 5}, headers=admin)
    assert r.status_code == 422, r.text
    r = httpx.post(f"{url}/v1/campaigns", json=_promotion("with code", {"kind": "percent", "value": 5},
                                                            shared_code="SHOULD-NOT"), headers=admin)
    assert r.status_code == 422 and "no code" in r.json()["detail"], r.text


@pytest.mark.parametrize(
    ("body", "path", "needle"),
    [
        ({"order": {"currency": CUR, "amount": 100}}, "redemptions", "code is required"),
        ({"code": "X-1", "order": {"currency": CUR, "amount": 100}, "apply_promotions": True},
         "reservations", "apply_promotions is for validations and redemptions"),
    ],
)
def test_checkouts_promotions_cannot_serve_are_refused(
    http_api: Any, body: dict[str, Any], path: str, needle: str
) -> None:
    r = _post(http_api.url, path, body, admin_headers(http_api))
    assert r.status_code == 422 and needle in r.json()["detail"], r.text


def test_a_limited_promotion_is_given_exactly_its_limit_under_concurrent_checkouts(http_api: Any) -> None:
    """40 checkouts at once for a promotion of 10, one per customer, and a customer who
    tries twice: exactly 10 are given, every one acknowledged is in Postgres, nobody twice."""
    url, dsn, admin = http_api.url, http_api.database_url, admin_headers(http_api)
    cat = f"flash-{_tag()}"
    cid = open_campaign(url, admin, _promotion(
        "first ten", {"kind": "amount", "value": 700},
        {"items": [{"any_of": {"categories": [cat]}}]}, limits={"total": 10, "per_customer": 1}))
    body = {"customer_id": "warm", "order": _cart(cat), "apply_promotions": True}
    _until(url, admin, {**body, "customer_id": "nobody-yet"}, {cid})  # every replica knows it

    async def one(client: httpx.AsyncClient, n: int) -> dict[str, Any]:
        who = "twice" if n % 20 == 0 else f"c-{n}"
        r = await client.post(f"{url}/v1/redemptions", headers=admin,
                              json={**body, "customer_id": who, "order": {**_cart(cat), "id": f"o-{n}"}})
        assert r.status_code in (201, 409), r.text
        return {"who": who, "given": [p for p in r.json().get("promotions") or [] if p["campaign_id"] == cid]}

    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=60) as client:
            return list(await asyncio.gather(*(one(client, n) for n in range(40))))

    answers = asyncio.run(run())
    acked = [(a["who"], g["redemption_id"]) for a in answers for g in a["given"]]
    rows = asyncio.run(fetch(dsn, "SELECT id, customer_id FROM redemptions WHERE campaign_id = $1 AND status = 0", cid))
    assert len(acked) == len(rows) == 10
    assert {r["id"] for r in rows} == {rid for _, rid in acked}
    assert len({r["customer_id"] for r in rows}) == 10  # one per customer, "twice" at most once


def test_a_retried_checkout_gets_the_promotions_it_was_given_whatever_started_or_ended_since(
    http_api: Any,
) -> None:
    """A redemption with promotions is retried with its key after one of its promotions
    ended and another started: the retry answers what the first attempt gave (the ended
    one included, the new one not), and Postgres holds exactly that; with a code and
    without."""
    url, dsn, admin = http_api.url, http_api.database_url, admin_headers(http_api)
    cat = f"retry-{_tag()}"
    shoes = {"items": [{"any_of": {"categories": [cat]}}]}
    probe = {"customer_id": "r-probe", "order": _cart(cat), "apply_promotions": True}
    code = f"RETRY-{_tag().upper()}"
    open_campaign(url, admin, {"name": "coupon", "type": "shared_code", "currency": CUR, "shared_code": code,
                               "discount": {"kind": "amount", "value": 100}})

    def retried(body: dict[str, Any], ending: str) -> None:
        _until(url, admin, probe, {ending})
        key = {"Idempotency-Key": f"retry-{uuid.uuid4().hex}"}
        r1 = _post(url, "redemptions", body, {**admin, **key})
        assert r1.status_code == 201, r1.text
        given = {p["campaign_id"] for p in r1.json()["promotions"]}
        assert ending in given, r1.text
        r = httpx.post(f"{url}/v1/campaigns/{ending}/end", headers=admin)
        assert r.status_code == 200, r.text
        later = open_campaign(url, admin, _promotion("starts later", {"kind": "amount", "value": 200}, shoes))
        seen = _until(url, admin, probe, {later})  # the catalog has both changes now
        assert ending not in {p["campaign_id"] for p in seen["promotions"]}, seen
        r2 = _post(url, "redemptions", body, {**admin, **key})
        assert r2.status_code == 201, r2.text
        assert r2.json()["promotions"] == r1.json()["promotions"], (r1.text, r2.text)
        assert r2.json()["total_discount"] == r1.json()["total_discount"]
        rows = asyncio.run(fetch(dsn, "SELECT campaign_id FROM redemptions WHERE customer_id = $1 AND status = 0",
                                 body["customer_id"]))
        assert sorted(r["campaign_id"] for r in rows if r["campaign_id"] in given | {later}) == sorted(given)
        httpx.post(f"{url}/v1/campaigns/{later}/end", headers=admin)

    order = {**_cart(cat), "id": f"o-{_tag()}"}
    retried({"customer_id": "r-1", "order": order, "apply_promotions": True},
            open_campaign(url, admin, _promotion("ends soon", {"kind": "percent", "value": 10, "target": "items"},
                                                 shoes)))
    order = {**_cart(cat), "id": f"o-{_tag()}"}
    retried({"code": code, "customer_id": "r-2", "order": order, "apply_promotions": True},
            open_campaign(url, admin, _promotion("ends soon too", {"kind": "amount", "value": 250}, shoes)))
