"""A shard's own view of whether it can serve checkout, for the gateway's readiness and
health endpoints (``serve/health.py``).

A shard can serve when it is loaded, not stopped (fenced, or its storage failed) and its
decisions are being answered: a decision batch that has waited ``stall_s`` (for its
commit, or for the claim of its idempotency keys) means the database froze or a lock holds
it, and every durable answer waits behind it; so does a writer with events piling up and
no commit for as long (fast ack mode answers before the commit). An idle shard is healthy
however long ago it last wrote. Answering never waits on the database: this reads memory
only, so a frozen Postgres cannot make the probe hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

from engine import errors

STALL_S = 3.0
_LOAD_WAIT_S = 0.5
_PROGRESS_WAIT_S = 0.05


class InFlight:
    """Decision batches in progress and when each began (the shard actor wraps its batch
    entry points in :meth:`track`)."""

    def __init__(self) -> None:
        self._started: dict[int, float] = {}
        self._next = 0

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        n = self._next = self._next + 1
        self._started[n] = time.monotonic()
        try:
            yield
        finally:
            del self._started[n]

    def oldest_s(self) -> float:
        """Age of the oldest batch still in progress; 0 when none is."""
        if not self._started:
            return 0.0
        return time.monotonic() - min(self._started.values())

    def __len__(self) -> int:
        return len(self._started)


def _state(status: str, reason: str | None = None, **facts: Any) -> dict[str, Any]:
    return {"status": status, "reason": reason, **facts}


async def shard_health(
    core: Any, inflight: InFlight | None = None, *, stall_s: float = STALL_S
) -> dict[str, Any]:
    """``{"status": "ok" | "degraded" | "down", "reason": ..., facts}`` of a
    :class:`ShardCore` whose decision batches ``inflight`` tracks."""
    if core.stopped is not None:
        return _state("down", core.stopped.message)
    try:
        await asyncio.wait_for(core.ready(), _LOAD_WAIT_S)
    except TimeoutError:
        return _state("down", "loading")
    except errors.VoucherError as exc:
        return _state("down", exc.message)
    writer = core.writer
    if writer is None or writer.failed:
        return _state("down", "its group commit failed; the shard is restarting")
    pending, waiting = len(core.state.events), writer.waiting
    idle = time.monotonic() - core.metrics.last_commit_at
    oldest = inflight.oldest_s() if inflight is not None else 0.0
    facts = {
        "codes": len(core.state.codes),
        "batches_in_flight": len(inflight) if inflight is not None else 0,
        "oldest_batch_s": round(oldest, 3),
        "pending_events": pending,
        "commit_waiters": waiting,
        "last_commit_s": round(idle, 3),
    }
    if oldest > stall_s:
        return _state(
            "down", f"stalled: a decision batch has waited {oldest:.1f}s for the database", **facts
        )
    if (pending or waiting) and idle > stall_s:
        # work that arrived just now on a long-idle shard looks the same for a moment:
        # a healthy writer commits it within a batch window
        batches = writer.batches
        await asyncio.sleep(_PROGRESS_WAIT_S)
        if writer.batches == batches and time.monotonic() - core.metrics.last_commit_at > stall_s:
            return _state(
                "down", f"stalled: events wait and nothing was committed for {idle:.1f}s", **facts
            )
    if not core.metrics.last_commit_ok:
        return _state("degraded", "the last group-commit attempt failed; retrying", **facts)
    return _state("ok", None, **facts)
