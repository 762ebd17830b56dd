"""Whose an ``Idempotency-Key`` is.

A key only means something to the caller that chose it, so the gateway scopes every key to
its caller before it reaches a shard: an API key by its own id, a logged-in user by their
user id. An API key acts for its owner (its principal carries the owner's user id), so
scoping by user id alone would let the owner -- or an admin with the same body -- replay
or collide with the key's answers; the two kinds of scope carry distinct prefixes, so no
user id can ever spell an API key's scope.

:data:`IdempotencyKey` is the header as every route that takes one declares it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Header

from engine import errors
from serve.auth import Principal

MAX_KEY_LEN = 255

IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=MAX_KEY_LEN)
]
"""The optional ``Idempotency-Key`` header of a checkout route (default ``None``)."""


def scoped_key(principal: Principal, key: str | None) -> str | None:
    """The key as the shards see it, or None without one. Raises
    :class:`engine.errors.InvalidInput` for a key of the wrong length."""
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_KEY_LEN:
        raise errors.InvalidInput(f"Idempotency-Key must be 1-{MAX_KEY_LEN} characters")
    if principal.kind == "api_key":
        if not principal.api_key_id:
            raise errors.InvalidInput("an API key caller without a key id cannot use Idempotency-Key")
        return f"k:{principal.api_key_id}:{key}"
    return f"u:{principal.user_id}:{key}"
