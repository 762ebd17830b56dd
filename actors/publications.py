"""Publishing: give one customer a campaign's code now, and optionally message it.

The code comes from the existing assignment path (``assign`` on the shard deciding
``hash(campaign, customer)``, with its fallback to other shards' banks): idempotent per
campaign x customer, so a customer who already holds a code of the campaign (an issuance, an
import, an earlier publication) gets that code, and concurrent repeats get one code. The
publication row, its ``voucher.published`` event and its messages (``deliveries``, state
``queued``) are then written in one transaction (``store.publications.create``); the
unique key on (campaign, customer) makes concurrent repeats one publication. After the
commit the queued messages are added to the delivery streams; should that fail (Redis away,
the process gone), the delivery workers' sweep adds every queued row that is not on the
current streams (``actors.delivery_queue``).

A failure after the assignment and before the commit leaves the customer holding the code
and no publication: a retry finds the same code and completes it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from actors.delivery_queue import add_to_streams
from engine import errors
from engine.audit import Actor
from engine.delivery import new_message
from engine.publications import check_publishable, plan_deliveries, unique_channels
from store import publications as store
from store.pools import LazyPool

log = logging.getLogger("voucher.publications")
PREFIX = "pub_"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Publisher:
    """Publications over an engine client, a Postgres pool and the delivery streams."""

    def __init__(
        self, engine: Any, pool: LazyPool, redis: Redis, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.engine = engine
        self.pool = pool
        self.redis = redis
        self.clock = clock

    async def publish(
        self,
        campaign_id: str,
        customer_id: str,
        channels: Sequence[str],
        actor: Actor | None = None,
    ) -> dict[str, Any]:
        """The publication (``created``: whether this call made it). Raises UnknownCampaign
        / NotFound (404), the campaign's state (409), BankExhausted (409)."""
        chans = unique_channels(channels)
        pool = await self.pool()
        campaign = await self.engine.campaign(campaign_id)  # UnknownCampaign: 404
        cust = await store.customer(pool, customer_id)
        if cust is None:
            raise errors.NotFound(f"no customer has id {customer_id!r}")
        existing = await store.find(pool, campaign_id, customer_id)
        if existing is not None:
            return {**existing, "created": False}
        check_publishable(campaign, self.clock())
        try:
            assignment = await self.engine.assign(campaign_id, customer_id)
        except errors.BankExhausted:
            raise errors.BankExhausted(
                f"campaign {campaign_id} has no code left to publish; generate or import more"
                " codes (POST /v1/campaigns/{id}/generate) and publish again"
            ) from None
        pub_id = PREFIX + os.urandom(10).hex()
        targets = plan_deliveries(cust, chans)
        messages = [
            new_message(
                campaign_id,
                customer_id,
                t.channel,  # type: ignore[arg-type]
                t.address,
                assignment.code,
                locale=cust.locale,
                name=cust.name,
                job_id=pub_id,
            )
            for t in targets
            if t.address is not None
        ]
        ids: dict[str, str] = {m.channel: m.id for m in messages}
        pub = {
            "id": pub_id,
            "campaign_id": campaign_id,
            "customer_id": customer_id,
            "code": assignment.code,
            "channels": list(chans),
            "deliveries": [
                {"channel": t.channel, "id": ids[t.channel]}
                if t.address is not None
                else {"channel": t.channel, "id": None, "status": t.skipped}
                for t in targets
            ],
        }
        out, created, to_add = await store.create(pool, pub, messages, actor)
        if to_add:
            try:
                await add_to_streams(pool, self.redis, to_add)
            except (RedisError, OSError) as exc:
                log.warning(
                    "publication %s: Redis unreachable (%s); its %d messages are recorded and"
                    " the delivery workers add them to the streams when it is back",
                    pub_id,
                    exc,
                    len(to_add),
                )
        return {**out, "created": created}
