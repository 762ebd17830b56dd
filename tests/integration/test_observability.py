"""Request ids end to end and the Ray metrics of the hot path, against the session's Serve
app (HAProxy mode, two gateway replicas) and shard actors."""

from __future__ import annotations

import asyncio
import os
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.engine_support import campaign_codes
from tests.http_support import admin_headers, create_campaign, discount_body, generate_codes

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def admin(http_api: Any) -> dict[str, str]:
    return admin_headers(http_api)


@pytest.fixture(scope="module")
def codes(http_api: Any, admin: dict[str, str]) -> list[str]:
    """Four fresh codes of an active campaign."""
    url = http_api.url
    cid = create_campaign(url, admin, discount_body("observability"))["id"]
    generate_codes(url, admin, cid, 4)
    httpx.post(f"{url}/v1/campaigns/{cid}/activate", headers=admin).raise_for_status()
    # the codes themselves from Postgres (the API never lists a campaign's codes)
    return _codes_of(http_api, cid)


def _codes_of(http_api: Any, campaign_id: str) -> list[str]:
    found = asyncio.run(campaign_codes(http_api.database_url, campaign_id))
    assert len(found) == 4, found
    return found


def _checkout(code: str) -> dict[str, Any]:
    return {
        "code": code,
        "customer_id": f"c-{os.urandom(3).hex()}",
        "order": {"id": f"o-{os.urandom(3).hex()}", "amount": 5000, "currency": "EUR"},
    }


def test_request_id_is_echoed_and_made_up_when_missing(
    http_api: Any, admin: dict[str, str], codes: list[str]
) -> None:
    url = http_api.url
    r = httpx.post(
        f"{url}/v1/redemptions",
        json=_checkout(codes[0]),
        headers={**admin, "X-Request-ID": "test-123"},
    )
    assert r.status_code == 201, r.text
    assert r.headers.get_list("x-request-id") == ["test-123"]

    r = httpx.post(f"{url}/v1/redemptions", json=_checkout(codes[1]), headers=admin)
    assert r.status_code == 201, r.text
    made_up = r.headers.get_list("x-request-id")
    assert len(made_up) == 1 and made_up[0]

    # problems carry it too (here: the code is spent already)
    r = httpx.post(
        f"{url}/v1/redemptions",
        json=_checkout(codes[0]),
        headers={**admin, "X-Request-ID": "test-123-again"},
    )
    assert r.status_code == 409, r.text
    assert r.headers["x-request-id"] == "test-123-again"
    assert httpx.get(f"{url}/healthz", headers={"X-Request-ID": "h-1"}).headers["x-request-id"] == "h-1"


def _local_session_logs() -> Path | None:
    import ray

    node = ray._private.worker.global_worker.node
    if os.environ.get("RAY_ADDRESS") or node is None:
        return None  # the actors' logs live on the cluster's nodes
    return Path(node.get_session_dir_path()) / "logs"


def test_rejection_is_logged_by_the_shard_with_the_request_id(
    http_api: Any, admin: dict[str, str], codes: list[str]
) -> None:
    logs = _local_session_logs()
    if logs is None:
        pytest.skip("the shard logs are not on this machine")
    url = http_api.url
    r = httpx.post(f"{url}/v1/redemptions", json=_checkout(codes[2]), headers=admin)
    assert r.status_code == 201, r.text
    rid = f"rej-{os.urandom(6).hex()}"
    r = httpx.post(
        f"{url}/v1/redemptions", json=_checkout(codes[2]), headers={**admin, "X-Request-ID": rid}
    )
    assert r.status_code == 409 and r.headers["x-request-id"] == rid
    import json

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for path in logs.glob("worker-*.err"):
            for line in path.read_text(errors="replace").splitlines():
                if rid in line:
                    doc = json.loads(line)
                    assert doc["logger"] == "actors.shard" and doc["level"] == "INFO"
                    assert doc["request_id"] == rid
                    assert doc["rejections"] == [{"request_id": rid, "error": "already_redeemed"}]
                    assert codes[2] not in line  # a voucher code is a secret: never logged
                    return
        time.sleep(0.5)
    pytest.fail(f"no shard log line names {rid}")


def test_hot_path_metrics_are_exported_by_the_ray_metrics_agent(
    http_api: Any, admin: dict[str, str], codes: list[str]
) -> None:
    import ray

    node = ray._private.worker.global_worker.node
    port = getattr(node, "metrics_export_port", None)
    if not port:
        pytest.skip("no Ray metrics agent port known to this driver")
    # the hot path runs here too: this test may run alone
    r = httpx.post(f"{http_api.url}/v1/validations", json=_checkout(codes[3]), headers=admin)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{http_api.url}/v1/redemptions", json=_checkout(codes[3]), headers=admin)
    assert r.status_code == 201, r.text
    wanted = {
        "decisions": re.compile(r'^ray_voucher_shard_decisions_total\{[^}]*op="validate"[^}]*\} [1-9]', re.M),
        "shard batch": re.compile(r'^ray_voucher_shard_batch_size_bucket\{[^}]*shard="\d+"', re.M),
        "commit": re.compile(r'^ray_voucher_shard_commit_seconds_bucket\{[^}]*shard="\d+"', re.M),
        "commit events": re.compile(r"^ray_voucher_shard_commit_events_count\{", re.M),
        "gateway batch": re.compile(r'^ray_voucher_gateway_batch_size_bucket\{[^}]*op="redeem"', re.M),
        "gateway call": re.compile(r'^ray_voucher_gateway_call_seconds_count\{[^}]*shard="\d+"', re.M),
        "inflight": re.compile(r"^ray_voucher_gateway_inflight\{", re.M),
        "pending": re.compile(r'^ray_voucher_shard_pending_events\{[^}]*shard="\d+"', re.M),
    }
    # Ray reports to the agent every ~10 s (metrics_report_interval_ms)
    deadline = time.monotonic() + 45
    missing: list[str] = list(wanted)
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(
            f"http://{node.node_ip_address}:{port}/metrics", timeout=5
        ).read().decode()
        missing = [name for name, rx in wanted.items() if not rx.search(text)]
        if not missing:
            break
        time.sleep(1.0)
    assert not missing, f"metrics not exported after 45 s: {missing}"
    # every outcome tag is ok or an engine error code: bounded
    from engine import errors

    allowed = {"ok", *errors.registry()}
    outcomes = set(re.findall(r'ray_voucher_shard_decisions_total\{[^}]*outcome="([^"]+)"', text))
    assert outcomes and outcomes <= allowed, outcomes
