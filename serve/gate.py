"""Who may pass the gateway: credentials (bearer tokens and API keys, with the replica's
cache of verified keys), roles (``serve.permissions.PERMISSIONS``), rate limits and the
failed-attempt budgets that stop code guessing, charged in one Redis call per request.

:class:`Gate` is the replica's; the routes reach it through ``serve.routes.deps`` and the
checkout fast lane (``serve.checkout``) calls it directly. Refusals are exceptions
(:class:`serve.auth.AuthError`, :class:`RateLimited`) answered by :func:`auth_problem` and
:func:`rate_problem`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from typing import Any, NamedTuple

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from engine import keys
from serve import metrics
from serve.auth import (
    API_KEY_CACHE_S,
    AuthError,
    Principal,
    TokenIssuer,
    customer_only,
    parse_api_key,
)
from serve.client_address import TrustedProxies
from serve.permissions import authorize
from serve.problems import problem
from serve.ratelimit import RateLimiter, RateLimitPolicy
from serve.ratelimit import headers as rate_headers
from serve.users import UserStore

log = logging.getLogger("voucher.gateway")

_KEY_CACHE_MAX = 10_000  # verified API keys kept per replica (cleared when full)


class RateLimited(Exception):
    def __init__(self, decision: Any, what: str) -> None:
        self.decision = decision
        self.what = what


def auth_problem(exc: AuthError) -> JSONResponse:
    resp = problem(exc.status, exc.type, "Forbidden" if exc.status == 403 else "Unauthorized", exc.detail)
    if exc.status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="voucher-engine"'
    return resp


def rate_problem(exc: RateLimited) -> JSONResponse:
    metrics.RATE_LIMITED.labels(exc.what).inc()
    resp = problem(429, "rate_limited", "Too Many Requests", f"{exc.what} rate limit exceeded; retry later")
    resp.headers.update(rate_headers(exc.decision))
    return resp


def install_refusal_handlers(app: FastAPI) -> None:
    """Answer the gate's refusals raised in routes as problems."""

    async def on_auth(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AuthError)
        return auth_problem(exc)

    async def on_rate(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RateLimited)
        return rate_problem(exc)

    app.add_exception_handler(AuthError, on_auth)
    app.add_exception_handler(RateLimited, on_rate)


def caller_subject(who: Principal) -> str:
    """The caller its limits and budgets are kept for: its API key, else its user."""
    return f"{who.kind}:{who.api_key_id or who.user_id}"


class Credentials(NamedTuple):
    """An authenticated caller; ``flag``/``api_key`` are set for API keys, and ``epoch``:
    the auth epoch the replica knew before the key was checked in Postgres (see
    :meth:`Gate.confirm`)."""

    principal: Principal
    flag: str | None
    api_key: str | None
    epoch: str = ""


class Gate:
    """A replica's authentication, API-key cache and rate limits."""

    def __init__(
        self,
        tokens: TokenIssuer,
        store: UserStore,
        limiter: RateLimiter,
        policy: RateLimitPolicy,
        proxies: TrustedProxies,
        replica: str,
    ) -> None:
        self.tokens = tokens
        self.store = store
        self.limiter = limiter
        self.policy = policy
        self.proxies = proxies
        self.replica = replica
        self._opened = False
        self._open_lock = asyncio.Lock()
        # key id -> (SHA-256 of the verified secret, principal, monotonic expiry, the auth
        # epoch known before it was checked in Postgres)
        self._keys: dict[str, tuple[bytes, Principal, float, str]] = {}
        self._epoch = ""  # the auth epoch of the last answer from Redis
        self._redis_watch: asyncio.Task[None] | None = None

    async def _open(self) -> None:
        if not self._opened:
            async with self._open_lock:
                if not self._opened:
                    await self.store.open()
                    self._opened = True

    # --- the guard of every route but checkout's --------------------------------------

    async def guard(self, request: Request, response: Response, action: str) -> Principal:
        """The caller of ``request`` if it may perform ``action`` within its limits; sets
        the rate-limit headers and ``X-Gateway-Replica`` on ``response``."""
        return await self.admit(
            request.headers.get("authorization"),
            request.headers.get("x-api-key"),
            self.client(request.scope),
            response.headers,
            action,
        )

    async def admit(
        self, authorization: str | None, api_key: str | None, ip: str, headers: Any, action: str
    ) -> Principal:
        """:meth:`guard` from the request's credentials and client address, for a route
        and a fast lane alike; the rate-limit headers and ``X-Gateway-Replica`` go into
        ``headers`` (a mapping)."""
        who = await self.authenticate(authorization, api_key)
        authorize(who.principal, action)
        decision = await self.limit(ip, headers, who.principal, None, who.flag)
        principal = await self.confirm(who, decision, action)
        headers["X-Gateway-Replica"] = self.replica
        return principal

    def client(self, scope: Any) -> str:
        """The client address the limits key on (serve/client_address.py)."""
        client = scope.get("client")
        peer = client[0] if client else None
        if not self.proxies.networks:
            return self.proxies.client(peer)
        return self.proxies.client(
            peer, [v for k, v in scope["headers"] if k == b"x-forwarded-for"]
        )

    # --- credentials ------------------------------------------------------------------

    async def authenticate(self, authorization: str | None, api_key: str | None) -> Credentials:
        if authorization:
            scheme, _, cred = authorization.partition(" ")
            if scheme.lower() != "bearer" or not cred:
                raise AuthError.unauthenticated("invalid_token", "use 'Authorization: Bearer <token>'")
            if cred.startswith("vk_"):
                api_key = cred
            else:
                return Credentials(self.tokens.verify(cred.strip()), None, None)
        if api_key:
            return await self._api_key(api_key.strip())
        raise AuthError.unauthenticated("missing_credentials", "send a bearer token or an API key")

    async def _api_key(self, plaintext: str) -> Credentials:
        """A key verified within API_KEY_CACHE_S comes from memory (secret compared by its
        SHA-256); its Redis flag, read with the rate limits, says whether it must be
        checked against the database again (revoked, or its owner's roles changed)."""
        key_id, secret = parse_api_key(plaintext)
        digest = hashlib.sha256(secret.encode("ascii")).digest()
        flag = keys.api_key_flag(key_id)
        if self._redis_watch is None:
            self._redis_watch = asyncio.get_running_loop().create_task(self._watch_redis())
        hit = self._keys.get(key_id)
        if hit is not None and hit[2] > time.monotonic() and hmac.compare_digest(hit[0], digest):
            return Credentials(hit[1], flag, plaintext, hit[3])
        epoch = self._epoch  # read before Postgres: what the check below is at least as new as
        principal = await self._api_key_from_db(plaintext)
        self._cache_key(key_id, digest, principal, epoch)
        return Credentials(principal, flag, plaintext, epoch)

    async def _watch_redis(self) -> None:
        """Forget every cached API key when Redis restarts or fails over (its ``run_id``
        changes, checked every second): the server may have come back without the last
        flags written (an append-only file synced every second, an older snapshot, an
        asynchronous replica) while the auth epoch survived. A total loss is seen at once
        by the epoch; this covers partial ones within about a second."""
        known = ""
        while True:
            await asyncio.sleep(1.0)
            try:
                run_id = await asyncio.wait_for(self.limiter.run_id(), 2.0)
            except Exception:  # Redis away: keys are checked in Postgres meanwhile
                continue
            if known and run_id != known:
                log.warning("Redis restarted or failed over; cached API keys are checked again")
                self._keys.clear()
            known = run_id

    def _cache_key(self, key_id: str, digest: bytes, principal: Principal, epoch: str) -> None:
        if len(self._keys) >= _KEY_CACHE_MAX:
            self._keys.clear()
        self._keys[key_id] = (digest, principal, time.monotonic() + API_KEY_CACHE_S, epoch)

    async def _api_key_from_db(self, plaintext: str) -> Principal:
        await self._open()
        return await self.store.authenticate_api_key(plaintext)

    async def confirm(self, who: Credentials, decision: Any, action: str) -> Principal:
        """The caller after the rate-limit call: an API key is checked in the database
        again when it is flagged, when Redis was unreachable (its flag is unknown), or when
        the auth epoch is not the one its check was made under (Redis lost its data, and
        with it any flag set meanwhile)."""
        if decision.epoch:
            self._epoch = decision.epoch
        if who.api_key is None:
            return who.principal
        if not (decision.flagged or decision.degraded or decision.epoch != who.epoch):
            return who.principal
        key_id, secret = parse_api_key(who.api_key)
        self._keys.pop(key_id, None)
        principal = await self._api_key_from_db(who.api_key)
        authorize(principal, action)
        digest = hashlib.sha256(secret.encode("ascii")).digest()
        self._cache_key(key_id, digest, principal, decision.epoch)
        return principal

    # --- rate limits and failed-attempt budgets ---------------------------------------

    async def limit(
        self,
        ip: str,
        headers: Any,
        who: Principal | None,
        failure_keys: list[str] | None = None,
        flag_key: str | None = None,
    ) -> Any:
        """Charge the caller's limits; with ``failure_keys``, also check (without charging)
        their failed-attempt budgets, and read ``flag_key``, all in one Redis call."""
        checks = []
        # Per-IP limits are for anonymous and customer traffic; a checkout service sends
        # all its customers' requests from one address and is limited by its API key.
        if who is None or customer_only(who):
            checks.append(self.policy.ip_check(ip))
        if who is not None:
            # the most generous of the caller's roles sets its limit
            role = max(who.roles, key=lambda r: self.policy.role_limit(r).rate)
            checks.append(self.policy.principal_check(role, caller_subject(who)))
        decision = await self.limiter.hit_and_check_failures(
            checks,
            failure_keys or [],
            self.policy,
            flag_key=flag_key,
            epoch_key=keys.API_KEY_EPOCH if flag_key is not None else None,
        )
        headers.update(rate_headers(decision))
        if not decision.allowed:
            what = "failed-attempt" if decision.key.startswith(keys.FAILURES) else "request"
            raise RateLimited(decision, what)
        return decision

    def guess_keys(self, ip: str, customer_id: str | None, who: Principal | None) -> list[str]:
        """Whose failure budgets a code-guessing attempt is checked against and spends:
        its customer's when it names one, else its client address's; and its caller's
        (API key or user, a larger budget) for callers that act for many customers, so
        omitting or rotating ``customer_id`` does not escape. One customer can spend at
        most its own budget of its caller's, so it never throttles another customer. The
        address budget is the caller's own at that address: behind the embedded HAProxy
        every client shares one address, and one key's guessing must not throttle another
        key's requests."""
        caller = None
        if who is not None and not customer_only(who):
            caller = caller_subject(who)
        if customer_id:
            budgets = [keys.customer(customer_id)]
        else:
            budgets = [keys.ip(ip) if caller is None else keys.ip_of_caller(ip, caller)]
        if caller is not None:
            budgets.append(keys.caller(caller))
        return budgets

    async def check_guessing(self, ip: str, customer_id: str | None, who: Principal | None) -> None:
        budgets = self.guess_keys(ip, customer_id, who)
        if not budgets:
            return
        decision = await self.limiter.check_failure_budget(budgets, self.policy)
        if not decision.allowed:
            raise RateLimited(decision, "failed-attempt")

    async def penalize(self, ip: str, customer_id: str | None, who: Principal | None) -> None:
        budgets = self.guess_keys(ip, customer_id, who)
        if budgets:
            await self.limiter.penalize_failure(budgets, self.policy)
