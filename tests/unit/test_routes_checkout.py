"""Checkout (serve/routes/checkout.py and serve/checkout.py's fast lane) over fake
services: roles, the request the shards get, the answers and the follow-ups."""

import msgspec

from engine.events import Rejection, Validation
from engine.shard_state import Outcome
from tests.route_fakes import assert_refused, decision, gateway, problem_of

BODY = {"code": "SAVE10", "order": {"amount": 1000, "currency": "EUR", "id": "o1"}}


def test_redemption_reaches_the_shards_with_a_scoped_key() -> None:
    with gateway() as (client, fakes):
        r = client.post("/v1/redemptions", json=BODY, headers={**fakes.token("integration"), "Idempotency-Key": "k1"})
        assert r.status_code == 201, r.text
        assert r.json()["id"] == "red_1" and r.json()["status"] == "redeemed"
        assert r.headers["location"] == "/v1/redemptions/red_1"
        assert r.headers["x-gateway-replica"] == "replica-1" and r.headers["ratelimit-limit"] == "100"
        [(op, req)] = fakes.batcher.submitted
        assert op == "redeem"
        assert (req.code, req.amount, req.currency, req.order_id) == ("SAVE10", 1000, "EUR", "o1")
        assert req.idempotency_key == "u:usr_1:k1" and req.customer_id is None
        # one Redis call: the caller's limit and its guessing budgets
        [hit] = fakes.limiter.hits
        assert hit["failure_keys"] == ["ip:testclient|user:usr_1", "caller:user:usr_1"]


def test_the_fast_lane_and_the_route_answer_alike() -> None:
    from serve.checkout import decode_checkout

    # 1000.0: an integer to the documented model, not to the fast lane's decoder
    raw = msgspec.json.encode({**BODY, "order": {**BODY["order"], "amount": 1000.0}})
    try:
        decode_checkout(raw)
        raise AssertionError("the fast lane should hand this body to the FastAPI route")
    except msgspec.ValidationError:
        pass
    with gateway() as (client, fakes):
        fast = client.post("/v1/reservations", json=BODY, headers=fakes.token("manager"))
        slow = client.post(
            "/v1/reservations", content=raw, headers={**fakes.token("manager"), "content-type": "application/json"}
        )
        assert fast.status_code == slow.status_code == 201, slow.text
        assert fast.json() == slow.json() and fast.json()["state"] == "held"
        assert {k: fast.headers[k] for k in ("x-gateway-replica", "ratelimit-limit")} == {
            k: slow.headers[k] for k in ("x-gateway-replica", "ratelimit-limit")
        }
        [(_, a), (_, b)] = fakes.batcher.submitted
        assert a == b


def test_checkout_roles() -> None:
    with gateway() as (client, fakes):
        assert_refused(client, fakes, "POST", "/v1/redemptions", "redemptions.create", "analyst", json=BODY)
        assert_refused(client, fakes, "POST", "/v1/reservations", "reservations.write", "customer", json=BODY)
        assert fakes.batcher.submitted == []


def test_customers_validate_only_for_themselves() -> None:
    valid = Outcome(validation=Validation(code="SAVE10", valid=True, discount_amount=100))
    with gateway() as (client, fakes):
        fakes.batcher.outcome = lambda op, req: valid
        r = client.post("/v1/validations", json=BODY, headers=fakes.token("customer", user_id="cus_1"))
        assert r.status_code == 200 and r.json()["valid"] is True and r.json()["reason"] is None
        assert fakes.batcher.submitted[-1][1].customer_id == "cus_1"
        r = client.post("/v1/validations", json={**BODY, "customer_id": "cus_2"},
                        headers=fakes.token("customer", user_id="cus_1"))
        problem_of(r, 403, "forbidden")
        assert len(fakes.batcher.submitted) == 1


def test_rejections_are_problems_and_guesses_spend_budgets() -> None:
    with gateway() as (client, fakes):
        fakes.batcher.outcome = lambda op, req: Outcome(rejection=Rejection("unknown_code", "no such code"))
        r = client.post("/v1/redemptions", json={**BODY, "customer_id": "cus_5"}, headers=fakes.token("admin"))
        assert problem_of(r, 404, "unknown_code")["code"] == "unknown_code"
        assert r.headers["x-gateway-replica"] == "replica-1"
        assert fakes.limiter.penalized == [["customer:cus_5", "caller:user:usr_1"]]
        fakes.batcher.outcome = lambda op, req: Outcome(rejection=Rejection("campaign_paused", "paused"))
        r = client.post("/v1/redemptions", json=BODY, headers=fakes.token("admin"))
        assert r.status_code >= 400 and len(fakes.limiter.penalized) == 1


def test_rate_limited_checkout_is_429_with_its_headers() -> None:
    with gateway() as (client, fakes):
        fakes.limiter.deny = decision(allowed=False)
        r = client.post("/v1/redemptions", json=BODY, headers=fakes.token("admin"))
        problem_of(r, 429, "rate_limited")
        assert r.headers["retry-after"] == "7" and r.headers["ratelimit-remaining"] == "0"
        assert fakes.batcher.submitted == []


def test_bad_bodies_and_keys_are_422_problems() -> None:
    with gateway() as (client, fakes):
        r = client.post("/v1/redemptions", json={"code": "SAVE10"}, headers=fakes.token("admin"))
        assert any(e["loc"] == ["body", "order"] for e in problem_of(r, 422)["errors"])
        r = client.post("/v1/redemptions", json=BODY, headers={**fakes.token("admin"), "Idempotency-Key": "k" * 256})
        assert "Idempotency-Key must be 1-255 characters" in problem_of(r, 422)["detail"]
        assert fakes.batcher.submitted == []


def test_follow_ups_carry_the_callers_key() -> None:
    with gateway() as (client, fakes):
        assert_refused(client, fakes, "POST", "/v1/redemptions/red_1/rollback", "redemptions.rollback", "analyst")
        key = {"Idempotency-Key": "r1"}
        r = client.post("/v1/redemptions/red_1/rollback", headers={**fakes.token("integration"), **key})
        assert r.status_code == 200 and r.json()["status"] == "rolled_back"
        r = client.post("/v1/reservations/res_1/confirm", headers={**fakes.token("manager", user_id="usr_2"), **key})
        assert r.status_code == 201 and r.json()["status"] == "redeemed"
        r = client.post("/v1/reservations/res_1/release", headers=fakes.token("admin"))
        assert r.status_code == 200 and r.json()["state"] == "released"
        assert fakes.engine.calls == [
            ("rollback", "red_1", "u:usr_1:r1"),
            ("confirm", "res_1", "u:usr_2:r1"),
            ("release", "res_1", None),
        ]
