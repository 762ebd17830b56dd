"""The cart benchmark's orders (loadtests/bench_cart.py) are what it claims to measure: every
10-line cart the wrk script sends passes the campaign's rules and gets its discount spread
over the matching lines, the wrk script's carts are those carts, and a body as the script
builds it is one the fast lane takes."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import msgspec
import pytest

from engine import errors, orders
from engine.campaigns import Discount, new_campaign
from engine.orders import Item
from engine.pricing import price
from engine.rules import Rules
from loadtests import bench_cart as bc
from serve.checkout import decode_checkout

MATCHING = {0, 2, 3, 4}  # shoes (not the excluded sale sku), bags, shirts, trousers


def test_the_campaign_is_one_the_engine_accepts() -> None:
    c = new_campaign(
        id="bench-cart", name="bench http cart rules", type="shared_code", currency="EUR",
        now=datetime.now(UTC), discount=msgspec.convert(bc.DISCOUNT, Discount),
        rules=msgspec.convert(bc.RULES, Rules), shared_code="CARTBENCH1",
    )
    assert (c.discount, c.rules) == (bc.campaign().discount, bc.campaign().rules)


def test_the_carts_have_ten_distinct_lines_at_shop_prices() -> None:
    for v in range(bc.VARIANTS):
        lines = bc.order_lines(v)
        assert len(lines) == 10
        assert len({ln["sku"] for ln in lines}) == 10
        assert len({ln["product_id"] for ln in lines}) == 10
        assert len({tuple(ln["categories"]) for ln in lines}) == 10
        assert all(1 <= ln["quantity"] <= 3 and 1000 <= ln["unit_price"] <= 10000 for ln in lines)
    assert len({tuple(ln["quantity"] for ln in bc.order_lines(v)) for v in range(bc.VARIANTS)}) == bc.VARIANTS


@pytest.mark.parametrize("variant", range(bc.VARIANTS))
def test_every_cart_passes_the_rules_and_gets_a_discount_per_matching_line(variant: int) -> None:
    c, o = bc.campaign(), bc.order(variant)
    p = price(c, o)  # raises RuleNotMet if a rule fails
    by_line = {ln.line: ln.discount for ln in p.items}
    assert set(by_line) == MATCHING
    assert sum(by_line.values()) == p.discount <= bc.DISCOUNT["max"]
    for i, d in by_line.items():
        assert 0 < d <= o.items[i].total * bc.DISCOUNT["value"] // 100
    assert p.shipping_discount == 0


def test_some_carts_reach_the_cap_and_some_do_not() -> None:
    capped = sum(price(bc.campaign(), bc.order(v)).discount == bc.DISCOUNT["max"] for v in range(bc.VARIANTS))
    assert bc.VARIANTS // 4 <= capped <= 3 * bc.VARIANTS // 4


def test_the_rules_do_bite_on_a_cart_without_enough_matching_units() -> None:
    o = bc.order(0)
    few = [it if i not in MATCHING else msgspec.structs.replace(it, quantity=1) for i, it in enumerate(o.items)]
    few = [it for i, it in enumerate(few) if i not in (3, 4)]  # one shoe and one bag left
    with pytest.raises(errors.RuleNotMet, match="needs 3 items"):
        price(bc.campaign(), orders.build(currency="EUR", items=few))


def test_the_wrk_script_sends_these_carts_and_the_fast_lane_takes_them() -> None:
    table = bc.lua_table()
    texts = re.findall(r"\[=\[(.*?)\]=\]", table)
    assert [msgspec.json.decode(t) for t in texts] == [bc.order_lines(v) for v in range(bc.VARIANTS)]
    for tid, counter in [(1, 2), (2, 47), (1, 1000)]:
        # the body as WRK_SCRIPT's request() builds it in mode "cart"
        oid = f"c0m-{tid}-{counter}"
        raw = ('{"code":"CARTBENCH1","customer_id":"c' + oid + '","order":{"id":"o' + oid
               + '","currency":"EUR","items":' + texts[counter % len(texts)] + '}}')
        body = decode_checkout(raw.encode())
        assert body.order.id is not None
        v = bc.variant_of(body.order.id)
        items = [Item(it.sku, it.quantity, it.unit_price, it.product_id, tuple(it.categories))
                 for it in body.order.items or []]
        assert orders.build(currency=body.order.currency, items=items) == bc.order(v)


def test_order_ids_name_their_cart_and_rounds_alternate() -> None:
    assert bc.variant_of("oc1m-2-49") == 49 % bc.VARIANTS
    assert bc.variant_of("oprobe-0-0") == 0
    with pytest.raises(ValueError):
        bc.variant_of("probe")
    assert [bc.abba_order("ab", r) for r in range(3)] == [["a", "b"], ["b", "a"], ["a", "b"]]
