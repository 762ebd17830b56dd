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
import logging
import time
from datetime import datetime
from typing import Any

import msgspec
from fastapi import FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve

from actors.calls import Failure
from actors.client import attach_engine
from actors.observability import BatcherMetrics, RequestIdMiddleware, configure_json_logging
from engine import errors
from engine.pools import Outcome, RedeemRequest
from engine.settings import Settings
from serve import metrics
from serve.auth import (
    AuthError,
    Forbidden,
    Principal,
    TokenIssuer,
    authorize,
    load_or_create_secret,
)
from serve.batching import MicroBatcher
from serve.models import (
    ApiKeyIn,
    ApiKeyOut,
    CampaignIn,
    CampaignOut,
    CheckoutIn,
    GenerateIn,
    JobOut,
    LoginIn,
    RedemptionOut,
    RegisterIn,
    ReservationOut,
    RolesIn,
    TokenOut,
    UserOut,
    ValidationOut,
)
from serve.problems import (
    BodySizeLimit,
    document_problems,
    from_engine_error,
    install_problem_handlers,
    problem,
    problem_responses,
)
from serve.ratelimit import RateLimiter, RateLimitPolicy
from serve.ratelimit import headers as rate_headers
from serve.users import UserStore

log = logging.getLogger("voucher.gateway")

api = FastAPI(
    title="Voucher engine",
    version="1.0",
    description="Campaigns, voucher codes and exactly-once redemption. Amounts are integers "
    "in minor units. Errors are RFC 9457 problems.",
    docs_url="/docs",
    openapi_url="/openapi.json",
)
install_problem_handlers(api)
document_problems(api)
# Body limits are enforced in front of FastAPI, before any body is read.
api.add_middleware(BodySizeLimit, max_bytes=Settings.from_env().max_body_bytes)
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


@api.exception_handler(AuthError)
async def _auth_problem(request: Request, exc: AuthError) -> JSONResponse:
    resp = problem(exc.status, exc.type, "Forbidden" if exc.status == 403 else "Unauthorized", exc.detail)
    if exc.status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="voucher-engine"'
    return resp


@api.exception_handler(RateLimited)
async def _rate_problem(request: Request, exc: RateLimited) -> JSONResponse:
    metrics.RATE_LIMITED.labels(exc.what).inc()
    resp = problem(429, "rate_limited", "Too Many Requests", f"{exc.what} rate limit exceeded; retry later")
    resp.headers.update(rate_headers(exc.decision))
    return resp


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


def _json(status: int, body: Any, response: Response) -> Response:
    """The hot path's answer, encoded by msgspec: returning a Response skips FastAPI's
    re-validation of the body against the response model (which only documents it here),
    so the headers set on ``response`` are carried over by hand."""
    return Response(
        _json_encoder.encode(body),
        status_code=status,
        media_type="application/json",
        headers=dict(response.headers),
    )


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
        self.batcher = MicroBatcher(self.engine, metrics=BatcherMetrics())
        self.tokens = TokenIssuer(load_or_create_secret(self.settings), ttl_s=self.settings.token_ttl_s)
        self.store = UserStore(dsn)
        self.limiter = RateLimiter(redis_url)
        self.policy = RateLimitPolicy.from_env()
        self._opened = False
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # not running under Serve (direct construction in a test)
            self.replica = "local"
        self._open_lock = asyncio.Lock()

    async def _open(self) -> None:
        if not self._opened:
            async with self._open_lock:
                if not self._opened:
                    await self.store.open()
                    self._opened = True

    # --- authentication, roles, rate limits -----------------------------------------------

    async def _principal(self, request: Request) -> Principal:
        auth = request.headers.get("authorization")
        api_key = request.headers.get("x-api-key")
        if auth:
            scheme, _, cred = auth.partition(" ")
            if scheme.lower() != "bearer" or not cred:
                raise AuthError.unauthenticated("invalid_token", "use 'Authorization: Bearer <token>'")
            if cred.startswith("vk_"):
                api_key = cred
            else:
                return self.tokens.verify(cred.strip())
        if api_key:
            await self._open()
            return await self.store.authenticate_api_key(api_key.strip())
        raise AuthError.unauthenticated("missing_credentials", "send a bearer token or an API key")

    async def _guard(self, request: Request, response: Response, action: str) -> Principal:
        principal = await self._principal(request)
        authorize(principal, action)
        await self._limit(request, response, principal)
        response.headers["X-Gateway-Replica"] = self.replica
        return principal

    async def _limit(
        self,
        request: Request,
        response: Response,
        who: Principal | None,
        failure_keys: list[str] | None = None,
    ) -> None:
        """Charge the caller's limits; with ``failure_keys``, also check (without charging)
        their failed-attempt budgets, in the same single Redis call."""
        ip = request.client.host if request.client else "unknown"
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
        if failure_keys:
            decision = await self.limiter.hit_and_check_failures(checks, failure_keys, self.policy)
        else:
            decision = await self.limiter.hit_many(checks)
        response.headers.update(rate_headers(decision))
        if not decision.allowed:
            what = "failed-attempt" if decision.key.startswith("fail:") else "request"
            raise RateLimited(decision, what)

    def _guess_keys(
        self, request: Request, customer_id: str | None, who: Principal | None
    ) -> list[str]:
        """Whose failure budget a failed attempt spends: the customer's always; the client
        IP's only for anonymous and customer callers (a checkout service sends every
        customer's attempts from one address)."""
        keys = []
        if customer_id:
            keys.append(f"customer:{customer_id}")
        if who is None or set(who.roles) <= {"customer"}:
            keys.append(f"ip:{request.client.host if request.client else 'unknown'}")
        return keys

    async def _check_guessing(
        self, request: Request, customer_id: str | None, who: Principal | None
    ) -> None:
        keys = self._guess_keys(request, customer_id, who)
        if not keys:
            return
        decision = await self.limiter.check_failure_budget(keys, self.policy)
        if not decision.allowed:
            raise RateLimited(decision, "failed-attempt")

    async def _penalize(
        self, request: Request, customer_id: str | None, who: Principal | None
    ) -> None:
        keys = self._guess_keys(request, customer_id, who)
        if keys:
            await self.limiter.penalize_failure(keys, self.policy)

    # --- health and metrics -----------------------------------------------------------

    @api.get("/healthz", tags=["ops"])
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", tags=["ops"], responses=problem_responses(503))
    async def readyz(self) -> Response:
        try:
            await asyncio.wait_for(self.engine.wait_ready(timeout_s=2.0), 3.0)
            await asyncio.wait_for(self.limiter.ping(), 2.0)
        except Exception as exc:  # any dependency down means not ready
            return problem(503, "not_ready", "Service Unavailable", f"not ready: {exc.__class__.__name__}")
        return JSONResponse({"status": "ready", "shards": self.engine.n})

    @api.get(
        "/metrics", tags=["ops"], response_class=PlainTextResponse, responses=problem_responses(*_GUARDED)
    )
    async def metrics_(self, request: Request, response: Response) -> PlainTextResponse:
        await self._guard(request, response, "metrics.read")
        metrics.observe_batcher(self.batcher)
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
        await self._limit(request, response, None)
        return _unwrap(await self.users.register.remote(body.email, body.password, body.name))

    @api.post(
        "/v1/auth/login", response_model=TokenOut, tags=["users"], responses=problem_responses(*_BODY, 401, 429)
    )
    async def login(self, body: LoginIn, request: Request, response: Response) -> Any:
        await self._limit(request, response, None)
        await self._check_guessing(request, None, None)
        result = await self.users.login.remote(body.email, body.password)
        if isinstance(result, Failure):
            await self._penalize(request, None, None)
        return _unwrap(result)

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
        offset: int = Query(0, ge=0),
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
        response_model=CampaignOut,
        tags=["campaigns"],
        responses=problem_responses(*_GUARDED, 404, 409, 422),
    )
    async def activate(self, campaign_id: str, request: Request, response: Response) -> Any:
        return await self._transition(campaign_id, "activate", request, response)

    @api.post(
        "/v1/campaigns/{campaign_id}/pause",
        response_model=CampaignOut,
        tags=["campaigns"],
        responses=problem_responses(*_GUARDED, 404, 409, 422),
    )
    async def pause(self, campaign_id: str, request: Request, response: Response) -> Any:
        return await self._transition(campaign_id, "pause", request, response)

    @api.post(
        "/v1/campaigns/{campaign_id}/end",
        response_model=CampaignOut,
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
        response_model=JobOut,
        tags=["campaigns"],
        responses=problem_responses(*_GUARDED, 404, 422),
    )
    async def job(self, job_id: str, request: Request, response: Response) -> Any:
        await self._guard(request, response, "jobs.read")
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
            await self._check_guessing(request, p.user_id, p)
            found = await self.vouchers.get.remote(code)
            if isinstance(found, Failure) or found.get("customer_id") != p.user_id:
                await self._penalize(request, p.user_id, p)
                raise errors.UnknownCode(f"no voucher of yours has code {code!r}")
            return found
        return _unwrap(await self.vouchers.get.remote(code))

    def _checkout(self, body: CheckoutIn, p: Principal, key: str | None) -> RedeemRequest:
        customer = body.customer_id
        if p.roles == ("customer",) or list(p.roles) == ["customer"]:
            if customer is not None and customer != p.user_id:
                raise Forbidden("forbidden", "customers act only for themselves")
            customer = p.user_id
        if key is not None and not (1 <= len(key) <= 255):
            raise errors.InvalidInput("Idempotency-Key must be 1-255 characters")
        return RedeemRequest(
            code=body.code,
            amount=body.order.amount,
            currency=body.order.currency,
            customer_id=customer,
            order_id=body.order.id,
            # keys are scoped to the caller: two clients cannot collide on the same key
            idempotency_key=f"{p.user_id}:{key}" if key else None,
        )

    async def _checkout_guard(
        self,
        request: Request,
        response: Response,
        action: str,
        body: CheckoutIn,
        key: str | None,
    ) -> tuple[Principal, RedeemRequest]:
        """The hot path's guard: credentials, role, and the caller's rate limits plus the
        failed-attempt budgets of the customer (and IP) in one Redis round trip."""
        p = await self._principal(request)
        authorize(p, action)
        req = self._checkout(body, p, key)
        await self._limit(request, response, p, self._guess_keys(request, req.customer_id, p))
        response.headers["X-Gateway-Replica"] = self.replica
        return p, req

    async def _decide(
        self, op: str, req: RedeemRequest, request: Request, who: Principal
    ) -> Outcome:
        t0 = time.perf_counter()
        out: Outcome = await self.batcher.submit(op, req)
        metrics.observe_decision(op, out, time.perf_counter() - t0)
        failed = out.rejection.error if out.rejection is not None else None
        if out.validation is not None and not out.validation.valid:
            failed = out.validation.error
        if log.isEnabledFor(logging.DEBUG):  # request_id comes from the context
            log.debug("%s decided: %s", op, failed or "ok", extra={"op": op, "outcome": failed or "ok"})
        if failed is not None and _is_guess_failure(failed):
            await self._penalize(request, req.customer_id, who)
        return out

    @api.post(
        "/v1/validations",
        response_model=ValidationOut,
        tags=["vouchers"],
        responses=problem_responses(*_CHECKOUT),
    )
    async def validate(self, body: CheckoutIn, request: Request, response: Response) -> Any:
        p, req = await self._checkout_guard(request, response, "validations.create", body, None)
        out = await self._decide("validate", req, request, p)
        if out.rejection is not None:
            return from_engine_error(errors.from_code(out.rejection.error, out.rejection.message))
        v = msgspec.to_builtins(out.validation)
        v["reason"] = v.pop("error", None)
        return _json(200, v, response)

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
        response: Response,
        idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
    ) -> Any:
        p, req = await self._checkout_guard(
            request, response, "redemptions.create", body, idempotency_key
        )
        out = await self._decide("redeem", req, request, p)
        if out.rejection is not None:
            return from_engine_error(errors.from_code(out.rejection.error, out.rejection.message))
        response.headers["Location"] = f"/v1/redemptions/{out.redemption.id}"  # type: ignore[union-attr]
        return _json(201, _redemption(out.redemption), response)

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
        idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
    ) -> Any:
        p = await self._guard(request, response, "redemptions.rollback")
        key = f"{p.user_id}:{idempotency_key}" if idempotency_key else None
        return _redemption(await self.engine.rollback(redemption_id, key))

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
        response: Response,
        idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
    ) -> Any:
        p, req = await self._checkout_guard(
            request, response, "reservations.write", body, idempotency_key
        )
        out = await self._decide("reserve", req, request, p)
        if out.rejection is not None:
            return from_engine_error(errors.from_code(out.rejection.error, out.rejection.message))
        return _json(201, _reservation(out.reservation), response)

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
        idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
    ) -> Any:
        p = await self._guard(request, response, "reservations.write")
        key = f"{p.user_id}:{idempotency_key}" if idempotency_key else None
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
        idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
    ) -> Any:
        p = await self._guard(request, response, "reservations.write")
        key = f"{p.user_id}:{idempotency_key}" if idempotency_key else None
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
    async def read_notification(self, notification_id: int, request: Request, response: Response) -> Any:
        await self._guard(request, response, "notifications.read")
        return _unwrap(await self.notifications.mark_read.remote(notification_id))


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
        since: datetime | None = None,
        until: datetime | None = None,
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
