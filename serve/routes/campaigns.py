"""Campaigns: create, list, read, lifecycle (activate, pause, end), code generation and its
jobs, the live overview, and looking a voucher up by its code."""

import asyncio
from typing import Annotated, Any

from fastapi import Query, Request, Response

from actors.calls import Failure
from actors.issuance import JOB_PREFIX as ISSUANCE_JOB_PREFIX
from engine import errors
from engine import metadata as metadata_filter
from serve.auth import Principal, actor_of, customer_only
from serve.models import (
    MAX_INT64,
    CampaignIn,
    CampaignOut,
    GenerateIn,
    IssuanceJobOut,
    JobOut,
    TransitionOut,
    VoucherOut,
    VoucherPatchIn,
)
from serve.problems import problem_responses
from serve.record_models import ExportOut
from serve.routes.campaign_editing import etag, with_etag
from serve.routes.customers import holds
from serve.routes.deps import BODY, GUARDED, Svc, require, router, unwrap
from serve.routes.exports import EXPORT_JOB_PREFIX, export_job

routes = router()

Reader = Annotated[Principal, require("campaigns.read")]
Writer = Annotated[Principal, require("campaigns.write")]
Generator = Annotated[Principal, require("campaigns.generate")]
JobReader = Annotated[Principal, require("jobs.read")]
OverviewReader = Annotated[Principal, require("overview.read")]
VoucherReader = Annotated[Principal, require("vouchers.read")]
VoucherWriter = Annotated[Principal, require("vouchers.write")]

_TRANSITION: dict[str, Any] = dict(
    response_model=TransitionOut,
    tags=["campaigns"],
    responses=with_etag(*GUARDED, 404, 409, 422),
)
_PAST = {"activate": "started", "pause": "paused", "end": "ended"}


def _job(job: dict[str, Any]) -> dict[str, Any]:
    out = dict(job)
    rate = out.get("rate") or 0.0
    left = out["requested"] - out["generated"]
    out["eta_s"] = round(left / rate, 2) if rate and out["state"] == "running" else None
    return out


@routes.post(
    "/v1/campaigns",
    status_code=201,
    response_model=CampaignOut,
    tags=["campaigns"],
    responses=problem_responses(*GUARDED, *BODY, 409),
)
async def create_campaign(body: CampaignIn, response: Response, caller: Writer, svc: Svc) -> Any:
    fields = body.model_dump(exclude_none=True)
    fields["windows"] = [w for w in fields.get("windows", [])]
    c = unwrap(await svc.campaigns.create.remote(fields, actor_of(caller)))
    response.headers["Location"] = f"/v1/campaigns/{c['id']}"
    return etag(response, c)


@routes.get("/v1/campaigns", tags=["campaigns"], responses=problem_responses(*GUARDED, 422))
async def list_campaigns(
    caller: Reader,
    svc: Svc,
    state: str | None = Query(None, pattern="^(draft|active|paused|ended)$"),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=MAX_INT64),
    metadata: str | None = Query(
        None,
        max_length=300,
        description="key=value: only campaigns whose metadata has that key with that value "
        "(read as JSON when it is a JSON scalar, e.g. 42 or true, else as a string)",
    ),
) -> Any:
    wanted = metadata_filter.parse_filter(metadata) if metadata is not None else None
    return unwrap(await svc.campaigns.list.remote(state, limit, offset, wanted))


@routes.get(
    "/v1/campaigns/{campaign_id}",
    response_model=CampaignOut,
    tags=["campaigns"],
    responses=with_etag(*GUARDED, 404, 422),
)
async def get_campaign(campaign_id: str, response: Response, caller: Reader, svc: Svc) -> Any:
    """The campaign, with its version as ``ETag`` (send it in ``If-Match`` to edit)."""
    return etag(response, unwrap(await svc.campaigns.get.remote(campaign_id)))


async def _transition(svc: Svc, campaign_id: str, action: str, caller: Principal) -> Any:
    c = unwrap(await svc.campaigns.transition.remote(campaign_id, action, actor_of(caller)))
    svc.notifications.record.remote(
        f"campaign_{_PAST[action]}", campaign_id, f"campaign {c['name']} ({campaign_id}) {_PAST[action]}"
    )
    return c


@routes.post("/v1/campaigns/{campaign_id}/activate", **_TRANSITION)
async def activate(campaign_id: str, response: Response, caller: Writer, svc: Svc) -> Any:
    return etag(response, await _transition(svc, campaign_id, "activate", caller))


@routes.post("/v1/campaigns/{campaign_id}/pause", **_TRANSITION)
async def pause(campaign_id: str, response: Response, caller: Writer, svc: Svc) -> Any:
    return etag(response, await _transition(svc, campaign_id, "pause", caller))


@routes.post("/v1/campaigns/{campaign_id}/end", **_TRANSITION)
async def end(campaign_id: str, response: Response, caller: Writer, svc: Svc) -> Any:
    return etag(response, await _transition(svc, campaign_id, "end", caller))


@routes.post(
    "/v1/campaigns/{campaign_id}/generate",
    status_code=202,
    response_model=JobOut,
    tags=["campaigns"],
    responses=problem_responses(*GUARDED, *BODY, 404, 409),
)
async def generate(
    campaign_id: str, body: GenerateIn, response: Response, caller: Generator, svc: Svc
) -> Any:
    job = unwrap(await svc.campaigns.start_generation.remote(campaign_id, body.count))
    response.headers["Location"] = f"/v1/jobs/{job['id']}"
    return _job(job)


@routes.get(
    "/v1/jobs/{job_id}",
    response_model=IssuanceJobOut | JobOut | ExportOut,
    tags=["campaigns"],
    responses=problem_responses(*GUARDED, 404, 422),
)
async def job(job_id: str, caller: JobReader, svc: Svc) -> Any:
    if job_id.startswith(EXPORT_JOB_PREFIX):
        return await export_job(svc, job_id)
    if job_id.startswith(ISSUANCE_JOB_PREFIX):
        return unwrap(await svc.issuance.job.remote(job_id))
    return _job(unwrap(await svc.campaigns.job.remote(job_id)))


@routes.get(
    "/v1/campaigns/{campaign_id}/overview",
    tags=["campaigns"],
    responses=problem_responses(*GUARDED, 404, 422),
)
async def overview(campaign_id: str, caller: OverviewReader, svc: Svc) -> Any:
    """Campaign, live counters and delivery status, fetched concurrently."""
    campaign, live, delivery = await asyncio.gather(
        svc.campaigns.get.remote(campaign_id),
        svc.reports.live.remote(campaign_id),
        svc.delivery.status.remote(campaign_id),
    )
    return {"campaign": unwrap(campaign), "stats": unwrap(live), "delivery": unwrap(delivery)}


@routes.get(
    "/v1/vouchers/{code}",
    response_model=VoucherOut,
    response_model_exclude_none=True,
    tags=["vouchers"],
    responses=problem_responses(*GUARDED, 404, 422),
)
async def voucher(code: str, request: Request, caller: VoucherReader, svc: Svc) -> Any:
    if customer_only(caller):
        ip = svc.gate.client(request.scope)
        await svc.gate.check_guessing(ip, caller.user_id, caller)
        found = await svc.vouchers.get.remote(code)
        if isinstance(found, Failure) or not await holds(svc, caller, found.get("customer_id")):
            await svc.gate.penalize(ip, caller.user_id, caller)
            raise errors.UnknownCode(f"no voucher of yours has code {code!r}")
        return found
    return unwrap(await svc.vouchers.get.remote(code))


@routes.patch(
    "/v1/vouchers/{code}",
    response_model=VoucherOut,
    response_model_exclude_none=True,
    tags=["vouchers"],
    responses=problem_responses(*GUARDED, *BODY, 404),
)
async def control_voucher(code: str, body: VoucherPatchIn, caller: VoucherWriter, svc: Svc) -> Any:
    """Switch one code off or on (a code switched off is refused with ``voucher_disabled``),
    give it a window of its own inside its campaign's, or set its metadata. Decided by the
    code's owner shard and answered once it is in Postgres, with a ``voucher.updated``
    event and an audit entry."""
    changes = {name: getattr(body, name) for name in body.model_fields_set}
    if not changes:
        raise errors.InvalidInput("nothing to change: send active, starts_at, expires_at or metadata")
    return unwrap(await svc.vouchers.control.remote(code, changes, actor_of(caller)))
