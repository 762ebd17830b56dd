"""Qualification: every offer that would apply now to a customer's order (shared codes and
flash sales, the customer's own codes and gift cards), each with its discount, best first.

Decided by every shard at once (``actors.client.VoucherEngine.qualify``, within the
decision deadline: a shard that cannot answer makes it a 503 with Retry-After, never a
partial list), each with :mod:`engine.qualification`: the rules a redemption applies.
"""

from typing import Annotated, Any

import msgspec
from fastapi import Response

from engine import orders
from engine.orders import Item, Order
from engine.qualification import QualifyRequest
from serve.auth import Forbidden, Principal, customer_only
from serve.models import OrderIn
from serve.problems import problem_responses
from serve.qualification_models import QualificationIn, QualificationOut
from serve.routes.deps import BODY, GUARDED, Svc, require, router

routes = router()

Qualifier = Annotated[Principal, require("qualifications.create")]
_json = msgspec.json.Encoder()


def order_of(o: OrderIn) -> Order:
    """The engine's order from checkout's :class:`OrderIn`, checked by
    :func:`engine.orders.build` (lines and shipping when the model carries them)."""
    lines = getattr(o, "items", None)
    items = None
    if lines:
        items = [
            Item(
                sku=line.sku,
                quantity=line.quantity,
                unit_price=line.unit_price,
                product_id=getattr(line, "product_id", None),
                categories=tuple(getattr(line, "categories", None) or ()),
            )
            for line in lines
        ]
    return orders.build(
        currency=o.currency, amount=o.amount, shipping=getattr(o, "shipping", None), items=items
    )


def customer_tags(caller: Principal, body: QualificationIn) -> tuple[str, ...] | None:
    """The tags the campaigns' customer rules see: a trusted caller's ``customer_tags``. A
    customer may not state their own (403); the stored customer's tags go here for them
    and for callers that send none."""
    if body.customer_tags is None:
        return None
    if customer_only(caller):
        raise Forbidden("forbidden", "customers cannot state their own tags")
    return orders.check_tags(body.customer_tags)


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
    req = QualifyRequest(body.customer_id, order_of(body.order), customer_tags(caller, body), body.limit)
    offers = await svc.engine.qualify(req, svc.settings.decision_deadline_s)
    out = {
        "customer_id": body.customer_id,
        "currency": req.order.currency,
        "offers": [
            {
                "kind": o.kind,
                "campaign_id": o.campaign_id,
                "campaign_name": o.campaign_name,
                "campaign_type": o.campaign_type,
                "code": o.code,
                "discount_amount": o.discount_amount,
                "items": [{"line": ln.line, "sku": ln.sku, "discount": ln.discount} for ln in o.items],
                "shipping_discount": o.shipping_discount,
                "balance": o.balance,
            }
            for o in offers
        ],
    }
    # encoded here: a long list of offers is not validated again on its way out
    return Response(_json.encode(out), media_type="application/json")
