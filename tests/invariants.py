"""A checker over what clients were told and what Postgres holds, for the fault tests:
every acknowledged redemption is persisted, no unique code is redeemed twice, no shared
code passes its limits, no gift card goes below zero and each card's balance is its
starting balance minus what its persisted redemptions spent. :class:`Mixed` is the load
those tests drive: unique codes, a shared code with a limit and gift cards."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from engine.events import Redemption
from engine.shard_state import RedeemRequest
from tests.engine_support import campaign_codes, discount_campaign, fetch, later, uid

GIFT = 10_000
SHARED_LIMIT = 120


@dataclass
class Mixed:
    """Three campaigns of one engine and the requests that hit them."""

    dsn: str
    unique: str
    shared: str
    shared_code: str
    gift: str
    codes: list[str]
    cards: list[str]

    @classmethod
    async def create(cls, engine: Any, dsn: str, *, codes: int, cards: int) -> Mixed:
        unique = await discount_campaign(engine, codes)
        shared = await engine.create_campaign(
            id=uid("mixed-shared"), name="shared", type="shared_code", currency="EUR",
            discount={"kind": "amount", "value": 100}, shared_code=uid("MX").upper(),
            limits={"total": SHARED_LIMIT}, ends_at=later(),
        )
        await engine.activate(shared.id)
        gift = await engine.create_campaign(
            id=uid("mixed-gift"), name="gift", type="gift_card", currency="EUR",
            gift_balance=GIFT, ends_at=later(),
        )
        await engine.generate(gift.id, cards)
        await engine.activate(gift.id)
        return cls(
            dsn, unique, shared.id, shared.shared_code, gift.id,
            await campaign_codes(dsn, unique), await campaign_codes(dsn, gift.id),
        )

    def request(self, rng: random.Random, key: str, customer: str) -> RedeemRequest:
        """Half unique codes, 30 % the shared code, 20 % a 2,500 spend on a gift card."""
        pick = rng.random()
        if pick < 0.5:
            return RedeemRequest(code=rng.choice(self.codes), amount=5000, currency="EUR", idempotency_key=key)
        if pick < 0.8:
            return RedeemRequest(code=self.shared_code, amount=5000, currency="EUR",
                                 customer_id=customer, idempotency_key=key)
        return RedeemRequest(code=rng.choice(self.cards), amount=2500, currency="EUR", idempotency_key=key)

    async def check(self, acked: Iterable[Redemption]) -> dict[str, int]:
        return await check_redemptions(
            self.dsn, acked, unique=[self.unique],
            shared={self.shared: (SHARED_LIMIT, None)}, gift={self.gift: GIFT},
        )


async def check_redemptions(
    dsn: str,
    acked: Iterable[Any],
    *,
    unique: Iterable[str] = (),
    shared: dict[str, tuple[int | None, int | None]] | None = None,
    gift: dict[str, int] | None = None,
) -> dict[str, int]:
    """``unique``: campaign ids whose codes redeem once; ``shared``: campaign id ->
    (total, per_customer) limits; ``gift``: campaign id -> starting balance. Returns counts
    of what was checked, for the test's own sanity checks."""
    counts, anomalies = await redemption_anomalies(dsn, acked, unique=unique, shared=shared, gift=gift)
    assert not anomalies, "\n".join(anomalies[:10])
    return counts


async def redemption_anomalies(
    dsn: str,
    acked: Iterable[Any],
    *,
    unique: Iterable[str] = (),
    shared: dict[str, tuple[int | None, int | None]] | None = None,
    gift: dict[str, int] | None = None,
) -> tuple[dict[str, int], list[str]]:
    """What :func:`check_redemptions` checks, as a list of every anomaly found (empty when
    all holds) rather than the first failed assertion; a long chaos run reports them all.
    ``acked`` items need ``id``, ``code``, ``campaign_id`` and ``discount_amount``."""
    acked = list(acked)
    shared = shared or {}
    gift = gift or {}
    unique = list(unique)
    anomalies: list[str] = []
    campaigns = list({*unique, *shared, *gift})
    rows = await fetch(
        dsn,
        "SELECT id, campaign_id, code, customer_id, discount_amount, status FROM redemptions"
        " WHERE campaign_id = ANY($1)",
        campaigns,
    )
    by_id = {r["id"]: r for r in rows}
    missing = [a.id for a in acked if a.id not in by_id]
    if missing:
        anomalies.append(
            f"{len(missing)} acknowledged redemptions are not in Postgres: {missing[:5]}"
        )
    for a in acked:
        r = by_id.get(a.id)
        if r is not None and (r["code"], r["campaign_id"], r["discount_amount"]) != (
            a.code,
            a.campaign_id,
            a.discount_amount,
        ):
            anomalies.append(f"redemption {a.id} was persisted differently")
    active = [r for r in rows if r["status"] == 0]
    for cid in unique:
        per_code = Counter(r["code"] for r in active if r["campaign_id"] == cid)
        twice = [code for code, n in per_code.items() if n > 1]
        if twice:
            anomalies.append(f"{len(twice)} codes redeemed more than once in {cid}: {twice[:5]}")
    for cid, (total, per_customer) in shared.items():
        mine = [r for r in active if r["campaign_id"] == cid]
        if total is not None and len(mine) > total:
            anomalies.append(f"shared code of {cid}: {len(mine)} redemptions > {total}")
        if per_customer is not None:
            worst = Counter(r["customer_id"] for r in mine).most_common(1)
            if worst and worst[0][1] > per_customer:
                anomalies.append(
                    f"{cid}: customer {worst[0][0]} redeemed {worst[0][1]} times > {per_customer}"
                )
    for cid, start in gift.items():
        spent: Counter[str] = Counter()
        for r in active:
            if r["campaign_id"] == cid:
                spent[r["code"]] += r["discount_amount"]
        cards = await fetch(dsn, "SELECT code, balance FROM vouchers WHERE campaign_id = $1", cid)
        for card in cards:
            if card["balance"] < 0:
                anomalies.append(f"gift card {card['code']} below zero")
            if card["balance"] != start - spent[card["code"]]:
                anomalies.append(
                    f"gift card {card['code']}: balance {card['balance']} but redemptions spent"
                    f" {spent[card['code']]} of {start}"
                )
    return {"acked": len(acked), "rows": len(rows), "active": len(active)}, anomalies
