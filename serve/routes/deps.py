"""What every router shares: the replica's services, the caller a route requires, the
problem statuses routes document, and ``unwrap`` (a deployment's returned failure raised as
its engine error, ``actors.calls``).

A route states the action it needs in its signature, and receives the caller::

    CampaignWriter = Annotated[Principal, require("campaigns.write")]

    @router.post("/v1/campaigns")
    async def create_campaign(body: CampaignIn, caller: CampaignWriter, svc: Svc) -> Any: ...

:func:`require` is a FastAPI dependency (``serve.permissions.PERMISSIONS`` maps actions to roles;
the gate also charges the caller's rate limits and sets their headers on the response).
Routers use :class:`GuardedRoute`, which solves it once the route's parameters and body are
valid: a malformed request is a 422 whoever sends it, and costs no rate limit.
"""

import inspect
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, get_args, get_origin

from fastapi import APIRouter, Depends, Request, Response
from fastapi.params import Depends as DependsParam
from fastapi.routing import APIRoute

from actors.calls import unwrap
from serve.auth import Principal
from serve.context import Services

__all__ = ["BODY", "CHECKOUT", "GUARDED", "GuardedRoute", "Svc", "require", "router", "unwrap"]

# The problem statuses each route documents, by what the route does (every route lists the
# statuses it can answer, so clients and the schema fuzz see the truth).
GUARDED = (401, 403, 429)  # behind require(): credentials, roles, rate limit
BODY = (400, 413, 422)  # reads a JSON body: malformed, too large, invalid
CHECKOUT = (*GUARDED, *BODY, 404, 409, 410, 503)  # the hot path, decided by the shards

Guard = Callable[[Request, Response], Awaitable[Principal]]


async def services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


Svc = Annotated[Services, Depends(services)]


def require(action: str) -> Any:
    """The dependency giving the caller allowed to perform ``action`` (401, 403 or 429
    otherwise)."""

    async def guard(request: Request, response: Response) -> Principal:
        gate = request.app.state.services.gate
        principal: Principal = await gate.guard(request, response, action)
        return principal

    guard.action = action  # type: ignore[attr-defined]
    return Depends(guard)


def _guard_in(annotation: Any) -> Guard | None:
    if get_origin(annotation) is not Annotated:
        return None
    for meta in get_args(annotation)[1:]:
        if isinstance(meta, DependsParam) and hasattr(meta.dependency, "action"):
            return meta.dependency
    return None


def _guarded_after_validation(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """``endpoint`` with its :func:`require` parameter solved in its body, after FastAPI
    validated everything else (the signature FastAPI sees has Request and Response in its
    place)."""
    sig = inspect.signature(endpoint, eval_str=True)
    guards = [(n, g) for n, p in sig.parameters.items() if (g := _guard_in(p.annotation))]
    if not guards:
        return endpoint
    [(caller, guard)] = guards
    params = [p.replace(kind=p.KEYWORD_ONLY) for p in sig.parameters.values() if p.name != caller]
    added = []
    names = {}
    for cls, name in ((Request, "guard_request"), (Response, "guard_response")):
        mine = next((p.name for p in params if p.annotation is cls), None)
        if mine is None:
            mine = name
            added.append(name)
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=cls))
        names[cls] = mine

    async def guarded(**values: Any) -> Any:
        request, response = values[names[Request]], values[names[Response]]
        for name in added:
            del values[name]
        values[caller] = await guard(request, response)
        return await endpoint(**values)

    guarded.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    guarded.__name__ = endpoint.__name__
    guarded.__qualname__ = endpoint.__qualname__
    guarded.__doc__ = endpoint.__doc__
    guarded.__module__ = endpoint.__module__
    return guarded


class GuardedRoute(APIRoute):
    """An APIRoute whose :func:`require` parameter is solved after its other parameters
    and its body are validated."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, _guarded_after_validation(endpoint), **kwargs)


def router() -> APIRouter:
    return APIRouter(route_class=GuardedRoute)
