"""Campaigns: create, list, read, lifecycle (activate, pause, end), code generation and its
jobs, the live overview, and looking a voucher up by its code."""

import asyncio
from typing import Annotated, Any

from fastapi import Query, Request, Response

from actors.calls import Failure
from actors.issuance import JOB_PREFIX as ISSUANCE_JOB_PREFIX
from engine import errors
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
    responses=problem_responses(*GUARDED, 404, 409, 422),
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
    c = unwrap(await svc.campaigns.create.remote(fields))
    response.headers["Location"] = f"/v1/campaigns/{c['id']}"
    return c


@routes.get("/v1/campaigns", tags=["campaigns"], responses=problem_responses(*GUARDED, 422))
async def list_campaigns(
    caller: Reader,
    svc: Svc,
    state: str | None = Query(None, pattern="^(draft|active|paused|ended)$"),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=MAX_INT64),
) -> Any:
    return unwrap(await svc.campaigns.list.remote(state, limit, offset))


@routes.get(
    "/v1/campaigns/{campaign_id}",
    response_model=CampaignOut,
    tags=["campaigns"],
    responses=problem_responses(*GUARDED, 404, 422),
)
async def get_campaign(campaign_id: str, caller: Reader, svc: Svc) -> Any:
    return unwrap(await svc.campaigns.get.remote(campaign_id))


async def _transition(svc: Svc, campaign_id: str, action: str) -> Any:
    c = unwrap(await svc.campaigns.transition.remote(campaign_id, action))
    svc.notifications.record.remote(
        f"campaign_{_PAST[action]}", campaign_id, f"campaign {c['name']} ({campaign_id}) {_PAST[action]}"
    )
    return c


@routes.post("/v1/campaigns/{campaign_id}/activate", **_TRANSITION)
async def activate(campaign_id: str, caller: Writer, svc: Svc) -> Any:
    return await _transition(svc, campaign_id, "activate")


@routes.post("/v1/campaigns/{campaign_id}/pause", **_TRANSITION)
async def pause(campaign_id: str, caller: Writer, svc: Svc) -> Any:
    return await _transition(svc, campaign_id, "pause")


@routes.post("/v1/campaigns/{campaign_id}/end", **_TRANSITION)
async def end(campaign_id: str, caller: Writer, svc: Svc) -> Any:
    return await _transition(svc, campaign_id, "end")


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
