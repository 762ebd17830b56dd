"""Notification fan-out against real servers started here: an aiosmtpd SMTP server
receives the admin email, a local HTTP server receives the signed webhook (answering 500
first, so the dispatcher must retry), and the attempts are recorded."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from aiosmtpd.controller import Controller

from engine import notify
from tests.http_support import admin_headers
from tests.support import free_port

pytestmark = pytest.mark.integration
SECRET = "test-webhook-secret-0123456789"


class _Mailbox:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        msg = message_from_bytes(envelope.content)
        self.messages.append((list(envelope.rcpt_tos), msg))
        return "250 OK"


class _Hook(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes, int]] = []
    fail_first: set[str] = set()

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        delivery = self.headers.get("X-Voucher-Delivery", "")
        status = 200
        if delivery not in _Hook.fail_first:
            _Hook.fail_first.add(delivery)
            status = 500  # every delivery fails once, then succeeds
        _Hook.received.append(({k.lower(): v for k, v in self.headers.items()}, body, status))
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def smtp() -> Iterator[tuple[_Mailbox, int]]:
    box = _Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    yield box, port
    controller.stop()


@pytest.fixture(scope="module")
def hook_server(http_api: Any) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", http_api.hook_port), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


@pytest.fixture(scope="module")
def notifier(http_api: Any, engine_settings: Any, services: Any, smtp: Any) -> Any:
    from actors.notifier import start_notifier

    settings = msgspec.structs.replace(
        engine_settings,
        smtp_url=f"smtp://127.0.0.1:{smtp[1]}",
        outbound_allow=f"127.0.0.1:{http_api.hook_port}",
        notify_retry_base_s=0.2,
        notify_poll_s=0.1,
    )
    return start_notifier(settings, services.database_url)


@pytest.fixture(scope="module")
def admin(http_api: Any) -> dict[str, str]:
    return admin_headers(http_api)


def _wait(pred: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def test_email_and_signed_webhook_with_retry(
    http_api: Any, admin: dict[str, str], notifier: Any, smtp: Any, hook_server: str, services: Any
) -> None:
    box, _ = smtp
    r = httpx.post(
        f"{http_api.url}/v1/notification-webhooks",
        json={"url": hook_server, "secret": SECRET, "kinds": ["campaign_ended", "delivery_dead"]},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    hook_id = r.json()["id"]
    assert "secret" not in httpx.get(f"{http_api.url}/v1/notification-webhooks", headers=admin).json()["items"][0]
    bad = httpx.post(f"{http_api.url}/v1/notification-webhooks", json={"url": "ftp://x", "secret": SECRET}, headers=admin)
    assert bad.status_code == 422

    cid = f"notify-{os.urandom(4).hex()}"
    body = {"id": cid, "name": "notify test", "type": "discount", "currency": "EUR",
            "discount": {"kind": "percent", "value": 5}}
    assert httpx.post(f"{http_api.url}/v1/campaigns", json=body, headers=admin).status_code == 201
    httpx.post(f"{http_api.url}/v1/campaigns/{cid}/activate", headers=admin).raise_for_status()
    httpx.post(f"{http_api.url}/v1/campaigns/{cid}/end", headers=admin).raise_for_status()

    # the email reaches the SMTP server, addressed to the admins
    def mail() -> Any:
        return [(to, m) for to, m in box.messages if cid in (m["Subject"] or "") and "ended" in m["Subject"]]

    (to, msg), = _wait(mail)
    assert "admin@test.example" in to
    assert "ended" in msg.get_payload()

    # the webhook: first answered 500, retried, then accepted; both carry a valid signature
    def hooks() -> Any:
        got = [(h, b, s) for h, b, s in _Hook.received if json.loads(b)["campaign_id"] == cid]
        return got if any(s == 200 for _, _, s in got) else None

    got = _wait(hooks)
    assert [s for _, _, s in got] == [500, 200]
    for headers, raw, _ in got:
        assert headers["x-voucher-event"] == "campaign_ended"
        assert notify.verify(SECRET, raw, headers["x-voucher-signature"], int(time.time()))
        assert not notify.verify("some-other-secret-000", raw, headers["x-voucher-signature"], int(time.time()))
    payload = json.loads(got[0][1])
    assert payload["kind"] == "campaign_ended" and cid in payload["message"]

    # the attempts are recorded, and shown by the API
    def sends() -> Any:
        items = httpx.get(f"{http_api.url}/v1/notifications/{payload['id']}/deliveries", headers=admin).json()["items"]
        hook = [s for s in items if s["target"] == f"webhook:{hook_id}"]
        return items if hook and hook[0]["state"] == "sent" else None

    items = _wait(sends)
    hook = next(s for s in items if s["target"] == f"webhook:{hook_id}")
    assert hook["attempts"] == 2
    assert [(a["ok"], a["status"]) for a in hook["attempts_log"]] == [(False, 500), (True, 200)]
    email = next(s for s in items if s["target"] == "email")
    assert email["state"] == "sent" and email["attempts"] == 1
    # the campaign_started notice went by email only (the webhook wants other kinds)
    assert not [b for h, b, s in _Hook.received if json.loads(b)["kind"] == "campaign_started"]


def test_rows_inserted_by_anyone_are_fanned_out_once(
    http_api: Any, admin: dict[str, str], notifier: Any, smtp: Any, hook_server: str, services: Any
) -> None:
    """The delivery workers insert their notices straight into the table."""
    box, _ = smtp
    cid = f"dead-{os.urandom(4).hex()}"

    async def insert() -> int:
        conn = await asyncpg.connect(services.database_url)
        try:
            return int(await conn.fetchval(
                "INSERT INTO notifications (kind, campaign_id, message) VALUES ($1, $2, $3) RETURNING id",
                "delivery_dead", cid, f"3 messages of {cid} are in the dead-letter stream",
            ))
        finally:
            await conn.close()

    nid = asyncio.run(insert())
    _wait(lambda: [m for _, m in box.messages if cid in (m["Subject"] or "")])
    _wait(lambda: [1 for _, b, s in _Hook.received if json.loads(b)["id"] == nid and s == 200])
    time.sleep(1.0)  # a few more dispatcher rounds: nothing is sent twice
    assert len([m for _, m in box.messages if cid in (m["Subject"] or "")]) == 1
    assert len([1 for _, b, s in _Hook.received if json.loads(b)["id"] == nid and s == 200]) == 1


def test_limit_nearly_exhausted_is_noticed_once(
    http_api: Any, admin: dict[str, str], notifier: Any, services: Any
) -> None:
    """The dispatcher's periodic scan (the hot path never checks) notices a campaign whose
    redemptions reach 90% of limits.total, once for the crossing."""
    code = f"NEAR{os.urandom(4).hex()}".upper()
    body = {"name": "near limit", "type": "shared_code", "currency": "EUR",
            "discount": {"kind": "amount", "value": 100},
            "limits": {"total": 10, "per_customer": 1}, "shared_code": code}
    r = httpx.post(f"{http_api.url}/v1/campaigns", json=body, headers=admin)
    assert r.status_code == 201, r.text
    cid = r.json()["id"]
    httpx.post(f"{http_api.url}/v1/campaigns/{cid}/activate", headers=admin).raise_for_status()
    for i in range(9):
        r = httpx.post(
            f"{http_api.url}/v1/redemptions",
            json={"code": code, "customer_id": f"{cid}-{i}", "order": {"amount": 1000, "currency": "EUR"}},
            headers=admin,
        )
        assert r.status_code == 201, r.text

    async def kinds() -> list[str]:
        conn = await asyncpg.connect(services.database_url)
        try:
            rows = await conn.fetch("SELECT kind FROM notifications WHERE campaign_id = $1", cid)
            return [r["kind"] for r in rows]
        finally:
            await conn.close()

    _wait(lambda: "limit_nearly_exhausted" in asyncio.run(kinds()), timeout_s=20)
    time.sleep(6)  # at least one more scan: still one notice
    assert asyncio.run(kinds()).count("limit_nearly_exhausted") == 1


INTERNAL_FORMS = [
    "http://127.0.0.1:6379",
    "http://127.0.0.1:{api_port}/v1/campaigns",
    "http://127.0.0.1:{port}/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]:{port}/hook",
    "http://[fd00:ec2::254]/",
    "http://localhost:5432",
    "http://LocalHost.:{port}/hook",
    "http://2130706433:{port}/hook",
    "http://0x7f.1:{port}/hook",
    "http://017700000001:{port}/hook",
    "http://127.1:{port}/hook",
    "http://0.0.0.0:{port}/",
    "http://10.0.0.1/hook",
    "http://100.64.0.1/hook",
]


class _Trap(BaseHTTPRequestHandler):
    received: list[str] = []

    def do_POST(self) -> None:  # noqa: N802
        _Trap.received.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_internal_addresses_are_refused_at_registration_and_at_connect_time(
    http_api: Any, admin: dict[str, str], notifier: Any, services: Any
) -> None:
    """Every internal URL form gets 422 saying why; and a webhook to a listener on
    127.0.0.1 that got into the table anyway (registered before the rule, or through a name
    that resolves there now) is refused when the dispatcher connects: nothing arrives."""
    trap = ThreadingHTTPServer(("127.0.0.1", 0), _Trap)
    threading.Thread(target=trap.serve_forever, daemon=True).start()
    port = trap.server_address[1]
    api_port = httpx.URL(http_api.url).port
    trap_id = f"wh_trap{os.urandom(4).hex()}"
    try:
        for form in [*INTERNAL_FORMS, "localhost:5432", "http://user:pw@example.com/hook"]:
            url = form.format(port=port, api_port=api_port)
            r = httpx.post(f"{http_api.url}/v1/notification-webhooks",
                           json={"url": url, "secret": SECRET}, headers=admin)
            assert r.status_code == 422, (url, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            detail = r.json()["detail"]
            assert detail.startswith("url"), (url, detail)
            if form in INTERNAL_FORMS:
                assert r.json()["code"] == "internal_address", (url, r.text)
                assert "internal addresses are refused" in detail, (url, detail)
        assert detail_of(http_api, admin, "http://127.0.0.1:6379") == (
            "url: 127.0.0.1, a loopback address; requests to internal addresses are refused "
            "(VOUCHER_OUTBOUND_ALLOW can allow it)"
        )
        assert "is 169.254.169.254, a cloud metadata address" in detail_of(
            http_api, admin, "http://0xa9fea9fe/latest/")
        listed = httpx.get(f"{http_api.url}/v1/notification-webhooks", headers=admin).json()["items"]
        assert not [h for h in listed if str(port) in h["url"] or "6379" in h["url"]]

        async def smuggle() -> int:
            conn = await asyncpg.connect(services.database_url)
            try:
                await conn.execute(
                    "INSERT INTO notification_webhooks (id, url, secret, kinds) VALUES ($1, $2, $3, $4)",
                    trap_id, f"http://127.0.0.1:{port}/hook", SECRET, ["job_failed"],
                )
                return int(await conn.fetchval(
                    "INSERT INTO notifications (kind, message) VALUES ('job_failed', 'trap') RETURNING id"
                ))
            finally:
                await conn.close()

        nid = asyncio.run(smuggle())

        def refused() -> Any:
            items = httpx.get(f"{http_api.url}/v1/notifications/{nid}/deliveries", headers=admin).json()["items"]
            hook = [s for s in items if s["target"] == f"webhook:{trap_id}" and s["attempts_log"]]
            return hook[0] if hook else None

        send = _wait(refused)
        assert send["state"] != "sent"
        assert "a loopback address" in send["attempts_log"][0]["error"]
        time.sleep(0.5)  # a retry or two more: still nothing
        assert _Trap.received == []
    finally:
        async def drop() -> None:
            conn = await asyncpg.connect(services.database_url)
            try:
                await conn.execute("UPDATE notification_webhooks SET active = false WHERE id = $1", trap_id)
            finally:
                await conn.close()

        asyncio.run(drop())
        trap.shutdown()


def detail_of(http_api: Any, admin: dict[str, str], url: str) -> str:
    r = httpx.post(f"{http_api.url}/v1/notification-webhooks", json={"url": url}, headers=admin)
    assert r.status_code == 422, r.text
    return str(r.json()["detail"])
