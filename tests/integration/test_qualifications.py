"""Qualification over the real HTTP API, shards and Postgres: the offers answered are what
checkout then gives (the best one redeemed for exactly its discount), and every reason an
offer goes away holds: a shared code's total counting open reservations, its per-customer
uses, a code redeemed or held, a campaign paused, ended or outside its sale window, a code
switched off, a customer rule; a customer qualifies only themselves."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.engine_support import uid
from tests.http_support import admin_headers, open_campaign

EUR_40 = {"amount": 4000, "currency": "EUR"}


class Shop:
    """One module's campaigns and customer, and the calls the tests make."""

    def __init__(self, api: Any, engine: Any) -> None:
        self.url = api.url
        self.admin = admin_headers(api)
        self.engine = engine
        self.ids: dict[str, str] = {}
        self.customer = uid("shopper")

    def open(self, name: str, body: dict[str, Any], codes: int = 0) -> str:
        body = {"name": name, "currency": "EUR", **body}
        if codes:
            r = httpx.post(f"{self.url}/v1/campaigns", json=body, headers=self.admin)
            assert r.status_code == 201, r.text
            cid = str(r.json()["id"])
            r = httpx.post(f"{self.url}/v1/campaigns/{cid}/generate", json={"count": codes}, headers=self.admin)
            assert r.status_code == 202, r.text
            job = r.json()["id"]
            while (j := httpx.get(f"{self.url}/v1/jobs/{job}", headers=self.admin).json())["state"] == "running":
                time.sleep(0.1)
            assert j["state"] == "done", j
            httpx.post(f"{self.url}/v1/campaigns/{cid}/activate", headers=self.admin).raise_for_status()
        else:
            cid = open_campaign(self.url, self.admin, body)
        self.ids[name] = cid
        return cid

    def assign(self, name: str, customer: str | None = None) -> str:
        a = asyncio.run(self.engine.assign(self.ids[name], customer or self.customer))
        return str(a.code)

    def qualify(self, order: dict[str, Any] = EUR_40, customer: str | None = None,
                headers: dict[str, str] | None = None, **extra: Any) -> list[dict[str, Any]]:
        """This module's offers for ``customer`` (other modules' campaigns left out: every
        offer is asked for, as those of other modules' campaigns may be among the best)."""
        body = {"customer_id": customer or self.customer, "order": order, "limit": 1000, **extra}
        r = httpx.post(f"{self.url}/v1/qualifications", json=body, headers=headers or self.admin, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["customer_id"] == body["customer_id"] and r.json()["currency"] == order["currency"]
        mine = set(self.ids.values())
        offers = [o for o in r.json()["offers"] if o["campaign_id"] in mine]
        all_offers = r.json()["offers"]
        keys = [(-o["discount_amount"], o["campaign_id"]) for o in all_offers]
        assert keys == sorted(keys), "best first, ties by campaign id"
        return offers

    def names(self, offers: list[dict[str, Any]]) -> list[str]:
        by_id = {v: k for k, v in self.ids.items()}
        return [by_id[o["campaign_id"]] for o in offers]

    def checkout(self, path: str, code: str, customer: str | None = None,
                 order: dict[str, Any] = EUR_40) -> httpx.Response:
        body = {"code": code, "customer_id": customer or self.customer, "order": order}
        return httpx.post(f"{self.url}/v1/{path}", json=body, headers=self.admin, timeout=30)


@pytest.fixture(scope="module")
def shop(http_api: Any, engine: Any) -> Shop:
    s = Shop(http_api, engine)
    now = datetime.now(UTC)
    s.open("shared", {"type": "shared_code", "shared_code": uid("QS").upper(),
                      "discount": {"kind": "amount", "value": 700},
                      "limits": {"total": 3, "per_customer": 1}})
    s.open("percent", {"type": "discount", "discount": {"kind": "percent", "value": 25}}, codes=4)
    s.open("gift", {"type": "gift_card", "gift_balance": 1500}, codes=2)
    s.open("flash", {"type": "flash_sale", "shared_code": uid("QF").upper(),
                     "discount": {"kind": "percent", "value": 10},
                     "limits": {"total": 100, "per_customer": 5},
                     "starts_at": (now - timedelta(minutes=1)).isoformat(),
                     "ends_at": (now + timedelta(days=1)).isoformat()})
    s.assign("percent")
    s.assign("gift")
    return s


def test_offers_are_what_checkout_gives_best_first(shop: Shop) -> None:
    offers = shop.qualify()
    assert shop.names(offers) == ["gift", "percent", "shared", "flash"]
    assert [o["discount_amount"] for o in offers] == [1500, 1000, 700, 400]
    gift = offers[0]
    assert gift["balance"] == 1500 and gift["kind"] == "unique_code" and gift["campaign_type"] == "gift_card"
    assert offers[2]["kind"] == "shared_code" and offers[2]["balance"] is None
    assert all(o["items"] == [] and o["shipping_discount"] == 0 for o in offers)
    # each offer validates for the same amount, and the best redeems for exactly it
    for o in offers:
        v = shop.checkout("validations", o["code"]).json()
        assert v["valid"] and v["discount_amount"] == o["discount_amount"], (o, v)
    r = shop.checkout("redemptions", gift["code"])
    assert r.status_code == 201 and r.json()["discount_amount"] == gift["discount_amount"], r.text
    # the spent gift card is gone; the rest stay; another customer has only the shared codes
    assert shop.names(shop.qualify()) == ["percent", "shared", "flash"]
    assert shop.names(shop.qualify(customer=uid("someone"))) == ["shared", "flash"]
    # an order in another currency qualifies for none of them
    assert shop.qualify({"amount": 4000, "currency": "USD"}) == []
    # limit keeps the best
    r = httpx.post(f"{shop.url}/v1/qualifications", headers=shop.admin,
                   json={"customer_id": shop.customer, "order": EUR_40, "limit": 1})
    assert r.status_code == 200 and len(r.json()["offers"]) == 1 and r.json()["has_more"] is True


def test_a_shared_codes_limits_count_open_reservations(shop: Shop) -> None:
    code = next(o["code"] for o in shop.qualify() if shop.ids["shared"] == o["campaign_id"])
    ann, bob, cy, dee = (uid(n) for n in ("ann", "bob", "cy", "dee"))
    held = shop.checkout("reservations", code, ann)
    assert held.status_code == 201, held.text
    # ann's hold uses her one per-customer use; bob still qualifies
    assert "shared" not in shop.names(shop.qualify(customer=ann))
    assert "shared" in shop.names(shop.qualify(customer=bob))
    assert shop.checkout("redemptions", code, bob).status_code == 201
    assert shop.checkout("reservations", code, cy).status_code == 201
    # 1 redemption + 2 holds = the total of 3: nobody else qualifies, as checkout says
    assert "shared" not in shop.names(shop.qualify(customer=dee))
    assert shop.checkout("validations", code, dee).json()["reason"] == "exhausted"
    r = httpx.post(f"{shop.url}/v1/reservations/{held.json()['id']}/release", headers=shop.admin)
    assert r.status_code == 200, r.text
    assert "shared" in shop.names(shop.qualify(customer=dee))
    assert "shared" in shop.names(shop.qualify(customer=ann))


def test_a_held_redeemed_or_switched_off_code_is_not_offered(shop: Shop) -> None:
    cust = uid("held")
    code = shop.assign("percent", cust)
    assert "percent" in shop.names(shop.qualify(customer=cust))
    held = shop.checkout("reservations", code, cust)
    assert held.status_code == 201, held.text
    assert "percent" not in shop.names(shop.qualify(customer=cust))
    r = httpx.post(f"{shop.url}/v1/reservations/{held.json()['id']}/confirm", headers=shop.admin)
    assert r.status_code == 201, r.text
    assert "percent" not in shop.names(shop.qualify(customer=cust))
    r = httpx.post(f"{shop.url}/v1/redemptions/{r.json()['id']}/rollback", headers=shop.admin)
    assert r.status_code == 200, r.text
    assert "percent" in shop.names(shop.qualify(customer=cust))
    r = httpx.patch(f"{shop.url}/v1/vouchers/{code}", json={"active": False}, headers=shop.admin)
    assert r.status_code == 200, r.text
    assert "percent" not in shop.names(shop.qualify(customer=cust))
    httpx.patch(f"{shop.url}/v1/vouchers/{code}", json={"active": True}, headers=shop.admin).raise_for_status()
    assert "percent" in shop.names(shop.qualify(customer=cust))


def test_paused_ended_and_outside_the_sale_window(shop: Shop) -> None:
    now = datetime.now(UTC)
    closed_day = (now.weekday() + 3) % 7
    shop.open("window", {"type": "flash_sale", "shared_code": uid("QW").upper(),
                         "discount": {"kind": "amount", "value": 100}, "limits": {"total": 10},
                         "starts_at": (now - timedelta(minutes=1)).isoformat(),
                         "ends_at": (now + timedelta(days=1)).isoformat(),
                         "windows": [{"days": [closed_day], "start": "00:00", "end": "23:59"}]})
    shop.open("later", {"type": "shared_code", "shared_code": uid("QL").upper(),
                        "discount": {"kind": "amount", "value": 100},
                        "starts_at": (now + timedelta(days=1)).isoformat()})
    shop.open("ending", {"type": "shared_code", "shared_code": uid("QE").upper(),
                         "discount": {"kind": "amount", "value": 100}})
    cust = uid("dates")
    assert shop.names(shop.qualify(customer=cust)) == ["shared", "flash", "ending"]
    cid = shop.ids["flash"]
    httpx.post(f"{shop.url}/v1/campaigns/{cid}/pause", headers=shop.admin).raise_for_status()
    assert "flash" not in shop.names(shop.qualify(customer=cust))
    httpx.post(f"{shop.url}/v1/campaigns/{cid}/activate", headers=shop.admin).raise_for_status()
    assert "flash" in shop.names(shop.qualify(customer=cust))
    r = httpx.patch(f"{shop.url}/v1/campaigns/{shop.ids['ending']}", headers=shop.admin,
                    json={"ends_at": (now - timedelta(seconds=1)).isoformat()})
    assert r.status_code == 200, r.text
    assert shop.names(shop.qualify(customer=cust)) == ["shared", "flash"]
    httpx.post(f"{shop.url}/v1/campaigns/{shop.ids['percent']}/end", headers=shop.admin).raise_for_status()
    assert "percent" not in shop.names(shop.qualify())


def test_customer_rules_see_the_callers_or_the_stored_tags(shop: Shop) -> None:
    shop.open("vip", {"type": "shared_code", "shared_code": uid("QV").upper(),
                      "discount": {"kind": "amount", "value": 900},
                      "rules": {"customer": {"tags_any": ["vip"]}}})
    cust = uid("tags")
    assert "vip" not in shop.names(shop.qualify(customer=cust))
    assert "vip" not in shop.names(shop.qualify(customer=cust, customer_tags=["regular"]))
    offers = shop.qualify(customer=cust, customer_tags=["vip"])
    assert shop.names(offers)[0] == "vip" and offers[0]["discount_amount"] == 900
    # a stored customer tagged vip qualifies without tags sent, as checkout sees it
    stored = uid("stored")
    r = httpx.post(f"{shop.url}/v1/customers", headers=shop.admin, json={"id": stored, "tags": ["vip"]})
    assert r.status_code == 201, r.text
    offers = shop.qualify(customer=stored)
    assert shop.names(offers)[0] == "vip"
    r = shop.checkout("redemptions", offers[0]["code"], stored)
    assert r.status_code == 201 and r.json()["discount_amount"] == 900, r.text


def test_lines_and_shipping_are_priced_as_checkout_prices_them(shop: Shop) -> None:
    shop.open("shoes", {"type": "shared_code", "shared_code": uid("QH").upper(),
                        "discount": {"kind": "percent", "value": 20, "target": "items"},
                        "rules": {"items": [{"any_of": {"categories": ["shoes"]}, "min_quantity": 2}]}})
    shop.open("ship", {"type": "shared_code", "shared_code": uid("QP").upper(),
                       "discount": {"kind": "free_shipping"}})
    order = {"currency": "EUR", "shipping": 490, "items": [
        {"sku": "SHOE-1", "quantity": 2, "unit_price": 3000, "categories": ["shoes"]},
        {"sku": "SOCK-1", "quantity": 3, "unit_price": 500, "categories": ["socks"]},
    ]}
    cust = uid("cart")
    offers = {o["campaign_id"]: o for o in shop.qualify(order, customer=cust)}
    shoes, ship = offers[shop.ids["shoes"]], offers[shop.ids["ship"]]
    assert shoes["discount_amount"] == 1200
    assert shoes["items"] == [{"line": 0, "sku": "SHOE-1", "discount": 1200}]
    assert ship["discount_amount"] == ship["shipping_discount"] == 490 and ship["items"] == []
    for o in (shoes, ship):
        r = shop.checkout("redemptions", o["code"], cust, order)
        assert r.status_code == 201, r.text
        got = r.json()
        assert (got["discount_amount"], got["items"], got["shipping_discount"]) == (
            o["discount_amount"], o["items"], o["shipping_discount"])
    one_shoe = {**order, "items": [{**order["items"][0], "quantity": 1}]}
    assert shop.ids["shoes"] not in {o["campaign_id"] for o in shop.qualify(one_shoe, customer=cust)}


def test_a_customer_qualifies_only_themselves(shop: Shop, http_api: Any) -> None:
    email = f"{uid('buyer')}@shop.example"
    r = httpx.post(f"{shop.url}/v1/auth/register", json={"email": email, "password": "a-long-password", "name": "b"})
    assert r.status_code == 201, r.text
    me = r.json()["id"]
    r = httpx.post(f"{shop.url}/v1/auth/login", json={"email": email, "password": "a-long-password"})
    headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
    code = shop.assign("gift", me)
    offers = shop.qualify(customer=me, headers=headers)
    assert [o["code"] for o in offers if o["campaign_id"] == shop.ids["gift"]] == [code]
    r = httpx.post(f"{shop.url}/v1/qualifications", headers=headers,
                   json={"customer_id": shop.customer, "order": EUR_40})
    assert r.status_code == 403 and r.headers["content-type"].startswith("application/problem+json")
    r = httpx.post(f"{shop.url}/v1/qualifications", headers=headers,
                   json={"customer_id": me, "order": EUR_40, "customer_tags": ["vip"]})
    assert r.status_code == 403


def test_bad_orders_are_4xx_problems(shop: Shop) -> None:
    for order in ({"amount": 10, "currency": "EUD"}, {"amount": -1, "currency": "EUR"}, {"currency": "EUR"}):
        r = httpx.post(f"{shop.url}/v1/qualifications", headers=shop.admin,
                       json={"customer_id": shop.customer, "order": order})
        assert r.status_code == 422, r.text
        assert r.headers["content-type"].startswith("application/problem+json")


def test_a_promotion_is_offered_without_a_code_and_checkout_gives_it(shop: Shop) -> None:
    cid = shop.open("promo", {"type": "promotion", "discount": {"kind": "amount", "value": 300},
                              "limits": {"per_customer": 1}})
    cust = uid("promo")
    [offer] = [o for o in shop.qualify(customer=cust) if o["campaign_id"] == cid]
    assert (offer["kind"], offer["code"], offer["discount_amount"]) == ("promotion", None, 300)
    # checkout asked for promotions gives it (each replica learns of it within seconds)
    deadline = time.monotonic() + 15
    while True:
        r = httpx.post(f"{shop.url}/v1/redemptions", headers=shop.admin,
                       json={"customer_id": cust, "apply_promotions": True, "order": EUR_40})
        given = [p for p in (r.json().get("promotions") or []) if p["campaign_id"] == cid] if r.status_code == 201 else []
        if given or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert given and given[0]["discount_amount"] == 300, r.text
    # its one use per customer is spent: no longer offered to this customer
    assert cid not in {o["campaign_id"] for o in shop.qualify(customer=cust)}
