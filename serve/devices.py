"""Device tokens: how a login tells "the owner, on a device that signed in before" apart
from a guesser, so brute force can be stopped without locking the owner out.

From the same address, an attacker's request and the owner's differ only in the
password; if a correct password always got in, the attacker would have an oracle that no
failure budget could bound. OWASP's answer (device cookies) is what this module does: a
successful login returns a device token, an HMAC over the account and a random device id;
a later login to that account that presents it is checked against that device's own
failure budget only, never against the address's or the account's, which strangers spend.

A device token is not a credential: it lets a login be *tried* on the device's budget,
the password is still checked. A stolen one gives its holder that budget and no more.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

from serve.auth import normalize_email

DEVICE_TTL_S = 30 * 86400
_PREFIX = "dv1"


def account_key(email: str) -> str:
    """The account a login names, as a bounded key (the email is not stored in Redis).
    Addresses that are not valid emails share one key: no account has them."""
    try:
        norm = normalize_email(email)
    except Exception:
        return "invalid"
    return hashlib.sha256(norm.encode()).hexdigest()[:32]


class DeviceTokens:
    """Issues and checks device tokens under a key derived from the token secret."""

    def __init__(
        self, secret: bytes, ttl_s: int = DEVICE_TTL_S, clock: Callable[[], float] = time.time
    ) -> None:
        self._key = hmac.new(secret, b"voucher-engine device token", hashlib.sha256).digest()
        self.ttl_s = ttl_s
        self.clock = clock

    def _mac(self, device: str, expires: str, account: str) -> str:
        msg = f"{device}.{expires}.{account}".encode()
        digest = hmac.new(self._key, msg, hashlib.sha256).digest()[:18]
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def issue(self, account: str) -> str:
        device = secrets.token_urlsafe(12)
        expires = str(int(self.clock()) + self.ttl_s)
        return f"{_PREFIX}.{device}.{expires}.{self._mac(device, expires, account)}"

    def verify(self, token: str | None, account: str) -> str | None:
        """The device id when ``token`` is a live device token of ``account``, else None."""
        if not token or len(token) > 256:
            return None
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != _PREFIX or not parts[2].isdigit():
            return None
        _, device, expires, mac = parts
        if not hmac.compare_digest(mac, self._mac(device, expires, account)):
            return None
        if int(expires) < self.clock():
            return None
        return device
