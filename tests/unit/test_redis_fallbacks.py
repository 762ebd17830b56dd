"""What the limiters answer without Redis: the local GCRA (engine/gcra.py) as the gateway
uses it (serve/ratelimit.py) and as the delivery workers take send permits from it
(actors/delivery.py), on an injected clock."""

from __future__ import annotations

from engine.gcra import LocalGcra, permits
from serve.ratelimit import _combine


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _decide(g: LocalGcra, mode: str, checks: list[tuple[str, float, int, int]], peek_from: int | None = None):  # type: ignore[no-untyped-def]
    return _combine(checks, g.run(mode, checks, peek_from), 0, peek_from)


def test_local_gcra_keeps_a_burst_and_refills_at_the_rate() -> None:
    clock = Clock()
    g = LocalGcra(clock)
    got = [_decide(g, "all", [("k", 2.0, 3, 1)]).allowed for _ in range(5)]
    assert got == [True, True, True, False, False]
    denied = _decide(g, "all", [("k", 2.0, 3, 1)])
    assert 0.49 < denied.retry_after_s <= 0.5
    clock.now += 0.5
    assert _decide(g, "all", [("k", 2.0, 3, 1)]).allowed


def test_local_failure_budget_is_peeked_and_charged_like_the_script() -> None:
    g = LocalGcra(Clock())
    budget = [("fail:customer:c", 10 / 60, 3, 1)]
    for _ in range(5):  # checking never spends it
        assert _decide(g, "peek", budget).allowed
    for _ in range(3):
        _decide(g, "each", budget)
    assert not _decide(g, "peek", budget).allowed
    # the hot call: the request limit is not charged when the budget denies
    hot = [("req", 100.0, 2, 1), *budget]
    d = _decide(g, "all", hot, peek_from=1)
    assert not d.allowed and d.key == "fail:customer:c"
    other = [("req", 100.0, 2, 1), ("fail:customer:d", 10 / 60, 3, 1)]
    assert _decide(g, "all", other, peek_from=1).remaining == 1  # "req" still had both


def test_local_gcra_forgets_full_buckets_first_when_it_grows() -> None:
    clock = Clock()
    g = LocalGcra(clock)
    g.MAX_KEYS = 10
    _decide(g, "each", [("guesser", 0.001, 2, 2)])  # empty for a long time
    for i in range(20):
        _decide(g, "all", [(f"k{i}", 1000.0, 10, 1)])
        clock.now += 0.01  # each refills within 1 ms
    assert len(g._tat) <= 10
    assert not _decide(g, "peek", [("guesser", 0.001, 2, 1)]).allowed


def test_delivery_local_permits_grant_their_share() -> None:
    clock = Clock()
    g = LocalGcra(clock)
    granted, wait = permits(g.run("take", [("sms", 5.0, 5.0, 8)]))
    assert granted == 5 and 0 < wait <= 0.2
    assert permits(g.run("take", [("sms", 5.0, 5.0, 3)]))[0] == 0
    clock.now += 1.0  # a second later: five more
    assert permits(g.run("take", [("sms", 5.0, 5.0, 8)]))[0] == 5
    clock.now += 0.5  # half a second: two and a half, so two
    granted, wait = permits(g.run("take", [("sms", 5.0, 5.0, 8)]))
    assert granted == 2 and abs(wait - 0.1) < 1e-6
