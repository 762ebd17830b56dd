"""Fast lanes: the hottest POST endpoints (checkout's validations, redemptions and
reservations, and qualifications) answered in front of the whole FastAPI stack, without
Starlette's routing, middleware stack and dependency solving, with the body decoded by
msgspec.

A :class:`Lane` says how to decode its endpoint's body and how to answer it. What a lane
does not handle the usual way (no or too large Content-Length, a non-JSON content type, a
body that does not decode into its shape) goes to FastAPI with the body replayed, so every
error answer is the one the documented route gives; the route and its lane answer through
the same code. :class:`GatewayAPI` routes to the lanes once the replica has set them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec
from fastapi import FastAPI
from fastapi.responses import Response

from actors.observability import new_request_id, request_id_var
from engine import errors
from serve.auth import AuthError
from serve.gate import RateLimited, auth_problem, rate_problem
from serve.problems import from_engine_error, internal_error_problem, path_methods

log = logging.getLogger("voucher.gateway")

# the request headers a lane reads (the rest are left to FastAPI's routes)
HEADERS = frozenset(
    {b"authorization", b"x-api-key", b"idempotency-key", b"content-type", b"content-length", b"x-request-id"}
)


class Lane(Protocol):
    """One endpoint's fast lane."""

    def decode(self, raw: bytes, headers: dict[bytes, bytes]) -> Any:
        """The body (and the headers, first value of each of :data:`HEADERS`) as the lane
        takes them; raises ``msgspec.MsgspecError`` for what it leaves to FastAPI."""
        ...

    def answer(self, body: Any, headers: dict[bytes, bytes], scope: Any) -> Awaitable[Response]:
        """The response; may raise auth, rate-limit and engine errors (answered here as
        the routes answer them)."""
        ...


def _replay(body: bytes, receive: Any) -> Callable[[], Awaitable[Any]]:
    """A ``receive`` that first hands over a body already read."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Any:
        if pending:
            return pending.pop()
        return await receive()

    return replayed


async def serve(
    app: FastAPI, lane: Lane, max_body_bytes: int, scope: Any, receive: Any, send: Any
) -> None:
    """Answer one request through ``lane``, or hand it to FastAPI (see the module)."""
    h: dict[bytes, bytes] = {}
    for k, v in scope["headers"]:
        if k in HEADERS and k not in h:
            h[k] = v
    length = h.get(b"content-length")
    ctype = h.get(b"content-type")
    if (
        length is None
        or not length.isdigit()
        or int(length) > max_body_bytes
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
    # What RequestIdMiddleware does, for the fast lane (Serve supplies the header).
    sent = h.get(b"x-request-id")
    token = request_id_var.set(sent.decode("latin-1")[:128] if sent else new_request_id())
    try:
        try:
            body = lane.decode(raw, h)
        except msgspec.MsgspecError:
            await FastAPI.__call__(app, scope, _replay(raw, receive), send)
            return
        try:
            resp = await lane.answer(body, h, scope)
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
        request_id_var.reset(token)


def header(h: dict[bytes, bytes], name: bytes) -> str | None:
    """A header a lane read, as text."""
    v = h.get(name)
    return v.decode("latin-1") if v is not None else None


class GatewayAPI(FastAPI):
    """FastAPI with fast lanes in front of its whole middleware stack: a POST to a path of
    ``lanes`` goes to its lane (see :func:`serve`) once the replica has set them. Concrete
    paths shadow the templated ones for every method (serve.problems.PathMethods)."""

    lanes: dict[str, Lane] = {}
    max_body_bytes: int = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if scope["method"] == "POST":
                lane = self.lanes.get(scope["path"])
                if lane is not None:
                    await serve(self, lane, self.max_body_bytes, scope, receive, send)
                    return
            refusal = path_methods(self).refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
