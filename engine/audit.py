"""Who did something: the actor recorded with every change in the audit log, and the
audit log's page cursors."""

from __future__ import annotations

import base64
import binascii

import msgspec

from engine.errors import InvalidCursor


class Actor(msgspec.Struct, frozen=True):
    """A user (``kind="user"``) or an API key acting for its owner (``kind="api_key"``,
    ``id`` the owner, ``key_id`` the key); ``system`` for the engine's own changes."""

    kind: str
    id: str
    key_id: str | None = None


SYSTEM = Actor("system", "engine")

_CURSOR_PREFIX = "audit:"


def cursor_after(entry_id: int) -> str:
    """The opaque cursor of the page that follows the entry ``entry_id`` (newest first)."""
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{entry_id}".encode()).decode().rstrip("=")


def entry_before(cursor: str) -> int:
    """The entry id a cursor continues below; :class:`InvalidCursor` for any text that
    :func:`cursor_after` did not make."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidCursor("cursor is not one this list handed out") from None
    digits = raw.removeprefix(_CURSOR_PREFIX)
    if digits == raw or not digits.isascii() or not digits.isdigit() or len(digits) > 18:
        raise InvalidCursor("cursor is not one this list handed out")
    return int(digits)
