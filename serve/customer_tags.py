"""The stored customers' tags, as a gateway replica knows them, for campaigns with
customer rules (``rules.customer``).

Freshness: a replica keeps a customer's tags for ``ttl_s`` (``VOUCHER_CUSTOMER_TAGS_TTL_S``,
30 s by default) after it read them, so a change to a customer's tags reaches every
decision within that time. Tags are read only when a shard asks for them (a campaign with
customer rules, a request without ``customer_tags``), never for other checkouts; after
that the cached tags ride along with the customer's next requests at no cost. A customer
with no stored row has no tags.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

import asyncpg

from engine import errors
from store import customers
from store.pools import LazyPool


class CustomerTags:
    def __init__(
        self, db: LazyPool, *, ttl_s: float = 30.0, max_entries: int = 100_000, timeout_s: float = 2.0
    ) -> None:
        self.db = db
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.timeout_s = timeout_s
        self._entries: OrderedDict[str, tuple[float, tuple[str, ...]]] = OrderedDict()

    def cached(self, customer_id: str) -> tuple[str, ...] | None:
        """The tags read less than ``ttl_s`` ago, or None (no I/O)."""
        hit = self._entries.get(customer_id)
        if hit is None:
            return None
        if time.monotonic() - hit[0] > self.ttl_s:
            del self._entries[customer_id]
            return None
        return hit[1]

    async def load(self, customer_id: str) -> tuple[str, ...]:
        """The customer's stored tags, read now; :class:`errors.Unavailable` (503) when the
        database does not answer within ``timeout_s``."""
        try:
            async with asyncio.timeout(self.timeout_s):
                tags = await customers.tags_of(await self.db(), customer_id)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise errors.Unavailable("the customer's tags cannot be read now; retry") from exc
        self.remember(customer_id, tags)
        return tags

    def remember(self, customer_id: str, tags: tuple[str, ...]) -> None:
        self._entries[customer_id] = (time.monotonic(), tags)
        self._entries.move_to_end(customer_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
