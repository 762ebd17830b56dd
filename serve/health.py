"""Readiness and health: can checkout be served, and which dependency is not well.

Checkout (validations, redemptions, reservations) needs every shard loaded with its group
commit moving (``actors/health.py``), Postgres answering (every durable answer waits for a
commit), and the coordinator reachable (callers look the topology up through it after a
shard restart or a reshard). It does not need Valkey: rate limits fall back to their
documented behaviour without it (``serve/ratelimit.py``), an API key whose revocation flag
cannot be read is checked in Postgres instead, and idempotency keys live in the shards and
Postgres. So Valkey away makes the engine *degraded*, never unready; the delivery queues,
which live in Valkey, wait for it.

Each component is ``ok``, ``degraded`` (serving, with a reason) or ``down``. Every probe
runs under its own time bound (``timeout_s``): a frozen dependency shows as ``down``
within that bound, never as a hang. A report is made at most once per ``cache_s`` per
gateway replica and concurrent callers share it, so probing cannot be turned into load
on the dependencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from actors.calls import call
from store.health import Probe

OK, DEGRADED, DOWN = "ok", "degraded", "down"
# what checkout cannot do without
REQUIRED = ("postgres", "shards", "coordinator")


class Component(msgspec.Struct, omit_defaults=True):
    status: str
    reason: str | None = None
    seconds: float = 0.0


class Report(msgspec.Struct):
    ready: bool
    status: str  # ok | degraded | down (= not ready)
    components: dict[str, Component]
    shards: list[dict[str, Any]]

    def not_ready(self) -> list[str]:
        return [n for n in REQUIRED if self.components[n].status == DOWN]

    def body(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "ready": self.ready,
            "components": msgspec.to_builtins(self.components),
            "shards": self.shards,
        }


def _why(exc: BaseException) -> str:
    """A reason that names the failure without leaking addresses or credentials."""
    if isinstance(exc, TimeoutError):
        return "no answer within the probe's time bound"
    message = getattr(exc, "message", None)  # engine errors carry a safe message
    if isinstance(message, str):
        return message[:200]
    return type(exc).__name__


class HealthProbe:
    def __init__(
        self,
        *,
        engine: Any,
        dsn: str,
        valkey_ping: Callable[[], Awaitable[Any]],
        timeout_s: float = 1.5,
        cache_s: float = 1.0,
    ) -> None:
        self.engine = engine
        self.dsn = dsn
        self.valkey_ping = valkey_ping
        self.timeout_s = timeout_s
        self.cache_s = cache_s
        self._probe = Probe(dsn, timeout_s)
        self._last: Report | None = None
        self._last_at = 0.0
        self._running: asyncio.Future[Report] | None = None

    async def report(self) -> Report:
        if self._last is not None and time.monotonic() - self._last_at < self.cache_s:
            return self._last
        if self._running is None:
            self._running = asyncio.ensure_future(self._evaluate())
        running = self._running
        try:
            report = await asyncio.shield(running)
        finally:
            if self._running is running and running.done():
                self._running = None
        self._last, self._last_at = report, time.monotonic()
        return report

    async def close(self) -> None:
        self._probe.close()

    async def _evaluate(self) -> Report:
        pg, vk, coordinator, (shards, shard_list) = await asyncio.gather(
            self._timed(self._postgres), self._timed(self._valkey),
            self._timed(self._coordinator), self._shards(),
        )
        if vk.status == OK:
            delivery = Component(OK)
        else:
            delivery = Component(DEGRADED, "its queues live in Valkey; messages wait until it is back")
        components = {
            "postgres": pg, "valkey": vk, "shards": shards,
            "coordinator": coordinator, "delivery": delivery,
        }
        ready = all(components[n].status != DOWN for n in REQUIRED)
        if not ready:
            status = DOWN
        elif all(c.status == OK for c in components.values()):
            status = OK
        else:
            status = DEGRADED
        return Report(ready, status, components, shard_list)

    async def _timed(self, probe: Callable[[], Awaitable[Component]]) -> Component:
        t0 = time.perf_counter()
        try:
            result = await asyncio.wait_for(probe(), self.timeout_s)
        except Exception as exc:
            result = Component(DOWN, _why(exc))
        result.seconds = round(time.perf_counter() - t0, 4)
        return result

    async def _postgres(self) -> Component:
        await self._probe.ping()
        return Component(OK)

    async def _valkey(self) -> Component:
        try:
            await self.valkey_ping()
        except Exception as exc:
            return Component(
                DEGRADED,
                f"unreachable ({_why(exc)}): checkout goes on; rate limits use their "
                "fallbacks and the delivery queues wait",
            )
        return Component(OK)

    async def _coordinator(self) -> Component:
        await call(self.engine.coordinator.shard_count.remote())
        return Component(OK)

    async def _refresh(self) -> None:
        """A reshard replaces the shard actors: the next report asks the new ones."""
        with contextlib.suppress(Exception):  # the coordinator's own probe says why
            await asyncio.wait_for(self.engine.refresh(), self.timeout_s)

    async def _shards(self) -> tuple[Component, list[dict[str, Any]]]:
        t0 = time.perf_counter()
        shards = list(self.engine.shards)

        async def one(i: int, shard: Any) -> dict[str, Any]:
            try:
                state = dict(await asyncio.wait_for(call(shard.health.remote()), self.timeout_s))
            except Exception as exc:
                state = {"status": DOWN, "reason": f"unreachable: {_why(exc)}"}
            return {"shard": i, **state}

        states = list(await asyncio.gather(*[one(i, s) for i, s in enumerate(shards)]))
        down = [s for s in states if s["status"] == DOWN]
        slow = [s for s in states if s["status"] == DEGRADED]
        seconds = round(time.perf_counter() - t0, 4)
        if down:
            names = ", ".join(f"{s['shard']} ({s['reason']})" for s in down[:4])
            more = f" and {len(down) - 4} more" if len(down) > 4 else ""
            if any("unreachable" in str(s["reason"]) for s in down):
                await self._refresh()
            return Component(DOWN, f"{len(down)} of {len(states)} shards down: {names}{more}", seconds), states
        if slow:
            return Component(DEGRADED, f"{len(slow)} of {len(states)} shards degraded", seconds), states
        return Component(OK, None, seconds), states
