"""Putting messages on the delivery queue (the producer side of ``engine.delivery``).

Postgres is the record of what must be sent; the streams in Redis only carry the work to
the senders. ``enqueue`` first records each message in ``deliveries`` (state ``queued``; a
message that already has a row keeps it), then adds to the channel's stream every message
whose row is still ``queued`` and writes on those rows the incarnation of the streams it
added them to (``stream_gen``): the Redis server's ``run_id``, which changes whenever the
server restarts or another one takes over.

Nothing is lost in between: a ``queued`` row whose incarnation is missing (the add failed,
Redis was down, the producer died) or is not the current one is added again by the delivery
workers (``actors/delivery.py``). Any restart or failover counts as a loss, since any may
lose the last writes (an append-only file synced every second, an older snapshot, an
asynchronous replica); after one, every queued row is added again. While
Redis is unreachable, ``enqueue`` records the rows and leaves the adding to that sweep.
A message may so reach the stream twice; the sender claims its row in Postgres (and the
provider checks the idempotency key) before sending, so it is still sent once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from engine import delivery, keys
from engine.delivery import DeliveryMessage
from store import delivery as delivery_store

log = logging.getLogger("voucher.delivery")


def _run_id(info: Any) -> str:
    run_id = info.get("run_id") if isinstance(info, dict) else None
    if not run_id:
        raise RedisError("INFO server has no run_id")
    return str(run_id)


async def incarnation(redis: Redis) -> str:
    """The streams' current incarnation: the Redis server's ``run_id``."""
    return _run_id(await redis.info("server"))


async def add_to_streams(
    db: asyncpg.Pool | asyncpg.Connection, redis: Redis, messages: Sequence[DeliveryMessage]
) -> None:
    """Add ``messages`` (rows already ``queued``) to their streams and record the
    incarnation they were added under. Raises when Redis cannot be reached."""
    if not messages:
        return
    # One connection: the entries land on the server whose run_id comes back first.
    pipe = redis.pipeline(transaction=False)
    pipe.info("server")
    for m in messages:
        pipe.xadd(keys.stream(m.channel), {delivery.FIELD: delivery.encode(m)})
    res = await pipe.execute()
    await delivery_store.mark_added(db, [m.id for m in messages], _run_id(res[0]))


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
    queued = await delivery_store.record_queued(db, cols)
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
