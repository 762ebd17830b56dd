"""PATCH /v1/campaigns/{id} (ETag, If-Match) and GET /v1/audit-log over fake services,
and the audit log's cursors."""

from typing import Any

import pytest

from actors.calls import Failure
from engine import errors
from engine.audit import Actor, cursor_after, entry_before
from tests.route_fakes import assert_refused, gateway, problem_of

EDITED: dict[str, Any] = {
    "id": "cmp_1", "name": "Summer", "type": "discount", "state": "active", "currency": "EUR",
    "version": 4, "metadata": {"channel": "print"}, "fenced_shards": [],
}


def test_an_edit_sends_only_the_fields_given_with_the_version_and_who() -> None:
    with gateway(campaigns={"edit": EDITED}) as (client, fakes):
        assert_refused(client, fakes, "PATCH", "/v1/campaigns/cmp_1", "campaigns.write", "analyst",
                       json={"name": "Summer"})
        body = {"name": "Summer", "ends_at": None, "limits": {"total": 10}, "metadata": {"channel": "print"}}
        r = client.patch("/v1/campaigns/cmp_1", json=body,
                         headers={**fakes.token("manager"), "If-Match": '"3"'})
        assert r.status_code == 200, r.text
        assert r.headers["etag"] == '"4"' and r.json()["metadata"] == {"channel": "print"}
        [(cid, changes, version, actor)] = fakes.campaigns.called("edit")
        assert cid == "cmp_1" and version == 3 and actor == Actor("user", "usr_1")
        assert changes == {"name": "Summer", "ends_at": None, "limits": {"total": 10},
                           "metadata": {"channel": "print"}}
        # no If-Match, or *: any version
        client.patch("/v1/campaigns/cmp_1", json={"min_order": 5}, headers=fakes.token("manager"))
        client.patch("/v1/campaigns/cmp_1", json={"min_order": 5},
                     headers={**fakes.token("manager"), "If-Match": "*"})
        assert [c[2] for c in fakes.campaigns.called("edit")[1:]] == [None, None]


def test_bad_edits_are_422_before_the_coordinator_hears_of_them() -> None:
    with gateway(campaigns={"edit": EDITED}) as (client, fakes):
        h = fakes.token("manager")
        for body in ({}, {"type": "gift_card"}, {"currency": "USD"}, {"name": None}, {"name": ""},
                     {"limits": {"total": 0}}, {"min_order": -1},
                     {"metadata": {"": 1}}, {"metadata": {"k": "v" * 5000}}, {"ends_at": "soon"}):
            r = client.patch("/v1/campaigns/cmp_1", json=body, headers=h)
            assert r.status_code == 422, (body, r.text)
        for tag in ("3", 'W/"3"', '"x"', '"3", "4"', ""):
            r = client.patch("/v1/campaigns/cmp_1", json={"name": "x"}, headers={**h, "If-Match": tag})
            assert r.status_code == 422, (tag, r.text)
        assert fakes.campaigns.called("edit") == []


@pytest.mark.parametrize(
    ("code", "status"),
    [("version_mismatch", 412), ("limit_below_usage", 409), ("cannot_edit_ended", 409),
     ("start_already_passed", 409), ("unknown_campaign", 404)],
)
def test_refusals_keep_their_status(code: str, status: int) -> None:
    with gateway(campaigns={"edit": Failure(code, "refused")}) as (client, fakes):
        r = client.patch("/v1/campaigns/cmp_1", json={"name": "x"},
                         headers={**fakes.token("admin"), "If-Match": '"1"'})
        problem_of(r, status, code)
        assert "etag" not in r.headers


def test_reads_and_moves_carry_the_etag() -> None:
    with gateway(campaigns={"get": EDITED, "transition": EDITED}) as (client, fakes):
        r = client.get("/v1/campaigns/cmp_1", headers=fakes.token("analyst"))
        assert r.headers["etag"] == '"4"'
        r = client.post("/v1/campaigns/cmp_1/pause", headers=fakes.token("manager"))
        assert r.headers["etag"] == '"4"'


def test_the_campaign_list_filters_by_one_metadata_key() -> None:
    with gateway(campaigns={"list": {"items": [], "total": 0}}) as (client, fakes):
        client.get("/v1/campaigns?metadata=channel=print", headers=fakes.token("analyst"))
        client.get("/v1/campaigns?metadata=n=42", headers=fakes.token("analyst"))
        assert [c[3] for c in fakes.campaigns.called("list")] == [{"channel": "print"}, {"n": 42}]
        problem_of(client.get("/v1/campaigns?metadata=novalue", headers=fakes.token("analyst")),
                   422, "invalid_metadata")


def test_audit_log_is_for_admins_and_pages_by_cursor(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []

    async def page(pool: Any, **kw: Any) -> dict[str, Any]:
        seen.append(kw)
        return {"data": [], "next_cursor": None}

    import store.audit

    monkeypatch.setattr(store.audit, "page", page)
    with gateway() as (client, fakes):
        for role in ("manager", "analyst", "integration", "customer"):
            problem_of(client.get("/v1/audit-log", headers=fakes.token(role)), 403, "forbidden")
        r = client.get(
            f"/v1/audit-log?resource_type=campaign&resource_id=c1&actor=usr_1&limit=5&cursor={cursor_after(77)}"
            "&since=2030-01-01T00:00:00%2B01:00",
            headers=fakes.token("admin"),
        )
        assert r.status_code == 200 and r.json() == {"data": [], "next_cursor": None}
        [kw] = seen
        assert kw["before"] == 77 and kw["limit"] == 5 and kw["actor"] == "usr_1"
        assert kw["since"].isoformat() == "2029-12-31T23:00:00+00:00"
        for bad in ("cursor=nope", "cursor=" + cursor_after(1)[:-2], "limit=0", "since=yesterday",
                    "since=2030-01-01T00:00:00"):
            r = client.get(f"/v1/audit-log?{bad}", headers=fakes.token("admin"))
            assert r.status_code == 422, (bad, r.text)
        assert len(seen) == 1


def test_audit_cursors_round_trip_and_refuse_anything_else() -> None:
    for n in (1, 42, 10**17):
        assert entry_before(cursor_after(n)) == n
    for bad in ("", "x", "YXVkaXQ6", "YXVkaXQ6LTE", "bm90OjE", "!!!!", "YXVkaXQ6MTIzNDU2Nzg5MDEyMzQ1Njc4OTA"):
        with pytest.raises(errors.InvalidCursor):
            entry_before(bad)
