"""What one shard decision costs in process (no Ray, no Postgres): redemptions of an
amount-only order on a shared code, and of a 10-line cart on a campaign with rules
(loadtests/bench_cart.py's), through ``ShardState.redeem``, in microseconds.

Run it in two checkouts to compare them; alternate the runs, since the machine drifts:

    python -m loadtests.decision_cost [--n 40000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import UTC, datetime
from typing import Any

from engine.campaigns import Discount, Limits, new_campaign, transition
from engine.shard_state import RedeemRequest, ShardState

NOW = datetime.now(UTC)


def _state(**campaign: Any) -> ShardState:
    st = ShardState(clock=lambda: NOW, random_bytes=os.urandom)
    c = new_campaign(id="bench", name="bench", type="shared_code", currency="EUR", now=NOW,
                     shared_code="BENCH-1", limits=Limits(total=10**9), **campaign)
    st.put_campaign(transition(c, "activate", NOW))
    return st


def amount_only(n: int) -> float:
    st = _state(discount=Discount("percent", 10))
    reqs = [RedeemRequest(code="BENCH-1", amount=5000, currency="EUR", customer_id=f"c{i}",
                          order_id=f"o{i}") for i in range(n)]
    return _timed(st, reqs)


def cart(n: int) -> float | None:
    try:  # a checkout from before orders had lines has no carts to price
        from loadtests import bench_cart
    except ImportError:
        return None
    st = _state(discount=bench_cart.campaign().discount, rules=bench_cart.campaign().rules)
    orders = [bench_cart.order(v) for v in range(bench_cart.VARIANTS)]
    reqs = []
    for i in range(n):
        o = orders[i % len(orders)]
        reqs.append(RedeemRequest(code="BENCH-1", amount=o.amount, currency="EUR", customer_id=f"c{i}",
                                  order_id=f"o{i}", items=o.items))
    return _timed(st, reqs)


def _timed(st: ShardState, reqs: list[RedeemRequest]) -> float:
    t = time.perf_counter()
    for r in reqs:
        st.redeem(r)
    took = time.perf_counter() - t
    st.events.clear()
    return took / len(reqs) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=40000)
    p.add_argument("--repeat", type=int, default=7)
    a = p.parse_args()
    one = statistics.median(amount_only(a.n) for _ in range(a.repeat))
    carts = [cart(a.n) for _ in range(a.repeat)]
    print(f"amount-only redemption: {one:.2f} us (median of {a.repeat})")
    if carts[0] is not None:
        print(f"10-line cart with rules: {statistics.median(c for c in carts if c is not None):.2f} us")


if __name__ == "__main__":
    main()
