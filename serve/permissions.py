"""Which role may do what: every endpoint names an action, :data:`PERMISSIONS` maps
actions to roles, :func:`authorize` enforces it (an unknown action is refused) and
:func:`role_matrix_markdown` renders the role table of docs/http-api.md from the same data.
Pure logic, like :mod:`serve.auth`."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from serve.auth import ROLES, NotPermitted, Principal, canonical_roles

log = logging.getLogger(__name__)

_ALL = frozenset(ROLES)
_STAFF_READ = frozenset({"admin", "manager", "analyst"})
_STAFF_WRITE = frozenset({"admin", "manager"})
_CHECKOUT = frozenset({"admin", "manager", "integration"})

PERMISSIONS: dict[str, frozenset[str]] = {
    "users.me": _ALL,
    "users.set_roles": frozenset({"admin"}),
    "api_keys.create": _STAFF_WRITE,
    "campaigns.read": _STAFF_READ,
    "campaigns.write": _STAFF_WRITE,
    "campaigns.generate": _STAFF_WRITE,
    "jobs.read": _STAFF_READ,
    # customer: own vouchers only, enforced by the caller.
    "vouchers.read": _ALL,
    "vouchers.write": _STAFF_WRITE,
    # customer: own vouchers only, enforced by the caller.
    "validations.create": frozenset({"admin", "manager", "integration", "customer"}),
    "qualifications.create": frozenset({"admin", "manager", "integration", "customer"}),
    "redemptions.create": _CHECKOUT,
    "redemptions.rollback": _CHECKOUT,
    "reservations.write": _CHECKOUT,
    "overview.read": _STAFF_READ,
    "reports.read": _STAFF_READ,
    "notifications.read": _STAFF_WRITE,
    "metrics.read": frozenset({"admin"}),
    "customers.read": _STAFF_READ,
    "customers.write": _STAFF_WRITE,
    "issuance.create": _STAFF_WRITE,
    # a shop's backend gives a customer a code (e.g. at sign-up) with its integration key
    "publications.create": _CHECKOUT,
    "webhooks.manage": _STAFF_WRITE,
    "templates.write": _STAFF_WRITE,
    "deliveries.read": _STAFF_READ,
    "codes.read": _STAFF_READ,
    "exports.create": _STAFF_WRITE,
    "exports.read": _STAFF_READ,
    "exports.delete": _STAFF_WRITE,
    "redemptions.read": frozenset({"admin", "manager", "analyst", "integration"}),
    "webhooks.read": _STAFF_WRITE,
    "webhooks.write": _STAFF_WRITE,
    "events.read": _STAFF_WRITE,
    "audit.read": frozenset({"admin"}),
}
"""action -> roles allowed to perform it. Unknown actions are refused (fail closed)."""

PUBLIC = "public"
"""Pseudo-action of endpoints that need no credentials (register, login, health)."""

# (action, role) pairs the caller narrows further; shown in the role matrix of docs/http-api.md.
OWN_ONLY: frozenset[tuple[str, str]] = frozenset(
    {
        ("vouchers.read", "customer"),
        ("validations.create", "customer"),
        ("qualifications.create", "customer"),
    }
)


def authorize(principal: Principal, action: str) -> None:
    """Raise Forbidden unless one of the principal's roles may perform ``action``."""
    allowed = PERMISSIONS.get(action)
    if allowed is None:
        # A typo in an endpoint's action must not open it: refuse, loudly.
        log.error("authorize() called with unknown action %r", action)
        raise NotPermitted(f"unknown action {action!r}")
    if allowed.isdisjoint(principal.roles):
        raise NotPermitted(f"{action} needs one of the roles: {', '.join(_ordered(allowed))}")


def allowed(principal: Principal, action: str) -> bool:
    allowed_roles = PERMISSIONS.get(action)
    return allowed_roles is not None and not allowed_roles.isdisjoint(principal.roles)


def _ordered(roles: Iterable[str]) -> tuple[str, ...]:
    return canonical_roles(roles)


def role_matrix_markdown(endpoints: Sequence[tuple[str, str]] | None = None) -> str:
    """The role matrix of docs/http-api.md ("Roles").

    With ``endpoints`` (``[("POST /v1/auth/login", "public"), ("GET /v1/users/me",
    "users.me"), ...]``) one row per endpoint; without, one row per action. ``yes`` means
    allowed, ``own`` allowed for the caller's own vouchers only, ``-`` refused.
    """
    rows: list[tuple[str, ...]] = []
    if endpoints is None:
        header = ("action", *ROLES)
        for action in PERMISSIONS:
            rows.append((f"`{action}`", *_cells(action)))
    else:
        header = ("endpoint", "action", *ROLES)
        for endpoint, action in endpoints:
            if action != PUBLIC and action not in PERMISSIONS:
                raise ValueError(f"endpoint {endpoint} names unknown action {action!r}")
            rows.append((f"`{endpoint}`", f"`{action}`", *_cells(action)))
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _cells(action: str) -> list[str]:
    if action == PUBLIC:
        return ["public"] * len(ROLES)
    allowed_roles = PERMISSIONS[action]
    out = []
    for role in ROLES:
        if role not in allowed_roles:
            out.append("-")
        elif (action, role) in OWN_ONLY:
            out.append("own")
        else:
            out.append("yes")
    return out
