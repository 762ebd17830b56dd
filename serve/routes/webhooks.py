"""Shop webhooks: subscribe an endpoint to events, change it, remove it, read its log.

Registration checks the URL with the outgoing-URL guard of the notification webhooks
(``actors.outbound.check_url``: no loopback, link-local, private or metadata address
unless ``VOUCHER_OUTBOUND_ALLOW`` names it); every delivery checks it again when it
connects. The secret (``whsec_...``) is shown once, in the answer to the registration.
"""

from typing import Annotated, Any, Literal

from fastapi import Path, Query
from pydantic import Field

from actors import outbound
from actors.webhooks import new_endpoint_id
from engine import webhooks as wh
from engine.errors import InvalidCursor, NotFound
from serve.auth import Principal, actor_of
from serve.models import Strict
from serve.problems import problem_responses
from serve.routes.deps import BODY, GUARDED, Svc, require, router
from store import audit
from store import webhooks as store

routes = router()

Reader = Annotated[Principal, require("webhooks.read")]
Writer = Annotated[Principal, require("webhooks.write")]

EventType = Literal[
    "*",
    "redemption.succeeded",
    "redemption.rolled_back",
    "voucher.published",
    "voucher.updated",
    "campaign.created",
    "campaign.updated",
    "campaign.activated",
    "campaign.paused",
    "campaign.ended",
    "export.completed",
]
EndpointId = Annotated[str, Path(min_length=1, max_length=64)]


class WebhookEndpointIn(Strict):
    url: str = Field(min_length=1, max_length=2048, description="http(s) URL the events are POSTed to")
    events: list[EventType] = Field(
        min_length=1, max_length=16, description="event types to receive; `*` for all"
    )


class WebhookEndpointPatch(Strict):
    url: str | None = Field(None, min_length=1, max_length=2048)
    events: list[EventType] | None = Field(None, min_length=1, max_length=16)
    enabled: bool | None = None


async def _checked_url(svc: Svc, url: str) -> str:
    target = await outbound.check_url(url, outbound.allow_of(svc.settings))
    return target.url


def _not_found(endpoint_id: str) -> NotFound:
    return NotFound(f"webhook endpoint {endpoint_id!r} not found")


@routes.post(
    "/v1/webhooks", status_code=201, tags=["webhooks"], responses=problem_responses(*GUARDED, *BODY)
)
async def create_webhook(body: WebhookEndpointIn, caller: Writer, svc: Svc) -> Any:
    """Subscribe ``url`` to ``events``; deliveries start with the events after this call.
    The answer carries the signing secret, once."""
    url = await _checked_url(svc, body.url)
    events = wh.event_types(body.events)
    secret = wh.new_secret()
    pool = await svc.import_db()
    async with pool.acquire() as conn, conn.transaction():
        row = await store.create_endpoint(conn, new_endpoint_id(), url, secret, events)
        await audit.record(
            conn, actor_of(caller), "webhook.create", "webhook", row["id"],
            {"url": url, "events": list(events)},
        )
    return {**row, "secret": secret}


@routes.get("/v1/webhooks", tags=["webhooks"], responses=problem_responses(*GUARDED))
async def list_webhooks(caller: Reader, svc: Svc) -> Any:
    return {"data": await store.list_endpoints(await svc.import_db())}


@routes.get(
    "/v1/webhooks/{endpoint_id}", tags=["webhooks"], responses=problem_responses(*GUARDED, 404, 422)
)
async def get_webhook(endpoint_id: EndpointId, caller: Reader, svc: Svc) -> Any:
    row = await store.get_endpoint(await svc.import_db(), endpoint_id)
    if row is None:
        raise _not_found(endpoint_id)
    return row


@routes.patch(
    "/v1/webhooks/{endpoint_id}",
    tags=["webhooks"],
    responses=problem_responses(*GUARDED, *BODY, 404),
)
async def update_webhook(
    endpoint_id: EndpointId, body: WebhookEndpointPatch, caller: Writer, svc: Svc
) -> Any:
    """Change the URL (checked again), the event types, or switch the endpoint off and on
    (a switched-off endpoint keeps its position and catches up when switched on)."""
    url = None if body.url is None else await _checked_url(svc, body.url)
    events = None if body.events is None else wh.event_types(body.events)
    pool = await svc.import_db()
    async with pool.acquire() as conn, conn.transaction():
        row = await store.update_endpoint(
            conn, endpoint_id, url=url, events=events, enabled=body.enabled
        )
        if row is None:
            raise _not_found(endpoint_id)
        change = body.model_dump(exclude_none=True)
        if url is not None:
            change["url"] = url
        await audit.record(conn, actor_of(caller), "webhook.update", "webhook", endpoint_id, change)
    return row


@routes.delete(
    "/v1/webhooks/{endpoint_id}", tags=["webhooks"], responses=problem_responses(*GUARDED, 404, 422)
)
async def delete_webhook(endpoint_id: EndpointId, caller: Writer, svc: Svc) -> Any:
    """Remove the endpoint with its pending retries and its delivery log."""
    pool = await svc.import_db()
    async with pool.acquire() as conn, conn.transaction():
        if not await store.delete_endpoint(conn, endpoint_id):
            raise _not_found(endpoint_id)
        await audit.record(conn, actor_of(caller), "webhook.delete", "webhook", endpoint_id, {})
    return {"id": endpoint_id, "deleted": True}


@routes.get(
    "/v1/webhooks/{endpoint_id}/deliveries",
    tags=["webhooks"],
    responses=problem_responses(*GUARDED, 404, 422),
)
async def webhook_deliveries(
    endpoint_id: EndpointId,
    caller: Reader,
    svc: Svc,
    event_id: str | None = Query(None, min_length=1, max_length=200),
    limit: int = Query(100, ge=1, le=1000),
    cursor: str | None = Query(None, max_length=40),
) -> Any:
    """Every delivery attempt to the endpoint, newest first: the event, the attempt's
    number, outcome (`succeeded`, `retrying`, `failed`), HTTP status or error, duration."""
    before = None
    if cursor is not None:
        if not cursor.isdigit() or len(cursor) > 18:
            raise InvalidCursor("cursor is not a cursor this API returned")
        before = int(cursor)
    pool = await svc.import_db()
    if await store.get_endpoint(pool, endpoint_id) is None:
        raise _not_found(endpoint_id)
    rows = await store.deliveries(pool, endpoint_id, before=before, limit=limit, event_id=event_id)
    nxt = str(rows[-1]["id"]) if len(rows) == limit else None
    return {"data": rows, "next_cursor": nxt}
