"""The audit log: who (a user or an API key) did what to which resource, when, and the
change; written in the same transaction as each change. Admins only."""

from datetime import UTC
from typing import Annotated, Any

from fastapi import Query

from engine import errors
from engine.audit import entry_before
from serve.auth import Principal
from serve.models import AuditPageOut, IsoDateTime
from serve.problems import problem_responses
from serve.routes.deps import GUARDED, Svc, require, router

routes = router()

Auditor = Annotated[Principal, require("audit.read")]


@routes.get(
    "/v1/audit-log",
    response_model=AuditPageOut,
    tags=["audit"],
    responses=problem_responses(*GUARDED, 422),
)
async def audit_log(
    caller: Auditor,
    svc: Svc,
    resource_type: str | None = Query(
        None, max_length=64, description="campaign, voucher, user, api_key or customer"
    ),
    resource_id: str | None = Query(None, max_length=200),
    actor: str | None = Query(None, max_length=200, description="a user id or an API key id"),
    since: IsoDateTime | None = None,
    limit: int = Query(100, ge=1, le=1000),
    cursor: str | None = Query(None, max_length=200, description="next_cursor of the last page"),
) -> Any:
    """Entries newest first; follow ``next_cursor`` (null on the last page). ``since``:
    ISO 8601 with an offset, entries at or after it."""
    from store import audit

    if since is not None:
        if since.tzinfo is None:
            raise errors.InvalidInput("since must carry a time zone offset")
        try:
            since = since.astimezone(UTC)
        except OverflowError:
            raise errors.InvalidInput("since is too close to the ends of the calendar") from None

    before = entry_before(cursor) if cursor is not None else None
    return await audit.page(
        await svc.import_db(),
        resource_type=resource_type,
        resource_id=resource_id,
        actor=actor,
        since=since,
        before=before,
        limit=limit,
    )
