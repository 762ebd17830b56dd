"""Checkout: validations, redemptions and reservations, and what follows them (rollback,
confirm, release).

The first three are answered by ``serve.checkout.Checkout``: these routes document them
and answer what its fast lane hands over (bodies it does not decode, for one); they come
first in the app's route table, since Serve matches every request against the routes, in
order, to name it in its metrics.
"""

from typing import Annotated, Any

from fastapi import Request

from serve.auth import Principal
from serve.checkout import redemption_body, reservation_body
from serve.idempotency import IdempotencyKey, scoped_key
from serve.models import CheckoutIn, RedemptionOut, ReservationOut, ValidationOut
from serve.problems import problem_responses
from serve.routes.deps import CHECKOUT, Svc, require, router

routes = router()

_HOT: dict[str, Any] = dict(tags=["vouchers"], responses=problem_responses(*CHECKOUT))


async def _answer(
    svc: Svc, op: str, action: str, body: CheckoutIn, request: Request, key: str | None
) -> Any:
    return await svc.checkout.answer(
        op,
        action,
        body,
        request.headers.get("authorization"),
        request.headers.get("x-api-key"),
        key,
        svc.gate.client(request.scope),
    )


@routes.post("/v1/validations", response_model=ValidationOut, **_HOT)
async def validate(body: CheckoutIn, request: Request, svc: Svc) -> Any:
    return await _answer(svc, "validate", "validations.create", body, request, None)


@routes.post("/v1/redemptions", status_code=201, response_model=RedemptionOut, **_HOT)
async def redeem(
    body: CheckoutIn, request: Request, svc: Svc, idempotency_key: IdempotencyKey = None
) -> Any:
    return await _answer(svc, "redeem", "redemptions.create", body, request, idempotency_key)


@routes.post("/v1/reservations", status_code=201, response_model=ReservationOut, **_HOT)
async def reserve(
    body: CheckoutIn, request: Request, svc: Svc, idempotency_key: IdempotencyKey = None
) -> Any:
    return await _answer(svc, "reserve", "reservations.write", body, request, idempotency_key)


@routes.post("/v1/redemptions/{redemption_id}/rollback", response_model=RedemptionOut, **_HOT)
async def rollback(
    redemption_id: str,
    caller: Annotated[Principal, require("redemptions.rollback")],
    svc: Svc,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    key = scoped_key(caller, idempotency_key)
    return redemption_body(await svc.engine.rollback(redemption_id, key))


@routes.post(
    "/v1/reservations/{reservation_id}/confirm", status_code=201, response_model=RedemptionOut, **_HOT
)
async def confirm(
    reservation_id: str,
    caller: Annotated[Principal, require("reservations.write")],
    svc: Svc,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    key = scoped_key(caller, idempotency_key)
    return redemption_body(await svc.engine.confirm(reservation_id, key))


@routes.post("/v1/reservations/{reservation_id}/release", response_model=ReservationOut, **_HOT)
async def release(
    reservation_id: str,
    caller: Annotated[Principal, require("reservations.write")],
    svc: Svc,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    key = scoped_key(caller, idempotency_key)
    return reservation_body(await svc.engine.release(reservation_id, key))
