"""Peak-load report: the flash_sale scenario at increasing user counts, on one engine.

    python -m loadtests.peak [--users 25 50 100 200 400] [--seconds 20] [--record]

Starts the engine once (embedded Postgres and Valkey, Ray Serve in HAProxy mode, default
rate limits; see ``loadtests.run_scenario``), then for each user count prepares a fresh
flash sale (a new shared code and a new pool of issued unique codes), runs Locust headless
(``--reset-stats``: the figures start once every user is spawned) and reads its stats CSV:
requests/s, p50/p95/p99 and the failure ratio, next to the scenario's business outcomes and
the CPU the load generator itself used (it shares the machine's cores with the engine).

Writes a markdown table and a chart (``loadtests/results/peak.png``: throughput, latency
percentiles and error rate against users); ``--record`` puts them into BENCHMARKS.md under
"Peak load: flash_sale (Locust)". Every step must pass the scenario's invariants.

By default the shared code's limit is far above what a step can sell, so every step
measures the same mix (redemptions and the scenario's replays and second attempts) rather
than a cheap sold-out rejection path; ``--limit`` sets a real quantity instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from loadtests.bench_http import OTHERS, _code_state, _cpu_snapshot, cpu_by_group
from loadtests.harness import machine_summary, record
from loadtests.run_scenario import RESULTS, LocustRun, local_engine, run_locust
from loadtests.scenarios import plan as planning

SECTION = "Peak load: flash_sale (Locust)"
CHART = RESULTS / "peak.png"


@dataclass
class Step:
    users: int
    rps: float
    p50: float
    p95: float
    p99: float
    requests: int
    failures: int
    redeemed: int
    business_409: int
    locust_cores: float
    invariants_ok: bool
    exit_code: int
    other_cores: float = 0.0  # CPU used by processes outside this run (other jobs)

    @property
    def error_pct(self) -> float:
        return 100.0 * self.failures / self.requests if self.requests else 0.0


def _num(row: dict[str, str], key: str) -> float:
    try:
        return float(row.get(key) or 0)
    except ValueError:
        return 0.0


def to_step(users: int, run: LocustRun) -> Step:
    agg = run.aggregated
    outcomes: dict[str, int] = run.summary.get("outcomes", {})
    return Step(
        users=users,
        rps=_num(agg, "Requests/s"),
        p50=_num(agg, "50%"),
        p95=_num(agg, "95%"),
        p99=_num(agg, "99%"),
        requests=int(_num(agg, "Request Count")),
        failures=int(_num(agg, "Failure Count")),
        redeemed=sum(run.summary.get("answered", {}).values()),
        business_409=sum(v for k, v in outcomes.items()
                         if k.split(":", 1)[1] in ("exhausted", "customer_limit_reached",
                                                   "already_redeemed")),
        locust_cores=run.locust_cpu_s / run.wall_s if run.wall_s else 0.0,
        invariants_ok=bool(run.summary.get("ok")),
        exit_code=run.exit_code,
    )


def knee(steps: list[Step]) -> Step | None:
    """The fewest users that already reach 90 % of the best throughput: past it, more
    users add latency, not requests. None when the last step still added more than 10 %
    (the knee lies beyond the range measured)."""
    ordered = sorted(steps, key=lambda s: s.users)
    if len(ordered) < 2:
        return None
    best = max(s.rps for s in ordered)
    found = next(s for s in ordered if s.rps >= 0.9 * best)
    if found is ordered[-1] and ordered[-1].rps > 1.1 * ordered[-2].rps:
        return None
    return found


def table(steps: list[Step]) -> str:
    k = knee(steps)
    lines = [
        "| users | req/s | p50 ms | p95 ms | p99 ms | errors | redemptions (201) | "
        "business 409s | Locust CPU (cores) | other load (cores) | invariants |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for s in steps:
        mark = " **(knee)**" if s is k else ""
        lines.append(
            f"| {s.users}{mark} | {s.rps:,.0f} | {s.p50:.0f} | {s.p95:.0f} | {s.p99:.0f} | "
            f"{s.error_pct:.2f} % ({s.failures:,}) | {s.redeemed:,} | {s.business_409:,} | "
            f"{s.locust_cores:.2f} | {s.other_cores:.2f} | {'held' if s.invariants_ok else '**violated**'} |")
    return "\n".join(lines)


def chart(steps: list[Step], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = [s.users for s in steps]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=90)
    ax = axes[0]
    ax.plot(users, [s.rps for s in steps], "o-", color="tab:blue")
    ax.set_title("throughput")
    ax.set_ylabel("requests/s")
    ax = axes[1]
    for attr, style in (("p50", "o-"), ("p95", "s-"), ("p99", "^-")):
        ax.plot(users, [getattr(s, attr) for s in steps], style, label=attr)
    ax.set_yscale("log")
    ax.set_title("latency")
    ax.set_ylabel("ms (log)")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[2]
    ax.plot(users, [s.error_pct for s in steps], "o-", color="tab:red")
    ax.set_title("errors")
    ax.set_ylabel("% of requests")
    ax.set_ylim(bottom=0, top=max(1.0, max(s.error_pct for s in steps) * 1.2))
    k = knee(steps)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(users, [str(u) for u in users])
        ax.set_xlabel("Locust users")
        ax.grid(True, alpha=0.3)
        if k is not None:
            ax.axvline(k.users, color="grey", linestyle=":", linewidth=1)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.peak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, nargs="+", default=[25, 50, 100, 200, 400])
    p.add_argument("--seconds", type=int, default=20, help="measured seconds per step")
    p.add_argument("--spawn-rate", type=float, default=100)
    p.add_argument("--limit", type=int, default=10**6, help="shared code's global limit")
    p.add_argument("--pool", type=int, default=5000, help="issued unique codes per step")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--gateways", type=int, default=1)
    p.add_argument("--chart", type=Path, default=CHART)
    p.add_argument("--record", action="store_true", help=f"write into BENCHMARKS.md ('{SECTION}')")
    args = p.parse_args(argv)
    if not 1 <= args.seconds <= 600 or not all(1 <= u <= 5000 for u in args.users):
        p.error("--seconds 1..600, --users 1..5000 each")
    users = sorted(set(args.users))
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out_root = RESULTS / f"peak-{stamp}"
    steps: list[Step] = []
    code = _code_state()  # before the run: the engine's processes import this tree
    with local_engine(shards=args.shards, gateways=args.gateways) as target:
        print(f"engine up at {target.url}; steps {users}, {args.seconds} s each", flush=True)
        for n in users:
            plan = planning.prepare("flash_sale", target.url, target.admin_email,
                                    target.admin_password, issue=target.issue,
                                    limit=args.limit, pool=args.pool)
            ramp = n / args.spawn_rate
            before = _cpu_snapshot(target.marker)
            run = run_locust(
                "flash_sale", plan, out_root / f"u{n}", users=n, spawn_rate=args.spawn_rate,
                # --reset-stats: the measured window starts when the last user is spawned
                seconds=int(args.seconds + ramp + 0.999), admin_email=target.admin_email,
                admin_password=target.admin_password, extra_args=["--reset-stats"], quiet=True)
            step = to_step(n, run)
            step.other_cores = cpu_by_group(before, _cpu_snapshot(target.marker),
                                            run.wall_s).get(OTHERS, 0.0)
            steps.append(step)
            print(f"{n:5d} users: {step.rps:8,.0f} req/s  p50 {step.p50:6.0f}  p95 {step.p95:6.0f}"
                  f"  p99 {step.p99:6.0f} ms  errors {step.error_pct:5.2f} %  Locust "
                  f"{step.locust_cores:.2f} cores  others {step.other_cores:.2f} cores  invariants "
                  f"{'held' if step.invariants_ok else 'VIOLATED'}", flush=True)
            failed = [c for c in run.summary.get("checks", []) if not c["ok"]]
            for c in failed:
                print(f"      FAIL {c['name']}: {c['detail']}", flush=True)
    (out_root / "steps.json").write_text(json.dumps([asdict(s) for s in steps], indent=2))
    text = table(steps)
    k = knee(steps)
    title = (f"flash_sale on {os.cpu_count()} cores: Locust users vs the engine "
             + (f"(knee ≈ {k.users} users)" if k else "(no knee in this range)"))
    chart(steps, args.chart, title)
    print()
    print(text)
    print(f"\nchart: {args.chart}")
    notes = [
        f"![flash_sale peak load](loadtests/results/{args.chart.name})" if args.chart.parent == RESULTS
        else f"Chart: {args.chart}",
        f"Knee: about {k.users} users, {k.rps:,.0f} req/s at p95 {k.p95:.0f} ms (the fewest "
        "users reaching 90 % of the best throughput; beyond it more users only queue)."
        if k else f"Knee: not reached up to {users[-1]} users (throughput still rising).",
        f"Machine: {machine_summary()}; {code}. Engine: Ray Serve in HAProxy + throughput-optimized "
        f"mode, {args.gateways} gateway replica(s), {args.shards} shard actors, durable ack, "
        "default rate limits; embedded Postgres and Valkey; everything on 127.0.0.1, "
        "including Locust (one process, FastHttpUser), which shares the cores: its CPU is "
        "in the table, and so is the CPU used meanwhile by processes outside this run "
        "(other jobs on the machine; above ~0.2 cores every figure is depressed).",
        f"Scenario (loadtests/scenarios/flash_sale.py): per step a fresh shared code (limit "
        f"{args.limit:,}, one per customer) and {args.pool:,} unique codes issued to VIP "
        "shoppers. Checkout users (an integration API key, think time 50-250 ms) redeem "
        "with a new customer and order id each time (Idempotency-Key = order id), 20 % "
        "with an issued unique code while they last, 10 % double-submitted, 5 % tried "
        "again (409 expected); 4 customer users log in and validate with their own token. "
        f"Spawn rate {args.spawn_rate:g} users/s; Locust's statistics are reset once all "
        f"users are running, then {args.seconds} s are measured. Latency percentiles are "
        "Locust's (rounded buckets); errors are Locust failures (unexpected statuses, "
        "timeouts), not the business 409s, which are counted separately.",
        "Invariants checked after every step (against the API): 201s ≤ limit and ≤ 1 per "
        "customer, the engine's count equals the 201s seen, no unique code redeemed twice or "
        "by someone else, replays returned the first answer.",
    ]
    ok = all(s.invariants_ok for s in steps)
    if args.record:
        cmd = "python -m loadtests.peak " + " ".join(argv if argv is not None else sys.argv[1:])
        record(SECTION, cmd.strip(), text, notes="\n\n".join(n for n in notes if n))
        print(f"recorded under '{SECTION}' in BENCHMARKS.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
