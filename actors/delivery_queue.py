"""Putting messages on the delivery queue (the producer side of ``engine.delivery``).

Postgres is the record of what must be sent; the streams in Redis only carry the work to
the senders. ``enqueue`` first records each message in ``deliveries`` (state ``queued``; a
message that already has a row keeps it), then adds to the channel's stream every message
whose row is still ``queued`` and writes on those rows the incarnation token of the streams
it added them to (``stream_gen``).

Nothing is lost in between: a ``queued`` row whose token is missing (the add failed, Redis
was down, the producer died) or is not the current incarnation's (Redis restarted without
its data) is added again by the delivery workers' sweep (``actors/delivery.py``). While
Redis is unreachable, ``enqueue`` records the rows and leaves the adding to that sweep.
A message may so reach the stream twice; the sender claims its row in Postgres (and the
provider checks the idempotency key) before sending, so it is still sent once.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from engine import delivery
from engine.delivery import DeliveryMessage

log = logging.getLogger("voucher.delivery")

_INSERT = """
INSERT INTO deliveries (id, campaign_id, customer_id, channel, recipient, code, job_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[])
ON CONFLICT (id) DO NOTHING
"""
_QUEUED = "SELECT id FROM deliveries WHERE id = ANY($1::text[]) AND state = 'queued'"
# SKIP LOCKED: a row locked meanwhile is being claimed by a sender (it leaves `queued`); waiting
# for it, with the rows locked in another order than the sender's, could deadlock.
_ADDED = """
UPDATE deliveries SET stream_gen = $2
WHERE id IN (SELECT id FROM deliveries WHERE id = ANY($1::text[]) AND state = 'queued'
             FOR UPDATE SKIP LOCKED)
"""

# The current incarnation token; ARGV[1] becomes it when there is none (Redis is new or
# lost its data). One call, so every caller agrees on the token.
_INCARNATION_LUA = r"""
local t = redis.call('GET', KEYS[1])
if not t then
  t = ARGV[1]
  redis.call('SET', KEYS[1], t)
end
return t
"""


async def incarnation(redis: Redis) -> str:
    """The token of the streams' current incarnation (created if Redis has none)."""
    raw: Any = await redis.eval(_INCARNATION_LUA, 1, delivery.INCARNATION_KEY, uuid.uuid4().hex)
    return raw.decode() if isinstance(raw, bytes) else str(raw)


async def add_to_streams(
    db: asyncpg.Pool | asyncpg.Connection, redis: Redis, messages: Sequence[DeliveryMessage]
) -> None:
    """Add ``messages`` (rows already ``queued``) to their streams and record the
    incarnation they were added under. Raises when Redis cannot be reached."""
    if not messages:
        return
    pipe = redis.pipeline(transaction=False)
    pipe.eval(_INCARNATION_LUA, 1, delivery.INCARNATION_KEY, uuid.uuid4().hex)
    for m in messages:
        pipe.xadd(delivery.stream(m.channel), {delivery.FIELD: delivery.encode(m)})
    res = await pipe.execute()
    token = res[0].decode() if isinstance(res[0], bytes) else str(res[0])
    await db.execute(_ADDED, [m.id for m in messages], token)


async def enqueue(
    db: asyncpg.Pool | asyncpg.Connection, redis: Redis, messages: Sequence[DeliveryMessage]
) -> int:
    """Record and queue ``messages``; returns how many are queued for sending (rows still
    ``queued``). They are on the streams at once, or, while Redis is unreachable, added by
    the workers' sweep once it is back."""
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
    todo = [m for m in messages if m.id in queued]
    try:
        await add_to_streams(db, redis, todo)
    except (RedisError, OSError) as exc:
        log.warning(
            "delivery queue: Redis unreachable (%s); %d messages recorded, the workers add "
            "them to the streams when it is back",
            exc,
            len(todo),
        )
    return len(todo)
