"""The back office's calls to the engine's HTTP API: the reports client plus the routes a
shop uses to manage campaigns and codes. Nothing here touches Streamlit."""

from __future__ import annotations

import re
from typing import Any

from reporting.client import Api

IMPORT_TIMEOUT_S = 300.0


def _template(path: str) -> str:
    """``/v1/campaigns/{campaign_id}`` and ``/v1/campaigns/{id}`` compare equal."""
    return re.sub(r"\{[^}]*\}", "{}", path)


class BackOffice(Api):
    """An :class:`Api` with the write and look-up routes of the back office."""

    _routes: dict[str, set[str]] | None = None

    # --- what the API offers ------------------------------------------------------------

    def routes(self) -> dict[str, set[str]]:
        """Path template -> methods, from the API's OpenAPI document (read once)."""
        if self._routes is None:
            doc = self._send("GET", "/openapi.json", headers={"Accept": "application/json"}).json()
            self._routes = {
                _template(path): {m.upper() for m in item}
                for path, item in doc.get("paths", {}).items()
            }
        return self._routes

    def offers(self, method: str, path: str) -> bool:
        """Whether the API documents ``method path`` (a template such as ``/v1/x/{id}``)."""
        return method.upper() in self.routes().get(_template(path), set())

    def _json(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
              **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None and v != ""}
        h = self._headers() | (headers or {})
        kw: dict[str, Any] = {"params": clean, "headers": h}
        if body is not None:
            kw["json"] = body
        return self._send(method, path, **kw).json()

    # --- campaigns ----------------------------------------------------------------------

    def campaigns(self, limit: int = 500) -> list[dict[str, Any]]:
        return list(self._json("GET", "/v1/campaigns", limit=limit)["items"])

    def campaign_with_etag(self, cid: str) -> tuple[dict[str, Any], str]:
        """The campaign and the entity tag to send back as ``If-Match`` when editing it
        (the response's ``ETag``, else the campaign's ``version``)."""
        r = self._send("GET", f"/v1/campaigns/{cid}", headers=self._headers())
        c = dict(r.json())
        return c, r.headers.get("etag") or f'"{c.get("version", 0)}"'

    def create_campaign(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self._json("POST", "/v1/campaigns", body))

    def edit_campaign(self, cid: str, changes: dict[str, Any], etag: str) -> dict[str, Any]:
        return dict(self._json("PATCH", f"/v1/campaigns/{cid}", changes, headers={"If-Match": etag}))

    def transition(self, cid: str, action: str) -> dict[str, Any]:
        return dict(self._json("POST", f"/v1/campaigns/{cid}/{action}"))

    # --- codes --------------------------------------------------------------------------

    def campaign_overview(self, cid: str) -> dict[str, Any]:
        """The campaign, its counters from the shards and its delivery status."""
        return dict(self._json("GET", f"/v1/campaigns/{cid}/overview"))

    def generate(self, cid: str, count: int) -> dict[str, Any]:
        return dict(self._json("POST", f"/v1/campaigns/{cid}/generate", {"count": count}))

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/v1/jobs/{job_id}"))

    def import_codes(self, cid: str, data: bytes, content_type: str) -> dict[str, Any]:
        r = self._send(
            "POST", f"/v1/campaigns/{cid}/vouchers/import", content=data,
            headers=self._headers() | {"Content-Type": content_type}, timeout=IMPORT_TIMEOUT_S,
        )
        return dict(r.json())

    def vouchers(self, cid: str, *, status: str | None = None, customer_id: str | None = None,
                 limit: int = 100, cursor: str | None = None) -> dict[str, Any]:
        return dict(self._json("GET", f"/v1/campaigns/{cid}/vouchers", status=status,
                               customer_id=customer_id, limit=limit, cursor=cursor))

    def start_export(self, cid: str, status: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"format": "csv"}
        if status:
            body["status"] = status
        return dict(self._json("POST", f"/v1/campaigns/{cid}/exports", body))

    def export_job(self, export_id: str) -> dict[str, Any]:
        """An export's progress: ``GET /v1/exports/{id}`` where the API has it, else the
        job at ``GET /v1/jobs/{id}``."""
        if self.offers("GET", "/v1/exports/{id}"):
            return dict(self._json("GET", f"/v1/exports/{export_id}"))
        return self.job(export_id)

    def list_exports(self, cid: str, limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        """A page of the campaign's exports, newest first."""
        return dict(self._json("GET", f"/v1/campaigns/{cid}/exports", limit=limit, cursor=cursor))

    def download_export(self, export_id: str) -> bytes:
        return self.csv(f"/v1/exports/{export_id}/download")

    def delete_export(self, export_id: str) -> dict[str, Any]:
        return dict(self._json("DELETE", f"/v1/exports/{export_id}"))

    def voucher(self, code: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/v1/vouchers/{code}"))

    def control_voucher(self, code: str, changes: dict[str, Any]) -> dict[str, Any]:
        return dict(self._json("PATCH", f"/v1/vouchers/{code}", changes))

    # --- customers, publication, issuance, redemptions ------------------------------------

    def customer(self, customer_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/v1/customers/{customer_id}"))

    def publish(self, cid: str, customer_id: str, channels: list[str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"customer_id": customer_id}
        if channels:
            body["channels"] = channels
        return dict(self._json("POST", f"/v1/campaigns/{cid}/publications", body))

    def issue(self, cid: str, selection: dict[str, Any], channels: list[str]) -> dict[str, Any]:
        return dict(self._json("POST", f"/v1/campaigns/{cid}/issuance",
                               {"selection": selection, "channels": channels}))

    def redemptions(self, *, order_id: str | None = None, code: str | None = None,
                    customer_id: str | None = None, campaign_id: str | None = None,
                    limit: int = 100, cursor: str | None = None) -> dict[str, Any]:
        return dict(self._json("GET", "/v1/redemptions", order_id=order_id, code=code,
                               customer_id=customer_id, campaign_id=campaign_id, limit=limit,
                               cursor=cursor))
