"""admin: marketing managers create campaigns, generate codes and watch the overview while
a sale is running.

``Manager`` users log in as managers (100 req/s each) and, in a loop: create a discount
campaign, start a generation job (``POST /v1/campaigns/{id}/generate``), poll
``GET /v1/jobs/{id}`` until it is done, activate the campaign and read its overview, list
campaigns, and now and then pause and resume one. A ``CampaignIssuer`` (a manager too)
issues codes: it creates a few customers (``POST /v1/customers``) and a small campaign for
them, runs ``POST /v1/campaigns/{id}/issuance`` on them by id (email), polls the job and
runs the same issuance again. ``Shopper`` users are the background traffic: a checkout
service redeeming a shared code (limit, one per customer) with a new customer per order.

At the end: every job generated exactly what was asked and each campaign's overview shows
that many codes; every issuance gave each of its customers one code and one queued email,
and its re-run gave nothing new (each on its own campaign); the background code's limits
held and its count equals the 201s.
"""

from __future__ import annotations

import random
import time
from typing import Any

from locust import between, task

from loadtests.scenarios import common
from loadtests.scenarios.common import SEQ, TALLY, ApiUser

SCENARIO = "admin"


class _Staff(ApiUser):
    """A manager's login and job polling, shared by the two kinds of manager users."""

    abstract = True
    wait_time = between(0.5, 1.5)

    def on_start(self) -> None:
        super().on_start()
        accounts = self.plan["managers"]
        account = accounts[next(SEQ) % len(accounts)]
        self.auth = self.login(account["email"], account["password"])
        self.mine: list[str] = []

    def wait_job(self, job: dict[str, Any], timeout_s: float = 60) -> dict[str, Any]:
        """Poll ``GET /v1/jobs/{id}`` until the job is no longer running (or the timeout)."""
        deadline = time.monotonic() + timeout_s
        while job["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
            status, polled = self.call("GET", f"/v1/jobs/{job['id']}", name="GET /v1/jobs/{id}",
                                       expected={200: None}, label="job", headers=self.auth)
            if status == 200 and polled:
                job = polled
        return job


class Manager(_Staff):
    fixed_count = 2

    @task(4)
    def launch_campaign(self) -> None:
        run = self.plan["run"]
        count = random.choice([200, 500, 1000, 2000])
        status, c = self.call(
            "POST", "/v1/campaigns", name="POST /v1/campaigns", expected={201: None},
            label="create", headers=self.auth,
            body={"name": f"{run} manager campaign {next(SEQ)}", "type": "discount",
                  "currency": "EUR", "discount": {"kind": "percent", "value": 15, "max": 2500},
                  "code": {"length": 10, "prefix": "MG-"}, "timezone": "Europe/Berlin"})
        if status != 201 or not c:
            return
        status, job = self.call(
            "POST", f"/v1/campaigns/{c['id']}/generate", name="POST /v1/campaigns/{id}/generate",
            expected={202: None}, label="generate", headers=self.auth, body={"count": count})
        if status != 202 or not job:
            return
        job = self.wait_job(job)
        TALLY.extra.setdefault("jobs", {})[c["id"]] = {
            "requested": count, "generated": job.get("generated"), "state": job.get("state")}
        if job.get("state") != "done":
            TALLY.violation(f"generation job {job['id']} of {c['id']} ended {job}")
            return
        self.call("POST", f"/v1/campaigns/{c['id']}/activate",
                  name="POST /v1/campaigns/{id}/activate", expected={200: None},
                  label="activate", headers=self.auth)
        status, ov = self.call("GET", f"/v1/campaigns/{c['id']}/overview",
                               name="GET /v1/campaigns/{id}/overview", expected={200: None},
                               label="overview", headers=self.auth)
        if status == 200 and ov and ov["stats"]["available"] != count:
            TALLY.violation(f"{c['id']}: generated {count}, overview shows {ov['stats']}")
        self.mine.append(c["id"])

    @task(2)
    def watch(self) -> None:
        self.call("GET", "/v1/campaigns?limit=20", name="GET /v1/campaigns", expected={200: None},
                  label="list", headers=self.auth)
        shared = self.plan["campaigns"]["shared"]["id"]
        status, ov = self.call("GET", f"/v1/campaigns/{shared}/overview",
                               name="GET /v1/campaigns/{id}/overview [live sale]",
                               expected={200: None}, label="overview", headers=self.auth)
        if status == 200 and ov and ov["stats"]["active_redemptions"] > self.plan["campaigns"]["shared"]["limit"]:
            TALLY.violation(f"live sale over its limit: {ov['stats']}")

    @task(1)
    def pause_and_resume(self) -> None:
        if not self.mine:
            return
        cid = random.choice(self.mine)
        for action in ("pause", "activate"):
            self.call("POST", f"/v1/campaigns/{cid}/{action}",
                      name=f"POST /v1/campaigns/{{id}}/{action}", expected={200: None},
                      label=action, headers=self.auth)


class CampaignIssuer(_Staff):
    """Its own user, so the managers' campaign launches keep their pace in a short run."""

    fixed_count = 1

    @task
    def issue(self) -> None:
        # Its own small campaign, capped by limits.total: the issuer's bank refill (which
        # starts when the bank runs low) may not generate past the cap.
        status, c = self.call(
            "POST", "/v1/campaigns", name="POST /v1/campaigns", expected={201: None},
            label="create", headers=self.auth,
            body={"name": f"{self.plan['run']} issuance {next(SEQ)}", "type": "discount",
                  "currency": "EUR", "discount": {"kind": "amount", "value": 500},
                  "limits": {"total": 20}})
        if status != 201 or not c:
            return
        cid = c["id"]
        status, job = self.call(
            "POST", f"/v1/campaigns/{cid}/generate", name="POST /v1/campaigns/{id}/generate",
            expected={202: None}, label="generate", headers=self.auth, body={"count": 20})
        if status != 202 or not job:
            return
        job = self.wait_job(job)
        self.call("POST", f"/v1/campaigns/{cid}/activate",
                  name="POST /v1/campaigns/{id}/activate", expected={200: None},
                  label="activate", headers=self.auth)
        run = self.plan["run"]
        customers = [f"{run}-ic{next(SEQ)}" for _ in range(random.choice([3, 5, 8]))]
        for cust in customers:
            status, _ = self.call(
                "POST", "/v1/customers", name="POST /v1/customers", expected={201: None},
                label="customer", headers=self.auth,
                body={"id": cust, "email": f"{cust}@shop.example", "consent_email": True,
                      "tags": ["locust"]})
            if status != 201:
                return
        outcome = []
        for attempt in ("first", "again"):
            status, job = self.call(
                "POST", f"/v1/campaigns/{cid}/issuance", name="POST /v1/campaigns/{id}/issuance",
                expected={202: None},
                label="issuance", headers=self.auth,
                body={"selection": {"customer_ids": customers}, "channels": ["email"]})
            if status != 202 or not job:
                return
            job = self.wait_job(job)
            outcome.append((attempt, job.get("state"), job.get("counts", {})))
        TALLY.extra.setdefault("issuances", []).append(
            {"campaign": cid, "customers": len(customers), "runs": outcome})


class Shopper(ApiUser):
    weight = 10
    wait_time = between(0.05, 0.25)

    @task
    def checkout(self) -> None:
        code = self.plan["campaigns"]["shared"]["code"]
        customer = f"{self.plan['run']}-s{next(SEQ)}"
        self.redeem("shared", code, customer, 3000, expected_409={"exhausted"})


def verify(plan: dict[str, Any], tally: common.Tally, admin: Any) -> list[tuple[str, bool, str]]:
    checks = common.shared_invariants(plan, tally, admin, "shared")
    jobs = tally.extra.get("jobs", {})
    wrong = []
    for cid, job in jobs.items():
        stats = admin.overview(cid)["stats"]
        codes = stats["available"] + stats["assigned"] + stats["redeemed"] + stats["void"]
        if job["generated"] != job["requested"] or codes != job["requested"]:
            wrong.append(f"{cid}: asked {job['requested']}, job {job['generated']}, codes {codes}")
    checks.append(("every generation job made exactly the codes asked", not wrong,
                   f"{len(jobs)} campaigns; {wrong[:3]}"))
    checks.append(("campaigns were created during the traffic", bool(jobs), f"{len(jobs)}"))
    bad = []
    for iss in tally.extra.get("issuances", []):
        (_, s1, first), (_, s2, again) = iss["runs"]
        n = iss["customers"]
        if not (s1 == s2 == "done" and first.get("assigned") == first.get("enqueued") == n
                and again.get("assigned") == n and again.get("new_codes") == 0
                and again.get("enqueued") == 0):
            bad.append(iss)
    issued = tally.extra.get("issuances", [])
    checks.append(("every issuance gave each customer one code and one email, once",
                   not bad, f"{len(issued)} issuances; {bad[:2]}"))
    return checks


common.install(SCENARIO, verify)
