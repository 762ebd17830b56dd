"""Accounts: registration, login, the caller's own record and vouchers, roles and API keys."""

from typing import Annotated, Any

from fastapi import Query, Request, Response

from actors.calls import Failure
from engine import keys
from serve.auth import Principal, actor_of
from serve.devices import account_key
from serve.gate import RateLimited
from serve.models import ApiKeyIn, ApiKeyOut, LoginIn, RegisterIn, RolesIn, TokenOut, UserOut
from serve.problems import problem_responses
from serve.ratelimit import headers as rate_headers
from serve.routes.deps import BODY, GUARDED, Svc, require, router, unwrap

routes = router()

Anyone = Annotated[Principal, require("users.me")]
VoucherReader = Annotated[Principal, require("vouchers.read")]
RoleSetter = Annotated[Principal, require("users.set_roles")]
KeyManager = Annotated[Principal, require("api_keys.create")]


@routes.post(
    "/v1/auth/register",
    status_code=201,
    response_model=UserOut,
    tags=["users"],
    responses=problem_responses(*BODY, 409, 429),
)
async def register(body: RegisterIn, request: Request, response: Response, svc: Svc) -> Any:
    await svc.gate.limit(svc.gate.client(request.scope), response.headers, None)
    return unwrap(await svc.users.register.remote(body.email, body.password, body.name))


@routes.post(
    "/v1/auth/login", response_model=TokenOut, tags=["users"], responses=problem_responses(*BODY, 401, 429)
)
async def login(body: LoginIn, request: Request, response: Response, svc: Svc) -> Any:
    """Failed logins spend budgets in tiers whose waits grow: per client address and
    per account, or, for a device that logged in to this account before (its
    ``device_token``), that device's own. A budget is checked before the password and
    charged only by a failure, so a guesser gets 429 without an answer, one address
    cannot spend an account's budget alone, and the owner's device is never held up
    by anyone else's failures (serve/devices.py, docs/http-api.md, "Login defence")."""
    gate = svc.gate
    ip = gate.client(request.scope)
    account = account_key(body.email)
    device = svc.devices.verify(body.device_token, account)
    budgets = gate.policy.login_keys(ip, account, device)
    # A known device's requests are counted as its own, not its (maybe shared) address's.
    checks = (
        [gate.policy.principal_check("anonymous", keys.device(device))]
        if device is not None
        else [gate.policy.ip_check(ip)]
    )
    decision = await gate.limiter.hit_and_check_failures(checks, budgets, gate.policy)
    response.headers.update(rate_headers(decision))
    if not decision.allowed:
        what = "failed-login" if decision.key.startswith(keys.FAILURES) else "request"
        raise RateLimited(decision, what)
    result = await svc.users.login.remote(body.email, body.password)
    if isinstance(result, Failure):
        if result.code == "invalid_credentials":  # not when the user store is away
            await gate.limiter.penalize_failure(budgets, gate.policy)
        return unwrap(result)
    return {**result, "device_token": svc.devices.issue(account)}


@routes.get("/v1/users/me", response_model=UserOut, tags=["users"], responses=problem_responses(*GUARDED, 404))
async def me(caller: Anyone, svc: Svc) -> Any:
    if caller.kind == "api_key":
        return {"id": caller.user_id, "roles": list(caller.roles), "kind": "api_key"}
    return unwrap(await svc.users.get.remote(caller.user_id))


@routes.get("/v1/users/me/vouchers", tags=["vouchers"], responses=problem_responses(*GUARDED, 422))
async def my_vouchers(caller: VoucherReader, svc: Svc, limit: int = Query(100, ge=1, le=1000)) -> Any:
    return {"items": unwrap(await svc.vouchers.of_customer.remote(caller.user_id, limit))}


@routes.put(
    "/v1/users/{user_id}/roles",
    response_model=UserOut,
    tags=["users"],
    responses=problem_responses(*GUARDED, *BODY, 404, 409),
)
async def set_roles(user_id: str, body: RolesIn, caller: RoleSetter, svc: Svc) -> Any:
    return unwrap(await svc.users.set_roles.remote(user_id, body.roles, actor_of(caller)))


@routes.post(
    "/v1/api-keys",
    status_code=201,
    response_model=ApiKeyOut,
    tags=["users"],
    responses=problem_responses(*GUARDED, *BODY, 404),
)
async def create_api_key(body: ApiKeyIn, caller: KeyManager, svc: Svc) -> Any:
    return unwrap(await svc.users.create_api_key.remote(caller, body.name, body.roles))


@routes.get("/v1/api-keys", tags=["users"], responses=problem_responses(*GUARDED))
async def list_api_keys(caller: KeyManager, svc: Svc) -> Any:
    return {"items": unwrap(await svc.users.list_api_keys.remote(caller))}


@routes.delete("/v1/api-keys/{key_id}", tags=["users"], responses=problem_responses(*GUARDED, 404, 422))
async def revoke_api_key(key_id: str, caller: KeyManager, svc: Svc) -> Any:
    return unwrap(await svc.users.revoke_api_key.remote(key_id, caller))
