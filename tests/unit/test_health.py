"""The readiness rules of ``serve/health.py`` and ``actors/health.py`` without Ray or a
database: what makes the engine unready (Postgres, a shard, the coordinator), what only
degrades it (Valkey), and that a hanging dependency is answered within the probe's bound."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from actors.health import InFlight, shard_health
from engine import errors
from serve.health import Component, HealthProbe
from tests.actor_fakes import RemoteMethod


class _Shard:
    def __init__(self, state: dict[str, Any] | None = None, hang: bool = False) -> None:
        async def health() -> dict[str, Any]:
            if hang:
                await asyncio.sleep(3600)
            return state or {"status": "ok", "reason": None}

        self.health = RemoteMethod(health)


class _Coordinator:
    def __init__(self, hang: bool = False) -> None:
        async def shard_count() -> int:
            if hang:
                await asyncio.sleep(3600)
            return 2

        self.shard_count = RemoteMethod(shard_count)


class _Engine:
    def __init__(self, shards: list[_Shard], coordinator: _Coordinator | None = None) -> None:
        self.shards = shards
        self.coordinator = coordinator or _Coordinator()
        self.refreshed = 0

    async def refresh(self) -> bool:
        self.refreshed += 1
        return False


async def _pong() -> bool:
    return True


async def _refused() -> bool:
    raise ConnectionError("Connection refused")


def _probe(engine: _Engine, *, postgres_ok: bool = True, valkey: Any = _pong) -> HealthProbe:
    probe = HealthProbe(engine=engine, dsn="postgresql://unused", valkey_ping=valkey, timeout_s=0.2, cache_s=0.0)

    async def postgres() -> Component:
        if not postgres_ok:
            await asyncio.sleep(3600)  # frozen: never answers
        return Component("ok")

    probe._postgres = postgres  # type: ignore[method-assign]
    return probe


async def test_all_well_is_ready_and_ok() -> None:
    report = await _probe(_Engine([_Shard(), _Shard()])).report()
    assert report.ready and report.status == "ok"
    assert [s["shard"] for s in report.shards] == [0, 1]


async def test_valkey_away_degrades_but_stays_ready() -> None:
    report = await _probe(_Engine([_Shard()]), valkey=_refused).report()
    assert report.ready and report.status == "degraded"
    assert report.components["valkey"].status == "degraded"
    assert "ConnectionError" in (report.components["valkey"].reason or "")
    assert report.components["delivery"].status == "degraded"


async def test_frozen_postgres_is_down_within_the_bound() -> None:
    t0 = time.monotonic()
    report = await _probe(_Engine([_Shard()]), postgres_ok=False).report()
    assert time.monotonic() - t0 < 1.0
    assert not report.ready and report.status == "down"
    assert report.not_ready() == ["postgres"]
    assert report.components["valkey"].status == "ok"


@pytest.mark.parametrize(
    "shard",
    [
        _Shard({"status": "down", "reason": "loading"}),
        _Shard(hang=True),
    ],
)
async def test_a_shard_down_or_silent_makes_it_unready(shard: _Shard) -> None:
    engine = _Engine([_Shard(), shard])
    t0 = time.monotonic()
    report = await _probe(engine).report()
    assert time.monotonic() - t0 < 1.0
    assert report.not_ready() == ["shards"]
    assert report.shards[1]["status"] == "down"
    assert "1 of 2 shards down" in (report.components["shards"].reason or "")


async def test_unreachable_coordinator_makes_it_unready() -> None:
    report = await _probe(_Engine([_Shard()], _Coordinator(hang=True))).report()
    assert report.not_ready() == ["coordinator"]


async def test_reports_are_shared_within_the_cache_window() -> None:
    calls = 0

    async def counted() -> bool:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return True

    probe = _probe(_Engine([_Shard()]), valkey=counted)
    probe.cache_s = 10.0
    await asyncio.gather(*[probe.report() for _ in range(20)])
    await probe.report()
    assert calls == 1


# --- a shard's own view -------------------------------------------------------------------


class _Writer:
    def __init__(self, *, waiting: int = 0, failed: bool = False) -> None:
        self.waiting = waiting
        self.failed = failed
        self.batches = 7


class _Metrics:
    def __init__(self, idle_s: float, ok: bool = True) -> None:
        self.last_commit_at = time.monotonic() - idle_s
        self.last_commit_ok = ok


class _State:
    def __init__(self, pending: int) -> None:
        self.events = [object()] * pending
        self.codes: dict[str, Any] = {}


class _Core:
    def __init__(
        self,
        *,
        writer: _Writer | None = None,
        idle_s: float = 0.0,
        pending: int = 0,
        stopped: errors.Unavailable | None = None,
        load_error: errors.VoucherError | None = None,
        commit_ok: bool = True,
    ) -> None:
        self.writer = writer or _Writer()
        self.metrics = _Metrics(idle_s, commit_ok)
        self.state = _State(pending)
        self.stopped = stopped
        self.load_error = load_error

    async def ready(self) -> None:
        if self.load_error is not None:
            raise self.load_error


async def test_an_idle_shard_is_ok_however_long_ago_it_wrote() -> None:
    assert (await shard_health(_Core(idle_s=3600)))["status"] == "ok"


async def test_a_writer_stuck_with_waiters_is_stalled() -> None:
    state = await shard_health(_Core(writer=_Writer(waiting=3), idle_s=10, pending=5))
    assert state["status"] == "down" and "stalled" in state["reason"]
    assert state["commit_waiters"] == 3 and state["pending_events"] == 5


async def test_a_busy_writer_that_commits_is_ok() -> None:
    assert (await shard_health(_Core(writer=_Writer(waiting=3), idle_s=0.01, pending=5)))["status"] == "ok"


async def test_stopped_loading_failed_and_retrying_shards() -> None:
    stopped = await shard_health(_Core(stopped=errors.Fenced("shard 0 was fenced; retry")))
    assert stopped == {"status": "down", "reason": "shard 0 was fenced; retry"}
    loading = await shard_health(_Core(load_error=errors.Unavailable("shard 0 is not loaded yet")))
    assert loading["status"] == "down" and "not loaded" in loading["reason"]
    failed = await shard_health(_Core(writer=_Writer(failed=True)))
    assert failed["status"] == "down"
    retrying = await shard_health(_Core(commit_ok=False))
    assert retrying["status"] == "degraded"


async def test_a_decision_batch_waiting_too_long_is_stalled() -> None:
    inflight = InFlight()
    with inflight.track():
        inflight._started = {k: t - 10 for k, t in inflight._started.items()}
        state = await shard_health(_Core(), inflight)
        assert state["status"] == "down" and "stalled" in state["reason"]
        assert state["batches_in_flight"] == 1
    assert len(inflight) == 0 and inflight.oldest_s() == 0.0
    assert (await shard_health(_Core(), inflight))["status"] == "ok"
