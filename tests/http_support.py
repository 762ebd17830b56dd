"""Logging in over the HTTP API, for the integration and fault tiers."""

from __future__ import annotations

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
