"""Per-path body limits: the streamed customer import may take far more than a JSON body,
and is still cut off at its own limit, declared or streamed."""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from serve.problems import BodySizeLimit
from tests.unit.test_problems import asgi_request, assert_problem


async def reader(scope: Scope, receive: Receive, send: Send) -> None:
    total = 0
    while True:
        message = await receive()
        total += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(total).encode()})


async def test_import_path_has_its_own_limit() -> None:
    app = BodySizeLimit(reader, max_bytes=10, path_limits={"/v1/customers/import": 100})
    chunks = [b"x" * 30] * 3  # 90 bytes, streamed without Content-Length
    reply, _ = await asgi_request(app, "POST", "/v1/customers/import", body=chunks, content_length=False)
    assert reply.status == 200 and reply.body == b"90"
    # the same body elsewhere: over the default limit
    reply, _ = await asgi_request(app, "POST", "/v1/customers", body=chunks, content_length=False)
    assert_problem(reply, 413, "payload-too-large")
    # over the import limit, streamed or declared
    reply, pulled = await asgi_request(app, "POST", "/v1/customers/import", body=[b"x" * 60] * 3, content_length=False)
    assert_problem(reply, 413, "payload-too-large")
    assert pulled == 2  # reading stopped at the first chunk past the limit
    reply, _ = await asgi_request(app, "POST", "/v1/customers/import", body=b"x" * 101)
    assert_problem(reply, 413, "payload-too-large")
