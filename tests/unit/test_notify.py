"""Webhook signatures, the retry schedule and threshold crossings (engine.notify; pure)."""

from __future__ import annotations

from engine import notify


def test_sign_and_verify() -> None:
    body = b'{"kind":"bank_low","campaign_id":"c1"}'
    header = notify.sign("s3cret-s3cret-s3cret", body, 1_700_000_000)
    assert header.startswith("t=1700000000,v1=") and len(header.split("v1=")[1]) == 64
    assert notify.verify("s3cret-s3cret-s3cret", body, header, now=1_700_000_010)


def test_tampering_is_detected() -> None:
    secret = "s3cret-s3cret-s3cret"
    body = b'{"kind":"bank_low"}'
    header = notify.sign(secret, body, 1_700_000_000)
    now = 1_700_000_001
    assert not notify.verify(secret, body + b" ", header, now)  # body changed
    assert not notify.verify("another-secret-value", body, header, now)  # wrong key
    forged_t = header.replace("t=1700000000", "t=1700000001")
    assert not notify.verify(secret, body, forged_t, now)  # timestamp is signed too
    flipped = header[:-1] + ("0" if header[-1] != "0" else "1")
    assert not notify.verify(secret, body, flipped, now)
    assert not notify.verify(secret, body, header, now=1_700_000_000 + 301)  # replay, too old
    for junk in ("", "v1=abc", "t=x,v1=" + "0" * 64, header + ",v0=1"):
        assert not notify.verify(secret, body, junk, now)


def test_backoff_doubles_and_is_capped() -> None:
    assert [notify.backoff_s(n, 1.0) for n in range(0, 5)] == [0.0, 1.0, 2.0, 4.0, 8.0]
    assert notify.backoff_s(30, 1.0, cap_s=300.0) == 300.0


def test_threshold_fires_once_per_crossing() -> None:
    armed = True
    fired = []
    # the bank drains, hovers under the threshold, is refilled, drains again
    for available in (5000, 900, 800, 950, 1100, 1500, 2500, 3000, 700, 600):
        breached, recovered = notify.bank_low(available, 1000)
        fire, armed = notify.crossing(armed, breached, recovered)
        if fire:
            fired.append(available)
    assert fired == [900, 700]  # hovering (950, 1100, 1500) does not re-fire; a refill re-arms


def test_limit_nearly_exhausted() -> None:
    assert notify.limit_nearly_exhausted(90, 100, 0.9) == (True, False)
    assert notify.limit_nearly_exhausted(89, 100, 0.9) == (False, False)
    assert notify.limit_nearly_exhausted(84, 100, 0.9) == (False, True)
    assert notify.limit_nearly_exhausted(10**9, None, 0.9) == (False, True)
