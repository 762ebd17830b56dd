"""Publications (serve/routes/publications.py) over fake services: who may publish, 201 on
the request that published and 200 on a repeat, bad bodies refused before any call."""

from typing import Any

from actors.calls import Failure
from tests.route_fakes import assert_refused, gateway, problem_of

PUB: dict[str, Any] = {
    "id": "pub_1", "campaign_id": "c1", "customer_id": "k1", "code": "ABC-123",
    "channels": ["email"], "deliveries": [{"channel": "email", "id": "msg_1", "status": "queued"}],
    "created_at": "2026-12-03T06:00:00+00:00",
}
URL = "/v1/campaigns/c1/publications"


def test_publish_is_201_then_200_with_the_same_code() -> None:
    answers = iter([{**PUB, "created": True}, {**PUB, "created": False}])
    with gateway(issuance={"publish": lambda *a: next(answers)}) as (client, fakes):
        for role in ("admin", "manager", "integration"):
            assert client.post(URL, json={"customer_id": "k1"}, headers=fakes.token(role)).status_code != 403
        assert_refused(client, fakes, "POST", URL, "publications.create", "analyst", json={"customer_id": "k1"})
        assert_refused(client, fakes, "POST", URL, "publications.create", "customer", json={"customer_id": "k1"})


def test_repeat_answers_200() -> None:
    answers = iter([{**PUB, "created": True}, {**PUB, "created": False}])
    with gateway(issuance={"publish": lambda *a: next(answers)}) as (client, fakes):
        body = {"customer_id": "k1", "channels": ["email", "email"]}
        first = client.post(URL, json=body, headers=fakes.token("manager"))
        again = client.post(URL, json=body, headers=fakes.token("manager"))
        assert (first.status_code, again.status_code) == (201, 200)
        assert first.json()["code"] == again.json()["code"] == "ABC-123"
        assert first.json()["created"] is True and again.json()["created"] is False
        cid, customer, channels, actor = fakes.issuance.called("publish")[0]
        assert (cid, customer, channels, actor.kind) == ("c1", "k1", ["email", "email"], "user")


def test_engine_refusals_are_problems() -> None:
    for code, status in (("unknown_campaign", 404), ("not_found", 404), ("campaign_paused", 409),
                         ("bank_exhausted", 409), ("cannot_issue_ended", 409), ("campaign_not_active", 409)):
        with gateway(issuance={"publish": Failure(code, f"refused: {code}")}) as (client, fakes):
            r = client.post(URL, json={"customer_id": "k1"}, headers=fakes.token("manager"))
            assert problem_of(r, status)["detail"] == f"refused: {code}"


def test_bad_bodies_are_422_before_any_call() -> None:
    with gateway() as (client, fakes):
        for body in ({}, {"customer_id": ""}, {"customer_id": "k" * 129}, {"customer_id": 5},
                     {"customer_id": "k1", "channels": ["fax"]}, {"customer_id": "k1", "extra": 1},
                     {"customer_id": "k1", "channels": ["email", "sms", "push", "email"]}):
            problem_of(client.post(URL, json=body, headers=fakes.token("manager")), 422)
        assert fakes.issuance.called("publish") == []
