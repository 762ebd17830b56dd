"""Delivery workers: Ray actors that drain the delivery streams into the channel adapters.

One round of a worker, per channel (``engine.delivery`` has the message, ``engine.keys``
the streams):

1. ``XREADGROUP`` a batch from the channel's stream (group ``senders``).
2. **Claim** the batch in Postgres in one statement: rows still ``queued`` (or ``failed``
   and due, or ``sending`` under a claim older than ``claim_idle_s``) become ``sending``
   with this worker's name and ``attempts + 1``. Rows already ``sent``/``dead`` or held by
   a live claim are skipped and their entries acknowledged: a message that reached the
   stream twice is sent once.
3. Take send permits from the channel's shared GCRA bucket (``actors/ratelimit.py``).
4. Render (Jinja2, per campaign/channel/locale with fallback) and send concurrently over the
   adapter's reused connections, the message id as the provider's idempotency key.
   Each accepted message is marked in a Redis hash (``voucher:delivery:sent``) within a
   few milliseconds, before its row is updated.
5. **Record** the outcomes in one transaction (``sent``; ``failed`` with ``last_error`` and
   ``next_attempt_at``; ``dead``), then schedule retries (sorted set per channel, score =
   due time; moved back to the stream when due by an atomic Lua script), add dead messages
   to the dead-letter stream and ``XACK``; admins get one ``delivery_dead`` notification
   per campaign and failure window.

While a round sends, its claims are kept alive: every quarter of ``claim_idle_s`` the
worker renews ``claimed_at`` of its rows and resets the idle time of its stream entries
(``XCLAIM ... JUSTID``), so a round slower than ``claim_idle_s`` (a slow provider, a low
rate limit) keeps what it holds, and only a worker that went silent loses it.

Crash safety (a worker killed at any point):

* Before the claim: the entries stay pending under the dead consumer; another worker
  takes them over with ``XAUTOCLAIM`` once idle for ``claim_idle_s``. Nothing is lost.
* After the claim, before the send: the row is ``sending``; the reclaiming worker may take
  a claim older than ``claim_idle_s`` over and sends it. Nothing is lost, nothing doubled.
* After the provider accepted, before the row says ``sent``: the reclaiming worker finds
  the message in the ``sent`` hash and records it as sent without sending again. Only a
  crash in the few milliseconds between the provider's acceptance and that mark can lead
  to a second hand-over; it carries the same idempotency key (``Message-ID`` /
  ``Idempotency-Key``), so a provider that honours it (as the embedded sinks do) still
  delivers once. This is the one place exactly-once relies on the provider.
* A lost stream entry is found in Postgres and added again: a ``queued`` row whose
  recorded stream incarnation (the Redis server's ``run_id``) is not the current one
  (Redis restarted or failed over, so recent entries or all may be gone) or that was never
  added (Redis was down when it was recorded), and, by a periodic sweep, rows ``sending``
  or due ``failed`` with no progress. The claim decides who sends, so an entry added twice
  is still sent once.

Redis trouble: a lost consumer group (or stream) is created again by the worker that meets
``NOGROUP``, reading from the stream's start. While Redis is down, a round in flight takes
its send permits from a local GCRA bucket at the worker's share of the channel's rate
(``rate / delivery_workers``), so the provider's limit holds without the shared bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
import ray
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from actors import outbound
from actors import ratelimit as gcra_redis
from actors.delivery_queue import add_to_streams, incarnation
from actors.providers import ChannelAdapter, SmtpAdapter, SmtpSettings, WebhookAdapter
from engine import delivery, keys, templates
from engine.delivery import DeliveryMessage
from engine.gcra import LocalGcra, permits
from engine.sending import (
    FailureWindow,
    PermanentError,
    SendError,
    TemporaryError,
    backoff_s,
    count_outcomes,
    failure_rate_exceeded,
    locale_chain,
    normalize_locale,
    window_index,
)
from engine.settings import Settings
from store import delivery as delivery_store
from store import notifications
from store.pools import open_pool

log = logging.getLogger("voucher.delivery")

# Move due retries back to the stream: KEYS[1] zset, KEYS[2] stream; ARGV now, max count.
_MOVE_DUE_LUA = r"""
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for i, m in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'm', m)
  redis.call('ZREM', KEYS[1], m)
end
return #due
"""

# Seconds a producer may take between recording a queued row and adding it to its stream.
REQUEUE_GRACE_S = 5.0
REQUEUE_LOCK_S = 5
# How often a worker looks for queued rows missing from the streams.
INCARNATION_CHECK_S = 1.0


@dataclass
class WorkerConfig:
    settings: dict[str, Any]
    dsn: str
    redis_url: str
    urls: dict[str, str]  # channel -> provider URL (smtp://..., http://...)
    channels: tuple[str, ...] = delivery.CHANNELS


@dataclass
class _CampaignInfo:
    name: str
    spec: dict[str, Any]
    default_locale: str | None
    templates: dict[tuple[str, str], templates.CompiledTemplate] = field(default_factory=dict)
    loaded_at: float = 0.0


def _message(r: asyncpg.Record) -> DeliveryMessage:
    return DeliveryMessage(
        id=r["id"], campaign_id=r["campaign_id"], customer_id=r["customer_id"],
        channel=r["channel"], recipient=r["recipient"], code=r["code"],
        locale=r["locale"], name=r["name"], job_id=r["job_id"],
    )


def _no_group(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and "NOGROUP" in str(exc)


def build_adapter(channel: str, url: str, s: Settings) -> ChannelAdapter:
    if channel == "email":
        return SmtpAdapter(
            SmtpSettings.from_url(url),
            s.mail_from,
            size=s.delivery_connections,
            timeout_s=s.delivery_send_timeout_s,
        )
    return WebhookAdapter(
        url,
        connections=s.delivery_connections,
        timeout_s=s.delivery_send_timeout_s,
        allow=outbound.allow_of(s),
    )


def channel_rate(s: Settings, channel: str) -> float:
    return float(getattr(s, f"delivery_rate_{channel}"))


class DeliveryCore:
    """The worker's logic, independent of Ray (the actor below wraps it)."""

    TEMPLATE_TTL_S = 5.0
    ROUNDS_PER_CHANNEL = 2  # concurrent read/claim/send/record rounds per channel

    def __init__(self, cfg: WorkerConfig, name: str) -> None:
        self.cfg = cfg
        self.s = msgspec.convert(cfg.settings, Settings)
        self.name = name
        self.consumer = f"{name}-{uuid.uuid4().hex[:8]}"
        self.stopping = asyncio.Event()
        self.opened = asyncio.Event()  # connected, streams and groups in place
        self.db: asyncpg.Pool | None = None
        self.redis: Redis | None = None
        self.adapters: dict[str, ChannelAdapter] = {}
        self.campaigns: dict[str, _CampaignInfo] = {}
        self._marks: list[str] = []
        self._marks_pending = asyncio.Event()
        self._rng = random.Random()
        self._move_due: Any = None
        self.counts = {
            "sent": 0, "retried": 0, "dead_lettered": 0, "skipped": 0, "recovered": 0,
            "requeued": 0, "renewed": 0,
        }
        self._metric: Any = None
        # The worker's share of each channel's rate, for while Redis is unreachable.
        self._local = LocalGcra()
        self._local_rates: dict[str, float] = {}
        self._checked: dict[str, str] = {}  # channel -> Redis run_id its queued rows were checked on

    # --- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        # Rounds (two per channel), housekeeping and claim renewals share it: room for all.
        self.db = await open_pool(self.cfg.dsn, 8)
        # Timeouts: a Redis that hangs (frozen, a network split) fails a round in seconds
        # instead of holding it; the read loop's blocking read waits 0.5 s at most.
        self.redis = Redis.from_url(self.cfg.redis_url, socket_connect_timeout=5, socket_timeout=10)
        self._move_due = self.redis.register_script(_MOVE_DUE_LUA)
        for ch in self.cfg.channels:
            self.adapters[ch] = build_adapter(ch, self.cfg.urls[ch], self.s)
            await self._ensure_group(ch)
        with contextlib.suppress(Exception):
            from actors.observability import DELIVERY_MESSAGES

            self._metric = DELIVERY_MESSAGES
        self.opened.set()

    async def _ensure_group(self, channel: str) -> None:
        """Create the channel's stream and consumer group unless they exist. From the
        stream's start: after a loss, every entry still in the stream is read (an entry
        whose row was already sent is skipped by the claim)."""
        assert self.redis is not None
        try:
            await self.redis.xgroup_create(keys.stream(channel), keys.GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        else:
            log.info("created consumer group %s on %s", keys.GROUP, keys.stream(channel))

    async def close(self) -> None:
        for a in self.adapters.values():
            with contextlib.suppress(Exception):
                await a.close()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()
        if self.db is not None:
            with contextlib.suppress(Exception):
                await self.db.close()

    async def run(self) -> dict[str, int]:
        await self.open()
        tasks = [asyncio.create_task(self._flush_marks_loop())]
        rounds = []
        for ch in self.cfg.channels:
            for _ in range(self.ROUNDS_PER_CHANNEL):
                rounds.append(asyncio.create_task(self._read_loop(ch)))
            tasks.append(asyncio.create_task(self._housekeeping_loop(ch)))
        try:
            await self.stopping.wait()
            # A graceful stop lets the rounds in flight finish (send, record, ack), so a
            # restart of the consumers interrupts no hand-over to a provider.
            await asyncio.wait(rounds, timeout=self.s.delivery_send_timeout_s + 5)
        finally:
            for t in tasks + rounds:
                t.cancel()
            await asyncio.gather(*tasks, *rounds, return_exceptions=True)
            await self._flush_marks()
            await self.close()
        return dict(self.counts)

    # --- loops -----------------------------------------------------------------------

    def read_count(self, channel: str) -> int:
        """Entries per round: the batch size, but no more than about one second of the
        channel's rate limit, so a round never waits long for permits while it holds its
        claims (a claim older than most of ``claim_idle_s`` may be taken over)."""
        rate = channel_rate(self.s, channel)
        if rate <= 0:
            return self.s.delivery_batch
        return max(1, min(self.s.delivery_batch, int(rate)))

    async def _read_loop(self, channel: str) -> None:
        assert self.redis is not None
        stream = keys.stream(channel)
        while not self.stopping.is_set():
            try:
                got: Any = await self.redis.xreadgroup(
                    keys.GROUP, self.consumer, {stream: ">"}, count=self.read_count(channel), block=500
                )
                for _stream, entries in got or []:
                    if entries:
                        await self.process(channel, entries)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _no_group(exc):
                    # Redis lost the group (restarted empty, or it was deleted).
                    with contextlib.suppress(Exception):
                        await self._ensure_group(channel)
                    continue
                if isinstance(exc, (RedisError, OSError)):
                    log.warning("delivery round on %s: Redis unreachable (%s); retrying", channel, exc)
                else:
                    log.exception("delivery round failed on %s; retrying", channel)
                await asyncio.sleep(0.5)

    async def _housekeeping_loop(self, channel: str) -> None:
        """Due retries back to the stream (every 100 ms), reclaim idle entries of silent
        consumers (XAUTOCLAIM) and sweep Postgres for lost messages."""
        assert self.redis is not None
        stream = keys.stream(channel)
        idle_ms = int(self.s.delivery_claim_idle_s * 1000)
        next_claim = time.monotonic() + self.s.delivery_claim_idle_s / 2
        next_sweep = time.monotonic() + self.s.delivery_claim_idle_s
        next_requeue = time.monotonic()
        while not self.stopping.is_set():
            try:
                await self._move_due(keys=[keys.retry(channel), stream], args=[time.time(), 1000])
                now = time.monotonic()
                if now >= next_requeue:
                    next_requeue = now + INCARNATION_CHECK_S
                    await self._requeue_lost(channel)
                if now >= next_claim:
                    next_claim = now + max(0.2, self.s.delivery_claim_idle_s / 2)
                    start = "0-0"
                    while True:
                        res: Any = await self.redis.xautoclaim(
                            stream, keys.GROUP, self.consumer, idle_ms, start, count=self.read_count(channel)
                        )
                        start, entries = res[0], res[1]
                        entries = [e for e in entries if e[1]]  # deleted entries come back empty
                        if entries:
                            log.info("reclaimed %d idle messages on %s", len(entries), channel)
                            await self.process(channel, entries)
                        if start in (b"0-0", "0-0") or self.stopping.is_set():
                            break
                if now >= next_sweep:
                    next_sweep = now + self.s.delivery_claim_idle_s
                    await self._sweep(channel)
                    await self._forget_dead_consumers(stream)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _no_group(exc):
                    with contextlib.suppress(Exception):
                        await self._ensure_group(channel)
                elif isinstance(exc, (RedisError, OSError)):
                    log.warning("delivery housekeeping on %s: Redis unreachable (%s)", channel, exc)
                    await asyncio.sleep(0.4)
                else:
                    log.exception("delivery housekeeping failed on %s", channel)
            await asyncio.sleep(0.1)

    async def _requeue_lost(self, channel: str) -> None:
        """Add again the ``queued`` rows that have no entry on the current Redis server.
        Every second: rows never added (recorded while Redis was away). Once per worker
        and server (at start, and after Redis restarted or failed over): every queued row
        added to another server. Workers take turns (a short lock), in pages of 1000."""
        assert self.db is not None and self.redis is not None
        run_id = await incarnation(self.redis)
        full = self._checked.get(channel) != run_id
        # One worker at a time (two would add every row twice); short-lived, so a lock left
        # by a worker that died or lost Redis midway holds nobody up for long.
        lock = keys.requeue_lock(channel)
        if not await self.redis.set(lock, self.consumer, nx=True, ex=REQUEUE_LOCK_S):
            return
        try:
            total = await self._readd(channel, lock, delivery_store.not_added, REQUEUE_GRACE_S)
            if full:
                total += await self._readd(channel, lock, delivery_store.not_on_server, run_id)
                self._checked[channel] = run_id
            if total:
                self.counts["requeued"] += total
                log.warning("re-queued %d %s messages that were not on the streams", total, channel)
        finally:
            with contextlib.suppress(Exception):
                await self.redis.delete(lock)

    async def _readd(
        self, channel: str, lock: str, page: Callable[..., Awaitable[list[Any]]], arg: Any
    ) -> int:
        assert self.db is not None and self.redis is not None
        after, total = "", 0
        while not self.stopping.is_set():
            rows = await page(self.db, channel, after, arg)
            if not rows:
                break
            await add_to_streams(self.db, self.redis, [_message(r) for r in rows])
            await self.redis.expire(lock, REQUEUE_LOCK_S)
            total += len(rows)
            after = rows[-1]["id"]
            if len(rows) < 1000:
                break
        return total

    async def _sweep(self, channel: str) -> None:
        """Re-queue rows whose stream entry is gone (claims and retries with no progress for
        two idle periods). A row re-queued twice is still sent once (the claim decides)."""
        assert self.db is not None and self.redis is not None
        if not await self.redis.set(keys.sweep_lock(channel), self.consumer, nx=True, ex=max(1, int(self.s.delivery_claim_idle_s))):
            return
        rows = await delivery_store.swept(self.db, channel, 2 * self.s.delivery_claim_idle_s)
        if not rows:
            return
        pipe = self.redis.pipeline(transaction=False)
        for r in rows:
            pipe.xadd(keys.stream(channel), {delivery.FIELD: delivery.encode(_message(r))})
        await pipe.execute()
        log.warning("sweep re-queued %d %s messages with no stream entry progress", len(rows), channel)

    async def _forget_dead_consumers(self, stream: str) -> None:
        """Remove consumers of the group that hold nothing and were silent for ten idle
        periods (workers that died or were replaced), so the group does not grow forever."""
        assert self.redis is not None
        limit_ms = 10 * self.s.delivery_claim_idle_s * 1000
        for c in await self.redis.xinfo_consumers(stream, keys.GROUP):
            name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
            if name != self.consumer and int(c["pending"]) == 0 and int(c["idle"]) > limit_ms:
                await self.redis.xgroup_delconsumer(stream, keys.GROUP, name)

    async def _flush_marks_loop(self) -> None:
        while True:
            await self._marks_pending.wait()
            # No extra delay: the marks made while one HSET is in flight go in the next.
            self._marks_pending.clear()
            await self._flush_marks()

    async def _flush_marks(self) -> None:
        """Write the sent marks. Best effort: without Redis the round still records its
        outcomes in Postgres, which is the stronger mark."""
        if not self._marks or self.redis is None:
            return
        marks, self._marks = self._marks, []
        try:
            await self.redis.hset(keys.SENT_MARKS, mapping=dict.fromkeys(marks, self.consumer))
        except (RedisError, OSError) as exc:
            log.warning("sent marks of %d messages not written: %s", len(marks), exc)

    async def _keep_claims(self, stream: str, entry_ids: list[Any], ids: list[str]) -> None:
        """While a round runs: renew its claims in Postgres and reset the idle time of its
        stream entries, every quarter of ``claim_idle_s`` (takeover needs 0.8 of it)."""
        assert self.db is not None and self.redis is not None
        period = self.s.delivery_claim_idle_s / 4
        while True:
            await asyncio.sleep(period)
            try:
                await delivery_store.renew_claims(self.db, ids, self.consumer)
                self.counts["renewed"] += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("claims of a round on %s not renewed: %s", stream, exc)
            with contextlib.suppress(RedisError, OSError):
                await self.redis.xclaim(
                    stream, keys.GROUP, self.consumer, 0, entry_ids, justid=True
                )

    # --- one batch ---------------------------------------------------------------------

    async def process(self, channel: str, entries: Sequence[tuple[Any, dict[Any, Any]]]) -> None:
        assert self.db is not None and self.redis is not None
        stream = keys.stream(channel)
        entry_ids = [e[0] for e in entries]
        msgs: dict[str, DeliveryMessage] = {}
        for _eid, fields in entries:
            blob = fields.get(delivery.FIELD.encode()) or fields.get(delivery.FIELD)
            if blob is None:
                continue
            try:
                m = delivery.decode(blob)
            except msgspec.DecodeError:
                log.error("undecodable entry on %s dropped", stream)
                continue
            msgs.setdefault(m.id, m)
        ids = list(msgs)
        # A claim older than most of the idle period is taken over: an entry reclaimed by
        # XAUTOCLAIM went idle a little before its row was claimed.
        takeover_s = 0.8 * self.s.delivery_claim_idle_s
        claimed = await delivery_store.claim(self.db, ids, self.consumer, takeover_s) if ids else {}
        if not claimed:
            await self._finish(channel, stream, entry_ids, ids, claimed, msgs)
            return
        keep = asyncio.create_task(self._keep_claims(stream, entry_ids, list(claimed)))
        try:
            await self._finish(channel, stream, entry_ids, ids, claimed, msgs, keep)
        finally:
            keep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keep

    async def _finish(
        self,
        channel: str,
        stream: str,
        entry_ids: list[Any],
        ids: list[str],
        claimed: dict[str, int],
        msgs: dict[str, DeliveryMessage],
        keep: asyncio.Task[None] | None = None,
    ) -> None:
        """The rest of a round once its rows are claimed: send, record, acknowledge."""
        assert self.db is not None and self.redis is not None
        # Claims taken over from a dead worker: was the message accepted before it died?
        recovered: list[str] = []
        if claimed:
            took_over = [i for i, a in claimed.items() if a > 1]
            if took_over:
                marks = await self.redis.hmget(keys.SENT_MARKS, took_over)
                recovered = [i for i, mark in zip(took_over, marks) if mark is not None]
        unclaimed = [i for i in ids if i not in claimed]
        if unclaimed:
            await self._reschedule_unclaimed(channel, unclaimed, msgs)
        for i in recovered:
            claimed.pop(i)
        to_send = [msgs[i] for i in claimed]
        if to_send:
            await self._acquire(channel, len(to_send))
            await self._load_campaigns({m.campaign_id for m in to_send})
        results = await asyncio.gather(*(self._send_one(channel, m) for m in to_send))
        await self._flush_marks()
        sent = [m.id for m, err in zip(to_send, results) if err is None]
        retry: list[tuple[DeliveryMessage, str, float]] = []
        dead: list[tuple[DeliveryMessage, str]] = []
        for m, err in zip(to_send, results):
            if err is None:
                continue
            attempts = claimed[m.id]
            if err.temporary and attempts < self.s.delivery_max_attempts:
                delay = backoff_s(
                    attempts,
                    base_s=self.s.delivery_backoff_base_s,
                    max_s=self.s.delivery_backoff_max_s,
                    rand=self._rng.random,
                )
                retry.append((m, err.reason[:500], delay))
            else:
                why = err.reason if not err.temporary else f"{err.reason} (after {attempts} attempts)"
                dead.append((m, why[:500]))
        await delivery_store.record_outcomes(
            self.db, self.consumer, sent, recovered,
            [(m.id, e, d) for m, e, d in retry], [(m.id, e) for m, e in dead],
        )
        if keep is not None:
            keep.cancel()  # the rows are recorded; nothing left to hold
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for m, _e, delay in retry:
            pipe.zadd(keys.retry(channel), {delivery.encode(m): now + delay})
        for m, e in dead:
            pipe.xadd(keys.DEAD_STREAM, {delivery.FIELD: delivery.encode(m), "error": e, "channel": channel})
        done = sent + recovered
        if done:
            pipe.hdel(keys.SENT_MARKS, *done)
        pipe.xack(stream, keys.GROUP, *entry_ids)
        await pipe.execute()
        self.counts["sent"] += len(sent)
        self.counts["recovered"] += len(recovered)
        self.counts["retried"] += len(retry)
        self.counts["dead_lettered"] += len(dead)
        self.counts["skipped"] += len(entry_ids) - len(to_send) - len(recovered)
        self._observe(channel, sent=len(sent) + len(recovered), retried=len(retry), dead=len(dead))
        if dead:
            await self._notify_dead(channel, dead)
        if to_send:
            await self._failure_rate(
                count_outcomes((m.campaign_id, err is not None) for m, err in zip(to_send, results))
            )

    async def _reschedule_unclaimed(self, channel: str, ids: list[str], msgs: dict[str, DeliveryMessage]) -> None:
        """Entries whose row could not be claimed: already sent/dead or held by a live
        claim (acknowledged, nothing to do), or a retry not due yet (a second copy of the
        message reached the stream early): back into the retry set at its due time (the
        set is keyed by the message, so copies collapse)."""
        assert self.db is not None and self.redis is not None
        rows = await delivery_store.unclaimed(self.db, ids)
        pipe = self.redis.pipeline(transaction=False)
        n = 0
        for r in rows:
            if r["state"] == "failed":
                pipe.zadd(keys.retry(channel), {delivery.encode(msgs[r["id"]]): float(r["due"] or time.time())})
                n += 1
        if n:
            await pipe.execute()

    async def _send_one(self, channel: str, m: DeliveryMessage) -> SendError | None:
        try:
            rendered = self.render(m)
        except Exception as exc:  # validated templates do not fail; data might
            return PermanentError(f"render failed: {type(exc).__name__}: {exc}")
        try:
            await self.adapters[channel].send(m, rendered)
        except SendError as exc:
            return exc
        except Exception as exc:
            return TemporaryError(f"{type(exc).__name__}: {exc}")
        self._marks.append(m.id)
        self._marks_pending.set()
        return None

    async def _acquire(self, channel: str, n: int) -> None:
        rate = channel_rate(self.s, channel)
        if rate <= 0:
            return
        assert self.redis is not None
        key = keys.send_rate(channel)
        while n > 0:
            try:
                granted, wait = await gcra_redis.take(self.redis, key, rate, max(1.0, rate), n)
            except (RedisError, OSError) as exc:
                granted, wait = self._take_local(channel, rate, n, exc)
            n -= granted
            if n > 0:
                await asyncio.sleep(max(0.001, wait))

    def _take_local(self, channel: str, rate: float, n: int, exc: BaseException) -> tuple[int, float]:
        """Permits at the worker's share of the channel's rate, while the shared bucket is away."""
        share = self._local_rates.get(channel)
        if share is None:
            share = self._local_rates[channel] = rate / max(1, self.s.delivery_workers)
            log.warning(
                "send permits on %s from a local bucket (%.1f/s, this worker's share): %s",
                channel, share, exc,
            )
        return permits(self._local.run("take", [(channel, share, max(1.0, share), n)]))

    async def _notify_dead(self, channel: str, dead: list[tuple[DeliveryMessage, str]]) -> None:
        """One ``delivery_dead`` notification per campaign and failure window (the first
        batch that dead-letters something), not one per message or batch."""
        assert self.redis is not None and self.db is not None
        win = self.s.delivery_failure_window_s
        idx = window_index(time.time(), win)
        per: dict[str, list[tuple[DeliveryMessage, str]]] = {}
        for m, e in dead:
            per.setdefault(m.campaign_id, []).append((m, e))
        for cid, items in per.items():
            if not await self.redis.set(keys.dead_alerted(cid, idx), 1, nx=True, ex=2 * win):
                continue
            m0, e0 = items[0]
            await notifications.record(
                self.db,
                "delivery_dead",
                cid,
                f"{len(items)} {channel} message(s) of campaign {cid} moved to the dead-letter "
                f"stream, e.g. {m0.id} to {m0.recipient}: {e0}. Further ones in the next "
                f"{win} s are not notified again: GET /v1/deliveries/dead?campaign_id={cid}",
            )

    async def _failure_rate(self, per: dict[str, FailureWindow]) -> None:
        assert self.redis is not None and self.db is not None
        win = self.s.delivery_failure_window_s
        idx = window_index(time.time(), win)
        pipe = self.redis.pipeline(transaction=False)
        order = list(per)
        for cid in order:
            key = keys.failure_window(cid, idx)
            pipe.hincrby(key, "attempts", per[cid].attempts)
            pipe.hincrby(key, "failures", per[cid].failures)
            pipe.expire(key, 2 * win)
        res = await pipe.execute()
        for k, cid in enumerate(order):
            w = FailureWindow(attempts=int(res[3 * k]), failures=int(res[3 * k + 1]))
            if not failure_rate_exceeded(
                w, threshold=self.s.delivery_failure_rate, min_attempts=self.s.delivery_failure_min_attempts
            ):
                continue
            if await self.redis.set(keys.failure_alerted(cid, idx), 1, nx=True, ex=2 * win):
                await notifications.record(
                    self.db,
                    "delivery_failure_rate",
                    cid,
                    f"delivery failure rate of campaign {cid} is {w.failures / w.attempts:.0%} "
                    f"({w.failures} of {w.attempts} attempts in the current {win} s window; "
                    f"threshold {self.s.delivery_failure_rate:.0%})",
                )

    def _observe(self, channel: str, *, sent: int, retried: int, dead: int) -> None:
        if self._metric is None:
            return
        for outcome, n in (("sent", sent), ("retried", retried), ("dead_lettered", dead)):
            if n:
                with contextlib.suppress(Exception):
                    self._metric.inc(n, tags={"channel": channel, "outcome": outcome})

    # --- templates ---------------------------------------------------------------------

    async def _load_campaigns(self, ids: set[str]) -> None:
        assert self.db is not None
        now = time.monotonic()
        stale = [c for c in ids if c not in self.campaigns or now - self.campaigns[c].loaded_at > self.TEMPLATE_TTL_S]
        if not stale:
            return
        camp_rows, default_rows, tpl_rows = await delivery_store.campaign_sources(self.db, stale)
        camps = {r["id"]: r for r in camp_rows}
        defaults = {r["campaign_id"]: r["default_locale"] for r in default_rows}
        for cid in stale:
            row = camps.get(cid)
            spec = msgspec.json.decode(row["spec"]) if row is not None else {}
            self.campaigns[cid] = _CampaignInfo(
                name=row["name"] if row is not None else cid,
                spec=spec if isinstance(spec, dict) else {},
                default_locale=defaults.get(cid),
                loaded_at=now,
            )
        for r in tpl_rows:
            info = self.campaigns[r["campaign_id"]]
            info.templates[(r["channel"], r["locale"])] = templates.CompiledTemplate(
                r["channel"], templates.TemplateSource(subject=r["subject"], body=r["body"])
            )

    def render(self, m: DeliveryMessage) -> templates.Rendered:
        info = self.campaigns.get(m.campaign_id) or _CampaignInfo(name=m.campaign_id, spec={}, default_locale=None)
        return render_message(m, info.name, info.spec, info.default_locale, info.templates)


_BUILTIN: dict[str, templates.CompiledTemplate] = {}


def pick_template(
    channel: str,
    customer_locale: str | None,
    default_locale: str | None,
    available: dict[tuple[str, str], templates.CompiledTemplate],
) -> tuple[str | None, templates.CompiledTemplate]:
    """The template for ``channel`` along the fallback chain; (None, built-in) at its end."""
    for loc in locale_chain(customer_locale, default_locale):
        t = available.get((channel, loc))
        if t is not None:
            return loc, t
    t = _BUILTIN.get(channel)
    if t is None:
        t = _BUILTIN[channel] = templates.CompiledTemplate(channel, templates.DEFAULTS[channel])
    return None, t


def render_message(
    m: DeliveryMessage,
    campaign_name: str,
    spec: dict[str, Any],
    default_locale: str | None,
    available: dict[tuple[str, str], templates.CompiledTemplate],
) -> templates.Rendered:
    _loc, t = pick_template(m.channel, m.locale, default_locale, available)
    ctx = templates.context(
        code=m.code,
        customer_name=m.name,
        locale=normalize_locale(m.locale or "en"),
        campaign_name=campaign_name,
        spec=spec,
    )
    return t.render(ctx)


# --- the Ray actor and how to start it ---------------------------------------------------


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class DeliveryWorker:
    """A delivery worker. ``run`` runs until ``stop``; after a crash Ray restarts the actor
    and retries ``run`` (a new consumer name; its predecessor's pending entries are
    reclaimed by XAUTOCLAIM)."""

    def __init__(self, cfg: WorkerConfig, name: str) -> None:
        from actors.observability import configure_json_logging

        self.cfg = cfg
        self.name = name
        self.core: DeliveryCore | None = None
        self._stop_requested = False
        configure_json_logging(msgspec.convert(cfg.settings, Settings).log_level)

    async def run(self) -> dict[str, int]:
        """Work until ``stop``. Ray retries this call after the actor dies; an error inside
        (Postgres or Redis unreachable at start) is retried here, every second."""
        while True:
            self.core = DeliveryCore(self.cfg, self.name)
            try:
                return await self.core.run()
            except Exception:
                log.exception("delivery worker %s failed; starting again in 1 s", self.name)
                await self.core.close()
                if self._stop_requested:
                    return dict(self.core.counts)
                await asyncio.sleep(1.0)

    async def ready(self) -> str:
        for _ in range(200):
            if self.core is not None and self.core.opened.is_set():
                return self.core.consumer
            await asyncio.sleep(0.05)
        raise TimeoutError("delivery worker did not start")

    async def counts(self) -> dict[str, int]:
        return dict(self.core.counts) if self.core is not None else {}

    async def stop(self) -> None:
        self._stop_requested = True
        if self.core is not None:
            self.core.stopping.set()

    def pid(self) -> int:
        import os

        return os.getpid()


@dataclass
class DeliveryHandles:
    workers: list[Any]
    runs: list[Any]
    urls: dict[str, str]

    def stop(self, timeout_s: float = 25.0) -> None:
        with contextlib.suppress(Exception):
            ray.get([w.stop.remote() for w in self.workers], timeout=timeout_s)
        with contextlib.suppress(Exception):
            ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout_s)
        for w in self.workers:
            with contextlib.suppress(Exception):
                ray.kill(w, no_restart=True)


def provider_urls(settings: Settings, sink_urls: dict[str, str] | None = None) -> dict[str, str]:
    """Provider URL per channel: the configured one, else the embedded sink's."""
    sinks = sink_urls or {}
    configured = {"email": settings.smtp_url, "sms": settings.sms_webhook_url, "push": settings.push_webhook_url}
    out: dict[str, str] = {}
    for ch, url in configured.items():
        chosen = url or sinks.get("smtp" if ch == "email" else ch)
        if chosen is None:
            raise ValueError(f"no provider for {ch}: configure it or start the embedded sinks")
        out[ch] = chosen
    return out


def start_delivery(
    settings: Settings,
    dsn: str,
    redis_url: str,
    *,
    urls: dict[str, str],
    workers: int | None = None,
    channels: tuple[str, ...] = delivery.CHANNELS,
    name_prefix: str = "delivery",
) -> DeliveryHandles:
    """Start ``workers`` (default: ``settings.delivery_workers``) delivery actors; Ray must
    be up. ``urls`` maps each channel to its provider (see :func:`provider_urls`)."""
    n = settings.delivery_workers if workers is None else workers
    cfg = WorkerConfig(
        settings=msgspec.to_builtins(settings),
        dsn=dsn,
        redis_url=redis_url,
        urls=dict(urls),
        channels=tuple(channels),
    )
    tag = uuid.uuid4().hex[:6]
    actors = [
        DeliveryWorker.options(name=f"{name_prefix}-{tag}-{i}", namespace=settings.namespace).remote(  # type: ignore[attr-defined]
            cfg, f"{name_prefix}-{i}"
        )
        for i in range(n)
    ]
    runs = [a.run.remote() for a in actors]
    ray.get([a.ready.remote() for a in actors])
    return DeliveryHandles(workers=actors, runs=runs, urls=dict(urls))
