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
import logging
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from engine import errors
from engine.settings import Settings
from engine.shard_state import RedeemRequest
from ops.console import generation_bar, issuance_bar, print_json
from ops.start import bootstrap, ray_init, reports_command, reports_env, start_http

log = logging.getLogger("voucher.cli")





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
    if not Settings.given("shards"):
        settings = adopt_stored_topology(settings, dsn)
    ray_init(settings, attach=True)
    start_engine(settings, dsn, detached=True)
    print(f"engine:   {settings.shards} detached shard actors + coordinator, namespace {settings.namespace!r}")
    from actors.issuance import issuer_handle
    from actors.notifier import start_notifier

    issuer_handle(settings, dsn, redis_url)
    start_notifier(settings, dsn)  # detached, like the engine
    print("notify:   issuer and notification dispatcher (detached)")
    from actors.webhooks import start_webhooks

    start_webhooks(settings, dsn)  # detached, like the engine
    print("webhooks: shop webhook dispatcher (detached)")
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
        ray_init(settings, attach=True)
        engine = reshard(settings, services.database_url, args.shards, detached=True)
    finally:
        services.stop()
    print(f"engine:   {engine.n} shards in namespace {settings.namespace!r}")
    return 0

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
        job = await engine.generate(args.campaign, args.count, progress=generation_bar)
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
        job = await issue(handle, args.campaign, selection, args.channel or ["email"], issuance_bar)
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
            from ops.demo_data import demo_data

            await demo_data(engine, services.database_url, args.scale, args.days, args.live)
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
            from ops.up import cmd_up

            return cmd_up(args, settings)
        if args.command == "deploy":
            return cmd_deploy(args, settings)
        if args.command == "reshard":
            return cmd_reshard(args, settings)
        if args.command == "outbox":
            return cmd_outbox(args, settings)
        if args.command == "reports":
            return cmd_reports(args, settings)
        ray_init(settings, attach=True)
        print_json(asyncio.run(_attached(args, settings)))
        return 0
    except errors.VoucherError as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(f"error: cannot reach the engine ({exc}); is `voucher-engine up` running?", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
