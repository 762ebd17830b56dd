"""Shop webhooks without Ray or a database: signing, verification, backoff, cursors,
event types, and one delivery attempt against an in-memory transport."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import httpx
import pytest

from engine import webhooks as wh
from engine.errors import InvalidCursor, InvalidInput
from engine.settings import Settings

SECRET = "whsec_test_secret_0123456789"
BODY = b'{"id":"evt_red_1","type":"redemption.succeeded"}'


def test_sign_is_stripe_style_hmac_over_timestamp_dot_body() -> None:
    import hashlib
    import hmac

    header = wh.sign(SECRET, BODY, 1_700_000_000)
    t, v1 = header.split(",")
    assert t == "t=1700000000"
    expected = hmac.new(SECRET.encode(), b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert v1 == "v1=" + expected


def test_verify_accepts_a_fresh_signature_and_returns_its_timestamp() -> None:
    header = wh.sign(SECRET, BODY, 1000)
    assert wh.verify(SECRET, BODY, header, now=1100, tolerance_s=300) == 1000


@pytest.mark.parametrize(
    ("secret", "body", "why"),
    [("whsec_other_secret_000000", BODY, "does not match"), (SECRET, BODY + b" ", "does not match")],
)
def test_verify_refuses_another_secret_or_body(secret: str, body: bytes, why: str) -> None:
    with pytest.raises(wh.SignatureError, match=why):
        wh.verify(secret, body, wh.sign(SECRET, BODY, 1000), now=1000)


def test_verify_refuses_an_old_timestamp_a_replay() -> None:
    header = wh.sign(SECRET, BODY, 1000)
    with pytest.raises(wh.SignatureError, match="tolerance"):
        wh.verify(SECRET, BODY, header, now=1000 + 301, tolerance_s=300)
    # and a signature re-stamped with a fresh time does not match the body any more
    forged = header.replace("t=1000", "t=1301")
    with pytest.raises(wh.SignatureError, match="does not match"):
        wh.verify(SECRET, BODY, forged, now=1301)


def test_verify_takes_any_of_several_v1_values() -> None:
    good = wh.sign(SECRET, BODY, 1000).split(",")[1]
    header = f"t=1000,v1={'0' * 64},{good}"
    assert wh.verify(SECRET, BODY, header, now=1000) == 1000


@pytest.mark.parametrize("header", ["", "t=1000", "v1=ab", "t=x,v1=ab", "garbage", "t=1,,v1=a"])
def test_verify_refuses_malformed_headers(header: str) -> None:
    with pytest.raises(wh.SignatureError):
        wh.verify(SECRET, BODY, header, now=1000)


def test_backoff_doubles_up_to_its_cap_and_jitter_stays_within_half() -> None:
    assert [wh.backoff_s(n, 1.0, 100.0) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 64, 100]
    assert wh.backoff_s(0, 1.0, 100.0) == 0.0
    assert wh.backoff_s(10_000, 1.0, 100.0) == 100.0  # no overflow
    for j in (0.0, 0.5, 0.9999):
        d = wh.backoff_s(4, 1.0, 100.0, j)
        assert 4.0 <= d < 8.0
    assert wh.gives_up(5, 5) and not wh.gives_up(4, 5)


def test_cursor_round_trip_and_bad_cursors() -> None:
    p = wh.Position(123456789, 1, "evt_rb_red_abc")
    assert wh.decode_cursor(wh.encode_cursor(p)) == p
    for bad in ["", "!!!", "bm90IGpzb24", wh.encode_cursor(wh.Position(-1)), "WzEsMiwzXQ"]:
        with pytest.raises(InvalidCursor):
            wh.decode_cursor(bad)


def test_event_types_are_checked_sorted_and_star_means_all() -> None:
    assert wh.event_types(["redemption.succeeded", "campaign.created", "campaign.created"]) == (
        "campaign.created",
        "redemption.succeeded",
    )
    assert wh.event_types(["*", "campaign.created"]) == ("*",)
    assert wh.expand(["*"]) == frozenset(wh.EVENT_TYPES)
    with pytest.raises(InvalidInput, match="unknown event type"):
        wh.event_types(["redemption.exploded"])
    with pytest.raises(InvalidInput):
        wh.event_types([])


def test_event_types_match_the_recorded_and_documented_ones() -> None:
    from typing import get_args

    from serve.routes.webhooks import EventType
    from store import events

    assert tuple(events.TYPES) == wh.EVENT_TYPES
    assert get_args(EventType) == (wh.WILDCARD, *wh.EVENT_TYPES)  # the OpenAPI enum


def test_redemption_event_ids_are_derived_from_the_redemption() -> None:
    assert wh.succeeded_id("red_001abc") == "evt_red_001abc"
    assert wh.rolled_back_id("red_001abc") == "evt_rb_red_001abc"
    assert wh.redemption_of("evt_red_001abc") == (wh.SUCCEEDED, "red_001abc")
    assert wh.redemption_of("evt_rb_red_001abc") == (wh.ROLLED_BACK, "red_001abc")
    assert wh.redemption_of("evt_000xyz") is None


def _event() -> dict[str, object]:
    return {
        "id": "evt_red_1",
        "type": "redemption.succeeded",
        "created_at": datetime(2026, 1, 1, tzinfo=UTC),
        "campaign_id": "c1",
        "resource_id": "red_1",
        "data": {"id": "red_1"},
    }


def _dispatcher(handler: object, **settings: object) -> object:
    """A dispatcher whose deliveries go to ``handler`` (an httpx mock handler)."""
    from actors.webhooks import Dispatcher

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))  # type: ignore[arg-type]

    async def post(url: str, body: bytes, headers: dict[str, str]) -> int:
        try:
            return (await http.post(url, content=body, headers=headers)).status_code
        except httpx.ConnectError as exc:
            raise OSError(str(exc)) from None

    s = Settings(webhook_backoff_base_s=2.0, webhook_backoff_max_s=60.0, **settings)  # type: ignore[arg-type]
    return Dispatcher("postgresql://unused", s, post=post, clock=lambda: 1000.0, rand=lambda: 0.0)


def test_a_delivery_is_signed_and_carries_the_event_id() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    d = _dispatcher(handler)
    a = asyncio.run(d.attempt("we_1", "https://shop.example/hook", SECRET, _event(), 1))  # type: ignore[attr-defined]
    assert a.ok and a.status_code == 204 and a.next_at is None
    [req] = seen
    body = req.content
    assert json.loads(body)["id"] == "evt_red_1"
    assert req.headers[wh.EVENT_ID_HEADER] == "evt_red_1"
    assert req.headers[wh.ATTEMPT_HEADER] == "1"
    assert wh.verify(SECRET, body, req.headers[wh.SIGNATURE_HEADER], now=1000) == 1000


def test_a_failed_delivery_is_retried_later_until_attempts_run_out() -> None:
    d = _dispatcher(lambda r: httpx.Response(503), webhook_max_attempts=3)
    a = asyncio.run(d.attempt("we_1", "https://shop.example/hook", SECRET, _event(), 2))  # type: ignore[attr-defined]
    assert not a.ok and a.status_code == 503 and a.error == "HTTP 503"
    assert a.next_at is not None and (a.next_at - a.at).total_seconds() == 2.0  # 4 s, jitter 0 halves
    last = asyncio.run(d.attempt("we_1", "https://shop.example/hook", SECRET, _event(), 3))  # type: ignore[attr-defined]
    assert not last.ok and last.next_at is None  # given up


def test_a_connection_error_is_a_failed_attempt_not_a_crash() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    d = _dispatcher(handler)
    a = asyncio.run(d.attempt("we_1", "https://shop.example/hook", SECRET, _event(), 1))  # type: ignore[attr-defined]
    assert not a.ok and a.status_code is None and "refused" in (a.error or "")
    assert a.next_at is not None


def test_the_poster_refuses_internal_addresses_at_connect_time() -> None:
    """An internal IP literal is refused before any connection; a name is checked when it
    resolves, whatever it resolved to at registration (DNS rebinding)."""
    from actors.webhooks import Poster, VettingResolver
    from engine import urls
    from engine.errors import InternalAddress

    poster = Poster((), timeout_s=1.0, connections=1)
    for url in ("http://127.0.0.1:9/x", "http://169.254.169.254/latest", "http://[::1]/x",
                "http://2130706433/x", "http://10.0.0.1/x"):
        with pytest.raises(InternalAddress):
            asyncio.run(poster(url, b"{}", {}))
    assert poster.session is None  # nothing was opened

    async def rebinding(host: str, port: int) -> list[urls.IP]:
        import ipaddress

        return [ipaddress.ip_address("127.0.0.1")]

    with pytest.raises(InternalAddress, match="resolves to 127.0.0.1"):
        asyncio.run(VettingResolver((), rebinding).resolve("shop.example", 443))
    allowed = VettingResolver(urls.parse_allow("shop.example:443"), rebinding)
    [res] = asyncio.run(allowed.resolve("shop.example", 443))
    assert res["host"] == "127.0.0.1" and res["hostname"] == "shop.example"


def test_the_dispatcher_process_runs_at_idle_priority_or_niced() -> None:
    import subprocess
    import sys

    code = (
        "from actors.webhooks import lower_priority; from engine.settings import Settings; "
        "import sys; print(lower_priority(Settings(webhook_idle_priority=sys.argv[1] == '1', "
        "webhook_niceness=7)))"
    )
    out = [
        subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True, check=True)
        .stdout.strip()
        for flag in ("1", "0")
    ]
    assert out[0] in ("idle", "nice 7") and out[1].startswith("nice ")
    if sys.platform == "linux":
        assert out[0] == "idle"


def test_a_rate_bound_paces_the_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    from actors import webhooks as actor

    slept: list[float] = []

    async def fake_sleep(s: float) -> None:
        slept.append(s)

    monkeypatch.setattr(actor.asyncio, "sleep", fake_sleep)
    d = actor.Dispatcher("postgresql://unused", Settings(webhook_max_rate=100.0))
    asyncio.run(d.pace(50, 0.1))  # 50 at 100/s take 0.5 s: 0.4 s to wait
    asyncio.run(d.pace(50, 0.7))  # slower than the bound already
    asyncio.run(actor.Dispatcher("postgresql://unused", Settings()).pace(50, 0.0))  # no bound
    assert slept == [pytest.approx(0.4), 0.0]
