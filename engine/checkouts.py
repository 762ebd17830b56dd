"""A checkout as a shard decides it: the request that crosses the actor boundary, what
its idempotency key's fingerprint covers, and the bucket it is routed by."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from engine.codes import normalize
from engine.orders import Item, Order
from engine.promotions import Taken
from engine.promotions import is_key as is_promotion_key
from engine.routing import bucket_of

MAX_CODE_LEN = 128


class RedeemRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    """One checkout as a shard decides it. Fields left at their defaults are not sent, so
    a cart's fields cost an amount-only order nothing on the actor boundary."""

    code: str
    amount: int
    currency: str
    customer_id: str | None = None
    order_id: str | None = None
    idempotency_key: str | None = None
    metadata: str | None = None  # the redemption's metadata as compact JSON
    shipping: int | None = None
    items: tuple[Item, ...] | None = None  # checked by engine.orders.build at the edge
    tags: tuple[str, ...] | None = None  # the customer's tags, for customer rules
    #: the tags are the stored customer's, looked up by the gateway (not the caller's):
    #: they are not part of what the idempotency key's fingerprint identifies
    stored_tags: bool = False
    #: a promotion's decision (``code`` is its key, engine/promotions.py) and what the
    #: discounts given before it on the same order took
    promotion: bool = False
    taken: Taken | None = None

    def order(self) -> Order:
        return Order(self.amount, self.currency, self.shipping, self.items or ())

    def has_cart(self) -> bool:
        """Whether the order says more than an amount (its answer then explains itself)."""
        return bool(self.items) or self.shipping is not None


class _Sent(msgspec.Struct, frozen=True):
    """A checkout's first seven fields, encoded as a RedeemRequest of amount-only orders
    always was: the fingerprints of keys recorded by earlier versions stay valid."""

    code: str
    amount: int
    currency: str
    customer_id: str | None
    order_id: str | None
    idempotency_key: str | None
    metadata: str | None


def as_sent(req: Any) -> Any:
    """What a request's fingerprint covers: the request as its caller sent it (without the
    tags the gateway looked up), an amount-only order in the encoding it always had."""
    if not isinstance(req, RedeemRequest):
        return req
    base = _Sent(req.code, req.amount, req.currency, req.customer_id, req.order_id, req.idempotency_key, req.metadata)
    tags = None if req.stored_tags else req.tags
    if req.shipping is None and not req.items and tags is None and not req.promotion and req.taken is None:
        return base
    return (base, req.shipping, req.items, tags, req.promotion, req.taken)


def fingerprint(op: str, payload: Any) -> bytes:
    """Identifies a request body, so a reused idempotency key with another body is caught
    (a checkout's as :func:`as_sent` gives it)."""
    return hashlib.blake2b(msgspec.msgpack.encode((op, as_sent(payload))), digest_size=16).digest()


def route_bucket(raw_code: Any) -> int:
    """The bucket a (possibly malformed) code is routed by; malformed codes go to bucket 0,
    where the shard rejects them with a clear error."""
    if not isinstance(raw_code, str) or not raw_code.strip() or len(raw_code) > MAX_CODE_LEN:
        return 0
    if is_promotion_key(raw_code):
        return bucket_of(raw_code)  # a promotion's key is used as it is, never normalised
    return bucket_of(normalize(raw_code))
