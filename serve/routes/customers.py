"""Customers: create, list, read, bulk import, and issuing a campaign's codes to them."""

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Query, Request, Response

from engine import errors
from engine import metadata as metadata_rules
from serve.auth import Principal, actor_of
from serve.models import (
    CustomerIn,
    CustomerOut,
    CustomerPatchIn,
    ImportOut,
    IssuanceIn,
    IssuanceJobOut,
)
from serve.problems import problem_responses
from serve.routes.deps import BODY, GUARDED, Svc, require, router, unwrap

routes = router()

Reader = Annotated[Principal, require("customers.read")]
Writer = Annotated[Principal, require("customers.write")]
Issuer = Annotated[Principal, require("issuance.create")]


@routes.post(
    "/v1/customers",
    status_code=201,
    response_model=CustomerOut,
    tags=["customers"],
    responses=problem_responses(*GUARDED, *BODY, 409),
)
async def create_customer(body: CustomerIn, response: Response, caller: Writer, svc: Svc) -> Any:
    c = unwrap(
        await svc.customers.create.remote(body.model_dump(exclude_none=True), actor_of(caller))
    )
    response.headers["Location"] = f"/v1/customers/{quote(c['id'], safe='')}"
    return c


@routes.get("/v1/customers", tags=["customers"], responses=problem_responses(*GUARDED, 422))
async def list_customers(
    caller: Reader,
    svc: Svc,
    tag: str | None = Query(None, max_length=64),
    after: str | None = Query(None, max_length=128, description="last id of the previous page"),
    limit: int = Query(100, ge=1, le=1000),
    metadata: str | None = Query(
        None,
        max_length=512,
        description="key=value: customers whose metadata holds that key with that value "
        "(value read as JSON when it is a JSON scalar, else as a string)",
    ),
) -> Any:
    meta = _metadata_filter(metadata) if metadata is not None else None
    return unwrap(
        await svc.customers.list.remote(tag.lower() if tag else None, after, limit, meta)
    )


def _metadata_filter(text: str) -> dict[str, Any]:
    """``key=value`` as the object a customer's metadata must contain; a value JSON reads
    as no JSON value (``1e999``, ``NaN``) is a 422."""
    meta = metadata_rules.parse_filter(text)
    try:
        metadata_rules.encoded(meta)
    except ValueError:
        raise errors.InvalidMetadata("the metadata filter's value is not a finite JSON value") from None
    return meta


@routes.get(
    "/v1/customers/{customer_id}",
    response_model=CustomerOut,
    tags=["customers"],
    responses=problem_responses(*GUARDED, 404, 422),
)
async def get_customer(customer_id: str, caller: Reader, svc: Svc) -> Any:
    return unwrap(await svc.customers.get.remote(customer_id))


@routes.patch(
    "/v1/customers/{customer_id}",
    response_model=CustomerOut,
    tags=["customers"],
    responses=problem_responses(*GUARDED, *BODY, 404, 409),
)
async def update_customer(customer_id: str, body: CustomerPatchIn, caller: Writer, svc: Svc) -> Any:
    """Change a customer: the fields given (``null`` clears one), validated as the whole
    record, with an audit entry. ``user_id`` links a user account to this customer, so its
    "my vouchers" (``GET /v1/users/me/vouchers``) lists the customer's codes: 422 when no
    such user exists, 409 when it is linked to another customer."""
    changes = {name: getattr(body, name) for name in body.model_fields_set}
    return unwrap(await svc.customers.update.remote(customer_id, changes, actor_of(caller)))


async def holds(svc: Any, caller: Principal, customer_id: str | None) -> bool:
    """Whether a code held by ``customer_id`` is the caller's own: the caller's own id, or
    the customer record linked to the caller's user account."""
    if customer_id is None:
        return False
    if customer_id == caller.user_id:
        return True
    return bool(unwrap(await svc.customers.linked_customer.remote(caller.user_id)) == customer_id)


@routes.post(
    "/v1/customers/import",
    response_model=ImportOut,
    tags=["customers"],
    responses=problem_responses(*GUARDED, 400, 413, 415, 422),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "text/csv": {"schema": {"type": "string"}},
                "application/x-ndjson": {"schema": {"type": "string"}},
            },
        }
    },
)
async def import_customers(request: Request, caller: Writer, svc: Svc) -> Any:
    """Bulk upsert from CSV (header line naming the columns) or JSON lines, read as it
    streams in and written in batches. Valid rows land; each refused row is reported
    with its line, field and reason."""
    from engine.customers import parser_for
    from store.customers import import_stream

    parser_for(request.headers.get("content-type"))  # 415 before reading anything
    return await import_stream(
        await svc.import_db(),
        request.headers.get("content-type"),
        request.stream(),
        svc.settings.import_batch,
        actor_of(caller),
    )


@routes.post(
    "/v1/campaigns/{campaign_id}/issuance",
    status_code=202,
    response_model=IssuanceJobOut,
    tags=["campaigns"],
    responses=problem_responses(*GUARDED, *BODY, 404, 409),
)
async def issue(campaign_id: str, body: IssuanceIn, response: Response, caller: Issuer, svc: Svc) -> Any:
    """Give every selected customer a code (the same one on a re-run) and queue one
    message per customer and consented channel; progress at ``GET /v1/jobs/{id}``."""
    job = unwrap(
        await svc.issuance.start.remote(
            campaign_id, body.selection.model_dump(exclude_none=True), list(body.channels)
        )
    )
    response.headers["Location"] = f"/v1/jobs/{job['id']}"
    return job
