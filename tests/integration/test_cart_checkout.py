"""Orders with lines over HTTP: each kind on its target, rules and their refusals, worked
out by hand on one cart; the explanation kept with the redemption in Postgres and shown by
the history; a reservation confirmed at the price of the cart it held; customer rules on
the stored customer's tags and on tags a trusted caller sends; bad orders and impossible
rules refused with a problem naming what is wrong."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest

from tests.engine_support import fetch
from tests.http_support import admin_headers, open_campaign

# The cart every case prices (minor units): 13,500 of goods and 495 of shipping.
#   line 0: SHOE-1, product P-SHOE, category shoes, 2 x 5,000 = 10,000
#   line 1: SOCK-1, categories socks + accessories, 3 x 500   =  1,500
#   line 2: HAT-1,  category accessories,             1 x 2,000 =  2,000
ITEMS = [
    {"sku": "SHOE-1", "product_id": "P-SHOE", "categories": ["shoes"], "quantity": 2, "unit_price": 5000},
    {"sku": "SOCK-1", "categories": ["socks", "accessories"], "quantity": 3, "unit_price": 500},
    {"sku": "HAT-1", "categories": ["accessories"], "quantity": 1, "unit_price": 2000},
]
ORDER = {"currency": "EUR", "shipping": 495, "items": ITEMS}
SHOES = {"any_of": {"categories": ["shoes"]}}

# (name, discount, rules, expected: (discount_amount, {line: discount}, shipping_discount))
CASES: list[tuple[str, dict[str, Any], dict[str, Any] | None, Any]] = [
    # 20 % of the shoes line: 10,000 * 20 % = 2,000
    ("pct-shoes", {"kind": "percent", "value": 20, "target": "items"}, {"items": [SHOES]},
     (2000, {0: 2000}, 0)),
    # the cheapest unit (a sock at 500) free
    ("cheapest-free", {"kind": "percent", "value": 100, "target": "cheapest_item"}, None,
     (500, {1: 500}, 0)),
    # buy 2 get 1: three socks in the cart, one free (500)
    ("sock-3for2", {"kind": "free_units", "value": 1, "target": "items"},
     {"items": [{"any_of": {"skus": ["SOCK-1"]}, "min_quantity": 3}]}, (500, {1: 500}, 0)),
    # free shipping over 50 EUR: 495
    ("free-ship", {"kind": "free_shipping"}, {"min_order": 5000}, (495, {}, 495)),
    # 10 % of the order without socks: eligible 12,000 -> 1,200, spread 10,000 : 2,000
    ("pct-no-socks", {"kind": "percent", "value": 10}, {"exclude": {"categories": ["socks"]}},
     (1200, {0: 1000, 2: 200}, 0)),
    # 1,000 off each shoe (2,000), capped at 1,500
    ("amount-shoe-cap", {"kind": "amount", "value": 1000, "target": "items", "max": 1500},
     {"items": [SHOES]}, (1500, {0: 1500}, 0)),
    # shoes at 3,000 each: (5,000 - 3,000) * 2 = 4,000
    ("fixed-shoe", {"kind": "fixed_price", "value": 3000, "target": "items"}, {"items": [SHOES]},
     (4000, {0: 4000}, 0)),
    # 5 EUR off the order, spread over 13,500 by line totals: 3,703.70 / 555.56 / 740.74
    # -> 3,703 / 555 / 740 = 4,998; the 2 left go to the largest remainders (.74 and .70)
    ("amount-order", {"kind": "amount", "value": 5000}, None, (5000, {0: 3704, 1: 555, 2: 741}, 0)),
]
REFUSED: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("hats", {"kind": "percent", "value": 10},
     {"items": [{"any_of": {"categories": ["hats"]}, "min_quantity": 2}]},
     "needs 2 items in category hats, the order has 0"),
    ("small-orders", {"kind": "percent", "value": 10}, {"max_order": 10000},
     "applies to orders up to 10000, the order has 13500"),
    ("shoe-spend", {"kind": "percent", "value": 10},
     {"items": [{"any_of": {"categories": ["shoes"]}, "min_subtotal": 20000}]},
     "needs 20000 of items in category shoes, the order has 10000"),
]


def _shared(name: str, discount: dict[str, Any], rules: dict[str, Any] | None) -> dict[str, Any]:
    code = f"CART-{name.upper()}-{uuid.uuid4().hex[:6].upper()}"
    body: dict[str, Any] = {
        "name": name, "type": "shared_code", "currency": "EUR", "discount": discount, "shared_code": code,
    }
    if rules is not None:
        body["rules"] = rules
    return body


@pytest.fixture(scope="module")
def codes(http_api: Any) -> dict[str, str]:
    admin = admin_headers(http_api)
    out = {}
    for name, discount, rules, _ in CASES:
        body = _shared(name, discount, rules)
        open_campaign(http_api.url, admin, body)
        out[name] = body["shared_code"]
    for name, discount, rules, _ in REFUSED:
        body = _shared(name, discount, rules)
        open_campaign(http_api.url, admin, body)
        out[name] = body["shared_code"]
    return out


def _validate(url: str, headers: dict[str, str], code: str, order: dict[str, Any], **extra: Any) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/validations", json={"code": code, "order": order, **extra}, headers=headers)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _lines(answer: dict[str, Any]) -> dict[int, int]:
    return {ln["line"]: ln["discount"] for ln in answer["items"]}


@pytest.mark.parametrize(("name", "expected"), [(c[0], c[3]) for c in CASES])
def test_each_kind_on_its_target_gives_the_hand_computed_discount(
    http_api: Any, codes: dict[str, str], name: str, expected: Any
) -> None:
    v = _validate(http_api.url, admin_headers(http_api), codes[name], ORDER)
    assert v["valid"], v
    discount, lines, shipping = expected
    assert (v["discount_amount"], _lines(v), v["shipping_discount"]) == (discount, lines, shipping)
    assert {ln["line"]: ln["sku"] for ln in v["items"]} == {i: ITEMS[i]["sku"] for i in lines}


@pytest.mark.parametrize(("name", "message"), [(c[0], c[3]) for c in REFUSED])
def test_a_rule_not_met_names_the_condition(
    http_api: Any, codes: dict[str, str], name: str, message: str
) -> None:
    url, admin = http_api.url, admin_headers(http_api)
    v = _validate(url, admin, codes[name], ORDER)
    assert (v["valid"], v["reason"], v["message"]) == (False, "rule_not_met", message)
    r = httpx.post(f"{url}/v1/redemptions", json={"code": codes[name], "order": ORDER}, headers=admin)
    assert r.status_code == 409 and r.json()["code"] == "rule_not_met" and r.json()["detail"] == message


def test_amount_only_orders_still_work_and_item_rules_say_what_is_missing(
    http_api: Any, codes: dict[str, str]
) -> None:
    url, admin = http_api.url, admin_headers(http_api)
    v = _validate(url, admin, codes["amount-order"], {"amount": 8000, "currency": "EUR"})
    assert (v["valid"], v["discount_amount"], v["items"], v["shipping_discount"]) == (True, 5000, [], 0)
    v = _validate(url, admin, codes["pct-shoes"], {"amount": 8000, "currency": "EUR"})
    assert v["reason"] == "rule_not_met"
    assert v["message"] == "needs items in category shoes: the order lists no items"


def test_a_redemption_keeps_its_explanation_and_a_confirm_prices_the_cart_it_held(
    http_api: Any, codes: dict[str, str]
) -> None:
    url, dsn, admin = http_api.url, http_api.database_url, admin_headers(http_api)
    body = {"code": codes["pct-no-socks"], "customer_id": "cart-1", "order": {**ORDER, "id": "cart-o-1"}}
    r = httpx.post(f"{url}/v1/redemptions", json=body, headers=admin)
    assert r.status_code == 201, r.text
    red = r.json()
    assert (red["discount_amount"], _lines(red), red["order_amount"]) == (1200, {0: 1000, 2: 200}, 13500)
    [row] = asyncio.run(fetch(dsn, "SELECT discount_amount, detail FROM redemptions WHERE id = $1", red["id"]))
    detail = json.loads(row["detail"])
    assert row["discount_amount"] == 1200 and sum(ln["discount"] for ln in detail["items"]) == 1200
    got = httpx.get(f"{url}/v1/redemptions/{red['id']}", headers=admin).json()
    assert (got["items"], got["shipping_discount"]) == (red["items"], 0)

    res = httpx.post(f"{url}/v1/reservations", json={**body, "order": {**ORDER, "id": "cart-o-2"}}, headers=admin)
    assert res.status_code == 201, res.text
    assert (res.json()["discount_amount"], _lines(res.json())) == (1200, {0: 1000, 2: 200})
    assert "cart" not in res.json()
    conf = httpx.post(f"{url}/v1/reservations/{res.json()['id']}/confirm", headers=admin)
    assert conf.status_code == 201, conf.text
    assert (conf.json()["discount_amount"], _lines(conf.json())) == (1200, {0: 1000, 2: 200})


def test_customer_rules_use_the_stored_tags_or_the_trusted_callers(http_api: Any) -> None:
    url, admin = http_api.url, admin_headers(http_api)
    vip, plain, blocked = (f"cust-{k}-{uuid.uuid4().hex[:6]}" for k in ("vip", "plain", "blocked"))
    for cid, tags in ((vip, ["vip"]), (plain, ["newsletter"]), (blocked, ["vip", "staff"])):
        r = httpx.post(f"{url}/v1/customers", json={"id": cid, "tags": tags}, headers=admin)
        assert r.status_code in (200, 201), r.text
    body = _shared("vip", {"kind": "percent", "value": 15},
                   {"customer": {"tags_any": ["vip"], "tags_none": ["staff"]}})
    open_campaign(url, admin, body)
    code = body["shared_code"]
    order = {"amount": 10000, "currency": "EUR"}
    assert _validate(url, admin, code, order, customer_id=vip)["discount_amount"] == 1500
    v = _validate(url, admin, code, order, customer_id=plain)
    assert (v["reason"], v["message"]) == ("rule_not_met", "needs a customer tagged vip, the customer has none of them")
    v = _validate(url, admin, code, order, customer_id=blocked)
    assert (v["reason"], v["message"]) == ("rule_not_met", "not for customers tagged staff")
    # tags a trusted caller sends win over the stored ones
    assert _validate(url, admin, code, order, customer_id=plain, customer_tags=["vip"])["valid"]
    # a redemption by a stored vip, and its replay with the same key
    key = {"Idempotency-Key": f"vip-{uuid.uuid4().hex}"}
    r1 = httpx.post(f"{url}/v1/redemptions", json={"code": code, "customer_id": vip, "order": order},
                    headers={**admin, **key})
    r2 = httpx.post(f"{url}/v1/redemptions", json={"code": code, "customer_id": vip, "order": order},
                    headers={**admin, **key})
    assert r1.status_code == r2.status_code == 201, (r1.text, r2.text)
    assert r1.json()["id"] == r2.json()["id"] and r1.json()["discount_amount"] == 1500


@pytest.mark.parametrize(
    ("order", "status", "code"),
    [
        ({"currency": "EUR", "items": [{"sku": "A", "quantity": 1, "unit_price": -5}]}, 422, "validation_error"),
        ({"currency": "EUR", "items": [{"sku": "A", "quantity": 0, "unit_price": 5}]}, 422, "validation_error"),
        ({"currency": "EUD", "amount": 100}, 422, "unknown_currency"),
        ({"currency": "EUR", "amount": 100, "items": [{"sku": "A", "quantity": 2, "unit_price": 70}]},
         422, "order_amount_mismatch"),
        ({"currency": "EUR"}, 422, "invalid_order"),
        ({"currency": "EUR", "items": [{"sku": "A\u0001", "quantity": 1, "unit_price": 5}]}, 422, "invalid_order"),
    ],
)
def test_bad_orders_are_refused_with_a_problem(
    http_api: Any, codes: dict[str, str], order: dict[str, Any], status: int, code: str
) -> None:
    url, admin = http_api.url, admin_headers(http_api)
    for path in ("validations", "redemptions", "reservations"):
        r = httpx.post(f"{url}/v1/{path}", json={"code": codes["amount-order"], "order": order}, headers=admin)
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        problem = r.json()
        if code == "validation_error":  # the schema's own check names the field
            assert problem["errors"][0]["loc"][:3] == ["body", "order", "items"], r.text
        else:
            assert problem["code"] == code, r.text


@pytest.mark.parametrize(
    ("discount", "rules", "needle"),
    [
        ({"kind": "percent", "value": 10},
         {"items": [SHOES], "exclude": {"categories": ["shoes"]}}, "can never hold"),
        ({"kind": "percent", "value": 10}, {"min_order": 5000, "max_order": 1000}, "no order fits"),
        ({"kind": "percent", "value": 10}, {"customer": {"tags_any": ["a"], "tags_none": ["a"]}},
         "can never hold"),
        ({"kind": "free_units", "value": 1, "sku": "SOCK-1"}, {"exclude": {"skus": ["SOCK-1"]}},
         "no unit could be free"),
        ({"kind": "free_shipping", "target": "items"}, None, "use target shipping"),
        ({"kind": "free_units", "value": 1, "target": "shipping"}, None, "not shipping"),
    ],
)
def test_a_rule_that_cannot_work_is_refused_at_creation(
    http_api: Any, discount: dict[str, Any], rules: dict[str, Any] | None, needle: str
) -> None:
    url, admin = http_api.url, admin_headers(http_api)
    r = httpx.post(f"{url}/v1/campaigns", json=_shared("bad", discount, rules), headers=admin)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_rule" and needle in r.json()["detail"], r.text
