"""Qualification on one shard's state: which offers apply now to a customer's order, what
each gives (checked against the shard's own validation of the same code), and every reason
an offer is left out (state, dates, sale windows, the code's switch, limits with their open
holds, redeemed, void, held, another customer's code, rules, currency)."""

from __future__ import annotations

import random
from datetime import timedelta

import msgspec
import pytest

from engine import errors
from engine.audit import Actor
from engine.campaigns import Discount, Limits, new_campaign
from engine.events import ImportedCode
from engine.orders import Item, Order, build
from engine.pricing import Line, detail_json
from engine.qualification import (
    CANDIDATES,
    Context,
    Offer,
    Qualified,
    QualifyRequest,
    Ranked,
    candidates,
    explain,
    merge,
    merge_ranked,
    qualify,
    qualify_request,
    ranked,
)
from engine.routing import BUCKETS, bucket_of
from engine.rules import CustomerCondition, ItemCondition, ItemFilter, Rules
from engine.shard_state import RedeemRequest, ShardState
from tests.unit.test_pools import (
    T0,
    TTL,
    FakeClock,
    Shop,
    active,
    discount_campaign,
    flash_campaign,
    gift_campaign,
    req,
    shared_campaign,
)

ALICE = Actor("user", "usr_alice")
LINES = (
    Item("SHOE-1", 2, 3000, "p-shoe", ("shoes",)),
    Item("SOCK-1", 3, 500, None, ("socks",)),
    Item("HAT-1", 1, 1500, None, ()),
)


def order(amount: int = 2000, currency: str = "EUR", **kw: object) -> Order:
    return Order(amount, currency, **kw)  # type: ignore[arg-type]


def cart(shipping: int | None = 490) -> Order:
    return build(currency="EUR", items=LINES, shipping=shipping)


def offers(shop: Shop, cust: str, o: Order | None = None, tags: tuple[str, ...] | None = None) -> dict[str, int]:
    """campaign id -> discount of the offers ``cust`` gets for ``o``."""
    return {x.campaign_id: x.discount_amount for x in qualify(shop.state, cust, o or order(), tags)}


@pytest.fixture
def shop() -> Shop:
    s = Shop()
    s.install(discount_campaign(), ["DISC-A", "DISC-B", "DISC-C"])
    s.install(gift_campaign(), ["GIFT-A", "GIFT-B"])
    s.install(shared_campaign())  # SAVE5: 500 off, 3 in all, 2 per customer
    s.sync()
    return s


def test_shared_codes_and_the_customers_own_codes_are_offered_best_first(shop: Shop) -> None:
    assert offers(shop, "ann") == {"shared": 500}  # nothing assigned to ann yet
    code = shop.state.assign("disc", "ann").code
    gift = shop.state.assign("gift", "ann").code
    got = qualify(shop.state, "ann", order(4000))
    assert [(o.campaign_id, o.code, o.discount_amount, o.kind) for o in got] == [
        ("gift", gift, 4000, "unique_code"),
        ("shared", "SAVE5", 500, "shared_code"),
        ("disc", code, 400, "unique_code"),
    ]
    assert got[0].balance == 5000 and got[1].balance is None
    assert got[0].campaign_type == "gift_card" and got[0].campaign_name == "gift card"
    # another customer gets neither of ann's codes
    assert offers(shop, "bob", order(4000)) == {"shared": 500}


def test_ties_go_by_campaign_id_and_limit_keeps_the_best(shop: Shop) -> None:
    shop.install(shared_campaign("another", "SAVE5B"))
    shop.install(shared_campaign("a-first", "SAVE5C"))
    got = qualify(shop.state, "ann", order(), limit=2)
    assert [o.campaign_id for o in got] == ["a-first", "another"]
    assert [o.campaign_id for o in qualify(shop.state, "ann", order())] == ["a-first", "another", "shared"]


def test_per_customer_limit_counts_redemptions_and_open_holds(shop: Shop) -> None:
    shop.state.redeem(req("SAVE5", 2000, "ann"))
    assert "shared" in offers(shop, "ann")
    held = shop.state.reserve(req("SAVE5", 2000, "ann"))
    assert "shared" not in offers(shop, "ann")
    assert explain(shop.state, QualifyRequest("ann", order()))[1] == {"shared": "customer_limit_reached"}
    assert "shared" in offers(shop, "bob")
    shop.state.release(held.id)
    assert "shared" in offers(shop, "ann")


def test_total_limit_counts_open_holds_and_expired_holds_free_it(shop: Shop) -> None:
    shop.state.redeem(req("SAVE5", 2000, "ann"))
    shop.state.reserve(req("SAVE5", 2000, "bob"))
    shop.state.reserve(req("SAVE5", 2000, "cy"))
    assert "shared" not in offers(shop, "dee")
    assert explain(shop.state, QualifyRequest("dee", order()))[1]["shared"] == "exhausted"
    shop.clock.advance(seconds=TTL.total_seconds() + 1)  # both holds lapse
    assert offers(shop, "dee") == {"shared": 500}


def test_a_redeemed_held_or_void_code_is_not_offered(shop: Shop) -> None:
    code = shop.state.assign("disc", "ann").code
    assert offers(shop, "ann") == {"disc": 200, "shared": 500}
    held = shop.state.reserve(req(code, 2000, "ann"))
    assert "disc" not in offers(shop, "ann")
    shop.state.release(held.id)
    r = shop.state.redeem(req(code, 2000, "ann"))
    assert explain(shop.state, QualifyRequest("ann", order()))[1]["disc"] == "already_redeemed"
    shop.state.rollback(r.id)
    assert offers(shop, "ann")["disc"] == 200
    shop.move("disc", "end")
    assert "disc" not in offers(shop, "ann")


def test_a_spent_gift_card_and_a_partly_spent_one(shop: Shop) -> None:
    gift = shop.state.assign("gift", "ann").code
    shop.state.redeem(req(gift, 3000, "ann"))
    got = {o.campaign_id: o for o in qualify(shop.state, "ann", order(4000))}
    assert got["gift"].balance == 2000 and got["gift"].discount_amount == 2000
    shop.state.redeem(req(gift, 2000, "ann"))
    assert "gift" not in offers(shop, "ann", order(4000))


def test_paused_ended_not_started_and_outside_the_window(shop: Shop) -> None:
    shop.move("shared", "pause")
    assert "shared" not in offers(shop, "ann")
    shop.move("shared", "activate")
    assert "shared" in offers(shop, "ann")
    shop.install(flash_campaign())  # starts T0+1h, Mon-Fri 14:00-16:00 Berlin
    assert "flash" not in offers(shop, "ann", order(1000))
    shop.clock.advance(hours=1)  # 14:00 Berlin
    assert offers(shop, "ann", order(1000))["flash"] == 500
    shop.clock.advance(hours=2)  # 16:00 Berlin: closed
    assert explain(shop.state, QualifyRequest("ann", order(1000)))[1]["flash"] == "outside_window"
    shop.clock.advance(days=40)  # past the flash sale's end (the shared code has none)
    assert offers(shop, "ann", order(1000)) == {"shared": 500}


def test_a_codes_own_switch_and_window(shop: Shop) -> None:
    code = shop.state.assign("disc", "ann").code
    shop.state.control(code, {"active": False}, ALICE)
    shop.state.control("SAVE5", {"expires_at": T0 + timedelta(hours=1)}, ALICE)
    assert offers(shop, "ann") == {"shared": 500}
    reasons = explain(shop.state, QualifyRequest("ann", order()))[1]
    assert reasons["disc"] == "voucher_disabled"
    shop.state.control(code, {"active": True}, ALICE)
    shop.clock.advance(hours=2)
    assert offers(shop, "ann") == {"disc": 200}


def test_currency_minimum_and_nothing_to_take_off(shop: Shop) -> None:
    shop.install(shared_campaign("big", "BIG10", min_order=5000))
    assert "big" not in offers(shop, "ann", order(4999))
    assert "big" in offers(shop, "ann", order(5000))
    assert offers(shop, "ann", order(4000, "USD")) == {}
    assert explain(shop.state, QualifyRequest("ann", order(0)))[1]["shared"] == "no_discount"


def test_rules_items_and_tags_decide_with_the_lines_priced() -> None:
    s = Shop()
    shoes = Rules(items=(ItemCondition(any_of=ItemFilter(categories=("shoes",)), min_quantity=2),))
    s.install(active(new_campaign(
        id="shoes", name="shoes", type="shared_code", currency="EUR", now=T0,
        discount=Discount("percent", 20, target="items"), shared_code="SHOES20", rules=shoes,
        ends_at=T0 + timedelta(days=3),
    )))
    vip = Rules(customer=CustomerCondition(tags_any=("vip",)))
    s.install(active(new_campaign(
        id="vip", name="vip", type="shared_code", currency="EUR", now=T0,
        discount=Discount("free_shipping"), shared_code="VIPSHIP", rules=vip,
    )))
    got = {o.campaign_id: o for o in qualify(s.state, "ann", cart(), ("vip",))}
    # the rule's any_of names the lines the items target discounts: the shoes only
    assert got["shoes"].discount_amount == 1200
    assert [(ln.line, ln.sku, ln.discount) for ln in got["shoes"].items] == [(0, "SHOE-1", 1200)]
    assert got["vip"].discount_amount == got["vip"].shipping_discount == 490
    assert offers(s, "ann", cart(), ("regular",)) == {"shoes": 1200}
    one_shoe = build(currency="EUR", items=(Item("SHOE-1", 1, 3000, None, ("shoes",)),))
    assert explain(s.state, QualifyRequest("ann", one_shoe, ("vip",)))[1]["shoes"] == "rule_not_met"
    assert offers(s, "ann", cart(shipping=None), ("vip",)) == {"shoes": 1200}


def test_only_the_shard_holding_a_code_offers_it() -> None:
    clock = FakeClock()
    mine = bucket_of("SAVE5")
    here = ShardState(clock=clock, random_bytes=random.Random(1).randbytes, owned=[mine])
    there = ShardState(
        clock=clock, random_bytes=random.Random(2).randbytes,
        owned=[b for b in range(BUCKETS) if b != mine],
    )
    for st in (here, there):
        st.put_campaign(shared_campaign())
    assert [o.code for o in qualify(here, "ann", order())] == ["SAVE5"]
    assert qualify(there, "ann", order()) == []
    # a code recorded for a customer on the shard deciding their assignments is offered
    # only by the shard holding it
    there.put_campaign(discount_campaign())
    there.record_foreign("disc", "ann", "DISC-ELSEWHERE")
    assert qualify(there, "ann", order()) == []


def test_merge_counts_an_offer_once_and_ranks_the_whole() -> None:
    a = Offer("shared_code", "b", "b", "shared_code", "B", 300)
    b = Offer("unique_code", "a", "a", "discount", "A-1", 300)
    c = Offer("shared_code", "c", "c", "shared_code", "C", 900)
    merged = merge([Qualified([a, c]), Qualified([b, a])])
    assert [o.campaign_id for o in merged.offers] == ["c", "a", "b"] and not merged.tags_needed
    one = merge([Qualified([a, c]), Qualified([b], tags_needed=True)], limit=1)
    assert [o.campaign_id for o in one.offers] == ["c"] and one.tags_needed


def test_the_shards_ranked_answers_merge_as_their_offers_do_and_carry_the_apis_json() -> None:
    """What crosses from a shard to the gateway (:class:`Ranked`): merged like the offers
    (once each, best first, the limit, tags needed), each offer's JSON the API's."""
    rng = random.Random(3)
    pool = [
        Offer("shared_code", f"c{i}", f"c{i}", "shared_code", f"C{i}", rng.choice([100, 300, 900]))
        for i in range(12)
    ] + [Offer("promotion", "p", "p", "promotion", None, 300, (Line(1, "S\u00e9\"x", 300),), 0)]
    for _ in range(30):
        parts = [Qualified(rng.sample(pool, rng.randint(0, 6)), rng.random() < 0.2) for _ in range(3)]
        for limit in (None, 1, 4):
            want = merge(parts, limit)
            got = merge_ranked([msgspec.msgpack.decode(msgspec.msgpack.encode(ranked(p)), type=Ranked)
                                for p in parts], limit)
            assert got.tags_needed == want.tags_needed
            assert [msgspec.json.decode(o[3], type=Offer) for o in got.offers] == want.offers
    promo = msgspec.json.decode(ranked(Qualified([pool[-1]])).offers[0][3])
    assert promo == {
        "kind": "promotion", "campaign_id": "p", "campaign_name": "p", "campaign_type": "promotion",
        "code": None, "discount_amount": 300, "items": [{"line": 1, "sku": "S\u00e9\"x", "discount": 300}],
        "shipping_discount": 0, "balance": None,
    }


def test_customer_rules_without_tags_say_the_tags_are_needed() -> None:
    s = Shop()
    s.install(active(new_campaign(
        id="vip", name="vip", type="shared_code", currency="EUR", now=T0,
        discount=Discount("amount", 100), shared_code="VIP1",
        rules=Rules(customer=CustomerCondition(tags_none=("blocked",))),
    )))
    s.install(shared_campaign())
    got = qualify_request(s.state, QualifyRequest("ann", order()))
    assert [o.campaign_id for o in got.offers] == ["shared"] and got.tags_needed
    got = qualify_request(s.state, QualifyRequest("ann", order(), ()))
    assert [o.campaign_id for o in got.offers] == ["shared", "vip"] and not got.tags_needed
    assert not qualify_request(s.state, QualifyRequest("ann", order(), ("blocked",))).tags_needed


def test_with_a_limit_only_candidates_that_can_make_it_are_priced(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.qualification as q

    s = Shop()
    for i in range(30):  # 100, 200, ... 3000 off
        s.install(active(new_campaign(
            id=f"c{i:02d}", name="off", type="shared_code", currency="EUR", now=T0,
            discount=Discount("amount", 100 * (i + 1)), shared_code=f"CODE{i:02d}",
        )))
    priced: list[int] = []
    real = q.price

    def counting(*a: object, **kw: object) -> object:
        priced.append(1)
        return real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(q, "price", counting)
    got = qualify(s.state, "ann", order(10_000), limit=3)
    assert [o.campaign_id for o in got] == ["c29", "c28", "c27"] and len(priced) == 3
    priced.clear()
    assert len(qualify(s.state, "ann", order(10_000))) == 30 and len(priced) == 30


def test_every_campaign_type_that_can_qualify_has_a_candidate() -> None:
    from engine.campaigns import CAMPAIGN_TYPES

    assert set(CANDIDATES) == set(CAMPAIGN_TYPES)


def test_a_promotion_is_offered_without_a_code_as_its_checkout_would_price_it() -> None:
    s = Shop()
    s.install(active(new_campaign(
        id="promo", name="promo", type="promotion", currency="EUR", now=T0,
        discount=Discount("percent", 10), limits=Limits(total=1),
    )))
    [o] = qualify(s.state, "ann", order(3000))
    assert (o.kind, o.code, o.discount_amount, o.campaign_type) == ("promotion", None, 300, "promotion")
    key = s.state.campaign("promo").shared_code
    assert key is not None
    v = s.state.validate(RedeemRequest(key, 3000, "EUR", "ann", promotion=True))
    assert v.valid and v.discount_amount == 300
    s.state.redeem(RedeemRequest(key, 3000, "EUR", "bob", promotion=True))
    assert qualify(s.state, "ann", order(3000)) == []  # its limit of 1 is used


def test_an_offer_crosses_the_actor_boundary() -> None:
    enc = msgspec.msgpack.encode([QualifyRequest("ann", cart(), ("vip",), 5)])
    assert msgspec.msgpack.decode(enc, type=list[QualifyRequest])[0].order == cart()


@pytest.mark.parametrize("seed", range(16))
def test_every_offer_is_what_validation_of_its_code_says(seed: int) -> None:
    """Random shards (campaigns of every type, assignments, redemptions, holds, switches,
    pauses, rules): each offer validates with the same discount and lines, and each
    candidate left out fails validation."""
    rng = random.Random(seed)
    s = Shop(seed)
    customers = ["ann", "bob", "cy"]
    for i in range(8):
        kind = rng.choice(["shared", "disc", "gift"])
        rules = rng.choice([
            None,
            Rules(items=(ItemCondition(any_of=ItemFilter(skus=("SOCK-1",)), min_quantity=rng.randint(1, 4)),)),
            Rules(customer=CustomerCondition(tags_none=("blocked",))),
            Rules(min_order=rng.choice([1000, 9000])),
        ])
        disc = rng.choice([
            Discount("percent", rng.randint(1, 60), target=rng.choice(["order", "items"])),
            Discount("amount", rng.randint(100, 3000)),
            Discount("free_shipping"),
            Discount("free_units", rng.randint(1, 4), target=rng.choice(["cheapest_item", "items"])),
            Discount("amount", rng.randint(50, 900), max=rng.choice([None, 700]), target="items"),
            Discount("amount", rng.randint(50, 900), target="cheapest_item"),
            Discount("fixed_price", rng.randint(0, 2000), target=rng.choice(["items", "cheapest_item"])),
            Discount("fixed_price", rng.randint(1, 6000)),
            Discount("percent", rng.randint(1, 100), max=rng.randint(1, 2000)),
            Discount("amount", rng.randint(100, 900), target="shipping"),
        ])
        cid = f"{kind}{i}"
        if kind == "shared":
            c = active(new_campaign(
                id=cid, name=cid, type="shared_code", currency="EUR", now=T0, discount=disc,
                shared_code=f"SH{i}X", rules=rules,
                limits=Limits(total=rng.choice([None, 2, 4]), per_customer=rng.choice([None, 1])),
            ))
            s.install(c)
        elif kind == "disc":
            s.install(active(new_campaign(
                id=cid, name=cid, type="discount", currency="EUR", now=T0, discount=disc, rules=rules,
            )), [f"D{i}-{k}" for k in range(4)])
        else:
            s.install(active(new_campaign(
                id=cid, name=cid, type="gift_card", currency="EUR", now=T0,
                gift_balance=rng.randint(100, 8000), rules=rules if rules and not rules.min_order else None,
            )), [f"G{i}-{k}" for k in range(4)])
    st = s.state
    codes: dict[tuple[str, str], str] = {}
    for cid in list(st.campaigns):
        for cust in customers:
            if not cid.startswith("shared") and rng.random() < 0.7:
                codes[(cid, cust)] = st.assign(cid, cust).code
            elif cid.startswith("shared"):
                codes[(cid, cust)] = st.campaign(cid).shared_code or ""
    orders = [cart(), cart(shipping=None), order(5000), order(300)]
    seen = {True: 0, False: 0}
    for _ in range(40):
        (cid, cust), code = rng.choice(list(codes.items()))
        o = rng.choice(orders)
        r = RedeemRequest(code, o.amount, "EUR", cust, shipping=o.shipping, items=o.items or None)
        move = rng.random()
        if move < 0.4:
            st.redeem_one(r)
        elif move < 0.6:
            st.reserve_one(r)
        elif move < 0.7:
            st.control(code, {"active": rng.random() < 0.5}, ALICE)
        elif move < 0.75:
            c = st.campaign(cid)
            s.move(cid, "pause" if c.state == "active" else "activate")
        else:
            s.clock.advance(minutes=rng.choice([1, 10]))
        for cust_ in customers:
            tags = rng.choice([None, ("blocked",), ("vip",)])
            o = rng.choice(orders)
            every = qualify(st, cust_, o, tags)
            got = {x.campaign_id: x for x in every}
            for k in (1, 2, 5):  # the best k are the first k of every offer, priced or not
                assert qualify(st, cust_, o, tags, limit=k) == every[:k]
            ctx = Context(QualifyRequest(cust_, o, tags), s.clock())
            for x in every:  # the bound pruning relies on is one
                assert ctx.bound(st.campaign(x.campaign_id), x.balance) >= x.discount_amount, x
            for (cid_, c2), code_ in codes.items():
                if c2 != cust_:
                    continue
                try:
                    v = st.validate(RedeemRequest(
                        code_, o.amount, "EUR", cust_, shipping=o.shipping, items=o.items or None, tags=tags,
                    ))
                except errors.TagsNeeded:
                    assert cid_ not in got  # checkout asks again with the stored tags
                    continue
                offered = got.get(cid_)
                seen[offered is not None] += 1
                if offered is None:
                    assert not v.valid or v.discount_amount == 0, (cid_, code_, v)
                else:
                    assert v.valid and v.discount_amount == offered.discount_amount, (cid_, v, offered)
                    assert offered.code == code_
                    if o.items or o.shipping is not None:
                        assert v.detail == detail_json(_pricing(offered))
    assert seen[True] > 20 and seen[False] > 20, seen  # both sides were exercised


def _pricing(o: Offer):  # type: ignore[no-untyped-def]
    from engine.pricing import Pricing

    return Pricing(o.discount_amount, o.items, o.shipping_discount)


def _import(shop: Shop, campaign_id: str, rows: list[ImportedCode]) -> None:
    import asyncio

    shop.state.claim_new_codes([r.code for r in rows])
    asyncio.run(shop.db.copy_imported(campaign_id, rows, None))
    shop.state.admit_imported(campaign_id, rows)


def test_every_code_a_customer_holds_is_offered_also_several_of_one_campaign(shop: Shop) -> None:
    """An import may give one customer several codes of a campaign: each is an offer, on
    the shard that holds it and after its restart (the index is rebuilt from the rows)."""
    _import(shop, "disc", [ImportedCode("IMP-1", "ann"), ImportedCode("IMP-2", "ann"),
                           ImportedCode("IMP-3", "bob")])
    gift = shop.state.assign("gift", "ann").code
    shop.sync()
    want = {("disc", "IMP-1"), ("disc", "IMP-2"), ("gift", gift), ("shared", "SAVE5")}
    for state in (shop.state, shop.restart()):
        assert {(o.campaign_id, o.code) for o in qualify(state, "ann", order())} == want
        assert {o.code for o in qualify(state, "bob", order())} == {"IMP-3", "SAVE5"}
    shop.state.redeem_one(req("IMP-1", cust="ann"))
    assert {o.code for o in qualify(shop.state, "ann", order())} == {"IMP-2", gift, "SAVE5"}


def test_candidates_come_from_the_index_not_from_every_campaign(shop: Shop) -> None:
    """What a shard walks for a customer: its shared codes of active campaigns and the
    codes it gave that customer; not other customers' codes, nor campaigns that have
    nothing here for them."""
    for i in range(50):  # campaigns with nothing for ann
        shop.install(discount_campaign(f"other{i}"), [f"O{i}-1"])
        shop.state.assign(f"other{i}", "bob")
    shop.install(shared_campaign("paused", code="PAUSED1"))
    shop.move("paused", "pause")
    code = shop.state.assign("disc", "ann").code
    got = {(slot.campaign.id, c) for slot, c in zip(*candidates(shop.state, "ann"), strict=True)}
    assert got == {("shared", "SAVE5"), ("disc", code)}
    assert len(candidates(shop.state, "bob")[1]) == 51
    assert candidates(shop.state, "nobody") == ([shop.state.campaigns["shared"]], ["SAVE5"])


def test_with_a_limit_tags_are_asked_for_only_when_such_a_campaign_could_make_it() -> None:
    """A campaign with customer rules is checked (and the customer's tags asked for) only
    when its bound can reach the list: a small offer needing tags costs the gateway no
    second round when the list is full of larger ones."""
    s = Shop()
    for i in range(3):
        s.install(active(new_campaign(
            id=f"big{i}", name="big", type="shared_code", currency="EUR", now=T0,
            discount=Discount("amount", 1000 + i), shared_code=f"BIG{i}",
        )))
    s.install(active(new_campaign(
        id="vip", name="vip", type="shared_code", currency="EUR", now=T0,
        discount=Discount("amount", 100), shared_code="VIP1",
        rules=Rules(customer=CustomerCondition(tags_any=("vip",))),
    )))
    top2 = qualify_request(s.state, QualifyRequest("ann", order(5000), None, 2))
    assert [o.campaign_id for o in top2.offers] == ["big2", "big1"] and not top2.tags_needed
    every = qualify_request(s.state, QualifyRequest("ann", order(5000)))
    assert len(every.offers) == 3 and every.tags_needed


@pytest.mark.parametrize("seed", range(6))
def test_the_keyed_index_reads_candidates_in_the_order_of_their_bounds(seed: int) -> None:
    """A shard's shared codes read largest bound first from its index, family by family,
    give exactly the bounds sorted, for any order; the best ``limit`` are the first of
    every offer; a campaign paused, resumed or added is seen by the next request."""
    from engine.qualification import keyed_index

    rng = random.Random(seed)
    s = Shop(seed)
    discounts = [
        lambda: Discount("percent", rng.randint(1, 60), max=rng.choice([None, rng.randint(1, 3000)])),
        lambda: Discount("percent", rng.randint(1, 60), target="items"),
        lambda: Discount("amount", rng.randint(1, 4000), max=rng.choice([None, 900])),
        lambda: Discount("amount", rng.randint(1, 800), target="items", max=rng.choice([None, rng.randint(1, 5000)])),
        lambda: Discount("amount", rng.randint(1, 800), target="cheapest_item"),
        lambda: Discount("free_units", rng.randint(1, 3), target="cheapest_item", max=rng.choice([None, 2000])),
        lambda: Discount("free_shipping", max=rng.choice([None, 300])),
        lambda: Discount("amount", rng.randint(1, 900), target="shipping"),
        lambda: Discount("fixed_price", rng.randint(0, 5000), max=rng.choice([None, 1500])),
    ]
    for i in range(120):
        s.install(active(new_campaign(
            id=f"k{i:03d}", name="k", type="shared_code", currency="EUR", now=T0,
            discount=rng.choice(discounts)(), shared_code=f"K{i:03d}X",
            rules=rng.choice([None, None, Rules(min_order=rng.choice([1000, 50_000]))]),
        )))
    st = s.state
    orders = [cart(), cart(shipping=None), order(5000), order(300), order(90_000)]
    for step in range(12):
        o = rng.choice(orders)
        ctx = Context(QualifyRequest("ann", o), st.clock())
        index = keyed_index(st)
        got = [b for b, _, _ in index.by_bound(ctx, [])]
        want = sorted((ctx.bound(slot.campaign, None) for slot in index.slots), reverse=True)
        assert got == want
        assert sorted(c for _, _, c in index.by_bound(ctx, [])) == sorted(index.codes)
        every = qualify(st, "ann", o)
        for k in (1, 7, 20):
            assert qualify(st, "ann", o, limit=k) == every[:k]
        for cid in rng.sample(sorted(st.campaigns), 5):
            s.move(cid, "pause" if st.campaign(cid).state == "active" else "activate")
        active_now = {c.campaign.shared_code for c in st.campaigns.values() if c.campaign.state == "active"}
        assert set(keyed_index(st).codes) == active_now
        if step == 6:
            s.install(active(new_campaign(
                id="late", name="late", type="shared_code", currency="EUR", now=T0,
                discount=Discount("amount", 80_000), shared_code="LATE1",
            )))
            every = qualify(st, "ann", order(90_000))
            k = sum(1 for x in every if x.discount_amount >= 80_000)
            assert "late" in {x.campaign_id for x in qualify(st, "ann", order(90_000), limit=k)}


@pytest.mark.parametrize("seed", range(4))
def test_a_list_cut_to_its_limit_says_whether_the_shard_has_more(seed: int) -> None:
    """``more`` may only be false when the shard listed every offer it has; and the shards'
    lists, each cut to its :func:`share` and the cut ones asked again (:func:`cut_short`),
    give the best ``limit`` of every offer of every shard."""
    from engine.qualification import cut_short, share

    rng = random.Random(seed)
    shops = []
    for s in range(3):
        shop = Shop(seed * 10 + s)
        for i in range(rng.randint(15 if s == 0 else 0, 25)):  # the first shard holds the larger ones
            shop.install(active(new_campaign(
                id=f"s{s}c{i:02d}", name="c", type="shared_code", currency="EUR", now=T0,
                discount=rng.choice([Discount("amount", rng.randint(1, 60) * (500 if s == 0 else 50)),
                                     Discount("percent", rng.randint(1, 50), target="items"),
                                     Discount("free_shipping")]),
                shared_code=f"S{s}C{i:02d}", rules=rng.choice([None, Rules(min_order=rng.choice([100, 90_000]))]),
            )))
        shops.append(shop)
    for o in (cart(), order(5000), order(300)):
        every = [qualify_request(sh.state, QualifyRequest("ann", o)).offers for sh in shops]
        for k in (1, 3, 8, 20):
            parts = []
            for sh, all_here in zip(shops, every, strict=True):
                q = qualify_request(sh.state, QualifyRequest("ann", o, None, share(k, len(shops))))
                assert q.offers == all_here[: share(k, len(shops))]
                assert q.more or len(all_here) <= share(k, len(shops))
                parts.append(ranked(q))
            for i in cut_short(parts, k):
                parts[i] = ranked(qualify_request(shops[i].state, QualifyRequest("ann", o, None, k)))
            want = merge([Qualified(e) for e in every], k).offers
            assert [msgspec.json.decode(x[3], type=Offer) for x in merge_ranked(parts, k).offers] == want
