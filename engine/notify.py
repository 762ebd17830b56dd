"""Admin notifications: the webhook signature, the retry schedule and the threshold rules.
Pure: no I/O, time passed in.

Signature (header ``X-Voucher-Signature``): ``t=<unix seconds>,v1=<hex>`` where ``<hex>``
is HMAC-SHA256 over ``"<t>." + body`` keyed by the webhook's secret. A receiver recomputes
it over the raw body, compares in constant time, and refuses timestamps older than its
tolerance (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import re

import msgspec

SIGNATURE_HEADER = "X-Voucher-Signature"
EVENT_HEADER = "X-Voucher-Event"
DEFAULT_TOLERANCE_S = 300

KINDS = (
    "campaign_started",
    "campaign_paused",
    "campaign_ended",
    "bank_low",
    "limit_nearly_exhausted",
    "delivery_failure_rate",
    "delivery_dead",
    "job_finished",
    "job_failed",
)

_SIG_RE = re.compile(r"^t=(\d{1,12}),v1=([0-9a-f]{64})$")


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-Voucher-Signature`` header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(
    secret: str, body: bytes, header: str, now: int, tolerance_s: int = DEFAULT_TOLERANCE_S
) -> bool:
    """Whether ``header`` is a valid signature of ``body`` made within ``tolerance_s``."""
    m = _SIG_RE.match(header.strip()) if isinstance(header, str) else None
    if m is None:
        return False
    t = int(m.group(1))
    if abs(now - t) > tolerance_s:
        return False
    expected = sign(secret, body, t).split("v1=", 1)[1]
    return hmac.compare_digest(expected, m.group(2))


def backoff_s(attempt: int, base_s: float, cap_s: float = 300.0) -> float:
    """Delay before retry number ``attempt`` (1 = the first retry): base * 2^(attempt-1),
    capped. Deterministic on purpose: the dispatcher's poll interval spreads retries."""
    if attempt < 1:
        return 0.0
    return float(min(cap_s, base_s * (2 ** (attempt - 1))))


class Notice(msgspec.Struct, frozen=True):
    """A notification to record: kind, campaign (or None) and the human message."""

    kind: str
    campaign_id: str | None
    message: str


def crossing(armed: bool, breached: bool, recovered: bool) -> tuple[bool, bool]:
    """One step of a threshold with hysteresis: ``(fire, armed_after)``.

    ``breached``: the value is past the threshold now; ``recovered``: it is back well on the
    safe side (past the re-arm level). An armed threshold fires once when breached and
    disarms; it re-arms only on recovery, so a value hovering at the threshold notifies
    once, not on every check."""
    if armed and breached:
        return True, False
    if not armed and recovered:
        return False, True
    return False, armed


def bank_low(available: int, threshold: int) -> tuple[bool, bool]:
    """``(breached, recovered)`` of the voucher bank: below the threshold; back above twice
    the threshold (a refill)."""
    return available < threshold, available >= 2 * threshold


def limit_nearly_exhausted(used: int, total: int | None, ratio: float) -> tuple[bool, bool]:
    """``(breached, recovered)`` of a campaign limit: ``used >= ratio * total``; recovered
    below ``ratio - 0.05`` (rollbacks). No limit: never breached."""
    if not total:
        return False, True
    return used >= ratio * total, used < (ratio - 0.05) * total
