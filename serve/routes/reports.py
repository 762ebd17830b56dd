"""Reports: campaign effectiveness from the reporting rollups, live flash-sale counters,
and CSV export of every report (``?format=csv`` or ``Accept: text/csv``). Role: analyst
and up."""

from collections.abc import Awaitable
from typing import Annotated, Any

from fastapi import Query, Request, Response

from engine import errors
from serve.auth import Principal
from serve.models import IsoDateTime
from serve.problems import problem_responses
from serve.routes.deps import GUARDED, Svc, require, router, unwrap

routes = router()

Analyst = Annotated[Principal, require("reports.read")]
Format = Annotated[str | None, Query(pattern="^(json|csv)$")]

_OK: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The report as JSON, or as CSV (`?format=csv` / `Accept: text/csv`)",
        "content": {"application/json": {}, "text/csv": {"schema": {"type": "string"}}},
    }
}


def _documented(*statuses: int) -> dict[str, Any]:
    return {"tags": ["reports"], "responses": {**_OK, **problem_responses(*GUARDED, *statuses)}}


async def _report(request: Request, response: Response, fmt: str | None, name: str, call: Awaitable[Any]) -> Any:
    """The report ``call`` answers, as JSON or as the CSV file ``name``.csv."""
    body = unwrap(await call)
    wants_csv = fmt == "csv" if fmt is not None else "text/csv" in request.headers.get("accept", "").lower()
    if wants_csv:
        from engine.reports import table_of, to_csv

        return Response(
            to_csv(table_of(body)),
            media_type="text/csv; charset=utf-8",
            headers={
                **dict(response.headers),
                "Content-Disposition": f'attachment; filename="{name}.csv"',
            },
        )
    return body


@routes.get("/v1/reports/campaigns", **_documented(422))
async def report_overview(
    request: Request,
    response: Response,
    caller: Analyst,
    svc: Svc,
    top: int = Query(10, ge=1, le=100),
    format: Format = None,
) -> Any:
    """Every campaign's funnel and money figures, totals and the top campaigns by net
    redemptions (rows: one per campaign)."""
    return await _report(request, response, format, "campaigns", svc.reports.overview.remote(top))


def _campaign_report(name: str, suffix: str, method: str, file: str, doc: str) -> None:
    """Route ``GET /v1/reports/campaigns/{campaign_id}<suffix>``: the Reports deployment's
    ``method`` for the campaign, exported as ``<file>-<campaign_id>.csv``."""

    async def route(
        campaign_id: str,
        request: Request,
        response: Response,
        caller: Analyst,
        svc: Svc,
        format: Format = None,
    ) -> Any:
        call = getattr(svc.reports, method).remote(campaign_id)
        return await _report(request, response, format, f"{file}-{campaign_id}", call)

    route.__name__ = route.__qualname__ = name
    route.__doc__ = doc
    routes.get(f"/v1/reports/campaigns/{{campaign_id}}{suffix}", **_documented(404, 422))(route)


_campaign_report(
    "report_campaign", "", "campaign", "campaign",
    """Funnel (generated -> assigned -> delivered -> redeemed), rates, money, time to
        first redemption and delivery success per channel of one campaign.""",
)
@routes.get("/v1/reports/campaigns/{campaign_id}/timeseries", **_documented(404, 422))
async def report_timeseries(
    campaign_id: str,
    request: Request,
    response: Response,
    caller: Analyst,
    svc: Svc,
    bucket: str = Query("hour", pattern="^(minute|hour|day)$"),
    since: IsoDateTime | None = None,
    until: IsoDateTime | None = None,
    format: Format = None,
) -> Any:
    """Redemptions per minute, or per hour/day of the campaign's time zone; empty
    buckets included. ``since``/``until``: ISO 8601 with an offset; by default from the
    start of activity (at most 6 h of minutes, 14 days of hours, a year of days) to now."""
    for label, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise errors.InvalidInput(f"{label} must carry a time zone offset")
    return await _report(
        request, response, format, f"timeseries-{campaign_id}-{bucket}",
        svc.reports.timeseries.remote(campaign_id, bucket, since, until),
    )


_campaign_report(
    "report_hours", "/hours", "hours", "hours",
    "Redemptions by hour of day (0..23) in the campaign's time zone.",
)
_campaign_report(
    "report_segments", "/segments", "segments", "segments",
    "Redemptions by customer segment (customer tag).",
)
_campaign_report(
    "report_channels", "/channels", "channels", "channels",
    "Deliveries per channel and state, and each channel's success rate.",
)
_campaign_report(
    "report_live", "/live", "live", "live",
    """Live counters from the shards' memory: redemptions per second, quantity left and
        the forecast time to sell-out of a flash sale.""",
)
