"""``voucher-engine up``: the whole engine in the foreground on one machine, and how it
stops (Ctrl-C or SIGTERM: the HTTP API first, then the shards' group commits, the
workers, Ray, the sinks and the embedded servers)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import msgspec

from engine.settings import Settings
from ops.start import (
    SERVE_DRAIN_VAR,
    ray_init,
    start_delivery_pipeline,
    start_http,
    start_reports,
)

log = logging.getLogger("voucher.cli")


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
    from ops.demo_data import demo_campaign, demo_data, live_flash_thread
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
        if not Settings.given("shards"):
            settings = adopt_stored_topology(settings, services.database_url)
        try:
            ray_init(settings, attach=False)
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
        from actors.webhooks import start_webhooks

        start_webhooks(settings, services.database_url)
        print("webhooks: shop webhook dispatcher running (signed, retried; docs/webhooks.md)")
        _stop_if_terminated()
        if args.demo:
            asyncio.run(demo_campaign(engine))
            if args.exit:
                asyncio.run(demo_data(engine, services.database_url, 1.0, 14, 0.0))
            else:
                live_flash_thread(engine, services.database_url, run.demo_stop)
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

