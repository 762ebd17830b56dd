"""Putting messages on the delivery queue (the producer side of ``engine.delivery``).

``enqueue`` first records each message in ``deliveries`` (state ``queued``; a message that
already has a row keeps it), then adds to the channel's stream every message whose row is
still ``queued``. A crash between the two steps loses nothing: running the same enqueue
again adds what is missing. A message may so reach the stream twice; the sender checks the
row (and the provider the idempotency key) before sending, so it is still sent once.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
from redis.asyncio import Redis

from engine import delivery
from engine.delivery import DeliveryMessage

_INSERT = """
INSERT INTO deliveries (id, campaign_id, customer_id, channel, recipient, code, job_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[])
ON CONFLICT (id) DO NOTHING
"""
_QUEUED = "SELECT id FROM deliveries WHERE id = ANY($1::text[]) AND state = 'queued'"


async def enqueue(
    db: asyncpg.Pool | asyncpg.Connection, redis: Redis, messages: Sequence[DeliveryMessage]
) -> int:
    """Record and queue ``messages``; returns how many were added to the streams."""
    if not messages:
        return 0
    cols: list[list[str | None]] = [[], [], [], [], [], [], []]
    for m in messages:
        for col, value in zip(
            cols,
            (m.id, m.campaign_id, m.customer_id, m.channel, m.recipient, m.code, m.job_id),
            strict=True,
        ):
            col.append(value)
    await db.execute(_INSERT, *cols)
    queued = {r["id"] for r in await db.fetch(_QUEUED, cols[0])}
    pipe = redis.pipeline(transaction=False)
    n = 0
    for m in messages:
        if m.id in queued:
            pipe.xadd(delivery.stream(m.channel), {delivery.FIELD: delivery.encode(m)})
            n += 1
    if n:
        await pipe.execute()
    return n
