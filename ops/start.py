"""Starting the engine's parts from one process: the Ray environment, the first admin,
the HTTP API (Serve), the reporting app and the delivery pipeline. ``voucher-engine up``,
``deploy``, the tests and the benchmarks start the engine through these."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import msgspec

from engine.settings import Settings

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


def ray_init(settings: Settings, *, attach: bool) -> None:
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
    # The app reads its settings (Settings.from_env) from the environment it inherits.
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

