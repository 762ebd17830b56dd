"""Core benchmark: the engine's durable redemptions through the shard actors, side by side
with a naive Postgres implementation and a Redis Lua check-and-decrement, plus code
generation speed and resident memory per code held by a shard.

    python -m loadtests.bench_core [--seconds 5] [--shards 2] [--fence-ab 3] [--record]

``--fence-ab N`` adds N rounds of the two engine workloads with the fence check on and off
(``loadtests/fence_ab.py``; the order alternates per round) and reports what fencing costs.

Everything runs in one process tree on this machine, in one run, against the same
embedded Postgres and Valkey, so the ratios are meaningful even when absolute figures move.
Targets: engine durable >= 5x naive hot-row Postgres and >= 1x Redis Lua;
>= 100,000 codes generated and persisted per second; <= 150 bytes resident per code.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path
from typing import Any

import psutil

from engine.settings import Settings
from loadtests.baselines import naive_pg_distinct_rows, naive_pg_hot_row, redis_lua_decrement
from loadtests.harness import (
    BenchResult,
    format_table,
    machine_summary,
    percentile,
    record,
    run_clients,
)


def _scaled(name: str, stats: Any, per_op: int, clients: int) -> BenchResult:
    lat = sorted(stats.latencies_ns)
    ops = stats.ops * per_op
    return BenchResult(
        name=name,
        ops=ops,
        seconds=stats.seconds,
        ops_per_s=ops / stats.seconds if stats.seconds else 0.0,
        p50_ms=percentile(lat, 50) / 1e6,
        p99_ms=percentile(lat, 99) / 1e6,
        errors=stats.errors,
        clients=clients,
        error_samples=stats.error_samples,
    )


async def _redeem_accepted(engine: Any, reqs: list[Any]) -> None:
    """Redeem one batch; raise on the first rejection (a benchmark counts only accepted work)."""
    outs = await engine.redeem_many(reqs)
    bad = [o.rejection for o in outs if o.rejection is not None]
    if bad:
        raise RuntimeError(f"rejected: {bad[0]}")


async def engine_shared_code(engine: Any, seconds: float, callers: int, batch: int) -> BenchResult:
    """Hot row equivalent: every redemption hits one shared code (one shard)."""
    from engine.shard_state import RedeemRequest

    code = f"BENCH{os.urandom(4).hex().upper()}"
    c = await engine.create_campaign(
        name="bench shared", type="shared_code", currency="EUR",
        discount={"kind": "amount", "value": 100}, limits={"total": 10**9},
        shared_code=code, ends_at=datetime.now(UTC) + timedelta(days=1),
    )
    await engine.activate(c.id)
    seq = count()

    def op_for(k: int) -> Any:
        async def op() -> None:
            reqs = [
                RedeemRequest(code=code, amount=1000, currency="EUR", customer_id=f"c{k}",
                              order_id=f"o{next(seq)}")
                for _ in range(batch)
            ]
            await _redeem_accepted(engine, reqs)
        return op

    stats = await run_clients([op_for(k) for k in range(callers)], seconds, warmup_s=0.5)
    return _scaled(f"engine durable, shared code ({callers}x{batch} batched)", stats, batch, callers)


async def engine_unique_codes(
    engine: Any, seconds: float, callers: int, batch: int, dsn: str
) -> BenchResult:
    """Distinct rows equivalent: every redemption takes its own single-use code."""
    import asyncpg

    from engine.shard_state import RedeemRequest
    from loadtests.harness import Exhausted

    c = await engine.create_campaign(
        name="bench unique", type="discount", currency="EUR",
        discount={"kind": "percent", "value": 10}, ends_at=datetime.now(UTC) + timedelta(days=1),
    )
    need = int(60_000 * (seconds + 1)) + callers * batch
    await engine.generate(c.id, need)
    await engine.activate(c.id)
    conn = await asyncpg.connect(dsn)
    codes = [r[0] for r in await conn.fetch("SELECT code FROM vouchers WHERE campaign_id=$1", c.id)]
    await conn.close()
    it = iter(codes)

    def op_for(k: int) -> Any:
        async def op() -> None:
            chunk = [next(it, None) for _ in range(batch)]
            if chunk[-1] is None:
                raise Exhausted()
            reqs = [
                RedeemRequest(code=cd, amount=1000, currency="EUR", customer_id=f"c{k}")
                for cd in chunk if cd is not None
            ]
            await _redeem_accepted(engine, reqs)
        return op

    stats = await run_clients([op_for(k) for k in range(callers)], seconds, warmup_s=0.5)
    return _scaled(f"engine durable, unique codes ({callers}x{batch} batched)", stats, batch, callers)


async def fence_cost(engine: Any, dsn: str, args: argparse.Namespace) -> list[str]:
    """Both engine workloads with the fence check on and off, back to back, for
    ``args.fence_ab`` rounds (the order alternates). The engine slows as its shards fill
    up, so each round's on ÷ off compares neighbours; the figure is their geometric mean."""
    from math import exp, log

    from loadtests.fence_ab import set_fence

    ratios: dict[str, list[float]] = {"shared": [], "unique": []}
    for rnd in range(args.fence_ab):
        rates: dict[tuple[str, bool], float] = {}
        for on in (True, False) if rnd % 2 == 0 else (False, True):
            await set_fence(dsn, on=on)
            shared = await engine_shared_code(engine, args.seconds, args.callers, args.batch)
            unique = await engine_unique_codes(engine, args.seconds, args.callers, args.batch, dsn)
            rates["shared", on] = shared.ops_per_s
            rates["unique", on] = unique.ops_per_s
            print(f"[fence {'on ' if on else 'off'} round {rnd + 1}] shared {shared.ops_per_s:,.0f}/s"
                  f"  unique {unique.ops_per_s:,.0f}/s", flush=True)
        for work in ratios:
            ratios[work].append(rates[work, True] / rates[work, False])
    await set_fence(dsn, on=True)
    lines = [
        "",
        f"Fencing cost ({args.fence_ab} rounds; each round runs both workloads with the fence"
        " check on and off back to back, order alternating):",
        "",
        "| workload | on ÷ off per round | geometric mean |",
        "| --- | --- | ---: |",
    ]
    for work, rs in ratios.items():
        mean = exp(sum(log(r) for r in rs) / len(rs))
        lines.append(f"| engine durable, {work} code{'s' if work == 'unique' else ''} | "
                     f"{', '.join(f'{r:.3f}' for r in rs)} | {mean:.3f} |")
    return lines


async def generation(engine: Any, n: int) -> tuple[float, dict[str, Any]]:
    c = await engine.create_campaign(
        name="bench gen", type="discount", currency="EUR",
        discount={"kind": "percent", "value": 5}, code={"length": 12},
    )
    before = await engine.shard_info()
    t0 = time.perf_counter()
    await engine.generate(c.id, n, poll_s=0.05)
    seconds = time.perf_counter() - t0
    gc.collect()
    after = await engine.shard_info()
    rss = sum(a["rss"] - b["rss"] for a, b in zip(after, before, strict=True))
    return seconds, {"rss_delta": rss, "codes": n}


def pure_state_bytes_per_code(n: int = 1_000_000) -> float:
    """Resident bytes per code of a bare ShardState (no actor, no transient buffers): the
    code strings, the index entry and the available stack, measured from before the codes
    were generated until after every temporary list is gone."""
    import subprocess

    prog = (
        "import os, gc, psutil\n"
        "from datetime import datetime, UTC\n"
        "from engine.campaigns import new_campaign\n"
        "from engine.codes import CodeSpec, generate\n"
        "from engine.shard_state import ShardState\n"
        f"n = {n}\n"
        "spec = CodeSpec(length=12)\n"
        "gc.collect(); before = psutil.Process().memory_info().rss\n"
        "codes = generate(spec, n, os.urandom)\n"
        "s = ShardState(clock=lambda: datetime.now(UTC), random_bytes=os.urandom)\n"
        "c = new_campaign(id='m', name='m', type='discount', currency='EUR', now=datetime.now(UTC),"
        " discount=__import__('engine.campaigns', fromlist=['Discount']).Discount('percent', 5))\n"
        "s.put_campaign(c)\n"
        "fresh = s.claim_new_codes(codes); s.admit_codes('m', fresh)\n"
        "del fresh, codes; gc.collect()\n"
        "after = psutil.Process().memory_info().rss\n"
        "print((after - before) / len(s.codes))\n"
    )
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


async def run(args: argparse.Namespace) -> str:
    import ray

    from actors.client import start_engine
    from ops.servers import embedded_for_tests
    from store.migrations import migrate

    tmp = Path(tempfile.mkdtemp(prefix="bench-core-"))
    svc = embedded_for_tests(tmp)
    try:
        await migrate(svc.database_url)
        from ops.start import local_ray_environment

        local_ray_environment()
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="bench")
        settings = Settings(shards=args.shards, namespace="bench", batch_window_ms=args.window_ms)
        engine = start_engine(settings, svc.database_url)
        secs = args.seconds
        results: list[BenchResult] = []
        results.append(await naive_pg_hot_row(svc.database_url, 32, secs))
        results.append(await naive_pg_distinct_rows(svc.database_url, 32, secs))
        results.append(await redis_lua_decrement(svc.redis_url, 32, secs))
        results.append(await engine_shared_code(engine, secs, args.callers, args.batch))
        results.append(await engine_unique_codes(engine, secs, args.callers, args.batch, svc.database_url))
        gen_n = args.generate
        gen_s, mem = await generation(engine, gen_n)
        pure = pure_state_bytes_per_code()
        hot = results[0].ops_per_s
        lua = results[2].ops_per_s
        eng_hot = results[3].ops_per_s
        eng_uni = results[4].ops_per_s
        lines = [
            format_table(results, baseline=results[0]),
            "",
            "| figure | value | target |",
            "| --- | ---: | --- |",
            f"| engine shared code / naive hot-row Postgres | {eng_hot / hot:.1f}x | >= 5x |",
            f"| engine unique codes / naive distinct-rows Postgres | "
            f"{eng_uni / results[1].ops_per_s:.1f}x | - |",
            f"| engine shared code / Redis Lua (not durable) | {eng_hot / lua:.2f}x | >= 1x |",
            f"| engine unique codes / Redis Lua (not durable) | {eng_uni / lua:.2f}x | >= 1x |",
            f"| codes generated and persisted | {gen_n / gen_s:,.0f}/s ({gen_n:,} in {gen_s:.1f} s) "
            f"| >= 100,000/s, 1M in <= 10 s |",
            f"| resident memory per code, shard actors (RSS delta / codes) | "
            f"{mem['rss_delta'] / gen_n:.0f} B | <= 150 B |",
            f"| resident memory per code, bare ShardState (1M codes) | {pure:.0f} B | <= 150 B |",
            "",
            f"Machine: {machine_summary()}. {args.shards} shard actors, batch window "
            f"{args.window_ms} ms, {args.callers} callers x {args.batch} redemptions per call; "
            f"baselines 32 clients, one redemption per request; {secs:.0f} s each.",
        ]
        if args.fence_ab:
            lines += await fence_cost(engine, svc.database_url, args)
        return "\n".join(lines)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        svc.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--callers", type=int, default=16)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--window-ms", type=float, default=2.0)
    p.add_argument("--generate", type=int, default=1_000_000)
    p.add_argument("--fence-ab", type=int, default=0, metavar="ROUNDS",
                   help="also measure the engine with the fence check on and off")
    p.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    args = p.parse_args(argv)
    table = asyncio.run(run(args))
    print(table)
    if args.record:
        cmd = "python -m loadtests.bench_core " + " ".join(argv if argv is not None else sys.argv[1:])
        record("Core: durable redemptions, generation, memory", cmd.strip(), table)
    _ = psutil  # the harness measures RSS through psutil too
    return 0


if __name__ == "__main__":
    sys.exit(main())
