"""The HTTP shapes of qualification (``POST /v1/qualifications``): the customer and their
order in, the offers that apply out. The order is checkout's own :class:`OrderIn`, so every
field checkout takes is taken here the same way."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.orders import MAX_TAGS
from engine.qualification import DEFAULT_OFFERS, MAX_OFFERS
from serve.models import OrderIn, Strict

Tag = Annotated[str, Field(min_length=1, max_length=128, description="no control characters")]


class QualificationIn(Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"customer_id": "cust-42", "order": {"amount": 4999, "currency": "EUR"},
                 "customer_tags": ["vip"], "limit": 10}
            ]
        }
    )

    customer_id: str = Field(min_length=1, max_length=128)
    order: OrderIn
    customer_tags: list[Tag] | None = Field(
        default=None,
        max_length=MAX_TAGS,
        description="the customer's tags for customer rules, from a trusted caller (not a "
        "customer); without them the stored customer's tags are used",
    )
    limit: int = Field(
        default=DEFAULT_OFFERS, ge=1, le=MAX_OFFERS,
        description="at most this many offers, the best (has_more says whether there were more)",
    )


class OfferLineOut(BaseModel):
    line: int = Field(description="index of the line in order.items")
    sku: str
    discount: int


class OfferOut(BaseModel):
    kind: Literal["shared_code", "unique_code", "promotion"] = Field(
        description="promotion: applied by checkout without a code (apply_promotions)"
    )
    campaign_id: str
    campaign_name: str
    campaign_type: str
    code: str | None = Field(description="what to send at checkout (none for a promotion)")
    discount_amount: int = Field(description="minor units; the lines' part plus shipping_discount")
    items: list[OfferLineOut] = Field(description="how the discount falls on the order's lines")
    shipping_discount: int
    balance: int | None = Field(default=None, description="a gift card's balance")


class QualificationOut(BaseModel):
    customer_id: str
    currency: str
    offers: list[OfferOut] = Field(description="largest discount first; ties by campaign id")
    has_more: bool = Field(description="more offers apply than the limit let through")
