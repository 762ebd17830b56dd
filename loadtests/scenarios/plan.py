"""Set-up of a scenario run, before Locust starts: campaigns, codes, API keys, users.

Everything goes through the HTTP API with the admin's credentials (httpx, blocking), as an
operator's script would, except *issuance* (assigning codes to customers): the HTTP API has
no issuance endpoint yet, so codes are assigned through an :data:`Issuer` (the engine's
Python API, ``VoucherEngine.assign_many``) when the caller has one (the runner that started
the engine, the pytest fixture). Without one, the parts that need issued codes fall back
(flash_sale: the shared code only; checkout: a shared welcome code; browse: empty wallets)
and the plan says so in ``notes``.

The plan is a small JSON document handed to the Locust process through the file named by
``VOUCHER_LOCUST_PLAN``. It holds secrets (API keys, passwords): the runner writes it into a
private temporary directory, never into the reports.

This module never imports Locust or gevent: it runs in the runner and in pytest too.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

SCENARIOS = ("flash_sale", "checkout", "browse", "admin")
PLAN_ENV = "VOUCHER_LOCUST_PLAN"
SUMMARY_ENV = "VOUCHER_LOCUST_SUMMARY"

Issuer = Callable[[str, list[str]], dict[str, str]]
"""``issue(campaign_id, customer_ids) -> {customer_id: code}``: assign one code of the
campaign to each customer (the same code on a re-run)."""

DEFAULTS: dict[str, dict[str, int]] = {
    # limit: the shared code's global limit; pool: unique codes issued to VIP shoppers;
    # customers: registered shoppers who log in and validate with their own token.
    "flash_sale": {"limit": 1000, "pool": 2000, "customers": 4},
    # codes: unique codes issued to checkout customers (one per customer)
    "checkout": {"codes": 5000, "customers": 0},
    # customers: registered users with two issued vouchers each
    "browse": {"customers": 20, "codes": 0},
    # limit: the background traffic's shared code; customers: none (a manager logs in)
    "admin": {"limit": 100_000, "customers": 0},
}


class SetupError(RuntimeError):
    pass


def _now() -> datetime:
    return datetime.now(UTC)


class Admin:
    """An httpx client logged in as the admin, that waits out 429s (setup is not load)."""

    def __init__(self, base: str, email: str, password: str, timeout: float = 60.0) -> None:
        self.base = base.rstrip("/")
        self.client = httpx.Client(base_url=self.base, timeout=timeout)
        r = self.request("POST", "/v1/auth/login", json={"email": email, "password": password},
                         auth=False)
        if r.status_code != 200:
            raise SetupError(f"admin login as {email} failed: {r.status_code} {r.text}")
        self.headers = {"Authorization": f"Bearer {r.json()['access_token']}"}

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, auth: bool = True, expect: int | None = None,
                **kw: Any) -> httpx.Response:
        headers = {**(self.headers if auth else {}), **kw.pop("headers", {})}
        deadline = time.monotonic() + 90
        while True:
            r = self.client.request(method, path, headers=headers, **kw)
            if r.status_code != 429 or time.monotonic() > deadline:
                break
            time.sleep(min(10.0, float(r.headers.get("retry-after", "1") or 1)))
        if expect is not None and r.status_code != expect:
            raise SetupError(f"{method} {path} answered {r.status_code}, expected {expect}: {r.text}")
        return r

    def json(self, method: str, path: str, expect: int, **kw: Any) -> Any:
        return self.request(method, path, expect=expect, **kw).json()

    # --- the calls a set-up needs ------------------------------------------------------

    def api_key(self, name: str, roles: list[str] | None = None) -> str:
        body = {"name": name, "roles": roles or ["integration"]}
        return str(self.json("POST", "/v1/api-keys", 201, json=body)["key"])

    def campaign(self, body: Mapping[str, Any], *, activate: bool = True) -> dict[str, Any]:
        c = dict(self.json("POST", "/v1/campaigns", 201, json=dict(body)))
        if activate:
            c = dict(self.json("POST", f"/v1/campaigns/{c['id']}/activate", 200))
        return c

    def generate(self, campaign_id: str, count: int, timeout_s: float = 120.0) -> dict[str, Any]:
        job = self.json("POST", f"/v1/campaigns/{campaign_id}/generate", 202, json={"count": count})
        return self.wait_job(job["id"], timeout_s)

    def wait_job(self, job_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.json("GET", f"/v1/jobs/{job_id}", 200)
            if job["state"] != "running":
                break
            if time.monotonic() > deadline:
                raise SetupError(f"generation job {job_id} still running after {timeout_s:.0f} s")
            time.sleep(0.1)
        if job["state"] != "done" or job["generated"] != job["requested"]:
            raise SetupError(f"generation job {job_id} ended {job}")
        return dict(job)

    def overview(self, campaign_id: str) -> dict[str, Any]:
        return dict(self.json("GET", f"/v1/campaigns/{campaign_id}/overview", 200))

    def register(self, email: str, password: str, name: str) -> str:
        r = self.request("POST", "/v1/auth/register", auth=False, expect=201,
                         json={"email": email, "password": password, "name": name})
        return str(r.json()["id"])


def _window(hours: int = 2) -> dict[str, str]:
    # The sale window opens now: the shoppers rush in as Locust spawns them.
    return {"starts_at": (_now() - timedelta(seconds=1)).isoformat(),
            "ends_at": (_now() + timedelta(hours=hours)).isoformat()}


def headroom(issued: int) -> int:
    """Codes to generate so that ``issued`` of them can be assigned: codes are spread over
    the shards by hash and a customer gets a code of the shard their id maps to, so a shard
    can run dry while others still have codes (``bank_exhausted``)."""
    return int(issued * 1.25) + 64


def _customers(admin: Admin, run: str, n: int, role: str | None = None) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        email = f"{run}-{role or 'shopper'}-{i}@load.example"
        password = secrets.token_urlsafe(12)
        uid = admin.register(email, password, f"load {role or 'shopper'} {i}")
        if role is not None:
            admin.json("PUT", f"/v1/users/{uid}/roles", 200, json={"roles": [role]})
        out.append({"id": uid, "email": email, "password": password})
    return out


def prepare(
    scenario: str,
    base_url: str,
    admin_email: str,
    admin_password: str,
    *,
    issue: Issuer | None = None,
    **overrides: int,
) -> dict[str, Any]:
    """Create what ``scenario`` needs on the running engine; returns the plan."""
    if scenario not in SCENARIOS:
        raise SetupError(f"unknown scenario {scenario!r}; one of {', '.join(SCENARIOS)}")
    params = {**DEFAULTS[scenario], **{k: v for k, v in overrides.items() if v is not None}}
    run = f"lt{secrets.token_hex(3)}"
    plan: dict[str, Any] = {
        "scenario": scenario,
        "run": run,
        "host": base_url.rstrip("/"),
        "created_at": _now().isoformat(),
        "params": params,
        "issued": issue is not None,
        "notes": [],
        "campaigns": {},
        "api_keys": [],
        "customers": [],
    }
    t0 = time.perf_counter()
    with Admin(base_url, admin_email, admin_password) as admin:
        plan["api_keys"] = [admin.api_key(f"{run}-checkout")]
        if scenario == "flash_sale":
            _flash_sale(admin, plan, params, issue)
        elif scenario == "checkout":
            _checkout(admin, plan, params, issue)
        elif scenario == "browse":
            _browse(admin, plan, params, issue)
        else:
            _admin(admin, plan, params)
    plan["setup_seconds"] = round(time.perf_counter() - t0, 2)
    return plan


def _flash_sale(admin: Admin, plan: dict[str, Any], p: dict[str, int], issue: Issuer | None) -> None:
    run = plan["run"]
    code = f"FLASH-{run.upper()}"
    c = admin.campaign({
        "name": f"flash sale {run} (shared code)", "type": "flash_sale", "currency": "EUR",
        "discount": {"kind": "percent", "value": 50, "max": 1000},
        "limits": {"total": p["limit"], "per_customer": 1}, "shared_code": code, **_window(),
    })
    plan["campaigns"]["shared"] = {"id": c["id"], "code": code, "limit": p["limit"],
                                   "per_customer": 1}
    plan["customers"] = _customers(admin, run, p["customers"])
    if p["pool"] and issue is not None:
        pool = admin.campaign({
            "name": f"flash sale {run} (unique codes)", "type": "flash_sale", "currency": "EUR",
            "discount": {"kind": "amount", "value": 1500},
            "limits": {"total": headroom(p["pool"])},
            "code": {"length": 10, "prefix": "FS-"}, **_window(),
        }, activate=False)
        admin.generate(pool["id"], headroom(p["pool"]))
        admin.json("POST", f"/v1/campaigns/{pool['id']}/activate", 200)
        shoppers = [f"{run}-vip-{i}" for i in range(p["pool"])]
        plan["campaigns"]["pool"] = {"id": pool["id"], "codes": issue(pool["id"], shoppers)}
    elif p["pool"]:
        plan["notes"].append(
            "no issuer: the unique-code pool is skipped (the HTTP API has no issuance "
            "endpoint; run through loadtests.run_scenario to issue codes with the engine)")


def _checkout(admin: Admin, plan: dict[str, Any], p: dict[str, int], issue: Issuer | None) -> None:
    run = plan["run"]
    if issue is not None:
        c = admin.campaign({
            "name": f"checkout {run}", "type": "discount", "currency": "EUR",
            "discount": {"kind": "percent", "value": 10, "max": 2000}, "min_order": 1000,
            "code": {"length": 12, "prefix": "CO-", "check_char": True}, **_window(24),
        }, activate=False)
        admin.generate(c["id"], headroom(p["codes"]))
        admin.json("POST", f"/v1/campaigns/{c['id']}/activate", 200)
        customers = [f"{run}-cust-{i}" for i in range(p["codes"])]
        plan["campaigns"]["main"] = {"id": c["id"], "kind": "unique",
                                     "codes": issue(c["id"], customers)}
    else:
        code = f"WELCOME-{run.upper()}"
        c = admin.campaign({
            "name": f"checkout {run} (welcome code)", "type": "shared_code", "currency": "EUR",
            "discount": {"kind": "amount", "value": 500}, "min_order": 1000,
            "limits": {"total": 10**9, "per_customer": 1}, "shared_code": code, **_window(24),
        })
        plan["campaigns"]["main"] = {"id": c["id"], "kind": "shared", "code": code,
                                     "per_customer": 1}
        plan["notes"].append("no issuer: checkout uses a shared welcome code instead of "
                             "issued unique codes")


def _browse(admin: Admin, plan: dict[str, Any], p: dict[str, int], issue: Issuer | None) -> None:
    run = plan["run"]
    plan["customers"] = _customers(admin, run, p["customers"])
    wallets: dict[str, list[str]] = {c["id"]: [] for c in plan["customers"]}
    ids = []
    for i, (name, body) in enumerate([
        ("spring 10%", {"discount": {"kind": "percent", "value": 10}}),
        ("5 EUR off", {"discount": {"kind": "amount", "value": 500}, "min_order": 2000}),
    ]):
        c = admin.campaign({"name": f"browse {run} {name}", "type": "discount", "currency": "EUR",
                            "code": {"length": 10, "prefix": f"B{i}-"}, **body, **_window(24)},
                           activate=False)
        # more codes than customers: the wallets see only theirs among the rest
        admin.generate(c["id"], headroom(len(wallets)) + p["codes"])
        admin.json("POST", f"/v1/campaigns/{c['id']}/activate", 200)
        ids.append(c["id"])
        if issue is not None and wallets:
            for cust, code in issue(c["id"], list(wallets)).items():
                wallets[cust].append(code)
    plan["campaigns"]["wallet"] = {"ids": ids, "wallets": wallets}
    if issue is None:
        plan["notes"].append("no issuer: the customers' wallets are empty (no HTTP issuance)")


def _admin(admin: Admin, plan: dict[str, Any], p: dict[str, int]) -> None:
    run = plan["run"]
    code = f"BUSY-{run.upper()}"
    c = admin.campaign({
        "name": f"admin {run} background sale", "type": "shared_code", "currency": "EUR",
        "discount": {"kind": "amount", "value": 300},
        "limits": {"total": p["limit"], "per_customer": 1}, "shared_code": code, **_window(),
    })
    plan["campaigns"]["shared"] = {"id": c["id"], "code": code, "limit": p["limit"],
                                   "per_customer": 1}
    plan["managers"] = _customers(admin, run, 2, role="manager")
    plan["notes"].append(
        "issuance: the HTTP API has no issuance endpoint yet; the managers' campaigns are "
        "issued by generation (POST .../generate, GET /v1/jobs polling) and checked with "
        "the overview")


def write_plan(plan: Mapping[str, Any], directory: Path) -> Path:
    """Write the plan (it holds secrets) readable by this user only."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"plan-{plan['scenario']}-{plan['run']}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(plan, f)
    return path


def engine_issuer(engine: Any) -> Issuer:
    """An :data:`Issuer` over ``actors.client.VoucherEngine`` (call it outside an event loop)."""
    import asyncio

    def issue(campaign_id: str, customers: list[str]) -> dict[str, str]:
        outs = asyncio.run(engine.assign_many(campaign_id, customers))
        codes = {}
        for cust, out in zip(customers, outs, strict=True):
            if out.assignment is None:
                raise SetupError(f"assigning a code of {campaign_id} to {cust} failed: "
                                 f"{out.rejection}")
            codes[cust] = out.assignment.code
        return codes

    return issue
