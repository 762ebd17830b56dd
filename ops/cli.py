"""``voucher-engine``: start the engine and drive it from a shell.

    voucher-engine up [--demo]            start Postgres/Valkey (embedded unless configured),
                                          Ray and the actors; stay in the foreground
    voucher-engine create NAME --type discount --percent 10 [...]
    voucher-engine generate CAMPAIGN COUNT  (progress bar)
    voucher-engine activate|pause|end CAMPAIGN
    voucher-engine assign CAMPAIGN CUSTOMER
    voucher-engine validate|redeem CODE --amount 5000 --currency EUR [--customer C]
    voucher-engine rollback REDEMPTION_ID
    voucher-engine stats CAMPAIGN
    voucher-engine issue CAMPAIGN (--tag T | --all | --customer C ...) --channel email
                                          (progress bar)
    voucher-engine demo-data [--scale 1] [--days 14] [--live SECONDS]
    voucher-engine reports [--api-url URL]  (the Streamlit reporting app)

Every command but ``up`` attaches to the engine that ``up`` started (same machine, or
``RAY_ADDRESS``). Errors print as one line with their code, exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from engine import errors
from engine.settings import Settings
from engine.shard_state import RedeemRequest

log = logging.getLogger("voucher.cli")


def _print(obj: Any) -> None:
    print(json.dumps(msgspec.to_builtins(obj), indent=2, default=str))


def _bar(job: dict[str, Any]) -> None:
    done, total = job["generated"], job["requested"]
    width = 40
    filled = int(width * done / max(1, total))
    rate = job.get("rate") or 0.0
    eta = (total - done) / rate if rate else 0.0
    sys.stderr.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,}"
        f"  {rate:,.0f} codes/s  eta {eta:4.1f}s "
    )
    sys.stderr.flush()


def _issue_bar(job: dict[str, Any]) -> None:
    c = job["counts"]
    done, total = c["selected"], c["total"]
    width = 40
    filled = int(width * done / max(1, total))
    rate = job.get("rate") or 0.0
    eta = job.get("eta_s") or 0.0
    sys.stderr.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,} customers"
        f"  assigned {c['assigned']:,}  queued {c['enqueued']:,}"
        f"  skipped {c['skipped_no_consent'] + c['skipped_no_address']:,}"
        f"  {rate:,.0f}/s  eta {eta:4.1f}s "
    )
    sys.stderr.flush()


#: Ray's system setting for its worker processes' nice level (read when Ray starts)
RAY_NICENESS_VAR = "RAY_worker_niceness"
#: Serve's least draining time of a stopping ingress replica (read when Serve starts)
SERVE_DRAIN_VAR = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"


def local_ray_environment() -> None:
    """Environment a Ray started from this process should get (set before ``ray.init``;
    an explicit value in the environment wins).

    Ray starts its worker processes -- the gateway, the shards, every actor -- at nice 15
    by default, beneath Postgres, Redis and anything else on the node at nice 0. On a busy
    node each answer then waits for the scheduler behind them: at 64 connections on 2
    cores, HTTP redemptions ran ~20 % slower and with a longer tail (BENCHMARKS.md). The
    engine's workers are the latency-critical service: they run at the default priority.

    ``FORWARDED_ALLOW_IPS=none``: uvicorn in Serve's own proxy (and in every replica)
    would otherwise take a client's ``X-Forwarded-For`` as its address whenever the
    connection comes from 127.0.0.1; the gateway decides the address itself
    (serve/client_address.py), from the real peer."""
    os.environ.setdefault(RAY_NICENESS_VAR, "0")
    os.environ["FORWARDED_ALLOW_IPS"] = "none"


def _ray_init(settings: Settings, *, attach: bool) -> None:
    import ray

    local_ray_environment()
    address = settings.ray_address or ("auto" if attach else None)
    ray.init(
        address=address,
        namespace=settings.namespace,
        log_to_driver=False,
        include_dashboard=False,
        configure_logging=False,
    )


async def _demo(engine: Any) -> None:
    now = datetime.now(UTC)
    suffix = os.urandom(3).hex()
    c = await engine.create_campaign(
        id=f"demo-{suffix}",
        name="Demo: 15% off, max 20 EUR",
        type="discount",
        currency="EUR",
        discount={"kind": "percent", "value": 15, "max": 2000},
        min_order=1000,
        ends_at=now + timedelta(days=30),
        code={"length": 10, "prefix": "DEMO-", "check_char": True},
    )
    print(f"created campaign {c.id}")
    t0 = time.perf_counter()
    await engine.generate(c.id, 100_000, progress=_bar)
    sys.stderr.write("\n")
    print(f"generated 100,000 codes in {time.perf_counter() - t0:.2f}s")
    await engine.activate(c.id)
    assigned = await engine.assign_many(c.id, [f"customer-{i}" for i in range(100)])
    reqs = [
        RedeemRequest(
            code=a.assignment.code,
            amount=5000 + 100 * i,
            currency="EUR",
            customer_id=a.assignment.customer_id,
            order_id=f"order-{i}",
            idempotency_key=f"demo-{suffix}-{i}",
        )
        for i, a in enumerate(assigned)
        if a.assignment is not None
    ]
    t0 = time.perf_counter()
    outs = await engine.redeem_many(reqs)
    ok = sum(1 for o in outs if o.redemption is not None)
    print(f"redeemed {ok} of {len(reqs)} assigned codes in {1000 * (time.perf_counter() - t0):.1f} ms")
    again = await engine.redeem_many(reqs[:1])
    print(f"replaying an idempotency key returns the first answer: {again[0].redemption.id}")
    second = RedeemRequest(code=reqs[0].code, amount=5000, currency="EUR", customer_id=reqs[0].customer_id)
    out = (await engine.redeem_many([second]))[0]
    print(f"redeeming the same code again: {out.rejection.error if out.rejection else 'ok?!'}")
    _print(await engine.stats(c.id))


def reports_command(settings: Settings, api_url: str | None = None) -> list[str]:
    """The command line that serves the Streamlit reporting app on the HTTP host."""
    import reporting

    app = os.path.join(os.path.dirname(reporting.__file__), "app.py")
    return [
        sys.executable, "-m", "streamlit", "run", app,
        "--server.address", settings.http_host,
        "--server.port", str(settings.reports_port),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--global.developmentMode", "false", "--client.toolbarMode", "minimal",
    ]


def reports_env(settings: Settings, api_url: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["VOUCHER_API_URL"] = api_url or f"http://{settings.http_host}:{settings.http_port}"
    return env


def start_reports(settings: Settings, api_url: str) -> Any:
    """Start the reporting app as a child process next to the API; returns the Popen."""
    import subprocess

    proc = subprocess.Popen(reports_command(settings), env=reports_env(settings, api_url))
    print(f"reports:  http://{settings.http_host}:{settings.reports_port}  (Streamlit; log in "
          "with an analyst, manager or admin user)")
    return proc


def cmd_reports(args: argparse.Namespace, settings: Settings) -> int:
    """Run the reporting app in the foreground against a running API."""
    import subprocess

    cmd = reports_command(settings)
    env = reports_env(settings, args.api_url)
    print(f"reports:  http://{settings.http_host}:{settings.reports_port} -> API {env['VOUCHER_API_URL']}")
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0


async def _demo_data(engine: Any, dsn: str, scale: float, days: int, live_s: float) -> None:
    from ops.demo_data import create_demo_data, run_flash_sale

    made = await create_demo_data(engine, dsn, scale=scale, days=days)
    print(f"demo data: {len(made['campaigns'])} campaigns: {', '.join(made['campaigns'])}")
    if live_s > 0 and made["flash"]:
        print(f"demo data: redeeming flash sale {made['flash']} live for {live_s:.0f}s (Ctrl-C stops)")
        n = await run_flash_sale(engine, made["flash"], live_s)
        print(f"demo data: {n} live flash-sale redemptions")


def _live_flash_thread(engine: Any, dsn: str, stop: threading.Event) -> threading.Thread:
    """``up --demo``: demo data, then the flash sale keeps selling while the engine runs."""

    def run() -> None:
        from ops.demo_data import create_demo_data, run_flash_sale

        async def go() -> None:
            made = await create_demo_data(engine, dsn)
            print(f"demo data: {len(made['campaigns'])} campaigns for the reporting app")
            if made["flash"]:
                await run_flash_sale(engine, made["flash"], 3600.0, stop=stop.is_set)

        try:
            asyncio.run(go())
        except Exception as exc:  # the engine is stopping, or demo data failed: say so
            print(f"demo data stopped: {exc!r}", file=sys.stderr)

    t = threading.Thread(target=run, name="demo-data", daemon=True)
    t.start()
    return t


def bootstrap(settings: Settings, dsn: str) -> None:
    """Create the first admin from configuration (idempotent)."""
    from serve.users import bootstrap_admin

    generated = asyncio.run(bootstrap_admin(settings, dsn))
    if generated:
        print(f"admin:    {settings.admin_email} / {generated}  (generated; shown once)")
    else:
        print(f"admin:    {settings.admin_email}")


def start_http(
    settings: Settings, dsn: str, redis_url: str, replicas: dict[str, int] | None = None
) -> str:
    """Bootstrap the first admin, then deploy the Serve app; returns its base URL."""
    from ray import serve

    from serve.app import APP_NAME, build_app, load_config

    bootstrap(settings, dsn)
    entry = load_config()
    serve.start(http_options={"host": settings.http_host, "port": settings.http_port})
    app_args = {
        **entry.get("args", {}),
        "database_url": dsn,
        "redis_url": redis_url,
        "settings": msgspec.to_builtins(settings),
    }
    if replicas:
        app_args["replicas"] = {**app_args.get("replicas", {}), **replicas}
    serve.run(build_app(app_args), name=APP_NAME, route_prefix=entry.get("route_prefix", "/"))
    return f"http://{settings.http_host}:{settings.http_port}"


def cmd_deploy(args: argparse.Namespace, settings: Settings) -> int:
    """One-shot deployment onto a running Ray cluster (``RAY_ADDRESS`` or ``auto``): apply
    migrations, start the shard actors and the coordinator as detached actors, deploy the
    Serve app, and exit; everything keeps running in the cluster."""
    from actors.client import adopt_stored_topology, start_engine
    from store.migrations import migrate

    if not settings.database_url or not settings.redis_url:
        raise errors.ConfigError(
            "deploy needs VOUCHER_DATABASE_URL and VOUCHER_REDIS_URL: a cluster shares one "
            "Postgres and one Redis, the embedded servers are for one machine"
        )
    if not settings.jwt_secret:
        raise errors.ConfigError(
            "deploy needs VOUCHER_JWT_SECRET: every node must sign and verify with one key"
        )
    dsn, redis_url = settings.database_url, settings.redis_url
    applied = asyncio.run(migrate(dsn))
    print(f"postgres: migrations applied: {applied or 'none (up to date)'}")
    if not os.environ.get("VOUCHER_SHARDS"):
        settings = adopt_stored_topology(settings, dsn)
    _ray_init(settings, attach=True)
    start_engine(settings, dsn, detached=True)
    print(f"engine:   {settings.shards} detached shard actors + coordinator, namespace {settings.namespace!r}")
    from actors.issuance import issuer_handle
    from actors.notifier import start_notifier

    issuer_handle(settings, dsn, redis_url)
    start_notifier(settings, dsn)  # detached, like the engine
    print("notify:   issuer and notification dispatcher (detached)")
    if args.no_http:
        # the Serve app comes from `serve deploy serve/config.cluster.yaml`; the admin
        # must exist either way
        bootstrap(settings, dsn)
    else:
        url = start_http(settings, dsn, redis_url)
        print(f"http:     Serve app deployed ({url} on the head; every node's proxy serves it)")
    return 0


def cmd_reshard(args: argparse.Namespace, settings: Settings) -> int:
    """Move the running engine to ``args.shards`` shards (see ``actors.client.reshard``):
    the new count is stored in Postgres, every old shard is fenced and retired, the new
    shards load their buckets; gateways, the issuer and the notifier follow by themselves.
    The new actors are detached: they outlive this command."""
    from actors.client import reshard
    from ops.servers import start_services

    services = start_services(settings)  # the configured database, or `up`'s embedded one
    try:
        _ray_init(settings, attach=True)
        engine = reshard(settings, services.database_url, args.shards, detached=True)
    finally:
        services.stop()
    print(f"engine:   {engine.n} shards in namespace {settings.namespace!r}")
    return 0


_TERMINATED = threading.Event()


def _on_sigterm(signum: int, frame: Any) -> None:
    # Shutdown runs once: a second SIGTERM (a supervisor may repeat it) must not cut it
    # short. Ctrl-C still can.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _TERMINATED.set()
    raise KeyboardInterrupt("SIGTERM")


def _stop_if_terminated() -> None:
    """Stop if a SIGTERM came: its KeyboardInterrupt can land inside a callback whose
    errors Python ignores (an import lock's, a finaliser's) and be lost, the flag is not."""
    if _TERMINATED.is_set():
        raise KeyboardInterrupt("SIGTERM")


def stop_on_sigterm() -> None:
    """SIGTERM (``kill``, systemd, Kubernetes) stops ``up`` exactly as Ctrl-C does.

    Call it again after ``ray.init``: connecting a driver installs Ray's native failure
    signal handler (absl's) for SIGTERM too, which prints "SIGTERM received ... PC: @ ..."
    and aborts the process -- no ``finally`` runs, the embedded servers are left behind.
    Python's handler replaces it; the native one keeps SIGSEGV, SIGABRT and the like."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from actors.client import adopt_stored_topology, start_engine
    from ops.servers import start_services
    from store.migrations import migrate

    stop_on_sigterm()
    try:
        services = start_services(settings)  # stops what it started when interrupted
    except KeyboardInterrupt:
        print("stopped during start-up")
        return 0
    run = _Running(services)
    try:
        applied = asyncio.run(migrate(services.database_url))
        print(f"postgres: {services.database_url}" + (f" (applied {applied})" if applied else ""))
        print(f"redis:    {services.redis_url}")
        if settings.serve_mode == "haproxy":
            # Must be in the environment before Ray starts: Serve's proxies read them.
            os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
            os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
        # A gateway replica that stops keeps answering this long so that load balancers
        # in front of the nodes notice (Serve's default: 30 s). `up` is one node whose own
        # proxy is the only balancer: a stop need not wait for anyone.
        os.environ.setdefault(SERVE_DRAIN_VAR, "2")
        if not os.environ.get("VOUCHER_SHARDS"):
            settings = adopt_stored_topology(settings, services.database_url)
        try:
            _ray_init(settings, attach=False)
        except SystemExit as exc:  # Ray's own handler while ray.init runs: sys.exit(15)
            if exc.code != signal.SIGTERM:
                raise
            _TERMINATED.set()
            raise KeyboardInterrupt("SIGTERM") from None
        stop_on_sigterm()
        _stop_if_terminated()
        run.engine = engine = start_engine(settings, services.database_url)
        print(
            f"engine:   {settings.shards} shard actors + coordinator in Ray namespace "
            f"{settings.namespace!r}, ack mode {settings.ack_mode}"
        )
        print("          attach with `voucher-engine stats|generate|redeem ...` from another shell")
        _stop_if_terminated()
        if not args.no_http:
            run.http = True
            url = start_http(settings, services.database_url, services.redis_url)
            print(f"http:     {url}  (OpenAPI docs at {url}/docs, Serve mode {settings.serve_mode})")
            if not args.no_reports:
                run.reports = start_reports(settings, url)
        _stop_if_terminated()
        run.sinks, run.workers = start_delivery_pipeline(
            settings, services.database_url, services.redis_url
        )
        _stop_if_terminated()
        from actors.issuance import issuer_handle
        from actors.notifier import start_notifier

        issuer_handle(settings, services.database_url, services.redis_url)
        # Admin emails go where voucher emails go: the configured SMTP server, or the sink.
        notify_settings = settings
        if not settings.smtp_url and run.sinks is not None:
            notify_settings = msgspec.structs.replace(settings, smtp_url=run.sinks.urls["smtp"])
        start_notifier(notify_settings, services.database_url)
        print(
            "notify:   dispatcher running (email "
            + (f"via {notify_settings.smtp_url}" if notify_settings.smtp_url else "off: no VOUCHER_SMTP_URL")
            + ", signed webhooks)"
        )
        _stop_if_terminated()
        if args.demo:
            asyncio.run(_demo(engine))
            if args.exit:
                asyncio.run(_demo_data(engine, services.database_url, 1.0, 14, 0.0))
            else:
                _live_flash_thread(engine, services.database_url, run.demo_stop)
        if args.exit:
            return 0
        print("running; Ctrl-C or SIGTERM stops the engine and the embedded servers", flush=True)
        while not _TERMINATED.wait(1.0):  # Ctrl-C interrupts the wait
            pass
        raise KeyboardInterrupt("SIGTERM")
    except KeyboardInterrupt:
        print(f"stopping ({'SIGTERM' if _TERMINATED.is_set() else 'interrupted'})", flush=True)
        return 0
    finally:
        run.stop()


class _Running:
    """What ``up`` started, and how it stops: first the HTTP API (no new requests; Serve
    lets the ones in flight finish), then every shard's group commit is flushed, then the
    workers, Ray, the sinks and the embedded servers."""

    HTTP_STOP_S = 20.0
    FLUSH_S = 10.0

    def __init__(self, services: Any) -> None:
        self.services = services
        self.engine: Any = None
        self.http = False
        self.reports: Any = None
        self.sinks: Any = None
        self.workers: Any = None
        self.demo_stop = threading.Event()

    def stop(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        t0 = time.monotonic()
        self.demo_stop.set()
        try:
            self._stop_ray_side()
        finally:
            if self.sinks is not None:
                self.sinks.stop()
            self.services.stop()
        print(f"stopped in {time.monotonic() - t0:.1f}s", flush=True)

    def _stop_ray_side(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        try:
            if self.http:
                _bounded("stopping the HTTP API", self.HTTP_STOP_S, _stop_serve)
            if self.engine is not None:
                _bounded(
                    "flushing the shards' group commits",
                    self.FLUSH_S,
                    lambda: _sync_run(self.engine.flush()),
                )
            if self.workers is not None:
                self.workers.stop(timeout_s=10.0)
            if self.reports is not None:
                self.reports.terminate()
                try:
                    self.reports.wait(10)
                except Exception:
                    self.reports.kill()
        finally:
            ray.shutdown()


def _stop_serve() -> None:
    from ray import serve

    serve.shutdown()


def _sync_run(coro: Any) -> None:
    asyncio.run(coro)


def _bounded(what: str, timeout_s: float, fn: Any) -> None:
    """Run ``fn`` in a helper thread for at most ``timeout_s``; a step that fails or hangs
    is reported and the shutdown goes on (Ray's shutdown ends whatever is left)."""
    failed: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:
            failed.append(exc)

    t0 = time.monotonic()
    t = threading.Thread(target=target, name=what, daemon=True)
    t.start()
    t.join(timeout_s)
    log.info("%s took %.1fs", what, time.monotonic() - t0)
    if t.is_alive():
        print(f"{what}: not done after {timeout_s:.0f}s; going on", file=sys.stderr, flush=True)
    elif failed:
        print(f"{what} failed: {failed[0]!r}", file=sys.stderr, flush=True)


def start_delivery_pipeline(settings: Settings, dsn: str, redis_url: str) -> tuple[Any, Any]:
    """The embedded sinks (for every channel without a configured provider) and the
    delivery workers (``VOUCHER_DELIVERY_WORKERS``). Returns (sinks or None, handles or None)."""
    from pathlib import Path

    from actors.delivery import provider_urls, start_delivery
    from actors.outbound import allowing
    from ops.sinks import Sinks

    sinks = None
    if not (settings.smtp_url and settings.sms_webhook_url and settings.push_webhook_url):
        outbox = Path(settings.data_dir) / "outbox"
        sinks = Sinks(outbox, keep_in_memory=False).start()
        print(
            f"sinks:    SMTP {sinks.urls['smtp']}, webhooks {sinks.urls['page']}/sms|/push; "
            f"outbox {outbox} (page {sinks.urls['page']}/, `voucher-engine outbox`)"
        )
        # the webhook sink listens on 127.0.0.1: allowed by its exact address, nothing more
        settings = allowing(settings, [sinks.urls["page"]])
    urls = provider_urls(settings, sinks.urls if sinks else None)
    workers = None
    if settings.delivery_workers:
        workers = start_delivery(settings, dsn, redis_url, urls=urls)
        print(f"delivery: {settings.delivery_workers} workers on the voucher:delivery:* streams")
    return sinks, workers


def cmd_outbox(args: argparse.Namespace, settings: Settings) -> int:
    """What the embedded sinks received (newest last), or one message in full."""
    from pathlib import Path

    from ops.sinks import outbox_rows

    root = Path(args.dir or Path(settings.data_dir) / "outbox")
    if args.show:
        for sub, ext in (("email", "eml"), ("sms", "json"), ("push", "json")):
            f = root / sub / f"{args.show}.{ext}"
            if f.exists():
                sys.stdout.write(f.read_bytes().decode("utf-8", "replace"))
                return 0
        print(f"error: no message {args.show!r} in {root}", file=sys.stderr)
        return 2
    rows = outbox_rows(root, args.limit)
    for r in rows:
        print(f"{r['at']:.3f}  {r['channel']:5}  {r['status']:18}  {r['to']:30}  {r.get('subject') or ''}  {r['key']}")
    print(f"{len(rows)} receipt(s) shown from {root / 'index.jsonl'}", file=sys.stderr)
    return 0


async def _attached(args: argparse.Namespace, settings: Settings) -> Any:
    from actors.client import attach_engine

    engine = attach_engine(settings)
    c = args.command
    if c == "create":
        discount = None
        if args.percent is not None:
            discount = {"kind": "percent", "value": args.percent, "max": args.max}
        elif args.amount_off is not None:
            discount = {"kind": "amount", "value": args.amount_off, "max": args.max}
        limits = {"total": args.limit, "per_customer": args.per_customer}
        return await engine.create_campaign(
            id=args.id,
            name=args.name,
            type=args.type,
            currency=args.currency,
            discount=discount,
            gift_balance=args.gift_balance,
            limits=limits,
            shared_code=args.shared_code,
            ends_at=datetime.now(UTC) + timedelta(days=args.days),
            code={"length": args.length, "prefix": args.prefix, "check_char": args.check_char},
        )
    if c == "generate":
        job = await engine.generate(args.campaign, args.count, progress=_bar)
        sys.stderr.write("\n")
        return job
    if c in ("activate", "pause", "end"):
        return await engine.transition(args.campaign, c)
    if c == "assign":
        return await engine.assign(args.campaign, args.customer)
    if c in ("validate", "redeem"):
        req = RedeemRequest(
            code=args.code,
            amount=args.amount,
            currency=args.currency,
            customer_id=args.customer,
            order_id=args.order,
            idempotency_key=args.idempotency_key,
        )
        return await (engine.validate(req) if c == "validate" else engine.redeem(req))
    if c == "rollback":
        return await engine.rollback(args.redemption)
    if c == "issue":
        from actors.issuance import issue, issuer_handle

        if not settings.database_url or not settings.redis_url:
            import ray

            handle = ray.get_actor("issuer", namespace=settings.namespace)
        else:
            handle = issuer_handle(settings, settings.database_url, settings.redis_url)
        selection: dict[str, Any] = (
            {"customer_ids": args.customer}
            if args.customer
            else {"tag": args.tag}
            if args.tag
            else {"all": True}
        )
        job = await issue(handle, args.campaign, selection, args.channel or ["email"], _issue_bar)
        sys.stderr.write("\n")
        if job["state"] != "done":
            raise errors.Unavailable(f"issuance job {job['id']} failed: {job['error']}")
        return job
    if c == "stats":
        return await engine.stats(args.campaign)
    if c == "campaigns":
        return await engine.campaigns()
    if c == "voucher":
        return await engine.voucher(args.code)
    if c == "demo-data":
        from ops.servers import start_services

        # the configured database, or the embedded one `up` runs in the same data dir
        # (adopted, not restarted; stop() leaves a server it did not start alone)
        services = start_services(settings)
        try:
            await _demo_data(engine, services.database_url, args.scale, args.days, args.live)
        finally:
            services.stop()
        return {"ok": True}
    raise errors.InvalidInput(f"unknown command {c}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voucher-engine", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the engine and stay in the foreground")
    up.add_argument("--demo", action="store_true", help="create a demo campaign and use it")
    up.add_argument("--exit", action="store_true", help="stop after start-up (and the demo)")
    up.add_argument("--no-http", action="store_true", help="do not start the HTTP API")
    up.add_argument(
        "--no-reports", action="store_true", help="do not start the Streamlit reporting app"
    )
    dep = sub.add_parser(
        "deploy", help="deploy onto a running Ray cluster (external Postgres/Redis) and exit"
    )
    dep.add_argument("--no-http", action="store_true", help="do not deploy the HTTP API")
    rs = sub.add_parser(
        "reshard", help="change the running engine's shard count (fences every old shard)"
    )
    rs.add_argument("shards", type=int, help="the new number of shard actors (1..256)")
    cr = sub.add_parser("create", help="create a campaign")
    cr.add_argument("name")
    cr.add_argument("--id")
    cr.add_argument("--type", default="discount")
    cr.add_argument("--currency", default="EUR")
    cr.add_argument("--percent", type=int)
    cr.add_argument("--amount-off", type=int)
    cr.add_argument("--max", type=int)
    cr.add_argument("--gift-balance", type=int)
    cr.add_argument("--shared-code")
    cr.add_argument("--limit", type=int)
    cr.add_argument("--per-customer", type=int)
    cr.add_argument("--days", type=int, default=30)
    cr.add_argument("--length", type=int, default=10)
    cr.add_argument("--prefix", default="")
    cr.add_argument("--check-char", action="store_true")
    g = sub.add_parser("generate", help="generate codes into a campaign's bank")
    g.add_argument("campaign")
    g.add_argument("count", type=int)
    for name in ("activate", "pause", "end", "stats"):
        sub.add_parser(name).add_argument("campaign")
    sub.add_parser("campaigns")
    a = sub.add_parser("assign")
    a.add_argument("campaign")
    a.add_argument("customer")
    for name in ("validate", "redeem"):
        r = sub.add_parser(name)
        r.add_argument("code")
        r.add_argument("--amount", type=int, required=True)
        r.add_argument("--currency", default="EUR")
        r.add_argument("--customer")
        r.add_argument("--order")
        r.add_argument("--idempotency-key")
    iss = sub.add_parser("issue", help="give selected customers a code each and queue messages")
    iss.add_argument("campaign")
    who = iss.add_mutually_exclusive_group(required=True)
    who.add_argument("--tag", help="customers with this segment tag")
    who.add_argument("--all", action="store_true", help="every customer")
    who.add_argument("--customer", action="append", help="a customer id (repeatable)")
    iss.add_argument(
        "--channel", action="append", choices=["email", "sms", "push"], help="repeatable; default email"
    )
    sub.add_parser("rollback").add_argument("redemption")
    sub.add_parser("voucher").add_argument("code")
    ob = sub.add_parser("outbox", help="list what the embedded SMTP/webhook sinks received")
    ob.add_argument("--limit", type=int, default=50)
    ob.add_argument("--show", metavar="MESSAGE_ID", help="print one received message")
    ob.add_argument("--dir", help="outbox directory (default: <data dir>/outbox)")
    rp = sub.add_parser("reports", help="run the Streamlit reporting app against a running API")
    rp.add_argument("--api-url", help="base URL of the HTTP API (default: VOUCHER_HTTP_HOST/PORT)")
    dd = sub.add_parser(
        "demo-data", help="create demo campaigns with two weeks of redemptions (additive)"
    )
    dd.add_argument("--scale", type=float, default=1.0, help="multiply the volumes (default 1)")
    dd.add_argument("--days", type=int, default=14, help="days of history (default 14)")
    dd.add_argument(
        "--live", type=float, default=0.0, metavar="SECONDS",
        help="then keep redeeming the flash sale for the live view this long",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.command == "up":
            return cmd_up(args, settings)
        if args.command == "deploy":
            return cmd_deploy(args, settings)
        if args.command == "reshard":
            return cmd_reshard(args, settings)
        if args.command == "outbox":
            return cmd_outbox(args, settings)
        if args.command == "reports":
            return cmd_reports(args, settings)
        _ray_init(settings, attach=True)
        _print(asyncio.run(_attached(args, settings)))
        return 0
    except errors.VoucherError as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(f"error: cannot reach the engine ({exc}); is `voucher-engine up` running?", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
