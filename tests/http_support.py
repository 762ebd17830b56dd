"""Driving the HTTP API from the integration and fault tiers: logging in, campaigns,
code generation and the jobs that report it."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx


def bearer(token: str) -> dict[str, str]:
    """The ``Authorization`` header carrying ``token``."""
    return {"Authorization": f"Bearer {token}"}


def access_token(url: str, email: str, password: str) -> str:
    """Log in at the gateway ``url``; the access token (the login must succeed)."""
    r = httpx.post(f"{url}/v1/auth/login", json={"email": email, "password": password})
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def login(url: str, email: str, password: str) -> dict[str, str]:
    """Log in at the gateway ``url``; the headers that act as that user."""
    return bearer(access_token(url, email, password))


def admin_headers(api: Any) -> dict[str, str]:
    """Headers acting as the session's administrator of ``api`` (an ``HttpApi``)."""
    return login(api.url, api.admin_email, api.admin_password)


def flash_sale_body(
    name: str,
    code: str,
    *,
    discount: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    ends_at: str | None = None,
) -> dict[str, Any]:
    """A flash sale on ``code`` that started a minute ago: 5 EUR off, 100,000 uses, one per
    customer, a day long, unless told otherwise."""
    now = datetime.now(UTC)
    return {
        "name": name, "type": "flash_sale", "currency": "EUR",
        "discount": discount or {"kind": "amount", "value": 500},
        "limits": limits or {"total": 100000, "per_customer": 1}, "shared_code": code,
        "starts_at": (now - timedelta(minutes=1)).isoformat(),
        "ends_at": ends_at or (now + timedelta(days=1)).isoformat(),
    }


def open_campaign(url: str, admin: dict[str, str], body: dict[str, Any]) -> str:
    """Create the campaign ``body`` and activate it; its id."""
    r = httpx.post(f"{url}/v1/campaigns", headers=admin, json=body)
    assert r.status_code == 201, r.text
    cid = str(r.json()["id"])
    r = httpx.post(f"{url}/v1/campaigns/{cid}/activate", headers=admin)
    assert r.status_code == 200, r.text
    return cid


async def open_campaign_async(
    client: httpx.AsyncClient, url: str, admin: dict[str, str], body: dict[str, Any]
) -> str:
    """``open_campaign`` over an async client."""
    r = await client.post(f"{url}/v1/campaigns", headers=admin, json=body)
    assert r.status_code == 201, r.text
    cid = str(r.json()["id"])
    r = await client.post(f"{url}/v1/campaigns/{cid}/activate", headers=admin)
    assert r.status_code == 200, r.text
    return cid


def discount_body(name: str, **extra: Any) -> dict[str, Any]:
    """A ten percent discount campaign ending in thirty days; ``extra`` fields on top."""
    return {
        "name": name,
        "type": "discount",
        "currency": "EUR",
        "discount": {"kind": "percent", "value": 10},
        "ends_at": (datetime.now(UTC) + timedelta(days=30)).isoformat(),
        **extra,
    }


def create_campaign(url: str, headers: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    """Create the campaign ``body`` (a draft); the campaign as the API returns it."""
    r = httpx.post(f"{url}/v1/campaigns", json=body, headers=headers)
    assert r.status_code == 201, r.text
    return dict(r.json())


def finished_job(url: str, headers: dict[str, str], job_id: str, timeout_s: float = 60) -> dict[str, Any]:
    """Poll job ``job_id`` until it is no longer running; the job then."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers)
        assert r.status_code == 200, r.text
        job = r.json()
        if job["state"] != "running":
            return dict(job)
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def generate_codes(url: str, headers: dict[str, str], cid: str, count: int) -> dict[str, Any]:
    """Generate ``count`` codes for campaign ``cid`` and wait for the job to be done; the job."""
    r = httpx.post(f"{url}/v1/campaigns/{cid}/generate", json={"count": count}, headers=headers)
    assert r.status_code == 202, r.text
    job = finished_job(url, headers, r.json()["id"])
    assert job["state"] == "done", job
    return job
