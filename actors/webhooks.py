"""The shop webhook dispatcher: reads the event stream per endpoint and delivers it.

Each enabled endpoint has a position in the event stream (Postgres, ``webhook_endpoints``).
A round reads the next events after it (``store.webhooks.read_page``), posts each one,
signed (:mod:`engine.webhooks`), and then, in one transaction, logs every attempt,
schedules the failed ones for a retry with exponential backoff and moves the position on.
A dispatcher that dies before that commit sends the round again when it comes back: at
least once, with the event id in the body and the ``Voucher-Event-Id`` header for the
receiver to deduplicate. Retries are rows of their own (``webhook_retries``), so one
failing receiver never holds back the events after the failed one.

The hot path pays nothing: the events of redemptions are the redemptions' own rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import msgspec
import ray
from aiohttp.abc import AbstractResolver, ResolveResult

from actors import outbound
from engine import errors, urls
from engine import webhooks as wh
from engine.settings import Settings
from store import webhooks as store
from store.pools import open_pool

log = logging.getLogger("voucher.webhooks")

_json = msgspec.json.Encoder()
USER_AGENT = "voucher-engine-webhooks/1"
PRUNE_EVERY_S = 60.0
#: how long one endpoint's read of the stream looks on before its round posts what it has
READ_BUDGET_S = 0.5
PRUNE_CHUNK = 10_000


def new_endpoint_id() -> str:
    return "we_" + secrets.token_hex(10)


def body_of(event: dict[str, Any]) -> bytes:
    """What a receiver gets: the event as ``GET /v1/events`` lists it."""
    return _json.encode({"object": "event", **event})


Post = Callable[[str, bytes, dict[str, str]], Awaitable[int]]
"""``post(url, body, headers)``: the receiver's status code; raises when there is none."""


class VettingResolver(AbstractResolver):
    """Name resolution that refuses internal addresses (``engine.urls``, the rule of every
    outgoing request): aiohttp connects only to an address this returned, checked when
    the connection opens, so a name that turns to 127.0.0.1 later gets nothing."""

    def __init__(
        self, allow: tuple[urls.AllowEntry, ...], resolver: outbound.Resolver = outbound.system_resolve
    ) -> None:
        self.allow = allow
        self.resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        target = urls.Target("", "http", urls.normalise_host(host), port)
        addresses = await self.resolver(host, port)
        refused = urls.refusal(target, addresses, self.allow)
        if refused is not None:
            raise refused
        return [
            ResolveResult(
                hostname=host,
                host=str(ip),
                port=port,
                family=socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for ip in addresses
        ]

    async def close(self) -> None:
        return None


class Poster:
    """POSTs deliveries with aiohttp (an eighth of httpx's CPU per request here, which
    matters on the cores checkout uses). Every connection goes through
    :class:`VettingResolver`; an IP literal, which aiohttp never resolves, is checked here.
    Redirects are not followed and proxies from the environment are ignored."""

    def __init__(self, allow: tuple[urls.AllowEntry, ...], timeout_s: float, connections: int) -> None:
        self.allow = allow
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.connections = connections
        self.session: aiohttp.ClientSession | None = None
        self._checked: dict[str, urls.Target] = {}

    def _target(self, url: str) -> urls.Target:
        target = self._checked.get(url)
        if target is None:
            target = urls.parse(url)
            if len(self._checked) > 10_000:
                self._checked.clear()
            self._checked[url] = target
        return target

    async def __call__(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        target = self._target(url)
        if target.literal is not None:
            refused = urls.refusal(target, [target.literal], self.allow)
            if refused is not None:
                raise refused
        if self.session is None:
            connector = aiohttp.TCPConnector(
                resolver=VettingResolver(self.allow),
                use_dns_cache=False,
                limit=self.connections,
                limit_per_host=self.connections,
            )
            self.session = aiohttp.ClientSession(
                connector=connector, timeout=self.timeout, trust_env=False
            )
        async with self.session.post(
            url, data=body, headers=headers, allow_redirects=False
        ) as resp:
            await resp.read()
            return resp.status

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


class Dispatcher:
    """Delivers the event stream to every enabled endpoint. ``clock``, ``rand`` and
    ``post`` are injected (tests); ``post`` defaults to a :class:`Poster`, which checks
    every connection's address against ``VOUCHER_OUTBOUND_ALLOW``."""

    def __init__(
        self,
        dsn: str,
        settings: Settings,
        *,
        post: Post | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.dsn = dsn
        self.settings = settings
        self.pool: asyncpg.Pool | None = None
        self.post = post
        self.clock = clock
        self.rand = rand
        self.rounds = 0
        self._pruned_at = 0.0
        self.sent = 0
        self.failed = 0

    async def open(self) -> None:
        if self.pool is None:
            self.pool = await open_pool(self.dsn, 4, writer=True)
        if self.post is None:
            self.post = Poster(
                outbound.allow_of(self.settings),
                self.settings.webhook_timeout_s,
                4 * self.settings.webhook_concurrency,
            )

    async def close(self) -> None:
        if isinstance(self.post, Poster):
            await self.post.close()
        if self.pool is not None:
            await self.pool.close()

    async def run_forever(self) -> None:
        await self.open()
        while True:
            try:
                busy = await self.step()
            except Exception:
                log.exception("webhook dispatch round failed")
                busy = False
            if not busy:
                await asyncio.sleep(self.settings.webhook_poll_s)

    async def step(self) -> bool:
        """One round over every endpoint and the due retries; whether there was work."""
        await self.open()
        assert self.pool is not None
        endpoints = await store.active_endpoints(self.pool)
        results = await asyncio.gather(*[self.deliver_new(e) for e in endpoints])
        retried = await self.retry_due()
        pruned = await self.prune()
        self.rounds += 1
        return any(results) or retried > 0 or pruned

    async def deliver_new(self, ep: store.Endpoint) -> bool:
        """Deliver the next events after ``ep``'s position; whether more may be waiting."""
        assert self.pool is not None
        s = self.settings
        page = await store.read_page(
            self.pool,
            ep.position,
            types=wh.expand(ep.events),
            limit=s.webhook_batch,
            window=s.webhook_scan_txids,
            budget_s=READ_BUDGET_S,
        )
        if not page.events and page.next == ep.position:
            return False
        gate = asyncio.Semaphore(s.webhook_concurrency)

        async def one(event: dict[str, Any]) -> store.Attempt:
            async with gate:
                return await self.attempt(ep.id, ep.url, ep.secret, event, 1)

        started = time.monotonic()
        attempts = await asyncio.gather(*[one(e) for e in page.events])
        async with self.pool.acquire() as conn:
            await store.record_attempts(conn, attempts, endpoint_id=ep.id, position=page.next)
        await self.pace(len(attempts), time.monotonic() - started)
        return not page.complete

    async def pace(self, sent: int, took_s: float) -> None:
        """Hold the delivery rate to ``VOUCHER_WEBHOOK_MAX_RATE`` (when set): a round of
        ``sent`` deliveries that took ``took_s`` waits out the rest of its share."""
        rate = self.settings.webhook_max_rate
        if rate > 0 and sent:
            await asyncio.sleep(max(0.0, sent / rate - took_s))

    async def prune(self) -> bool:
        """Now and then, one chunk of the delivery log older than its retention; whether a
        full chunk went (then more may be waiting)."""
        assert self.pool is not None
        now = self.clock()
        if now - self._pruned_at < PRUNE_EVERY_S:
            return False
        cutoff = datetime.fromtimestamp(now, UTC) - timedelta(days=self.settings.webhook_log_days)
        n = await store.prune_log(self.pool, cutoff, PRUNE_CHUNK)
        if n < PRUNE_CHUNK:
            self._pruned_at = now
        return n >= PRUNE_CHUNK

    async def retry_due(self) -> int:
        """Attempt the retries that are due; returns how many."""
        assert self.pool is not None
        now = datetime.fromtimestamp(self.clock(), UTC)
        due = await store.due_retries(self.pool, now, self.settings.webhook_batch)
        if not due:
            return 0
        gate = asyncio.Semaphore(self.settings.webhook_concurrency)
        hooks: dict[str, tuple[str, str, bool] | None] = {}
        for endpoint_id, _, _ in due:
            if endpoint_id not in hooks:
                hooks[endpoint_id] = await store.endpoint_secret(self.pool, endpoint_id)

        async def one(endpoint_id: str, event_id: str, attempts: int) -> store.Attempt | None:
            hook = hooks[endpoint_id]
            if hook is None:
                return None  # endpoint deleted: its retries went with it
            assert self.pool is not None
            event = await store.get_event(self.pool, event_id)
            if event is None:
                return self._gone(endpoint_id, event_id, attempts + 1)
            async with gate:
                return await self.attempt(endpoint_id, hook[0], hook[1], event, attempts + 1)

        results = await asyncio.gather(*[one(*d) for d in due])
        attempts = [a for a in results if a is not None]
        async with self.pool.acquire() as conn:
            await store.record_attempts(conn, attempts)
        return len(due)

    def _gone(self, endpoint_id: str, event_id: str, attempt: int) -> store.Attempt:
        now = datetime.fromtimestamp(self.clock(), UTC)
        return store.Attempt(
            endpoint_id, event_id, "unknown", attempt, now, False, None, "event not found", 0, None
        )

    async def attempt(
        self, endpoint_id: str, url: str, secret: str, event: dict[str, Any], attempt: int
    ) -> store.Attempt:
        """POST ``event`` to ``url`` once; the outcome, with the next attempt's time when it
        failed and attempts remain."""
        assert self.post is not None
        body = body_of(event)
        started = self.clock()
        ts = int(started)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            wh.SIGNATURE_HEADER: wh.sign(secret, body, ts),
            wh.EVENT_ID_HEADER: event["id"],
            wh.EVENT_TYPE_HEADER: event["type"],
            wh.ATTEMPT_HEADER: str(attempt),
        }
        status: int | None = None
        error: str | None = None
        try:
            status = await self.post(url, body, headers)
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except errors.VoucherError as exc:  # the address check refused the connection
            error = f"{exc.code}: {exc}"[:500]
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            error = f"{exc.__class__.__name__}: {exc}"[:500] or exc.__class__.__name__
        ok = error is None
        s = self.settings
        next_at = None
        if not ok and not wh.gives_up(attempt, s.webhook_max_attempts):
            delay = wh.backoff_s(attempt, s.webhook_backoff_base_s, s.webhook_backoff_max_s, self.rand())
            next_at = datetime.fromtimestamp(started, UTC) + timedelta(seconds=delay)
        if ok:
            self.sent += 1
        else:
            self.failed += 1
        return store.Attempt(
            endpoint_id,
            event["id"],
            event["type"],
            attempt,
            datetime.fromtimestamp(started, UTC),
            ok,
            status,
            error,
            int((self.clock() - started) * 1000),
            next_at,
        )


def lower_priority(settings: Settings) -> str:
    """Put this process (it only delivers webhooks) beneath checkout's on a busy node:
    idle priority where the OS has it, else the configured nice level. Returns which."""
    if settings.webhook_idle_priority and hasattr(os, "sched_setscheduler"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return "idle"
        except (OSError, AttributeError):
            pass
    with contextlib.suppress(OSError):
        os.nice(max(0, settings.webhook_niceness - os.nice(0)))
    return f"nice {os.nice(0)}"


@ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=100, num_cpus=0)
class WebhookDispatcher:
    """Ray face of :class:`Dispatcher`. The loop runs on its own thread and event loop from
    construction on, so an actor that Ray restarts resumes from the stored positions."""

    def __init__(self, settings: bytes, dsn: str) -> None:
        import threading

        from actors.observability import configure_json_logging

        decoded = msgspec.msgpack.decode(settings, type=Settings)
        configure_json_logging(decoded.log_level)
        lower_priority(decoded)
        self.dispatcher = Dispatcher(dsn, decoded)
        self._thread = threading.Thread(
            target=asyncio.run, args=(self.dispatcher.run_forever(),), daemon=True, name="webhooks"
        )
        self._thread.start()

    async def start(self) -> bool:
        """Whether the dispatch loop is alive (it starts with the actor)."""
        return self._thread.is_alive()

    async def info(self) -> dict[str, Any]:
        d = self.dispatcher
        idle = hasattr(os, "sched_getscheduler") and os.sched_getscheduler(0) == os.SCHED_IDLE
        return {"rounds": d.rounds, "sent": d.sent, "failed": d.failed,
                "priority": "idle" if idle else f"nice {os.nice(0)}"}


def start_webhooks(settings: Settings, dsn: str, *, name: str = "webhooks") -> Any:
    """Create (or attach to) the named dispatcher actor and start its loop."""
    enc = msgspec.msgpack.encode(settings)
    actor = WebhookDispatcher.options(  # type: ignore[attr-defined]
        name=name, namespace=settings.namespace, get_if_exists=True, lifetime="detached"
    ).remote(enc, dsn)
    if not ray.get(actor.start.remote()):
        raise errors.Unavailable("the webhook dispatcher is not running")
    return actor
