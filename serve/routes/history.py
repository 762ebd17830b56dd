"""Redemption history: who redeemed what for which order, rolled back or not, read from
Postgres."""

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Query

from engine import cursors, errors
from engine.codes import normalize
from serve.auth import Principal
from serve.models import IsoDateTime, RedemptionOut
from serve.problems import problem_responses
from serve.record_models import RedemptionPage
from serve.routes.deps import GUARDED, Svc, require, router
from serve.routes.exports import records_of
from store import records

routes = router()

HistoryReader = Annotated[Principal, require("redemptions.read")]

_TEXT: dict[str, Any] = {"min_length": 1, "max_length": 256}


def _utc(since: datetime) -> datetime:
    if since.tzinfo is None:
        raise errors.InvalidInput("since needs a time zone, e.g. 2030-01-31T12:00:00Z")
    try:
        return since.astimezone(UTC)
    except OverflowError:
        raise errors.InvalidInput("since is out of range") from None


@routes.get(
    "/v1/redemptions",
    response_model=RedemptionPage,
    tags=["checkout"],
    responses=problem_responses(*GUARDED, 422),
)
async def list_redemptions(
    caller: HistoryReader,
    svc: Svc,
    campaign_id: str | None = Query(None, **_TEXT),
    code: str | None = Query(None, **_TEXT),
    customer_id: str | None = Query(None, **_TEXT),
    order_id: str | None = Query(None, **_TEXT),
    since: Annotated[IsoDateTime | None, Query(description="only redemptions made at or after this")] = None,
    limit: int = Query(100, ge=1, le=1000),
    cursor: str | None = Query(None, min_length=1, max_length=cursors.MAX_CURSOR_LEN),
) -> Any:
    """Redemptions, rolled back ones included (``status``, ``rolled_back_at``), with their
    metadata, filtered by campaign, code, customer, order and time, in id order a page at
    a time: pass ``next_cursor`` as ``cursor`` for the next page."""
    after = None if cursor is None else cursors.decode(cursor, "r", "")
    db = await records_of(svc).pool()
    rows, more = await records.redemption_page(
        db,
        after=after,
        limit=limit,
        campaign_id=campaign_id,
        code=None if code is None else normalize(code),  # as checkout stores it
        customer_id=customer_id,
        order_id=order_id,
        since=None if since is None else _utc(since),
    )
    nxt = cursors.encode("r", "", rows[-1]["id"]) if more and rows else None
    return {"data": rows, "next_cursor": nxt}


@routes.get(
    "/v1/redemptions/{redemption_id}",
    response_model=RedemptionOut,
    tags=["checkout"],
    responses=problem_responses(*GUARDED, 404, 422),
)
async def get_redemption(redemption_id: str, caller: HistoryReader, svc: Svc) -> Any:
    found = await records.redemption(await records_of(svc).pool(), redemption_id)
    if found is None:
        raise errors.UnknownRedemption(f"no redemption has id {redemption_id!r}")
    return found
