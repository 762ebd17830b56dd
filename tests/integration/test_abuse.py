"""Abuse, over real HTTP through the session's HAProxy ingress: a forged X-Forwarded-For
does not change the client address; brute force on the admin's password neither gets
through nor locks the admin out; one customer's guessing does not throttle another's
valid code; guessing without (or with rotating) customer_id runs out of budget.

The session's app runs the embedded default (no trusted proxy). A second gateway app of
this module's own (under a route prefix, on the session's deployments, Redis and
Postgres) has small budgets and trusts 127.0.0.1: it plays a deployment behind a load
balancer, whose appended entry is the right-most of X-Forwarded-For, so tests can speak
from several client addresses.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from engine.settings import Settings
from serve.devices import account_key
from tests.http_support import bearer, flash_sale_body, open_campaign
from tests.support import second_gateway

APP = "abuse"
BUDGETS = {
    "VOUCHER_RATE_LOGIN_IP": "1/min/5",
    "VOUCHER_RATE_LOGIN_ACCOUNT": "1/min/8",
    "VOUCHER_RATE_LOGIN_DEVICE": "1/min/5",
    "VOUCHER_RATE_FAILURES": "1/min/5",
    "VOUCHER_RATE_FAILURES_CALLER": "1/min/14",
}


def _budgets() -> dict[str, Any]:
    """BUDGETS as settings fields: a gateway takes its limits from its settings."""
    small = Settings.from_env(BUDGETS)
    return {f: getattr(small, f) for f in small.__struct_fields__ if Settings.given(f, BUDGETS)}


def _addr() -> str:
    """A fresh client address (so reruns against one Redis never share buckets)."""
    b = os.urandom(3)
    return f"10.{b[0]}.{b[1]}.{b[2] or 1}"


def _forget(services: Any, patterns: list[str]) -> None:
    client = redis.Redis.from_url(services.redis_url)
    try:
        for pattern in patterns:
            stale = list(client.scan_iter(match=pattern))
            if stale:
                client.delete(*stale)
    finally:
        client.close()


@pytest.fixture(scope="module")
def behind_lb(http_api: Any, engine_settings: Any, services: Any) -> Iterator[str]:
    """Base URL of a gateway with small budgets that trusts 127.0.0.1 as its proxies."""
    with second_gateway(
        http_api,
        engine_settings,
        APP,
        services.redis_url,
        **_budgets(),
        trusted_proxies="127.0.0.1,::1",
    ) as url:
        yield url


def _login(url: str, email: str, password: str, via: str | None, device: str | None = None) -> httpx.Response:
    body = {"email": email, "password": password}
    if device is not None:
        body["device_token"] = device
    headers = {"X-Forwarded-For": via} if via is not None else {}
    return httpx.post(f"{url}/v1/auth/login", json=body, headers=headers, timeout=30)


def test_a_forged_forwarded_for_does_not_change_the_address(http_api: Any, services: Any) -> None:
    """Embedded default: the header is ignored, so forging a new one per attempt does not
    escape the address's login budget (failed logins on accounts that do not exist)."""
    url = http_api.url
    try:
        answers = [
            _login(url, f"nobody-{os.urandom(4).hex()}@test.example", "wrong-password", _addr()).status_code
            for _ in range(14)
        ]
        assert answers[0] == 401 and 429 in answers, answers
        first = answers.index(429)
        assert first <= 10 and set(answers[first:]) == {429}, answers
    finally:
        _forget(services, ["voucher:rl:fail:login-ip:127.0.0.1#*"])


def test_behind_a_load_balancer_only_its_entry_counts(behind_lb: str) -> None:
    real, other = _addr(), _addr()
    answers = [
        _login(
            behind_lb, f"nobody-{os.urandom(4).hex()}@test.example", "wrong-password",
            f"{_addr()}, {real}",  # the client's forgery, then the balancer's entry
        ).status_code
        for _ in range(8)
    ]
    assert answers[:5] == [401] * 5 and set(answers[5:]) == {429}, answers
    r = _login(behind_lb, "nobody@test.example", "wrong-password", f"{real}, {other}")
    assert r.status_code == 401, r.text  # another client: its own budget


@pytest.fixture
def admin_account(http_api: Any, services: Any) -> Iterator[str]:
    """The admin's email; its account budget (shared with the session's app, which other
    tests log in to without a device token) is given back afterwards."""
    try:
        yield http_api.admin_email
    finally:
        _forget(services, [f"voucher:rl:fail:login-account:{account_key(http_api.admin_email)}#*"])


def test_brute_force_neither_gets_through_nor_locks_the_admin_out(
    behind_lb: str, http_api: Any, admin_account: str
) -> None:
    email, password = admin_account, http_api.admin_password
    attacker, home, elsewhere = _addr(), _addr(), _addr()
    r = _login(behind_lb, email, password, home)
    assert r.status_code == 200, r.text
    device = r.json()["device_token"]

    # One address: 5 failures, then 429 without the password being tried...
    answers = [_login(behind_lb, email, f"guess-{i}", attacker).status_code for i in range(9)]
    assert answers == [401] * 5 + [429] * 4, answers
    # ...even the right one: the attacker learns nothing from its own address.
    assert _login(behind_lb, email, password, attacker).status_code == 429
    # During the run the admin gets in: from another address (one address cannot spend
    # the account's budget alone), and from the attacker's own with the device token.
    assert _login(behind_lb, email, password, elsewhere).status_code == 200
    r = _login(behind_lb, email, password, attacker, device)
    assert r.status_code == 200, r.text

    # A distributed run spends the account's budget: strangers are slowed...
    spread = [_login(behind_lb, email, f"spread-{i}", _addr()).status_code for i in range(6)]
    assert 401 in spread and spread[-1] == 429, spread
    r = _login(behind_lb, email, password, _addr())
    assert r.status_code == 429 and int(r.headers["Retry-After"]) <= 60, r.headers
    # ...the admin's device is not, right after the run, from any address.
    for via in (attacker, home, _addr()):
        r = _login(behind_lb, email, password, via, device)
        assert r.status_code == 200, r.text
    # A device token of another account, or a forged one, is no way around the budget.
    assert _login(behind_lb, email, password, _addr(), device[:-3] + "AAA").status_code == 429


@pytest.fixture(scope="module")
def admin(http_api: Any) -> dict[str, str]:
    r = _login(http_api.url, http_api.admin_email, http_api.admin_password, None)
    assert r.status_code == 200, r.text
    return bearer(r.json()["access_token"])


def _flash_sale(url: str, admin: dict[str, str]) -> str:
    code = f"ABUSE{os.urandom(4).hex()}".upper()
    open_campaign(url, admin, flash_sale_body("abuse", code))
    return code


def _checkout(url: str, key: str, code: str, customer: str | None, via: str, op: str = "validations") -> int:
    body: dict[str, Any] = {"code": code, "order": {"amount": 5000, "currency": "EUR"}}
    if customer is not None:
        body["customer_id"] = customer
    headers = {"X-API-Key": key, "X-Forwarded-For": via, "Idempotency-Key": os.urandom(8).hex()}
    return httpx.post(f"{url}/v1/{op}", json=body, headers=headers, timeout=30).status_code


def test_code_guessing_budgets_per_customer_address_and_key(behind_lb: str, admin: dict[str, str]) -> None:
    url = behind_lb
    keys = []
    for name in ("abuse", "another shop"):
        r = httpx.post(f"{url}/v1/api-keys", json={"name": name, "roles": ["integration"]}, headers=admin)
        assert r.status_code == 201, r.text
        keys.append(r.json()["key"])
    key, other_key = keys
    code = _flash_sale(url, admin)
    shop = _addr()  # the checkout service's one address
    tag = os.urandom(3).hex()

    def guess(customer: str | None, via: str = shop) -> int:
        return _checkout(url, key, f"NOPE{os.urandom(5).hex()}".upper(), customer, via)

    # Customer A guesses: its own budget (5) runs out...
    a = [guess(f"a-{tag}") for _ in range(7)]
    assert a == [200] * 5 + [429] * 2, a  # a validation answers 200 {"valid": false}
    # ...and customer B's valid code is not held up, nor B's next guess.
    assert _checkout(url, key, code, f"b-{tag}", shop, "redemptions") == 201
    assert guess(f"b-{tag}") == 200

    # Without customer_id: the address's budget (5), from wherever the request comes.
    none = [guess(None) for _ in range(7)]
    assert none == [200] * 5 + [429] * 2, none
    assert guess(None, _addr()) == 200  # another address: its own budget
    # another key at the same address (every client shares HAProxy's by default): its own
    assert _checkout(url, other_key, f"NOPE{tag}".upper(), None, shop) == 200

    # Rotating customer_id: the key's budget (14) runs out after 5 + 1 + 5 + 1 spent.
    rotating = [guess(f"r-{tag}-{i}") for i in range(4)]
    assert rotating == [200, 200, 429, 429], rotating
