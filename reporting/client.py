"""The reporting app's only way to the data: the engine's HTTP API (httpx)."""

from __future__ import annotations

from typing import Any

import httpx

from engine.settings import Settings


def api_url(settings: Settings) -> str:
    """Base URL of the HTTP API: the ``api_url`` setting (set by ``voucher-engine up``)."""
    return settings.api_url.rstrip("/")


class ApiError(Exception):
    """A problem answer (RFC 9457) or a connection failure, with a message to show.

    ``code`` is the engine's stable code (``unknown_campaign``, ``voucher_disabled``, ...);
    a 404 without one, or a 405, means the API has no such route or method at all."""

    def __init__(self, status: int, detail: str, code: str | None = None, body: Any = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.code = code
        self.body = body

    @property
    def missing_endpoint(self) -> bool:
        """The API this app talks to has no such route (an engine without it)."""
        return self.status == 405 or (self.status == 404 and not self.code)


class Api:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 10.0) -> None:
        self.base_url = base_url
        self.token = token
        self.timeout = timeout
        self.device_token: str | None = None

    def _headers(self, accept: str = "application/json") -> dict[str, str]:
        h = {"Accept": accept}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            kw.setdefault("timeout", self.timeout)
            r = httpx.request(method, f"{self.base_url}{path}", **kw)
        except httpx.HTTPError as exc:
            raise ApiError(0, f"cannot reach the API at {self.base_url}: {exc}") from exc
        if r.status_code >= 400:
            body: Any = None
            code = None
            try:
                body = r.json()
                detail = str(body.get("detail") or body.get("title") or r.text)
                code = body.get("code")
            except (ValueError, AttributeError):
                detail = r.text or r.reason_phrase
            raise ApiError(r.status_code, detail, code, body)
        return r

    def login(self, email: str, password: str) -> str:
        body = {"email": email, "password": password}
        if self.device_token:
            # a device that signed in before is not held up by strangers' failed logins
            body["device_token"] = self.device_token
        r = self._send("POST", "/v1/auth/login", json=body)
        token = str(r.json()["access_token"])
        self.token = token
        self.device_token = r.json().get("device_token") or self.device_token
        return token

    def me(self) -> dict[str, Any]:
        return dict(self._send("GET", "/v1/users/me", headers=self._headers()).json())

    def get(self, path: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        return self._send("GET", path, params=clean, headers=self._headers()).json()

    def csv(self, path: str, **params: Any) -> bytes:
        clean = {k: v for k, v in params.items() if v is not None}
        return self._send("GET", path, params=clean, headers=self._headers("text/csv")).content

    # --- the reports ---------------------------------------------------------------------

    def overview(self, top: int = 10) -> dict[str, Any]:
        return dict(self.get("/v1/reports/campaigns", top=top))

    def campaign(self, cid: str) -> dict[str, Any]:
        return dict(self.get(f"/v1/reports/campaigns/{cid}"))

    def timeseries(self, cid: str, bucket: str) -> dict[str, Any]:
        return dict(self.get(f"/v1/reports/campaigns/{cid}/timeseries", bucket=bucket))

    def hours(self, cid: str) -> dict[str, Any]:
        return dict(self.get(f"/v1/reports/campaigns/{cid}/hours"))

    def segments(self, cid: str) -> dict[str, Any]:
        return dict(self.get(f"/v1/reports/campaigns/{cid}/segments"))

    def channels(self, cid: str) -> dict[str, Any]:
        return dict(self.get(f"/v1/reports/campaigns/{cid}/channels"))

    def live(self, cid: str) -> dict[str, Any]:
        return dict(self.get(f"/v1/reports/campaigns/{cid}/live"))
