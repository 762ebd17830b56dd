"""Redemptions with automatic promotions over HTTP, side by side in one run with a
baseline: a keyed redemption of one shared code with the same cart.

    python -m loadtests.bench_promotions --seconds 10 --connections 4 --rounds 3 --record

Starts embedded Postgres and Valkey, a local Ray with Serve in HAProxy + throughput-optimized
mode, ``--shards`` shards and one gateway replica (``loadtests.bench_plumbing.http_engine``),
then builds, over HTTP (not timed): one shared code without limits and three promotions
without limits (10 % of the shoes, 300 off the order, free shipping), all fitting a
4-line cart with shipping. Targets, every request a new order:

* baseline: ``POST /v1/redemptions`` of the shared code with an ``Idempotency-Key``;
* ``apply_promotions`` without a code or a key (three promotion decisions);
* the same with an ``Idempotency-Key`` (each decision keyed, and the list of promotions
  asked kept in Postgres first, so a retry answers what was given).

Each round runs every target for ``--seconds`` with ``--connections`` closed loops, in
turn. After the load, a sample of the keyed answers is retried with their keys: each
retry must answer what the first try did, and Postgres must hold one redemption per
promotion given (the check, not timed).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import sys
import time
from typing import Any

import httpx

from loadtests.bench_plumbing import fetch_count, http_engine
from loadtests.bench_qualification import HIGH_INTEGRATION_RATE, _ok, _pct
from loadtests.harness import machine_summary, report

SECTION = "HTTP: redemptions with automatic promotions"
CURRENCY = "NOK"  # no other benchmark's campaign fits these orders
CART = {"currency": CURRENCY, "shipping": 495, "items": [
    {"sku": "SHOE", "categories": ["shoes"], "quantity": 2, "unit_price": 5000},
    {"sku": "SOCK", "categories": ["socks"], "quantity": 3, "unit_price": 500},
    {"sku": "HAT", "categories": ["hats"], "quantity": 1, "unit_price": 1500},
    {"sku": "BELT", "categories": ["belts"], "quantity": 1, "unit_price": 2500},
]}
SHARED = "BENCH-PROMO-SHARED"


def _promotions() -> list[dict[str, Any]]:
    shoes = {"items": [{"any_of": {"categories": ["shoes"]}}]}
    return [
        {"name": "10 % shoes", "discount": {"kind": "percent", "value": 10, "target": "items"}, "rules": shoes},
        {"name": "300 off", "discount": {"kind": "amount", "value": 300}},
        {"name": "free shipping", "discount": {"kind": "free_shipping"}},
    ]


async def closed_loops(
    base: str, path: str, make: Any, headers: dict[str, str], clients: int, seconds: float,
    answers: list[tuple[dict[str, Any], dict[str, str], dict[str, Any]]] | None = None,
) -> tuple[list[float], float, int]:
    """``clients`` loops posting ``make()`` (a body and its extra headers) for ``seconds``:
    latencies (ms), elapsed s, answers that were not 201 (``answers`` keeps the others)."""
    lat: list[float] = []
    bad = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30.0) as c:
        t0 = time.perf_counter()
        deadline = t0 + seconds

        async def loop() -> None:
            nonlocal bad
            while time.perf_counter() < deadline:
                body, extra = make()
                s = time.perf_counter()
                r = await c.post(path, json=body, headers={**headers, **extra})
                lat.append((time.perf_counter() - s) * 1000)
                if r.status_code != 201:
                    bad += 1
                elif answers is not None:
                    answers.append((body, extra, r.json()))

        await asyncio.gather(*(loop() for _ in range(clients)))
        return lat, time.perf_counter() - t0, bad


def run(args: argparse.Namespace) -> tuple[str, bool]:
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    os.environ["VOUCHER_RATE_INTEGRATION"] = HIGH_INTEGRATION_RATE
    from engine.gcra import parse_limit

    seq = itertools.count()
    run_id = f"{random.Random().getrandbits(32):08x}"

    def order() -> dict[str, Any]:
        return {**CART, "id": f"o-{run_id}-{next(seq)}"}

    def keyed() -> dict[str, str]:
        return {"Idempotency-Key": f"k-{run_id}-{next(seq)}"}

    with http_engine("bench-promotions", args.shards,
                     rate_integration=parse_limit(HIGH_INTEGRATION_RATE)) as eng:
        c, admin, base = eng.client, eng.admin, str(eng.client.base_url)
        ids = []
        for spec in _promotions():
            cid = _ok(c.post("/v1/campaigns", headers=admin,
                             json={**spec, "type": "promotion", "currency": CURRENCY}), 201)["id"]
            _ok(c.post(f"/v1/campaigns/{cid}/activate", headers=admin), 200)
            ids.append(cid)
        cid = _ok(c.post("/v1/campaigns", headers=admin, json={
            "name": "shared", "type": "shared_code", "currency": CURRENCY, "shared_code": SHARED,
            "discount": {"kind": "percent", "value": 5}}), 201)["id"]
        _ok(c.post(f"/v1/campaigns/{cid}/activate", headers=admin), 200)
        key = _ok(c.post("/v1/api-keys", json={"name": "bench-promotions", "roles": ["integration"]},
                         headers=admin), 201)["key"]
        headers = {"X-API-Key": key}
        deadline = time.monotonic() + 30  # every promotion in the gateway's catalog
        while True:
            v = _ok(c.post("/v1/validations", headers=headers,
                           json={"order": order(), "customer_id": "probe", "apply_promotions": True}), 200)
            if len(v["promotions"]) == len(ids):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the promotions never all applied: {v}")
            time.sleep(0.3)
        targets = [
            ("redemption of a shared code, keyed (baseline)",
             lambda: ({"code": SHARED, "customer_id": "c", "order": order()}, keyed())),
            ("apply_promotions, no code, no key",
             lambda: ({"customer_id": "c", "order": order(), "apply_promotions": True}, {})),
            ("apply_promotions, no code, keyed",
             lambda: ({"customer_id": "c", "order": order(), "apply_promotions": True}, keyed())),
        ]
        for _, make in targets:  # warm-up
            asyncio.run(closed_loops(base, "/v1/redemptions", make, headers, args.connections, args.warmup))
        lat: dict[str, list[float]] = {t[0]: [] for t in targets}
        secs: dict[str, float] = {t[0]: 0.0 for t in targets}
        bad: dict[str, int] = {t[0]: 0 for t in targets}
        answers: list[tuple[dict[str, Any], dict[str, str], dict[str, Any]]] = []
        for rnd in range(args.rounds):
            for name, make in targets:
                keep = answers if name == targets[2][0] else None
                ls, el, b = asyncio.run(closed_loops(base, "/v1/redemptions", make, headers,
                                                     args.connections, args.seconds, keep))
                lat[name] += ls
                secs[name] += el
                bad[name] += b
                p50, p99, _ = _pct(ls)
                print(f"round {rnd + 1} {name}: {len(ls) / el:,.0f} req/s p50 {p50:.2f} p99 {p99:.2f} ms",
                      flush=True)
        # retries answer what the first try gave; Postgres holds exactly that
        sample = random.Random(7).sample(answers, min(args.retries, len(answers)))
        differ = 0
        for body, extra, first in sample:
            again = _ok(c.post("/v1/redemptions", json=body, headers={**headers, **extra}), 201)
            differ += again["promotions"] != first["promotions"]
        given = sum(len(a[2]["promotions"]) for a in answers)
        stored = asyncio.run(fetch_count(
            eng.dsn, "SELECT count(*) FROM redemptions WHERE order_id = ANY($1::text[])",
            [a[0]["order"]["id"] for a in answers]))
    base_name = targets[0][0]
    base_rps = len(lat[base_name]) / secs[base_name]
    rows = [f"| target | {args.connections} closed loops: req/s | ÷ baseline | p50 / p99 ms | not 201 |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for name, _ in targets:
        rps = len(lat[name]) / secs[name]
        p50, p99, _ = _pct(lat[name])
        rows.append(f"| {name} | {rps:,.0f} | {rps / base_rps:.2f}× | {p50:.2f} / {p99:.2f} | {bad[name]} |")
    ok = differ == 0 and stored == given and sum(bad.values()) == 0
    checks = [
        "| check | value | target | met |", "| --- | ---: | --- | --- |",
        f"| keyed retries answering otherwise than their first try | {differ} of {len(sample)} | 0 | "
        f"{'yes' if differ == 0 else 'no'} |",
        f"| promotion redemptions in Postgres ÷ given in keyed answers | {stored} / {given} | equal | "
        f"{'yes' if stored == given else 'no'} |",
    ]
    notes = (
        f"Machine: {machine_summary()}. Engine: {args.shards} shards, one gateway replica, Serve in "
        "HAProxy + throughput-optimized mode; an integration API key (rate limit raised). Three "
        "promotions without limits and a shared code, a 4-line cart with shipping, every request "
        f"a new order. Load from httpx clients in this process: {args.warmup:g} s warm-up per target, "
        f"then {args.rounds} round(s) of {args.seconds:g} s per target in turn."
    )
    table = "\n".join(rows) + "\n\n" + "\n".join(checks)
    report(SECTION, "loadtests.bench_promotions", table, notes, args.record)
    return table, ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--retries", type=int, default=200, help="keyed answers retried after the load")
    p.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    args = p.parse_args()
    _, ok = run(args)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
