"""The event stream: every state change a shop cares about, in commit order.

Redemption events (``redemption.succeeded`` ``evt_<redemption id>``,
``redemption.rolled_back`` ``evt_rb_<redemption id>``) are read from the redemptions
themselves; the others from the ``events`` table (``store.webhooks``). A page holds the
events committed before the oldest transaction still running, so following
``next_cursor`` never skips an event that commits late. A page reads the stream slice by
slice (``store.webhooks.read_page``), as webhook delivery does, for about a second at
most: its cost does not grow with how many events lie behind it.
"""

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Query
from pydantic import BeforeValidator

from engine import webhooks as wh
from engine.errors import InvalidInput
from engine.webhooks import Position
from serve.auth import Principal
from serve.problems import problem_responses
from serve.routes.deps import GUARDED, Svc, require, router
from store import webhooks as store

routes = router()

# RFC 3339, as the schema's ``date-time`` says: a number (which pydantic would read as Unix
# seconds) or a time without its zone is refused.
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _rfc3339(value: object) -> object:
    if isinstance(value, str) and not _RFC3339.match(value):
        raise ValueError("must be an RFC 3339 date-time with its zone, e.g. 2030-01-31T12:00:00Z")
    return value


Since = Annotated[datetime | None, BeforeValidator(_rfc3339)]

#: how long one page reads the stream at most before it answers with a cursor
PAGE_BUDGET_S = 1.0

Reader = Annotated[Principal, require("events.read")]


@routes.get("/v1/events", tags=["webhooks"], responses=problem_responses(*GUARDED, 422))
async def list_events(
    caller: Reader,
    svc: Svc,
    type: str | None = Query(
        None, max_length=400, description="event types, comma-separated (e.g. `redemption.succeeded`)"
    ),
    since: Annotated[Since, Query(description="only events created at or after")] = None,
    cursor: str | None = Query(None, max_length=400),
    limit: int = Query(100, ge=1, le=1000),
) -> Any:
    """Events oldest first; ``next_cursor`` is null when the page reached the end.

    A page reads the stream slice by slice for about a second at most, so a page far
    behind (or with filters few events pass) may hold fewer than ``limit`` events, or
    none, and still give a ``next_cursor``: follow it until it is null."""
    types = None
    if type is not None:
        types = frozenset(wh.event_types([t.strip() for t in type.split(",") if t.strip()], "type"))
    after = Position(0) if cursor is None else wh.decode_cursor(cursor)
    if since is not None:
        try:
            since = since.astimezone(UTC)
        except (OverflowError, ValueError):
            raise InvalidInput("since is outside the range of timestamps") from None
    page = await store.read_page(
        await svc.import_db(),
        after,
        types=types,
        since=since,
        limit=limit,
        window=svc.settings.webhook_scan_txids,
        budget_s=PAGE_BUDGET_S,
    )
    return {
        "data": [{"object": "event", **e} for e in page.events],
        "next_cursor": None if page.complete else wh.encode_cursor(page.next),
    }
