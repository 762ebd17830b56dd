"""The gateway while its Redis is down or loses its data, over HTTP: checkout and a correct
login keep working, the code-guessing budget still answers 429, and a revoked API key stays
revoked after Redis restarts without its data (its revocation flag is gone with it).

A gateway and a Users deployment of their own (a second Serve app under a route prefix)
use a private Valkey, which the test stops, restarts, and wipes; the other deployments,
the engine and Postgres are the session's.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.http_support import bearer, flash_sale_body, open_campaign_async
from tests.support import PrivateValkey, second_gateway

pytestmark = pytest.mark.fault

APP = "valkey-outage"


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateValkey]:
    vk = PrivateValkey(Path(tmp_path_factory.mktemp("valkey-gw")) / "valkey").start()
    try:
        yield vk
    finally:
        vk.stop()


@pytest.fixture(scope="module")
def gateway(http_api: Any, engine_settings: Any, valkey: PrivateValkey) -> Iterator[str]:
    """Base URL of a gateway (and Users) on the private Valkey."""
    with second_gateway(http_api, engine_settings, APP, valkey.url, own_users=True) as url:
        yield url


async def _login(client: httpx.AsyncClient, url: str, http_api: Any, password: str | None = None) -> httpx.Response:
    return await client.post(
        f"{url}/v1/auth/login",
        json={"email": http_api.admin_email, "password": password or http_api.admin_password},
    )


async def _flash_sale(client: httpx.AsyncClient, url: str, admin: dict[str, str]) -> str:
    code = f"VKOUT{os.urandom(4).hex()}".upper()
    await open_campaign_async(client, url, admin, flash_sale_body("valkey outage", code))
    return code


async def _redeem(client: httpx.AsyncClient, url: str, key: str, code: str, customer: str) -> httpx.Response:
    return await client.post(
        f"{url}/v1/redemptions",
        headers={"X-API-Key": key, "Idempotency-Key": f"{code}-{customer}"},
        json={"code": code, "customer_id": customer, "order": {"amount": 5000, "currency": "EUR"}},
    )


async def _admin_and_keys(
    client: httpx.AsyncClient, url: str, http_api: Any, *names: str
) -> tuple[dict[str, str], list[tuple[str, str]]]:
    r = await _login(client, url, http_api)
    assert r.status_code == 200, r.text
    admin = bearer(r.json()["access_token"])
    keys = []
    for name in names:
        r = await client.post(f"{url}/v1/api-keys", json={"name": name, "roles": ["integration"]}, headers=admin)
        assert r.status_code == 201, r.text
        keys.append((r.json()["id"], r.json()["key"]))
    return admin, keys


async def test_checkout_login_and_guessing_budget_while_valkey_is_down(
    gateway: str, http_api: Any, valkey: PrivateValkey
) -> None:
    url = gateway
    async with httpx.AsyncClient(timeout=30) as client:
        admin, [(_, key), (other_id, _)] = await _admin_and_keys(client, url, http_api, "checkout", "other")
        code = await _flash_sale(client, url, admin)
        tag = os.urandom(3).hex()
        assert (await _redeem(client, url, key, code, f"up-{tag}")).status_code == 201

        await asyncio.to_thread(valkey.stop)
        try:
            # Checkout works (the limits are kept by the replica), and so does a correct login.
            for i in range(5):
                r = await _redeem(client, url, key, code, f"down-{tag}-{i}")
                assert r.status_code == 201, r.text
            r = await _login(client, url, http_api)
            assert r.status_code == 200, r.text
            # A guesser runs out of failure budget (burst 20 per customer) and gets 429.
            answers = []
            for i in range(30):
                r = await client.post(
                    f"{url}/v1/validations",
                    headers={"X-API-Key": key},
                    json={"code": f"NOPE{tag}{i}".upper(), "customer_id": f"guesser-{tag}",
                          "order": {"amount": 5000, "currency": "EUR"}},
                )
                answers.append(r.status_code)
            assert 429 in answers, answers
            first = answers.index(429)
            assert first <= 20 and all(a == 429 for a in answers[first:]), answers
            # ...while an honest customer is not held up by the guesser's budget.
            assert (await _redeem(client, url, key, code, f"honest-{tag}")).status_code == 201
            # A revocation needs Redis for its flag: refused in bounded time, nothing changed.
            r = await client.delete(f"{url}/v1/api-keys/{other_id}", headers=admin)
            assert r.status_code == 503 and "Retry-After" in r.headers, r.text
        finally:
            await asyncio.to_thread(valkey.start)  # back, with its data
        r = await client.delete(f"{url}/v1/api-keys/{other_id}", headers=admin)
        assert r.status_code == 200, r.text


async def test_a_revoked_key_stays_revoked_after_valkey_loses_its_data(
    gateway: str, http_api: Any, valkey: PrivateValkey
) -> None:
    url = gateway
    async with httpx.AsyncClient(timeout=30) as client:
        admin, [(_, key), (doomed_id, doomed)] = await _admin_and_keys(
            client, url, http_api, "checkout", "revoked"
        )
        code = await _flash_sale(client, url, admin)
        tag = os.urandom(3).hex()
        # The gateway keeps the doomed key in its cache.
        assert (await _redeem(client, url, doomed, code, f"doomed-{tag}")).status_code == 201
        r = await client.delete(f"{url}/v1/api-keys/{doomed_id}", headers=admin)
        assert r.status_code == 200, r.text
        # Redis loses everything, the revocation flag included, before the gateway saw it.
        await asyncio.to_thread(valkey.restart, keep_data=False)
        # Other traffic first, until the gateway talks to the new Redis again (a limiter
        # call that fails checks every key against Postgres, which would hide the hole).
        for i in range(4):
            assert (await _redeem(client, url, key, code, f"warm-{tag}-{i}")).status_code == 201
            await asyncio.sleep(1.1)
        for i in range(3):
            r = await _redeem(client, url, doomed, code, f"doomed-{tag}-{i}")
            assert r.status_code == 401, r.text
        assert (await _redeem(client, url, key, code, f"after-{tag}")).status_code == 201
