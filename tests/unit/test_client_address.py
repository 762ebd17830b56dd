"""The client address: a header only counts when a trusted proxy passed it on, and then
only its right-most untrusted entry; device tokens and the login/guessing budget keys."""

from __future__ import annotations

import os

import pytest

from engine.errors import ConfigError
from engine.settings import Settings
from serve.client_address import UNPARSABLE, TrustedProxies, disable_uvicorn_rewrite
from serve.devices import DeviceTokens, account_key
from serve.ratelimit import Limit, RateLimitPolicy


def test_nothing_trusted_by_default_the_header_changes_nothing() -> None:
    proxies = TrustedProxies.parse(Settings().trusted_proxies)
    assert proxies.client("127.0.0.1", [b"203.0.113.9"]) == "127.0.0.1"
    assert proxies.client("198.51.100.4", ["1.2.3.4, 5.6.7.8"]) == "198.51.100.4"
    assert proxies.client(None) == "unknown"


def test_right_most_untrusted_entry_behind_trusted_proxies() -> None:
    proxies = TrustedProxies.parse("127.0.0.1, 10.0.0.0/8")
    # the client wrote "6.6.6.6"; the load balancer (10.0.0.2) appended the real peer
    assert proxies.client("127.0.0.1", [b"6.6.6.6, 198.51.100.7"]) == "198.51.100.7"
    assert proxies.client("127.0.0.1", [b"6.6.6.6", b"198.51.100.7, 10.0.0.2"]) == "198.51.100.7"
    assert proxies.client("10.1.2.3", ["198.51.100.7:4431"]) == "198.51.100.7"
    assert proxies.client("127.0.0.1", ["[2001:db8::1]:443"]) == "2001:db8::1"
    # a peer that is not a proxy is the client, whatever it writes
    assert proxies.client("198.51.100.9", [b"10.0.0.5, 1.2.3.4"]) == "198.51.100.9"
    # no header from a trusted proxy: the proxy itself
    assert proxies.client("127.0.0.1", []) == "127.0.0.1"
    # text where an address should be: one shared bucket, never the text
    assert proxies.client("127.0.0.1", [b"1.2.3.4, evil"]) == UNPARSABLE
    assert proxies.client("::ffff:127.0.0.1", [b"192.0.2.1"]) == "192.0.2.1"


def test_trusted_proxies_setting_is_validated() -> None:
    assert Settings.from_env({"VOUCHER_TRUSTED_PROXIES": "127.0.0.1,10.0.0.0/8"}).trusted_proxies
    with pytest.raises(ConfigError, match="VOUCHER_TRUSTED_PROXIES"):
        Settings.from_env({"VOUCHER_TRUSTED_PROXIES": "127.0.0.1, lb.internal"})


def test_uvicorn_rewrite_is_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    from uvicorn.middleware.proxy_headers import _TrustedHosts

    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    disable_uvicorn_rewrite()
    assert "127.0.0.1" not in _TrustedHosts(os.environ["FORWARDED_ALLOW_IPS"])


def test_device_tokens_are_bound_to_their_account_and_expire() -> None:
    now = [1_000_000.0]
    tokens = DeviceTokens(b"k" * 32, ttl_s=60, clock=lambda: now[0])
    alice, bob = account_key("Alice@example.com "), account_key("bob@example.com")
    assert alice == account_key("alice@example.com")
    token = tokens.issue(alice)
    device = tokens.verify(token, alice)
    assert device
    assert tokens.verify(token, bob) is None
    assert tokens.verify(token[:-2] + "xx", alice) is None
    assert tokens.verify("garbage", alice) is None
    assert DeviceTokens(b"j" * 32).verify(token, alice) is None
    now[0] += 61
    assert tokens.verify(token, alice) is None


def test_login_keys_and_their_budgets() -> None:
    policy = RateLimitPolicy.from_settings(Settings.from_env(
        {"VOUCHER_RATE_LOGIN_IP": "1/min/2, 1/h/5", "VOUCHER_RATE_LOGIN_DEVICE": "1/s/3"}
    ))
    keys = policy.login_keys("192.0.2.1", "acct", None)
    assert keys == [
        "login-ip:192.0.2.1#0", "login-ip:192.0.2.1#1", "login-account:acct#0", "login-account:acct#1",
    ]
    assert policy.failure_limit(keys[1]) == Limit(1 / 3600, 5)
    assert policy.login_keys("192.0.2.1", "acct", "dev") == ["login-device:dev#0"]
    assert policy.failure_limit("login-device:dev#0") == Limit(1.0, 3)
    assert policy.failure_limit("caller:api_key:k1") == policy.failures_caller
    assert policy.failure_limit("customer:c1") == policy.failures
    with pytest.raises(ConfigError, match="VOUCHER_RATE_LOGIN_ACCOUNT"):
        Settings.from_env({"VOUCHER_RATE_LOGIN_ACCOUNT": "fast"})


def test_one_address_cannot_spend_an_accounts_login_budget_alone() -> None:
    """The defaults keep every address tier smaller than the account's matching tier."""
    p = RateLimitPolicy()
    for ip_tier, acct_tier in zip(p.login_ip, p.login_account, strict=True):
        assert ip_tier.burst < acct_tier.burst and ip_tier.rate < acct_tier.rate
    assert p.failures.burst < p.failures_caller.burst
