"""Pure rules of the delivery workers: retry schedule, provider-error classification, the
failure-rate alarm window, and the template locale fallback chain.

No I/O here: the workers (``actors/delivery.py``) pass in the clock and the random source.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Iterable
from dataclasses import dataclass


class SendError(Exception):
    """A channel adapter could not hand a message to its provider."""

    temporary: bool = True

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TemporaryError(SendError):
    """Worth retrying later (connection trouble, 4xx SMTP replies, HTTP 5xx/429/timeouts)."""

    temporary = True


class PermanentError(SendError):
    """Retrying will not help (5xx SMTP replies, HTTP 4xx except 408/429, bad recipient)."""

    temporary = False


def classify_smtp(code: int, text: str = "") -> SendError:
    """RFC 5321: 4yz replies are transient, 5yz permanent; anything else is a protocol
    surprise, treated as transient (the message is not lost)."""
    reason = f"SMTP {code} {text}".strip()
    if 500 <= code <= 599:
        return PermanentError(reason)
    return TemporaryError(reason)


def classify_http(status: int, text: str = "") -> SendError | None:
    """``None`` for 2xx; 408, 425, 429 and 5xx are temporary; other 4xx (and 3xx, which a
    provider API should not answer) are permanent."""
    if 200 <= status <= 299:
        return None
    reason = f"HTTP {status} {text[:200]}".strip()
    if status in (408, 425, 429) or status >= 500:
        return TemporaryError(reason)
    return PermanentError(reason)


def backoff_s(
    attempt: int,
    *,
    base_s: float,
    max_s: float,
    rand: Callable[[], float] = _random.random,
) -> float:
    """Delay before retry number ``attempt`` (1 = the first retry): exponential with "full
    jitter" (uniform in [cap/2, cap] with ``cap = min(max_s, base_s * 2**(attempt-1))``),
    so retries of many failed messages spread out instead of hitting the provider
    together, while the delay still grows with every attempt."""
    if attempt < 1:
        raise ValueError("attempt starts at 1")
    cap = min(max_s, base_s * (2 ** min(attempt - 1, 62)))
    return cap / 2 + rand() * cap / 2


def locale_chain(customer_locale: str | None, campaign_default: str | None) -> list[str]:
    """Locales to try, best first: the customer's (``de-AT``), its language (``de``), the
    campaign's default locale and its language. The built-in template comes after these.

    Locales compare case-insensitively with ``_`` and ``-`` equal (``de_at`` = ``de-AT``).
    """
    out: list[str] = []
    for loc in (customer_locale, campaign_default):
        if not loc:
            continue
        norm = normalize_locale(loc)
        for cand in (norm, norm.split("-", 1)[0]):
            if cand and cand not in out:
                out.append(cand)
    return out


def normalize_locale(locale: str) -> str:
    """``de_at`` / ``DE-at`` -> ``de-AT``; ``en`` -> ``en``."""
    parts = locale.strip().replace("_", "-").split("-")
    head = parts[0].lower()
    tail = [p.upper() if len(p) == 2 else p for p in parts[1:] if p]
    return "-".join([head, *tail])


@dataclass
class FailureWindow:
    """Counts of one campaign's send attempts in one time window (the alarm's input)."""

    attempts: int = 0
    failures: int = 0


def window_index(now_s: float, window_s: float) -> int:
    return int(now_s // window_s)


def failure_rate_exceeded(w: FailureWindow, *, threshold: float, min_attempts: int) -> bool:
    """True when at least ``min_attempts`` attempts were made in the window and more than
    ``threshold`` (a fraction) of them failed. Small samples never alarm: two failures of
    three attempts is noise, not a failing provider."""
    if w.attempts < max(1, min_attempts):
        return False
    return w.failures / w.attempts > threshold


def count_outcomes(outcomes: Iterable[tuple[str, bool]]) -> dict[str, FailureWindow]:
    """(campaign_id, failed) per attempt -> counts per campaign."""
    per: dict[str, FailureWindow] = {}
    for campaign_id, failed in outcomes:
        w = per.setdefault(campaign_id, FailureWindow())
        w.attempts += 1
        if failed:
            w.failures += 1
    return per
