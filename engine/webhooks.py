"""Shop webhooks: the signature, the retry schedule, event types and the stream position.
Pure: no I/O, time passed in.

Signature (header ``Voucher-Signature``), as Stripe signs: ``t=<unix seconds>,v1=<hex>``
where ``<hex>`` is HMAC-SHA256 over ``"<t>." + body`` keyed by the endpoint's secret. A
receiver recomputes it over the raw body, compares in constant time, and refuses a
timestamp older than its tolerance, so a captured delivery cannot be replayed later. The
header may carry several ``v1=`` values (one per secret while a secret is rotated); one
match is enough.

Every delivery carries the event's id in its body and in ``Voucher-Event-Id``: delivery
is at least once, and a receiver deduplicates by that id.

Position: events are read in commit order, ``(txid, kind, id)``: the writing
transaction's id, 0 for a change (redemption or events row) and 1 for a rollback, then
the event id. A reader only takes transactions below its snapshot's xmin (all ended), so
the order never gains a row behind a position already passed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable

import msgspec

from engine.errors import InvalidCursor, InvalidInput

SIGNATURE_HEADER = "Voucher-Signature"
EVENT_ID_HEADER = "Voucher-Event-Id"
EVENT_TYPE_HEADER = "Voucher-Event-Type"
ATTEMPT_HEADER = "Voucher-Delivery-Attempt"
DEFAULT_TOLERANCE_S = 300

EVENT_TYPES = (
    "redemption.succeeded",
    "redemption.rolled_back",
    "voucher.published",
    "voucher.updated",
    "campaign.created",
    "campaign.updated",
    "campaign.activated",
    "campaign.paused",
    "campaign.ended",
    "export.completed",
)
"""Every event type (``store.events.TYPES`` records the non-redemption ones)."""

WILDCARD = "*"
SUCCEEDED, ROLLED_BACK = "redemption.succeeded", "redemption.rolled_back"
# Event ids of redemption events, derived from the redemption's own id ("red_...").
SUCCEEDED_PREFIX, ROLLED_BACK_PREFIX = "evt_", "evt_rb_"


def succeeded_id(redemption_id: str) -> str:
    return SUCCEEDED_PREFIX + redemption_id


def rolled_back_id(redemption_id: str) -> str:
    return ROLLED_BACK_PREFIX + redemption_id


def redemption_of(event_id: str) -> tuple[str, str] | None:
    """``(event type, redemption id)`` of a redemption event's id, else None."""
    if event_id.startswith(ROLLED_BACK_PREFIX + "red_"):
        return ROLLED_BACK, event_id[len(ROLLED_BACK_PREFIX):]
    if event_id.startswith(SUCCEEDED_PREFIX + "red_"):
        return SUCCEEDED, event_id[len(SUCCEEDED_PREFIX):]
    return None


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def event_types(value: Iterable[str], field: str = "events") -> tuple[str, ...]:
    """The subscribed types, sorted and unique; ``["*"]`` stands for all of them.
    ``InvalidInput`` naming an unknown type."""
    out = set()
    for t in value:
        if t != WILDCARD and t not in EVENT_TYPES:
            raise InvalidInput(
                f"{field}: unknown event type {t!r}; types are {', '.join(EVENT_TYPES)} or *"
            )
        out.add(t)
    if not out:
        raise InvalidInput(f"{field} must name at least one event type (or *)")
    return (WILDCARD,) if WILDCARD in out else tuple(sorted(out))


def expand(types: Iterable[str]) -> frozenset[str]:
    """The concrete types a subscription (possibly ``*``) covers."""
    ts = frozenset(types)
    return frozenset(EVENT_TYPES) if WILDCARD in ts else ts


# --- signature -------------------------------------------------------------------------

_PART = re.compile(r"^\s*([a-z0-9]+)=([^,\s]*)\s*$")


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """Hex HMAC-SHA256 of ``"<timestamp>." + body``."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``Voucher-Signature`` header value for ``body`` sent at ``timestamp``."""
    return f"t={timestamp},v1={signature(secret, body, timestamp)}"


class SignatureError(ValueError):
    """Why a delivery's signature is refused (malformed, mismatch, too old)."""


def verify(
    secret: str, body: bytes, header: str, now: int, tolerance_s: int = DEFAULT_TOLERANCE_S
) -> int:
    """Check ``header`` against ``body``; returns its timestamp. Raises
    :class:`SignatureError` when it is malformed, matches no ``v1`` value, or its
    timestamp is more than ``tolerance_s`` away from ``now`` (a replay)."""
    if not isinstance(header, str) or len(header) > 4096:
        raise SignatureError("no signature header")
    ts: int | None = None
    sigs: list[str] = []
    for part in header.split(","):
        m = _PART.match(part)
        if m is None:
            raise SignatureError("malformed signature header")
        key, value = m.groups()
        if key == "t":
            if not value.isdigit() or len(value) > 12:
                raise SignatureError("malformed timestamp")
            ts = int(value)
        elif key == "v1":
            sigs.append(value)
    if ts is None or not sigs:
        raise SignatureError("signature header needs t= and v1=")
    expected = signature(secret, body, ts)
    if not any(hmac.compare_digest(expected, s) for s in sigs):
        raise SignatureError("signature does not match")
    if abs(now - ts) > tolerance_s:
        raise SignatureError(f"timestamp {ts} is outside the tolerance of {tolerance_s} s")
    return ts


# --- retries ---------------------------------------------------------------------------


def backoff_s(attempt: int, base_s: float, cap_s: float, jitter: float | None = None) -> float:
    """Delay after failed attempt number ``attempt`` (1 = the first delivery): base *
    2^(attempt-1), capped at ``cap_s``; ``jitter`` in [0, 1) (a random draw the caller
    passes, None for none) spreads it over [delay/2, delay) so endpoints that failed together do not
    retry together."""
    if attempt < 1:
        return 0.0
    delay = min(cap_s, base_s * (2.0 ** min(attempt - 1, 62)))
    if jitter is not None:
        delay = delay / 2 + delay / 2 * jitter
    return float(delay)


def gives_up(attempt: int, max_attempts: int) -> bool:
    """Whether failed attempt number ``attempt`` was the last one allowed."""
    return attempt >= max_attempts


# --- position in the event stream ------------------------------------------------------


class Position(msgspec.Struct, frozen=True, array_like=True):
    """After which event a reader is: ``(txid, kind, id)`` in commit order."""

    txid: int
    kind: int = -1
    id: str = ""


_CURSOR_ID = re.compile(r"^[A-Za-z0-9_.:-]{0,300}$")  # event ids (campaign ids carry "-")


def encode_cursor(p: Position) -> str:
    raw = msgspec.json.encode(p)
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, field: str = "cursor") -> Position:
    """The position a cursor from :func:`encode_cursor` stands for; InvalidInput if it is
    not one."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        p = msgspec.json.decode(raw, type=Position)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise InvalidCursor(f"{field} is not a cursor this API returned") from None
    if not 0 <= p.txid < 2**63 or p.kind not in (-1, 0, 1) or not _CURSOR_ID.match(p.id):
        raise InvalidCursor(f"{field} is not a cursor this API returned")
    return p
