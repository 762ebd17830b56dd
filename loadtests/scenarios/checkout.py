"""checkout: a shop's checkout service validates the customer's code, then redeems it;
some orders are cancelled (rollback) and some customers come back and use the code again.

``CheckoutService`` (an integration API key) takes the next customer with an issued unique
code (discount 10 %, max 20 EUR, minimum order 10 EUR), validates it (it must be valid and
quote the discount the redemption then grants), redeems it with the order id as the
Idempotency-Key, double-submits 10 % of them (the first answer must come back), tries 5 %
again with a new order (``already_redeemed`` expected) and rolls back 15 % (cancelled
orders; half of those customers return later with the same code). Without issued codes
(no issuer) it uses a shared welcome code, one per customer.

At the end: no code in two active redemptions, each code redeemed by its owner, and the
engine's redemptions / rollbacks / redeemed codes equal what the service saw.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

from locust import between, task

from loadtests.scenarios import common
from loadtests.scenarios.common import SEQ, TALLY, ApiUser

SCENARIO = "checkout"
_QUEUE: deque[tuple[str, str]] = deque()
_READY: list[bool] = []


def _next_customer() -> tuple[str, str] | None:
    main = common.PLAN["campaigns"]["main"]
    if main["kind"] == "shared":
        return f"{common.PLAN['run']}-c{next(SEQ)}", main["code"]
    if not _READY:
        _READY.append(True)
        items = list(main["codes"].items())
        random.shuffle(items)
        _QUEUE.extend(items)
    return _QUEUE.popleft() if _QUEUE else None


class CheckoutService(ApiUser):
    wait_time = between(0.1, 0.5)

    @task
    def order(self) -> None:
        picked = _next_customer()
        if picked is None:
            TALLY.outcomes[("main", "no customer left")] += 1
            return
        customer, code = picked
        amount = random.randrange(1500, 30000, 100)
        status, v = self.call(
            "POST", "/v1/validations", name="POST /v1/validations", expected={200: None},
            label="validate", headers=self.integration(),
            body={"code": code, "customer_id": customer,
                  "order": {"amount": amount, "currency": "EUR"}})
        if status != 200 or not v:
            return
        if not v["valid"]:
            TALLY.violation(f"{code} of {customer} (issued, unused) did not validate: {v}")
            return
        order = f"{self.plan['run']}-o{next(SEQ)}"
        status, r = self.redeem("main", code, customer, amount, order=order)
        if status != 201 or not r:
            return
        if r["discount_amount"] != v["discount_amount"]:
            TALLY.violation(f"{code}: validation quoted {v['discount_amount']}, redemption "
                            f"granted {r['discount_amount']}")
        if random.random() < 0.10:
            self.replay("main", r, code, customer, amount, order)
        if random.random() < 0.05:
            TALLY.outcomes[("main", "second attempt")] += 1
            s2, _ = self.redeem("main", code, customer, amount,
                                expected_409={"already_redeemed", "customer_limit_reached"},
                                name="POST /v1/redemptions [second attempt]")
            if s2 == 201:
                TALLY.violation(f"{customer} redeemed {code} a second time")
        cancelled = random.random() < 0.15 and self.rollback("main", r["id"])
        if cancelled and random.random() < 0.5 and self.plan["campaigns"]["main"]["kind"] == "unique":
            _QUEUE.append((customer, code))  # the customer comes back with the code later


def verify(plan: dict[str, Any], tally: common.Tally, admin: Any) -> list[tuple[str, bool, str]]:
    if plan["campaigns"]["main"]["kind"] == "unique":
        return common.unique_invariants(plan, tally, admin, "main")
    camp = plan["campaigns"]["main"]
    stats = admin.overview(camp["id"])["stats"]
    active = tally.active("main")
    per = max(common.Counter(r.customer for r in active).values(), default=0)
    unknown = tally.unknown["main"]
    rolled = sum(r.rolled_back for r in tally.of("main"))
    return [
        ("main: redemptions per customer <= 1", per <= 1, f"max {per}"),
        ("main: engine's active redemptions == observed (+ unanswered)",
         len(active) <= int(stats["active_redemptions"]) <= len(active) + unknown,
         f"engine {stats['active_redemptions']}, observed {len(active)}, unanswered {unknown}"),
        ("main: engine's rollbacks == observed", int(stats["rollbacks"]) == rolled,
         f"engine {stats['rollbacks']}, observed {rolled}"),
    ]


common.install(SCENARIO, verify)
