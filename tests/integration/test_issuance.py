"""Customers and issuance over the real HTTP API, shard actors, Postgres and Valkey:
streamed imports with per-row rejections, an issuance to 10,000 customers (exactly one
code and one message each, a re-run adds nothing), bad requests that leave nothing
behind, the cross-shard fallback of an empty shard, and the bank refill."""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import httpx
import pytest
import ray
from redis import Redis

from engine import codes as codegen
from engine import delivery, errors, keys
from engine.codes import CodeSpec
from engine.routing import assignment_key, shard_of
from tests.engine_support import fetch, uid
from tests.http_support import (
    admin_headers,
    bearer,
    create_campaign,
    discount_body,
    finished_job,
    generate_codes,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def admin(http_api: Any) -> dict[str, str]:
    return admin_headers(http_api)


@pytest.fixture(scope="module")
def redis(services: Any) -> Any:
    client = Redis.from_url(services.redis_url)
    yield client
    client.close()


def _sql(services: Any, query: str, *args: Any) -> list[Any]:
    return asyncio.run(fetch(services.database_url, query, *args))


def _campaign(
    api: Any, headers: dict[str, str], name: str = "issuance test", **extra: Any
) -> dict[str, Any]:
    return create_campaign(api.url, headers, discount_body(name, **extra))


def _generate(api: Any, headers: dict[str, str], cid: str, count: int) -> None:
    generate_codes(api.url, headers, cid, count)


def _import(api: Any, headers: dict[str, str], body: bytes, ctype: str = "text/csv") -> httpx.Response:
    def chunks() -> Any:  # sent chunked: the server must read it as a stream
        for i in range(0, len(body), 64 * 1024):
            yield body[i : i + 64 * 1024]

    return httpx.post(
        f"{api.url}/v1/customers/import",
        content=chunks(),
        headers={**headers, "Content-Type": ctype},
        timeout=120,
    )


def _ndjson(records: list[dict[str, Any]]) -> bytes:
    return "\n".join(json.dumps(r) for r in records).encode()


def _issue(api: Any, headers: dict[str, str], cid: str, selection: dict[str, Any], channels: list[str]) -> httpx.Response:
    return httpx.post(
        f"{api.url}/v1/campaigns/{cid}/issuance",
        json={"selection": selection, "channels": channels},
        headers=headers,
    )


def _stream_entries(redis: Any, campaign_id: str, channel: str = "email") -> list[delivery.DeliveryMessage]:
    out = []
    last = "-"
    while True:
        batch = redis.xrange(keys.stream(channel), min=last, count=10_000)
        if last != "-":
            batch = batch[1:]
        if not batch:
            return out
        for _, fields in batch:
            m = delivery.decode(fields[delivery.FIELD.encode()])
            if m.campaign_id == campaign_id:
                out.append(m)
        last = batch[-1][0].decode()


# --- customers ---------------------------------------------------------------------------


def test_import_reports_rejected_rows_and_keeps_valid_ones(http_api: Any, admin: dict[str, str], services: Any) -> None:
    p = uid("imp")
    csv = (
        "id,email,phone,consent_email,consent_sms,locale,time_zone,tags\n"
        f"{p}-1,one@example.com,+14155552671,true,true,de-at,Europe/Vienna,a;b\n"
        f"{p}-2,not-an-email,,true,,,,\n"
        f"{p}-3,three@example.com,0151 1234,true,true,,,\n"
        f"{p}-4,four@example.com,,,,,,\n"
        f'{p}-5,five@example.com,,true,,en,"Mars/Base",\n'
        f"{p}-6,six@example.com,,true\n"
        f'{p}-7,"broken"quote,,true,,,,\n'
        f"{p}-8,eight@example.com,,false,,fr,,\n"
    ).encode()
    r = _import(http_api, admin, csv)
    assert r.status_code == 200, r.text
    report = r.json()
    assert (report["rows"], report["imported"], report["rejected"]) == (8, 2, 6)
    got = {(x["line"], x["field"]) for x in report["rejections"]}
    assert got == {
        (3, "email"),
        (4, "phone"),
        (5, "consent_email"),
        (6, "time_zone"),
        (7, "row"),
        (8, "row"),
    }
    one = httpx.get(f"{http_api.url}/v1/customers/{p}-1", headers=admin).json()
    assert one["locale"] == "de-AT" and one["tags"] == ["a", "b"] and one["consent_sms"] is True
    assert httpx.get(f"{http_api.url}/v1/customers/{p}-8", headers=admin).json()["consent_email"] is False
    for bad in (2, 3, 4, 5, 6, 7):
        assert httpx.get(f"{http_api.url}/v1/customers/{p}-{bad}", headers=admin).status_code == 404
    # JSON lines, and an upsert of an existing customer
    jsonl = (
        f'{{"id": "{p}-1", "email": "new@example.com", "consent_email": false, "tags": ["c"]}}\n'
        f'{{"id": "{p}-9", "push_token": "tok-9", "consent_push": true}}\n'
        "{oops}\n"
    ).encode()
    r = _import(http_api, admin, jsonl, "application/x-ndjson")
    assert r.status_code == 200, r.text
    assert (r.json()["imported"], r.json()["rejected"]) == (2, 1)
    one = httpx.get(f"{http_api.url}/v1/customers/{p}-1", headers=admin).json()
    assert (one["email"], one["consent_email"], one["tags"]) == ("new@example.com", False, ["c"])
    # whole-import refusals: wrong media type, unknown column — nothing written
    r = httpx.post(f"{http_api.url}/v1/customers/import", content=b"{}", headers={**admin, "Content-Type": "application/json"})
    assert r.status_code == 415 and r.headers["content-type"].startswith("application/problem+json")
    r = _import(http_api, admin, f"id,mail\n{p}-10,x@example.com\n".encode())
    assert r.status_code == 422 and "mail" in r.json()["detail"]
    assert httpx.get(f"{http_api.url}/v1/customers/{p}-10", headers=admin).status_code == 404


def test_create_get_list_customers(http_api: Any, admin: dict[str, str]) -> None:
    p = uid("cc")
    tag = p.lower()
    body = {"id": f"{p}-a", "email": "a@example.com", "consent_email": True, "tags": [tag]}
    r = httpx.post(f"{http_api.url}/v1/customers", json=body, headers=admin)
    assert r.status_code == 201, r.text
    assert httpx.post(f"{http_api.url}/v1/customers", json=body, headers=admin).status_code == 409
    bad = httpx.post(f"{http_api.url}/v1/customers", json={"id": f"{p}-b", "email": "a@example.com"}, headers=admin)
    assert bad.status_code == 422 and "consent_email" in bad.json()["detail"]
    listed = httpx.get(f"{http_api.url}/v1/customers", params={"tag": tag}, headers=admin).json()
    assert [c["id"] for c in listed["items"]] == [f"{p}-a"]


# --- issuance ----------------------------------------------------------------------------


def test_issuance_to_10000_customers_once_and_only_once(http_api: Any, admin: dict[str, str], services: Any, redis: Any) -> None:
    p = uid("iss")
    tag = p.lower()
    lines = ["id,email,phone,consent_email,consent_sms,tags"]
    lines += [f"{p}-{i:05d},c{i}@example.com,,true,,{tag}" for i in range(10_000)]
    lines += [f"{p}-nc{i},nc{i}@example.com,,false,,{tag}" for i in range(30)]  # no consent
    lines += [f"{p}-na{i},,+14155552671,,true,{tag}" for i in range(20)]  # no email address
    r = _import(http_api, admin, ("\n".join(lines) + "\n").encode())
    assert r.status_code == 200 and r.json()["imported"] == 10_050, r.text

    c = _campaign(http_api, admin)
    _generate(http_api, admin, c["id"], 12_000)
    httpx.post(f"{http_api.url}/v1/campaigns/{c['id']}/activate", headers=admin).raise_for_status()
    t0 = time.perf_counter()
    r = _issue(http_api, admin, c["id"], {"tag": tag}, ["email"])
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    job = finished_job(http_api.url, admin, r.json()["id"])
    took = time.perf_counter() - t0
    assert job["state"] == "done", job
    counts = job["counts"]
    assert counts["total"] == counts["selected"] == 10_050
    assert counts["assigned"] == counts["new_codes"] == 10_000
    assert (counts["skipped_no_consent"], counts["skipped_no_address"], counts["unreachable"]) == (30, 20, 50)
    assert counts["messages"] == counts["enqueued"] == 10_000 and counts["exhausted"] == 0
    print(f"\nissuance of 10,000 customers: {took:.2f}s ({counts['selected'] / took:,.0f} customers/s)")

    rows = _sql(services, "SELECT code, customer_id FROM vouchers WHERE campaign_id = $1 AND customer_id IS NOT NULL", c["id"])
    assert len(rows) == 10_000
    assert len({r["code"] for r in rows}) == 10_000 and len({r["customer_id"] for r in rows}) == 10_000
    dels = _sql(services, "SELECT customer_id, code, channel, state FROM deliveries WHERE campaign_id = $1", c["id"])
    assert len(dels) == 10_000 and len({d["customer_id"] for d in dels}) == 10_000
    by_customer = {r["customer_id"]: r["code"] for r in rows}
    assert all(d["code"] == by_customer[d["customer_id"]] and d["channel"] == "email" for d in dels)
    entries = _stream_entries(redis, c["id"])
    assert len(entries) == 10_000 and len({m.id for m in entries}) == 10_000
    assert all(m.code == by_customer[m.customer_id] and m.job_id == job["id"] for m in entries)

    # the same issuance again: no new code, no new message
    r = _issue(http_api, admin, c["id"], {"tag": tag}, ["email"])
    again = finished_job(http_api.url, admin, r.json()["id"])
    assert again["state"] == "done", again
    assert again["counts"]["assigned"] == 10_000 and again["counts"]["new_codes"] == 0
    assert again["counts"]["enqueued"] == 0 and again["counts"]["already_queued"] == 10_000
    rows2 = _sql(services, "SELECT code, customer_id FROM vouchers WHERE campaign_id = $1 AND customer_id IS NOT NULL", c["id"])
    assert {r["customer_id"]: r["code"] for r in rows2} == by_customer
    assert _sql(services, "SELECT count(*) AS n FROM deliveries WHERE campaign_id = $1", c["id"])[0]["n"] == 10_000
    assert len(_stream_entries(redis, c["id"])) == 10_000
    # a listed subset on another channel set: the same codes
    some = [f"{p}-{i:05d}" for i in range(5)]
    r = _issue(http_api, admin, c["id"], {"customer_ids": some}, ["email", "sms"])
    sub = finished_job(http_api.url, admin, r.json()["id"])
    assert sub["counts"]["new_codes"] == 0 and sub["counts"]["enqueued"] == 0
    assert sub["counts"]["skipped_no_address"] == 5  # no phone numbers


def test_bad_issuance_requests_leave_nothing_behind(http_api: Any, admin: dict[str, str], services: Any) -> None:
    p = uid("bad")
    r = httpx.post(f"{http_api.url}/v1/customers", json={"id": p, "email": "b@example.com", "consent_email": True}, headers=admin)
    assert r.status_code == 201
    c = _campaign(http_api, admin)
    _generate(http_api, admin, c["id"], 10)
    r = _issue(http_api, admin, "no-such-campaign", {"all": True}, ["email"])
    assert r.status_code == 404 and r.json()["code"] == "unknown_campaign"
    for selection, channels in (
        ({"tag": "x", "all": True}, ["email"]),
        ({}, ["email"]),
        ({"customer_ids": [p, "nobody-" + p]}, ["email"]),
        ({"tag": "has space"}, ["email"]),
        ({"all": True}, []),
        ({"all": True}, ["fax"]),
        ({"all": True, "segment": "x"}, ["email"]),
    ):
        r = _issue(http_api, admin, c["id"], selection, channels)
        assert r.status_code == 422, (selection, channels, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
    unknown = _issue(http_api, admin, c["id"], {"customer_ids": [p, "nobody-" + p]}, ["email"])
    assert "nobody-" + p in unknown.json()["detail"]
    httpx.post(f"{http_api.url}/v1/campaigns/{c['id']}/end", headers=admin).raise_for_status()
    r = _issue(http_api, admin, c["id"], {"customer_ids": [p]}, ["email"])
    assert r.status_code == 409 and r.json()["code"] == "cannot_issue_ended"
    assert _sql(services, "SELECT count(*) AS n FROM issuance_jobs WHERE campaign_id = $1", c["id"])[0]["n"] == 0
    assert _sql(services, "SELECT count(*) AS n FROM deliveries WHERE campaign_id = $1", c["id"])[0]["n"] == 0
    assert _sql(services, "SELECT count(*) AS n FROM vouchers WHERE campaign_id = $1 AND customer_id IS NOT NULL", c["id"])[0]["n"] == 0
    # analysts read customers and jobs but may not issue
    r = httpx.post(f"{http_api.url}/v1/auth/register", json={"email": f"{p}@shop.example", "password": "a-long-password", "name": "a"})
    user_id = r.json()["id"]
    httpx.put(f"{http_api.url}/v1/users/{user_id}/roles", json={"roles": ["analyst"]}, headers=admin).raise_for_status()
    tok = httpx.post(f"{http_api.url}/v1/auth/login", json={"email": f"{p}@shop.example", "password": "a-long-password"}).json()["access_token"]
    analyst = bearer(tok)
    assert httpx.get(f"{http_api.url}/v1/customers/{p}", headers=analyst).status_code == 200
    assert _issue(http_api, analyst, c["id"], {"all": True}, ["email"]).status_code == 403
    assert _import(http_api, analyst, b"id\nx\n").status_code == 403


def test_fallback_to_other_shards_when_the_deciding_shard_is_empty(
    http_api: Any, admin: dict[str, str], engine: Any, services: Any
) -> None:
    p = uid("fb")
    n = engine.n
    ids = [f"{p}-{i:03d}" for i in range(400)]
    r = httpx.post(
        f"{http_api.url}/v1/customers/import",
        content=_ndjson([{"id": i, "email": f"{i}@example.com", "consent_email": True} for i in ids]),
        headers={**admin, "Content-Type": "application/x-ndjson"},
    )
    assert r.json()["imported"] == 400, r.text
    c = _campaign(http_api, admin, limits={"total": 600})  # 600: no refill can help shard 0
    cid = c["id"]
    # the bank gets codes on every shard but shard 0
    pool = [x for x in codegen.generate(CodeSpec(), 3000, os.urandom) if shard_of(x, n) != 0]
    parts: dict[int, list[str]] = {}
    for code in pool[:600]:
        parts.setdefault(shard_of(code, n), []).append(code)
    ray.get([engine.shards[k].add_codes.remote(cid, v) for k, v in parts.items()])
    on_empty = [i for i in ids if shard_of(assignment_key(cid, i), n) == 0]
    assert len(on_empty) > 50  # about a quarter decided by the empty shard

    r = _issue(http_api, admin, cid, {"customer_ids": ids}, ["email"])
    job = finished_job(http_api.url, admin, r.json()["id"])
    assert job["state"] == "done", job
    assert job["counts"]["assigned"] == 400 and job["counts"]["exhausted"] == 0, job
    assert job["counts"]["refills"] == 0
    rows = _sql(services, "SELECT code, customer_id FROM vouchers WHERE campaign_id = $1 AND customer_id IS NOT NULL", cid)
    codes = {r["customer_id"]: r["code"] for r in rows}
    assert len(codes) == 400 and len(set(codes.values())) == 400
    assert all(shard_of(codes[i], n) != 0 for i in on_empty)
    recorded = _sql(services, "SELECT customer_id, code FROM assignments WHERE campaign_id = $1", cid)
    assert {r["customer_id"]: r["code"] for r in recorded} == {i: codes[i] for i in on_empty}

    # idempotent: a re-run, and a restart of the deciding shard (it reloads its records)
    r = _issue(http_api, admin, cid, {"customer_ids": ids}, ["email"])
    again = finished_job(http_api.url, admin, r.json()["id"])
    assert again["counts"]["new_codes"] == 0 and again["counts"]["enqueued"] == 0, again
    pid = ray.get(engine.shards[0].info.remote())["pid"]
    ray.kill(engine.shards[0], no_restart=False)

    async def after_restart(fn: Any) -> Any:
        # ray.kill returns at once: wait for the restarted process, then ask it
        deadline = time.monotonic() + 60
        while True:
            try:
                info = await engine.shard_info()
                if info[0]["pid"] != pid:
                    return await fn()
            except errors.Unavailable:
                pass
            assert time.monotonic() < deadline, "shard 0 did not come back"
            await asyncio.sleep(0.2)

    outs = asyncio.run(after_restart(lambda: engine.assign_many(cid, on_empty)))
    assert {o.assignment.customer_id: o.assignment.code for o in outs} == {i: codes[i] for i in on_empty}
    assert not any(o.assignment.created for o in outs)
    total = asyncio.run(engine.stats(cid))
    assert (total.assigned, total.available) == (400, 200)


def test_bank_refill_ahead_of_need_and_one_bank_low_notice(http_api: Any, admin: dict[str, str], services: Any) -> None:
    p = uid("rf")
    tag = p.lower()
    body = _ndjson(
        [{"id": f"{p}-{i}", "email": f"r{i}@example.com", "consent_email": True, "tags": [tag]} for i in range(2500)]
    )
    assert _import(http_api, admin, body, "application/x-ndjson").json()["imported"] == 2500
    c = _campaign(http_api, admin, limits={"total": 2600})
    _generate(http_api, admin, c["id"], 300)  # far too few: the job must refill the bank
    r = _issue(http_api, admin, c["id"], {"tag": tag}, ["email"])
    job = finished_job(http_api.url, admin, r.json()["id"])
    assert job["state"] == "done", job
    assert job["counts"]["assigned"] == 2500 and job["counts"]["exhausted"] == 0, job
    assert job["counts"]["refills"] >= 1
    stats = httpx.get(f"{http_api.url}/v1/campaigns/{c['id']}/overview", headers=admin).json()["stats"]
    assert stats["assigned"] == 2500 and stats["available"] == 100  # capped by limits.total
    # the bank ended below the threshold: one notice, however often it is checked
    r = _issue(http_api, admin, c["id"], {"tag": tag}, ["email"])
    assert finished_job(http_api.url, admin, r.json()["id"])["state"] == "done"
    notes = _sql(services, "SELECT kind FROM notifications WHERE campaign_id = $1 ORDER BY id", c["id"])
    kinds = [n["kind"] for n in notes]
    assert kinds.count("bank_low") == 1, kinds
    assert kinds.count("job_finished") >= 3  # two generation jobs (one a refill) and issuances


def test_cli_issue_shows_progress(
    http_api: Any, admin: dict[str, str], engine_settings: Any, services: Any, capsys: Any
) -> None:
    import msgspec

    from ops.cli import _attached, build_parser

    p = uid("cli")
    tag = p.lower()
    body = _ndjson(
        [{"id": f"{p}-{i}", "email": f"{i}@example.com", "consent_email": True, "tags": [tag]} for i in range(300)]
    )
    assert _import(http_api, admin, body, "application/x-ndjson").json()["imported"] == 300
    c = _campaign(http_api, admin)
    _generate(http_api, admin, c["id"], 400)
    settings = msgspec.structs.replace(
        engine_settings, database_url=services.database_url, redis_url=services.redis_url
    )
    args = build_parser().parse_args(["issue", c["id"], "--tag", tag, "--channel", "email"])
    job = asyncio.run(_attached(args, settings))
    assert job["state"] == "done" and job["counts"]["assigned"] == 300
    err = capsys.readouterr().err
    assert "300/300 customers" in err and "assigned 300" in err and "queued 300" in err
    # a bad selection is the same error as over HTTP
    args = build_parser().parse_args(["issue", "no-such-campaign", "--all"])

    with pytest.raises(errors.UnknownCampaign):
        asyncio.run(_attached(args, settings))
