"""The HTTP gateway (Serve ingress): each replica's services and its FastAPI app.

:class:`Gateway` is the Serve deployment: it builds the replica's :class:`Services` (the
domain deployments' handles, the engine client, the checkout micro-batcher, the gate with
its rate limiter and API-key cache) from one :class:`engine.settings.Settings`, and then
its app with :func:`build_api`. The routes live in ``serve/routes/`` (one router per
domain), checkout's fast lane in ``serve/checkout.py``, authentication, roles and rate
limits in ``serve/gate.py``.

Every endpoint states the action it needs (``serve.permissions.PERMISSIONS`` maps actions to
roles); every error is an RFC 9457 problem.

Every request has an id: the client's ``X-Request-ID`` or a new one, returned in the
response's ``X-Request-ID`` (Serve does both), present in every JSON log line written while
the request is handled (a context variable), and passed to the shards with the request.
"""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve

from actors.client import attach_engine
from actors.gcpolicy import settle_heap
from actors.observability import BatcherMetrics, RequestIdMiddleware, configure_json_logging
from engine.settings import Settings
from serve.auth import TokenIssuer, load_or_create_secret
from serve.batching import MicroBatcher
from serve.checkout import Checkout
from serve.checkout import lanes as checkout_lanes
from serve.client_address import TrustedProxies, disable_uvicorn_rewrite
from serve.context import Services
from serve.customer_tags import CustomerTags
from serve.devices import DeviceTokens
from serve.fast_lane import GatewayAPI, Lane
from serve.gate import Gate, install_refusal_handlers
from serve.health import HealthProbe
from serve.models import unstorable_params
from serve.problems import BodySizeLimit, document_problems, install_problem_handlers
from serve.promotions import Manifests, PromotionCatalog
from serve.ratelimit import RateLimiter, RateLimitPolicy
from serve.records import Records
from serve.routes import (
    audit,
    campaign_editing,
    campaigns,
    checkout,
    code_import,
    customers,
    delivery,
    events,
    exports,
    health,
    history,
    notifications,
    publications,
    qualifications,
    reports,
    users,
    webhooks,
)
from serve.users import UserStore
from store.pools import LazyPool

# The fast lanes' routers first: Serve names each request's route (for its metrics) by
# matching the routes in this order, so a hot path found last costs every request a walk
# through all the others (0.15 ms for a qualification).
ROUTERS = (
    checkout, qualifications, health, users, campaigns, code_import, notifications, customers,
    delivery, reports, exports, history, publications, webhooks, events, campaign_editing, audit,
)


async def _storable_params(request: Request) -> None:
    """Every route's path and query parameters (and stored headers) must be text Postgres
    can store; request bodies are checked by their models (serve/models.py)."""
    found = unstorable_params(request.path_params, request.query_params, request.headers)
    if found:
        raise RequestValidationError(found)


def fast_lanes(services: Services) -> dict[str, Lane]:
    """Path -> the fast lane (serve/fast_lane.py) of the hottest POST endpoints."""
    return {**checkout_lanes(services.checkout), **qualifications.lanes(services)}


def build_api(services: Services) -> GatewayAPI:
    """The gateway's app over ``services``, with checkout's fast lane in front."""
    api = GatewayAPI(
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
    api.state.services = services
    api.lanes = fast_lanes(services)
    api.max_body_bytes = services.settings.max_body_bytes
    for module in ROUTERS:
        api.include_router(module.routes)
    install_problem_handlers(api)
    install_refusal_handlers(api)
    document_problems(api)
    # Body limits are enforced in front of FastAPI, before any body is read. The customer
    # import streams its body (parsed and upserted batch by batch), so it may be far larger
    # than a JSON body; its limit bounds the upload, not memory.
    api.add_middleware(
        BodySizeLimit,
        max_bytes=services.settings.max_body_bytes,
        path_limits={
            "/v1/customers/import": services.settings.import_max_bytes,
            "/v1/campaigns/{}/vouchers/import": services.settings.import_max_bytes,
        },
    )
    # Added last, so outermost: even a 413 from the body limit is logged with the request
    # id. Serve reads X-Request-ID (or makes one), passes it on and returns it on every
    # response: the middleware only binds it for the logs and the shards (echo=False: not
    # sent twice).
    api.add_middleware(RequestIdMiddleware, echo=False)
    return api


def _replica_id() -> str:
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # not running under Serve (direct construction in a test)
        return "local"


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=2000)
@serve.ingress()
class Gateway:
    """A gateway replica: its services, then (Serve calls ``__serve_build_asgi_app__``
    once they exist) its app."""

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
        config = msgspec.convert(settings, Settings)
        configure_json_logging(config.log_level)
        engine = attach_engine(config)
        batcher = MicroBatcher(
            engine,
            metrics=BatcherMetrics(),
            channels=config.shard_channel,
            # the shard answers by its decision deadline; this fires only when it cannot
            deadline_s=config.decision_deadline_s + 1.0,
        )
        secret = load_or_create_secret(config)
        # The client address is decided here (serve/client_address.py), never by uvicorn.
        disable_uvicorn_rewrite()
        limiter = RateLimiter(redis_url)
        gate = Gate(
            tokens=TokenIssuer(secret, ttl_s=config.token_ttl_s),
            store=UserStore(dsn),
            limiter=limiter,
            policy=RateLimitPolicy.from_settings(config),
            proxies=TrustedProxies.parse(config.trusted_proxies),
            replica=_replica_id(),
        )
        self.services = Services(
            settings=config,
            users=users,
            campaigns=campaigns,
            vouchers=vouchers,
            delivery=delivery,
            reports=reports,
            notifications=notifications,
            customers=customers,
            issuance=issuance,
            engine=engine,
            checkout=Checkout(
                gate,
                batcher,
                config.max_body_bytes,
                CustomerTags(LazyPool(dsn, 2), ttl_s=config.customer_tags_ttl_s),
                PromotionCatalog(LazyPool(dsn, 1)),
                Manifests(LazyPool(dsn, 2)),
            ),
            gate=gate,
            devices=DeviceTokens(secret),
            health=HealthProbe(engine=engine, dsn=dsn, valkey_ping=limiter.ping),
            import_db=LazyPool(dsn, 2),
            records=Records(dsn, retention_s=config.export_retention_days * 86400.0),
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        api = build_api(self.services)
        # Everything built so far (Ray, FastAPI, the routes) lives as long as the replica:
        # out of the collector's sight, and full collections rare (actors/gcpolicy.py).
        settle_heap()
        return api
