"""The Redis key names are a contract with data already in Redis: they do not change."""

from __future__ import annotations

from engine import keys


def test_delivery_keys() -> None:
    assert keys.stream("email") == "voucher:delivery:email"
    assert keys.DEAD_STREAM == "voucher:delivery:dead"
    assert keys.GROUP == "senders"
    assert keys.SENT_MARKS == "voucher:delivery:sent"
    assert keys.retry("sms") == "voucher:delivery:retry:sms"
    assert keys.send_rate("push") == "voucher:delivery:send-rate:push"
    assert keys.requeue_lock("sms") == "voucher:delivery:requeue:sms"
    assert keys.sweep_lock("sms") == "voucher:delivery:sweep:sms"
    assert keys.failure_window("c1", 7) == "voucher:delivery:fr:c1:7"
    assert keys.failure_alerted("c1", 7) == "voucher:delivery:fr-alerted:c1:7"
    assert keys.dead_alerted("c1", 7) == "voucher:delivery:dead-alerted:c1:7"


def test_limiter_keys() -> None:
    assert keys.LIMITER == "voucher:rl:" and keys.FAILURES == "fail:"
    assert keys.principal("customer", "u1") == "customer:u1"
    assert keys.ip("10.0.0.1") == "ip:10.0.0.1"
    assert keys.ip_of_caller("10.0.0.1", "api_key:k1") == "ip:10.0.0.1|api_key:k1"
    assert keys.customer("c1") == "customer:c1"
    assert keys.caller("api_key:k1") == "caller:api_key:k1"
    assert keys.device("d1") == "device:d1"
    assert keys.login(keys.LOGIN_ACCOUNT, "acct", 1) == "login-account:acct#1"
    assert keys.api_key_flag("k1") == "auth:stale:k1"
    assert keys.API_KEY_EPOCH == "auth:epoch"
