"""POST /v1/qualifications (serve/routes/qualifications.py) over fake services: roles, a
customer qualifying only themselves, the request every shard gets, the answer's shape, bad
orders and a shard that does not answer in time."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from engine import errors
from engine.orders import Order
from engine.pricing import Line
from engine.qualification import (
    DEFAULT_OFFERS,
    MAX_OFFERS,
    Offer,
    Qualified,
    QualifyRequest,
    Ranked,
    ranked,
)
from tests.route_fakes import Gateway, assert_refused, gateway, problem_of

BODY: dict[str, Any] = {"customer_id": "cus_1", "order": {"amount": 4000, "currency": "EUR"}}
OFFERS = [
    Offer("unique_code", "gift", "gift card", "gift_card", "GIFT-A", 4000, (Line(0, "A", 4000),), 0, 5000),
    Offer("shared_code", "save", "five off", "shared_code", "SAVE5", 500),
]


def _engine(fakes: Gateway, answer: Any = OFFERS) -> list[tuple[QualifyRequest, float]]:
    asked: list[tuple[QualifyRequest, float]] = []

    async def qualify(req: QualifyRequest, deadline_s: float, send: Any = None) -> Ranked:
        asked.append((req, deadline_s))
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return ranked(answer(req))
        return ranked(Qualified(list(answer)))

    fakes.engine.qualify = qualify  # type: ignore[attr-defined]
    return asked


def test_an_integration_qualifies_a_customer_with_their_tags() -> None:
    with gateway() as (client, fakes):
        asked = _engine(fakes)
        body = {**BODY, "customer_tags": ["vip"], "limit": 5}
        r = client.post("/v1/qualifications", json=body, headers=fakes.token("integration"))
        assert r.status_code == 200, r.text
        [(req, deadline)] = asked
        assert req == QualifyRequest("cus_1", Order(4000, "EUR"), ("vip",), 6)  # one more: has_more
        assert deadline == fakes.services.settings.decision_deadline_s
        out = r.json()
        assert out["customer_id"] == "cus_1" and out["currency"] == "EUR"
        assert out["offers"][0] == {
            "kind": "unique_code", "campaign_id": "gift", "campaign_name": "gift card",
            "campaign_type": "gift_card", "code": "GIFT-A", "discount_amount": 4000,
            "items": [{"line": 0, "sku": "A", "discount": 4000}], "shipping_discount": 0,
            "balance": 5000,
        }
        assert [o["code"] for o in out["offers"]] == ["GIFT-A", "SAVE5"] and out["has_more"] is False
        assert r.headers["x-gateway-replica"] and "ratelimit-limit" in r.headers


def test_the_best_limit_offers_and_whether_there_are_more() -> None:
    with gateway() as (client, fakes):
        asked = _engine(fakes)
        admin = fakes.token("admin")
        r = client.post("/v1/qualifications", json={**BODY, "limit": 1}, headers=admin)
        assert [o["code"] for o in r.json()["offers"]] == ["GIFT-A"] and r.json()["has_more"] is True
        r = client.post("/v1/qualifications", json=BODY, headers=admin)  # the default limit
        assert asked[-1][0].limit == DEFAULT_OFFERS + 1 and r.json()["has_more"] is False
        r = client.post("/v1/qualifications", json={**BODY, "limit": MAX_OFFERS}, headers=admin)
        assert r.status_code == 200 and asked[-1][0].limit == MAX_OFFERS + 1


def test_what_the_fast_lane_does_not_take_the_route_answers() -> None:
    """The fast lane takes a well-formed body; what it refuses (coercions, unstorable
    text, a body that is not JSON) goes to the route, which answers the documented
    problem, before any shard is asked."""
    from serve.routes.qualifications import QualificationLane

    lane = QualificationLane(None)  # type: ignore[arg-type]
    assert lane.decode(json.dumps({**BODY, "limit": 3}).encode(), {}).limit == 3
    with gateway() as (client, fakes):
        asked = _engine(fakes)
        admin = fakes.token("admin")
        for raw, status in (
            (json.dumps({**BODY, "limit": "5"}), 422),
            (json.dumps({**BODY, "customer_id": "a\u0000b"}), 422),
            (json.dumps({**BODY, "customer_tags": ["\ud800"]}), 422),
            (json.dumps({**BODY, "unknown": 1}), 422),
            ("{not json", 400),
        ):
            with pytest.raises(msgspec.MsgspecError):
                lane.decode(raw.encode(), {})
            r = client.post("/v1/qualifications", content=raw, headers={**admin, "content-type": "application/json"})
            problem_of(r, status)
        assert asked == []


def test_customers_qualify_only_themselves_and_state_no_tags() -> None:
    with gateway() as (client, fakes):
        asked = _engine(fakes)
        me = fakes.token("customer", user_id="cus_1")
        assert client.post("/v1/qualifications", json=BODY, headers=me).status_code == 200
        r = client.post("/v1/qualifications", json={**BODY, "customer_id": "cus_2"}, headers=me)
        problem_of(r, 403, "forbidden")
        r = client.post("/v1/qualifications", json={**BODY, "customer_tags": ["vip"]}, headers=me)
        problem_of(r, 403, "forbidden")
        assert len(asked) == 1 and asked[0][0].tags is None


def test_roles() -> None:
    with gateway() as (client, fakes):
        asked = _engine(fakes)
        assert_refused(client, fakes, "POST", "/v1/qualifications", "qualifications.create", "analyst", json=BODY)
        assert asked == []


def test_bad_orders_are_refused_before_any_shard() -> None:
    with gateway() as (client, fakes):
        asked = _engine(fakes)
        admin = fakes.token("admin")
        for bad in (
            {**BODY, "order": {"amount": 1, "currency": "EUD"}},
            {**BODY, "order": {"amount": -1, "currency": "EUR"}},
            {**BODY, "customer_tags": ["x"] * 51},
            {**BODY, "customer_tags": ["a\nb"]},
            {**BODY, "limit": 0},
            {"order": BODY["order"]},
        ):
            r = client.post("/v1/qualifications", json=bad, headers=admin)
            problem_of(r, 422)
        assert asked == []


def test_a_shard_that_does_not_answer_in_time_is_a_503_with_retry_after() -> None:
    with gateway() as (client, fakes):
        _engine(fakes, errors.Unavailable("a shard did not answer the qualification within 5 s; retry"))
        r = client.post("/v1/qualifications", json=BODY, headers=fakes.token("admin"))
        problem_of(r, 503, "unavailable")
        assert int(r.headers["retry-after"]) >= 1


class _StoredTags:
    """The replica's stored customer tags (serve.customer_tags.CustomerTags), faked."""

    def __init__(self, cached: dict[str, tuple[str, ...]], stored: dict[str, tuple[str, ...]]) -> None:
        self._cached, self.stored, self.loads = cached, stored, 0

    def cached(self, customer_id: str) -> tuple[str, ...] | None:
        return self._cached.get(customer_id)

    async def load(self, customer_id: str) -> tuple[str, ...]:
        self.loads += 1
        return self.stored.get(customer_id, ())


def test_without_tags_sent_the_stored_customers_tags_count() -> None:
    vip = Offer("shared_code", "vip", "vip", "shared_code", "VIP", 900)

    def answer(req: QualifyRequest) -> Qualified:
        if req.tags is None:
            return Qualified(OFFERS[1:], tags_needed=True)
        return Qualified([vip, *OFFERS[1:]] if "vip" in req.tags else OFFERS[1:])

    with gateway() as (client, fakes):
        tags = _StoredTags({"cus_cached": ("vip",)}, {"cus_1": ("vip",)})
        object.__setattr__(fakes.services.checkout, "tags", tags)
        asked = _engine(fakes, answer)
        me = fakes.token("customer", user_id="cus_1")
        r = client.post("/v1/qualifications", json=BODY, headers=me)
        assert [o["code"] for o in r.json()["offers"]] == ["VIP", "SAVE5"]
        assert [a[0].tags for a in asked] == [None, ("vip",)] and tags.loads == 1
        # cached tags ride along: one call, no read
        asked.clear()
        r = client.post("/v1/qualifications", json={**BODY, "customer_id": "cus_cached"},
                        headers=fakes.token("integration"))
        assert [o["code"] for o in r.json()["offers"]] == ["VIP", "SAVE5"]
        assert [a[0].tags for a in asked] == [("vip",)] and tags.loads == 1
        # tags sent by a trusted caller are the ones that count
        asked.clear()
        r = client.post("/v1/qualifications", json={**BODY, "customer_tags": []},
                        headers=fakes.token("integration"))
        assert [o["code"] for o in r.json()["offers"]] == ["SAVE5"] and [a[0].tags for a in asked] == [()]
