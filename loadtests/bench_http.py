"""HTTP benchmark: ``POST /v1/redemptions`` end to end (durable ack) on the Serve app,
side by side, in one run, with a no-op endpoint of the same Serve app and with a naive
single-process FastAPI + asyncpg service (one transaction per redemption, same shared code).

    python -m loadtests.bench_http [--seconds 10] [--connections 64] [--record]

One run starts the engine's embedded Postgres and Valkey in a throwaway directory, a local
Ray with Serve in HAProxy + throughput-optimized mode, the shard actors and the HTTP app
(``ops.start.start_http``), and the naive service (``loadtests.naive_service``) as a
subprocess on another port against the same Postgres. Then, for each target, wrk warms up
and measures with the same connections and threads, all on 127.0.0.1:

* ``no-op``: ``GET /healthz`` on the same Serve app (a handler that returns a constant; the
  app has no POST no-op, and the benchmark adds no routes to it);
* ``engine``: ``POST /v1/redemptions`` with an integration API key, a unique customer,
  order id and ``Idempotency-Key`` per request, all on one shared code (one shard);
* ``naive``: the same request to the naive service;
* ``cart`` (``--cart-ab``): ``POST /v1/redemptions`` of 10-line orders on a campaign with
  rules (``loadtests/bench_cart.py``), each answer checked against engine.pricing.

Targets: engine >= 0.5x the no-op's requests/s, >= 2x the naive service's, and
p99 <= 50 ms at 64 connections; cart >= 0.8x the engine's requests/s. Every answer's status is counted (a wrk ``response``
hook); the redemptions in Postgres are counted afterwards and must cover every 2xx answer.

The load generator is wrk (Debian package ``wrk``): a Python client would take most of one
of the machine's two cores. wrk competes for the same cores as the server; its CPU share is
reported with the server's, per process group, for every measured window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil

from loadtests import bench_cart
from loadtests.bench_plumbing import fetch_count, wait_http
from loadtests.harness import machine_summary, record
from tests.support import free_port

SECTION = "HTTP: POST /v1/redemptions"
HIGH_INTEGRATION_RATE = "10000000/20000000"
ORDER_AMOUNT = 4000

WRK_MISSING = """\
wrk is not installed (or not on PATH): this benchmark drives HTTP load with wrk, because a
Python load generator would take most of one of this machine's two cores.

    sudo apt-get install -y wrk        # Debian / Ubuntu
    brew install wrk                   # macOS

or build it from https://github.com/wg/wrk, then run this command again."""

# One script for every target, so the load generator does the same work per request.
# Thread-local state: ``tid`` (set in setup), ``counter``, ``statuses``.
WRK_SCRIPT = r"""
local threads = {}
local counter = 0
__CART_ITEMS__
function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  mode, path, code, key, prefix, idem = args[1], args[2], args[3], args[4], args[5], args[6] == "1"
  statuses = {}
end

function request()
  counter = counter + 1
  if mode == "get" then
    return wrk.format("GET", path)
  end
  local id = prefix .. "-" .. tid .. "-" .. counter
  local headers = {["Content-Type"] = "application/json"}
  if key ~= "-" then headers["X-API-Key"] = key end
  if idem then headers["Idempotency-Key"] = "k" .. id end
  local order = mode == "cart"
    and '","currency":"EUR","items":' .. cart_items[counter % #cart_items + 1] .. '}}'
    or '","amount":__AMOUNT__,"currency":"EUR"}}'
  local body = '{"code":"' .. code .. '","customer_id":"c' .. id .. '","order":{"id":"o' .. id .. order
  return wrk.format("POST", path, headers, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local counts = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do
      counts[tostring(k)] = (counts[tostring(k)] or 0) + v
    end
  end
  local parts = {}
  for k, v in pairs(counts) do parts[#parts + 1] = string.format('"%s":%d', k, v) end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,'
    .. '"max_us":%d,"mean_us":%.1f,"connect":%d,"read":%d,"write":%d,"status":%d,'
    .. '"timeout":%d,"statuses":{%s}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, e.connect, e.read, e.write, e.status,
    e.timeout, table.concat(parts, ",")))
end
""".replace("__AMOUNT__", str(ORDER_AMOUNT)).replace("__CART_ITEMS__", bench_cart.lua_table())


# --------------------------------------------------------------------------------------
# wrk


@dataclass
class WrkRun:
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    socket_errors: dict[str, int]
    statuses: dict[int, int]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> int:
        return sum(n for s, n in self.statuses.items() if 200 <= s < 300)

    @property
    def non_2xx(self) -> dict[int, int]:
        return {s: n for s, n in sorted(self.statuses.items()) if not 200 <= s < 300}


def run_wrk(
    script: Path,
    url: str,
    script_args: list[str],
    *,
    seconds: int,
    connections: int,
    threads: int,
    timeout_s: int = 5,
) -> WrkRun:
    cmd = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", f"--timeout={timeout_s}s",
        "--latency", "-s", str(script), url, "--", *script_args,
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    match = re.search(r"^WRKJSON (.*)$", out.stdout, re.MULTILINE)
    if out.returncode != 0 or match is None:
        raise RuntimeError(
            f"wrk failed (exit {out.returncode}): {' '.join(cmd)}\n{out.stdout}\n{out.stderr}"
        )
    d = json.loads(match.group(1))
    return WrkRun(
        requests=d["requests"],
        seconds=d["duration_us"] / 1e6,
        p50_ms=d["p50_us"] / 1e3,
        p90_ms=d["p90_us"] / 1e3,
        p99_ms=d["p99_us"] / 1e3,
        max_ms=d["max_us"] / 1e3,
        socket_errors={k: d[k] for k in ("connect", "read", "write", "timeout") if d[k]},
        statuses={int(k): v for k, v in d["statuses"].items()},
    )


# --------------------------------------------------------------------------------------
# CPU per process group during a window: who, besides the system under test, used the cores


_GROUPS = [
    ("haproxy", re.compile(r"haproxy")),
    ("gateway replica", re.compile(r"ServeReplica:[^:]+:Gateway")),
    ("other Serve replicas", re.compile(r"ServeReplica:")),
    ("Serve controller", re.compile(r"ServeController")),
    ("shard actors", re.compile(r"VoucherShard")),
    ("coordinator", re.compile(r"Coordinator")),
    ("naive service", re.compile(r"loadtests\.naive_service")),
    ("postgres", re.compile(r"postgres")),
    ("valkey", re.compile(r"valkey|redis-server")),
    ("ray system (raylet, gcs, agents, idle workers)", re.compile(r"ray")),
]
OTHERS = "not this benchmark (other users of the machine)"


def _members(marker: str) -> set[int]:
    """This benchmark's processes: the driver's descendants (Ray, wrk, the naive service)
    and the embedded servers, found by their data directory, with their children."""
    roots = [psutil.Process()]
    for proc in psutil.process_iter():
        try:
            if marker in " ".join(proc.cmdline()):
                roots.append(proc)
        except psutil.Error:
            continue
    pids: set[int] = set()
    for root in roots:
        pids.add(root.pid)
        with contextlib.suppress(psutil.Error):
            pids.update(c.pid for c in root.children(recursive=True))
    return pids


def _group_of(proc: psutil.Process, members: set[int]) -> str:
    if proc.pid not in members:
        return OTHERS
    if proc.pid == os.getpid():
        return "benchmark driver"
    try:
        if proc.name() == "wrk":
            return "wrk (load generator)"
        text = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        return "gone"
    for name, pattern in _GROUPS:
        if pattern.search(text):
            return name
    return "other (this benchmark)"


def _cpu_snapshot(marker: str) -> dict[int, tuple[str, float]]:
    members = _members(marker)
    snap: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter():
        try:
            t = proc.cpu_times()
            snap[proc.pid] = (_group_of(proc, members), t.user + t.system)
        except psutil.Error:
            continue
    return snap


def cpu_by_group(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                 seconds: float) -> dict[str, float]:
    """Cores used per group over the window (1.0 = one core busy all the time). A process
    that started inside the window (wrk) counts from zero; one that ended is not seen."""
    used: dict[str, float] = {}
    for pid, (group, cpu) in after.items():
        prev = before.get(pid, (group, 0.0))[1]
        used[group] = used.get(group, 0.0) + max(0.0, cpu - prev) / seconds
    return dict(sorted(used.items(), key=lambda kv: -kv[1]))


class CpuWindow:
    """CPU per process group while a wrk run is in flight (sampled just before its end,
    since wrk's own CPU time vanishes with it)."""

    def __init__(self, marker: str, seconds: float) -> None:
        self.marker = marker
        self.seconds = seconds
        self.cpu: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuWindow:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(timeout=self.seconds + 30)

    def _run(self) -> None:
        # Skip wrk's start-up second; sample before it exits.
        time.sleep(min(1.0, self.seconds * 0.1))
        t0 = time.perf_counter()
        before = _cpu_snapshot(self.marker)
        time.sleep(max(0.5, self.seconds * 0.8))
        self.cpu = cpu_by_group(before, _cpu_snapshot(self.marker), time.perf_counter() - t0)


# --------------------------------------------------------------------------------------
# Targets


@dataclass
class Target:
    key: str
    name: str
    url: str
    script_args: list[str]
    runs: list[WrkRun] = field(default_factory=list)
    cpu: list[dict[str, float]] = field(default_factory=list)
    ok_total: int = 0  # 2xx answers over warm-ups and measured runs (checked against the DB)

    def median(self) -> tuple[WrkRun, dict[str, float]]:
        order = sorted(range(len(self.runs)), key=lambda i: self.runs[i].rps)
        i = order[(len(order) - 1) // 2]
        return self.runs[i], self.cpu[i]


def _setup_engine_campaign(base: str, email: str, password: str, code: str) -> tuple[str, str, str]:
    """Admin login, an integration API key, an active shared-code campaign: (campaign id,
    API key, admin token)."""
    import httpx

    with httpx.Client(base_url=base, timeout=30.0) as c:
        r = c.post("/v1/auth/login", json={"email": email, "password": password})
        r.raise_for_status()
        admin = {"Authorization": f"Bearer {r.json()['access_token']}"}
        r = c.post("/v1/api-keys", json={"name": "bench-http", "roles": ["integration"]},
                   headers=admin)
        r.raise_for_status()
        key = r.json()["key"]
        r = c.post(
            "/v1/campaigns",
            headers=admin,
            json={
                "name": "bench http shared code",
                "type": "shared_code",
                "currency": "EUR",
                "discount": {"kind": "amount", "value": 500},
                "limits": {"total": 10**12},
                "shared_code": code,
                "ends_at": (datetime.now(UTC) + timedelta(days=1)).isoformat(),
            },
        )
        r.raise_for_status()
        cid = r.json()["id"]
        c.post(f"/v1/campaigns/{cid}/activate", headers=admin).raise_for_status()
        # One redemption by hand: the request shape is right before wrk repeats it.
        r = c.post(
            "/v1/redemptions",
            headers={"X-API-Key": key, "Idempotency-Key": "bench-probe"},
            json={"code": code, "customer_id": "probe", "order": {"id": "probe",
                  "amount": ORDER_AMOUNT, "currency": "EUR"}},
        )
        if r.status_code != 201:
            raise RuntimeError(f"probe redemption answered {r.status_code}: {r.text}")
    return cid, key, admin["Authorization"]


_METRIC_RE = re.compile(
    r"^(voucher_gateway_batches|voucher_gateway_batch_items|voucher_gateway_call_seconds_total|"
    r"voucher_decision_seconds_(?:sum|count))(\{[^}]*op=\"redeem\"[^}]*\})?\s+(\S+)$",
    re.MULTILINE,
)


def _gateway_metrics(base: str, token: str) -> dict[str, float]:
    """Micro-batcher counters and the redeem decision time of the answering replica."""
    import httpx

    try:
        text = httpx.get(f"{base}/metrics", headers={"Authorization": token}, timeout=10).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for m in _METRIC_RE.finditer(text):
        if m.group(1).startswith("voucher_decision_seconds") and not m.group(2):
            continue
        out[m.group(1)] = float(m.group(3))
    return out


async def _pg_settings(dsn: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[]) ORDER BY name",
            ["fsync", "synchronous_commit", "server_version"],
        )
    finally:
        await conn.close()
    return ", ".join(f"{r['name']}={r['setting']}" for r in rows)


# --------------------------------------------------------------------------------------
# The run


def _fmt_ratio(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.2f}×"


def _non2xx_text(run: WrkRun) -> str:
    bad = run.non_2xx
    parts = [f"{n} × {s}" for s, n in bad.items()]
    parts += [f"{n} {k}" for k, n in run.socket_errors.items()]
    return ", ".join(parts) if parts else "0"


def _cpu_text(cpu: dict[str, float], top: int = 6) -> str:
    shown = [(g, c) for g, c in cpu.items() if c >= 0.02][:top]
    return ", ".join(f"{g} {c:.2f}" for g, c in shown)


def _code_state() -> str:
    """The commit measured, and whether the engine's code differed from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "engine", "store", "actors", "serve", "ops"], cwd=root,
            capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "code: not a git checkout"
    changed = sorted({line[3:] for line in dirty if line.strip()})
    return f"code: commit {head}" + (
        f" with uncommitted changes to {', '.join(changed)}" if changed else "")


def run(args: argparse.Namespace) -> tuple[str, bool]:
    # Ray reads these when it starts: Serve's HAProxy ingress. The integration role's rate
    # limit (not what this benchmark measures) goes into the engine's settings below; the
    # variable stays set for whatever else reads the environment.
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    if not args.keep_rate_limit:
        os.environ["VOUCHER_RATE_INTEGRATION"] = HIGH_INTEGRATION_RATE
    import ray
    from ray import serve

    from actors.client import start_engine
    from engine.gcra import parse_limit
    from engine.settings import Settings
    from loadtests import naive_service
    from loadtests.fence_ab import set_fence
    from loadtests.history_index_ab import set_history_indexes
    from ops.servers import embedded_for_tests
    from ops.start import RAY_NICENESS_VAR, local_ray_environment, start_http
    from store.migrations import migrate

    tmp = Path(tempfile.mkdtemp(prefix="bench-http-", dir="/tmp"))
    os.chmod(tmp, 0o755)  # the embedded Postgres may run as another user (under root)
    svc = embedded_for_tests(tmp)
    naive_proc: subprocess.Popen[bytes] | None = None
    try:
        dsn = svc.database_url
        asyncio.run(migrate(dsn))
        pg = asyncio.run(_pg_settings(dsn))
        print(f"machine:  {machine_summary()}", flush=True)
        print(f"postgres: {pg}", flush=True)

        if args.worker_niceness is not None:
            os.environ[RAY_NICENESS_VAR] = str(args.worker_niceness)
        local_ray_environment()
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, namespace="bench-http")
        port = free_port()
        settings = Settings(
            **({} if args.keep_rate_limit else {"rate_integration": parse_limit(HIGH_INTEGRATION_RATE)}),
            shards=args.shards,
            namespace="bench-http",
            ack_mode="durable",
            batch_window_ms=args.window_ms,
            shard_channel=not args.ray_calls,
            http_port=port,
            admin_email="admin@bench.example",
            admin_password="bench-admin-password",
            data_dir=str(tmp),
        )
        # Keep the handles: the named actors live only as long as a handle does.
        engine = start_engine(settings, dsn)
        base = start_http(settings, dsn, svc.redis_url, replicas={"Gateway": args.gateways})
        wait_http(f"{base}/healthz", 60.0)
        code = f"HTTPBENCH{os.urandom(3).hex().upper()}"
        cid, api_key, admin_token = _setup_engine_campaign(
            base, settings.admin_email, settings.admin_password or "", code
        )

        want_cart = args.cart_ab or "cart" in args.only
        cart_code = f"CARTBENCH{os.urandom(3).hex().upper()}"
        cart_cid = ""
        if want_cart:  # a campaign with rules, redeemed with 10-line orders (bench_cart.py)
            cart_cid = bench_cart.setup_campaign(
                base, admin_token, api_key, cart_code, (datetime.now(UTC) + timedelta(days=1)).isoformat())

        naive_code = f"NAIVE{os.urandom(3).hex().upper()}"
        asyncio.run(naive_service.prepare(dsn, naive_code, 10**12))
        naive_port = free_port()
        naive_proc = subprocess.Popen(
            [sys.executable, "-m", "loadtests.naive_service", "--dsn", dsn,
             "--port", str(naive_port), "--pool", str(args.naive_pool)],
            cwd=Path(__file__).resolve().parent.parent,
        )
        naive_base = f"http://127.0.0.1:{naive_port}"
        wait_http(f"{naive_base}/healthz", 60.0)

        script = tmp / "bench_http.lua"
        script.write_text(WRK_SCRIPT)
        idem = "0" if args.no_idempotency_key else "1"
        targets = [
            Target("noop", "no-op: GET /healthz, same Serve app", base,
                   ["get", "/healthz", "-", "-", "-", "0"]),
            Target("engine", "engine: POST /v1/redemptions (durable)", base,
                   ["post", "/v1/redemptions", code, api_key, "e", idem]),
            Target("naive", "naive FastAPI + asyncpg, 1 tx per redemption", naive_base,
                   ["post", "/v1/redemptions", naive_code, "-", "n", idem]),
        ]
        if args.fence_ab:
            # the same engine and requests with voucher_fence() swapped for a no-op
            # (loadtests/fence_ab.py): what fencing costs, measured within each round
            targets.insert(2, Target(
                "nofence", "engine with the fence check off (A/B)", base,
                ["post", "/v1/redemptions", code, api_key, "f", idem]))
        if args.history_index_ab:
            # the same engine and requests without the redemption history's indexes
            # (loadtests/history_index_ab.py), measured before the engine with them
            targets.insert(1, Target(
                "noidx", "engine without the history's indexes (A/B)", base,
                ["post", "/v1/redemptions", code, api_key, "i", idem]))
        if want_cart:
            targets.insert(2, Target("cart", "engine: cart, 10 lines + rules (durable)", base,
                                     ["cart", "/v1/redemptions", cart_code, api_key, "c", idem]))
        windows: dict[str, tuple[dict[str, float], dict[str, float], list[Any], list[Any]]] = {}
        for rnd in range(args.rounds):
            for t in bench_cart.abba_order(targets, rnd) if args.cart_ab else targets:
                if args.only and t.key not in args.only:
                    continue
                wargs = [*t.script_args]
                wargs[4] = f"{wargs[4]}{rnd}w"
                if t.key == "nofence":
                    asyncio.run(set_fence(dsn, on=False))
                if t.key == "noidx":
                    asyncio.run(set_history_indexes(dsn, on=False))
                warm = None
                if args.warmup > 0:
                    warm = run_wrk(script, t.url, wargs, seconds=args.warmup,
                                   connections=args.connections, threads=args.threads)
                    t.ok_total += warm.ok
                wargs[4] = f"{t.script_args[4]}{rnd}m"
                if t.key in ("engine", "cart"):
                    window_start = (_gateway_metrics(base, admin_token), asyncio.run(engine.shard_info()))
                with CpuWindow(str(tmp), args.seconds) as box:
                    res = run_wrk(script, t.url, wargs, seconds=args.seconds,
                                  connections=args.connections, threads=args.threads)
                if t.key in ("engine", "cart"):
                    windows[t.key] = (window_start[0], _gateway_metrics(base, admin_token),
                                      window_start[1], asyncio.run(engine.shard_info()))
                if t.key == "nofence":
                    asyncio.run(set_fence(dsn, on=True))
                if t.key == "noidx":
                    asyncio.run(set_history_indexes(dsn, on=True))
                t.ok_total += res.ok
                t.runs.append(res)
                t.cpu.append(box.cpu)
                print(
                    f"[round {rnd + 1}] {t.key:6s} {res.rps:9,.0f} req/s  p50 {res.p50_ms:7.2f} ms"
                    f"  p99 {res.p99_ms:7.2f} ms  non-2xx/errors: {_non2xx_text(res)}"
                    + (f"  (warm-up {warm.rps:,.0f} req/s, non-2xx {_non2xx_text(warm)})"
                       if warm is not None else ""),
                    flush=True,
                )
                print(f"           cores used: {_cpu_text(box.cpu, top=10)}", flush=True)

        # Every 2xx answer must be a committed redemption (durable ack). Requests still in
        # flight when wrk stopped may commit without an answer: at most one per connection.
        time.sleep(1.0)
        db = {
            "engine": asyncio.run(fetch_count(
                dsn, "SELECT count(*) FROM redemptions WHERE campaign_id = $1", cid)) - 1,
            "naive": asyncio.run(fetch_count(
                dsn, f"SELECT count(*) FROM {naive_service.SCHEMA}.redemptions")),
        }
        cart_rows = asyncio.run(bench_cart.check_rows(dsn, cart_cid)) if want_cart else None
        if cart_rows is not None:
            db["cart"] = cart_rows.rows - 1  # less the probe

        by = {t.key: t for t in targets if t.runs}
        lines = [
            "| target | req/s | p50 ms | p99 ms | max ms | non-2xx / socket errors | "
            "engine ÷ this | other load on the machine (cores) |",
            "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
        ]
        eng = by["engine"].median()[0] if "engine" in by else None
        for t in by.values():
            r, cpu = t.median()
            rat = eng.rps / r.rps if eng is not None and r.rps else math.nan
            lines.append(
                f"| {t.name} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
                f"{r.max_ms:.1f} | {_non2xx_text(r)} | {_fmt_ratio(rat)} | "
                f"{cpu.get(OTHERS, 0.0):.2f} |"
            )
        met = True
        checks = ["", "| check | value | target | met |", "| --- | ---: | --- | --- |"]

        def check(label: str, value: str, target: str, ok: bool) -> None:
            nonlocal met
            met = met and ok
            checks.append(f"| {label} | {value} | {target} | {'yes' if ok else '**no**'} |")

        if eng is not None:
            if "noop" in by:
                x = eng.rps / by["noop"].median()[0].rps
                check("engine ÷ no-op (req/s)", f"{x:.2f}×", "≥ 0.5×", x >= 0.5)
            if "naive" in by:
                x = eng.rps / by["naive"].median()[0].rps
                check("engine ÷ naive service (req/s)", f"{x:.2f}×", "≥ 2×", x >= 2.0)
            if "nofence" in by:
                x = eng.rps / by["nofence"].median()[0].rps
                check("engine ÷ engine with the fence check off (req/s)", f"{x:.3f}×",
                      "≥ 0.95×", x >= 0.95)
            if "noidx" in by:
                x = eng.rps / by["noidx"].median()[0].rps
                check("engine ÷ engine without the history's indexes (req/s)", f"{x:.3f}×",
                      "≥ 0.95×", x >= 0.95)
            if "cart" in by:
                x = by["cart"].median()[0].rps / eng.rps
                check("cart ÷ engine (req/s)", f"{x:.3f}×", f"≥ {bench_cart.TARGET_RATIO}×",
                      x >= bench_cart.TARGET_RATIO)
            check(f"engine p99 at {args.connections} connections", f"{eng.p99_ms:.1f} ms",
                  "≤ 50 ms", eng.p99_ms <= 50.0)
        for key in ("engine", "cart"):
            if key in by:
                bad = sum(sum(r.non_2xx.values()) + sum(r.socket_errors.values()) for r in by[key].runs)
                check(f"{key} answers that were not 201", str(bad), "0", bad == 0)
        if cart_rows is not None and "cart" in by:
            check("cart rows whose amount, discount or lines differ from engine.pricing.price",
                  f"{cart_rows.bad:,} of {cart_rows.rows:,}", "0", cart_rows.bad == 0)
            for m in cart_rows.mismatches:
                print(f"cart row mismatch: {m}", file=sys.stderr)
        for key in ("engine", "cart", "naive"):
            if key in by:
                answered = by[key].ok_total
                ab = [k for k in ("nofence", "noidx") if k in by] if key == "engine" else []
                for other in ab:  # one campaign for the engine and its A/B targets
                    answered += by[other].ok_total
                slack = args.connections * 2 * args.rounds * (1 + len(ab))
                ok = answered <= db[key] <= answered + slack
                check(f"{key}: redemptions in Postgres vs 2xx answers (warm-ups included)",
                      f"{db[key]:,} / {answered:,}", f"rows ≥ answers (≤ +{slack} unanswered "
                      "in flight)", ok)

        notes = [
            f"Machine: {machine_summary()}; {pg}; {_code_state()}. Load: wrk, {args.connections} connections, "
            f"{args.threads} threads, {args.warmup} s warm-up then {args.seconds} s measured "
            f"per target, {args.rounds} round(s) (median by req/s), all on 127.0.0.1; the "
            "load generator shares the 2 cores with everything else (its share is below).",
            f"Engine: Ray Serve in HAProxy + throughput-optimized mode, {args.gateways} gateway "
            f"replica(s), {args.shards} shard actors, durable ack, batch window "
            f"{args.window_ms} ms; one shared code (one shard), limits.total 10^12; every "
            "request has its own customer id, order id"
            + ("" if args.no_idempotency_key else " and Idempotency-Key")
            + ", and authenticates with an integration API key (verified once, then cached by "
            "the replica for 30 s; its revocation flag is read in the rate limiter's Redis "
            "call). Gateway -> shard: "
            + ("Ray actor calls only" if args.ray_calls else "the shard's Unix socket (same node)")
            + f"; Ray worker processes at nice {os.environ.get(RAY_NICENESS_VAR, '15')}.",
        ]
        if not args.keep_rate_limit:
            notes.append(
                f"Rate limit: VOUCHER_RATE_INTEGRATION={HIGH_INTEGRATION_RATE} was set before "
                "Ray started (default 2000/s, burst 4000 per key), so the limiter still runs "
                "its Redis check on every request but never refuses: its refusals are not "
                "what is measured here."
            )
        notes.append(
            "No-op: GET /healthz of the same Serve app (FastAPI handler returning a constant); "
            "the app has no POST no-op and this benchmark adds no routes. Naive: "
            f"loadtests/naive_service.py, one uvicorn worker (uvloop, httptools), asyncpg pool "
            f"of {args.naive_pool}, BEGIN; SELECT … FOR UPDATE on the shared-code row; check "
            "remaining; UPDATE; INSERT; COMMIT, on the same Postgres, same body model "
            "(serve.models.CheckoutIn), no authentication or rate limit."
        )
        notes.append(
            "'Other load' is the CPU used during the window by processes outside this "
            "benchmark (other jobs on the machine): with it above ~0.2 cores every figure is "
            "depressed, the ratios between targets of one round less so."
        )
        cpu_lines = ["", "Cores used during each measured window (median run; 2.00 = both cores):", ""]
        for t in by.values():
            cpu_lines.append(f"* {t.key}: {_cpu_text(t.median()[1], top=8)}")
        for key, (metrics_before, metrics_after, shards_before, shards_after) in windows.items():
            d_b = metrics_after.get("voucher_gateway_batches", 0) - metrics_before.get(
                "voucher_gateway_batches", 0)
            d_i = metrics_after.get("voucher_gateway_batch_items", 0) - metrics_before.get(
                "voucher_gateway_batch_items", 0)
            d_s = metrics_after.get("voucher_decision_seconds_sum", 0) - metrics_before.get(
                "voucher_decision_seconds_sum", 0)
            d_n = metrics_after.get("voucher_decision_seconds_count", 0) - metrics_before.get(
                "voucher_decision_seconds_count", 0)
            d_c = metrics_after.get("voucher_gateway_call_seconds_total", 0) - metrics_before.get(
                "voucher_gateway_call_seconds_total", 0)
            if d_b > 0 and d_n > 0:
                scope = "" if args.gateways == 1 else " (one replica of several)"
                cpu_lines.append(
                    f"* gateway micro-batcher during the last {key} window{scope}: "
                    f"{d_i / d_b:.1f} redemptions per actor call, mean decision time "
                    f"(batcher submit → shard answer, includes the group commit) "
                    f"{1000 * d_s / d_n:.2f} ms, mean actor-call round trip "
                    f"{1000 * d_c / d_b:.2f} ms"
                )
            if shards_before and shards_after:
                commits = sum(a["batches"] - b["batches"] for a, b in zip(shards_after, shards_before))
                events = sum(a["events_written"] - b["events_written"]
                             for a, b in zip(shards_after, shards_before))
                secs = sum(a["commit_seconds"] - b["commit_seconds"]
                           for a, b in zip(shards_after, shards_before))
                calls = sum(a.get("batch_calls", 0) - b.get("batch_calls", 0)
                            for a, b in zip(shards_after, shards_before))
                inside = sum(a.get("batch_seconds", 0) - b.get("batch_seconds", 0)
                             for a, b in zip(shards_after, shards_before))
                if calls:
                    cpu_lines.append(
                        f"* shard side of those calls: {calls:,} decision calls, mean time inside "
                        f"the shard (start of the call → answer, includes the durable wait) "
                        f"{1000 * inside / calls:.2f} ms"
                    )
                if commits:
                    cpu_lines.append(
                        f"* shard group commits during the last {key} window: {commits:,} "
                        f"({commits / args.seconds:,.0f}/s), {events / commits:.1f} events per "
                        f"commit, mean commit {1000 * secs / commits:.2f} ms "
                        f"(batch window {args.window_ms} ms before each)"
                    )
        if args.cart_ab and "cart" in by and "engine" in by:
            rounds, _ = bench_cart.round_table(by["engine"].runs, by["cart"].runs)
            checks += ["", "Rounds (ABBA: the targets in reverse order in even-numbered rounds):", "", rounds]
            notes.append(bench_cart.NOTE)
        table = "\n".join(lines + checks)
        text = table + "\n" + "\n".join(cpu_lines) + "\n\n" + "\n\n".join(notes)
        del engine
        return text, met
    finally:
        if naive_proc is not None:
            naive_proc.terminate()
            try:
                naive_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                naive_proc.kill()
        if ray.is_initialized():
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
        svc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.bench_http",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seconds", type=int, default=10, help="measured seconds per target")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured seconds before each")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument("--rounds", type=int, default=1, help="repeat all targets; keep the median")
    p.add_argument("--gateways", type=int, default=1, help="gateway replicas (config.yaml: 1)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--window-ms", type=float, default=2.0, help="group-commit batch window")
    p.add_argument("--naive-pool", type=int, default=16, help="asyncpg pool of the naive service")
    p.add_argument("--no-idempotency-key", action="store_true")
    p.add_argument("--ray-calls", action="store_true",
                   help="gateway -> shard by Ray actor calls only (VOUCHER_SHARD_CHANNEL=false)")
    p.add_argument("--worker-niceness", type=int, default=None,
                   help="nice level of Ray's worker processes (engine default 0; Ray's own 15)")
    p.add_argument("--keep-rate-limit", action="store_true",
                   help="keep the default integration rate limit (2000/s per key)")
    p.add_argument("--only", nargs="+", choices=["noop", "engine", "cart", "nofence", "noidx", "naive"],
                   default=[])
    p.add_argument("--cart-ab", action="store_true",
                   help="also redeem 10-line orders on a campaign with rules (loadtests/bench_cart.py), "
                   "targets in ABBA order over the rounds; recorded under its own section")
    p.add_argument("--history-index-ab", action="store_true",
                   help="also measure the engine without the redemption history's indexes")
    p.add_argument("--fence-ab", action="store_true",
                   help="also run the engine with the fence check off, to measure its cost")
    p.add_argument("--record", action="store_true", help=f"write the table into BENCHMARKS.md "
                   f"under '{SECTION}'")
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print(WRK_MISSING, file=sys.stderr)
        return 2
    if not 1 <= args.seconds <= 600 or not 0 <= args.warmup <= 60 or not 1 <= args.rounds <= 5:
        p.error("--seconds 1..600, --warmup 0..60, --rounds 1..5")
    text, met = run(args)
    print()
    print(text)
    print()
    print("targets met" if met else "targets NOT met")
    if args.record:
        if args.only:
            print("not recording a partial run (--only)", file=sys.stderr)
            return 1
        cmd = "python -m loadtests.bench_http " + " ".join(
            argv if argv is not None else sys.argv[1:])
        record(bench_cart.SECTION if args.cart_ab else SECTION, cmd.strip(), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
