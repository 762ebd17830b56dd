"""Every Redis key the engine uses, and the prefixes they are built from.

Rate limiting (``serve/ratelimit.py``): every key is under :data:`LIMITER`; request limits
by caller and address, failure budgets under :data:`FAILURES` (customer, address, caller,
login tiers), and the API-key cache's flags and epoch (``serve/auth.py``).

Delivery (``engine/delivery.py`` has the contract, ``actors/delivery.py`` the workers): one
stream per channel read by one consumer group, a dead-letter stream, the hash of accepted
messages, a retry sorted set, a send-rate bucket and two locks per channel, and the
failure-rate windows and their notification markers per campaign.
"""

from __future__ import annotations

# --- rate limiting: keys below are relative to LIMITER ---------------------------------

LIMITER = "voucher:rl:"
FAILURES = "fail:"
"""Failure budgets: ``LIMITER + FAILURES + key`` of one of the failure keys below."""

API_KEY_EPOCH = "auth:epoch"
"""Changes whenever Redis loses its data: API keys cached under another one are checked again."""

CALLER = "caller"
LOGIN_IP = "login-ip"
LOGIN_ACCOUNT = "login-account"
LOGIN_DEVICE = "login-device"


def principal(role: str, subject: str) -> str:
    """Request limit of one caller (a user id, an API key id, a device) in its role."""
    return f"{role}:{subject}"


def ip(client_ip: str) -> str:
    """Request limit of a client address; as a failure key, its code-guessing budget."""
    return f"ip:{client_ip}"


def ip_of_caller(client_ip: str, caller: str) -> str:
    """Code-guessing budget of one caller at one address."""
    return f"ip:{client_ip}|{caller}"


def customer(customer_id: str) -> str:
    """Code-guessing budget of one customer."""
    return f"customer:{customer_id}"


def caller(caller_id: str) -> str:
    """Code-guessing budget of an API key or user, over all its customers."""
    return f"{CALLER}:{caller_id}"


def device(device_id: str) -> str:
    """The subject of a login from a trusted device (its request limit)."""
    return f"device:{device_id}"


def login(kind: str, who: str, tier: int) -> str:
    """One tier of a failed-login budget; ``kind`` is LOGIN_IP, LOGIN_ACCOUNT or LOGIN_DEVICE."""
    return f"{kind}:{who}#{tier}"


def api_key_flag(key_id: str) -> str:
    """Set when an API key is revoked or its owner's roles change."""
    return f"auth:stale:{key_id}"


# --- delivery ---------------------------------------------------------------------------

DELIVERY = "voucher:delivery:"
DEAD_STREAM = DELIVERY + "dead"
"""Messages that used up their attempts."""
GROUP = "senders"
"""The consumer group of the delivery workers on every channel's stream."""
SENT_MARKS = DELIVERY + "sent"
"""Hash: message id -> worker, for messages a provider accepted whose row is not yet ``sent``."""


def stream(channel: str) -> str:
    """The channel's delivery stream."""
    return DELIVERY + channel


def retry(channel: str) -> str:
    """Sorted set of the channel's messages waiting for a retry, scored by due time."""
    return f"{DELIVERY}retry:{channel}"


def send_rate(channel: str) -> str:
    """The channel's send-rate bucket, shared by all workers (GCRA)."""
    return f"{DELIVERY}send-rate:{channel}"


def requeue_lock(channel: str) -> str:
    """Held by the worker that adds the channel's lost stream entries again."""
    return f"{DELIVERY}requeue:{channel}"


def sweep_lock(channel: str) -> str:
    """Held by the worker that sweeps the channel's stalled rows."""
    return f"{DELIVERY}sweep:{channel}"


def failure_window(campaign_id: str, window: int) -> str:
    """Hash of a campaign's send attempts and failures in one failure-rate window."""
    return f"{DELIVERY}fr:{campaign_id}:{window}"


def failure_alerted(campaign_id: str, window: int) -> str:
    """Set once a campaign's failure rate was notified in the window."""
    return f"{DELIVERY}fr-alerted:{campaign_id}:{window}"


def dead_alerted(campaign_id: str, window: int) -> str:
    """Set once a campaign's dead-lettered messages were notified in the window."""
    return f"{DELIVERY}dead-alerted:{campaign_id}:{window}"
