"""The HTTP shapes of a campaign's code list, its exports, and the redemption history."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from serve.models import RedemptionOut, Strict

VoucherStatusName = Literal["available", "assigned", "redeemed", "void"]


class VoucherListItem(BaseModel):
    """One code of a campaign as Postgres holds it."""

    code: str
    status: VoucherStatusName
    customer_id: str | None = None
    active: bool = True
    starts_at: datetime | None = None
    expires_at: datetime | None = None
    metadata: dict[str, Any] | None = None


class VoucherPage(BaseModel):
    """A page of codes in code order; ``next_cursor`` fetches the next (null: the last)."""

    data: list[VoucherListItem]
    next_cursor: str | None = None


class ExportIn(Strict):
    """What to export: the campaign's codes as CSV, all of them or those of one status."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"format": "csv"}]})

    format: Literal["csv"] = "csv"
    status: VoucherStatusName | None = None


class ExportOut(BaseModel):
    """An export job: ``rows`` of ``total`` written so far; once ``state`` is ``done`` the
    CSV is at ``download``."""

    id: str
    campaign_id: str
    format: str
    status: VoucherStatusName | None = None
    state: Literal["running", "done", "failed"]
    total: int
    rows: int
    bytes: int
    error: str | None = None
    created_at: datetime
    finished_at: datetime | None = None
    download: str | None = None


class ExportPage(BaseModel):
    """A page of a campaign's exports, newest first; ``next_cursor`` fetches the next
    (null: the last)."""

    data: list[ExportOut]
    next_cursor: str | None = None


class RedemptionPage(BaseModel):
    """A page of redemptions (rolled back ones too) in id order; ``next_cursor`` fetches
    the next (null: the last)."""

    data: list[RedemptionOut]
    next_cursor: str | None = None
