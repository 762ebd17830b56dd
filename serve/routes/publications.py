"""Publications: give one customer a campaign's code now, optionally messaged to them."""

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Response
from pydantic import BaseModel, Field

from serve.auth import Principal, actor_of
from serve.models import Strict
from serve.problems import problem_responses
from serve.routes.deps import BODY, GUARDED, Svc, require, router, unwrap

routes = router()

Publisher = Annotated[Principal, require("publications.create")]


class PublicationIn(Strict):
    """Whom to give a code, and the channels to send it on (none: the code is only given;
    each channel once, a repeated one counts once)."""

    customer_id: str = Field(min_length=1, max_length=128)
    channels: list[Literal["email", "sms", "push"]] = Field(default_factory=list, max_length=3)


class PublicationDelivery(BaseModel):
    """The message on one requested channel: ``id`` in ``GET .../deliveries`` and its
    ``status`` (queued, sending, sent, failed, dead), or no message and why
    (``skipped_no_address``, ``skipped_no_consent``)."""

    channel: Literal["email", "sms", "push"]
    id: str | None = None
    status: str


class PublicationOut(BaseModel):
    id: str
    campaign_id: str
    customer_id: str
    code: str
    channels: list[Literal["email", "sms", "push"]]
    deliveries: list[PublicationDelivery]
    created_at: datetime
    created: bool = Field(description="true on the request that published, false on a repeat")


@routes.post(
    "/v1/campaigns/{campaign_id}/publications",
    status_code=201,
    response_model=PublicationOut,
    tags=["campaigns"],
    responses={
        200: {"model": PublicationOut, "description": "Published earlier: the same publication"},
        **problem_responses(*GUARDED, *BODY, 404, 409, 503),
    },
)
async def publish(
    campaign_id: str, body: PublicationIn, response: Response, caller: Publisher, svc: Svc
) -> Any:
    """Give one customer a code of the campaign now: 201 with the code, or, when the
    campaign published to this customer before, 200 with that same publication (also under
    concurrent repeats; ``channels`` of a repeat are not sent again). A customer who holds a
    code of the campaign already (an issuance, an import) is published that code. With
    ``channels``, one message per channel goes through the delivery pipeline, to customers
    who gave that address and consented to it; ``deliveries`` says, per channel, what
    happened. A shared-code campaign publishes its shared code. The campaign must be
    active (or not started yet) and have a code left. The publication, its
    ``voucher.published`` event, its messages and an audit entry naming the caller are
    written in one transaction."""
    out = unwrap(
        await svc.issuance.publish.remote(
            campaign_id, body.customer_id, list(body.channels), actor_of(caller)
        )
    )
    if not out["created"]:
        response.status_code = 200
    return out
