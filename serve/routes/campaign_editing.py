"""Editing a campaign: ``PATCH /v1/campaigns/{id}`` with optimistic concurrency.

A campaign's answers carry ``ETag: "<version>"``; a change sent with ``If-Match`` applies
only to that version (412 ``version_mismatch`` otherwise, nothing written). The change is
decided by the coordinator (``engine.campaigns.edit``: only what is safe for the
campaign's state), stored with its ``campaign.updated`` event and audit entry in one
transaction, and answered once every shard holds the new version (or was fenced).
"""

import re
from typing import Annotated, Any

from fastapi import Header, Response

from engine import errors
from serve.auth import Principal, actor_of
from serve.models import CampaignPatchIn, TransitionOut
from serve.problems import problem_responses
from serve.routes.deps import BODY, GUARDED, Svc, require, router, unwrap

routes = router()

Writer = Annotated[Principal, require("campaigns.write")]

IF_MATCH_PATTERN = r'^(\*|"[0-9]{1,18}")$'
_IF_MATCH = re.compile(IF_MATCH_PATTERN)

ETAG_HEADER: dict[str, Any] = {
    "ETag": {
        "description": 'The campaign\'s version, e.g. `"3"`: send it back in `If-Match`.',
        "schema": {"type": "string", "pattern": '^"[0-9]+"$'},
    }
}
"""The ``responses`` entry of an answer that carries a campaign's ETag."""


def with_etag(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route answering a campaign with its ETag, or these problems."""
    return {200: {"description": "The campaign", "headers": ETAG_HEADER}} | problem_responses(
        *statuses
    )


def etag(response: Response, campaign: dict[str, Any]) -> dict[str, Any]:
    """Set the campaign's ETag (its version, a strong validator) on ``response``."""
    version = campaign.get("version")
    if isinstance(version, int):
        response.headers["ETag"] = f'"{version}"'
    return campaign


def if_match_version(value: str | None) -> int | None:
    """The version an ``If-Match`` header names; None for no header or ``*`` (any)."""
    if value is None:
        return None
    text = value.strip()
    if not _IF_MATCH.match(text):
        raise errors.InvalidInput(
            'If-Match must be one ETag of this campaign, e.g. "3" (quotes included), or *'
        )
    return None if text == "*" else int(text.strip('"'))


@routes.patch(
    "/v1/campaigns/{campaign_id}",
    response_model=TransitionOut,
    tags=["campaigns"],
    responses=with_etag(*GUARDED, *BODY, 404, 409, 412),
)
async def edit_campaign(
    campaign_id: str,
    body: CampaignPatchIn,
    response: Response,
    caller: Writer,
    svc: Svc,
    # typed str (not Optional), so the document says a string, never null, when sent; its
    # form is checked here (a 422 problem naming it), as generators of headers do not
    # always honour a pattern
    if_match: Annotated[
        str,
        Header(
            max_length=100,
            description='Apply only to this version: the ETag of a GET, e.g. "3" with its '
            "quotes, or * (any version). Anything else is a 422.",
        ),
    ] = None,  # type: ignore[assignment]
) -> Any:
    """Change a campaign's name, dates, limits, discount, minimum order, sale windows or
    metadata. Only changes safe for its state apply: nothing of an ended campaign
    (``cannot_edit_ended``), no move of ``starts_at`` once it sells
    (``start_already_passed``), no limit below what is already used
    (``limit_below_usage``); all 409. Answered once every shard holds the new version, so
    the next redemption sees it. A change to the same values answers the campaign as it is
    (same version, no event)."""
    version = if_match_version(if_match)
    changes = body.changes()
    if not changes:
        raise errors.InvalidInput(
            "nothing to change: send name, starts_at, ends_at, limits, discount, min_order,"
            " windows or metadata"
        )
    out = unwrap(await svc.campaigns.edit.remote(campaign_id, changes, version, actor_of(caller)))
    return etag(response, out)
