"""Cart redemptions for ``loadtests.bench_http``: a shared code whose campaign has rules,
redeemed with 10-line orders, measured against the amount-only redemption in the same run.

The campaign takes 15 % off each line of shoes, bags, shirts or trousers (``target: items``),
at most 70.00 per order, for orders of at least 100.00 with at least 3 such units; gift
cards and one sale sku never count and are never discounted. Every order the load generator
sends passes these rules, so each redemption prices its lines and keeps a per-line
explanation beside the row.

The orders come from :func:`order_lines`: ``VARIANTS`` carts of the same 10 skus (distinct
skus, products and categories, prices 12.99 to 89.99) in quantities 1-3 that differ from
cart to cart, so some carts reach the 70.00 cap (the cap is spread over the lines) and some
do not. The wrk script holds them as JSON text (:func:`lua_table`) and picks cart
``counter % VARIANTS`` for its request ``counter``, so the order id alone
(``o<prefix>-<thread>-<counter>``) tells which cart a redemption row was for;
:func:`check_rows` prices each row's cart with :func:`engine.pricing.price` on the same
campaign and compares the stored amount, discount and per-line explanation.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from engine.campaigns import Campaign, Discount
from engine.orders import Item, Order
from engine.pricing import detail_json, price
from engine.rules import Rules

if TYPE_CHECKING:
    from loadtests.bench_http import WrkRun

SECTION = "Cart redemptions: 10-line orders with rules vs amount-only"
CURRENCY = "EUR"
VARIANTS = 48
TARGET_RATIO = 0.8
T = TypeVar("T")
NOTE = (
    "Cart: a shared code (its own campaign, one shard) taking 15 % off each line of shoes, "
    "bags, shirts or trousers, at most 70.00 per order, for orders of at least 100.00 with at "
    "least 3 such units, a sale sku and gift cards excluded; every request a 10-line order "
    f"(10 skus, products and categories, unit prices 12.99-89.99, quantities 1-3 in "
    f"{VARIANTS} mixes, about half of them reaching the cap) that passes the rules and gets "
    "its discount spread over 4 lines. Every cart row in Postgres is checked against "
    "engine.pricing.price of the order its id names (amount, discount, per-line explanation)."
)

# sku, product, categories, unit price (minor units)
CATALOGUE: tuple[tuple[str, str, tuple[str, ...], int], ...] = (
    ("SHOE-RUN-42", "P-SHOE-RUN", ("shoes", "running"), 8999),
    ("SHOE-SALE-41", "P-SHOE-SALE", ("shoes", "sale"), 4999),  # excluded by sku
    ("BAG-TOTE-BLK", "P-BAG-TOTE", ("bags",), 3499),
    ("SHIRT-OX-M", "P-SHIRT-OX", ("shirts",), 3999),
    ("JEANS-SLIM-32", "P-JEANS-SLIM", ("trousers",), 6999),
    ("SOCK-3PK-43", "P-SOCK-3PK", ("socks", "accessories"), 1299),
    ("CAP-WOOL-GRY", "P-CAP-WOOL", ("hats",), 1999),
    ("BOOK-TRAIL", "P-BOOK-TRAIL", ("books",), 2499),
    ("GIFT-CARD-25", "P-GIFT-CARD", ("gift-cards",), 2500),  # excluded by category
    ("BELT-LTH-95", "P-BELT-LTH", ("belts", "leather"), 2999),
)

DISCOUNT: dict[str, Any] = {"kind": "percent", "value": 15, "target": "items", "max": 7000}
RULES: dict[str, Any] = {
    "min_order": 10000,
    "items": [{"any_of": {"categories": ["shoes", "bags", "shirts", "trousers"]}, "min_quantity": 3}],
    "exclude": {"skus": ["SHOE-SALE-41"], "categories": ["gift-cards"]},
}


def quantity(variant: int, line: int) -> int:
    """Units of line ``line`` in cart ``variant``: 1-3, a different mix per cart."""
    return random.Random(variant * 16 + line).randint(1, 3)


def order_lines(variant: int) -> list[dict[str, Any]]:
    """The 10 lines of cart ``variant`` as the request body has them."""
    return [
        {"sku": sku, "product_id": product, "categories": list(cats),
         "quantity": quantity(variant, j), "unit_price": unit}
        for j, (sku, product, cats, unit) in enumerate(CATALOGUE)
    ]


def order(variant: int) -> Order:
    """Cart ``variant`` as engine.pricing sees it."""
    items = tuple(
        Item(it["sku"], it["quantity"], it["unit_price"], it["product_id"], tuple(it["categories"]))
        for it in order_lines(variant)
    )
    return Order(amount=sum(it.total for it in items), currency=CURRENCY, items=items)


_COUNTER = re.compile(r"-(\d+)$")


def variant_of(order_id: str) -> int:
    """Which cart an order id of the wrk script (``o<prefix>-<thread>-<counter>``) sent."""
    m = _COUNTER.search(order_id)
    if m is None:
        raise ValueError(f"not an order id of the cart benchmark: {order_id!r}")
    return int(m.group(1)) % VARIANTS


def lua_table() -> str:
    """The carts as a Lua list of JSON texts (``cart_items[counter % VARIANTS + 1]``)."""
    enc = msgspec.json.Encoder()
    rows = [f"  [=[{enc.encode(order_lines(v)).decode()}]=]," for v in range(VARIANTS)]
    return "local cart_items = {\n" + "\n".join(rows) + "\n}\n"


def campaign_body(code: str, ends_at: str) -> dict[str, Any]:
    return {
        "name": "bench http cart rules",
        "type": "shared_code",
        "currency": CURRENCY,
        "discount": DISCOUNT,
        "rules": RULES,
        "limits": {"total": 10**12},
        "shared_code": code,
        "ends_at": ends_at,
    }


def campaign(cid: str = "bench-cart") -> Campaign:
    """The campaign as the shard holds it, built from the same discount and rules."""
    return Campaign(
        id=cid, name="bench http cart rules", type="shared_code", currency=CURRENCY, state="active",
        discount=msgspec.convert(DISCOUNT, Discount), rules=msgspec.convert(RULES, Rules),
    )


def expected(c: Campaign, variant: int) -> tuple[int, int, dict[str, Any]]:
    """(order amount, discount, explanation as stored) for cart ``variant``."""
    o = order(variant)
    p = price(c, o)
    return o.amount, p.discount, json.loads(detail_json(p))


def setup_campaign(base: str, admin_token: str, api_key: str, code: str, ends_at: str) -> str:
    """Create and activate the cart campaign; one probe redemption whose answer must be a 201
    with the discount and lines engine.pricing gives its cart. Returns the campaign id."""
    import httpx

    with httpx.Client(base_url=base, timeout=30.0) as c:
        admin = {"Authorization": admin_token}
        r = c.post("/v1/campaigns", headers=admin, json=campaign_body(code, ends_at))
        r.raise_for_status()
        cid = str(r.json()["id"])
        c.post(f"/v1/campaigns/{cid}/activate", headers=admin).raise_for_status()
        r = c.post(
            "/v1/redemptions",
            headers={"X-API-Key": api_key, "Idempotency-Key": "bench-cart-probe"},
            json={"code": code, "customer_id": "probe-cart", "order": {
                "id": "oprobe-0-0", "currency": CURRENCY, "items": order_lines(0)}},
        )
        if r.status_code != 201:
            raise RuntimeError(f"cart probe redemption answered {r.status_code}: {r.text}")
        _, discount, detail = expected(campaign(cid), 0)
        got = r.json()
        if got["discount_amount"] != discount or got["items"] != detail["items"]:
            raise RuntimeError(f"cart probe: expected {discount} over {detail['items']}, got {got}")
    return cid


@dataclass
class RowCheck:
    rows: int = 0
    mismatches: list[str] = field(default_factory=list)
    bad: int = 0


async def check_rows(dsn: str, cid: str) -> RowCheck:
    """Every redemption row of the cart campaign (the probe included) against
    engine.pricing.price of the cart its order id names: order amount, discount, lines."""
    import asyncpg

    c = campaign(cid)
    want = [expected(c, v) for v in range(VARIANTS)]
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT order_id, order_amount, discount_amount, detail::text AS detail, status "
            "FROM redemptions WHERE campaign_id = $1", cid)
    finally:
        await conn.close()
    out = RowCheck(rows=len(rows))
    for row in rows:
        amount, discount, detail = want[variant_of(row["order_id"])]
        got = (row["order_amount"], row["discount_amount"],
               json.loads(row["detail"]) if row["detail"] is not None else None, row["status"])
        if got != (amount, discount, detail, 0):
            out.bad += 1
            if len(out.mismatches) < 3:
                out.mismatches.append(f"{row['order_id']}: {got} != {(amount, discount, detail, 0)}")
    return out


def abba_order(targets: Sequence[T], rnd: int) -> list[T]:
    """Targets of round ``rnd`` (from 0): as listed, then reversed, and so on (ABBA)."""
    return list(targets) if rnd % 2 == 0 else list(reversed(targets))


def round_table(engine: Sequence[WrkRun], cart: Sequence[WrkRun]) -> tuple[str, float]:
    """Per-round req/s of both targets and cart ÷ engine; the ratio of the medians."""
    lines = ["| round | amount-only (req/s) | cart, 10 lines + rules (req/s) | cart ÷ amount-only |",
             "| --- | ---: | ---: | ---: |"]
    ratios = []
    for i, (e, c) in enumerate(zip(engine, cart, strict=True)):
        x = c.rps / e.rps if e.rps else math.nan
        ratios.append(x)
        lines.append(f"| {i + 1} | {e.rps:,.0f} | {c.rps:,.0f} | {x:.3f} |")
    me = sorted(r.rps for r in engine)[(len(engine) - 1) // 2]
    mc = sorted(r.rps for r in cart)[(len(cart) - 1) // 2]
    geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios)) if all(x > 0 for x in ratios) else math.nan
    ratio = mc / me if me else math.nan
    lines.append(f"| median / geometric mean of the rounds | {me:,.0f} | {mc:,.0f} | "
                 f"{ratio:.3f} / {geo:.3f} |")
    return "\n".join(lines), ratio
