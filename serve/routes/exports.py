"""A campaign's codes: listed a page at a time, and exported as CSV by a job whose file
streams from Postgres."""

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import Query, Response
from fastapi.responses import StreamingResponse

from engine import cursors, errors, metadata
from engine.events import STATUS_NAMES
from serve.auth import Principal, actor_of
from serve.problems import problem_responses
from serve.record_models import ExportIn, ExportOut, ExportPage, VoucherPage
from serve.records import Records
from serve.routes.deps import BODY, GUARDED, Svc, require, router
from store import exports, records

routes = router()

CodeReader = Annotated[Principal, require("codes.read")]
ExportWriter = Annotated[Principal, require("exports.create")]
ExportReader = Annotated[Principal, require("exports.read")]
ExportDeleter = Annotated[Principal, require("exports.delete")]

_STATUS = "^(available|assigned|redeemed|void)$"
EXPORT_JOB_PREFIX = "exp_"  # an export's id: also a job of GET /v1/jobs/{id}


def records_of(svc: Svc) -> Records:
    found: Records | None = svc.records
    if found is None:
        raise errors.Unavailable("records are not served by this gateway")
    return found


@routes.get(
    "/v1/campaigns/{campaign_id}/vouchers",
    response_model=VoucherPage,
    tags=["vouchers"],
    responses=problem_responses(*GUARDED, 404, 422),
)
async def list_vouchers(
    campaign_id: str,
    caller: CodeReader,
    svc: Svc,
    status: str | None = Query(None, pattern=_STATUS),
    customer_id: str | None = Query(None, min_length=1, max_length=256),
    metadata_filter: str | None = Query(
        None, alias="metadata", min_length=3, max_length=512,
        description="key=value: codes whose metadata holds that key with that value",
    ),
    limit: int = Query(100, ge=1, le=1000),
    cursor: str | None = Query(None, min_length=1, max_length=cursors.MAX_CURSOR_LEN),
) -> Any:
    """The campaign's codes in code order, as Postgres holds them, a page at a time: pass
    ``next_cursor`` as ``cursor`` for the next page. Paging by code keeps every code in
    exactly one page while codes are redeemed between pages (a filter on ``status`` shows
    each code in the state it has when its page is read)."""
    after = None if cursor is None else cursors.decode(cursor, "v", campaign_id)
    wanted = None if metadata_filter is None else metadata.parse_filter(metadata_filter)
    db = await records_of(svc).pool()
    if not await records.campaign_exists(db, campaign_id):
        raise errors.UnknownCampaign(f"no campaign has id {campaign_id!r}")
    rows, more = await records.voucher_page(
        db,
        campaign_id,
        after=after,
        limit=limit,
        status=None if status is None else STATUS_NAMES.index(status),
        customer_id=customer_id,
        metadata=wanted,
    )
    nxt = cursors.encode("v", campaign_id, rows[-1]["code"]) if more and rows else None
    return {"data": rows, "next_cursor": nxt}


@routes.post(
    "/v1/campaigns/{campaign_id}/exports",
    status_code=202,
    response_model=ExportOut,
    tags=["vouchers"],
    responses=problem_responses(*GUARDED, *BODY, 404),
)
async def start_export(
    campaign_id: str, body: ExportIn, response: Response, caller: ExportWriter, svc: Svc
) -> Any:
    """Export the campaign's codes (or those of one ``status``) as CSV: a job, answered at
    once; follow it at ``GET /v1/exports/{id}`` and download the file once it is done. It
    continues where it stopped if the process running it stops. The audit log names who
    started it."""
    rec = records_of(svc)
    db = await rec.pool()
    if not await records.campaign_exists(db, campaign_id):
        raise errors.UnknownCampaign(f"no campaign has id {campaign_id!r}")
    status = None if body.status is None else STATUS_NAMES.index(body.status)
    job = await rec.start_export(campaign_id, body.format, status, actor_of(caller))
    response.headers["Location"] = f"/v1/exports/{job['id']}"
    return job


@routes.get(
    "/v1/campaigns/{campaign_id}/exports",
    response_model=ExportPage,
    tags=["vouchers"],
    responses=problem_responses(*GUARDED, 404, 422),
)
async def list_exports(
    campaign_id: str,
    caller: ExportReader,
    svc: Svc,
    limit: int = Query(20, ge=1, le=100),
    cursor: str | None = Query(None, min_length=1, max_length=cursors.MAX_CURSOR_LEN),
) -> Any:
    """The campaign's exports, newest first, running, done or failed (a deleted one is
    gone), a page at a time: pass ``next_cursor`` as ``cursor`` for the next page."""
    before = None if cursor is None else _export_key(cursors.decode(cursor, "e", campaign_id))
    db = await records_of(svc).pool()
    if not await records.campaign_exists(db, campaign_id):
        raise errors.UnknownCampaign(f"no campaign has id {campaign_id!r}")
    rows, more = await exports.page(db, campaign_id, before=before, limit=limit)
    nxt = None
    if more and rows:
        last = rows[-1]
        nxt = cursors.encode("e", campaign_id, f"{last['created_at'].isoformat()}|{last['id']}")
    return {"data": rows, "next_cursor": nxt}


def _export_key(key: str) -> tuple[datetime, str]:
    at, sep, export_id = key.rpartition("|")
    try:
        when = datetime.fromisoformat(at)
    except ValueError:
        when = None
    if not sep or not export_id or when is None or when.tzinfo is None:
        raise errors.InvalidCursor("cursor is not one this list handed out; start again without it")
    return when, export_id


async def _export(svc: Svc, export_id: str) -> tuple[Any, dict[str, Any]]:
    db = await records_of(svc).pool()
    job = await exports.get(db, export_id)
    if job is None:
        raise errors.UnknownExport(f"no export has id {export_id!r}")
    return db, job


async def export_job(svc: Svc, export_id: str) -> dict[str, Any]:
    """An export as a job of ``GET /v1/jobs/{id}``."""
    return (await _export(svc, export_id))[1]


@routes.get(
    "/v1/exports/{export_id}",
    response_model=ExportOut,
    tags=["vouchers"],
    responses=problem_responses(*GUARDED, 404, 422),
)
async def get_export(export_id: str, caller: ExportReader, svc: Svc) -> Any:
    return (await _export(svc, export_id))[1]


@routes.get(
    "/v1/exports/{export_id}/download",
    response_class=StreamingResponse,
    tags=["vouchers"],
    responses={
        200: {"description": "the CSV file", "content": {"text/csv": {"schema": {"type": "string"}}}},
        **problem_responses(*GUARDED, 404, 409, 422),
    },
)
async def download_export(export_id: str, caller: ExportReader, svc: Svc) -> StreamingResponse:
    """The finished export as ``text/csv`` (a header line, then one line per code in code
    order), streamed from Postgres a stored chunk at a time. 409 ``export_not_ready`` while
    it runs."""
    db, job = await _export(svc, export_id)
    if job["state"] != "done":
        raise errors.ExportNotReady(f"export {export_id} is {job['state']}; nothing to download yet")
    count = await exports.chunk_count(db, export_id)

    async def body() -> AsyncIterator[bytes]:
        yield exports.HEADER.encode()
        async for chunk in exports.chunks(db, export_id, count):
            yield chunk.encode()

    name = f"{job['campaign_id']}-{export_id}.csv"
    return StreamingResponse(
        body(),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "Content-Length": str(len(exports.HEADER) + job["bytes"]),
        },
    )


@routes.delete(
    "/v1/exports/{export_id}", tags=["vouchers"], responses=problem_responses(*GUARDED, 404, 422)
)
async def delete_export(export_id: str, caller: ExportDeleter, svc: Svc) -> Any:
    """Delete an export and its file, whether it is running (it stops), done or failed.
    It is gone at once for every reader (404); the stored file is purged in the
    background. Exports older than ``VOUCHER_EXPORT_RETENTION_DAYS`` go the same way."""
    if not await records_of(svc).delete_export(export_id, actor_of(caller)):
        raise errors.UnknownExport(f"no export has id {export_id!r}")
    return {"id": export_id, "deleted": True}
