"""Problem responses (RFC 9457): engine error statuses, FastAPI handlers, body size limit.

Requests are driven straight through ASGI (no HTTP client needed), which also lets a test
stream a body chunk by chunk and see how much of it the app read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import pytest
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import errors
from serve.problems import (
    PROBLEM_BASE,
    PROBLEM_MEDIA_TYPE,
    BodySizeLimit,
    catalog,
    from_engine_error,
    install_problem_handlers,
    problem,
    status_for,
    title_for,
)


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


async def asgi_request(
    app: ASGIApp,
    method: str,
    path: str,
    *,
    body: bytes | Sequence[bytes] = b"",
    headers: dict[str, str] | None = None,
    content_length: bool = True,
) -> tuple[Reply, int]:
    """Send one request; returns the reply and how many body chunks the app pulled."""
    chunks = [body] if isinstance(body, bytes) else list(body)
    hdrs = {k.lower(): v for k, v in (headers or {}).items()}
    if content_length and "content-length" not in hdrs:
        hdrs["content-length"] = str(sum(len(c) for c in chunks))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in hdrs.items()],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    pulled = 0
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            return {"type": "http.request", "body": chunks[pulled - 1],
                    "more_body": pulled < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    try:
        await app(scope, receive, send)
    except Exception:
        # Starlette's ServerErrorMiddleware re-raises after sending the 500 (so the server
        # logs it too); what matters here is what the client received.
        if not any(m["type"] == "http.response.start" for m in sent):
            raise
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    resp_headers = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
    return Reply(start["status"], resp_headers, payload), pulled


def assert_problem(reply: Reply, status: int, slug: str) -> dict[str, Any]:
    assert reply.status == status, reply.body
    assert reply.headers["content-type"] == PROBLEM_MEDIA_TYPE
    body = reply.json()
    assert body["type"] == PROBLEM_BASE + slug
    assert body["status"] == status
    assert body["title"] and isinstance(body["detail"], str)
    return body


# --- statuses of engine errors ------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "status"),
    [
        (errors.InvalidInput, 422),
        (errors.MalformedCode, 422),
        (errors.CurrencyMismatch, 422),
        (errors.InfeasibleGeneration, 422),
        (errors.NotFound, 404),
        (errors.UnknownCode, 404),
        (errors.UnknownCampaign, 404),
        (errors.Conflict, 409),
        (errors.IdempotencyConflict, 409),
        (errors.CannotPauseDraft, 409),
        (errors.IllegalTransition, 409),
        (errors.NotRedeemable, 409),
        (errors.AlreadyRedeemed, 409),
        (errors.Exhausted, 409),
        (errors.CustomerLimitReached, 409),
        (errors.CampaignExpired, 410),
        (errors.CampaignEnded, 410),
        (errors.CodeVoid, 410),
        (errors.Unavailable, 503),
        (errors.ConfigError, 500),
        (errors.VoucherError, 500),
    ],
)
def test_status_for_engine_errors(cls: type[errors.VoucherError], status: int) -> None:
    assert status_for(cls("x")) == status
    assert status_for(cls) == status


def test_every_registered_code_has_a_status_and_problem() -> None:
    cat = catalog()
    assert set(cat) == set(errors.registry())
    for code, entry in cat.items():
        assert entry["status"] in {401, 403, 404, 409, 410, 412, 415, 422, 500, 503}, code
        assert entry["type"] == PROBLEM_BASE + code.replace("_", "-")
    # Nothing a client can cause on purpose should look like a server bug.
    assert [c for c, e in cat.items() if e["status"] == 500] == ["config_error", "voucher_error"]


def test_new_subclasses_inherit_their_parents_status() -> None:
    class SomeNewReason(errors.CampaignEnded):
        code = "some_new_reason"

    class AnotherConflict(errors.Conflict):
        code = "another_conflict"

    assert status_for(SomeNewReason("x")) == 410
    assert status_for(AnotherConflict("x")) == 409


def test_titles_are_short_and_constant() -> None:
    assert title_for(errors.AlreadyRedeemed) == "Already redeemed"
    assert title_for(errors.CannotPauseDraft("whatever")) == "Cannot pause draft"
    assert title_for(errors.Exhausted) == "Exhausted"


def test_from_engine_error_body_and_headers() -> None:
    resp = from_engine_error(errors.AlreadyRedeemed("code ABC was redeemed already"))
    assert resp.status_code == 409
    assert resp.media_type == PROBLEM_MEDIA_TYPE
    body = json.loads(bytes(resp.body))
    assert body == {
        "type": PROBLEM_BASE + "already-redeemed",
        "title": "Already redeemed",
        "status": 409,
        "detail": "code ABC was redeemed already",
        "code": "already_redeemed",
    }
    unavailable = from_engine_error(errors.Unavailable("shard 2 is reloading"))
    assert unavailable.status_code == 503
    assert unavailable.headers["retry-after"] == "1"


def test_config_error_detail_is_not_disclosed(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        resp = from_engine_error(errors.ConfigError("VOUCHER_DATABASE_URL=postgres://u:secret@h"))
    body = json.loads(bytes(resp.body))
    assert resp.status_code == 500
    assert "secret" not in json.dumps(body)
    assert "config_error" in caplog.text


def test_problem_extras_and_slug_spelling() -> None:
    resp = problem(429, "rate_limited", "Too Many Requests", "slow down",
                   headers={"Retry-After": "3"}, limit=10)
    body = json.loads(bytes(resp.body))
    assert body["type"] == PROBLEM_BASE + "rate-limited"
    assert body["limit"] == 10
    assert resp.headers["retry-after"] == "3"
    assert resp.headers["content-type"] == PROBLEM_MEDIA_TYPE


# --- handlers on a FastAPI app --------------------------------------------------------------


class Order(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str
    amount: int
    password: str | None = None


def make_app(max_bytes: int | None = None) -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)
    if max_bytes is not None:
        app.add_middleware(BodySizeLimit, max_bytes=max_bytes)

    @app.post("/orders")
    async def create(order: Order) -> dict[str, Any]:
        return {"ok": order.code}

    @app.get("/redeemed")
    async def redeemed() -> None:
        raise errors.AlreadyRedeemed("code ABC was redeemed already")

    @app.get("/down")
    async def down() -> None:
        raise errors.Unavailable("shard reloading")

    @app.get("/pg-down")
    async def pg_down() -> None:
        import asyncpg

        raise asyncpg.CannotConnectNowError("the database system is starting up")

    @app.get("/pg-bug")
    async def pg_bug() -> None:
        import asyncpg

        raise asyncpg.UndefinedColumnError("column x does not exist")

    @app.get("/ray-error")
    async def ray_error() -> None:
        import ray

        raise ray.exceptions.RayTaskError(
            "channel", "traceback", errors.Unavailable("shard 1 is reloading")
        ).as_instanceof_cause()

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("database password is hunter2")

    @app.get("/teapot")
    async def teapot() -> None:
        raise HTTPException(418, "short and stout")

    @app.post("/raw")
    async def raw(request: Request) -> dict[str, Any]:
        data = await request.json()
        return {"n": len(data)}

    @app.post("/stream")
    async def stream(request: Request) -> dict[str, int]:
        n = 0
        async for chunk in request.stream():
            n += len(chunk)
        return {"n": n}

    return app


async def test_engine_errors_become_problems() -> None:
    app = make_app()
    reply, _ = await asgi_request(app, "GET", "/redeemed")
    body = assert_problem(reply, 409, "already-redeemed")
    assert body["code"] == "already_redeemed"
    reply, _ = await asgi_request(app, "GET", "/down")
    assert_problem(reply, 503, "unavailable")
    assert reply.headers["retry-after"] == "1"


async def test_a_dependency_that_is_away_is_503_and_a_bug_is_500() -> None:
    app = make_app()
    reply, _ = await asgi_request(app, "GET", "/pg-down")
    assert_problem(reply, 503, "unavailable")
    assert reply.headers["retry-after"] == "1"
    reply, _ = await asgi_request(app, "GET", "/pg-bug")
    assert_problem(reply, 500, "internal-error")


async def test_an_engine_error_ray_wrapped_is_answered_as_itself() -> None:
    # A class Ray derives for a remote failure is an engine error without its attributes.
    reply, _ = await asgi_request(make_app(), "GET", "/ray-error")
    body = assert_problem(reply, 503, "unavailable")
    assert "shard 1 is reloading" in body["detail"]


def test_a_ray_task_error_crossing_a_call_comes_back_as_the_engine_error() -> None:
    import ray

    from actors.calls import _unavailable

    wrapped = ray.exceptions.RayTaskError(
        "channel", "traceback", errors.Fenced("shard 0 was fenced")
    ).as_instanceof_cause()
    got = _unavailable(wrapped)
    assert type(got) is errors.Fenced and got.message == "shard 0 was fenced"


async def test_validation_error_lists_fields_without_echoing_input() -> None:
    app = make_app()
    payload = {"code": 123, "password": "hunter2-secret", "amount": "lots"}
    reply, _ = await asgi_request(app, "POST", "/orders", body=json.dumps(payload).encode(),
                                  headers={"content-type": "application/json"})
    body = assert_problem(reply, 422, "validation-error")
    assert {tuple(e["loc"]) for e in body["errors"]} == {("body", "code"), ("body", "amount")}
    assert all(set(e) == {"loc", "msg", "type"} for e in body["errors"])
    assert "hunter2" not in reply.body.decode()
    assert "lots" not in reply.body.decode()


async def test_unknown_field_is_named() -> None:
    app = make_app()
    payload = {"code": "ABC", "amount": 1, "discount_override": 100}
    reply, _ = await asgi_request(app, "POST", "/orders", body=json.dumps(payload).encode(),
                                  headers={"content-type": "application/json"})
    body = assert_problem(reply, 422, "validation-error")
    [err] = body["errors"]
    assert err["type"] == "extra_forbidden"
    assert err["loc"] == ["body", "discount_override"]
    assert "discount_override" in err["msg"]
    assert "discount_override" in body["detail"]


async def test_missing_field_is_named() -> None:
    app = make_app()
    reply, _ = await asgi_request(app, "POST", "/orders", body=b'{"code": "ABC"}',
                                  headers={"content-type": "application/json"})
    body = assert_problem(reply, 422, "validation-error")
    assert body["errors"][0]["loc"] == ["body", "amount"]
    assert "amount" in body["errors"][0]["msg"]


async def test_malformed_json_is_400() -> None:
    app = make_app()
    reply, _ = await asgi_request(app, "POST", "/orders", body=b'{"code": "AB',
                                  headers={"content-type": "application/json"})
    assert_problem(reply, 400, "malformed-json")
    # request.json() called by hand raises json.JSONDecodeError: same answer
    reply, _ = await asgi_request(app, "POST", "/raw", body=b"{nope")
    assert_problem(reply, 400, "malformed-json")


async def test_routing_errors_are_problems() -> None:
    app = make_app()
    reply, _ = await asgi_request(app, "GET", "/nowhere")
    assert_problem(reply, 404, "not-found")
    reply, _ = await asgi_request(app, "DELETE", "/orders")
    assert_problem(reply, 405, "method-not-allowed")
    assert "POST" in reply.headers["allow"]
    reply, _ = await asgi_request(app, "GET", "/teapot")
    body = assert_problem(reply, 418, "http-418")
    assert body["detail"] == "short and stout"


async def test_unexpected_error_is_a_500_without_traceback(caplog: pytest.LogCaptureFixture) -> None:
    app = make_app()
    with caplog.at_level(logging.ERROR, logger="serve.problems"):
        reply, _ = await asgi_request(app, "GET", "/boom")
    body = assert_problem(reply, 500, "internal-error")
    text = reply.body.decode()
    assert "hunter2" not in text and "Traceback" not in text and "RuntimeError" not in text
    # ...but the server log has the traceback, with the same incident id.
    assert "hunter2" in caplog.text and "Traceback" in caplog.text
    assert body["incident"] in caplog.text


# --- body size limit -------------------------------------------------------------------------


async def test_declared_content_length_over_limit_is_refused_unread() -> None:
    app = make_app(max_bytes=100)
    big = json.dumps({"code": "A" * 500, "amount": 1}).encode()
    reply, pulled = await asgi_request(app, "POST", "/orders", body=big,
                                       headers={"content-type": "application/json"})
    body = assert_problem(reply, 413, "payload-too-large")
    assert body["max_bytes"] == 100
    assert pulled == 0


async def test_streamed_body_over_limit_stops_reading() -> None:
    app = make_app(max_bytes=100)
    chunks = [b"x" * 40] * 10  # 400 bytes, no Content-Length
    reply, pulled = await asgi_request(app, "POST", "/stream", body=chunks, content_length=False)
    assert_problem(reply, 413, "payload-too-large")
    assert pulled == 3  # the third chunk crosses 100 bytes; the rest is never read


async def test_streamed_json_body_over_limit_through_fastapi_parsing() -> None:
    app = make_app(max_bytes=100)
    raw = json.dumps({"code": "A" * 300, "amount": 1}).encode()
    chunks = [raw[i:i + 50] for i in range(0, len(raw), 50)]
    reply, pulled = await asgi_request(app, "POST", "/orders", body=chunks, content_length=False,
                                       headers={"content-type": "application/json"})
    assert_problem(reply, 413, "payload-too-large")
    assert pulled == 3


async def test_body_within_limit_passes() -> None:
    app = make_app(max_bytes=100)
    reply, _ = await asgi_request(app, "POST", "/orders", body=b'{"code": "ABC", "amount": 5}',
                                  headers={"content-type": "application/json"})
    assert reply.status == 200 and reply.json() == {"ok": "ABC"}
    reply, _ = await asgi_request(app, "POST", "/stream", body=[b"x" * 50, b"y" * 50],
                                  content_length=False)
    assert reply.status == 200 and reply.json() == {"n": 100}


async def test_body_limit_without_fastapi_handlers() -> None:
    # A bare ASGI app that reads the whole body: the middleware itself answers 413.
    async def bare(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limited = BodySizeLimit(bare, max_bytes=10)
    reply, _ = await asgi_request(limited, "POST", "/", body=[b"x" * 8, b"x" * 8],
                                  content_length=False)
    assert_problem(reply, 413, "payload-too-large")
    reply, _ = await asgi_request(limited, "POST", "/", body=b"x" * 10)
    assert reply.status == 200


async def test_invalid_content_length_is_400() -> None:
    app = make_app(max_bytes=100)
    reply, _ = await asgi_request(app, "POST", "/orders", body=b"{}",
                                  headers={"content-length": "ten"})
    assert_problem(reply, 400, "bad-request")
