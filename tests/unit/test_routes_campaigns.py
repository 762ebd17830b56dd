"""Campaigns, their lifecycle, generation jobs, the overview and voucher look-ups
(serve/routes/campaigns.py) over fake services."""

from typing import Any

from actors.calls import Failure
from engine.audit import Actor
from tests.route_fakes import assert_refused, gateway, problem_of

CAMPAIGN: dict[str, Any] = {"id": "cmp_1", "name": "Spring", "type": "discount", "state": "draft", "currency": "EUR"}
NEW = {"name": "Spring", "type": "discount", "currency": "EUR", "discount": {"kind": "percent", "value": 10}}


def test_campaigns_are_created_by_staff_who_write() -> None:
    with gateway(campaigns={"create": CAMPAIGN}) as (client, fakes):
        assert_refused(client, fakes, "POST", "/v1/campaigns", "campaigns.write", "analyst", json=NEW)
        r = client.post("/v1/campaigns", json=NEW, headers=fakes.token("manager"))
        assert r.status_code == 201, r.text
        assert r.headers["location"] == "/v1/campaigns/cmp_1"
        assert r.headers["ratelimit-limit"] == "100"  # set by the guard on the route's response
        [(fields, actor)] = fakes.campaigns.called("create")
        assert actor == Actor("user", "usr_1")
        assert fields["name"] == "Spring" and fields["discount"] == {"kind": "percent", "value": 10}
        assert fields["windows"] == []


def test_a_malformed_request_is_422_for_anyone_and_costs_no_rate_limit() -> None:
    with gateway() as (client, fakes):
        problem_of(client.get("/v1/campaigns?state=lost"), 422, "validation_error")
        r = client.post("/v1/campaigns", json={**NEW, "type": "lottery"}, headers=fakes.token("customer"))
        assert any(e["loc"] == ["body", "type"] for e in problem_of(r, 422)["errors"])
        assert fakes.limiter.hits == [] and fakes.campaigns.calls == []


def test_campaigns_are_listed_and_read_with_their_parameters() -> None:
    with gateway(campaigns={"list": {"items": []}, "get": CAMPAIGN}) as (client, fakes):
        assert_refused(client, fakes, "GET", "/v1/campaigns", "campaigns.read", "integration")
        r = client.get("/v1/campaigns?state=active&limit=5&offset=10", headers=fakes.token("analyst"))
        assert r.json() == {"items": []}
        assert fakes.campaigns.called("list") == [("active", 5, 10, None)]
        r = client.get("/v1/campaigns/cmp_1", headers=fakes.token("analyst"))
        assert r.json()["id"] == "cmp_1"
        fakes.campaigns.answers["get"] = Failure("unknown_campaign", "no campaign cmp_2")
        problem_of(client.get("/v1/campaigns/cmp_2", headers=fakes.token("analyst")), 404, "unknown_campaign")


def test_transitions_notify_the_staff() -> None:
    with gateway(campaigns={"transition": {**CAMPAIGN, "state": "active"}}) as (client, fakes):
        assert_refused(client, fakes, "POST", "/v1/campaigns/cmp_1/pause", "campaigns.write", "analyst")
        for action, word in (("activate", "started"), ("pause", "paused"), ("end", "ended")):
            r = client.post(f"/v1/campaigns/cmp_1/{action}", headers=fakes.token("manager"))
            assert r.status_code == 200 and r.json()["state"] == "active"
            assert fakes.campaigns.called("transition")[-1] == ("cmp_1", action, Actor("user", "usr_1"))
            assert fakes.notifications.called("record")[-1] == (
                f"campaign_{word}", "cmp_1", f"campaign Spring (cmp_1) {word}"
            )


def test_generation_jobs_and_their_progress() -> None:
    job = {"id": "job_1", "campaign_id": "cmp_1", "requested": 100, "generated": 40, "state": "running",
           "rate": 20.0}
    issuance = {"kind": "issuance", "id": "iss_1", "campaign_id": "cmp_1", "selection": {}, "channels": [],
                "state": "running", "counts": {}}
    with gateway(campaigns={"start_generation": job, "job": job}, issuance={"job": issuance}) as (client, fakes):
        assert_refused(client, fakes, "POST", "/v1/campaigns/cmp_1/generate", "campaigns.generate", "analyst",
                       json={"count": 100})
        r = client.post("/v1/campaigns/cmp_1/generate", json={"count": 100}, headers=fakes.token("admin"))
        assert r.status_code == 202 and r.headers["location"] == "/v1/jobs/job_1"
        assert r.json()["eta_s"] == 3.0
        assert fakes.campaigns.called("start_generation") == [("cmp_1", 100)]
        r = client.get("/v1/jobs/job_1", headers=fakes.token("analyst"))
        assert r.json()["eta_s"] == 3.0
        from actors.issuance import JOB_PREFIX

        r = client.get(f"/v1/jobs/{JOB_PREFIX}1", headers=fakes.token("analyst"))
        assert r.json()["kind"] == "issuance"
        assert fakes.issuance.called("job") == [(f"{JOB_PREFIX}1",)]


def test_overview_gathers_three_answers() -> None:
    answers = {"campaigns": {"get": CAMPAIGN}, "reports": {"live": {"rps": 1}}, "delivery": {"status": {"sent": 2}}}
    with gateway(**answers) as (client, fakes):
        assert_refused(client, fakes, "GET", "/v1/campaigns/cmp_1/overview", "overview.read", "customer")
        r = client.get("/v1/campaigns/cmp_1/overview", headers=fakes.token("analyst"))
        assert r.json() == {"campaign": CAMPAIGN, "stats": {"rps": 1}, "delivery": {"sent": 2}}


def test_customers_look_up_only_their_own_vouchers() -> None:
    mine = {
        "code": "AB12",
        "campaign_id": "cmp_1",
        "status": "assigned",
        "customer_id": "cus_1",
        "reserved": False,
        "active": True,
    }
    with gateway(vouchers={"get": mine}) as (client, fakes):
        r = client.get("/v1/vouchers/AB12", headers=fakes.token("customer", user_id="cus_1"))
        assert r.json() == mine
        assert fakes.limiter.budget_checks == [["customer:cus_1"]] and fakes.limiter.penalized == []
        r = client.get("/v1/vouchers/AB12", headers=fakes.token("customer", user_id="cus_2"))
        problem_of(r, 404, "unknown_code")
        assert fakes.limiter.penalized == [["customer:cus_2"]]
        # staff see any voucher, and spend no guessing budget
        r = client.get("/v1/vouchers/AB12", headers=fakes.token("manager", user_id="usr_1"))
        assert r.json() == mine and len(fakes.limiter.budget_checks) == 2


def test_a_code_is_switched_off_by_staff_with_who_did_it() -> None:
    off = {"code": "AB12", "campaign_id": "cmp_1", "status": "available", "active": False}
    with gateway(vouchers={"control": off}) as (client, fakes):
        r = client.patch(
            "/v1/vouchers/AB12", json={"active": False}, headers=fakes.token("manager", user_id="usr_1")
        )
        assert r.status_code == 200 and r.json()["active"] is False
        (call,) = fakes.vouchers.called("control")
        assert call[0] == "AB12" and call[1] == {"active": False}
        assert call[2] == Actor("user", "usr_1")
        # nothing to change, a string for a boolean, metadata over 4 KB: 422s
        for body in ({}, {"active": "no"}, {"metadata": {"k": "v" * 5000}}):
            r = client.patch("/v1/vouchers/AB12", json=body, headers=fakes.token("manager"))
            assert r.status_code == 422, body
        r = client.patch("/v1/vouchers/AB12", json={"active": False}, headers=fakes.token("analyst"))
        problem_of(r, 403, "forbidden")
        r = client.patch("/v1/vouchers/AB12", json={"active": False}, headers=fakes.token("customer"))
        problem_of(r, 403, "forbidden")
        assert len(fakes.vouchers.called("control")) == 1
