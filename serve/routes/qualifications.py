"""Qualification: every offer that would apply now to a customer's order (shared codes and
flash sales, the customer's own codes and gift cards, promotions), each with its discount,
best first.

Decided by every shard at once (``actors.client.VoucherEngine.qualify``, within the
decision deadline: a shard that cannot answer makes it a 503 with Retry-After, never a
partial list), each with :mod:`engine.qualification`: the rules a redemption applies.
"""

from typing import Annotated, Any

import msgspec
from fastapi import Response

from engine import orders
from engine.orders import Item, Order
from engine.qualification import Qualified, QualifyRequest
from serve.auth import Forbidden, Principal, customer_only
from serve.models import OrderIn
from serve.problems import problem_responses
from serve.qualification_models import QualificationIn, QualificationOut
from serve.routes.deps import BODY, GUARDED, Svc, require, router

routes = router()


class _Line(msgspec.Struct):
    line: int
    sku: str
    discount: int


class _Offer(msgspec.Struct):
    kind: str
    campaign_id: str
    campaign_name: str
    campaign_type: str
    code: str | None
    discount_amount: int
    items: list[_Line]
    shipping_discount: int
    balance: int | None


class _Answer(msgspec.Struct):
    """:class:`QualificationOut` as msgspec writes it (a long list of offers costs no
    pydantic validation on its way out)."""

    customer_id: str
    currency: str
    offers: list[_Offer]

Qualifier = Annotated[Principal, require("qualifications.create")]
_json = msgspec.json.Encoder()


def order_of(o: OrderIn) -> Order:
    """The engine's order from checkout's :class:`OrderIn`, checked as checkout checks it
    (:func:`engine.orders.build`)."""
    items = None
    if o.items:
        items = [
            Item(it.sku, it.quantity, it.unit_price, it.product_id, tuple(it.categories))
            for it in o.items
        ]
    return orders.build(currency=o.currency, amount=o.amount, shipping=o.shipping, items=items)


def sent_tags(caller: Principal, body: QualificationIn) -> tuple[str, ...] | None:
    """A trusted caller's ``customer_tags``; a customer may not state their own (403)."""
    if body.customer_tags is None:
        return None
    if customer_only(caller):
        raise Forbidden("forbidden", "customer_tags come from the shop, not from the customer")
    return orders.check_tags(body.customer_tags)


async def _qualified(svc: Svc, req: QualifyRequest) -> Qualified:
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
    answer: Qualified = await svc.engine.qualify(req, deadline, send)
    if answer.tags_needed and req.tags is None and stored is not None:
        tags = await stored.load(req.customer_id)
        answer = await svc.engine.qualify(msgspec.structs.replace(req, tags=tags), deadline, send)
    return answer


@routes.post(
    "/v1/qualifications",
    response_model=QualificationOut,
    tags=["vouchers"],
    responses=problem_responses(*GUARDED, *BODY, 503),
)
async def qualify(body: QualificationIn, caller: Qualifier, svc: Svc) -> Any:
    """Every offer that applies now to ``customer_id``'s order, largest discount first."""
    if customer_only(caller) and body.customer_id != caller.user_id:
        raise Forbidden("forbidden", "customers qualify only themselves")
    req = QualifyRequest(body.customer_id, order_of(body.order), sent_tags(caller, body), body.limit)
    offers = (await _qualified(svc, req)).offers
    out = _Answer(body.customer_id, req.order.currency, msgspec.convert(offers, list[_Offer], from_attributes=True))
    return Response(_json.encode(out), media_type="application/json")
