"""A campaign's codes over HTTP: the keyset list (every code exactly once while codes are
redeemed between pages, filters, bad cursors, unknown campaign) and CSV exports (content
checked against Postgres, the export.completed event, an export whose runner stopped
continued by a gateway, exports deleted by hand or by age with their files purged)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import threading
import time
from datetime import UTC
from typing import Any

import httpx

from store import exports
from store.pools import connect
from tests.engine_support import campaign_codes, fetch, fetchval, uid
from tests.http_support import admin_headers, create_campaign, discount_body, generate_codes

STATUS = ("available", "assigned", "redeemed", "void")


def _integration_key(url: str, admin: dict[str, str]) -> dict[str, str]:
    r = httpx.post(f"{url}/v1/api-keys", headers=admin, json={"name": uid("k"), "roles": ["integration"]})
    assert r.status_code == 201, r.text
    return {"X-API-Key": r.json()["key"]}


def _all_pages(url: str, headers: dict[str, str], cid: str, **params: Any) -> tuple[list[dict[str, Any]], int]:
    seen: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        q = dict(params) | ({"cursor": cursor} if cursor else {})
        r = httpx.get(f"{url}/v1/campaigns/{cid}/vouchers", params=q, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        seen += body["data"]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return seen, pages


def _import(url: str, admin: dict[str, str], cid: str, body: str) -> None:
    r = httpx.post(f"{url}/v1/campaigns/{cid}/vouchers/import", content=body.encode(),
                   headers={**admin, "Content-Type": "text/csv"}, timeout=60)
    assert r.status_code == 200 and r.json()["rejected"] == 0, r.text


def test_pages_show_every_code_once_while_codes_are_redeemed(http_api: Any) -> None:
    url, dsn = http_api.url, http_api.database_url
    admin = admin_headers(http_api)
    c = create_campaign(url, admin, discount_body("list under load"))
    cid = c["id"]
    generate_codes(url, admin, cid, 3000)
    httpx.post(f"{url}/v1/campaigns/{cid}/activate", headers=admin).raise_for_status()
    codes = sorted(asyncio.run(campaign_codes(dsn, cid)))
    assert len(codes) == 3000
    key = _integration_key(url, admin)
    redeemed: list[str] = []
    stop = threading.Event()

    def redeem() -> None:
        # codes spread over the whole range: some are redeemed before their page is read,
        # some after
        with httpx.Client(base_url=url, headers=key, timeout=30) as client:
            for i, code in enumerate(codes[::7]):
                if stop.is_set():
                    return
                order = {"id": f"o-{i}", "amount": 5000, "currency": "EUR"}
                r = client.post("/v1/redemptions", json={"code": code, "order": order})
                assert r.status_code == 201, r.text
                redeemed.append(code)

    worker = threading.Thread(target=redeem)
    worker.start()
    try:
        time.sleep(0.3)
        seen, pages = _all_pages(url, admin, cid, limit=97)
    finally:
        stop.set()
        worker.join()
    got = [x["code"] for x in seen]
    assert len(got) == len(set(got)) == 3000, "a code was missed or seen twice"
    assert got == codes  # code order
    assert pages == 31
    assert redeemed, "no redemption happened while paging"
    assert all(x["status"] in STATUS and x["active"] is True for x in seen)

    # the status filter against Postgres, once the redemptions are done
    rows = asyncio.run(fetch(dsn, "SELECT code FROM vouchers WHERE campaign_id = $1 AND status = 2"
                                  " ORDER BY code", cid))
    done, _ = _all_pages(url, admin, cid, status="redeemed", limit=50)
    assert [x["code"] for x in done] == [r[0] for r in rows] == sorted(redeemed)
    assert {x["status"] for x in done} == {"redeemed"}


def test_list_filters_and_fields(http_api: Any) -> None:
    url = http_api.url
    admin = admin_headers(http_api)
    cid = create_campaign(url, admin, discount_body("list filters"))["id"]
    p = uid("L").upper()
    _import(url, admin, cid, "\n".join([
        "code,customer_id,expires_at,metadata",
        f"{p}-1,cus-{p},2031-01-01T00:00:00Z,\"{{\"\"batch\"\": 7}}\"",
        f"{p}-2,cus-{p},,\"{{\"\"batch\"\": \"\"7\"\"}}\"",
        f"{p}-3,,,\"{{\"\"batch\"\": 8, \"\"note\"\": \"\"a,b\"\"}}\"",
        f"{p}-4,,,",
    ]) + "\n")
    r = httpx.get(f"{url}/v1/campaigns/{cid}/vouchers", headers=admin)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [x["code"] for x in data] == [f"{p}-1", f"{p}-2", f"{p}-3", f"{p}-4"]
    assert r.json()["next_cursor"] is None
    first = data[0]
    assert first["customer_id"] == f"cus-{p}" and first["status"] == "assigned"
    assert first["expires_at"].startswith("2031-01-01T00:00:00") and first["metadata"] == {"batch": 7}
    assert data[3]["metadata"] is None and data[3]["status"] == "available"

    def codes(**params: Any) -> list[str]:
        r = httpx.get(f"{url}/v1/campaigns/{cid}/vouchers", params=params, headers=admin)
        assert r.status_code == 200, r.text
        return [x["code"] for x in r.json()["data"]]

    assert codes(customer_id=f"cus-{p}") == [f"{p}-1", f"{p}-2"]
    assert codes(metadata="batch=7") == [f"{p}-1"]  # the number 7
    assert codes(metadata='batch="7"') == [f"{p}-2"]  # the string "7"
    assert codes(metadata="note=a,b") == [f"{p}-3"]
    assert codes(status="available") == [f"{p}-3", f"{p}-4"]
    assert codes(status="available", metadata="batch=8") == [f"{p}-3"]
    assert codes(status="void") == []
    # pages of one with a filter
    r = httpx.get(f"{url}/v1/campaigns/{cid}/vouchers", params={"status": "available", "limit": 1}, headers=admin)
    nxt = r.json()["next_cursor"]
    assert r.json()["data"][0]["code"] == f"{p}-3" and nxt
    assert codes(status="available", limit=1, cursor=nxt) == [f"{p}-4"]


def test_list_refusals(http_api: Any) -> None:
    url = http_api.url
    admin = admin_headers(http_api)
    cid = create_campaign(url, admin, discount_body("list refusals"))["id"]
    other = create_campaign(url, admin, discount_body("list refusals 2"))["id"]
    generate_codes(url, admin, other, 3)
    r = httpx.get(f"{url}/v1/campaigns/cmp_nope/vouchers", headers=admin)
    assert r.status_code == 404 and r.json()["code"] == "unknown_campaign"
    r = httpx.get(f"{url}/v1/campaigns/{other}/vouchers", params={"limit": 1}, headers=admin)
    foreign = r.json()["next_cursor"]
    for bad in ("garbage", "eyJ4IjoxfQ", foreign, "W10", "WyJ2IiwiYyIsIiJd"):
        r = httpx.get(f"{url}/v1/campaigns/{cid}/vouchers", params={"cursor": bad}, headers=admin)
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["code"] == "invalid_cursor"
        assert r.headers["content-type"].startswith("application/problem+json")
    for params in ({"limit": 0}, {"limit": 1001}, {"status": "used"}, {"metadata": "novalue"},
                   {"customer_id": ""}):
        r = httpx.get(f"{url}/v1/campaigns/{cid}/vouchers", params=params, headers=admin)
        assert r.status_code == 422, (params, r.text)
    r = httpx.get(f"{url}/v1/campaigns/{cid}/vouchers")
    assert r.status_code == 401


def _finished(url: str, headers: dict[str, str], export_id: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        r = httpx.get(f"{url}/v1/exports/{export_id}", headers=headers)
        assert r.status_code == 200, r.text
        if r.json()["state"] != "running":
            return dict(r.json())
        assert time.monotonic() < deadline, r.json()
        time.sleep(0.1)


def _csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


async def _pg_rows(dsn: str, cid: str, status: int | None = None) -> list[dict[str, Any]]:
    rows = await fetch(dsn, "SELECT code, status, customer_id, active, starts_at, expires_at, metadata"
                            " FROM vouchers WHERE campaign_id = $1 AND ($2::smallint IS NULL OR status = $2)"
                            " ORDER BY code", cid, status)
    return [dict(r) for r in rows]


def _same(csv_rows: list[dict[str, str]], pg_rows: list[dict[str, Any]]) -> None:
    assert [r["code"] for r in csv_rows] == [r["code"] for r in pg_rows]
    for got, want in zip(csv_rows, pg_rows, strict=True):
        assert got["status"] == STATUS[want["status"]]
        assert got["customer_id"] == (want["customer_id"] or "")
        assert got["active"] == ("true" if want["active"] else "false")
        for name in ("starts_at", "expires_at"):
            at = want[name]
            assert got[name] == ("" if at is None else at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        want_meta = None if want["metadata"] is None else json.loads(want["metadata"])
        assert (json.loads(got["metadata"]) if got["metadata"] else None) == want_meta


def test_export_csv_matches_postgres(http_api: Any) -> None:
    url, dsn = http_api.url, http_api.database_url
    admin = admin_headers(http_api)
    cid = create_campaign(url, admin, discount_body("export"))["id"]
    p = uid("X").upper()
    _import(url, admin, cid, "\n".join([
        "code,customer_id,expires_at,metadata",
        f"{p}-A,cus-A{p},2031-01-01T00:00:00Z,",
        f"{p}-B,cus-{p},,",
    ]) + "\n")
    generate_codes(url, admin, cid, 2500)
    httpx.patch(f"{url}/v1/vouchers/{p}-B", json={"active": False}, headers=admin).raise_for_status()
    meta = {"quote": 'say "hi", then\nbye', "n": 1}
    httpx.patch(f"{url}/v1/vouchers/{p}-A", json={"metadata": meta}, headers=admin).raise_for_status()

    r = httpx.post(f"{url}/v1/campaigns/{cid}/exports", json={"format": "csv"}, headers=admin)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/exports/{r.json()['id']}"
    job = _finished(url, admin, r.json()["id"])
    assert job["state"] == "done" and job["rows"] == job["total"] == 2502, job
    assert job["download"] == f"/v1/exports/{job['id']}/download"
    as_job = httpx.get(f"{url}/v1/jobs/{job['id']}", headers=admin)  # a job like any other
    assert as_job.status_code == 200 and as_job.json() == job, as_job.text

    with httpx.stream("GET", f"{url}{job['download']}", headers=admin, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/csv")
        text = b"".join(resp.iter_bytes()).decode()
    assert text.startswith("code,status,customer_id,active,starts_at,expires_at,metadata\n")
    rows = _csv_rows(text)
    pg = asyncio.run(_pg_rows(dsn, cid))
    _same(rows, pg)
    by_code = {r["code"]: r for r in rows}
    assert by_code[f"{p}-A"]["customer_id"] == f"cus-A{p}"
    assert json.loads(by_code[f"{p}-A"]["metadata"]) == meta
    assert by_code[f"{p}-B"]["active"] == "false"

    event = asyncio.run(fetch(dsn, "SELECT type, campaign_id, data FROM events WHERE resource_id = $1", job["id"]))
    assert len(event) == 1 and event[0]["type"] == "export.completed" and event[0]["campaign_id"] == cid
    assert json.loads(event[0]["data"])["rows"] == 2502
    audit = asyncio.run(fetch(dsn, "SELECT actor_kind, action, resource_id FROM audit_log"
                                   " WHERE action = 'exports.create' AND change->>'export_id' = $1", job["id"]))
    assert [tuple(a) for a in audit] == [("user", "exports.create", cid)]

    # only the assigned codes
    r = httpx.post(f"{url}/v1/campaigns/{cid}/exports", json={"status": "assigned"}, headers=admin)
    assert r.status_code == 202, r.text
    job = _finished(url, admin, r.json()["id"])
    text = httpx.get(f"{url}{job['download']}", headers=admin).text
    assert [x["code"] for x in _csv_rows(text)] == [f"{p}-A", f"{p}-B"]
    _same(_csv_rows(text), asyncio.run(_pg_rows(dsn, cid, 1)))


def test_export_refusals(http_api: Any) -> None:
    url, dsn = http_api.url, http_api.database_url
    admin = admin_headers(http_api)
    cid = create_campaign(url, admin, discount_body("export refusals"))["id"]
    before = asyncio.run(fetchval(dsn, "SELECT count(*) FROM exports"))
    r = httpx.post(f"{url}/v1/campaigns/cmp_nope/exports", json={"format": "csv"}, headers=admin)
    assert r.status_code == 404 and r.json()["code"] == "unknown_campaign"
    for body in ({"format": "xlsx"}, {"status": "used"}, {"format": "csv", "extra": 1}, {"format": 1}):
        r = httpx.post(f"{url}/v1/campaigns/{cid}/exports", json=body, headers=admin)
        assert r.status_code == 422, (body, r.text)
    assert asyncio.run(fetchval(dsn, "SELECT count(*) FROM exports")) == before
    for path in ("/v1/exports/exp_nope", "/v1/exports/exp_nope/download"):
        r = httpx.get(f"{url}{path}", headers=admin)
        assert r.status_code == 404 and r.json()["code"] == "unknown_export"
    # an empty campaign exports its header alone
    r = httpx.post(f"{url}/v1/campaigns/{cid}/exports", json={}, headers=admin)
    job = _finished(url, admin, r.json()["id"])
    assert (job["state"], job["rows"], job["total"]) == ("done", 0, 0)
    assert httpx.get(f"{url}{job['download']}", headers=admin).text == exports.HEADER


async def _abandoned(dsn: str, cid: str) -> str:
    """An export whose runner wrote two chunks and stopped (its lease ran out)."""
    conn = await connect(dsn)
    try:
        job = await exports.create(conn, uid("exp_dead"), cid, "csv", None, "dead-runner", 0.05, None)
        assert await exports.step(conn, job["id"], "dead-runner", 0.05, rows=300) == "more"
        assert await exports.step(conn, job["id"], "dead-runner", 0.05, rows=300) == "more"
        return str(job["id"])
    finally:
        await conn.close()


def test_an_export_whose_runner_stopped_is_continued(http_api: Any) -> None:
    url, dsn = http_api.url, http_api.database_url
    admin = admin_headers(http_api)
    cid = create_campaign(url, admin, discount_body("export resumed"))["id"]
    generate_codes(url, admin, cid, 1500)
    export_id = asyncio.run(_abandoned(dsn, cid))
    # a gateway's sweep takes it over and writes the rest
    job = _finished(url, admin, export_id, timeout_s=30)
    assert job["state"] == "done" and job["rows"] == 1500, job
    text = httpx.get(f"{url}{job['download']}", headers=admin, timeout=60).text
    _same(_csv_rows(text), asyncio.run(_pg_rows(dsn, cid)))
    # the stopped runner can write nothing more
    async def late() -> str:
        conn = await connect(dsn)
        try:
            return await exports.step(conn, export_id, "dead-runner", 30)
        finally:
            await conn.close()
    assert asyncio.run(late()) == "lost"


def _stored(dsn: str, export_id: str) -> tuple[int, int]:
    """(export rows, chunk rows) Postgres still holds for the export."""
    return (int(asyncio.run(fetchval(dsn, "SELECT count(*) FROM exports WHERE id = $1", export_id))),
            int(asyncio.run(fetchval(dsn, "SELECT count(*) FROM export_chunks WHERE export_id = $1", export_id))))


def _purged(dsn: str, export_id: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while _stored(dsn, export_id) != (0, 0):
        assert time.monotonic() < deadline, _stored(dsn, export_id)
        time.sleep(0.2)


def _gone(url: str, admin: dict[str, str], export_id: str) -> None:
    for path in (f"/v1/exports/{export_id}", f"/v1/exports/{export_id}/download", f"/v1/jobs/{export_id}"):
        r = httpx.get(f"{url}{path}", headers=admin)
        assert r.status_code == 404, (path, r.text)


def test_an_export_deleted_running_or_done_is_gone_and_its_file_purged(http_api: Any) -> None:
    url, dsn = http_api.url, http_api.database_url
    admin = admin_headers(http_api)
    cid = create_campaign(url, admin, discount_body("export deleted"))["id"]
    generate_codes(url, admin, cid, 700)

    # a finished export
    r = httpx.post(f"{url}/v1/campaigns/{cid}/exports", json={}, headers=admin)
    done = _finished(url, admin, r.json()["id"])
    assert done["state"] == "done" and _stored(dsn, done["id"]) == (1, 1)
    r = httpx.delete(f"{url}/v1/exports/{done['id']}", headers=admin)
    assert r.status_code == 200 and r.json() == {"id": done["id"], "deleted": True}, r.text
    _gone(url, admin, done["id"])
    r = httpx.delete(f"{url}/v1/exports/{done['id']}", headers=admin)
    assert r.status_code == 404 and r.json()["code"] == "unknown_export", r.text
    _purged(dsn, done["id"])

    # a running one: its runner (alive, holding its lease) can write nothing more
    async def running() -> str:
        conn = await connect(dsn)
        try:
            job = await exports.create(conn, uid("exp_live"), cid, "csv", None, "live-runner", 300, None)
            for _ in range(3):
                assert await exports.step(conn, job["id"], "live-runner", 300, rows=100) == "more"
            return str(job["id"])
        finally:
            await conn.close()

    live = asyncio.run(running())
    assert _stored(dsn, live) == (1, 3)
    r = httpx.delete(f"{url}/v1/exports/{live}", headers=admin)
    assert r.status_code == 200, r.text
    _gone(url, admin, live)

    async def next_step() -> str:
        conn = await connect(dsn)
        try:
            return await exports.step(conn, live, "live-runner", 300, rows=100)
        finally:
            await conn.close()

    assert asyncio.run(next_step()) == "lost"
    _purged(dsn, live)
    audit = asyncio.run(fetch(dsn, "SELECT resource_id, change->>'export_id' AS e, change->>'state' AS s"
                                   " FROM audit_log WHERE action = 'exports.delete' AND resource_id = $1"
                                   " ORDER BY at", cid))
    assert [tuple(a) for a in audit] == [(cid, done["id"], "done"), (cid, live, "running")]

    # older than the retention (7 days): deleted by the sweep, as by DELETE
    r = httpx.post(f"{url}/v1/campaigns/{cid}/exports", json={}, headers=admin)
    old = _finished(url, admin, r.json()["id"])
    asyncio.run(fetchval(dsn, "UPDATE exports SET finished_at = now() - interval '8 days' WHERE id = $1"
                              " RETURNING id", old["id"]))
    _purged(dsn, old["id"])
    _gone(url, admin, old["id"])

    r = httpx.delete(f"{url}/v1/exports/exp_nope", headers=admin)
    assert r.status_code == 404 and r.json()["code"] == "unknown_export", r.text


def test_a_campaigns_exports_list_newest_first_page_by_page(http_api: Any) -> None:
    """GET /v1/campaigns/{id}/exports: running, done and failed ones newest first, each
    once across pages, a deleted one gone, another campaign's never; refusals."""
    url, dsn = http_api.url, http_api.database_url
    admin = admin_headers(http_api)
    cid = create_campaign(url, admin, discount_body("export list"))["id"]
    other = create_campaign(url, admin, discount_body("export list other"))["id"]
    generate_codes(url, admin, cid, 20)
    made = []
    for i in range(5):
        r = httpx.post(f"{url}/v1/campaigns/{cid}/exports", json={"status": "available"} if i % 2 else {},
                       headers=admin)
        assert r.status_code == 202, r.text
        made.append(_finished(url, admin, r.json()["id"]))
    httpx.post(f"{url}/v1/campaigns/{other}/exports", json={}, headers=admin).raise_for_status()
    assert httpx.delete(f"{url}/v1/exports/{made[1]['id']}", headers=admin).status_code == 200

    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        r = httpx.get(f"{url}/v1/campaigns/{cid}/exports", params=params, headers=admin)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["data"]) <= 2
        seen += body["data"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    want = [m for i, m in enumerate(made) if i != 1][::-1]  # newest first, the deleted one gone
    assert seen == want, (seen, want)
    db_order = asyncio.run(fetch(
        dsn, "SELECT id FROM exports WHERE campaign_id = $1 AND state <> 'deleted'"
             " ORDER BY created_at DESC, id DESC", cid))
    assert [x["id"] for x in seen] == [r["id"] for r in db_order]
    assert all(x["campaign_id"] == cid and x["state"] == "done" for x in seen)

    r = httpx.get(f"{url}/v1/campaigns/cmp_nope/exports", headers=admin)
    assert r.status_code == 404 and r.json()["code"] == "unknown_campaign"
    first = httpx.get(f"{url}/v1/campaigns/{cid}/exports", params={"limit": 1}, headers=admin).json()
    for bad in ({"cursor": "nope"}, {"limit": 0}, {"limit": 101}):
        r = httpx.get(f"{url}/v1/campaigns/{cid}/exports", params=bad, headers=admin)
        assert r.status_code == 422, (bad, r.text)
    r = httpx.get(f"{url}/v1/campaigns/{other}/exports", params={"cursor": first["next_cursor"]}, headers=admin)
    assert r.status_code == 422 and r.json()["code"] == "invalid_cursor", r.text
    key = _integration_key(url, admin)  # integrations do not read exports
    assert httpx.get(f"{url}/v1/campaigns/{cid}/exports", headers=key).status_code == 403
