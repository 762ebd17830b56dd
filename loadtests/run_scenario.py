"""Run one Locust scenario headless (or with the web UI) against the voucher engine.

    python -m loadtests.run_scenario flash_sale --users 200 --spawn-rate 100 --seconds 30
    python -m loadtests.run_scenario checkout --host http://127.0.0.1:8000   # a running engine
    python -m loadtests.run_scenario browse --web                            # Locust's web UI

Scenarios: ``flash_sale``, ``checkout``, ``browse``, ``admin`` (``loadtests/scenarios/``).

With no ``--host`` it starts the engine itself, like ``loadtests.bench_http`` does: embedded
Postgres and Valkey in a throwaway directory, a local Ray with Serve in HAProxy +
throughput-optimized mode on free ports, the shard actors and the HTTP app
(``ops.start.start_http``), with default rate limits; then it stops everything. It prepares
the scenario (campaigns, codes, API keys, users) over HTTP as the admin, issues codes to
customers through the engine's Python API (the HTTP API has no issuance endpoint yet), runs
Locust as a subprocess, and writes Locust's CSV and HTML reports plus ``summary.json`` (the
end-of-run invariants) to ``loadtests/results/<scenario>-<timestamp>/``.

With ``--host`` the admin's credentials come from ``VOUCHER_ADMIN_EMAIL`` /
``VOUCHER_ADMIN_PASSWORD``; codes are issued only with ``--attach`` (attach to the running
Ray like the ``voucher-engine`` CLI, ``RAY_ADDRESS`` or ``auto``, namespace
``VOUCHER_NAMESPACE``); otherwise the scenarios use their fallbacks.

Exit status: 0 when the run had no Locust failures and every invariant held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtests.bench_plumbing import wait_http
from loadtests.scenarios import plan as planning
from tests.support import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "loadtests" / "results"
SCENARIO_FILES = {name: ROOT / "loadtests" / "scenarios" / f"{name}.py"
                  for name in planning.SCENARIOS}


@dataclass
class Target:
    url: str
    admin_email: str
    admin_password: str
    issue: planning.Issuer | None
    marker: str = ""  # a path in the command lines of the engine's own processes


@contextlib.contextmanager
def local_engine(*, shards: int = 4, gateways: int = 1) -> Iterator[Target]:
    """The whole engine on this machine, in a throwaway directory, for one run."""
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    # HAProxy's stats/metrics ports default to fixed numbers; another Ray may hold them.
    os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(free_port()))
    os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(free_port()))
    import asyncio

    import ray

    from actors.client import start_engine
    from engine.settings import Settings
    from ops.servers import embedded_for_tests
    from ops.start import start_http
    from store.migrations import migrate

    tmp = Path(tempfile.mkdtemp(prefix="loadtest-", dir="/tmp"))
    os.chmod(tmp, 0o755)  # the embedded Postgres may run as another user (under root)
    svc = embedded_for_tests(tmp)
    namespace = f"loadtest-{os.getpid()}"
    try:
        asyncio.run(migrate(svc.database_url))
        from ops.start import local_ray_environment

        local_ray_environment()
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, namespace=namespace)
        settings = Settings(
            shards=shards,
            namespace=namespace,
            http_port=free_port(),
            admin_email="admin@loadtest.example",
            admin_password="loadtest-admin-password",
            data_dir=str(tmp),
        )
        engine = start_engine(settings, svc.database_url)  # keep the handle: actors live with it
        url = start_http(settings, svc.database_url, svc.redis_url,
                         replicas={"Gateway": gateways})
        wait_http(f"{url}/readyz")
        yield Target(url, settings.admin_email, settings.admin_password or "",
                     planning.engine_issuer(engine), str(tmp))
        del engine
    finally:
        if ray.is_initialized():
            ray.shutdown()  # stops Serve with it (serve.shutdown() can wait 30 s for nothing)
        svc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def attached_issuer() -> planning.Issuer:
    import ray

    from actors.client import attach_engine
    from engine.settings import Settings

    settings = Settings.from_env()
    ray.init(address=settings.ray_address or "auto", namespace=settings.namespace,
             log_to_driver=False, include_dashboard=False, configure_logging=False)
    return planning.engine_issuer(attach_engine(settings))


@dataclass
class LocustRun:
    exit_code: int
    out_dir: Path
    summary: dict[str, Any]
    stats: list[dict[str, str]]  # rows of <prefix>_stats.csv
    locust_cpu_s: float
    wall_s: float

    @property
    def aggregated(self) -> dict[str, str]:
        return next((r for r in self.stats if r.get("Name") == "Aggregated"), {})


def run_locust(
    scenario: str,
    plan: dict[str, Any],
    out_dir: Path,
    *,
    users: int,
    spawn_rate: float,
    seconds: int,
    admin_email: str,
    admin_password: str,
    customer_users: int = 4,
    web: bool = False,
    web_port: int = 8089,
    extra_env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    quiet: bool = False,
) -> LocustRun:
    """Locust in a subprocess (gevent stays out of this process), reports into ``out_dir``."""
    import csv

    import psutil

    out_dir.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix="locust-plan-"))
    try:
        plan_path = planning.write_plan(plan, private)
        summary_path = out_dir / "summary.json"
        env = {
            **os.environ,
            planning.PLAN_ENV: str(plan_path),
            planning.SUMMARY_ENV: str(summary_path),
            "VOUCHER_ADMIN_EMAIL": admin_email,
            "VOUCHER_ADMIN_PASSWORD": admin_password,
            "VOUCHER_CUSTOMER_USERS": str(min(customer_users, max(0, users - 1))),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **(extra_env or {}),
        }
        cmd = [
            sys.executable, "-m", "locust", "-f", str(SCENARIO_FILES[scenario]),
            "--host", plan["host"], "-u", str(users), "-r", str(spawn_rate),
            "--csv", str(out_dir / "locust"), "--html", str(out_dir / "report.html"),
            "--stop-timeout", "30", "--loglevel", "INFO",
            "--logfile", str(out_dir / "locust.log"), *(extra_args or []),
        ]
        if web:
            cmd += ["--web-host", "127.0.0.1", "--web-port", str(web_port)]
            print(f"Locust web UI: http://127.0.0.1:{web_port}  (Ctrl-C to stop)", flush=True)
        else:
            cmd += ["--headless", "-t", f"{seconds}s", "--only-summary"]
        t0 = time.perf_counter()
        # quiet: Locust's own summary table goes to locust.out instead of the terminal
        sink = (out_dir / "locust.out").open("w") if quiet else None
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=sink)
        ps = psutil.Process(proc.pid)
        cpu = 0.0
        try:
            while proc.poll() is None:
                with contextlib.suppress(psutil.Error):
                    t = ps.cpu_times()
                    cpu = t.user + t.system
                time.sleep(0.5)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait(timeout=60)
        wall = time.perf_counter() - t0
        if sink is not None:
            sink.close()
        stats_file = out_dir / "locust_stats.csv"
        rows = list(csv.DictReader(stats_file.open())) if stats_file.exists() else []
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        return LocustRun(proc.returncode or 0, out_dir, summary, rows, cpu, wall)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def print_report(run: LocustRun) -> None:
    agg = run.aggregated
    if agg:
        print(f"\nrequests {agg['Request Count']}, failures {agg['Failure Count']}, "
              f"{float(agg['Requests/s']):,.0f} req/s, p50 {agg['50%']} ms, "
              f"p95 {agg['95%']} ms, p99 {agg['99%']} ms")
    s = run.summary
    if s:
        print(f"outcomes: {json.dumps(s.get('outcomes', {}))}")
        for c in s.get("checks", []):
            print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}")
        for note in s.get("notes", []):
            print(f"  note: {note}")
    else:
        print("no summary.json: the run did not reach its end-of-run check")
    print(f"reports: {run.out_dir}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.run_scenario", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=planning.SCENARIOS)
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--spawn-rate", type=float, default=50)
    p.add_argument("--seconds", type=int, default=30)
    p.add_argument("--host", help="a running engine (default: start one for this run)")
    p.add_argument("--attach", action="store_true",
                   help="with --host: attach to its Ray to issue codes to customers")
    p.add_argument("--customer-users", type=int, default=4,
                   help="flash_sale: Locust users that are logged-in customers")
    p.add_argument("--limit", type=int, help="flash_sale/admin: the shared code's global limit")
    p.add_argument("--pool", type=int, help="flash_sale: unique codes issued to VIP shoppers")
    p.add_argument("--codes", type=int, help="checkout: issued unique codes")
    p.add_argument("--customers", type=int, help="registered customer accounts")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--gateways", type=int, default=1)
    p.add_argument("--web", action="store_true", help="Locust's web UI instead of headless")
    p.add_argument("--web-port", type=int, default=8089)
    p.add_argument("--out", type=Path, help="report folder (default loadtests/results/...)")
    args = p.parse_args(argv)
    if not 1 <= args.seconds <= 3600 or not 1 <= args.users <= 20000:
        p.error("--seconds 1..3600, --users 1..20000")
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / f"{args.scenario}-{stamp}"
    overrides = {k: getattr(args, k) for k in ("limit", "pool", "codes", "customers")}

    with contextlib.ExitStack() as stack:
        if args.host:
            email, password = os.environ.get("VOUCHER_ADMIN_EMAIL", "admin@example.com"), \
                os.environ.get("VOUCHER_ADMIN_PASSWORD", "")
            if not password:
                p.error("with --host, set VOUCHER_ADMIN_EMAIL / VOUCHER_ADMIN_PASSWORD")
            target = Target(args.host.rstrip("/"), email, password,
                            attached_issuer() if args.attach else None)
        else:
            print("starting the engine (embedded Postgres, Valkey, Ray Serve in HAProxy mode)...",
                  flush=True)
            target = stack.enter_context(local_engine(shards=args.shards, gateways=args.gateways))
            print(f"engine up at {target.url}", flush=True)
        plan = planning.prepare(args.scenario, target.url, target.admin_email,
                                target.admin_password, issue=target.issue, **overrides)
        print(f"set-up in {plan['setup_seconds']} s: campaigns "
              f"{ {k: v.get('id') or v.get('ids') for k, v in plan['campaigns'].items()} }",
              flush=True)
        run = run_locust(args.scenario, plan, out, users=args.users, spawn_rate=args.spawn_rate,
                         seconds=args.seconds, admin_email=target.admin_email,
                         admin_password=target.admin_password,
                         customer_users=args.customer_users, web=args.web,
                         web_port=args.web_port)
        print_report(run)
    ok = run.exit_code == 0 and bool(run.summary.get("ok"))
    print("scenario passed" if ok else f"scenario FAILED (locust exit {run.exit_code})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
