"""Checkout, the hot path: validations, redemptions and reservations decided by the shard
actors through the micro-batcher, so concurrent redemptions cost one actor call per shard
instead of one per request.

:class:`Checkout` answers a checkout from its credentials to its response; its lanes
(:class:`CheckoutLane`, :mod:`serve.fast_lane`) serve well-formed POSTs to the three
checkout endpoints in front of the whole FastAPI stack, with the body decoded by msgspec.
The FastAPI routes (``serve.routes.checkout``) document the endpoints and answer what a
lane hands over, through the same :meth:`Checkout.answer`.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from fastapi.responses import Response

from engine import errors, metadata, orders
from engine.currencies import check_currency
from engine.orders import Item
from engine.shard_state import Outcome, RedeemRequest
from serve import metrics
from serve.auth import Forbidden, Principal, customer_only
from serve.customer_tags import CustomerTags
from serve.fast_lane import Lane, header
from serve.gate import Gate
from serve.idempotency import scoped_key
from serve.models import unstorable
from serve.permissions import authorize
from serve.problems import from_engine_error
from serve.promotions import Manifests, PromotionCatalog, applied_body, taken_by
from serve.promotions import apply as apply_promotions

log = logging.getLogger("voucher.gateway")


_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_Minor = Annotated[int, msgspec.Meta(ge=0, le=10**12)]


class ItemBody(msgspec.Struct, forbid_unknown_fields=True):
    sku: _Name
    quantity: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
    unit_price: _Minor
    product_id: _Name | None = None
    categories: Annotated[list[str], msgspec.Meta(max_length=20)] = []


class OrderBody(msgspec.Struct, forbid_unknown_fields=True):
    currency: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}\Z")]
    amount: _Minor | None = None
    id: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    shipping: _Minor | None = None
    items: Annotated[list[ItemBody], msgspec.Meta(max_length=500)] | None = None


class _Checkout(msgspec.Struct, forbid_unknown_fields=True):
    """The fast lane's CheckoutIn: it accepts a subset of what the pydantic model accepts
    (no coercion of "12" into 12), and whatever it refuses goes to the FastAPI route."""

    order: OrderBody
    code: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None
    customer_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None
    metadata: dict[str, Any] | None = None
    customer_tags: Annotated[list[str], msgspec.Meta(max_length=50)] | None = None
    apply_promotions: bool = False


_checkout_decoder = msgspec.json.Decoder(_Checkout)
_json_encoder = msgspec.json.Encoder()

# path -> (operation, action) of the checkout endpoints
HOT_ROUTES: dict[str, tuple[str, str]] = {
    "/v1/redemptions": ("redeem", "redemptions.create"),
    "/v1/validations": ("validate", "validations.create"),
    "/v1/reservations": ("reserve", "reservations.write"),
}


def decode_checkout(raw: bytes) -> _Checkout:
    """The fast lane's body; raises ``msgspec.ValidationError`` for one it does not take
    (what the FastAPI route then answers), unstorable text included.

    A decoded string can hold NUL or an unpaired surrogate only through a JSON escape
    (the decoder refuses raw control bytes and invalid UTF-8), so a body without a
    backslash is not scanned: that spares a 10-line cart's 40-odd names the scan."""
    body = _checkout_decoder.decode(raw)
    if b"\\" in raw and _unstorable(body):
        raise msgspec.ValidationError("unstorable text")
    if body.metadata is not None:
        try:
            metadata.check(body.metadata)
        except errors.InvalidMetadata:
            raise msgspec.ValidationError("invalid metadata") from None
    return body


def _unstorable(body: _Checkout) -> bool:
    items = body.order.items
    return (
        unstorable((body.code, body.customer_id, body.order.id))
        or bool(items and unstorable([(it.sku, it.product_id, it.categories) for it in items]))
        or bool(body.customer_tags and unstorable(body.customer_tags))
        or (body.metadata is not None and unstorable(body.metadata))
    )


def explained(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` (an answer as builtins) with its ``detail`` spread into ``items`` (the
    discount per order line) and ``shipping_discount``."""
    detail = d.pop("detail", None)
    if detail is None:
        d["items"] = []
        d["shipping_discount"] = 0
    else:
        d.update(msgspec.json.decode(detail))
    return d


def redemption_body(r: Any) -> dict[str, Any]:
    d = msgspec.to_builtins(r)
    d["balance"] = d.pop("balance_after", None)
    d["status"] = "rolled_back" if d["status"] == 1 else "redeemed"
    if d.get("metadata") is not None:
        d["metadata"] = msgspec.json.decode(d["metadata"])
    return explained(d)


def reservation_body(r: Any) -> dict[str, Any]:
    d = msgspec.to_builtins(r)
    d["state"] = ("held", "confirmed", "released", "expired")[d["state"]]
    d.pop("cart", None)
    if d.get("metadata") is not None:
        d["metadata"] = msgspec.json.decode(d["metadata"])
    return explained(d)


def _codeless(op: str, req: RedeemRequest, body: Any) -> dict[str, Any]:
    """The answer's own part for a checkout without a code (promotions only)."""
    if op == "validate":
        return {"code": None, "valid": True, "campaign_id": None, "discount_amount": 0, "items": [],
                "shipping_discount": 0, "balance": None, "reason": None, "message": None}
    return {
        "id": None, "code": None, "campaign_id": None, "customer_id": req.customer_id,
        "order_id": req.order_id, "order_amount": req.amount, "currency": req.currency,
        "discount_amount": 0, "items": [], "shipping_discount": 0, "balance": None,
        "status": "redeemed", "created_at": datetime.now(UTC).isoformat(), "rolled_back_at": None,
        "metadata": body.metadata,
    }


def _is_guess_failure(code: str) -> bool:
    """Failures a code-guessing attack produces: unknown or malformed codes, and someone
    else's code. Not the answers honest shoppers get in a flash sale (sold out, already
    used, limit reached): those must not lock a shop's customers out."""
    cls = errors.registry().get(code)
    return cls is not None and issubclass(
        cls, (errors.UnknownCode, errors.MalformedCode, errors.WrongCustomer)
    )


class Checkout:
    """A replica's checkout: the gate, then the shard's decision through the batcher."""

    def __init__(
        self,
        gate: Gate,
        batcher: Any,
        max_body_bytes: int,
        tags: CustomerTags | None = None,
        promotions: PromotionCatalog | None = None,
        manifests: Manifests | None = None,
    ) -> None:
        """``promotions`` and ``manifests`` serve ``apply_promotions`` (without them it is
        answered 503)."""
        self.gate = gate
        self.batcher = batcher
        self.max_body_bytes = max_body_bytes
        self.tags = tags
        self.promotions = promotions
        self.manifests = manifests

    def request(self, body: Any, p: Principal, key: str | None) -> RedeemRequest:
        """``body``: a CheckoutIn (FastAPI route) or a _Checkout (fast lane): same fields.
        The order is checked here (:func:`engine.orders.build`), before any shard sees it."""
        customer = body.customer_id
        tags = body.customer_tags
        if body.code is None and not getattr(body, "apply_promotions", False):
            raise errors.InvalidInput("code is required (or apply_promotions: true for promotions alone)")
        if customer_only(p):
            if customer is not None and customer != p.user_id:
                raise Forbidden("forbidden", "customers act only for themselves")
            if tags is not None:
                raise Forbidden("forbidden", "customer_tags come from the shop, not from the customer")
            customer = p.user_id
        o = body.order
        items: tuple[Item, ...] | None = None
        amount = o.amount
        if o.items:
            items = tuple(
                Item(it.sku, it.quantity, it.unit_price, it.product_id, tuple(it.categories))
                for it in o.items
            )
        if items is not None or o.shipping is not None or amount is None:
            amount = orders.build(currency=o.currency, amount=amount, shipping=o.shipping, items=items).amount
        else:
            check_currency(o.currency, "order.currency")
        stored = False
        if tags is not None:
            tags = orders.check_tags(tags)
        elif customer is not None and self.tags is not None:
            tags = self.tags.cached(customer)
            stored = tags is not None
        return RedeemRequest(
            code=body.code or "",
            amount=amount,
            currency=o.currency,
            customer_id=customer,
            order_id=o.id,
            idempotency_key=scoped_key(p, key),
            metadata=None if body.metadata is None else metadata.encoded(body.metadata),
            shipping=o.shipping,
            items=items,
            tags=tuple(tags) if tags is not None else None,
            stored_tags=stored,
        )

    async def answer(
        self,
        op: str,
        action: str,
        body: Any,
        authorization: str | None,
        api_key: str | None,
        idempotency_key: str | None,
        ip: str,
    ) -> Response:
        """A validation, redemption or reservation from credentials to answer: role, the
        caller's rate limits + the failed-attempt budgets + the API key's flag in ONE Redis
        call, then the shard's decision through the micro-batcher. Raises auth, rate-limit
        and input errors (answered as problems by the caller); rejections by the engine
        come back as problem responses."""
        gate = self.gate
        who = await gate.authenticate(authorization, api_key)
        authorize(who.principal, action)
        if op == "reserve" and getattr(body, "apply_promotions", False):
            raise errors.InvalidInput("apply_promotions is for validations and redemptions")
        req = self.request(body, who.principal, idempotency_key)
        headers: dict[str, str] = {"X-Gateway-Replica": gate.replica}
        decision = await gate.limit(
            ip, headers, who.principal, gate.guess_keys(ip, req.customer_id, who.principal), who.flag
        )
        p = await gate.confirm(who, decision, action)
        if p is not who.principal:
            req = self.request(body, p, idempotency_key)
        if getattr(body, "apply_promotions", False):
            return await self._with_promotions(op, body, req, ip, p, headers)
        out = await self._decide(op, req, ip, p)
        if out.rejection is not None:
            resp = from_engine_error(errors.from_code(out.rejection.error, out.rejection.message))
            resp.headers.update(headers)
            return resp
        return self._respond(op, out, headers)

    def _respond(
        self, op: str, out: Outcome, headers: dict[str, str], extra: dict[str, Any] | None = None
    ) -> Response:
        payload: dict[str, Any]
        if op == "redeem":
            status, payload = 201, redemption_body(out.redemption)
            headers["Location"] = f"/v1/redemptions/{payload['id']}"
        elif op == "validate":
            status, payload = 200, explained(msgspec.to_builtins(out.validation))
            payload["reason"] = payload.pop("error", None)
        else:
            status, payload = 201, reservation_body(out.reservation)
        if extra:
            payload.update(extra)
        return Response(
            _json_encoder.encode(payload), status_code=status, media_type="application/json", headers=headers
        )

    async def _with_promotions(
        self, op: str, body: Any, req: RedeemRequest, ip: str, p: Principal, headers: dict[str, str]
    ) -> Response:
        """A validation or redemption with ``apply_promotions``: the code first (when
        there is one), then every promotion that fits what it left (serve/promotions.py).
        The answer is the code's, with ``promotions`` and ``total_discount``."""
        if self.promotions is None or self.manifests is None:
            raise errors.Unavailable("promotions are not served here")
        catalog = await self.promotions.current()
        if (
            req.tags is None
            and req.customer_id is not None
            and self.tags is not None
            and any(c.rules is not None and c.rules.customer is not None for c in catalog)
        ):
            req = msgspec.structs.replace(req, tags=await self.tags.load(req.customer_id), stored_tags=True)
        out: Outcome | None = None
        taken = None
        if body.code is not None:
            out = await self._decide(op, req, ip, p)
            if out.rejection is not None:
                resp = from_engine_error(errors.from_code(out.rejection.error, out.rejection.message))
                resp.headers.update(headers)
                return resp
            if out.validation is not None and not out.validation.valid:
                return self._respond(op, out, headers, {"promotions": [], "total_discount": 0})
            taken = taken_by(out, req.order())

        async def decide(pop: str, preq: RedeemRequest) -> Outcome:
            return await self._decide(pop, preq, ip, p)

        fix = self.manifests.fix if op == "redeem" else None
        applied = await apply_promotions(op, req, taken, catalog, decide, fix)
        given = [applied_body(a) for a in applied]
        if out is not None:
            own = out.redemption.discount_amount if out.redemption is not None else 0
            if out.validation is not None:
                own = out.validation.discount_amount
            total = own + sum(a.discount_amount for a in applied)
            return self._respond(op, out, headers, {"promotions": given, "total_discount": total})
        if not applied and op == "redeem":
            resp = from_engine_error(errors.RuleNotMet("no promotion applies to this order"))
            resp.headers.update(headers)
            return resp
        payload = _codeless(op, req, body)
        payload.update(promotions=given, total_discount=sum(a.discount_amount for a in applied))
        if op == "validate" and not applied:
            payload.update(valid=False, reason="rule_not_met", message="no promotion applies to this order")
        return Response(
            _json_encoder.encode(payload),
            status_code=201 if op == "redeem" else 200,
            media_type="application/json",
            headers=headers,
        )

    async def _decide(self, op: str, req: RedeemRequest, ip: str, who: Principal) -> Outcome:
        t0 = time.perf_counter()
        out: Outcome = await self.batcher.submit(op, req)
        if (
            out.rejection is not None
            and out.rejection.error == errors.TagsNeeded.code
            and self.tags is not None
            and req.customer_id is not None
        ):
            # The campaign has customer rules: ask again with the stored customer's tags.
            tags = await self.tags.load(req.customer_id)
            req = msgspec.structs.replace(req, tags=tags, stored_tags=True)
            out = await self.batcher.submit(op, req)
        metrics.observe_decision(op, out, time.perf_counter() - t0)
        failed = out.rejection.error if out.rejection is not None else None
        if out.validation is not None and not out.validation.valid:
            failed = out.validation.error
        if log.isEnabledFor(logging.DEBUG):  # request_id comes from the context
            log.debug("%s decided: %s", op, failed or "ok", extra={"op": op, "outcome": failed or "ok"})
        if failed is not None and not req.promotion and _is_guess_failure(failed):
            await self.gate.penalize(ip, req.customer_id, who)
        return out


class CheckoutLane:
    """The fast lane (:mod:`serve.fast_lane`) of one checkout endpoint."""

    def __init__(self, checkout: Checkout, op: str, action: str) -> None:
        self.checkout, self.op, self.action = checkout, op, action

    def decode(self, raw: bytes, headers: dict[bytes, bytes]) -> _Checkout:
        idem = headers.get(b"idempotency-key")
        if idem is not None and b"\x00" in idem:
            raise msgspec.ValidationError("unstorable idempotency key")  # the route's 422
        return decode_checkout(raw)

    async def answer(self, body: _Checkout, headers: dict[bytes, bytes], scope: Any) -> Response:
        c = self.checkout
        return await c.answer(
            self.op,
            self.action,
            body,
            header(headers, b"authorization"),
            header(headers, b"x-api-key"),
            header(headers, b"idempotency-key"),
            c.gate.client(scope),
        )


def lanes(checkout: Checkout) -> dict[str, Lane]:
    """Path -> fast lane of the checkout endpoints."""
    return {path: CheckoutLane(checkout, op, action) for path, (op, action) in HOT_ROUTES.items()}
