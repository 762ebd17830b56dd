"""Readiness tells the truth: a frozen Postgres (every server process SIGSTOPped) makes the
engine unready within seconds, and a redemption caught in the freeze shows its shard's
group commit as stalled; once Postgres runs again the engine is ready by itself. Valkey
going away leaves it ready and the health view says Valkey (and delivery) are degraded.
Runs on a Postgres and Valkey of its own, with the probe the gateway uses
(``serve/health.py``) over a private engine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray

from actors.calls import call
from actors.client import COORDINATOR, shard_name, start_engine
from engine.settings import Settings
from engine.shard_state import RedeemRequest
from ops.servers import Services, embedded_for_tests
from serve.health import HealthProbe, Report
from serve.ratelimit import RateLimiter
from store.migrations import migrate
from tests.engine_support import later, uid

pytestmark = pytest.mark.fault


def _postgres_processes(svc: Services) -> list[psutil.Process]:
    assert svc.data_dir is not None
    pid = int((svc.data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
    postmaster = psutil.Process(pid)
    return [postmaster, *postmaster.children(recursive=True)]


def _signal(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, sig)


async def _until(probe: HealthProbe, what: Callable[[Report], bool], within_s: float) -> tuple[Report, float]:
    t0 = time.monotonic()
    while True:
        report = await probe.report()
        if what(report):
            return report, time.monotonic() - t0
        assert time.monotonic() - t0 < within_s, repr(report.shards)
        await asyncio.sleep(0.1)


def _stop_valkey(svc: Services) -> None:
    for entry in list(svc._stoppers):
        if entry[0] == "valkey":
            svc._stoppers.remove(entry)
            entry[1]()


async def test_readiness_follows_postgres_not_valkey(tmp_path: Path, ray_cluster: Any) -> None:
    svc = await asyncio.to_thread(embedded_for_tests, tmp_path)
    settings = Settings(namespace=uid("ready-ns"), shards=1, batch_window_ms=1.0)
    frozen: list[psutil.Process] = []
    limiter = RateLimiter(svc.redis_url)
    probe: HealthProbe | None = None
    try:
        await migrate(svc.database_url)
        engine = await asyncio.to_thread(start_engine, settings, svc.database_url)
        c = await engine.create_campaign(
            name="ready", type="discount", currency="EUR",
            discount={"kind": "amount", "value": 100}, ends_at=later(),
        )
        await engine.activate(c.id)
        codes = [uid("READY").upper() for _ in range(2)]
        assert await call(engine.shards[0].add_codes.remote(c.id, codes)) == 2
        probe = HealthProbe(
            engine=engine, dsn=svc.database_url, valkey_ping=limiter.ping, timeout_s=1.0, cache_s=0.0
        )
        report = await probe.report()
        assert report.ready and report.status == "ok", report.body()
        assert set(report.components) == {"postgres", "valkey", "shards", "coordinator", "delivery"}

        frozen = _postgres_processes(svc)
        _signal(frozen, signal.SIGSTOP)
        report, took = await _until(probe, lambda r: not r.ready, 5.0)
        assert report.components["postgres"].status == "down", report.body()
        assert report.not_ready() == ["postgres"]
        print(f"unready {took:.2f}s after the freeze")

        # a redemption caught in the freeze (its key claim, then its commit, wait on the
        # database): its shard shows as stalled
        req = RedeemRequest(code=codes[0], amount=5000, currency="EUR", idempotency_key=uid("k"))
        caught = asyncio.ensure_future(engine.redeem(req))
        report, took = await _until(probe, lambda r: r.components["shards"].status == "down", 8.0)
        assert "stalled" in report.shards[0]["reason"], report.body()
        print(f"shard stalled {took:.2f}s after the caught redemption")
        assert not caught.done()

        _signal(frozen, signal.SIGCONT)
        frozen = []
        report, took = await _until(probe, lambda r: r.status == "ok", 10.0)
        print(f"ready {took:.2f}s after the thaw")
        assert (await asyncio.wait_for(caught, 30)).code == codes[0]

        await asyncio.to_thread(_stop_valkey, svc)
        report, _ = await _until(probe, lambda r: r.components["valkey"].status != "ok", 5.0)
        assert report.ready and report.status == "degraded", report.body()
        assert report.components["valkey"].status == "degraded"
        assert report.components["delivery"].status == "degraded"
        assert report.components["postgres"].status == "ok"
        # and checkout still works: the shards never needed Valkey
        again = RedeemRequest(code=codes[1], amount=5000, currency="EUR", idempotency_key=uid("k"))
        assert (await engine.redeem(again)).code == codes[1]
    finally:
        _signal(frozen, signal.SIGCONT)
        if probe is not None:
            await probe.close()
        await limiter.aclose()
        for name in [COORDINATOR] + [shard_name(i) for i in range(settings.shards)]:
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(name, namespace=settings.namespace), no_restart=True)
        await asyncio.to_thread(svc.stop)
