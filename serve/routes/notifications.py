"""Notifications (the staff inbox), where each was sent, and the webhooks they go to."""

from typing import Annotated, Any

from fastapi import Path, Query

from serve.auth import Principal
from serve.models import MAX_INT64, WebhookIn
from serve.problems import problem_responses
from serve.routes.deps import BODY, GUARDED, Svc, require, router, unwrap

routes = router()

Reader = Annotated[Principal, require("notifications.read")]
WebhookManager = Annotated[Principal, require("webhooks.manage")]


@routes.get("/v1/notifications", tags=["notifications"], responses=problem_responses(*GUARDED, 422))
async def list_notifications(
    caller: Reader,
    svc: Svc,
    unread: bool = False,
    limit: int = Query(50, ge=1, le=500),
) -> Any:
    return {"items": unwrap(await svc.notifications.list.remote(unread, limit))}


@routes.post(
    "/v1/notifications/{notification_id}/read",
    tags=["notifications"],
    responses=problem_responses(*GUARDED, 404, 422),
)
async def read_notification(
    caller: Reader, svc: Svc, notification_id: int = Path(ge=1, le=MAX_INT64)
) -> Any:
    return unwrap(await svc.notifications.mark_read.remote(notification_id))


@routes.post(
    "/v1/notification-webhooks",
    status_code=201,
    tags=["notifications"],
    responses=problem_responses(*GUARDED, *BODY),
)
async def add_webhook(body: WebhookIn, caller: WebhookManager, svc: Svc) -> Any:
    """Register an endpoint for signed notification webhooks (the secret is shown once)."""
    return unwrap(await svc.issuance.add_webhook.remote(body.url, body.secret, body.kinds))


@routes.get("/v1/notification-webhooks", tags=["notifications"], responses=problem_responses(*GUARDED))
async def list_webhooks(caller: WebhookManager, svc: Svc) -> Any:
    return {"items": unwrap(await svc.issuance.list_webhooks.remote())}


@routes.delete(
    "/v1/notification-webhooks/{webhook_id}",
    tags=["notifications"],
    responses=problem_responses(*GUARDED, 404, 422),
)
async def remove_webhook(webhook_id: str, caller: WebhookManager, svc: Svc) -> Any:
    return unwrap(await svc.issuance.remove_webhook.remote(webhook_id))


@routes.get(
    "/v1/notifications/{notification_id}/deliveries",
    tags=["notifications"],
    responses=problem_responses(*GUARDED, 422),
)
async def notification_deliveries(
    caller: Reader, svc: Svc, notification_id: int = Path(ge=1, le=MAX_INT64)
) -> Any:
    """Where a notification was sent (email, webhooks) and every attempt."""
    return {"items": unwrap(await svc.issuance.sends.remote(notification_id))}
