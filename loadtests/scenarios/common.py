"""What every scenario's Locust users share: the plan, a tally of business outcomes, API
calls that classify answers, and the end-of-run invariant check.

Runs inside the Locust process only (gevent). The tally lives in this one process:
distributed Locust (``--processes``/workers) is not supported, since the invariants need
every answer in one place.

Expected business answers (``409 exhausted``, ``already_redeemed``, ...) are marked as
successes in Locust's statistics and counted in the tally; anything else that is not the
expected status is a Locust failure. At ``test_stop`` the scenario's ``verify`` compares the
tally with what the API reports; a violated invariant is logged and sets the process exit
code to 1.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from locust import FastHttpUser, events
from locust.runners import WorkerRunner

from loadtests.scenarios import plan as planning

log = logging.getLogger("voucher.locust")

PLAN: dict[str, Any] = {}
UNKNOWN_STATUSES = {0, 502, 503, 504}  # no answer, or a proxy/recovering shard: outcome unknown
RETRIES = 3


@dataclass
class Redemption:
    id: str
    campaign: str  # the plan's campaign key ("shared", "pool", "main", ...)
    code: str
    customer: str | None
    discount: int
    rolled_back: bool = False


@dataclass
class Tally:
    redemptions: dict[str, Redemption] = field(default_factory=dict)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    unknown: Counter[str] = field(default_factory=Counter)  # redeem outcomes never learnt
    violations: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def violation(self, text: str) -> None:
        if len(self.violations) < 200:
            self.violations.append(text)
        log.error("invariant violated during the run: %s", text)

    def active(self, campaign: str) -> list[Redemption]:
        return [r for r in self.redemptions.values()
                if r.campaign == campaign and not r.rolled_back]

    def of(self, campaign: str) -> list[Redemption]:
        return [r for r in self.redemptions.values() if r.campaign == campaign]


TALLY = Tally()
SEQ = itertools.count(1)

Verifier = Callable[[dict[str, Any], Tally, planning.Admin], list[tuple[str, bool, str]]]
_VERIFIERS: dict[str, Verifier] = {}


def register(scenario: str, verify: Verifier) -> None:
    _VERIFIERS[scenario] = verify


def admin_credentials() -> tuple[str, str]:
    email = os.environ.get("VOUCHER_ADMIN_EMAIL", "admin@example.com")
    password = os.environ.get("VOUCHER_ADMIN_PASSWORD", "")
    if not password:
        raise planning.SetupError("set VOUCHER_ADMIN_EMAIL / VOUCHER_ADMIN_PASSWORD (the "
                                  "engine's bootstrap admin) for the set-up and the checks")
    return email, password


def load_plan(environment: Any, scenario: str) -> dict[str, Any]:
    """The plan of this run: the runner's (``VOUCHER_LOCUST_PLAN``), or one made here with
    httpx when Locust was started by hand (web UI), without issued codes."""
    if PLAN:
        return PLAN
    path = os.environ.get(planning.PLAN_ENV)
    if path:
        PLAN.update(json.loads(Path(path).read_text()))
    else:
        if not environment.host:
            raise planning.SetupError("no --host and no plan: give Locust the engine's URL")
        email, password = admin_credentials()
        log.info("no %s: preparing %s on %s (no issuance)", planning.PLAN_ENV, scenario,
                 environment.host)
        PLAN.update(planning.prepare(scenario, environment.host, email, password))
    if PLAN["scenario"] != scenario:
        raise planning.SetupError(f"the plan is for {PLAN['scenario']!r}, this locustfile runs "
                                  f"{scenario!r}")
    for note in PLAN.get("notes", []):
        log.warning("set-up: %s", note)
    return PLAN


def install(scenario: str, verify: Verifier) -> None:
    """Hook the scenario into Locust's events (call once, at import of its module)."""
    register(scenario, verify)

    @events.test_start.add_listener
    def _start(environment: Any, **_kw: Any) -> None:
        if isinstance(environment.runner, WorkerRunner):
            return
        load_plan(environment, scenario)

    @events.test_stop.add_listener
    def _stop(environment: Any, **_kw: Any) -> None:
        if isinstance(environment.runner, WorkerRunner) or not PLAN:
            return
        check(environment, scenario)


def check(environment: Any, scenario: str) -> bool:
    time.sleep(0.2)  # durable acks: answered means committed; this is for the live counters
    checks: list[tuple[str, bool, str]] = [
        ("no violation seen during the run", not TALLY.violations,
         "; ".join(TALLY.violations[:10]) or "none"),
    ]
    try:
        email, password = admin_credentials()
        with planning.Admin(PLAN["host"], email, password) as admin:
            checks += _VERIFIERS[scenario](PLAN, TALLY, admin)
    except Exception as exc:  # a check that cannot run is a failed check
        checks.append(("invariants checked against the API", False, f"{type(exc).__name__}: {exc}"))
    ok = all(c[1] for c in checks)
    for name, good, detail in checks:
        (log.info if good else log.error)("%s %s: %s", "ok  " if good else "FAIL", name, detail)
    summary = {
        "scenario": scenario,
        "run": PLAN.get("run"),
        "ok": ok,
        "checks": [{"name": n, "ok": g, "detail": d} for n, g, d in checks],
        "outcomes": {f"{k[0]}:{k[1]}": v for k, v in sorted(TALLY.outcomes.items())},
        "unknown": dict(TALLY.unknown),
        "redemptions": len(TALLY.redemptions),
        "rolled_back": sum(r.rolled_back for r in TALLY.redemptions.values()),
        # per campaign key: redemptions answered 201 and not rolled back, all 201s
        "active": {k: len(TALLY.active(k)) for k in PLAN["campaigns"]},
        "answered": {k: len(TALLY.of(k)) for k in PLAN["campaigns"]},
        "campaigns": {k: v.get("id") or v.get("ids") for k, v in PLAN["campaigns"].items()},
        "notes": PLAN.get("notes", []),
        "extra": TALLY.extra,
    }
    out = os.environ.get(planning.SUMMARY_ENV)
    if out:
        Path(out).write_text(json.dumps(summary, indent=2, default=str))
    if not ok:
        environment.process_exit_code = 1
        log.error("scenario %s: end-of-run invariants violated", scenario)
    return ok


def problem_code(resp: Any) -> str:
    try:
        body = resp.json()
    except Exception:
        return ""
    return str(body.get("code") or "") if isinstance(body, dict) else ""


def shared_invariants(plan: dict[str, Any], tally: Tally, admin: planning.Admin,
                      key: str = "shared") -> list[tuple[str, bool, str]]:
    """A shared code with a global and a per-customer limit: the limit held, no customer
    over theirs, and the engine's count equals the 201s seen (plus answers never received)."""
    camp = plan["campaigns"][key]
    ok = tally.active(key)
    per = Counter(r.customer for r in ok)
    worst = max(per.values(), default=0)
    stats = admin.overview(camp["id"])["stats"]
    active = int(stats["active_redemptions"])
    unknown = tally.unknown[key]
    exhausted = tally.outcomes[(key, "exhausted")]
    voucher = admin.json("GET", f"/v1/vouchers/{camp['code']}", 200)
    out = [
        (f"{key}: 201 answers <= limit", len(ok) <= camp["limit"],
         f"{len(ok)} redeemed, limit {camp['limit']}"),
        (f"{key}: engine's count <= limit", active <= camp["limit"] and
         int(voucher.get("redemptions", -1)) <= camp["limit"],
         f"overview active_redemptions {active}, voucher redemptions "
         f"{voucher.get('redemptions')}, limit {camp['limit']}"),
        (f"{key}: redemptions per customer <= {camp['per_customer']}",
         worst <= camp["per_customer"], f"max {worst} over {len(per)} customers"),
        (f"{key}: engine's count == 201s observed (+ unanswered)",
         len(ok) <= active <= len(ok) + unknown,
         f"engine {active}, observed {len(ok)}, unanswered {unknown}"),
        (f"{key}: no code in two successful redemptions",
         len({r.id for r in ok}) == len(ok), f"{len(ok)} redemption ids"),
    ]
    if exhausted and not unknown:
        # demand exceeded supply: the code must have sold out exactly (no undersell either)
        out.append((f"{key}: sold out exactly at the limit", active == camp["limit"],
                    f"{exhausted} x 409 exhausted, engine {active}, limit {camp['limit']}"))
    return out


def unique_invariants(plan: dict[str, Any], tally: Tally, admin: planning.Admin,
                      key: str) -> list[tuple[str, bool, str]]:
    """Unique codes: none in two active redemptions, each redeemed by its owner, and the
    engine's counters equal what the clients saw."""
    camp = plan["campaigns"][key]
    owners = {code: cust for cust, code in camp["codes"].items()}
    active = tally.active(key)
    by_code = Counter(r.code for r in active)
    twice = [c for c, n in by_code.items() if n > 1]
    foreign = [r.code for r in active if owners.get(r.code) != r.customer]
    stats = admin.overview(camp["id"])["stats"]
    every = tally.of(key)
    rolled = sum(r.rolled_back for r in every)
    unknown = tally.unknown[key]
    out = [
        (f"{key}: no code in two active redemptions", not twice, f"{len(twice)} codes: {twice[:5]}"),
        (f"{key}: every code redeemed by the customer it was issued to", not foreign,
         f"{len(foreign)} others: {foreign[:5]}"),
        (f"{key}: engine's redeemed codes == active 201s (+ unanswered)",
         len(active) <= int(stats["redeemed"]) <= len(active) + unknown,
         f"engine redeemed {stats['redeemed']}, observed {len(active)}, unanswered {unknown}"),
        (f"{key}: engine's redemptions/rollbacks == observed",
         len(every) <= int(stats["redemptions"]) <= len(every) + unknown
         and int(stats["rollbacks"]) == rolled,
         f"engine {stats['redemptions']}/{stats['rollbacks']}, observed {len(every)}/{rolled}"),
        (f"{key}: redemptions <= codes issued", int(stats["active_redemptions"]) <= len(owners),
         f"{stats['active_redemptions']} of {len(owners)}"),
    ]
    # spot-check the codes themselves: active ones redeemed, rolled-back ones back in hand
    sample = random.sample(active, min(10, len(active)))
    back = [r for r in every if r.rolled_back and by_code[r.code] == 0]
    sample_back = random.sample(back, min(10, len(back)))
    wrong = []
    for r in sample:
        v = admin.json("GET", f"/v1/vouchers/{r.code}", 200)
        if v["status"] != "redeemed":
            wrong.append(f"{r.code} {v['status']} (expected redeemed)")
    for r in sample_back:
        v = admin.json("GET", f"/v1/vouchers/{r.code}", 200)
        if v["status"] not in ("assigned", "available"):
            wrong.append(f"{r.code} {v['status']} (rolled back, expected assigned)")
    out.append((f"{key}: sampled codes have the status the clients expect", not wrong,
                f"{len(sample) + len(sample_back)} checked; {wrong[:5]}"))
    return out


class ApiUser(FastHttpUser):
    """A client of the voucher API: checkout calls with idempotency keys and retries of
    unanswered requests (same key, so a retry cannot redeem twice)."""

    abstract = True
    # a flash sale answers slowly at the knee; give up late rather than lose answers
    network_timeout = 30.0
    connection_timeout = 30.0

    def on_start(self) -> None:
        self.plan = PLAN
        keys = PLAN["api_keys"]
        self.api_key = keys[next(SEQ) % len(keys)]

    # --- auth -------------------------------------------------------------------------

    def login(self, email: str, password: str) -> dict[str, str]:
        for _attempt in range(5):
            with self.client.post("/v1/auth/login", json={"email": email, "password": password},
                                  catch_response=True, name="POST /v1/auth/login") as r:
                if r.status_code == 200:
                    return {"Authorization": f"Bearer {r.json()['access_token']}"}
                r.failure(f"login {r.status_code}: {r.text[:200]}")
                wait = float(r.headers.get("retry-after") or 1) if r.status_code == 429 else 1
            time.sleep(min(wait, 10))
        raise RuntimeError(f"{email} could not log in")

    def integration(self, **extra: str) -> dict[str, str]:
        return {"X-API-Key": self.api_key, **extra}

    # --- the checkout calls -----------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        *,
        name: str,
        expected: dict[int, set[str] | None],
        label: str,
        headers: dict[str, str],
        body: Any = None,
        retry: bool = False,
    ) -> tuple[int, Any]:
        """One API call; ``expected`` maps a status to the problem codes that are a normal
        business answer (``None``: any body). Returns ``(status, json body or None)``; status
        0 when no answer came even after the retries (only with ``retry``: an idempotent
        call with a key)."""
        for attempt in range(RETRIES + 1 if retry else 1):
            with self.client.request(method, path, json=body, headers=headers, name=name,
                                     catch_response=True) as r:
                status = r.status_code or 0
                code = problem_code(r) if status >= 400 else ""
                allowed = expected.get(status, set())
                if status in expected and (allowed is None or code in allowed):
                    r.success()
                    self_outcome = code or str(status)
                    TALLY.outcomes[(label, self_outcome)] += 1
                    try:
                        return status, r.json()
                    except Exception:
                        return status, None
                r.failure(f"{status} {code or (r.text or '')[:200]}")
                TALLY.outcomes[(label, f"unexpected {status} {code}".strip())] += 1
                if not (retry and status in UNKNOWN_STATUSES):
                    try:
                        return status, r.json()
                    except Exception:
                        return status, None
            time.sleep(0.2 * (attempt + 1))
        return 0, None

    def redeem(
        self,
        label: str,
        code: str,
        customer: str | None,
        amount: int,
        *,
        order: str | None = None,
        expected_409: set[str] = frozenset(),  # type: ignore[assignment]
        name: str | None = None,
    ) -> tuple[int, Any]:
        """``POST /v1/redemptions`` with an order id as the Idempotency-Key. A 201 is
        recorded (a replay of a seen key must return the same redemption)."""
        order = order or f"{PLAN['run']}-o{next(SEQ)}"
        body = {"code": code, "customer_id": customer,
                "order": {"id": order, "amount": amount, "currency": "EUR"}}
        status, data = self.call(
            "POST", "/v1/redemptions", name=name or f"POST /v1/redemptions [{label}]",
            expected={201: None, 409: set(expected_409)}, label=label,
            headers=self.integration(**{"Idempotency-Key": order}), body=body, retry=True)
        if status == 0:
            TALLY.unknown[label] += 1
        elif status == 201 and data:
            seen = TALLY.redemptions.get(data["id"])
            if seen is None:
                TALLY.redemptions[data["id"]] = Redemption(
                    data["id"], label, data["code"], data.get("customer_id"),
                    int(data["discount_amount"]))
            elif seen.code != data["code"] or seen.customer != data.get("customer_id"):
                TALLY.violation(f"redemption {data['id']} answered for two requests")
        return status, data

    def replay(self, label: str, first: dict[str, Any], code: str, customer: str | None,
               amount: int, order: str) -> None:
        """A double-submitted checkout: the same Idempotency-Key must return the first answer."""
        TALLY.outcomes[(label, "replay")] += 1
        status, again = self.redeem(label, code, customer, amount, order=order,
                                    name=f"POST /v1/redemptions [{label}, replay]")
        if status != 201 or not again or again["id"] != first["id"]:
            TALLY.violation(f"replay of order {order} answered {status} "
                            f"{(again or {}).get('id')} instead of {first['id']}")

    def rollback(self, label: str, redemption_id: str) -> bool:
        status, data = self.call(
            "POST", f"/v1/redemptions/{redemption_id}/rollback",
            name="POST /v1/redemptions/{id}/rollback", expected={200: None}, label=f"{label} rollback",
            headers=self.integration(**{"Idempotency-Key": f"rb-{redemption_id}"}), retry=True)
        if status == 200 and data and data.get("status") == "rolled_back":
            TALLY.redemptions[redemption_id].rolled_back = True
            return True
        return False
