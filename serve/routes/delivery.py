"""Message delivery: a campaign's templates, its delivery records and status, and the
messages that used up their attempts."""

from typing import Annotated, Any

from fastapi import Path, Query

from serve.auth import Principal
from serve.models import MAX_INT64, TemplateIn
from serve.problems import problem_responses
from serve.routes.deps import BODY, GUARDED, Svc, require, router, unwrap

routes = router()

TemplateWriter = Annotated[Principal, require("templates.write")]
Reader = Annotated[Principal, require("deliveries.read")]


@routes.put(
    "/v1/campaigns/{campaign_id}/templates/{channel}",
    tags=["delivery"],
    responses=problem_responses(*GUARDED, *BODY, 404),
)
async def put_template(
    campaign_id: str,
    body: TemplateIn,
    caller: TemplateWriter,
    svc: Svc,
    channel: str = Path(pattern="^(email|sms|push)$"),
) -> Any:
    """Set the campaign's template for a channel and locale (validated now: a template
    that does not compile or uses an unknown variable is a 422, never a send failure)."""
    return unwrap(
        await svc.delivery.put_template.remote(
            campaign_id, channel, body.locale, body.subject, body.body, body.default
        )
    )


@routes.get(
    "/v1/campaigns/{campaign_id}/templates",
    tags=["delivery"],
    responses=problem_responses(*GUARDED, 404, 422),
)
async def list_templates(campaign_id: str, caller: Reader, svc: Svc) -> Any:
    return unwrap(await svc.delivery.templates.remote(campaign_id))


@routes.get(
    "/v1/campaigns/{campaign_id}/deliveries",
    tags=["delivery"],
    responses=problem_responses(*GUARDED, 404, 422),
)
async def list_deliveries(
    campaign_id: str,
    caller: Reader,
    svc: Svc,
    state: str | None = Query(None, pattern="^(queued|sending|sent|failed|dead)$"),
    channel: str | None = Query(None, pattern="^(email|sms|push)$"),
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_INT64),
) -> Any:
    """The campaign's delivery records (one per message), optionally by state/channel."""
    return unwrap(await svc.delivery.deliveries.remote(campaign_id, state, channel, limit, offset))


@routes.get(
    "/v1/campaigns/{campaign_id}/delivery",
    tags=["delivery"],
    responses=problem_responses(*GUARDED, 404, 422),
)
async def delivery_status(campaign_id: str, caller: Reader, svc: Svc) -> Any:
    """Counts of the campaign's messages per channel and state."""
    return unwrap(await svc.delivery.status.remote(campaign_id))


@routes.get("/v1/deliveries/dead", tags=["delivery"], responses=problem_responses(*GUARDED, 422))
async def dead_deliveries(
    caller: Reader,
    svc: Svc,
    campaign_id: str | None = None,
    limit: int = Query(100, ge=1, le=1000),
) -> Any:
    """Messages that used up their attempts (newest first), with their last error."""
    return unwrap(await svc.delivery.dead.remote(campaign_id, limit))
