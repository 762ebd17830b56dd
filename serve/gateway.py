"""The HTTP gateway (Serve ingress): authentication, roles, rate limits, request
validation, and routing to the domain deployments — or, for the hot path, straight to the
shard actors through the micro-batcher, so concurrent redemptions cost one actor call per
shard instead of one per request.

Every endpoint states the action it needs (``serve.auth.PERMISSIONS`` maps actions to
roles); every error is an RFC 9457 problem.

Every request has an id: the client's ``X-Request-ID`` or a new one, returned in the
response's ``X-Request-ID`` (Serve does both), present in every JSON log line written while
the request is handled (a context variable), and passed to the shards with the request.

No ``from __future__ import annotations`` here: Serve's ingress rebinds these methods, and
FastAPI must resolve their annotations (``Request``...) as real objects.
"""


import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from typing import Annotated, Any, NamedTuple
from urllib.parse import quote

import msgspec
from fastapi import Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve

from actors.calls import Failure
from actors.client import attach_engine
from actors.gcpolicy import settle_heap
from actors.issuance import JOB_PREFIX as ISSUANCE_JOB_PREFIX
from actors.observability import (
    BatcherMetrics,
    RequestIdMiddleware,
    configure_json_logging,
    new_request_id,
    request_id_var,
)
from engine import errors
from engine.settings import Settings
from engine.shard_state import Outcome, RedeemRequest
from serve import metrics
from serve.auth import (
    API_KEY_CACHE_S,
    API_KEY_EPOCH,
    AuthError,
    Forbidden,
    Principal,
    TokenIssuer,
    api_key_flag,
    authorize,
    load_or_create_secret,
    parse_api_key,
)
from serve.batching import MicroBatcher
from serve.client_address import TrustedProxies, disable_uvicorn_rewrite
from serve.devices import DeviceTokens, account_key
from serve.health import HealthProbe
from serve.health import Report as HealthReport
from serve.idempotency import MAX_KEY_LEN, scoped_key
from serve.models import (
    MAX_INT64,
    ApiKeyIn,
    ApiKeyOut,
    CampaignIn,
    CampaignOut,
    CheckoutIn,
    CustomerIn,
    CustomerOut,
    GenerateIn,
    ImportOut,
    IsoDateTime,
    IssuanceIn,
    IssuanceJobOut,
    JobOut,
    LoginIn,
    RedemptionOut,
    RegisterIn,
    ReservationOut,
    RolesIn,
    TemplateIn,
    TokenOut,
    TransitionOut,
    UserOut,
    ValidationOut,
    WebhookIn,
    unstorable,
    unstorable_params,
)
from serve.problems import (
    BodySizeLimit,
    document_problems,
    from_engine_error,
    install_problem_handlers,
    internal_error_problem,
    path_methods,
    problem,
    problem_responses,
)
from serve.ratelimit import RateLimiter, RateLimitPolicy
from serve.ratelimit import headers as rate_headers
from serve.users import UserStore

log = logging.getLogger("voucher.gateway")

class _Auth(NamedTuple):
    """An authenticated caller; ``flag``/``api_key`` are set for API keys, and ``epoch``:
    the auth epoch the replica knew before the key was checked in Postgres (see _confirm)."""

    principal: Principal
    flag: str | None
    api_key: str | None
    epoch: str = ""


_KEY_CACHE_MAX = 10_000  # verified API keys kept per replica (cleared when full)


class _Order(msgspec.Struct, forbid_unknown_fields=True):
    amount: Annotated[int, msgspec.Meta(ge=0, le=10**12)]
    currency: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}\Z")]
    id: Annotated[str, msgspec.Meta(max_length=128)] | None = None


class _Checkout(msgspec.Struct, forbid_unknown_fields=True):
    """The fast lane's CheckoutIn: it accepts a subset of what the pydantic model accepts
    (no coercion of "12" into 12), and whatever it refuses goes to the FastAPI route."""

    code: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    order: _Order
    customer_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None


_checkout_decoder = msgspec.json.Decoder(_Checkout)
_HOT_ROUTES: dict[str, tuple[str, str]] = {
    "/v1/redemptions": ("redeem", "redemptions.create"),
    "/v1/validations": ("validate", "validations.create"),
    "/v1/reservations": ("reserve", "reservations.write"),
}
_HOT_HEADERS = frozenset(
    {b"authorization", b"x-api-key", b"idempotency-key", b"content-type", b"content-length", b"x-request-id"}
)
# The replica's Gateway (one per replica process), for the fast lane.
_HOT_GATEWAY: Any = None


def _serve_fast_lane(gateway: Any) -> None:
    # A module function, not code in Gateway: Serve pickles the Gateway class by value, so
    # a `global` statement in its methods would set a copy of this module's globals.
    global _HOT_GATEWAY
    _HOT_GATEWAY = gateway


def _bind_request_id(sent: bytes | None) -> Any:
    """What RequestIdMiddleware does, for the fast lane (Serve supplies the header)."""
    return request_id_var.set(sent.decode("latin-1")[:128] if sent else new_request_id())


def _unbind_request_id(token: Any) -> None:
    request_id_var.reset(token)


def _decode_checkout(raw: bytes) -> _Checkout:
    """The fast lane's body; raises ``msgspec.ValidationError`` for one it does not take
    (what the FastAPI route then answers), unstorable text included."""
    body = _checkout_decoder.decode(raw)
    if unstorable((body.code, body.customer_id, body.order.id)):
        raise msgspec.ValidationError("unstorable text")
    return body


def _encode(payload: Any) -> bytes:
    return _json_encoder.encode(payload)


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that first hands over a body already read."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Any:
        if pending:
            return pending.pop()
        return await receive()

    return replayed


class _GatewayAPI(FastAPI):
    """FastAPI with a fast lane in front of its whole middleware stack: well-formed POSTs to
    the checkout endpoints go to ``Gateway._hot`` (see there). Concrete paths shadow the
    templated ones for every method (serve.problems.PathMethods)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if scope["method"] == "POST":
                route = _HOT_ROUTES.get(scope["path"])
                if route is not None and _HOT_GATEWAY is not None:
                    await _HOT_GATEWAY._hot(self, route, scope, receive, send)
                    return
            refusal = path_methods(self).refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


async def _storable_params(request: Request) -> None:
    """Every route's path and query parameters (and stored headers) must be text Postgres
    can store; request bodies are checked by their models (serve/models.py)."""
    found = unstorable_params(request.path_params, request.query_params, request.headers)
    if found:
        raise RequestValidationError(found)


api = _GatewayAPI(
    dependencies=[Depends(_storable_params)],
    title="Voucher engine",
    version="1.0",
    description="Campaigns, voucher codes and exactly-once redemption. Amounts are integers "
    "in minor units. Errors are RFC 9457 problems. No string of a request (body field, path "
    "or query parameter) may contain a NUL character (U+0000) or an unpaired surrogate: "
    "such a request is refused with 422.",
    docs_url="/docs",
    openapi_url="/openapi.json",
)
install_problem_handlers(api)
document_problems(api)
# Body limits are enforced in front of FastAPI, before any body is read.
_env = Settings.from_env()
# The customer import streams its body (parsed and upserted batch by batch), so it may be
# far larger than a JSON body; its limit bounds the upload, not memory.
api.add_middleware(
    BodySizeLimit,
    max_bytes=_env.max_body_bytes,
    path_limits={"/v1/customers/import": _env.import_max_bytes},
)
# Added last, so outermost: even a 413 from the body limit is logged with the request id.
# Serve reads X-Request-ID (or makes one), passes it on and returns it on every response:
# the middleware only binds it for the logs and the shards (echo=False: not sent twice).
api.add_middleware(RequestIdMiddleware, echo=False)


# The problem statuses each route documents, by what the route does (every route lists the
# statuses it can answer, so clients and the schema fuzz see the truth).
_GUARDED = (401, 403, 429)  # behind _guard: credentials, roles, rate limit
_BODY = (400, 413, 422)  # reads a JSON body: malformed, too large, invalid
_CHECKOUT = (*_GUARDED, *_BODY, 404, 409, 410, 503)  # the hot path, decided by the shards


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


@api.exception_handler(AuthError)
async def _auth_problem(request: Request, exc: AuthError) -> JSONResponse:
    return auth_problem(exc)


@api.exception_handler(RateLimited)
async def _rate_problem(request: Request, exc: RateLimited) -> JSONResponse:
    return rate_problem(exc)


def _unwrap(value: Any) -> Any:
    if isinstance(value, Failure):
        raise errors.from_code(value.code, value.message)
    return value


def _redemption(r: Any) -> dict[str, Any]:
    d = msgspec.to_builtins(r)
    d["balance"] = d.pop("balance_after", None)
    d["status"] = "rolled_back" if d["status"] == 1 else "redeemed"
    return d


def _reservation(r: Any) -> dict[str, Any]:
    d = msgspec.to_builtins(r)
    d["state"] = ("held", "confirmed", "released", "expired")[d["state"]]
    return d


_json_encoder = msgspec.json.Encoder()


def _job(job: dict[str, Any]) -> dict[str, Any]:
    out = dict(job)
    rate = out.get("rate") or 0.0
    left = out["requested"] - out["generated"]
    out["eta_s"] = round(left / rate, 2) if rate and out["state"] == "running" else None
    return out


def _is_guess_failure(code: str) -> bool:
    """Failures a code-guessing attack produces: unknown or malformed codes, and someone
    else's code. Not the answers honest shoppers get in a flash sale (sold out, already
    used, limit reached): those must not lock a shop's customers out."""
    cls = errors.registry().get(code)
    return cls is not None and issubclass(
        cls, (errors.UnknownCode, errors.MalformedCode, errors.WrongCustomer)
    )


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=2000)
@serve.ingress(api)
class Gateway:
    def __init__(
        self,
        users: Any,
        campaigns: Any,
        vouchers: Any,
        delivery: Any,
        reports: Any,
        notifications: Any,
        settings: dict[str, Any],
        dsn: str,
        redis_url: str,
        customers: Any = None,
        issuance: Any = None,
    ) -> None:
        self.settings = msgspec.convert(settings, Settings)
        configure_json_logging(self.settings.log_level)
        self.users = users
        self.campaigns = campaigns
        self.vouchers = vouchers
        self.delivery = delivery
        self.reports = reports
        self.notifications = notifications
        self.engine = attach_engine(self.settings)
        self.batcher = MicroBatcher(
            self.engine,
            metrics=BatcherMetrics(),
            channels=self.settings.shard_channel,
            # the shard answers by its decision deadline; this fires only when it cannot
            deadline_s=self.settings.decision_deadline_s + 1.0,
        )
        secret = load_or_create_secret(self.settings)
        self.tokens = TokenIssuer(secret, ttl_s=self.settings.token_ttl_s)
        self.devices = DeviceTokens(secret)
        # The client address is decided here (serve/client_address.py), never by uvicorn.
        self.proxies = TrustedProxies.parse(self.settings.trusted_proxies)
        disable_uvicorn_rewrite()
        self.store = UserStore(dsn)
        self.limiter = RateLimiter(redis_url)
        self.policy = RateLimitPolicy.from_env()
        self.health_probe = HealthProbe(engine=self.engine, dsn=dsn, valkey_ping=self.limiter.ping)
        self._opened = False
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # not running under Serve (direct construction in a test)
            self.replica = "local"
        self._open_lock = asyncio.Lock()
        # issue 4: customers, issuance, webhooks (see the section at the end)
        self.customers = customers
        self.issuance = issuance
        self._dsn = dsn
        self._import_db: Any = None
        # key id -> (SHA-256 of the verified secret, principal, monotonic expiry, the auth
        # epoch known before it was checked in Postgres)
        self._keys: dict[str, tuple[bytes, Principal, float, str]] = {}
        self._epoch = ""  # the auth epoch of the last answer from Redis
        self._redis_watch: asyncio.Task[None] | None = None
        _serve_fast_lane(self)
        # Everything built so far (Ray, FastAPI, the routes) lives as long as the replica:
        # out of the collector's sight, and full collections rare (actors/gcpolicy.py).
        settle_heap()

    async def _open(self) -> None:
        if not self._opened:
            async with self._open_lock:
                if not self._opened:
                    await self.store.open()
                    self._opened = True

    # --- the checkout routes, registered first --------------------------------------------
    # They document the hot endpoints (OpenAPI) and answer what the fast lane hands over; a
    # well-formed request is answered by _hot. First in the route table because Serve
    # matches every request against the routes, in order, to name it in its metrics.

    @api.post(
        "/v1/validations",
        response_model=ValidationOut,
        tags=["vouchers"],
        responses=problem_responses(*_CHECKOUT),
    )
    async def validate(self, body: CheckoutIn, request: Request) -> Any:
        return await self._checkout_answer(
            "validate",
            "validations.create",
            body,
            request.headers.get("authorization"),
            request.headers.get("x-api-key"),
            None,
            self._client(request),
        )

    @api.post(
        "/v1/redemptions",
        status_code=201,
        response_model=RedemptionOut,
        tags=["vouchers"],
        responses=problem_responses(*_CHECKOUT),
    )
    async def redeem(
        self,
        body: CheckoutIn,
        request: Request,
        idempotency_key: str | None = Header(None, alias="Idempotency-Key", min_length=1, max_length=MAX_KEY_LEN),
    ) -> Any:
        return await self._checkout_answer(
            "redeem",
            "redemptions.create",
            body,
            request.headers.get("authorization"),
            request.headers.get("x-api-key"),
            idempotency_key,
            self._client(request),
        )

    @api.post(
        "/v1/reservations",
        status_code=201,
        response_model=ReservationOut,
        tags=["vouchers"],
        responses=problem_responses(*_CHECKOUT),
    )
    async def reserve(
        self,
        body: CheckoutIn,
        request: Request,
        idempotency_key: str | None = Header(None, alias="Idempotency-Key", min_length=1, max_length=MAX_KEY_LEN),
    ) -> Any:
        return await self._checkout_answer(
            "reserve",
            "reservations.write",
            body,
            request.headers.get("authorization"),
            request.headers.get("x-api-key"),
            idempotency_key,
            self._client(request),
        )

    # --- authentication, roles, rate limits -----------------------------------------------

    def _client(self, request: Request) -> str:
        """The client address the limits key on (serve/client_address.py)."""
        return self._scope_client(request.scope)

    def _scope_client(self, scope: Any) -> str:
        client = scope.get("client")
        peer = client[0] if client else None
        if not self.proxies.networks:
            return self.proxies.client(peer)
        return self.proxies.client(
            peer, [v for k, v in scope["headers"] if k == b"x-forwarded-for"]
        )

    async def _authenticate(self, authorization: str | None, api_key: str | None) -> _Auth:
        if authorization:
            scheme, _, cred = authorization.partition(" ")
            if scheme.lower() != "bearer" or not cred:
                raise AuthError.unauthenticated("invalid_token", "use 'Authorization: Bearer <token>'")
            if cred.startswith("vk_"):
                api_key = cred
            else:
                return _Auth(self.tokens.verify(cred.strip()), None, None)
        if api_key:
            return await self._api_key(api_key.strip())
        raise AuthError.unauthenticated("missing_credentials", "send a bearer token or an API key")

    async def _api_key(self, plaintext: str) -> _Auth:
        """A key verified within API_KEY_CACHE_S comes from memory (secret compared by its
        SHA-256); its Redis flag, read with the rate limits, says whether it must be
        checked against the database again (revoked, or its owner's roles changed)."""
        key_id, secret = parse_api_key(plaintext)
        digest = hashlib.sha256(secret.encode("ascii")).digest()
        flag = api_key_flag(key_id)
        if self._redis_watch is None:
            self._redis_watch = asyncio.get_running_loop().create_task(self._watch_redis())
        hit = self._keys.get(key_id)
        if hit is not None and hit[2] > time.monotonic() and hmac.compare_digest(hit[0], digest):
            return _Auth(hit[1], flag, plaintext, hit[3])
        epoch = self._epoch  # read before Postgres: what the check below is at least as new as
        principal = await self._api_key_from_db(plaintext)
        self._cache_key(key_id, digest, principal, epoch)
        return _Auth(principal, flag, plaintext, epoch)

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

    async def _confirm(self, who: _Auth, decision: Any, action: str) -> Principal:
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

    async def _guard(self, request: Request, response: Response, action: str) -> Principal:
        who = await self._authenticate(
            request.headers.get("authorization"), request.headers.get("x-api-key")
        )
        authorize(who.principal, action)
        decision = await self._limit(self._client(request), response.headers, who.principal, None, who.flag)
        principal = await self._confirm(who, decision, action)
        response.headers["X-Gateway-Replica"] = self.replica
        return principal

    async def _limit(
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
        if who is None or set(who.roles) <= {"customer"}:
            checks.append(self.policy.ip_check(ip))
        if who is not None:
            # the most generous of the caller's roles sets its limit
            role = max(who.roles, key=lambda r: self.policy.role_limit(r).rate)
            subject = f"{who.kind}:{who.api_key_id or who.user_id}"
            checks.append(self.policy.principal_check(role, subject))
        decision = await self.limiter.hit_and_check_failures(
            checks,
            failure_keys or [],
            self.policy,
            flag_key=flag_key,
            epoch_key=API_KEY_EPOCH if flag_key is not None else None,
        )
        headers.update(rate_headers(decision))
        if not decision.allowed:
            what = "failed-attempt" if decision.key.startswith("fail:") else "request"
            raise RateLimited(decision, what)
        return decision

    def _guess_keys(self, ip: str, customer_id: str | None, who: Principal | None) -> list[str]:
        """Whose failure budgets a code-guessing attempt is checked against and spends:
        its customer's when it names one, else its client address's; and its caller's
        (API key or user, a larger budget) for callers that act for many customers, so
        omitting or rotating ``customer_id`` does not escape. One customer can spend at
        most its own budget of its caller's, so it never throttles another customer. The
        address budget is the caller's own at that address: behind the embedded HAProxy
        every client shares one address, and one key's guessing must not throttle another
        key's requests."""
        caller = None
        if who is not None and not set(who.roles) <= {"customer"}:
            caller = f"{who.kind}:{who.api_key_id or who.user_id}"
        if customer_id:
            keys = [f"customer:{customer_id}"]
        else:
            keys = [f"ip:{ip}" if caller is None else f"ip:{ip}|{caller}"]
        if caller is not None:
            keys.append(f"caller:{caller}")
        return keys

    async def _check_guessing(self, ip: str, customer_id: str | None, who: Principal | None) -> None:
        keys = self._guess_keys(ip, customer_id, who)
        if not keys:
            return
        decision = await self.limiter.check_failure_budget(keys, self.policy)
        if not decision.allowed:
            raise RateLimited(decision, "failed-attempt")

    async def _penalize(self, ip: str, customer_id: str | None, who: Principal | None) -> None:
        keys = self._guess_keys(ip, customer_id, who)
        if keys:
            await self.limiter.penalize_failure(keys, self.policy)

    # --- health and metrics -----------------------------------------------------------

    @api.get("/healthz", tags=["ops"])
    async def healthz(self) -> dict[str, str]:
        """Liveness: the replica answers. Checks nothing else, costs nothing."""
        return {"status": "ok"}

    @api.get("/readyz", tags=["ops"], responses=problem_responses(503))
    async def readyz(self) -> Response:
        """Readiness: checkout can be served (shards loaded and committing, Postgres
        answering, coordinator reachable); Valkey away does not count (serve/health.py)."""
        report = await self._health()
        if not report.ready:
            why = "; ".join(f"{n}: {report.components[n].reason}" for n in report.not_ready())
            return problem(
                503, "not_ready", "Service Unavailable", f"not ready: {why}",
                headers={"Retry-After": "1"},
                components=msgspec.to_builtins(report.components),
            )
        return JSONResponse(
            {
                "status": "ready",
                "shards": len(report.shards),
                "components": msgspec.to_builtins(report.components),
            }
        )

    @api.get("/health", tags=["ops"])
    async def health(self) -> dict[str, Any]:
        """Each dependency's state (ok, degraded or down, with a reason) and each shard's."""
        return (await self._health()).body()

    async def _health(self) -> HealthReport:
        report = await self.health_probe.report()
        metrics.observe_health(report)
        return report

    @api.get(
        "/metrics", tags=["ops"], response_class=PlainTextResponse, responses=problem_responses(*_GUARDED)
    )
    async def metrics_(self, request: Request, response: Response) -> PlainTextResponse:
        await self._guard(request, response, "metrics.read")
        metrics.observe_batcher(self.batcher)
        await self._health()
        return PlainTextResponse(metrics.render(), media_type=metrics.CONTENT_TYPE)

    # --- users ----------------------------------------------------------------------------

    @api.post(
        "/v1/auth/register",
        status_code=201,
        response_model=UserOut,
        tags=["users"],
        responses=problem_responses(*_BODY, 409, 429),
    )
    async def register(self, body: RegisterIn, request: Request, response: Response) -> Any:
        await self._limit(self._client(request), response.headers, None)
        return _unwrap(await self.users.register.remote(body.email, body.password, body.name))

    @api.post(
        "/v1/auth/login", response_model=TokenOut, tags=["users"], responses=problem_responses(*_BODY, 401, 429)
    )
    async def login(self, body: LoginIn, request: Request, response: Response) -> Any:
        """Failed logins spend budgets in tiers whose waits grow: per client address and
        per account, or, for a device that logged in to this account before (its
        ``device_token``), that device's own. A budget is checked before the password and
        charged only by a failure, so a guesser gets 429 without an answer, one address
        cannot spend an account's budget alone, and the owner's device is never held up
        by anyone else's failures (serve/devices.py, README "Login defence")."""
        ip = self._client(request)
        account = account_key(body.email)
        device = self.devices.verify(body.device_token, account)
        keys = self.policy.login_keys(ip, account, device)
        # A known device's requests are counted as its own, not its (maybe shared) address's.
        checks = (
            [self.policy.principal_check("anonymous", f"device:{device}")]
            if device is not None
            else [self.policy.ip_check(ip)]
        )
        decision = await self.limiter.hit_and_check_failures(checks, keys, self.policy)
        response.headers.update(rate_headers(decision))
        if not decision.allowed:
            what = "failed-login" if decision.key.startswith("fail:") else "request"
            raise RateLimited(decision, what)
        result = await self.users.login.remote(body.email, body.password)
        if isinstance(result, Failure):
            if result.code == "invalid_credentials":  # not when the user store is away
                await self.limiter.penalize_failure(keys, self.policy)
            return _unwrap(result)
        return {**result, "device_token": self.devices.issue(account)}

    @api.get("/v1/users/me", response_model=UserOut, tags=["users"], responses=problem_responses(*_GUARDED, 404))
    async def me(self, request: Request, response: Response) -> Any:
        p = await self._guard(request, response, "users.me")
        if p.kind == "api_key":
            return {"id": p.user_id, "roles": list(p.roles), "kind": "api_key"}
        return _unwrap(await self.users.get.remote(p.user_id))

    @api.get("/v1/users/me/vouchers", tags=["vouchers"], responses=problem_responses(*_GUARDED, 422))
    async def my_vouchers(
        self, request: Request, response: Response, limit: int = Query(100, ge=1, le=1000)
    ) -> Any:
        p = await self._guard(request, response, "vouchers.read")
        return {"items": _unwrap(await self.vouchers.of_customer.remote(p.user_id, limit))}

    @api.put(
        "/v1/users/{user_id}/roles",
        response_model=UserOut,
        tags=["users"],
        responses=problem_responses(*_GUARDED, *_BODY, 404, 409),
    )
    async def set_roles(self, user_id: str, body: RolesIn, request: Request, response: Response) -> Any:
        await self._guard(request, response, "users.set_roles")
        return _unwrap(await self.users.set_roles.remote(user_id, body.roles))

    @api.post(
        "/v1/api-keys",
        status_code=201,
        response_model=ApiKeyOut,
        tags=["users"],
        responses=problem_responses(*_GUARDED, *_BODY, 404),
    )
    async def create_api_key(self, body: ApiKeyIn, request: Request, response: Response) -> Any:
        p = await self._guard(request, response, "api_keys.create")
        return _unwrap(await self.users.create_api_key.remote(p, body.name, body.roles))

    @api.get("/v1/api-keys", tags=["users"], responses=problem_responses(*_GUARDED))
    async def list_api_keys(self, request: Request, response: Response) -> Any:
        p = await self._guard(request, response, "api_keys.create")
        return {"items": _unwrap(await self.users.list_api_keys.remote(p))}

    @api.delete("/v1/api-keys/{key_id}", tags=["users"], responses=problem_responses(*_GUARDED, 404, 422))
    async def revoke_api_key(self, key_id: str, request: Request, response: Response) -> Any:
        p = await self._guard(request, response, "api_keys.create")
        return _unwrap(await self.users.revoke_api_key.remote(key_id, p))

    # --- campaigns ------------------------------------------------------------------------

    @api.post(
        "/v1/campaigns",
        status_code=201,
        response_model=CampaignOut,
        tags=["campaigns"],
        responses=problem_responses(*_GUARDED, *_BODY, 409),
    )
    async def create_campaign(self, body: CampaignIn, request: Request, response: Response) -> Any:
        await self._guard(request, response, "campaigns.write")
        fields = body.model_dump(exclude_none=True)
        fields["windows"] = [w for w in fields.get("windows", [])]
        c = _unwrap(await self.campaigns.create.remote(fields))
        response.headers["Location"] = f"/v1/campaigns/{c['id']}"
        return c

    @api.get("/v1/campaigns", tags=["campaigns"], responses=problem_responses(*_GUARDED, 422))
    async def list_campaigns(
        self,
        request: Request,
        response: Response,
        state: str | None = Query(None, pattern="^(draft|active|paused|ended)$"),
        limit: int = Query(50, ge=1, le=500),
        offset: int = Query(0, ge=0, le=MAX_INT64),
    ) -> Any:
        await self._guard(request, response, "campaigns.read")
        return _unwrap(await self.campaigns.list.remote(state, limit, offset))

    @api.get(
        "/v1/campaigns/{campaign_id}",
        response_model=CampaignOut,
        tags=["campaigns"],
        responses=problem_responses(*_GUARDED, 404, 422),
    )
    async def get_campaign(self, campaign_id: str, request: Request, response: Response) -> Any:
        await self._guard(request, response, "campaigns.read")
        return _unwrap(await self.campaigns.get.remote(campaign_id))

    async def _transition(self, campaign_id: str, action: str, request: Request, response: Response) -> Any:
        await self._guard(request, response, "campaigns.write")
        c = _unwrap(await self.campaigns.transition.remote(campaign_id, action))
        words = {"activate": "started", "pause": "paused", "end": "ended"}
        self.notifications.record.remote(
            f"campaign_{words[action]}", campaign_id, f"campaign {c['name']} ({campaign_id}) {words[action]}"
        )
        return c

    @api.post(
        "/v1/campaigns/{campaign_id}/activate",
        response_model=TransitionOut,
        tags=["campaigns"],
        responses=problem_responses(*_GUARDED, 404, 409, 422),
    )
    async def activate(self, campaign_id: str, request: Request, response: Response) -> Any:
        return await self._transition(campaign_id, "activate", request, response)

    @api.post(
        "/v1/campaigns/{campaign_id}/pause",
        response_model=TransitionOut,
        tags=["campaigns"],
        responses=problem_responses(*_GUARDED, 404, 409, 422),
    )
    async def pause(self, campaign_id: str, request: Request, response: Response) -> Any:
        return await self._transition(campaign_id, "pause", request, response)

    @api.post(
        "/v1/campaigns/{campaign_id}/end",
        response_model=TransitionOut,
        tags=["campaigns"],
        responses=problem_responses(*_GUARDED, 404, 409, 422),
    )
    async def end(self, campaign_id: str, request: Request, response: Response) -> Any:
        return await self._transition(campaign_id, "end", request, response)

    @api.post(
        "/v1/campaigns/{campaign_id}/generate",
        status_code=202,
        response_model=JobOut,
        tags=["campaigns"],
        responses=problem_responses(*_GUARDED, *_BODY, 404, 409),
    )
    async def generate(self, campaign_id: str, body: GenerateIn, request: Request, response: Response) -> Any:
        await self._guard(request, response, "campaigns.generate")
        job = _unwrap(await self.campaigns.start_generation.remote(campaign_id, body.count))
        response.headers["Location"] = f"/v1/jobs/{job['id']}"
        return _job(job)

    @api.get(
        "/v1/jobs/{job_id}",
        response_model=IssuanceJobOut | JobOut,
        tags=["campaigns"],
        responses=problem_responses(*_GUARDED, 404, 422),
    )
    async def job(self, job_id: str, request: Request, response: Response) -> Any:
        await self._guard(request, response, "jobs.read")
        if job_id.startswith(ISSUANCE_JOB_PREFIX):
            return _unwrap(await self.issuance.job.remote(job_id))
        return _job(_unwrap(await self.campaigns.job.remote(job_id)))

    @api.get(
        "/v1/campaigns/{campaign_id}/overview",
        tags=["campaigns"],
        responses=problem_responses(*_GUARDED, 404, 422),
    )
    async def overview(self, campaign_id: str, request: Request, response: Response) -> Any:
        """Campaign, live counters and delivery status, fetched concurrently."""
        await self._guard(request, response, "overview.read")
        campaign, live, delivery = await asyncio.gather(
            self.campaigns.get.remote(campaign_id),
            self.reports.live.remote(campaign_id),
            self.delivery.status.remote(campaign_id),
        )
        return {"campaign": _unwrap(campaign), "stats": _unwrap(live), "delivery": _unwrap(delivery)}

    # --- vouchers: the hot path -----------------------------------------------------------

    @api.get("/v1/vouchers/{code}", tags=["vouchers"], responses=problem_responses(*_GUARDED, 404, 422))
    async def voucher(self, code: str, request: Request, response: Response) -> Any:
        p = await self._guard(request, response, "vouchers.read")
        if "customer" in p.roles and len(p.roles) == 1:
            await self._check_guessing(self._client(request), p.user_id, p)
            found = await self.vouchers.get.remote(code)
            if isinstance(found, Failure) or found.get("customer_id") != p.user_id:
                await self._penalize(self._client(request), p.user_id, p)
                raise errors.UnknownCode(f"no voucher of yours has code {code!r}")
            return found
        return _unwrap(await self.vouchers.get.remote(code))

    def _checkout(self, body: Any, p: Principal, key: str | None) -> RedeemRequest:
        """``body``: a CheckoutIn (FastAPI route) or a _Checkout (fast lane): same fields."""
        customer = body.customer_id
        if p.roles == ("customer",) or list(p.roles) == ["customer"]:
            if customer is not None and customer != p.user_id:
                raise Forbidden("forbidden", "customers act only for themselves")
            customer = p.user_id
        return RedeemRequest(
            code=body.code,
            amount=body.order.amount,
            currency=body.order.currency,
            customer_id=customer,
            order_id=body.order.id,
            idempotency_key=scoped_key(p, key),
        )

    async def _checkout_answer(
        self,
        op: str,
        action: str,
        body: Any,
        authorization: str | None,
        api_key: str | None,
        idempotency_key: str | None,
        ip: str,
    ) -> Response:
        """A validation, redemption or reservation from credentials to answer: role, the
        caller's rate limits + the failed-attempt budgets + the API key's flag in ONE Redis
        call, then the shard's decision through the micro-batcher. Raises auth, rate-limit
        and input errors (answered as problems by the caller); rejections by the engine
        come back as problem responses."""
        who = await self._authenticate(authorization, api_key)
        authorize(who.principal, action)
        req = self._checkout(body, who.principal, idempotency_key)
        headers: dict[str, str] = {"X-Gateway-Replica": self.replica}
        decision = await self._limit(
            ip, headers, who.principal, self._guess_keys(ip, req.customer_id, who.principal), who.flag
        )
        p = await self._confirm(who, decision, action)
        if p is not who.principal:
            req = self._checkout(body, p, idempotency_key)
        out = await self._decide(op, req, ip, p)
        if out.rejection is not None:
            resp = from_engine_error(errors.from_code(out.rejection.error, out.rejection.message))
            resp.headers.update(headers)
            return resp
        payload: dict[str, Any]
        if op == "redeem":
            status, payload = 201, _redemption(out.redemption)
            headers["Location"] = f"/v1/redemptions/{payload['id']}"
        elif op == "validate":
            status, payload = 200, msgspec.to_builtins(out.validation)
            payload["reason"] = payload.pop("error", None)
        else:
            status, payload = 201, _reservation(out.reservation)
        return Response(
            _encode(payload), status_code=status, media_type="application/json", headers=headers
        )

    async def _decide(self, op: str, req: RedeemRequest, ip: str, who: Principal) -> Outcome:
        t0 = time.perf_counter()
        out: Outcome = await self.batcher.submit(op, req)
        metrics.observe_decision(op, out, time.perf_counter() - t0)
        failed = out.rejection.error if out.rejection is not None else None
        if out.validation is not None and not out.validation.valid:
            failed = out.validation.error
        if log.isEnabledFor(logging.DEBUG):  # request_id comes from the context
            log.debug("%s decided: %s", op, failed or "ok", extra={"op": op, "outcome": failed or "ok"})
        if failed is not None and _is_guess_failure(failed):
            await self._penalize(ip, req.customer_id, who)
        return out

    async def _hot(
        self, app: FastAPI, route: tuple[str, str], scope: Any, receive: Any, send: Any
    ) -> None:
        """The fast lane for POST /v1/validations, /v1/redemptions and /v1/reservations:
        the same work as their FastAPI routes, without Starlette's routing, middleware stack
        and dependency solving, and with the body decoded by msgspec. Anything it does not
        handle the usual way (no or too large Content-Length, a non-JSON content type, a
        body that does not decode into the expected shape) goes to FastAPI with the body
        replayed, so every error answer is the one the documented routes give."""
        op, action = route
        h: dict[bytes, bytes] = {}
        for k, v in scope["headers"]:
            if k in _HOT_HEADERS and k not in h:
                h[k] = v
        length = h.get(b"content-length")
        ctype = h.get(b"content-type")
        if (
            length is None
            or not length.isdigit()
            or int(length) > self.settings.max_body_bytes
            or (ctype is not None and ctype.split(b";", 1)[0].strip().lower() != b"application/json")
        ):
            await FastAPI.__call__(app, scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        token = _bind_request_id(h.get(b"x-request-id"))
        try:
            try:
                body = _decode_checkout(raw)
            except msgspec.MsgspecError:
                await FastAPI.__call__(app, scope, _replay(raw, receive), send)
                return
            idem = h.get(b"idempotency-key")
            if idem is not None and b"\x00" in idem:
                await FastAPI.__call__(app, scope, _replay(raw, receive), send)
                return
            auth = h.get(b"authorization")
            key = h.get(b"x-api-key")
            try:
                resp = await self._checkout_answer(
                    op,
                    action,
                    body,
                    auth.decode("latin-1") if auth is not None else None,
                    key.decode("latin-1") if key is not None else None,
                    idem.decode("latin-1") if idem is not None else None,
                    self._scope_client(scope),
                )
            except AuthError as exc:
                resp = auth_problem(exc)
            except RateLimited as exc:
                resp = rate_problem(exc)
            except errors.VoucherError as exc:
                resp = from_engine_error(exc)
            except Exception as exc:  # never a traceback: the same answer as FastAPI's handler
                incident = uuid.uuid4().hex
                log.error(
                    "unhandled error on POST %s (incident %s)", scope["path"], incident,
                    exc_info=(type(exc), exc, exc.__traceback__),
                )
                resp = internal_error_problem(incident)
            await resp(scope, receive, send)
        finally:
            _unbind_request_id(token)

    @api.post(
        "/v1/redemptions/{redemption_id}/rollback",
        response_model=RedemptionOut,
        tags=["vouchers"],
        responses=problem_responses(*_CHECKOUT),
    )
    async def rollback(
        self,
        redemption_id: str,
        request: Request,
        response: Response,
        idempotency_key: str | None = Header(None, alias="Idempotency-Key", min_length=1, max_length=MAX_KEY_LEN),
    ) -> Any:
        p = await self._guard(request, response, "redemptions.rollback")
        key = scoped_key(p, idempotency_key)
        return _redemption(await self.engine.rollback(redemption_id, key))

    @api.post(
        "/v1/reservations/{reservation_id}/confirm",
        status_code=201,
        response_model=RedemptionOut,
        tags=["vouchers"],
        responses=problem_responses(*_CHECKOUT),
    )
    async def confirm(
        self,
        reservation_id: str,
        request: Request,
        response: Response,
        idempotency_key: str | None = Header(None, alias="Idempotency-Key", min_length=1, max_length=MAX_KEY_LEN),
    ) -> Any:
        p = await self._guard(request, response, "reservations.write")
        key = scoped_key(p, idempotency_key)
        return _redemption(await self.engine.confirm(reservation_id, key))

    @api.post(
        "/v1/reservations/{reservation_id}/release",
        response_model=ReservationOut,
        tags=["vouchers"],
        responses=problem_responses(*_CHECKOUT),
    )
    async def release(
        self,
        reservation_id: str,
        request: Request,
        response: Response,
        idempotency_key: str | None = Header(None, alias="Idempotency-Key", min_length=1, max_length=MAX_KEY_LEN),
    ) -> Any:
        p = await self._guard(request, response, "reservations.write")
        key = scoped_key(p, idempotency_key)
        return _reservation(await self.engine.release(reservation_id, key))

    # --- notifications ----------------------------------------------------------------

    @api.get("/v1/notifications", tags=["notifications"], responses=problem_responses(*_GUARDED, 422))
    async def list_notifications(
        self,
        request: Request,
        response: Response,
        unread: bool = False,
        limit: int = Query(50, ge=1, le=500),
    ) -> Any:
        await self._guard(request, response, "notifications.read")
        return {"items": _unwrap(await self.notifications.list.remote(unread, limit))}

    @api.post(
        "/v1/notifications/{notification_id}/read",
        tags=["notifications"],
        responses=problem_responses(*_GUARDED, 404, 422),
    )
    async def read_notification(
        self, request: Request, response: Response, notification_id: int = Path(ge=1, le=MAX_INT64)
    ) -> Any:
        await self._guard(request, response, "notifications.read")
        return _unwrap(await self.notifications.mark_read.remote(notification_id))


    # --- customers, issuance, notification webhooks (issue 4) ---------------------------

    @api.post(
        "/v1/customers",
        status_code=201,
        response_model=CustomerOut,
        tags=["customers"],
        responses=problem_responses(*_GUARDED, *_BODY, 409),
    )
    async def create_customer(self, body: CustomerIn, request: Request, response: Response) -> Any:
        await self._guard(request, response, "customers.write")
        c = _unwrap(await self.customers.create.remote(body.model_dump(exclude_none=True)))
        response.headers["Location"] = f"/v1/customers/{quote(c['id'], safe='')}"
        return c

    @api.get("/v1/customers", tags=["customers"], responses=problem_responses(*_GUARDED, 422))
    async def list_customers(
        self,
        request: Request,
        response: Response,
        tag: str | None = Query(None, max_length=64),
        after: str | None = Query(None, max_length=128, description="last id of the previous page"),
        limit: int = Query(100, ge=1, le=1000),
    ) -> Any:
        await self._guard(request, response, "customers.read")
        return _unwrap(await self.customers.list.remote(tag.lower() if tag else None, after, limit))

    @api.get(
        "/v1/customers/{customer_id}",
        response_model=CustomerOut,
        tags=["customers"],
        responses=problem_responses(*_GUARDED, 404, 422),
    )
    async def get_customer(self, customer_id: str, request: Request, response: Response) -> Any:
        await self._guard(request, response, "customers.read")
        return _unwrap(await self.customers.get.remote(customer_id))

    @api.post(
        "/v1/customers/import",
        response_model=ImportOut,
        tags=["customers"],
        responses=problem_responses(*_GUARDED, 400, 413, 415, 422),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "text/csv": {"schema": {"type": "string"}},
                    "application/x-ndjson": {"schema": {"type": "string"}},
                },
            }
        },
    )
    async def import_customers(self, request: Request, response: Response) -> Any:
        """Bulk upsert from CSV (header line naming the columns) or JSON lines, read as it
        streams in and written in batches. Valid rows land; each refused row is reported
        with its line, field and reason."""
        await self._guard(request, response, "customers.write")
        from engine.customers import parser_for
        from store.customers import import_stream

        parser_for(request.headers.get("content-type"))  # 415 before reading anything
        if self._import_db is None:
            import asyncpg

            self._import_db = await asyncpg.create_pool(self._dsn, min_size=1, max_size=2)
        return await import_stream(
            self._import_db,
            request.headers.get("content-type"),
            request.stream(),
            self.settings.import_batch,
        )

    @api.post(
        "/v1/campaigns/{campaign_id}/issuance",
        status_code=202,
        response_model=IssuanceJobOut,
        tags=["campaigns"],
        responses=problem_responses(*_GUARDED, *_BODY, 404, 409),
    )
    async def issue(self, campaign_id: str, body: IssuanceIn, request: Request, response: Response) -> Any:
        """Give every selected customer a code (the same one on a re-run) and queue one
        message per customer and consented channel; progress at ``GET /v1/jobs/{id}``."""
        await self._guard(request, response, "issuance.create")
        job = _unwrap(
            await self.issuance.start.remote(
                campaign_id, body.selection.model_dump(exclude_none=True), list(body.channels)
            )
        )
        response.headers["Location"] = f"/v1/jobs/{job['id']}"
        return job

    @api.post(
        "/v1/notification-webhooks",
        status_code=201,
        tags=["notifications"],
        responses=problem_responses(*_GUARDED, *_BODY),
    )
    async def add_webhook(self, body: WebhookIn, request: Request, response: Response) -> Any:
        """Register an endpoint for signed notification webhooks (the secret is shown once)."""
        await self._guard(request, response, "webhooks.manage")
        return _unwrap(await self.issuance.add_webhook.remote(body.url, body.secret, body.kinds))

    @api.get("/v1/notification-webhooks", tags=["notifications"], responses=problem_responses(*_GUARDED))
    async def list_webhooks(self, request: Request, response: Response) -> Any:
        await self._guard(request, response, "webhooks.manage")
        return {"items": _unwrap(await self.issuance.list_webhooks.remote())}

    @api.delete(
        "/v1/notification-webhooks/{webhook_id}",
        tags=["notifications"],
        responses=problem_responses(*_GUARDED, 404, 422),
    )
    async def remove_webhook(self, webhook_id: str, request: Request, response: Response) -> Any:
        await self._guard(request, response, "webhooks.manage")
        return _unwrap(await self.issuance.remove_webhook.remote(webhook_id))

    @api.get(
        "/v1/notifications/{notification_id}/deliveries",
        tags=["notifications"],
        responses=problem_responses(*_GUARDED, 422),
    )
    async def notification_deliveries(
        self,
        request: Request,
        response: Response,
        notification_id: int = Path(ge=1, le=MAX_INT64),
    ) -> Any:
        """Where a notification was sent (email, webhooks) and every attempt."""
        await self._guard(request, response, "notifications.read")
        return {"items": _unwrap(await self.issuance.sends.remote(notification_id))}

    # --- delivery (issue 4: templates, delivery records, dead letters) ----------------

    @api.put(
        "/v1/campaigns/{campaign_id}/templates/{channel}",
        tags=["delivery"],
        responses=problem_responses(*_GUARDED, *_BODY, 404),
    )
    async def put_template(
        self,
        campaign_id: str,
        body: TemplateIn,
        request: Request,
        response: Response,
        channel: str = Path(pattern="^(email|sms|push)$"),
    ) -> Any:
        """Set the campaign's template for a channel and locale (validated now: a template
        that does not compile or uses an unknown variable is a 422, never a send failure)."""
        await self._guard(request, response, "templates.write")
        return _unwrap(
            await self.delivery.put_template.remote(
                campaign_id, channel, body.locale, body.subject, body.body, body.default
            )
        )

    @api.get(
        "/v1/campaigns/{campaign_id}/templates",
        tags=["delivery"],
        responses=problem_responses(*_GUARDED, 404, 422),
    )
    async def list_templates(self, campaign_id: str, request: Request, response: Response) -> Any:
        await self._guard(request, response, "deliveries.read")
        return _unwrap(await self.delivery.templates.remote(campaign_id))

    @api.get(
        "/v1/campaigns/{campaign_id}/deliveries",
        tags=["delivery"],
        responses=problem_responses(*_GUARDED, 404, 422),
    )
    async def list_deliveries(
        self,
        campaign_id: str,
        request: Request,
        response: Response,
        state: str | None = Query(None, pattern="^(queued|sending|sent|failed|dead)$"),
        channel: str | None = Query(None, pattern="^(email|sms|push)$"),
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0, le=MAX_INT64),
    ) -> Any:
        """The campaign's delivery records (one per message), optionally by state/channel."""
        await self._guard(request, response, "deliveries.read")
        return _unwrap(await self.delivery.deliveries.remote(campaign_id, state, channel, limit, offset))

    @api.get(
        "/v1/campaigns/{campaign_id}/delivery",
        tags=["delivery"],
        responses=problem_responses(*_GUARDED, 404, 422),
    )
    async def delivery_status(self, campaign_id: str, request: Request, response: Response) -> Any:
        """Counts of the campaign's messages per channel and state."""
        await self._guard(request, response, "deliveries.read")
        return _unwrap(await self.delivery.status.remote(campaign_id))

    @api.get("/v1/deliveries/dead", tags=["delivery"], responses=problem_responses(*_GUARDED, 422))
    async def dead_deliveries(
        self,
        request: Request,
        response: Response,
        campaign_id: str | None = None,
        limit: int = Query(100, ge=1, le=1000),
    ) -> Any:
        """Messages that used up their attempts (newest first), with their last error."""
        await self._guard(request, response, "deliveries.read")
        return _unwrap(await self.delivery.dead.remote(campaign_id, limit))

    # --- reports (issue 5) ----------------------------------------------------------------
    # Campaign effectiveness from the reporting rollups, live flash-sale counters, and CSV
    # export of every report: `?format=csv` or `Accept: text/csv`. Role: analyst and up.

    _REPORT_OK: dict[int | str, dict[str, Any]] = {
        200: {
            "description": "The report as JSON, or as CSV (`?format=csv` / `Accept: text/csv`)",
            "content": {"application/json": {}, "text/csv": {"schema": {"type": "string"}}},
        }
    }

    async def _report(
        self,
        request: Request,
        response: Response,
        fmt: str | None,
        name: str,
        call: Any,
    ) -> Any:
        await self._guard(request, response, "reports.read")
        body = _unwrap(await call)
        wants_csv = fmt == "csv" if fmt is not None else "text/csv" in request.headers.get("accept", "").lower()
        if wants_csv:
            from engine.reports import table_of, to_csv

            return Response(
                to_csv(table_of(body)),
                media_type="text/csv; charset=utf-8",
                headers={
                    **dict(response.headers),
                    "Content-Disposition": f'attachment; filename="{name}.csv"',
                },
            )
        return body

    @api.get(
        "/v1/reports/campaigns",
        tags=["reports"],
        responses={**_REPORT_OK, **problem_responses(*_GUARDED, 422)},
    )
    async def report_overview(
        self,
        request: Request,
        response: Response,
        top: int = Query(10, ge=1, le=100),
        format: str | None = Query(None, pattern="^(json|csv)$"),
    ) -> Any:
        """Every campaign's funnel and money figures, totals and the top campaigns by net
        redemptions (rows: one per campaign)."""
        return await self._report(
            request, response, format, "campaigns", self.reports.overview.remote(top)
        )

    @api.get(
        "/v1/reports/campaigns/{campaign_id}",
        tags=["reports"],
        responses={**_REPORT_OK, **problem_responses(*_GUARDED, 404, 422)},
    )
    async def report_campaign(
        self,
        campaign_id: str,
        request: Request,
        response: Response,
        format: str | None = Query(None, pattern="^(json|csv)$"),
    ) -> Any:
        """Funnel (generated -> assigned -> delivered -> redeemed), rates, money, time to
        first redemption and delivery success per channel of one campaign."""
        return await self._report(
            request, response, format, f"campaign-{campaign_id}",
            self.reports.campaign.remote(campaign_id),
        )

    @api.get(
        "/v1/reports/campaigns/{campaign_id}/timeseries",
        tags=["reports"],
        responses={**_REPORT_OK, **problem_responses(*_GUARDED, 404, 422)},
    )
    async def report_timeseries(
        self,
        campaign_id: str,
        request: Request,
        response: Response,
        bucket: str = Query("hour", pattern="^(minute|hour|day)$"),
        since: IsoDateTime | None = None,
        until: IsoDateTime | None = None,
        format: str | None = Query(None, pattern="^(json|csv)$"),
    ) -> Any:
        """Redemptions per minute, or per hour/day of the campaign's time zone; empty
        buckets included. ``since``/``until``: ISO 8601 with an offset; by default from the
        start of activity (at most 6 h of minutes, 14 days of hours, a year of days) to now."""
        for label, value in (("since", since), ("until", until)):
            if value is not None and value.tzinfo is None:
                raise errors.InvalidInput(f"{label} must carry a time zone offset")
        return await self._report(
            request, response, format, f"timeseries-{campaign_id}-{bucket}",
            self.reports.timeseries.remote(campaign_id, bucket, since, until),
        )

    @api.get(
        "/v1/reports/campaigns/{campaign_id}/hours",
        tags=["reports"],
        responses={**_REPORT_OK, **problem_responses(*_GUARDED, 404, 422)},
    )
    async def report_hours(
        self,
        campaign_id: str,
        request: Request,
        response: Response,
        format: str | None = Query(None, pattern="^(json|csv)$"),
    ) -> Any:
        """Redemptions by hour of day (0..23) in the campaign's time zone."""
        return await self._report(
            request, response, format, f"hours-{campaign_id}",
            self.reports.hours.remote(campaign_id),
        )

    @api.get(
        "/v1/reports/campaigns/{campaign_id}/segments",
        tags=["reports"],
        responses={**_REPORT_OK, **problem_responses(*_GUARDED, 404, 422)},
    )
    async def report_segments(
        self,
        campaign_id: str,
        request: Request,
        response: Response,
        format: str | None = Query(None, pattern="^(json|csv)$"),
    ) -> Any:
        """Redemptions by customer segment (customer tag)."""
        return await self._report(
            request, response, format, f"segments-{campaign_id}",
            self.reports.segments.remote(campaign_id),
        )

    @api.get(
        "/v1/reports/campaigns/{campaign_id}/channels",
        tags=["reports"],
        responses={**_REPORT_OK, **problem_responses(*_GUARDED, 404, 422)},
    )
    async def report_channels(
        self,
        campaign_id: str,
        request: Request,
        response: Response,
        format: str | None = Query(None, pattern="^(json|csv)$"),
    ) -> Any:
        """Deliveries per channel and state, and each channel's success rate."""
        return await self._report(
            request, response, format, f"channels-{campaign_id}",
            self.reports.channels.remote(campaign_id),
        )

    @api.get(
        "/v1/reports/campaigns/{campaign_id}/live",
        tags=["reports"],
        responses={**_REPORT_OK, **problem_responses(*_GUARDED, 404, 422)},
    )
    async def report_live(
        self,
        campaign_id: str,
        request: Request,
        response: Response,
        format: str | None = Query(None, pattern="^(json|csv)$"),
    ) -> Any:
        """Live counters from the shards' memory: redemptions per second, quantity left and
        the forecast time to sell-out of a flash sale."""
        return await self._report(
            request, response, format, f"live-{campaign_id}",
            self.reports.live.remote(campaign_id),
        )
