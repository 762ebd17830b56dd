"""Opaque cursors of keyset-paginated lists.

A cursor names the list it belongs to (``kind`` and its ``scope``, e.g. a campaign id) and
the last key handed out; the next page starts after that key. It is URL-safe base64 of a
small JSON array, so a client cannot mistake it for anything but a token, and anything
that is not a cursor this list handed out is :class:`InvalidCursor` (422), never a
database error.
"""

from __future__ import annotations

import base64
import binascii
import json

from engine.errors import InvalidCursor

MAX_KEY_LEN = 256
MAX_CURSOR_LEN = 1024


def encode(kind: str, scope: str, key: str) -> str:
    raw = json.dumps([kind, scope, key], separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str, kind: str, scope: str) -> str:
    """The last key of ``cursor``, when it is a cursor of this ``kind`` and ``scope``."""
    bad = InvalidCursor("cursor is not one this list handed out; start again without it")
    if not cursor or len(cursor) > MAX_CURSOR_LEN:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw.decode())
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad from None
    if (
        not isinstance(value, list)
        or len(value) != 3
        or value[0] != kind
        or value[1] != scope
        or not isinstance(value[2], str)
        or not value[2]
        or len(value[2]) > MAX_KEY_LEN
        or "\x00" in value[2]
    ):
        raise bad
    try:
        value[2].encode()
    except UnicodeEncodeError:  # an unpaired surrogate: no text Postgres can compare
        raise bad from None
    return value[2]
