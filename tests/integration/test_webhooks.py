"""Shop webhooks over real HTTP: a local receiver (127.0.0.1, allow-listed for this test)
that fails 30 % of the time gets every event exactly once after deduplication by id, the
signatures verify, an old timestamp is rejectable, the dispatcher resumes after a kill,
the URL guard refuses internal addresses, and ``GET /v1/events`` lists and filters."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from engine import webhooks as wh
from engine.webhooks import Position
from store import webhooks as store
from tests.engine_support import campaign_codes, fetchval
from tests.http_support import admin_headers, create_campaign, discount_body, generate_codes
from tests.support import free_port

pytestmark = pytest.mark.integration


class _Receiver(BaseHTTPRequestHandler):
    """Answers 500 to 30 % of the deliveries (seeded), 200 to the rest; records all."""

    received: list[tuple[dict[str, str], bytes, int]] = []
    rng = random.Random(1515)
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with _Receiver.lock:
            status = 500 if _Receiver.rng.random() < 0.3 else 200
            _Receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body, status))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def receiver(http_api: Any) -> Iterator[str]:
    # the gateway's VOUCHER_OUTBOUND_ALLOW names exactly this address (tests/conftest.py)
    server = ThreadingHTTPServer(("127.0.0.1", http_api.hook_port), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks/voucher"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def dispatcher(http_api: Any, engine_settings: Any, services: Any) -> Iterator[Any]:
    import ray

    from actors.webhooks import start_webhooks

    settings = msgspec.structs.replace(
        engine_settings,
        outbound_allow=f"127.0.0.1:{http_api.hook_port}",
        webhook_poll_s=0.05,
        webhook_backoff_base_s=0.05,
        webhook_backoff_max_s=0.5,
        webhook_max_attempts=40,
        webhook_batch=16,
    )
    actor = start_webhooks(settings, services.database_url, name="webhooks-test")
    yield actor
    ray.kill(actor, no_restart=True)


@pytest.fixture(scope="module")
def admin(http_api: Any) -> dict[str, str]:
    return admin_headers(http_api)


def _wait(pred: Any, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def _endpoints(dsn: str) -> int:
    return int(asyncio.run(fetchval(dsn, "SELECT count(*) FROM webhook_endpoints")))


def test_the_url_guard_refuses_internal_addresses(http_api: Any, admin: dict[str, str]) -> None:
    url, before = http_api.url, _endpoints(http_api.database_url)
    other = free_port()
    while other == http_api.hook_port:
        other = free_port()
    for target in (
        f"http://127.0.0.1:{other}/hook",  # loopback, not the allow-listed port
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://10.1.2.3/hook",  # private
        "http://localhost/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://2130706433/hook",  # 127.0.0.1 as one number
    ):
        r = httpx.post(f"{url}/v1/webhooks", json={"url": target, "events": ["*"]}, headers=admin)
        assert r.status_code == 422, (target, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == "internal_address", r.json()
    for body in (
        {"url": "ftp://example.com/x", "events": ["*"]},
        {"url": "http://user:pw@example.com/x", "events": ["*"]},
        {"url": "https://example.com/x", "events": ["redemption.exploded"]},
        {"url": "https://example.com/x", "events": []},
        {"url": "https://example.com/x"},
    ):
        r = httpx.post(f"{url}/v1/webhooks", json=body, headers=admin)
        assert r.status_code == 422, (body, r.text)
    assert _endpoints(http_api.database_url) == before  # nothing half-written
    assert httpx.post(f"{url}/v1/webhooks", json={"url": "https://example.com/x", "events": ["*"]}).status_code == 401


def test_every_event_arrives_once_after_dedup_signed_despite_failures_and_a_restart(
    http_api: Any, admin: dict[str, str], receiver: str, dispatcher: Any
) -> None:
    import ray

    url, dsn = http_api.url, http_api.database_url
    r = httpx.post(
        f"{url}/v1/webhooks",
        json={"url": receiver, "events": ["redemption.succeeded", "redemption.rolled_back", "voucher.updated"]},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    hook = r.json()
    secret, hook_id = hook["secret"], hook["id"]
    assert secret.startswith("whsec_") and hook["enabled"] is True
    assert "secret" not in httpx.get(f"{url}/v1/webhooks/{hook_id}", headers=admin).json()
    assert all("secret" not in h for h in httpx.get(f"{url}/v1/webhooks", headers=admin).json()["data"])

    c = create_campaign(url, admin, discount_body("webhooks"))
    generate_codes(url, admin, c["id"], 40)
    httpx.post(f"{url}/v1/campaigns/{c['id']}/activate", headers=admin).raise_for_status()
    codes = sorted(asyncio.run(campaign_codes(dsn, c["id"])))
    expected: set[str] = set()
    redemptions = []
    for i, code in enumerate(codes[:30]):
        order = {"id": f"o-wh-{i}", "amount": 5000, "currency": "EUR"}
        r = httpx.post(f"{url}/v1/redemptions", json={"code": code, "order": order}, headers=admin)
        assert r.status_code == 201, r.text
        redemptions.append(r.json()["id"])
        expected.add(wh.succeeded_id(r.json()["id"]))
        if i == 12:
            # the dispatcher dies mid-stream; Ray restarts it, it resumes from Postgres
            ray.kill(dispatcher, no_restart=False)
    for rid in redemptions[:5]:
        r = httpx.post(f"{url}/v1/redemptions/{rid}/rollback", headers=admin)
        assert r.status_code == 200, r.text
        expected.add(wh.rolled_back_id(rid))
    r = httpx.patch(f"{url}/v1/vouchers/{codes[35]}", json={"active": False}, headers=admin)
    assert r.status_code == 200, r.text
    updated_id = asyncio.run(
        fetchval(dsn, "SELECT id FROM events WHERE type = 'voucher.updated' AND resource_id = $1", codes[35])
    )
    expected.add(updated_id)

    def delivered_ok() -> set[str]:
        with _Receiver.lock:
            got = list(_Receiver.received)
        return {
            json.loads(b)["id"]
            for _, b, status in got
            if status == 200 and json.loads(b).get("campaign_id") == c["id"]
        }

    _wait(lambda: expected <= delivered_ok(), timeout_s=90)
    time.sleep(1.0)  # anything still in flight would show up as an extra
    with _Receiver.lock:
        mine = [(h, b, s) for h, b, s in _Receiver.received if json.loads(b).get("campaign_id") == c["id"]]
    assert delivered_ok() == expected  # exactly the expected events, after dedup by id
    assert any(s == 500 for _, _, s in mine)  # the receiver did fail some, so retries happened
    now = int(time.time())
    for headers, body, _ in mine:
        event = json.loads(body)
        assert headers[wh.EVENT_ID_HEADER.lower()] == event["id"]
        assert headers[wh.EVENT_TYPE_HEADER.lower()] == event["type"]
        ts = wh.verify(secret, body, headers[wh.SIGNATURE_HEADER.lower()], now=now, tolerance_s=600)
        # a replay of this delivery later than the receiver's tolerance is refused
        with pytest.raises(wh.SignatureError, match="tolerance"):
            wh.verify(secret, body, headers[wh.SIGNATURE_HEADER.lower()], now=ts + 301, tolerance_s=300)
    rb = next(json.loads(b) for _, b, s in mine if json.loads(b)["type"] == "redemption.rolled_back")
    assert rb["data"]["status"] == "rolled_back" and rb["data"]["rolled_back_at"]
    assert rb["resource_id"] in redemptions[:5]

    # the delivery log: every attempt this endpoint's receiver saw, with its outcome
    log: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": 50, **({"cursor": cursor} if cursor else {})}
        page = httpx.get(f"{url}/v1/webhooks/{hook_id}/deliveries", params=params, headers=admin).json()
        log += page["data"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    mine_log = [a for a in log if a["event_id"] in expected]
    assert {a["event_id"] for a in mine_log if a["outcome"] == "succeeded"} == expected
    assert any(a["outcome"] == "retrying" and a["status_code"] == 500 for a in mine_log)
    # at least once: a send whose log commit was lost to the kill may have gone out twice
    assert len(mine_log) <= len(mine)
    assert httpx.get(f"{url}/v1/webhooks/{hook_id}/deliveries", params={"cursor": "x"}, headers=admin).status_code == 422

    # switched off: nothing is delivered; switched on, it catches up
    r = httpx.patch(f"{url}/v1/webhooks/{hook_id}", json={"enabled": False}, headers=admin)
    assert r.status_code == 200 and r.json()["enabled"] is False
    r = httpx.post(
        f"{url}/v1/redemptions",
        json={"code": codes[31], "order": {"id": "o-wh-off", "amount": 5000, "currency": "EUR"}},
        headers=admin,
    )
    assert r.status_code == 201
    late = wh.succeeded_id(r.json()["id"])
    time.sleep(1.0)
    assert late not in delivered_ok()
    httpx.patch(f"{url}/v1/webhooks/{hook_id}", json={"enabled": True}, headers=admin).raise_for_status()
    _wait(lambda: late in delivered_ok())

    assert httpx.patch(f"{url}/v1/webhooks/{hook_id}", json={"url": "http://169.254.169.254/"}, headers=admin).status_code == 422
    assert httpx.delete(f"{url}/v1/webhooks/{hook_id}", headers=admin).status_code == 200
    assert httpx.get(f"{url}/v1/webhooks/{hook_id}", headers=admin).status_code == 404
    assert httpx.delete(f"{url}/v1/webhooks/{hook_id}", headers=admin).status_code == 404
    assert httpx.get(f"{url}/v1/webhooks/{hook_id}/deliveries", headers=admin).status_code == 404


def test_events_list_in_commit_order_with_filters_and_cursors(
    http_api: Any, admin: dict[str, str]
) -> None:
    url, dsn = http_api.url, http_api.database_url
    t0 = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    c = create_campaign(url, admin, discount_body("events"))
    generate_codes(url, admin, c["id"], 12)
    httpx.post(f"{url}/v1/campaigns/{c['id']}/activate", headers=admin).raise_for_status()
    rids = []
    for i, code in enumerate(sorted(asyncio.run(campaign_codes(dsn, c["id"])))[:10]):
        r = httpx.post(
            f"{url}/v1/redemptions",
            json={"code": code, "order": {"id": f"o-ev-{i}", "amount": 1000, "currency": "EUR"},
                  "metadata": {"n": i}},
            headers=admin,
        )
        assert r.status_code == 201, r.text
        rids.append(r.json()["id"])
    httpx.post(f"{url}/v1/redemptions/{rids[0]}/rollback", headers=admin).raise_for_status()

    def listing(**params: Any) -> list[dict[str, Any]]:
        out, cursor = [], None
        while True:
            q = {**params, **({"cursor": cursor} if cursor else {})}
            r = httpx.get(f"{url}/v1/events", params=q, headers=admin)
            assert r.status_code == 200, r.text
            out += r.json()["data"]
            cursor = r.json()["next_cursor"]
            if cursor is None:
                return out

    def mine(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """This campaign's redemption events (its campaign.* events are checked apart)."""
        return [e for e in events if e["campaign_id"] == c["id"] and e["type"].startswith("redemption.")]

    # pages of 3 from this test's start (the session's earlier events are not paged by 3)
    everything = _wait(lambda: (lambda ev: ev if len(ev) == 11 else None)(mine(listing(since=t0, limit=3))))
    ids = [e["id"] for e in everything]
    assert len(set(ids)) == 11
    assert [e["id"] for e in mine(listing(limit=1000))] == ids  # the same from the stream's start
    assert ids[:10] == [wh.succeeded_id(r) for r in rids]  # commit order
    assert ids[10] == wh.rolled_back_id(rids[0])
    assert everything[3]["data"]["metadata"] == {"n": 3}
    assert everything[3]["object"] == "event" and everything[3]["type"] == "redemption.succeeded"

    lifecycle = [e["type"] for e in listing(type="campaign.created,campaign.activated", limit=1000)
                 if e["campaign_id"] == c["id"]]
    assert lifecycle == ["campaign.created", "campaign.activated"]
    only_rb = mine(listing(type="redemption.rolled_back", limit=1000))
    assert [e["id"] for e in only_rb] == [wh.rolled_back_id(rids[0])]
    both = mine(listing(type="redemption.rolled_back,redemption.succeeded", limit=1000))
    assert [e["id"] for e in both] == ids
    since = everything[5]["created_at"]
    assert [e["id"] for e in mine(listing(since=since, type="redemption.succeeded"))] == ids[5:10]
    assert listing(since="2999-01-01T00:00:00Z") == []

    for params in ({"cursor": "not-a-cursor"}, {"cursor": "eyJ4Ijox"}, {"type": "nope.nope"},
                   {"limit": 0}, {"since": "yesterday"}, {"since": "0.5"}, {"since": "2026-12-03T06:00:00"}):
        r = httpx.get(f"{url}/v1/events", params=params, headers=admin)
        assert r.status_code == 422, (params, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
    assert httpx.get(f"{url}/v1/events").status_code == 401


def test_pages_read_slice_by_slice_miss_nothing_and_repeat_nothing(http_api: Any, admin: dict[str, str]) -> None:
    """Pages read in slices of a few transaction ids (so many end short of their limit,
    some empty, without being the end) give, cursor after cursor, exactly the stream one
    read gives."""
    url, dsn = http_api.url, http_api.database_url
    start = Position(int(asyncio.run(fetchval(dsn, "SELECT txid_current()"))))
    c = create_campaign(url, admin, discount_body("slices"))
    generate_codes(url, admin, c["id"], 30)
    httpx.post(f"{url}/v1/campaigns/{c['id']}/activate", headers=admin).raise_for_status()
    expected = []
    for i, code in enumerate(sorted(asyncio.run(campaign_codes(dsn, c["id"])))[:30]):
        r = httpx.post(f"{url}/v1/redemptions", headers=admin,
                       json={"code": code, "order": {"id": f"o-sl-{i}", "amount": 1000, "currency": "EUR"}})
        assert r.status_code == 201, r.text
        expected.append(wh.succeeded_id(r.json()["id"]))
        if i % 4 == 0:
            httpx.post(f"{url}/v1/redemptions/{r.json()['id']}/rollback", headers=admin).raise_for_status()
            expected.append(wh.rolled_back_id(r.json()["id"]))

    async def run() -> tuple[list[str], list[list[str]]]:
        db = await asyncpg.connect(dsn)
        try:
            xmin = await store.snapshot_xmin(db)
            whole = await store.read_events(db, start, limit=100_000, window=xmin - start.txid)
            assert whole.next.txid == xmin and len(whole.events) < 100_000
            pages, at = [], start
            while at.txid < xmin:
                # one slice of 5 transaction ids (no time to read on), or as many as 50 ms allow
                page = await store.read_page(db, at, limit=7, window=5, budget_s=0.05 * (len(pages) % 2))
                assert len(page.events) <= 7
                pages.append([e["id"] for e in page.events])
                assert (page.next.txid, page.next.kind, page.next.id) > (at.txid, at.kind, at.id)
                at = page.next
            return [e["id"] for e in whole.events], pages
        finally:
            await db.close()

    whole, pages = asyncio.run(run())
    assert [i for i in whole if i in set(expected)] == expected  # commit order
    paged = [i for p in pages for i in p]
    assert paged[: len(whole)] == whole  # the last pages may hold events committed since
    assert len(paged) == len(set(paged))
    assert any(len(p) < 7 for p in pages[:-1])  # short pages that were not the end
