"""Qualification: every offer that would apply now to a customer's order (shared codes and
flash sales, the customer's own codes and gift cards, promotions), each with its discount,
best first.

Decided by every shard at once (``actors.client.VoucherEngine.qualify``, within the
decision deadline: a shard that cannot answer makes it a 503 with Retry-After, never a
partial list), each with :mod:`engine.qualification`: the rules a redemption applies.

A well-formed request takes the fast lane (:class:`QualificationLane`,
:mod:`serve.fast_lane`): its body decoded by msgspec, in front of FastAPI; the route below
documents the endpoint and answers what the lane hands over, through the same
:func:`answer`.
"""

from typing import Annotated, Any

import msgspec
from fastapi import Response

from engine import orders
from engine.orders import MAX_TAGS, Item, Order
from engine.qualification import DEFAULT_OFFERS, MAX_OFFERS, QualifyRequest, Ranked
from serve.auth import Forbidden, Principal, customer_only
from serve.checkout import OrderBody
from serve.context import Services
from serve.fast_lane import Lane, header
from serve.models import OrderIn, unstorable
from serve.problems import problem_responses
from serve.qualification_models import QualificationIn, QualificationOut
from serve.routes.deps import BODY, GUARDED, Svc, require, router

routes = router()


class _Answer(msgspec.Struct):
    """:class:`QualificationOut` as msgspec writes it: the offers are the JSON their shards
    wrote (:class:`engine.qualification.Ranked`), put in as they are."""

    customer_id: str
    currency: str
    offers: list[msgspec.Raw]
    has_more: bool


_Text = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class QualificationBody(msgspec.Struct, forbid_unknown_fields=True):
    """The lane's :class:`QualificationIn`: it takes a subset of what the route takes (no
    coercion), and whatever it refuses goes to the route."""

    customer_id: _Text
    order: OrderBody
    customer_tags: Annotated[list[_Text], msgspec.Meta(max_length=MAX_TAGS)] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_OFFERS)] = DEFAULT_OFFERS


Qualifier = Annotated[Principal, require("qualifications.create")]
_json = msgspec.json.Encoder()


def order_of(o: OrderIn | OrderBody) -> Order:
    """The engine's order from the body's order (the route's :class:`OrderIn` or the
    lane's :class:`OrderBody`), checked as checkout checks it (:func:`engine.orders.build`)."""
    items = None
    if o.items:
        items = [
            Item(it.sku, it.quantity, it.unit_price, it.product_id, tuple(it.categories))
            for it in o.items
        ]
    return orders.build(currency=o.currency, amount=o.amount, shipping=o.shipping, items=items)


def sent_tags(caller: Principal, body: QualificationIn | QualificationBody) -> tuple[str, ...] | None:
    """A trusted caller's ``customer_tags``; a customer may not state their own (403)."""
    if body.customer_tags is None:
        return None
    if customer_only(caller):
        raise Forbidden("forbidden", "customer_tags come from the shop, not from the customer")
    return orders.check_tags(body.customer_tags)


async def _qualified(svc: Svc, req: QualifyRequest) -> Ranked:
    """The shards' answer. Without tags sent, the campaigns' customer rules see the stored
    customer's (``serve.customer_tags``, as checkout): the replica's cached ones ride along
    with the request; when none were cached and a campaign with customer rules was a
    candidate, they are read and every shard asked again."""
    deadline = svc.settings.decision_deadline_s
    send = getattr(svc.checkout.batcher, "direct", None)  # the shards' direct lines
    stored = svc.checkout.tags
    if req.tags is None and stored is not None:
        cached = stored.cached(req.customer_id)
        if cached is not None:
            req = msgspec.structs.replace(req, tags=cached)
    answer: Ranked = await svc.engine.qualify(req, deadline, send)
    if answer.tags_needed and req.tags is None and stored is not None:
        tags = await stored.load(req.customer_id)
        answer = await svc.engine.qualify(msgspec.structs.replace(req, tags=tags), deadline, send)
    return answer


async def answer(svc: Services, caller: Principal, body: QualificationIn | QualificationBody) -> Response:
    """The answer to a qualification from ``caller``, allowed and within its limits."""
    if customer_only(caller) and body.customer_id != caller.user_id:
        raise Forbidden("forbidden", "customers qualify only themselves")
    limit = body.limit
    # one more than asked: whether there are more is then known without pricing them all
    req = QualifyRequest(body.customer_id, order_of(body.order), sent_tags(caller, body), limit + 1)
    offers = (await _qualified(svc, req)).offers
    out = _Answer(
        body.customer_id, req.order.currency, [msgspec.Raw(o[3]) for o in offers[:limit]], len(offers) > limit
    )
    return Response(_json.encode(out), media_type="application/json")


@routes.post(
    "/v1/qualifications",
    response_model=QualificationOut,
    tags=["vouchers"],
    responses=problem_responses(*GUARDED, *BODY, 503),
)
async def qualify(body: QualificationIn, caller: Qualifier, svc: Svc) -> Any:
    """Every offer that applies now to ``customer_id``'s order, largest discount first."""
    return await answer(svc, caller, body)


_decoder = msgspec.json.Decoder(QualificationBody)


class QualificationLane:
    """POST /v1/qualifications in front of FastAPI (:mod:`serve.fast_lane`): the caller
    allowed and within its limits as :func:`serve.routes.deps.require` has it, then
    :func:`answer`."""

    action = "qualifications.create"

    def __init__(self, svc: Services) -> None:
        self.svc = svc

    def decode(self, raw: bytes, headers: dict[bytes, bytes]) -> QualificationBody:
        body = _decoder.decode(raw)
        # NUL or an unpaired surrogate can only come through a JSON escape
        if b"\\" in raw and unstorable(msgspec.json.decode(raw)):
            raise msgspec.ValidationError("unstorable text")  # the route's 422
        return body

    async def answer(self, body: QualificationBody, headers: dict[bytes, bytes], scope: Any) -> Response:
        gate = self.svc.gate
        sent: dict[str, str] = {}
        caller = await gate.admit(
            header(headers, b"authorization"), header(headers, b"x-api-key"), gate.client(scope), sent, self.action
        )
        resp = await answer(self.svc, caller, body)
        resp.headers.update(sent)
        return resp


def lanes(svc: Services) -> dict[str, Lane]:
    return {"/v1/qualifications": QualificationLane(svc)}
