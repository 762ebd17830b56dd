"""Benchmark: ``POST /v1/redemptions`` with a shop webhook subscribed against without, in
one run, on one engine.

    python -m loadtests.bench_webhooks [--seconds 10] [--rounds 3] [--record]

The set-up is :mod:`loadtests.bench_http`'s (embedded Postgres and Valkey, Ray Serve in
HAProxy mode, the shard actors, wrk on one shared code, durable ack) plus the webhook
dispatcher actor and a receiver on 127.0.0.1 (allow-listed for the run): a small asyncio
HTTP server in its own process that answers 204 at once. Each round measures

* ``none``: no endpoint subscribed (the dispatcher runs and polls, as it does in production);
* ``subscribed``: an endpoint subscribed to ``redemption.succeeded``, created just before
  the window (so it starts at the present) and deleted after; the dispatcher delivers
  every redemption to the receiver while wrk runs,

in ABBA order over the rounds (none, subscribed, subscribed, none, ...), so drift over the
run falls on both sides. Target: subscribed >= 0.90x none (medians). Reported too: how many
events the receiver got during the window, and how long after the window the last
redemption of it was delivered (the dispatcher's lag).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtests import bench_http as bh
from loadtests.bench_plumbing import fetch_count, wait_http
from loadtests.harness import machine_summary, record
from tests.support import free_port

SECTION = "Shop webhooks: redemptions with a webhook subscribed vs none"

# A receiver that costs as little as possible: HTTP/1.1 keep-alive, 204 at once, counts
# deliveries and remembers the last event id (``GET /count`` answers ``<n> <last id>``).
RECEIVER = r"""
import asyncio, sys
count = 0
last = b"-"
class P(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t; self.buf = b""
    def data_received(self, data):
        global count, last
        self.buf += data
        while True:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            n = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    n = int(v)
                elif k.strip().lower() == b"voucher-event-id":
                    last = v.strip()
            if len(rest) < n:
                return
            self.buf = rest[n:]
            if head.startswith(b"GET"):
                body = b"%d %s" % (count, last)
                self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            else:
                count += 1
                self.t.write(b"HTTP/1.1 204 No Content\r\n\r\n")
async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(P, "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""

bh._GROUPS.insert(0, ("webhook dispatcher", re.compile(r"WebhookDispatcher")))
bh._GROUPS.insert(0, ("webhook receiver", re.compile(r"webhook_receiver")))


def _receiver_count(url: str) -> tuple[int, str]:
    import httpx

    text = httpx.get(f"{url}/count", timeout=10).text
    n, _, last = text.partition(" ")
    return int(n), last


def run(args: argparse.Namespace) -> tuple[str, bool]:
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    os.environ["VOUCHER_RATE_INTEGRATION"] = bh.HIGH_INTEGRATION_RATE
    import httpx
    import ray

    from actors.client import start_engine
    from actors.webhooks import start_webhooks
    from engine.gcra import parse_limit
    from engine.settings import Settings
    from ops.servers import embedded_for_tests
    from ops.start import local_ray_environment, start_http
    from store.migrations import migrate

    tmp = Path(tempfile.mkdtemp(prefix="bench-webhooks-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    svc = embedded_for_tests(tmp)
    receiver: subprocess.Popen[bytes] | None = None
    try:
        dsn = svc.database_url
        asyncio.run(migrate(dsn))
        print(f"machine:  {machine_summary()}", flush=True)
        local_ray_environment()
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, namespace="bench-webhooks")
        hook_port = free_port()
        rscript = tmp / "webhook_receiver.py"
        rscript.write_text(RECEIVER)
        receiver = subprocess.Popen([sys.executable, str(rscript), str(hook_port)])
        hook_url = f"http://127.0.0.1:{hook_port}"
        wait_http(f"{hook_url}/count", 30.0)
        settings = Settings(
            rate_integration=parse_limit(bh.HIGH_INTEGRATION_RATE),
            shards=args.shards,
            namespace="bench-webhooks",
            ack_mode="durable",
            batch_window_ms=args.window_ms,
            http_port=free_port(),
            admin_email="admin@bench.example",
            admin_password="bench-admin-password",
            data_dir=str(tmp),
            outbound_allow=f"127.0.0.1:{hook_port}",
            webhook_max_rate=args.max_rate,
            **({} if args.dispatcher_nice is None
               else {"webhook_idle_priority": False, "webhook_niceness": args.dispatcher_nice}),
        )
        engine = start_engine(settings, dsn)  # noqa: F841 -- keep the named actors alive
        base = start_http(settings, dsn, svc.redis_url, replicas={"Gateway": args.gateways})
        wait_http(f"{base}/healthz", 60.0)
        dispatcher = start_webhooks(settings, dsn)  # noqa: F841 -- keep it alive
        code = f"WHBENCH{os.urandom(3).hex().upper()}"
        cid, api_key, admin_token = bh._setup_engine_campaign(
            base, settings.admin_email, settings.admin_password or "", code
        )
        admin = {"Authorization": admin_token}
        script = tmp / "bench_http.lua"
        script.write_text(bh.WRK_SCRIPT)
        targets = {
            k: bh.Target(k, name, base, ["post", "/v1/redemptions", code, api_key, k[0], "1"])
            for k, name in (("none", "no webhook subscribed"),
                            ("subscribed", "one webhook on redemption.succeeded"))
        }
        deliveries: list[tuple[int, int, float]] = []  # (redemptions ok, delivered in window, lag s)
        order = ["none", "subscribed", "subscribed", "none"]
        for rnd in range(args.rounds):
            for key in order[:2] if rnd % 2 == 0 else order[2:]:
                t = targets[key]
                hook_id = None
                if key == "subscribed":
                    r = httpx.post(f"{base}/v1/webhooks", headers=admin, timeout=30,
                                   json={"url": f"{hook_url}/hook", "events": ["redemption.succeeded"]})
                    r.raise_for_status()
                    hook_id = r.json()["id"]
                wargs = [*t.script_args]
                if args.warmup > 0:
                    wargs[4] = f"{t.script_args[4]}{rnd}w"
                    warm = bh.run_wrk(script, base, wargs, seconds=args.warmup,
                                      connections=args.connections, threads=args.threads)
                    t.ok_total += warm.ok
                wargs[4] = f"{t.script_args[4]}{rnd}m"
                got_before, _ = _receiver_count(hook_url)
                with bh.CpuWindow(str(tmp), args.seconds) as box:
                    res = bh.run_wrk(script, base, wargs, seconds=args.seconds,
                                     connections=args.connections, threads=args.threads)
                got_after, _ = _receiver_count(hook_url)
                t.ok_total += res.ok
                t.runs.append(res)
                t.cpu.append(box.cpu)
                line = (f"[round {rnd + 1}] {key:10s} {res.rps:9,.0f} req/s  p50 {res.p50_ms:7.2f} ms"
                        f"  p99 {res.p99_ms:7.2f} ms  non-2xx/errors: {bh._non2xx_text(res)}")
                if hook_id is not None:
                    # the lag: until the receiver has had every redemption of the window
                    t0 = time.perf_counter()
                    lag_deadline = t0 + args.lag_timeout
                    stable = got_after
                    while time.perf_counter() < lag_deadline:
                        time.sleep(0.2)
                        now_n, _ = _receiver_count(hook_url)
                        pos = asyncio.run(fetch_count(
                            dsn, "SELECT count(*) FROM webhook_endpoints w WHERE w.id = $1 AND"
                            " w.pos_txid >= (SELECT max(txid) FROM redemptions WHERE campaign_id = $2)",
                            hook_id, cid))
                        stable = now_n
                        if pos:
                            break
                    lag = time.perf_counter() - t0
                    deliveries.append((res.ok + (warm.ok if args.warmup > 0 else 0),
                                       got_after - got_before, lag))
                    line += (f"  delivered in window {got_after - got_before:,}"
                             f" ({(got_after - got_before) / res.seconds:,.0f}/s), caught up"
                             f" {lag:.1f} s after (receiver total {stable:,})")
                    httpx.delete(f"{base}/v1/webhooks/{hook_id}", headers=admin, timeout=30)
                print(line, flush=True)
                print(f"           cores used: {bh._cpu_text(box.cpu, top=10)}", flush=True)

        none_run, none_cpu = targets["none"].median()
        sub_run, sub_cpu = targets["subscribed"].median()
        ratio = sub_run.rps / none_run.rps if none_run.rps else 0.0
        ok = ratio >= 0.90
        lines = [
            "| target | req/s (median) | p50 ms | p99 ms | runs (req/s) |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for key in ("none", "subscribed"):
            t = targets[key]
            m, _ = t.median()
            lines.append(
                f"| {t.name} | {m.rps:,.0f} | {m.p50_ms:.2f} | {m.p99_ms:.2f} | "
                + ", ".join(f"{r.rps:,.0f}" for r in t.runs) + " |"
            )
        lines += [
            "",
            f"subscribed / none: **{ratio:.2f}x** (target >= 0.90x): {'met' if ok else 'NOT met'}",
            "",
            "Deliveries during each subscribed window (redemptions answered 2xx incl. warm-up,"
            " deliveries the receiver got while wrk ran, seconds after the window until the"
            " endpoint's position passed the last redemption): "
            + "; ".join(f"{a:,} / {b:,} / {c:.1f} s" for a, b, c in deliveries),
            "",
            "Cores used (median run; 2.00 = both cores):",
            "",
            f"* none: {bh._cpu_text(none_cpu, top=10)}",
            f"* subscribed: {bh._cpu_text(sub_cpu, top=10)}",
        ]
        return "\n".join(lines), ok
    finally:
        if receiver is not None:
            receiver.terminate()
        try:
            import ray

            ray.shutdown()
        finally:
            svc.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="each round: none and subscribed (ABBA)")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gateways", type=int, default=1)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--window-ms", type=float, default=2.0)
    p.add_argument("--lag-timeout", type=float, default=120.0)
    p.add_argument("--max-rate", type=float, default=0.0,
                   help="VOUCHER_WEBHOOK_MAX_RATE of the dispatcher (0: no bound)")
    p.add_argument("--dispatcher-nice", type=int, default=None,
                   help="run the dispatcher at this nice level instead of idle priority")
    p.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    args = p.parse_args(argv)
    table, ok = run(args)
    print(table)
    if args.record:
        cmd = "python -m loadtests.bench_webhooks " + " ".join(argv if argv is not None else sys.argv[1:])
        record(SECTION, cmd, table)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
