"""Idempotency keys shared by every shard: what a shard asks storage before deciding a
batch, and what it makes of the answer.

A key belongs to one caller (``serve/`` scopes it) but may reach any shard: the same key
sent with two bodies whose codes live on two shards must still run once. So a key is
decided globally: before deciding a batch, the shard *claims* the keys it does not remember
with one statement; the claim either wins (the key is new, expired, or a claim that can
never commit), or finds the key's row as another request left it. The answer is stored
into the claimed row by the same group commit that persists the decision, so the record is
durable exactly when the decision is.

Pure: the statement lives in ``store/shards.py``; :func:`settle` turns its rows into
verdicts that :class:`engine.shard_state.ShardState` applies synchronously, in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from enum import Enum

import msgspec


class Claim(msgspec.Struct, frozen=True):
    """A key a shard wants to decide: the request's fingerprint and the bucket it was
    routed by (the owner of that bucket reloads the record after a restart)."""

    key: str
    bucket: int
    fingerprint: bytes
    at: datetime


class Stored(msgspec.Struct, frozen=True):
    """A key's row as the claim statement left it. ``won``: this claim holds it now.
    ``response`` is None while the holder has not committed its decision."""

    key: str
    won: bool
    fingerprint: bytes
    response: bytes | None
    at: datetime


class Verdict(Enum):
    MINE = "mine"  # this shard holds the key: decide the request, record its answer
    FINAL = "final"  # the key has a committed answer: replay it (or conflict)
    PENDING = "pending"  # another request holds it and has not committed: retry later


class Settled(msgspec.Struct, frozen=True):
    verdict: Verdict
    fingerprint: bytes  # the fingerprint the key is held with
    response: bytes | None = None
    at: datetime | None = None


def settle(claims: Sequence[Claim], stored: Iterable[Stored]) -> dict[str, Settled]:
    """The verdict on every claimed key. A key the statement did not return counts as
    pending: the only safe answers for it are "retry" or "conflict", never "run"."""
    rows = {s.key: s for s in stored}
    out: dict[str, Settled] = {}
    for c in claims:
        s = rows.get(c.key)
        if s is None:
            out[c.key] = Settled(Verdict.PENDING, c.fingerprint)
        elif s.won:
            out[c.key] = Settled(Verdict.MINE, s.fingerprint)
        elif s.response is not None:
            out[c.key] = Settled(Verdict.FINAL, s.fingerprint, s.response, s.at)
        else:
            out[c.key] = Settled(Verdict.PENDING, s.fingerprint)
    return out
