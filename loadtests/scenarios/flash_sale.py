"""flash_sale: a sale window opens and thousands of shoppers rush one shared code (global
limit, one per customer) and a pool of unique codes issued to VIP shoppers beforehand.

* ``FlashCheckout`` is the shop's checkout service (an integration API key, 2,000 req/s):
  every task is a new shopper arriving at checkout. 80 % try the shared code, 20 % their
  own issued code while the pool lasts. 10 % double-submit (same Idempotency-Key: the first
  answer must come back), 5 % try again with a new order (``customer_limit_reached`` /
  ``already_redeemed`` expected).
* ``FlashCustomer`` (``VOUCHER_CUSTOMER_USERS``, default 4, fixed count) are registered
  shoppers who log in, validate the code with their own token (customers are limited to
  20 req/s), hand over to the checkout service if it is valid, then watch their wallet.
  Each validates once: a sold-out answer is a failed attempt, and those are budgeted per
  customer and per client IP (every Locust user shares 127.0.0.1).

``409 exhausted`` / ``customer_limit_reached`` / ``already_redeemed`` are business answers:
successes in Locust's table, counted in the summary. At the end: 201s <= limit, <= 1 per
customer, the engine's count == the 201s seen, sold out exactly if anyone saw
``exhausted``, no unique code redeemed twice or by someone else.
"""

from __future__ import annotations

import os
import random
from typing import Any

from locust import between, task

from loadtests.scenarios import common
from loadtests.scenarios.common import SEQ, TALLY, ApiUser

SCENARIO = "flash_sale"
AMOUNT = 4000
_POOL: list[tuple[str, str]] = []
_POOL_READY: list[bool] = []


def _next_pool_code() -> tuple[str, str] | None:
    if not _POOL_READY:
        _POOL_READY.append(True)
        pool = common.PLAN["campaigns"].get("pool")
        if pool:
            _POOL.extend(pool["codes"].items())
            random.shuffle(_POOL)
    return _POOL.pop() if _POOL else None


class FlashCheckout(ApiUser):
    weight = 20
    wait_time = between(0.05, 0.25)

    @task
    def shopper_at_checkout(self) -> None:
        shared = self.plan["campaigns"]["shared"]
        picked = _next_pool_code() if random.random() < 0.2 else None
        if picked is not None:
            label, (customer, code) = "pool", picked
            first_409, again = set(), {"already_redeemed"}
        else:
            label, code = "shared", shared["code"]
            customer = f"{self.plan['run']}-s{next(SEQ)}"
            first_409, again = {"exhausted"}, {"customer_limit_reached", "exhausted"}
        order = f"{self.plan['run']}-o{next(SEQ)}"
        status, first = self.redeem(label, code, customer, AMOUNT, order=order,
                                    expected_409=first_409)
        if status == 201 and random.random() < 0.10:
            self.replay(label, first, code, customer, AMOUNT, order)
        if random.random() < 0.05:
            TALLY.outcomes[(label, "second attempt")] += 1
            s2, _ = self.redeem(label, code, customer, AMOUNT, expected_409=again,
                                name=f"POST /v1/redemptions [{label}, second attempt]")
            if s2 == 201 and status == 201:
                TALLY.violation(f"{customer} redeemed {code} a second time")


class FlashCustomer(ApiUser):
    fixed_count = int(os.environ.get("VOUCHER_CUSTOMER_USERS", "4"))
    wait_time = between(0.5, 1.5)

    def on_start(self) -> None:
        super().on_start()
        accounts = self.plan["customers"]
        self.account = accounts[next(SEQ) % len(accounts)] if accounts else None
        self.tried = False
        if self.account is not None:
            self.auth = self.login(self.account["email"], self.account["password"])

    @task
    def shop(self) -> None:
        if self.account is None:
            return
        if self.tried:
            self.call("GET", "/v1/users/me/vouchers", name="GET /v1/users/me/vouchers",
                      expected={200: None}, label="customer wallet", headers=self.auth)
            return
        self.tried = True
        code = self.plan["campaigns"]["shared"]["code"]
        status, v = self.call(
            "POST", "/v1/validations", name="POST /v1/validations [customer]",
            expected={200: None}, label="customer validate", headers=self.auth,
            body={"code": code, "order": {"amount": AMOUNT, "currency": "EUR"}})
        if status != 200 or not v:
            return
        if not v["valid"]:
            TALLY.outcomes[("customer validate", v.get("reason") or "invalid")] += 1
            if v.get("reason") not in ("exhausted", "customer_limit_reached"):
                TALLY.violation(f"validation of {code} for {self.account['id']}: {v}")
            return
        # the shop's backend redeems on the customer's behalf at checkout
        self.redeem("shared", code, self.account["id"], AMOUNT,
                    expected_409={"exhausted", "customer_limit_reached"},
                    name="POST /v1/redemptions [customer checkout]")


def verify(plan: dict[str, Any], tally: common.Tally, admin: Any) -> list[tuple[str, bool, str]]:
    checks = common.shared_invariants(plan, tally, admin, "shared")
    if "pool" in plan["campaigns"]:
        checks += common.unique_invariants(plan, tally, admin, "pool")
    return checks


common.install(SCENARIO, verify)
