"""The HTTP shapes of orders with lines and of campaign rules: what checkout sends
(``order.items``, ``order.shipping``, ``customer_tags``), what a campaign's ``rules`` and
``discount`` accept, and how an answer explains its discount. The rules themselves are in
``engine/rules.py`` and ``engine/pricing.py``; these models only carry them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from serve.strict import Strict


class ItemIn(Strict):
    sku: str = Field(min_length=1, max_length=128)
    quantity: int = Field(ge=1, le=1_000_000)
    unit_price: int = Field(ge=0, le=10**12, description="minor units (cents) per unit")
    product_id: str | None = Field(default=None, min_length=1, max_length=128)
    categories: list[str] = Field(default_factory=list, max_length=20)


class ItemFilterIn(Strict):
    """Matches a line by sku, product or any of its categories (one suffices)."""

    skus: list[str] = Field(default_factory=list, max_length=1000)
    products: list[str] = Field(default_factory=list, max_length=1000)
    categories: list[str] = Field(default_factory=list, max_length=1000)


class ItemConditionIn(Strict):
    any_of: ItemFilterIn | None = None
    min_quantity: int | None = Field(default=None, ge=0, le=1_000_000)
    min_subtotal: int | None = Field(default=None, ge=0, le=10**12)


class CustomerConditionIn(Strict):
    tags_any: list[str] = Field(default_factory=list, max_length=1000)
    tags_none: list[str] = Field(default_factory=list, max_length=1000)


class RulesIn(Strict):
    """Every rule must hold for the campaign to apply (``engine/rules.py``)."""

    min_order: int | None = Field(default=None, ge=0, le=10**12)
    max_order: int | None = Field(default=None, ge=0, le=10**12)
    items: list[ItemConditionIn] = Field(default_factory=list, max_length=20)
    exclude: ItemFilterIn | None = None
    customer: CustomerConditionIn | None = None


class DiscountIn(Strict):
    """``percent`` (value 1..100), ``amount`` (minor units), ``fixed_price`` (the target
    costs value), ``free_units`` (value units free; ``sku`` picks which),
    ``free_shipping`` (no value), on ``target`` order, items, cheapest_item or shipping."""

    kind: Literal["percent", "amount", "fixed_price", "free_units", "free_shipping"]
    value: int | None = Field(default=None, ge=0, le=10**12, description="required but for free_shipping (the engine says which values fit the kind)")
    max: int | None = Field(default=None, ge=1, le=10**12)
    target: Literal["order", "items", "cheapest_item", "shipping"] | None = Field(
        default=None, description="order when not given (shipping for free_shipping)"
    )
    sku: str | None = Field(default=None, min_length=1, max_length=128)


class LineOut(BaseModel):
    line: int = Field(description="index of the line in order.items")
    sku: str
    discount: int
