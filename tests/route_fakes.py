"""Fakes for driving the gateway's real routes through FastAPI's TestClient, without Ray,
Postgres or Redis.

:func:`gateway` builds the app (``serve.gateway.build_api``) over a
:class:`serve.context.Services` whose deployments, engine client, batcher, rate limiter,
user store and health probe are fakes that record their calls; the gate itself is the real
one (real tokens, roles and limit logic over the fake limiter). Tokens for any roles come
from :meth:`Gateway.token`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi.testclient import TestClient

from engine.events import Redemption, Reservation
from engine.settings import Settings
from engine.shard_state import Outcome, RedeemRequest
from serve.auth import Principal, TokenIssuer
from serve.checkout import Checkout
from serve.client_address import TrustedProxies
from serve.context import Services
from serve.devices import DeviceTokens
from serve.gate import Gate
from serve.ratelimit import Decision, RateLimitPolicy

SECRET = b"route-tests-secret-of-32-bytes!!"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class _Answer:
    """What a Serve handle's ``.remote()`` returns: awaitable, and harmless when not awaited
    (fire-and-forget calls)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Any:
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value
        yield  # a generator: awaiting it returns the value


class _Method:
    def __init__(self, deployment: FakeDeployment, name: str) -> None:
        self.deployment = deployment
        self.name = name

    def remote(self, *args: Any, **kwargs: Any) -> _Answer:
        self.deployment.calls.append((self.name, args, kwargs))
        answer = self.deployment.answers.get(self.name)
        return _Answer(answer(*args, **kwargs) if callable(answer) else answer)


class FakeDeployment:
    """A deployment handle: ``answers`` maps a method name to its value (or to a function
    of the call's arguments); every call is kept in ``calls`` as ``(method, args, kwargs)``."""

    def __init__(self, **answers: Any) -> None:
        self.answers: dict[str, Any] = answers
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Method(self, name)

    def called(self, name: str) -> list[tuple[Any, ...]]:
        """The positional arguments of each call of ``name``."""
        return [args for method, args, _ in self.calls if method == name]


def decision(allowed: bool = True, key: str = "rl:x", **kw: Any) -> Decision:
    return Decision(
        allowed=allowed, limit=100, remaining=99 if allowed else 0, reset_after_s=1.0,
        retry_after_s=0.0 if allowed else 7.0, key=key, **kw,
    )


class FakeLimiter:
    """The rate limiter: allows everything unless ``deny`` is set (then answers with that
    decision); records every call."""

    def __init__(self) -> None:
        self.deny: Decision | None = None
        self.hits: list[dict[str, Any]] = []
        self.penalized: list[list[str]] = []
        self.budget_checks: list[list[str]] = []

    async def hit_and_check_failures(
        self, checks: Any, failure_keys: Any, policy: Any, *, flag_key: Any = None, epoch_key: Any = None
    ) -> Decision:
        self.hits.append(
            {"checks": list(checks), "failure_keys": list(failure_keys), "flag_key": flag_key}
        )
        return self.deny or decision()

    async def check_failure_budget(self, keys: list[str], policy: Any) -> Decision:
        self.budget_checks.append(list(keys))
        return decision()

    async def penalize_failure(self, keys: list[str], policy: Any) -> None:
        self.penalized.append(list(keys))

    async def run_id(self) -> str:
        return "run-1"

    async def ping(self) -> bool:
        return True


class FakeUserStore:
    """API keys by plaintext -> principal."""

    def __init__(self) -> None:
        self.keys: dict[str, Principal] = {}

    async def open(self) -> None:
        return None

    async def authenticate_api_key(self, plaintext: str) -> Principal:
        from serve.auth import InvalidApiKey

        found = self.keys.get(plaintext)
        if found is None:
            raise InvalidApiKey("unknown API key")
        return found


def redemption(id: str = "red_1", status: int = 0) -> Redemption:
    return Redemption(
        id=id, campaign_id="cmp_1", code="SAVE10", customer_id=None, order_id="o1",
        order_amount=1000, currency="EUR", discount_amount=100, balance_after=None,
        created_at=T0, status=status,
    )


def reservation(id: str = "res_1", state: int = 0) -> Reservation:
    return Reservation(
        id=id, campaign_id="cmp_1", code="SAVE10", customer_id=None, order_id="o1",
        order_amount=1000, currency="EUR", discount_amount=100, expires_at=T0, state=state,
    )


class FakeBatcher:
    """The micro-batcher: answers every ``submit`` with ``outcome(op, request)``."""

    def __init__(self) -> None:
        self.submitted: list[tuple[str, RedeemRequest]] = []
        self.outcome: Callable[[str, RedeemRequest], Outcome] = lambda op, req: (
            Outcome(reservation=reservation()) if op == "reserve" else Outcome(redemption=redemption())
        )

    async def submit(self, op: str, req: RedeemRequest) -> Outcome:
        self.submitted.append((op, req))
        return self.outcome(op, req)

    def stats(self) -> dict[str, Any]:
        return {"batches": 3, "items": 7}


class FakeEngine:
    """The engine client's follow-ups of a checkout."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str | None]] = []

    async def rollback(self, redemption_id: str, key: str | None = None) -> Redemption:
        self.calls.append(("rollback", redemption_id, key))
        return redemption(redemption_id, status=1)

    async def confirm(self, reservation_id: str, key: str | None = None) -> Redemption:
        self.calls.append(("confirm", reservation_id, key))
        return redemption()

    async def release(self, reservation_id: str, key: str | None = None) -> Reservation:
        self.calls.append(("release", reservation_id, key))
        return reservation(reservation_id, state=2)


class FakeImportDb:
    def __init__(self) -> None:
        self.opened = 0

    async def __call__(self) -> Any:
        self.opened += 1
        return "pool"


@dataclass
class Gateway:
    """The app over fakes, and the fakes to look at."""

    services: Services
    limiter: FakeLimiter
    store: FakeUserStore
    batcher: FakeBatcher
    engine: FakeEngine
    tokens: TokenIssuer
    deployments: dict[str, FakeDeployment] = field(default_factory=dict)

    def token(self, *roles: str, user_id: str = "usr_1") -> dict[str, str]:
        """An ``Authorization`` header of a user with ``roles``."""
        token, _ = self.tokens.issue(Principal(user_id=user_id, roles=tuple(roles)))
        return {"Authorization": f"Bearer {token}"}

    def __getattr__(self, name: str) -> FakeDeployment:
        try:
            return self.deployments[name]
        except KeyError:
            raise AttributeError(name) from None


DEPLOYMENTS = ("users", "campaigns", "vouchers", "delivery", "reports", "notifications", "customers", "issuance")


def services(**answers: dict[str, Any]) -> Gateway:
    """Fake services; ``answers``: per deployment name, its methods' answers."""
    settings = Settings(max_body_bytes=64 * 1024, import_max_bytes=1024 * 1024)
    limiter, store, batcher, engine = FakeLimiter(), FakeUserStore(), FakeBatcher(), FakeEngine()
    tokens = TokenIssuer(SECRET)
    gate = Gate(
        tokens=tokens, store=store, limiter=limiter,  # type: ignore[arg-type]
        policy=RateLimitPolicy.from_settings(Settings.from_env({})), proxies=TrustedProxies.parse(""), replica="replica-1",
    )
    deployments = {name: FakeDeployment(**answers.get(name, {})) for name in DEPLOYMENTS}
    svc = Services(
        settings=settings,
        engine=engine,
        checkout=Checkout(gate, batcher, settings.max_body_bytes),
        gate=gate,
        devices=DeviceTokens(SECRET),
        health=None,
        import_db=FakeImportDb(),  # type: ignore[arg-type]
        **deployments,
    )
    return Gateway(svc, limiter, store, batcher, engine, tokens, deployments)


_apps: list[Any] = []


@contextmanager
def gateway(**answers: dict[str, Any]) -> Iterator[tuple[TestClient, Gateway]]:
    """A TestClient of the real app over fresh fake services (see :func:`services`). The app
    is built once per process (``serve.gateway.build_api``, the costly part) and given each
    test's services."""
    from serve.gateway import build_api, fast_lanes

    fakes = services(**answers)
    if not _apps:
        _apps.append(build_api(fakes.services))
    app = _apps[0]
    app.state.services = fakes.services
    app.lanes = fast_lanes(fakes.services)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, fakes


def problem_of(r: Any, status: int, slug: str | None = None) -> dict[str, Any]:
    """The problem body of ``r``, checked to have ``status`` (and type ``slug``)."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    if slug is not None:
        assert body["type"].endswith("/" + slug.replace("_", "-")), body
    return body


def assert_refused(
    client: TestClient, fakes: Gateway, method: str, url: str, action: str, role: str, **kw: Any
) -> None:
    """No credentials: 401; ``role``, which may not perform ``action``: 403; neither
    reaches a deployment."""
    before = sum(len(d.calls) for d in fakes.deployments.values())
    headers = kw.pop("headers", {})
    r = client.request(method, url, headers=headers, **kw)
    problem_of(r, 401, "missing_credentials")
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = client.request(method, url, headers={**headers, **fakes.token(role)}, **kw)
    assert action in problem_of(r, 403, "forbidden")["detail"]
    assert sum(len(d.calls) for d in fakes.deployments.values()) == before
