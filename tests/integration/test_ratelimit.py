"""The shared GCRA rate limiter against the session's real Valkey."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from actors.ratelimit import take
from engine.errors import ConfigError
from engine.gcra import Check, Limit, LocalGcra, parse_limit, permits
from engine.settings import Settings
from ops.servers import Services
from serve.ratelimit import Decision, RateLimiter, RateLimitPolicy, _combine, headers


@pytest.fixture
def ns() -> str:
    # Each test uses its own keys, so tests never share buckets.
    return f"t{uuid.uuid4().hex[:10]}:"


@pytest.fixture
async def limiter(services: Services, ns: str) -> AsyncIterator[RateLimiter]:
    rl = RateLimiter(services.redis_url, prefix=f"test:rl:{ns}")
    yield rl
    await rl.aclose()


async def test_burst_above_the_limit_is_denied_with_retry_after(limiter: RateLimiter) -> None:
    decisions = [await limiter.hit("k", rate=10, burst=5) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    assert all(d.limit == 5 for d in decisions)
    denied = decisions[-1]
    assert 0 < denied.retry_after_s <= 0.1 + 0.02  # one token back after 1/rate seconds
    assert 0.3 < denied.reset_after_s <= 0.5 + 0.02  # full again after burst/rate
    h = headers(denied)
    assert h["RateLimit-Limit"] == "5" and h["RateLimit-Remaining"] == "0"
    assert h["Retry-After"] == "1" and int(h["RateLimit-Reset"]) >= 1
    assert "Retry-After" not in headers(decisions[0])
    # After the advertised wait the request passes.
    await asyncio.sleep(denied.retry_after_s + 0.01)
    assert (await limiter.hit("k", rate=10, burst=5)).allowed


async def test_sustained_rate_at_or_below_the_limit_passes(limiter: RateLimiter) -> None:
    rate, burst = 50.0, 5
    interval = 1 / (rate * 0.9)  # paced at 90% of the limit
    start = time.monotonic()
    results = []
    for i in range(60):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        results.append((await limiter.hit("steady", rate, burst)).allowed)
    assert all(results), results.count(False)


async def test_sustained_rate_above_the_limit_is_capped(limiter: RateLimiter) -> None:
    rate, burst = 20.0, 2
    start = time.monotonic()
    allowed = 0
    while time.monotonic() - start < 1.0:
        allowed += (await limiter.hit("flood", rate, burst)).allowed
        await asyncio.sleep(0.002)
    assert rate * 1.0 * 0.7 <= allowed <= burst + rate * 1.05 + 2


async def test_two_replicas_share_the_limit(services: Services, ns: str) -> None:
    # Two limiters with their own connections, as two gateway replicas would have.
    a = RateLimiter(services.redis_url, prefix=f"test:rl:{ns}")
    b = RateLimiter(aioredis.from_url(services.redis_url), prefix=f"test:rl:{ns}")
    try:
        results = []
        for _ in range(5):
            results.append(await a.hit("shared", rate=1, burst=10))
            results.append(await b.hit("shared", rate=1, burst=10))
        assert all(d.allowed for d in results)
        assert [d.remaining for d in results] == list(range(9, -1, -1))
        assert not (await a.hit("shared", rate=1, burst=10)).allowed
        assert not (await b.hit("shared", rate=1, burst=10)).allowed
    finally:
        await a.aclose()
        await b.redis.aclose()


async def test_concurrent_hits_never_exceed_the_burst(limiter: RateLimiter) -> None:
    out = await asyncio.gather(*[limiter.hit("race", rate=0.01, burst=25) for _ in range(200)])
    assert sum(d.allowed for d in out) == 25


async def test_hit_many_is_all_or_nothing(limiter: RateLimiter) -> None:
    def checks(cost: int = 1) -> list[tuple[str, float, int, int]]:
        return [("user:u1", 1.0, 10, cost), ("ip:10.0.0.1", 1.0, 3, cost)]

    d1 = await limiter.hit_many(checks())
    assert d1.allowed and d1.key == "ip:10.0.0.1" and d1.remaining == 2 and d1.limit == 3
    assert (await limiter.hit_many(checks())).allowed
    assert (await limiter.hit_many(checks())).allowed
    denied = await limiter.hit_many(checks())
    assert not denied.allowed
    assert denied.key == "ip:10.0.0.1" and denied.retry_after_s > 0
    # The user's bucket was charged only for the three allowed requests.
    user = await limiter.hit("user:u1", 1.0, 10)
    assert user.allowed and user.remaining == 10 - 3 - 1
    # A denied multi-check with a bigger cost charges nothing either.
    assert not (await limiter.hit_many([("user:u2", 1.0, 10, 5), ("ip:10.0.0.1", 1.0, 3, 1)])).allowed
    assert (await limiter.hit("user:u2", 1.0, 10)).remaining == 9


async def test_cost_is_validated(limiter: RateLimiter) -> None:
    with pytest.raises(ValueError):
        await limiter.hit("k", rate=1, burst=3, cost=4)
    with pytest.raises(ValueError):
        await limiter.hit("k", rate=0, burst=3)
    d = await limiter.hit("heavy", rate=1, burst=10, cost=4)
    assert d.allowed and d.remaining == 6


async def test_failure_budget(limiter: RateLimiter) -> None:
    keys = RateLimitPolicy.failure_keys("cust-1", "192.0.2.7")
    assert keys == ["customer:cust-1", "ip:192.0.2.7"]
    lim: dict[str, Any] = {"rate": 1 / 60, "burst": 3}
    # Checking is free: the budget stays full however often it is checked.
    for _ in range(10):
        ok = await limiter.check_failure_budget(keys, **lim)
        assert ok.allowed and ok.remaining == 3
    for expect_remaining in (2, 1, 0):
        d = await limiter.penalize_failure(keys, **lim)
        assert d.allowed and d.remaining == expect_remaining
    blocked = await limiter.check_failure_budget(keys, **lim)
    assert not blocked.allowed and blocked.retry_after_s > 0
    # Another customer behind the same IP is blocked by the IP's bucket...
    other = RateLimitPolicy.failure_keys("cust-2", "192.0.2.7")
    assert not (await limiter.check_failure_budget(other, **lim)).allowed
    # ...the same customer from elsewhere by the customer's bucket...
    assert not (await limiter.check_failure_budget(
        RateLimitPolicy.failure_keys("cust-1", "198.51.100.1"), **lim)).allowed
    # ...and neither bucket touches the normal request limits.
    assert (await limiter.hit("customer:cust-1", 1.0, 1)).allowed
    # Penalties keep counting per key even when one of them is empty already.
    fresh = await limiter.penalize_failure(RateLimitPolicy.failure_keys("cust-3", "192.0.2.7"), **lim)
    assert not fresh.allowed
    assert (await limiter.check_failure_budget(["customer:cust-3"], **lim)).remaining == 2
    # An operator can lift the block.
    await limiter.reset(keys, failures=True)
    assert (await limiter.check_failure_budget(keys, **lim)).allowed


async def test_failure_budget_uses_the_policy_by_default(services: Services, ns: str) -> None:
    policy = RateLimitPolicy(failures=Limit(1 / 60, 2))
    rl = RateLimiter(services.redis_url, policy=policy, prefix=f"test:rl:{ns}")
    try:
        await rl.penalize_failure(["ip:203.0.113.5"])
        await rl.penalize_failure(["ip:203.0.113.5"])
        d = await rl.check_failure_budget(["ip:203.0.113.5"])
        assert not d.allowed and d.limit == 2
        # an explicit policy argument wins over the limiter's own
        roomy = RateLimitPolicy(failures=Limit(1 / 60, 5))
        assert (await rl.check_failure_budget(["ip:203.0.113.5"], roomy)).allowed
    finally:
        await rl.aclose()


async def test_keys_expire_once_the_bucket_is_full_again(limiter: RateLimiter) -> None:
    await limiter.hit("ttl", rate=100, burst=10, cost=5)
    ttl_ms = await limiter.redis.pttl(limiter.prefix + "ttl")
    assert 0 < ttl_ms <= 50 + 1000  # refill time plus a second of slack
    await limiter.check_failure_budget(["peeked"], rate=1, burst=1)
    assert not await limiter.redis.exists(limiter.prefix + "fail:peeked")


async def test_script_is_reloaded_after_noscript(limiter: RateLimiter) -> None:
    assert (await limiter.hit("ns", 1, 5)).allowed
    await limiter.redis.script_flush()
    d = await limiter.hit("ns", 1, 5)
    assert d.allowed and d.remaining == 3
    assert await limiter.ping()


async def test_unreachable_redis_keeps_every_limit_in_the_replica() -> None:
    """Without Redis each limit is kept by the replica's own buckets: honest requests pass,
    a burst above a limit is cut, and a guesser runs out of failure budget (429) while
    someone who has not failed still passes."""
    rl = RateLimiter("redis://127.0.0.1:1/0", timeout_s=0.2, backoff_s=5.0)
    policy = RateLimitPolicy.from_settings(Settings.from_env({"VOUCHER_RATE_FAILURES": "1/min/3"}))
    try:
        d = await rl.hit("k", 10, 20)
        assert d.allowed and d.degraded and d.remaining == 19
        assert [(await rl.hit("burst", 1, 5)).allowed for _ in range(8)] == [True] * 5 + [False] * 3
        f = await rl.check_failure_budget(["customer:x"], policy)
        assert f.allowed and f.degraded
        for _ in range(3):
            await rl.penalize_failure(["customer:x", "ip:1.2.3.4"], policy)
        f = await rl.check_failure_budget(["customer:x"], policy)
        assert not f.allowed and f.degraded and f.retry_after_s > 0
        guess = await rl.hit_and_check_failures([("req", 100.0, 100, 1)], ["customer:x"], policy)
        assert not guess.allowed and guess.key.startswith("fail:")
        honest = await rl.hit_and_check_failures([("req", 100.0, 100, 1)], ["customer:y"], policy)
        assert honest.allowed and honest.degraded
        # within the backoff, Redis is not even tried (no connect timeout per request)
        t0 = time.monotonic()
        for _ in range(50):
            await rl.hit_many([("a", 1000, 1000, 1), ("b", 1000, 1000, 1)])
        assert time.monotonic() - t0 < 0.1
        assert rl.redis_errors == 1
    finally:
        await rl.aclose()


async def test_local_buckets_answer_as_the_script_does(limiter: RateLimiter) -> None:
    """The replica's fallback (LocalGcra) is the script's algorithm: the same sequence of
    checks in every mode gets the same allow/deny answers."""
    local = LocalGcra()
    seq: list[tuple[str, list[Check], int | None]] = [
        ("all", [("x", 0.01, 3, 1), ("y", 0.01, 5, 1)], None),
        ("all", [("x", 0.01, 3, 2), ("y", 0.01, 5, 2)], None),
        ("all", [("x", 0.01, 3, 1)], None),
        ("each", [("f1", 0.01, 2, 1), ("f2", 0.01, 4, 1)], None),
        ("each", [("f1", 0.01, 2, 1), ("f2", 0.01, 4, 1)], None),
        ("peek", [("f1", 0.01, 2, 1), ("f2", 0.01, 4, 1)], None),
        ("each", [("f1", 0.01, 2, 1), ("f2", 0.01, 4, 1)], None),
        ("all", [("r", 0.01, 4, 1), ("f1", 0.01, 2, 1)], 1),
        ("all", [("r", 0.01, 4, 1), ("f2", 0.01, 4, 1)], 1),
    ]
    for mode, checks, peek_from in seq:
        prefixed = [(limiter.prefix + k, r, b, c) for k, r, b, c in checks]
        remote = await limiter._run(mode, prefixed, peek_from=peek_from)
        mine = local.run(mode, checks, peek_from)
        decision = _combine(checks, mine, 0, peek_from)
        assert (decision.allowed, decision.remaining) == (remote.allowed, remote.remaining), (
            mode, checks)


async def test_send_permits_are_taken_as_the_local_twin_takes_them(limiter: RateLimiter) -> None:
    """Partial grants (``take``, the delivery workers' send permits): the script and
    LocalGcra grant the same and tell the same wait for the next permit."""
    local = LocalGcra()
    key = limiter.prefix + "permits"
    for want, granted in ((3, 3), (4, 2), (2, 0)):
        remote = await take(limiter.redis, key, 0.01, 5.0, want)
        mine = permits(local.run("take", [(key, 0.01, 5.0, want)]))
        assert remote[0] == mine[0] == granted
        assert abs(remote[1] - mine[1]) < 1.0
    assert remote[1] > 90  # one permit per 100 s


def test_headers_of_an_allowed_decision() -> None:
    d = Decision(allowed=True, limit=40, remaining=39, reset_after_s=0.05, retry_after_s=0.0)
    assert headers(d) == {"RateLimit-Limit": "40", "RateLimit-Remaining": "39",
                          "RateLimit-Reset": "1"}
    denied = Decision(allowed=False, limit=40, remaining=0, reset_after_s=2.0, retry_after_s=2.4)
    assert headers(denied)["Retry-After"] == "3"


def test_policy_defaults_and_environment() -> None:
    p = RateLimitPolicy()
    assert p.roles["integration"] == Limit(2000, 4000)
    assert p.roles["customer"] == Limit(20, 40)
    assert p.per_ip == Limit(200, 400)
    assert p.failures.burst == 20 and abs(p.failures.rate - 10 / 60) < 1e-12
    env = {
        "VOUCHER_RATE_CUSTOMER": "5/10",
        "VOUCHER_RATE_ADMIN": "",  # empty counts as unset
        "VOUCHER_RATE_IP": "100/min/50",
        "VOUCHER_RATE_FAILURES": "0.5/5",
    }
    q = RateLimitPolicy.from_settings(Settings.from_env(env))
    assert q.roles["customer"] == Limit(5, 10)
    assert q.roles["admin"] == p.roles["admin"]
    assert q.per_ip.burst == 50 and abs(q.per_ip.rate - 100 / 60) < 1e-12
    assert q.failures == Limit(0.5, 5)
    assert q.request_checks("customer", "u1", "10.0.0.1") == [
        ("customer:u1", 5.0, 10, 1), ("ip:10.0.0.1", 100 / 60, 50, 1)]
    # an unknown role is limited like an anonymous caller
    assert q.principal_check("intruder", "x")[1:3] == (p.roles["anonymous"].rate,
                                                     p.roles["anonymous"].burst)
    assert parse_limit("10/h/3").rate == 10 / 3600
    for bad in ("fast", "10", "10/0", "-1/5", "10/fortnight/5", "1/2/3/4"):
        with pytest.raises(ConfigError, match="VOUCHER_RATE_CUSTOMER"):
            Settings.from_env({"VOUCHER_RATE_CUSTOMER": bad})


async def test_one_round_trip_charges_limits_and_checks_failure_budget(
    limiter: RateLimiter,
) -> None:
    policy = RateLimitPolicy.from_settings(Settings.from_env({"VOUCHER_RATE_FAILURES": "1/min/2"}))
    ok = await limiter.hit_and_check_failures([("req", 100.0, 3, 1)], ["customer:c1"], policy)
    assert ok.allowed and ok.key == "req" and ok.remaining == 2  # headers speak for "req"
    for _ in range(2):
        await limiter.penalize_failure(["customer:c1"], policy)
    denied = await limiter.hit_and_check_failures([("req", 100.0, 3, 1)], ["customer:c1"], policy)
    assert not denied.allowed and denied.key.startswith("fail:") and denied.retry_after_s > 0
    # the denied call charged nothing: "req" still has the two tokens left after the first
    again = await limiter.hit_many([("req", 100.0, 3, 1)])
    assert again.allowed and again.remaining >= 1
    # and checking never spends the failure budget of someone who has not failed
    for _ in range(5):
        assert (await limiter.hit_and_check_failures([], ["customer:c2"], policy)).allowed


async def test_concurrent_checks_are_coalesced_into_few_script_calls(
    limiter: RateLimiter,
) -> None:
    """Checks made concurrently travel together in one script call and give the same
    answers as separate calls: of 60 concurrent requests on a burst of 20 exactly 20 pass,
    each of a mixed batch is judged on its own keys, and a flag key rides along."""
    calls_before = limiter.calls
    decisions = await asyncio.gather(*[limiter.hit("crowd", rate=1.0, burst=20) for _ in range(60)])
    assert sum(d.allowed for d in decisions) == 20
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(20))
    assert all(d.retry_after_s > 0 for d in decisions if not d.allowed)
    assert limiter.calls - calls_before < 10  # 60 checks, a handful of calls

    await limiter.flag(["flagged"], ttl_s=5)
    mixed = await asyncio.gather(
        limiter.hit("solo-a", rate=1.0, burst=1),
        limiter.hit("solo-a", rate=1.0, burst=1),  # same bucket, after the first: denied
        limiter.hit("solo-b", rate=1.0, burst=1),
        limiter.hit_and_check_failures([("solo-c", 1.0, 1, 1)], [], flag_key="flagged"),
        limiter.hit_and_check_failures([("solo-d", 1.0, 1, 1)], [], flag_key="not-flagged"),
    )
    assert [d.allowed for d in mixed] == [True, False, True, True, True]
    assert mixed[3].flagged and not mixed[4].flagged


async def test_coalescing_off_gives_the_same_answers(services: Services, ns: str) -> None:
    rl = RateLimiter(services.redis_url, prefix=f"test:rl:{ns}", coalesce=False)
    try:
        decisions = await asyncio.gather(*[rl.hit("crowd", rate=1.0, burst=20) for _ in range(30)])
        assert sum(d.allowed for d in decisions) == 20
        assert rl.calls == 0  # every check made its own call
    finally:
        await rl.aclose()


async def test_pipelined_connection_carries_the_checks_and_agrees_with_redis_py(
    services: Services, ns: str
) -> None:
    """The limiter's own pipelined connection (serve/resp.py) answers the coalesced script
    calls once it is up, and a concurrent burst gets exactly the answers one check at a
    time through redis-py gets."""
    piped = RateLimiter(services.redis_url, prefix=f"test:rl:{ns}p:")
    plain = RateLimiter(aioredis.from_url(services.redis_url), prefix=f"test:rl:{ns}q:")
    try:
        await piped.hit("warm", rate=1000, burst=1000)  # loads the scripts, dials the pipe
        for _ in range(100):
            if piped._pipe is not None and piped._pipe.usable:
                break
            await asyncio.sleep(0.01)
        burst = [piped.hit("b", rate=0.01, burst=40) for _ in range(100)]
        got = [d.allowed for d in await asyncio.gather(*burst)]
        want = [(await plain.hit("b", rate=0.01, burst=40)).allowed for _ in range(100)]
        assert got.count(True) == want.count(True) == 40
        assert piped.pipe_calls >= 1 and piped.coalesced >= 100
    finally:
        await piped.aclose()
        await plain.aclose()


async def test_a_hung_redis_is_answered_by_the_replica_through_the_pipe_too(services: Services, ns: str) -> None:
    """A server that stops answering: the pipe's timeout ends the wait, the replica's own
    buckets answer and the limiter backs off, as with redis-py."""
    rl = RateLimiter(services.redis_url, prefix=f"test:rl:{ns}", timeout_s=0.2, backoff_s=5.0)
    try:
        await rl.hit("warm", rate=1000, burst=1000)
        for _ in range(100):
            if rl._pipe is not None and rl._pipe.usable:
                break
            await asyncio.sleep(0.01)
        assert rl._pipe is not None
        admin = aioredis.from_url(services.redis_url)
        try:
            await admin.execute_command("CLIENT", "PAUSE", "600", "ALL")
            t0 = time.monotonic()
            d = await rl.hit("k", rate=1, burst=1)
            assert d.allowed and d.degraded
            assert time.monotonic() - t0 < 0.5
        finally:
            await asyncio.sleep(0.7)
            await admin.aclose()
        assert rl.redis_errors == 1
    finally:
        await rl.aclose()


async def test_the_auth_epoch_changes_when_redis_loses_it(limiter: RateLimiter) -> None:
    """The epoch read with a flag stays the same while Redis keeps its data, and comes back
    new once it is gone (as after a restart without data), so cached keys are checked."""
    async def epoch() -> str:
        d = await limiter.hit_and_check_failures([("e", 100.0, 100, 1)], [], flag_key="f", epoch_key="ep")
        assert d.allowed and not d.flagged
        return d.epoch

    first = await epoch()
    assert first and await epoch() == first
    await limiter.redis.delete(limiter.prefix + "ep")
    second = await epoch()
    assert second and second != first and await epoch() == second
    assert len(await limiter.run_id()) == 40


async def test_a_durable_flag_is_set_once_on_disk(limiter: RateLimiter) -> None:
    await limiter.flag(["durable"], ttl_s=5, durable=True)
    d = await limiter.hit_and_check_failures([("x", 100.0, 100, 1)], [], flag_key="durable")
    assert d.flagged
