"""The code list, export and history routes refuse malformed input with 422 before any
credential or database is looked at (fake services, never reached)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    from tests.route_fakes import gateway

    with gateway() as (test_client, _):
        yield test_client


@pytest.mark.parametrize(
    ("url", "loc"),
    [
        ("/v1/redemptions?since=0.5", ["query", "since"]),
        ("/v1/redemptions?since=yesterday", ["query", "since"]),
        ("/v1/redemptions?limit=0", ["query", "limit"]),
        ("/v1/redemptions?order_id=", ["query", "order_id"]),
        ("/v1/campaigns/c1/vouchers?status=used", ["query", "status"]),
        ("/v1/campaigns/c1/vouchers?limit=1001", ["query", "limit"]),
        ("/v1/campaigns/c1/vouchers?metadata=a", ["query", "metadata"]),
    ],
)
def test_malformed_queries_are_422(client: TestClient, url: str, loc: list[str]) -> None:
    r = client.get(url)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["loc"] == loc


def test_export_body_is_checked(client: TestClient) -> None:
    for body in ({"format": "xlsx"}, {"status": "used"}, {"format": "csv", "x": 1}):
        r = client.post("/v1/campaigns/c1/exports", json=body)
        assert r.status_code == 422, (body, r.text)


def test_openapi_documents_the_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/v1/redemptions"]) == {"get", "post"}
    assert "text/csv" in paths["/v1/exports/{export_id}/download"]["get"]["responses"]["200"]["content"]
    since = next(p for p in paths["/v1/redemptions"]["get"]["parameters"] if p["name"] == "since")
    assert "date-time" in str(since["schema"])
