"""HTTP problem responses (RFC 9457) and the one place engine errors become HTTP statuses.

Every error response of the API is ``application/problem+json``::

    {"type": "https://voucher-engine.dev/problems/already-redeemed",
     "title": "Already redeemed", "status": 409,
     "detail": "code ABC-123 was redeemed at ...", "code": "already_redeemed"}

``type`` is stable per error kind (clients switch on it or on ``code``); ``detail`` is for
humans and may change. Statuses are chosen by walking the error's class hierarchy, so a new
subclass of ``NotRedeemable`` answers 409 without touching this module.
"""

from __future__ import annotations

import http
import json
import logging
import re
import uuid
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette._utils import get_route_path
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import errors
from serve.models import Problem

log = logging.getLogger(__name__)

PROBLEM_BASE = "https://voucher-engine.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"

# The most specific class in an error's MRO that appears here decides its status.
_STATUS_BY_CLASS: dict[type, int] = {
    errors.VoucherError: 500,
    errors.ConfigError: 500,
    errors.InvalidInput: 422,
    errors.UnsupportedMediaType: 415,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.IllegalTransition: 409,
    errors.NotRedeemable: 409,
    errors.Exhausted: 409,
    # Gone: the code will never be redeemable again, retrying or waiting is pointless.
    errors.CampaignExpired: 410,
    errors.CampaignEnded: 410,
    errors.CodeVoid: 410,
    errors.Unavailable: 503,
    errors.VersionMismatch: 412,
}

# Seconds a client should wait before retrying a 503 (a shard reloads in about that).
UNAVAILABLE_RETRY_AFTER_S = 1


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


class PayloadTooLarge(HTTPException):
    """The request body exceeds the configured limit.

    An ``HTTPException`` on purpose: FastAPI re-raises those from its body parsing, where any
    other exception raised while reading the body would become a generic 400.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body exceeds {max_bytes} bytes")
        self.max_bytes = max_bytes


def problem_type(slug: str) -> str:
    # One spelling for every type URI: engine codes and callers may use snake_case.
    return PROBLEM_BASE + slug.replace("_", "-")


def problem(
    status: int,
    type_slug: str,
    title: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """A problem response; ``extra`` become extension members of the body.

    ``type_slug`` may be snake_case or kebab-case; the type URI always uses kebab-case.
    """
    body: dict[str, Any] = {
        "type": problem_type(type_slug),
        "title": title,
        "status": status,
        "detail": detail,
    }
    body.update(extra)
    return ProblemResponse(body, status_code=status, headers=dict(headers) if headers else None)


# --- engine errors ---------------------------------------------------------------------


def status_for(exc: errors.VoucherError | type[errors.VoucherError]) -> int:
    """The HTTP status of an engine error (or error class), inherited along the MRO."""
    cls = exc if isinstance(exc, type) else type(exc)
    own = getattr(cls, "status", None)  # errors that carry their status (auth: 401/403)
    if isinstance(own, int) and 400 <= own < 600:
        return own
    for klass in cls.__mro__:
        status = _STATUS_BY_CLASS.get(klass)
        if status is not None:
            return status
    return 500


def slug_for(exc: errors.VoucherError | type[errors.VoucherError]) -> str:
    """The problem type slug of an engine error: its stable code, kebab-cased."""
    return exc.code.replace("_", "-")


_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z]|\b)|[A-Z]?[a-z]+|[A-Z]+|\d+")


def title_for(exc: errors.VoucherError | type[errors.VoucherError]) -> str:
    """A short, constant title per error kind, from its class name (AlreadyRedeemed ->
    "Already redeemed"); RFC 9457 wants the title not to vary between occurrences."""
    cls = exc if isinstance(exc, type) else type(exc)
    words = _WORD.findall(cls.__name__)
    if not words:
        return "Error"
    text = " ".join(w if w.isupper() and len(w) > 1 else w.lower() for w in words)
    return text[0].upper() + text[1:]


def from_engine_error(exc: errors.VoucherError) -> JSONResponse:
    status = status_for(exc)
    headers: dict[str, str] = {}
    if status == 503:
        headers["Retry-After"] = str(UNAVAILABLE_RETRY_AFTER_S)
    # getattr: an error class Ray derived for a remote failure has no message of its own
    detail = getattr(exc, "message", None) or str(exc)
    if status >= 500 and not isinstance(exc, errors.Unavailable):
        # ConfigError & co. are bugs or misconfiguration: log them, do not describe them.
        log.error("engine error answered as %d: %s: %s", status, exc.code, detail)
        detail = "internal error"
    return problem(status, slug_for(exc), title_for(exc), detail, headers=headers, code=exc.code)


def catalog() -> dict[str, dict[str, Any]]:
    """Every engine error code with its status, type URI and title (for docs and tests)."""
    return {
        code: {"status": status_for(cls), "type": problem_type(slug_for(cls)), "title": title_for(cls)}
        for code, cls in sorted(errors.registry().items())
    }


# --- request-level problems ------------------------------------------------------------


def _loc(loc: Any) -> list[str | int]:
    return [p if isinstance(p, int) else str(p) for p in (loc or ())]


def _validation_item(err: Mapping[str, Any]) -> dict[str, Any]:
    """One validation error without its ``input`` or ``ctx``: those echo what the client
    sent, which may be a secret (a password, an API key, a gift card code)."""
    loc = _loc(err.get("loc"))
    kind = str(err.get("type", "value_error"))
    if kind == "extra_forbidden":
        field = loc[-1] if loc else "?"
        msg = f"unknown field {field!r}"
    elif kind == "missing":
        msg = f"field {loc[-1]!r} is required" if loc else "field required"
    else:
        msg = str(err.get("msg", "invalid value"))
    return {"loc": loc, "msg": msg, "type": kind}


def validation_problem(exc: RequestValidationError) -> JSONResponse:
    errs = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errs):
        return malformed_json_problem()
    items = [_validation_item(e) for e in errs]
    if len(items) == 1:
        where = ".".join(str(p) for p in items[0]["loc"])
        detail = f"{where}: {items[0]['msg']}" if where else items[0]["msg"]
    else:
        detail = f"{len(items)} fields failed validation"
    return problem(422, "validation-error", "Request validation failed", detail, errors=items)


def malformed_json_problem() -> JSONResponse:
    return problem(400, "malformed-json", "Malformed JSON", "the request body is not valid JSON")


_HTTP_SLUGS = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    406: "not-acceptable",
    409: "conflict",
    413: "payload-too-large",
    415: "unsupported-media-type",
    429: "rate-limited",
}


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def http_problem(exc: HTTPException) -> Response:
    status = exc.status_code
    if status in (204, 304) or status < 400:
        # Not an error (a redirect or "no content" raised as an exception): no body allowed.
        return Response(status_code=status, headers=exc.headers)
    detail = exc.detail if isinstance(exc.detail, str) else _phrase(status)
    slug = _HTTP_SLUGS.get(status, f"http-{status}")
    return problem(status, slug, _phrase(status), detail, headers=exc.headers)


# --- methods a path supports (405 and its Allow header) ----------------------------------

_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def _template_regex(path: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}/]+\})", path)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts) + "$")


class PathMethods:
    """The methods each path supports, from the OpenAPI document (plus the app's own plain
    routes: /docs, /openapi.json), for 405 answers and their ``Allow`` header.

    Starlette answers a 405 with the methods of the first route whose path matched, so a
    path served by two routes (GET and POST of ``/v1/campaigns``) advertised only one of
    them. Here every operation of the path counts. And, as OpenAPI reads paths, a concrete
    path shadows the templated ones that also match it, for every method:
    ``/v1/customers/import`` is not the customer ``import`` of ``/v1/customers/{customer_id}``.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._concrete: dict[str, frozenset[str]] | None = None
        self._templated: list[tuple[re.Pattern[str], frozenset[str]]] = []

    def _table(self) -> dict[str, frozenset[str]]:
        if self._concrete is None:
            paths: dict[str, set[str]] = {}
            for path, item in self.app.openapi().get("paths", {}).items():
                paths.setdefault(path, set()).update(m.upper() for m in item if m in _HTTP_METHODS)
            for route in self.app.router.routes:
                path, methods = getattr(route, "path", None), getattr(route, "methods", None)
                if isinstance(path, str) and methods:
                    paths.setdefault(path, set()).update(methods)
            self._templated = [
                (_template_regex(path), frozenset(m)) for path, m in paths.items() if "{" in path
            ]
            self._concrete = {path: frozenset(m) for path, m in paths.items() if "{" not in path}
        return self._concrete

    def allowed(self, path: str) -> list[str]:
        concrete = self._table().get(path)
        if concrete is not None:
            return sorted(concrete)
        found: set[str] = set()
        for regex, methods in self._templated:
            if regex.match(path):
                found |= methods
        return sorted(found)

    def refusal(self, scope: Scope) -> Response | None:
        """A 405 problem for a method the concrete path of the request does not support
        (None for anything else: routing decides)."""
        methods = self._table().get(get_route_path(scope))
        if methods is None or scope["method"] in methods:
            return None
        return method_not_allowed_problem(sorted(methods))


def path_methods(app: Any) -> PathMethods:
    """The app's PathMethods, built on first use (the routes are all declared by then)."""
    found = getattr(app.state, "path_methods", None)
    if found is None:
        found = app.state.path_methods = PathMethods(app)
    return found


def method_not_allowed_problem(allowed: list[str]) -> JSONResponse:
    return problem(
        405, "method-not-allowed", _phrase(405), "Method Not Allowed", headers={"Allow": ", ".join(allowed)}
    )


def payload_too_large_problem(max_bytes: int) -> JSONResponse:
    return problem(
        413,
        "payload-too-large",
        _phrase(413),
        f"request body exceeds {max_bytes} bytes",
        headers={"Connection": "close"},
        max_bytes=max_bytes,
    )


# SQLSTATE classes of a database that is away or overloaded, not of a bad request:
# 08 connection exception, 53 insufficient resources, 57 operator intervention (shutdown,
# cannot connect now), 58 system error.
_DOWN_SQLSTATE = ("08", "53", "57", "58")


def dependency_down(exc: BaseException) -> bool:
    """Whether ``exc`` means a dependency (Postgres, Valkey, an actor) is away or slow,
    which the client should retry, rather than a bug."""
    import asyncpg
    import ray
    import redis.exceptions

    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None)
        return isinstance(state, str) and state[:2] in _DOWN_SQLSTATE
    return isinstance(
        exc,
        asyncpg.InterfaceError
        | asyncpg.PostgresConnectionError
        | ConnectionError
        | TimeoutError
        | redis.exceptions.ConnectionError
        | redis.exceptions.TimeoutError
        | ray.exceptions.RayActorError
        | ray.exceptions.ActorUnavailableError
        | ray.exceptions.GetTimeoutError,
    )


def unavailable_problem(detail: str) -> JSONResponse:
    return from_engine_error(errors.Unavailable(detail))


def internal_error_problem(incident: str) -> JSONResponse:
    # The incident id is logged with the traceback, so support can find it; nothing else
    # about the failure leaves the server.
    return problem(500, "internal-error", "Internal server error",
                   "an unexpected error occurred", incident=incident)


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` as a problem response."""

    async def on_engine_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, errors.VoucherError)
        return from_engine_error(exc)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return validation_problem(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if isinstance(exc, PayloadTooLarge):
            return payload_too_large_problem(exc.max_bytes)
        if exc.status_code == 405:
            methods = path_methods(app).allowed(get_route_path(request.scope))
            return method_not_allowed_problem(methods)
        return http_problem(exc)

    async def on_json_error(request: Request, exc: Exception) -> Response:
        return malformed_json_problem()

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        if dependency_down(exc):
            log.warning(
                "%s %s: a dependency is away: %r", request.method, request.url.path, exc
            )
            return unavailable_problem("a service the engine needs is away or slow; retry")
        incident = uuid.uuid4().hex
        log.error(
            "unhandled error on %s %s (incident %s)",
            request.method,
            request.url.path,
            incident,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        return internal_error_problem(incident)

    app.add_exception_handler(errors.VoucherError, on_engine_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(json.JSONDecodeError, on_json_error)
    app.add_exception_handler(Exception, on_unexpected)


# --- the OpenAPI document ---------------------------------------------------------------

# Why an operation may answer each problem status; the OpenAPI document lists, per route,
# the statuses it can answer (see problem_responses), so clients and the schema fuzz know.
_WHEN: dict[int, str] = {
    400: "Malformed JSON body or Content-Length",
    401: "Missing, invalid or expired credentials",
    403: "The caller's roles do not allow this action",
    404: "No such resource",
    409: "Conflicts with the current state (duplicate, illegal transition, not redeemable)",
    410: "Gone for good (campaign ended or expired, code void)",
    412: "If-Match names a version the resource no longer has",
    413: "Request body too large",
    415: "Unsupported Content-Type for this endpoint",
    422: "Request validation failed",
    429: "Rate limit or failed-attempt budget exceeded; see Retry-After",
    503: "The engine cannot answer now; retry after Retry-After",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route for the problem statuses it can answer."""
    return {status: {"model": Problem, "description": _WHEN[status]} for status in sorted(set(statuses))}


def document_problems(app: FastAPI) -> None:
    """Serve problem responses in the OpenAPI document as ``application/problem+json``.

    FastAPI files every documented body under the route's media type (``application/json``,
    ``text/plain`` for /metrics); the API answers every error as ``application/problem+json``,
    so the document is corrected once, when built.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            for item in build()["paths"].values():
                for operation in item.values():
                    for status, response in operation.get("responses", {}).items():
                        content = response.get("content")
                        if status[:1] in ("4", "5") and content:
                            response["content"] = {PROBLEM_MEDIA_TYPE: next(iter(content.values()))}
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


# --- body size limit -------------------------------------------------------------------


class BodySizeLimit:
    """Pure ASGI middleware: a request body larger than ``max_bytes`` gets a 413 problem.

    A declared ``Content-Length`` above the limit is refused before the app runs; a body
    streamed without one is counted chunk by chunk as the app reads it, and reading stops
    at the first chunk past the limit, so nothing larger than the limit is ever buffered.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, path_limits: dict[str, int] | None = None
    ) -> None:
        """``path_limits``: paths with their own limit (a streamed bulk import reads its
        body chunk by chunk, so it may accept far more than a JSON body); ``{}`` in a path
        stands for one segment (``/v1/campaigns/{}/vouchers/import``)."""
        if max_bytes < 0 or any(v < 0 for v in (path_limits or {}).values()):
            raise ValueError("max_bytes must be >= 0")
        self.app = app
        self.default_max = max_bytes
        self.path_limits = {p: v for p, v in (path_limits or {}).items() if "{}" not in p}
        self.pattern_limits = [
            (re.compile("^" + "[^/]+".join(map(re.escape, p.split("{}"))) + "$"), v)
            for p, v in (path_limits or {}).items()
            if "{}" in p
        ]

    def limit_of(self, path: str) -> int:
        limit = self.path_limits.get(path)
        if limit is not None:
            return limit
        for pattern, value in self.pattern_limits:
            if pattern.match(path):
                return value
        return self.default_max

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await _LimitedRequest(self.app, self.limit_of(scope.get("path", "")))(scope, receive, send)


class _LimitedRequest:
    """One request under one body limit (see :class:`BodySizeLimit`)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = _content_length(scope)
        if declared == -1:
            await problem(400, "bad-request", _phrase(400), "invalid Content-Length header")(
                scope, receive, send
            )
            return
        if declared is not None and declared > self.max_bytes:
            await payload_too_large_problem(self.max_bytes)(scope, receive, send)
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except PayloadTooLarge:
            # Reached here only when no exception handler answered it (e.g. plain Starlette).
            if started:
                raise
            await payload_too_large_problem(self.max_bytes)(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    """The declared body length; None when absent, -1 when unparseable."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                n = int(value)
            except ValueError:
                return -1
            return n if n >= 0 else -1
    return None
