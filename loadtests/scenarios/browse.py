"""browse: customers look at their vouchers; a support desk looks codes up.

``WalletCustomer`` users log in as registered customers (JWT, 20 req/s each, and all
customer traffic from one IP shares 200 req/s) and list their vouchers
(``GET /v1/users/me/vouchers``), open one (``GET /v1/vouchers/{code}``) and their profile.
Each customer was issued one code in each of two campaigns before the run: the wallet must
hold exactly those, and nothing of anyone else's. ``SupportDesk`` (an integration API key)
looks up random issued codes and checks their owner.

At the end: no leak or missing voucher was seen, and the campaigns show the issued codes
still assigned (browsing redeems nothing).
"""

from __future__ import annotations

import random
from typing import Any

from locust import between, task

from loadtests.scenarios import common
from loadtests.scenarios.common import SEQ, TALLY, ApiUser

SCENARIO = "browse"


class WalletCustomer(ApiUser):
    weight = 5
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        super().on_start()
        accounts = self.plan["customers"]
        self.account = accounts[next(SEQ) % len(accounts)]
        self.expected = set(self.plan["campaigns"]["wallet"]["wallets"][self.account["id"]])
        self.auth = self.login(self.account["email"], self.account["password"])

    @task(3)
    def wallet(self) -> None:
        status, body = self.call("GET", "/v1/users/me/vouchers", name="GET /v1/users/me/vouchers",
                                 expected={200: None}, label="wallet", headers=self.auth)
        if status != 200 or body is None:
            return
        items = body["items"]
        codes = {v["code"] for v in items}
        foreign = [v["code"] for v in items if v.get("customer_id") != self.account["id"]]
        if foreign:
            TALLY.violation(f"{self.account['id']} sees others' vouchers {foreign[:3]}")
        if codes != self.expected:
            TALLY.violation(f"wallet of {self.account['id']}: {sorted(codes)} != issued "
                            f"{sorted(self.expected)}")
        TALLY.outcomes[("wallet", f"{len(items)} vouchers")] += 1

    @task(2)
    def voucher(self) -> None:
        if not self.expected:
            return
        code = random.choice(sorted(self.expected))
        status, v = self.call("GET", f"/v1/vouchers/{code}", name="GET /v1/vouchers/{code}",
                              expected={200: None}, label="own voucher", headers=self.auth)
        if status == 200 and v and (v["customer_id"] != self.account["id"]
                                    or v["status"] != "assigned"):
            TALLY.violation(f"{code} of {self.account['id']} shows {v}")

    @task(1)
    def me(self) -> None:
        status, me = self.call("GET", "/v1/users/me", name="GET /v1/users/me",
                               expected={200: None}, label="me", headers=self.auth)
        if status == 200 and me and me["id"] != self.account["id"]:
            TALLY.violation(f"/v1/users/me of {self.account['id']} answered {me['id']}")


class SupportDesk(ApiUser):
    weight = 1
    wait_time = between(0.2, 1.0)

    @task
    def lookup(self) -> None:
        owners = [(cust, code) for cust, codes in self.plan["campaigns"]["wallet"]["wallets"].items()
                  for code in codes]
        if not owners:
            return
        cust, code = random.choice(owners)
        status, v = self.call("GET", f"/v1/vouchers/{code}", name="GET /v1/vouchers/{code} [desk]",
                              expected={200: None}, label="desk lookup", headers=self.integration())
        if status == 200 and v and v["customer_id"] != cust:
            TALLY.violation(f"{code} issued to {cust} shows owner {v['customer_id']}")


def verify(plan: dict[str, Any], tally: common.Tally, admin: Any) -> list[tuple[str, bool, str]]:
    wallets = plan["campaigns"]["wallet"]["wallets"]
    issued = sum(len(v) for v in wallets.values())
    per_campaign = issued // max(1, len(plan["campaigns"]["wallet"]["ids"]))
    checks = []
    for cid in plan["campaigns"]["wallet"]["ids"]:
        s = admin.overview(cid)["stats"]
        checks.append((f"{cid}: nothing redeemed, issued codes still assigned",
                       s["redemptions"] == 0 and s["assigned"] == per_campaign,
                       f"redemptions {s['redemptions']}, assigned {s['assigned']} "
                       f"(issued {per_campaign})"))
    seen = sum(v for (label, _), v in tally.outcomes.items() if label == "wallet")
    checks.append(("wallets were read", seen > 0, f"{seen} wallet reads"))
    return checks


common.install(SCENARIO, verify)
