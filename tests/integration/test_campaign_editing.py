"""Editing campaigns over HTTP: every editable field, ETag and If-Match (a stale version is
412 with nothing written), changes unsafe for the campaign's state refused, the shards
holding the new version before the answer (the next redemption sees it), each change in
Postgres with its campaign.* event and audit entry, metadata and its list filter, and bad
input as 4xx problems."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from engine.routing import shard_of
from tests.engine_support import campaign_codes, fetch, fetchval
from tests.http_support import (
    admin_headers,
    create_campaign,
    discount_body,
    flash_sale_body,
    generate_codes,
    open_campaign,
)

pytestmark = pytest.mark.integration


def _uid(prefix: str) -> str:
    return f"{prefix}{os.urandom(4).hex()}"


def _patch(url: str, cid: str, body: dict[str, Any], headers: dict[str, str], tag: str | None) -> httpx.Response:
    h = dict(headers)
    if tag is not None:
        h["If-Match"] = tag
    return httpx.patch(f"{url}/v1/campaigns/{cid}", json=body, headers=h, timeout=30)


def _order(code: str, customer: str, amount: int = 10_000) -> dict[str, Any]:
    return {"code": code, "customer_id": customer,
            "order": {"id": _uid("o-"), "amount": amount, "currency": "EUR"}}


def _history(dsn: str, cid: str) -> tuple[list[Any], list[Any]]:
    """The campaign's events (id, type, data) and audit entries (actor, action, change)."""
    events = asyncio.run(fetch(dsn, "SELECT id, type, data FROM events WHERE campaign_id = $1"
                                    " AND type LIKE 'campaign.%' ORDER BY created_at, id", cid))
    audit = asyncio.run(fetch(dsn, "SELECT actor_kind, actor_id, actor_key_id, action, change FROM audit_log"
                                   " WHERE resource_type = 'campaign' AND resource_id = $1 ORDER BY id", cid))
    return ([(e["id"], e["type"], json.loads(e["data"])) for e in events],
            [(a["actor_kind"], a["actor_id"], a["actor_key_id"], a["action"], json.loads(a["change"]))
             for a in audit])


def test_each_field_is_edited_with_its_version_event_and_audit_entry(http_api: Any) -> None:
    url, dsn = http_api.url, http_api.database_url
    admin = admin_headers(http_api)
    me = httpx.get(f"{url}/v1/users/me", headers=admin).json()["id"]
    r = httpx.post(f"{url}/v1/campaigns", json=discount_body("edit me", metadata={"channel": "print"}),
                   headers=admin)
    assert r.status_code == 201, r.text
    c = r.json()
    cid = c["id"]
    assert c["version"] == 1 and r.headers["etag"] == '"1"' and c["metadata"] == {"channel": "print"}
    r = httpx.get(f"{url}/v1/campaigns/{cid}", headers=admin)
    assert r.headers["etag"] == '"1"' and r.json()["metadata"] == {"channel": "print"}

    ends = (datetime.now(UTC) + timedelta(days=60)).replace(microsecond=0)
    starts = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    edits: list[tuple[dict[str, Any], str, Any]] = [
        ({"name": "edited"}, "name", "edited"),
        ({"ends_at": ends.isoformat()}, "ends_at", ends),
        ({"starts_at": starts.isoformat()}, "starts_at", starts),
        ({"limits": {"total": 500, "per_customer": 2}}, "limits", {"total": 500, "per_customer": 2}),
        ({"limits": {"per_customer": None}}, "limits", {"total": 500, "per_customer": None}),
        ({"discount": {"kind": "amount", "value": 250, "max": None}}, "discount",
         {"kind": "amount", "value": 250, "max": None, "target": "order", "sku": None}),
        ({"min_order": 1500}, "min_order", 1500),
        ({"metadata": {"channel": "web", "wave": 2}}, "metadata", {"channel": "web", "wave": 2}),
        ({"rules": {"max_order": 90000, "exclude": {"categories": ["gift-cards"]}}}, "rules",
         {"max_order": 90000, "exclude": {"categories": ["gift-cards"]}}),
    ]
    tag = '"1"'
    for version, (body, field, want) in enumerate(edits, start=2):
        r = _patch(url, cid, body, admin, tag)
        assert r.status_code == 200, (body, r.text)
        out = r.json()
        got = out[field]
        if isinstance(want, datetime):
            got = datetime.fromisoformat(got)
        assert got == want, (field, out)
        assert out["version"] == version and out["fenced_shards"] == []
        tag = r.headers["etag"]
        assert tag == f'"{version}"'
    final = len(edits) + 1
    assert asyncio.run(fetchval(dsn, "SELECT version FROM campaigns WHERE id = $1", cid)) == final
    assert asyncio.run(fetchval(dsn, "SELECT name FROM campaigns WHERE id = $1", cid)) == "edited"
    assert httpx.get(f"{url}/v1/campaigns/{cid}", headers=admin).json()["name"] == "edited"

    # a change to the same values changes nothing: same version, no event
    r = _patch(url, cid, {"name": "edited", "min_order": 1500}, admin, tag)
    assert r.status_code == 200 and r.json()["version"] == final and r.headers["etag"] == tag
    r = _patch(url, cid, {"metadata": None}, admin, None)  # null clears; no If-Match: any version
    assert r.status_code == 200 and r.json()["metadata"] is None

    events, audit = _history(dsn, cid)
    assert [e[0] for e in events] == [f"evt_{cid}_v{v}" for v in range(1, final + 2)]
    assert [e[1] for e in events] == ["campaign.created"] + ["campaign.updated"] * final
    assert events[1][2]["name"] == "edited" and events[1][2]["changed"] == ["name"]
    assert events[1][2]["version"] == 2 and events[-1][2]["metadata"] is None
    assert [a[3] for a in audit] == ["campaign.create"] + ["campaign.update"] * final
    assert all(a[0] == "user" and a[1] == me and a[2] is None for a in audit)
    assert audit[1][4] == {"name": ["edit me", "edited"]}
    assert audit[7][4] == {"min_order": [0, 1500]}
    assert audit[-1][4] == {"metadata": [{"channel": "web", "wave": 2}, None]}


def test_windows_of_a_flash_sale_are_edited(http_api: Any) -> None:
    url = http_api.url
    admin = admin_headers(http_api)
    c = create_campaign(url, admin, flash_sale_body("flash edit", _uid("FLE")))
    windows = [{"days": [0, 1, 2, 3, 4, 5, 6], "start": "00:00", "end": "23:59"}]
    r = _patch(url, c["id"], {"windows": windows}, admin, '"1"')
    assert r.status_code == 200, r.text
    assert r.json()["windows"] == windows
    r = _patch(url, c["id"], {"windows": []}, admin, '"2"')
    assert r.json()["windows"] == [] and r.json()["version"] == 3
    r = _patch(url, c["id"], {"limits": {"total": None}}, admin, None)
    assert r.status_code == 422 and "limits.total" in r.json()["detail"]


def test_a_stale_if_match_is_412_and_writes_nothing(http_api: Any) -> None:
    url, dsn = http_api.url, http_api.database_url
    admin = admin_headers(http_api)
    c = create_campaign(url, admin, discount_body("stale"))
    cid = c["id"]
    r = _patch(url, cid, {"name": "first"}, admin, '"1"')
    assert r.status_code == 200
    before = _history(dsn, cid)
    for tag in ('"1"', '"3"', '"999"'):
        r = _patch(url, cid, {"name": "second"}, admin, tag)
        assert r.status_code == 412, r.text
        assert r.json()["code"] == "version_mismatch" and "version 2" in r.json()["detail"]
    for tag in ("2", 'W/"2"', "abc", '"2", "3"'):
        r = _patch(url, cid, {"name": "second"}, admin, tag)
        assert r.status_code == 422, (tag, r.text)
    assert asyncio.run(fetchval(dsn, "SELECT spec->>'name' FROM campaigns WHERE id = $1", cid)) == "first"
    assert asyncio.run(fetchval(dsn, "SELECT version FROM campaigns WHERE id = $1", cid)) == 2
    assert _history(dsn, cid) == before
    r = _patch(url, cid, {"name": "second"}, admin, '"2"')
    assert r.status_code == 200 and r.json()["version"] == 3


def test_changes_unsafe_for_the_campaigns_state_are_refused(http_api: Any) -> None:
    url, dsn = http_api.url, http_api.database_url
    admin = admin_headers(http_api)
    # a shared code: its limits count redemptions, and one customer's
    code = _uid("LIM").upper()
    cid = open_campaign(url, admin, {
        "name": "limits", "type": "shared_code", "currency": "EUR", "shared_code": code,
        "discount": {"kind": "amount", "value": 100}, "limits": {"total": 100, "per_customer": 5},
    })
    for n, customer in enumerate(("a", "b", "b")):
        r = httpx.post(f"{url}/v1/redemptions", json=_order(code, f"{cid}-{customer}"), headers=admin)
        assert r.status_code == 201, (n, r.text)
    r = _patch(url, cid, {"limits": {"total": 2}}, admin, None)
    assert r.status_code == 409 and r.json()["code"] == "limit_below_usage", r.text
    r = _patch(url, cid, {"limits": {"per_customer": 1}}, admin, None)
    assert r.status_code == 409 and r.json()["code"] == "limit_below_usage", r.text
    r = _patch(url, cid, {"limits": {"total": 3, "per_customer": 2}}, admin, None)
    assert r.status_code == 200 and r.json()["limits"] == {"total": 3, "per_customer": 2}, r.text
    r = httpx.post(f"{url}/v1/redemptions", json=_order(code, f"{cid}-c"), headers=admin)
    assert r.status_code == 409 and r.json()["code"] == "exhausted", r.text

    # unique codes: the limit counts the codes in circulation
    c = create_campaign(url, admin, discount_body("bank", limits={"total": 10}))
    generate_codes(url, admin, c["id"], 6)
    r = _patch(url, c["id"], {"limits": {"total": 5}}, admin, None)
    assert r.status_code == 409 and "6 codes" in r.json()["detail"], r.text
    r = _patch(url, c["id"], {"limits": {"total": 6}}, admin, None)
    assert r.status_code == 200
    r = httpx.post(f"{url}/v1/campaigns/{c['id']}/generate", json={"count": 1}, headers=admin)
    assert r.status_code == 422, r.text

    # starts_at stays once the campaign sells; an ended campaign stays as it is
    r = _patch(url, cid, {"starts_at": (datetime.now(UTC) + timedelta(days=1)).isoformat()}, admin, None)
    assert r.status_code == 409 and r.json()["code"] == "start_already_passed", r.text
    httpx.post(f"{url}/v1/campaigns/{cid}/end", headers=admin).raise_for_status()
    version = asyncio.run(fetchval(dsn, "SELECT version FROM campaigns WHERE id = $1", cid))
    r = _patch(url, cid, {"name": "revived"}, admin, f'"{version}"')
    assert r.status_code == 409 and r.json()["code"] == "cannot_edit_ended", r.text
    assert asyncio.run(fetchval(dsn, "SELECT version FROM campaigns WHERE id = $1", cid)) == version


def test_the_shards_hold_the_new_version_before_the_answer(http_api: Any, engine: Any) -> None:
    """Each edit is followed at once by validations of codes on every shard (and a
    redemption): none sees the version before."""
    url, dsn = http_api.url, http_api.database_url
    admin = admin_headers(http_api)
    c = create_campaign(url, admin, discount_body("propagate"))
    cid = c["id"]
    generate_codes(url, admin, cid, 40)
    httpx.post(f"{url}/v1/campaigns/{cid}/activate", headers=admin).raise_for_status()
    codes = sorted(asyncio.run(campaign_codes(dsn, cid)))
    one_per_shard: dict[int, str] = {}
    for code in codes:
        one_per_shard.setdefault(shard_of(code, engine.n), code)
    assert len(one_per_shard) == engine.n, one_per_shard

    for percent in (30, 5, 55, 12):
        r = _patch(url, cid, {"discount": {"kind": "percent", "value": percent}}, admin, None)
        assert r.status_code == 200, r.text
        for code in one_per_shard.values():
            v = httpx.post(f"{url}/v1/validations", json=_order(code, "x"), headers=admin).json()
            assert v["valid"] and v["discount_amount"] == 10_000 * percent // 100, (percent, v)
    code = codes[-1]
    r = httpx.post(f"{url}/v1/redemptions", json=_order(code, "y"), headers=admin)
    assert r.status_code == 201 and r.json()["discount_amount"] == 1200, r.text

    r = _patch(url, cid, {"min_order": 20_000}, admin, None)
    assert r.status_code == 200
    for code in one_per_shard.values():
        v = httpx.post(f"{url}/v1/validations", json=_order(code, "x"), headers=admin).json()
        assert v["reason"] == "order_too_small", v

    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    r = _patch(url, cid, {"ends_at": past, "min_order": 0}, admin, None)
    assert r.status_code == 200, r.text
    for code in one_per_shard.values():
        r = httpx.post(f"{url}/v1/redemptions", json=_order(code, "z"), headers=admin)
        assert r.status_code == 410 and r.json()["code"] == "expired", r.text


def test_the_campaign_list_filters_by_metadata(http_api: Any) -> None:
    url = http_api.url
    admin = admin_headers(http_api)
    tag = _uid("wave-")
    a = create_campaign(url, admin, discount_body("md a", metadata={"wave": tag, "n": 1}))
    b = create_campaign(url, admin, discount_body("md b", metadata={"wave": tag, "n": "1"}))
    create_campaign(url, admin, discount_body("md c", metadata={"wave": "other"}))

    def ids(query: str) -> set[str]:
        r = httpx.get(f"{url}/v1/campaigns", params={"metadata": query, "limit": 500}, headers=admin)
        assert r.status_code == 200, r.text
        return {c["id"] for c in r.json()["items"]}

    assert ids(f"wave={tag}") == {a["id"], b["id"]}
    tagged = ids(f"wave={tag}")
    assert ids("n=1") & tagged == {a["id"]}
    assert ids('n="1"') & tagged == {b["id"]}
    r = _patch(url, b["id"], {"metadata": {"wave": "moved"}}, admin, None)
    assert r.status_code == 200
    assert ids(f"wave={tag}") == {a["id"]}
    for bad in ("nokey", "=x", "k" * 65 + "=1"):
        r = httpx.get(f"{url}/v1/campaigns", params={"metadata": bad}, headers=admin)
        assert r.status_code == 422 and r.json()["code"] == "invalid_metadata", (bad, r.text)


def test_bad_input_is_a_4xx_problem_and_writes_nothing(http_api: Any) -> None:
    url, dsn = http_api.url, http_api.database_url
    admin = admin_headers(http_api)
    c = create_campaign(url, admin, discount_body("bad input"))
    cid = c["id"]
    r = _patch(url, _uid("nope"), {"name": "x"}, admin, None)
    assert r.status_code == 404 and r.json()["code"] == "unknown_campaign"
    bad: list[dict[str, Any]] = [
        {}, {"type": "gift_card"}, {"currency": "USD"}, {"shared_code": "X"}, {"name": ""},
        {"name": None}, {"discount": {"kind": "percent", "value": 101}}, {"limits": {"total": 0}},
        {"min_order": -5}, {"metadata": {"k": "v" * 5000}}, {"metadata": [1]},
        {"ends_at": "2020-13-01"}, {"ends_at": "2030-01-01T00:00:00"},
        {"starts_at": (datetime.now(UTC) + timedelta(days=90)).isoformat()},  # after ends_at
        {"windows": [{"days": [0], "start": "09:00", "end": "10:00"}]},  # not a flash sale
    ]
    for body in bad:
        r = _patch(url, cid, body, admin, '"1"')
        assert r.status_code == 422, (body, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
    r = httpx.post(f"{url}/v1/campaigns", json=discount_body("md", metadata={"": 1}), headers=admin)
    assert r.status_code == 422
    assert asyncio.run(fetchval(dsn, "SELECT version FROM campaigns WHERE id = $1", cid)) == 1
    events, audit = _history(dsn, cid)
    assert [e[1] for e in events] == ["campaign.created"] and len(audit) == 1


def test_lifecycle_moves_are_events_and_audit_entries(http_api: Any) -> None:
    url, dsn = http_api.url, http_api.database_url
    admin = admin_headers(http_api)
    c = create_campaign(url, admin, discount_body("moves"))
    cid = c["id"]
    for action in ("activate", "pause", "activate", "activate", "end"):
        r = httpx.post(f"{url}/v1/campaigns/{cid}/{action}", headers=admin)
        assert r.status_code == 200, r.text
    assert r.headers["etag"] == '"5"'
    events, audit = _history(dsn, cid)
    assert [(e[0], e[1]) for e in events] == [
        (f"evt_{cid}_v1", "campaign.created"),
        (f"evt_{cid}_v2", "campaign.activated"),
        (f"evt_{cid}_v3", "campaign.paused"),
        (f"evt_{cid}_v4", "campaign.activated"),
        (f"evt_{cid}_v5", "campaign.ended"),
    ]
    assert events[-1][2]["state"] == "ended" and events[-1][2]["changed"] == ["state"]
    assert [(a[3], a[4]) for a in audit] == [
        ("campaign.create", {"campaign": [None, cid]}),
        ("campaign.activate", {"state": ["draft", "active"]}),
        ("campaign.pause", {"state": ["active", "paused"]}),
        ("campaign.activate", {"state": ["paused", "active"]}),
        ("campaign.end", {"state": ["active", "ended"]}),
    ]
