"""Logging in over the HTTP API, for the integration and fault tiers."""

from __future__ import annotations

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
