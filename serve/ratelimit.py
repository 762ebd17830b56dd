"""The gateway's shared rate limiter: GCRA in Redis, one Lua call per request.

The algorithm and its script are ``engine/gcra.py`` (the delivery workers' send permits use
the same); this module holds the gateway's policy and the hot-path caller.

* The clock is the Redis server's (``TIME`` inside the script): gateway replicas on
  different hosts agree without clock sync.
* :meth:`RateLimiter.hit_many` checks several keys (per API key AND per client IP) in one
  script run: all allow and all are charged, or none is.
* Redis Cluster: a multi-key check needs its keys on one slot; run the limiter on a single
  Redis (or a primary with replicas), which is what the engine deploys.

When Redis cannot be reached, every limit is kept by the replica alone: the same GCRA runs
in the process's memory (:class:`LocalGcra`) with the same rates and bursts, so each
gateway replica allows what the whole fleet allows with Redis. That is the deliberate
middle between the two ways of failing: failing open would let an attacker enumerate
codes (the failure budget is the only thing that stops it), failing closed would turn an
outage of the limiter into an outage of checkout and login. So while Redis is away,
honest checkout and a correct login pass, and a guesser still runs out of budget (at
most ``replicas`` times the budget, spent per replica). Decisions made so are
``degraded``; what was charged locally is not carried over when Redis is back.
After a Redis error the limiter skips Redis for ``backoff_s`` instead of paying a connect
timeout on every request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from actors import ratelimit as gcra_redis
from engine import keys as redis_keys
from engine.gcra import (
    GCRA_MULTI_SHA,
    GCRA_SHA,
    Check,
    Limit,
    LocalGcra,
    check_args,
    multi_args,
    split_multi,
)
from engine.settings import Settings
from serve.resp import ReplyError, RespPipe, open_pipe, pipe_address

log = logging.getLogger(__name__)

ROLES = ("admin", "manager", "analyst", "integration", "customer", "anonymous")


class Decision(msgspec.Struct, frozen=True):
    """The answer of a rate-limit check.

    ``remaining`` counts further cost-1 requests allowed right now; ``reset_after_s`` is the
    time until the bucket is full again; ``retry_after_s`` (0 when allowed) is the time until
    the same request would be allowed. For a multi-key check these describe the binding
    limit: the denying one with the longest wait, or the one closest to empty.
    """

    allowed: bool
    limit: int
    remaining: int
    reset_after_s: float
    retry_after_s: float
    key: str = ""
    degraded: bool = False  # answered without Redis (by the replica's local buckets)
    flagged: bool = False  # the flag key of hit_and_check_failures exists
    epoch: str = ""  # the value of its epoch key ("" when not asked or answered locally)


_DEFAULTS = Settings()


def _default_roles() -> dict[str, Limit]:
    return {role: getattr(_DEFAULTS, f"rate_{role}") for role in ROLES}


class RateLimitPolicy(msgspec.Struct, frozen=True):
    """Rates per caller role and per client IP; the failure budgets of code guessing (per
    customer, per caller, per address) and of logins (per address, per account, per
    trusted device), each login budget in tiers whose waits grow (docs/http-api.md, "Login defence")."""

    roles: dict[str, Limit] = msgspec.field(default_factory=_default_roles)
    per_ip: Limit = _DEFAULTS.rate_ip
    failures: Limit = _DEFAULTS.rate_failures  # per customer, and per address without one
    failures_caller: Limit = _DEFAULTS.rate_failures_caller  # per API key or user, all its customers
    login_ip: tuple[Limit, ...] = _DEFAULTS.rate_login_ip
    login_account: tuple[Limit, ...] = _DEFAULTS.rate_login_account
    login_device: tuple[Limit, ...] = _DEFAULTS.rate_login_device

    @classmethod
    def from_settings(cls, s: Settings) -> RateLimitPolicy:
        """The ``VOUCHER_RATE_*`` settings."""
        return cls(
            roles={role: getattr(s, f"rate_{role}") for role in ROLES},
            per_ip=s.rate_ip,
            failures=s.rate_failures,
            failures_caller=s.rate_failures_caller,
            login_ip=s.rate_login_ip,
            login_account=s.rate_login_account,
            login_device=s.rate_login_device,
        )

    def role_limit(self, role: str) -> Limit:
        # An unknown role gets the strictest treatment, not the most generous one.
        return self.roles.get(role) or self.roles.get("anonymous") or Limit(10.0, 20)

    def principal_check(self, role: str, subject: str, cost: int = 1) -> Check:
        """The limit of one caller (a user id or an API key id) in its role."""
        lim = self.role_limit(role)
        return (redis_keys.principal(role, subject), lim.rate, lim.burst, cost)

    def ip_check(self, client_ip: str, cost: int = 1) -> Check:
        return (redis_keys.ip(client_ip), self.per_ip.rate, self.per_ip.burst, cost)

    def request_checks(
        self, role: str, subject: str, client_ip: str, cost: int = 1
    ) -> list[Check]:
        """The limits of one API request: its caller and its client IP (for ``hit_many``)."""
        return [self.principal_check(role, subject, cost), self.ip_check(client_ip, cost)]

    @staticmethod
    def failure_keys(customer_id: str | None, client_ip: str | None) -> list[str]:
        out = []
        if customer_id:
            out.append(redis_keys.customer(customer_id))
        if client_ip:
            out.append(redis_keys.ip(client_ip))
        return out

    def login_keys(self, client_ip: str, account: str, device: str | None) -> list[str]:
        """The failure budgets a login attempt is checked against and, when it fails,
        charged to: a trusted device's own (it logged in to this account before), else
        its address's and its account's. Keys carry their tier after ``#``."""
        if device is not None:
            return [redis_keys.login(redis_keys.LOGIN_DEVICE, device, i) for i in range(len(self.login_device))]
        return [
            *(redis_keys.login(redis_keys.LOGIN_IP, client_ip, i) for i in range(len(self.login_ip))),
            *(redis_keys.login(redis_keys.LOGIN_ACCOUNT, account, i) for i in range(len(self.login_account))),
        ]

    def failure_limit(self, key: str) -> Limit | None:
        """The budget of a failure key by its kind (``None``: a tier this policy lacks)."""
        kind, _, rest = key.partition(":")
        if kind.startswith("login-"):
            tiers = {
                redis_keys.LOGIN_IP: self.login_ip,
                redis_keys.LOGIN_ACCOUNT: self.login_account,
                redis_keys.LOGIN_DEVICE: self.login_device,
            }.get(kind, ())
            tier = int(rest.rpartition("#")[2] or 0)
            return tiers[tier] if tier < len(tiers) else None
        if kind == redis_keys.CALLER:
            return self.failures_caller
        return self.failures


def headers(decision: Decision) -> dict[str, str]:
    """``RateLimit-Limit/-Remaining/-Reset`` (IETF httpapi draft, integer seconds), plus
    ``Retry-After`` when denied."""
    out = {
        "RateLimit-Limit": str(decision.limit),
        "RateLimit-Remaining": str(max(0, decision.remaining)),
        "RateLimit-Reset": str(max(0, math.ceil(decision.reset_after_s))),
    }
    if not decision.allowed:
        out["Retry-After"] = str(max(1, math.ceil(decision.retry_after_s)))
    return out


class RateLimiter:
    """GCRA limits shared by every gateway replica through one Redis (and kept by each
    replica alone while Redis is unreachable)."""

    def __init__(
        self,
        redis: str | aioredis.Redis,
        *,
        policy: RateLimitPolicy | None = None,
        prefix: str = redis_keys.LIMITER,
        timeout_s: float = 0.25,
        backoff_s: float = 1.0,
        max_connections: int = 64,
        coalesce: bool = True,
    ) -> None:
        # The hot script call's own pipelined connection (serve/resp.py), when the URL
        # allows one; redis-py serves everything else, and this call until it is up.
        self._pipe_addr = pipe_address(redis) if isinstance(redis, str) else None
        self._pipe: RespPipe | None = None
        self._pipe_dialing = False
        self._pipe_retry_at = 0.0
        self.timeout_s = timeout_s
        if isinstance(redis, str):
            # A blocking pool: at peak, requests wait briefly for a connection instead of
            # failing (and so failing open) when the pool is momentarily all in use.
            pool = aioredis.BlockingConnectionPool.from_url(
                redis,
                max_connections=max_connections,
                timeout=1.0,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
            )
            self.redis: aioredis.Redis = aioredis.Redis(connection_pool=pool)
            self._owns_client = True
        else:
            self.redis = redis
            self._owns_client = False
        self.policy = policy or RateLimitPolicy()
        self.prefix = prefix
        self.backoff_s = backoff_s
        self.local = LocalGcra()
        self._down_until = 0.0
        self._last_warning = 0.0
        self.redis_errors = 0  # for metrics
        # Coalescing of concurrent checks into one script call (see _eval).
        self.coalesce = coalesce
        self._queued: list[tuple[list[str], list[Any], asyncio.Future[list[Any]]]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self.calls = 0  # script calls made
        self.coalesced = 0  # checks answered by them
        self.pipe_calls = 0  # of those, over the pipe

    async def aclose(self) -> None:
        if self._pipe is not None:
            self._pipe.close(ConnectionError("rate limiter closed"))
            self._pipe = None
        if self._owns_client:
            await self.redis.aclose(close_connection_pool=True)

    # --- public checks -------------------------------------------------------------------

    async def hit(self, key: str, rate: float, burst: int, cost: int = 1) -> Decision:
        """Charge ``cost`` to ``key``'s bucket if it allows."""
        return await self.hit_many([(key, rate, burst, cost)])

    async def hit_many(self, checks: Sequence[Check]) -> Decision:
        """Apply several limits atomically: all allow and all are charged, or none is."""
        return await self._run("all", [(self.prefix + k, r, b, c) for k, r, b, c in checks])

    async def hit_and_check_failures(
        self,
        checks: Sequence[Check],
        failure_keys: Sequence[str],
        policy: RateLimitPolicy | None = None,
        *,
        flag_key: str | None = None,
        epoch_key: str | None = None,
    ) -> Decision:
        """:meth:`hit_many` and :meth:`check_failure_budget` in ONE round trip (the hot
        path pays one Redis call per request): the request limits are charged only if
        they and every failure budget allow; the failure budgets are never charged here.
        A denial by a failure budget has a ``key`` starting with ``fail:``.

        ``flag_key`` (unprefixed) rides along: the decision's ``flagged`` says whether it
        exists (the gateway's API-key cache asks "was this key revoked or changed?"). So
        does ``epoch_key`` (with a flag key only): the decision's ``epoch`` is its value, a
        token created when Redis has none, so it changes when Redis loses its data (and
        with it the flags)."""
        charged = [(self.prefix + k, r, b, c) for k, r, b, c in checks]
        peeked = self._failure_checks(failure_keys, policy, 1)
        return await self._run(
            "all",
            charged + peeked,
            peek_from=len(charged),
            flag_key=None if flag_key is None else self.prefix + flag_key,
            epoch_key=None if flag_key is None or epoch_key is None else self.prefix + epoch_key,
        )

    async def penalize_failure(
        self,
        keys: Sequence[str],
        policy: RateLimitPolicy | None = None,
        *,
        rate: float | None = None,
        burst: int | None = None,
        cost: int = 1,
    ) -> Decision:
        """Charge the failure bucket of each key (customer, IP) after a failed validation or
        redemption. Each key is charged on its own (an IP shared with an abuser still pays
        for its own failures); the decision says whether every bucket had room."""
        return await self._run("each", self._failure_checks(keys, policy, cost, rate, burst))

    async def check_failure_budget(
        self,
        keys: Sequence[str],
        policy: RateLimitPolicy | None = None,
        *,
        rate: float | None = None,
        burst: int | None = None,
    ) -> Decision:
        """Deny when any key's failure bucket is empty; charges nothing."""
        return await self._run("peek", self._failure_checks(keys, policy, 1, rate, burst))

    async def flag(self, keys: Sequence[str], ttl_s: int, *, durable: bool = False) -> None:
        """Set flag keys (read back by ``hit_and_check_failures(flag_key=...)``) for
        ``ttl_s`` seconds; ``durable``: and wait until they are in Redis's append-only file
        (when it keeps one; up to a second with ``appendfsync everysec``), so a restart of
        Redis keeps them. Raises on a Redis error: a flag that did not land must be known."""
        if not keys:
            return
        pipe = self.redis.pipeline(transaction=False)
        for k in keys:
            pipe.set(self.prefix + k, "1", ex=ttl_s)
        await pipe.execute()
        if not durable:
            return
        try:
            synced: Any = await self.redis.execute_command("WAITAOF", 1, 0, 2000)
        except ResponseError as exc:
            text = str(exc).lower()
            if "appendonly" in text or "unknown command" in text:
                return  # no append-only file (or a Redis before 7.2): nothing to wait for
            raise
        if int(synced[0]) < 1:
            raise RedisError("the flag did not reach the append-only file within 2 s")

    async def run_id(self) -> str:
        """The Redis server's ``run_id`` (new with every restart or failover)."""
        info: Any = await self.redis.info("server")
        return str(info.get("run_id", ""))

    async def ping(self) -> bool:
        """True when Redis answers (for readiness probes); raises otherwise."""
        return bool(await self.redis.ping())

    async def reset(self, keys: Sequence[str], *, failures: bool = False) -> None:
        """Forget buckets (e.g. an operator unblocking a customer)."""
        if keys:
            pre = self.prefix + (redis_keys.FAILURES if failures else "")
            await self.redis.delete(*[pre + k for k in keys])

    # --- machinery -----------------------------------------------------------------------

    def _failure_checks(
        self,
        keys: Sequence[str],
        policy: RateLimitPolicy | None,
        cost: int,
        rate: float | None = None,
        burst: int | None = None,
    ) -> list[Check]:
        """Each key's budget by its kind (RateLimitPolicy.failure_limit); ``rate`` and
        ``burst`` override it for every key."""
        pol = policy or self.policy
        out: list[Check] = []
        for k in keys:
            f = pol.failure_limit(k)
            if f is None:
                continue
            r = f.rate if rate is None else rate
            b = f.burst if burst is None else burst
            out.append((self.prefix + redis_keys.FAILURES + k, r, b, cost))
        return out

    async def _run(
        self,
        mode: str,
        checks: Sequence[Check],
        *,
        peek_from: int | None = None,
        flag_key: str | None = None,
        epoch_key: str | None = None,
    ) -> Decision:
        if not checks:
            return Decision(True, 0, 0, 0.0, 0.0)
        trailing = [k for k in (flag_key, epoch_key) if k is not None]
        for key, rate, burst, cost in checks:
            _validate(key, rate, burst, cost)
        args = check_args(mode, checks, peek_from, len(trailing))
        keys = [c[0] for c in checks] + trailing
        if time.monotonic() < self._down_until:
            return self._fallback(mode, checks, peek_from, None)
        try:
            raw = await self._eval(keys, args)
        except (RedisError, OSError) as exc:
            self.redis_errors += 1
            self._down_until = time.monotonic() + self.backoff_s
            return self._fallback(mode, checks, peek_from, exc)
        decision = _combine(checks, raw, len(self.prefix), peek_from)
        if flag_key is not None and int(raw[4 * len(checks)]):
            decision = msgspec.structs.replace(decision, flagged=True)
        if epoch_key is not None:
            e = raw[4 * len(checks) + 1]
            decision = msgspec.structs.replace(
                decision, epoch=e.decode() if isinstance(e, bytes) else str(e)
            )
        return decision

    async def _eval(self, keys: list[str], args: list[Any]) -> list[Any]:
        """One check's answer. Checks made while the event loop is busy with other requests
        are coalesced: the first schedules a flush for the end of the loop's current
        iteration, and every check queued by then travels in the same script call."""
        if not self.coalesce:
            return await self._eval_one(keys, args)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Any]] = loop.create_future()
        self._queued.append((keys, args, fut))
        if len(self._queued) == 1:
            # Both run on the loop's next turn, after every check queued in this one.
            pipe = self._ready_pipe(loop)
            if pipe is not None:
                loop.call_soon(self._flush_pipe, pipe)
            else:
                self._spawn(self._send())
        return await fut

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    # The pipe: the batch is written from a loop callback and its reply settles the waiters
    # in the protocol's data_received; no task in between.

    def _ready_pipe(self, loop: asyncio.AbstractEventLoop) -> RespPipe | None:
        pipe = self._pipe
        if pipe is not None and pipe.usable:
            return pipe
        if (
            self._pipe_addr is not None
            and not self._pipe_dialing
            and loop.time() >= self._pipe_retry_at
        ):
            self._pipe_dialing = True
            self._spawn(self._dial_pipe(loop))
        return None

    async def _dial_pipe(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._pipe_addr is not None
        try:
            self._pipe = await open_pipe(self._pipe_addr, self.timeout_s * 4)
        except (OSError, ReplyError) as exc:  # TimeoutError is an OSError
            log.warning("rate limiter: no pipelined Redis connection (%s); using redis-py", exc)
            self._pipe_retry_at = loop.time() + max(1.0, self.backoff_s)
        finally:
            self._pipe_dialing = False

    def _flush_pipe(self, pipe: RespPipe) -> None:
        batch, self._queued = self._queued, []
        if not batch:
            return
        if not pipe.usable:
            self._spawn(self._send(batch))
            return
        if len(batch) == 1:
            keys, args, _ = batch[0]
            cmd: list[Any] = ["EVALSHA", GCRA_SHA, len(keys), *keys, *args]
        else:
            keys, margs = multi_args([(k, a) for k, a, _ in batch])
            cmd = ["EVALSHA", GCRA_MULTI_SHA, len(keys), *keys, *margs]
        loop = asyncio.get_running_loop()
        timer = loop.call_later(
            self.timeout_s,
            pipe.close,
            TimeoutError(f"redis did not answer within {self.timeout_s}s"),
        )

        def reply(res: Any) -> None:
            timer.cancel()
            if isinstance(res, ReplyError) and res.noscript:
                # First call on this server (or after SCRIPT FLUSH / a failover): redis-py's
                # path loads the script, and the pipe uses it from then on.
                self._spawn(self._send(batch))
                return
            try:
                if isinstance(res, BaseException):
                    raise RedisError(str(res)) if isinstance(res, ReplyError) else res
                answers = [list(res)] if len(batch) == 1 else split_multi(res, len(batch))
            except Exception as exc:
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                return
            self.pipe_calls += 1
            self._answer(batch, answers)

        pipe.send(cmd, reply)

    async def _send(
        self, batch: list[tuple[list[str], list[Any], asyncio.Future[list[Any]]]] | None = None
    ) -> None:
        if batch is None:
            batch, self._queued = self._queued, []
        try:
            if len(batch) == 1:
                answers = [await self._eval_one(batch[0][0], batch[0][1])]
            else:
                answers = await self._eval_many([(k, a) for k, a, _ in batch])
        except BaseException as exc:  # every waiter gets the error (and falls back)
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        self._answer(batch, answers)

    def _answer(
        self,
        batch: list[tuple[list[str], list[Any], asyncio.Future[list[Any]]]],
        answers: list[list[Any]],
    ) -> None:
        self.calls += 1
        self.coalesced += len(batch)
        for (_, _, fut), answer in zip(batch, answers, strict=True):
            if not fut.done():
                fut.set_result(answer)

    async def _eval_one(self, keys: list[str], args: list[Any]) -> list[Any]:
        return await gcra_redis.run(self.redis, keys, args)

    async def _eval_many(self, groups: list[tuple[list[str], list[Any]]]) -> list[list[Any]]:
        return await gcra_redis.run_many(self.redis, groups)

    def _fallback(
        self,
        mode: str,
        checks: Sequence[Check],
        peek_from: int | None,
        exc: BaseException | None,
    ) -> Decision:
        """The replica's own answer (LocalGcra) while Redis is unreachable."""
        now = time.monotonic()
        if exc is not None and now - self._last_warning > 5.0:
            self._last_warning = now
            log.warning(
                "rate limiter: Redis unreachable (%s: %s); limits are kept by this replica "
                "alone (local buckets), Redis is tried again in %.1fs",
                type(exc).__name__, exc, self.backoff_s,
            )
        raw = self.local.run(mode, checks, peek_from)
        decision = _combine(checks, raw, len(self.prefix), peek_from)
        return msgspec.structs.replace(decision, degraded=True)


def _validate(key: str, rate: float, burst: int, cost: int) -> None:
    if not key:
        raise ValueError("rate-limit key must not be empty")
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive number, got {rate!r}")
    if burst < 1:
        raise ValueError(f"burst must be >= 1, got {burst!r}")
    if not 1 <= cost <= burst:
        # A cost above the burst could never pass; refusing it is clearer than a
        # retry-after that lies.
        raise ValueError(f"cost must be in 1..burst ({burst}), got {cost!r}")


def _combine(
    checks: Sequence[Check], raw: Sequence[Any], strip: int, peek_from: int | None = None
) -> Decision:
    """One decision from the per-key answers: the binding limit speaks for all (a peeked
    budget only when it denies: the headers describe the limits the request is charged to)."""
    per: list[Decision] = []
    for i, (key, _rate, burst, _cost) in enumerate(checks):
        ok, remaining, reset_after, retry_after = raw[4 * i: 4 * i + 4]
        per.append(
            Decision(
                allowed=bool(int(ok)),
                limit=int(burst),
                remaining=max(0, int(remaining)),
                reset_after_s=max(0.0, float(reset_after)),
                retry_after_s=max(0.0, float(retry_after)),
                key=key[strip:],
            )
        )
    denied = [d for d in per if not d.allowed]
    if denied:
        return max(denied, key=lambda d: (d.retry_after_s, -d.limit))
    charged = per[:peek_from] if peek_from else per
    return min(charged or per, key=lambda d: (d.remaining, d.limit))
