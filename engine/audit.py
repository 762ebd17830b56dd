"""Who did something: the actor recorded with every change in the audit log."""

from __future__ import annotations

import msgspec


class Actor(msgspec.Struct, frozen=True):
    """A user (``kind="user"``) or an API key acting for its owner (``kind="api_key"``,
    ``id`` the owner, ``key_id`` the key); ``system`` for the engine's own changes."""

    kind: str
    id: str
    key_id: str | None = None


SYSTEM = Actor("system", "engine")
