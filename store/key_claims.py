"""A shard's idempotency keys in Postgres: claimed before a batch is decided, swept when
they expire (``engine/idempotency.py`` says what a claim's answer means).

A batch without keys goes straight to memory; one with keys this shard does not remember
costs one statement before its decision. A key another batch of this shard is claiming is
left to that batch (waited for, then looked up again), so a shard never claims a key twice
at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from engine.shard_state import Outcome, ShardState
from store.shards import ShardStore

# A pending claim (decided, answer not committed) older than this is taken over by any
# shard: its holder died, or sits on a commit far past the group commit's few
# milliseconds. Its own bucket's owner takes it over at once (engine/idempotency.py).
CLAIM_STALE_AFTER = timedelta(seconds=10)
# Expired keys deleted per statement by the sweep.
EXPIRED_KEYS_CHUNK = 5000


def utcnow() -> datetime:
    return datetime.now(UTC)


class KeyClaims:
    def __init__(self, state: ShardState, buckets: list[int], ttl: timedelta) -> None:
        self.state = state
        self.buckets = buckets
        self.ttl = ttl
        # keys this shard is claiming in storage, resolved once decided
        self._claiming: dict[str, asyncio.Future[None]] = {}

    async def decide(
        self,
        store: ShardStore | None,
        op: str,
        items: list[Any],
        fn: Callable[[Any], Outcome],
    ) -> list[Outcome]:
        """``fn`` over the batch, its keys claimed first."""
        keys = await self._claim(store, op, items)
        try:
            return [fn(x) for x in items]
        finally:
            self.state.end_claims(keys)
            for k in keys:
                fut = self._claiming.pop(k, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)

    async def _claim(self, store: ShardStore | None, op: str, items: list[Any]) -> list[str]:
        while True:
            claims = self.state.claims_for(op, items)
            if not claims:
                return []
            busy = [self._claiming[c.key] for c in claims if c.key in self._claiming]
            if not busy:
                break
            await asyncio.wait(busy)
        loop = asyncio.get_running_loop()
        keys = [c.key for c in claims]
        for k in keys:
            self._claiming[k] = loop.create_future()
        try:
            assert store is not None
            now = utcnow()
            stored = await store.claim_keys(
                claims, self.buckets, now - self.ttl, now - CLAIM_STALE_AFTER, fence=store.fence
            )
            self.state.accept_claims(claims, stored)
        except BaseException:
            self.state.end_claims(keys)
            for k in keys:
                self._claiming.pop(k).set_result(None)
            raise
        return keys

    async def expire(self, store: ShardStore) -> int:
        """Forget the keys older than the TTL, in memory and in Postgres (this shard's
        buckets only); returns how many rows were deleted."""
        before = utcnow() - self.ttl
        self.state.prune_idempotency(before)
        return await store.delete_expired_keys(
            self.buckets, before, EXPIRED_KEYS_CHUNK, fence=store.fence
        )
