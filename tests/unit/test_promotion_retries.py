"""A keyed redemption with promotions, retried (serve/promotions.py): the retry asks the
promotions its first attempt asked, in the same order, so it answers what was given --
decided by a real shard state, the manifest kept first-writer-wins as Postgres keeps it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from engine import errors
from engine.campaigns import Campaign, Discount, new_campaign
from engine.shard_state import Outcome, RedeemRequest
from serve.promotions import Applied, Manifests, apply
from tests.unit.test_pools import T0, Shop, active, req


def promotion(cid: str, discount: Discount) -> Campaign:
    return active(new_campaign(id=cid, name=cid, type="promotion", currency="EUR", now=T0, discount=discount))


class Kept:
    """The promotions each key asked, the first list written standing (store/manifests.py)."""

    def __init__(self) -> None:
        self.lists: dict[str, list[str]] = {}

    async def fix(self, r: RedeemRequest, ids: list[str]) -> list[str]:
        assert r.idempotency_key is not None
        return self.lists.setdefault(r.idempotency_key, ids)


def run(shop: Shop, r: RedeemRequest, catalog: list[Campaign], kept: Kept | None) -> list[Applied]:
    async def decide(op: str, preq: RedeemRequest) -> Outcome:
        assert op == "redeem"
        return shop.state.redeem_one(preq)

    return asyncio.run(apply("redeem", r, None, catalog, decide, None if kept is None else kept.fix))


@pytest.fixture
def shop() -> Shop:
    s = Shop()
    for c in (promotion("amount", Discount("amount", 300)), promotion("tenth", Discount("percent", 10))):
        s.install(c)
    return s


def given(shop: Shop) -> dict[str, int]:
    """Active redemptions by campaign."""
    out: dict[str, int] = {}
    for red in shop.state.redemptions.values():
        if red.status == 0:
            out[red.campaign_id] = out.get(red.campaign_id, 0) + 1
    return out


def test_a_retry_answers_what_was_given_though_one_ended_and_another_started(shop: Shop) -> None:
    kept = Kept()
    r = req("", 5000, "ann", idempotency_key="u:usr_1:order-1")
    catalog = [shop.state.campaign("amount"), shop.state.campaign("tenth")]
    first = run(shop, r, catalog, kept)
    assert [(a.campaign_id, a.discount_amount) for a in first] == [("tenth", 500), ("amount", 300)]
    shop.move("tenth", "end")
    shop.install(promotion("later", Discount("amount", 1000)))
    now = [shop.state.campaign("amount"), shop.state.campaign("later")]
    assert run(shop, r, now, kept) == first
    assert given(shop) == {"tenth": 1, "amount": 1}  # nothing more was given
    # another order is asked what the catalog says now
    other = run(shop, req("", 5000, "bob", idempotency_key="u:usr_1:order-2"), now, kept)
    assert [a.campaign_id for a in other] == ["later", "amount"]


def test_a_promotion_whose_key_holds_another_request_fails_the_checkout(shop: Shop) -> None:
    # without the kept list, the retry asks "amount" first: its key's record holds the
    # request made after "tenth" took its share, so whether it was given cannot be told
    r = req("", 5000, "ann", idempotency_key="u:usr_1:order-1")
    run(shop, r, [shop.state.campaign("amount"), shop.state.campaign("tenth")], None)
    shop.move("tenth", "end")
    with pytest.raises(errors.IdempotencyConflict):
        run(shop, r, [shop.state.campaign("amount")], None)


def test_an_unkeyed_checkout_keeps_no_list(shop: Shop) -> None:
    kept = Kept()
    catalog: list[Any] = [shop.state.campaign("amount")]
    assert [a.campaign_id for a in run(shop, req("", 5000, "ann"), catalog, kept)] == ["amount"]
    assert kept.lists == {}


@pytest.mark.parametrize("trouble", ["hangs", "refuses"])
def test_a_list_postgres_cannot_keep_is_a_503_in_bounded_time(shop: Shop, trouble: str) -> None:
    class Db:
        async def fetchrow(self, *args: Any) -> Any:
            if trouble == "hangs":
                await asyncio.sleep(60)
            raise OSError("connection refused")

    async def db() -> Db:
        return Db()

    manifests = Manifests(db, timeout_s=0.2)  # type: ignore[arg-type]
    r = req("", 5000, "ann", idempotency_key="u:usr_1:order-1")

    async def decide(op: str, preq: RedeemRequest) -> Outcome:
        return shop.state.redeem_one(preq)

    t0 = time.monotonic()
    with pytest.raises(errors.Unavailable):
        asyncio.run(apply("redeem", r, None, [shop.state.campaign("amount")], decide, manifests.fix))
    assert time.monotonic() - t0 < 2
    assert given(shop) == {}  # nothing was given before the list was kept
