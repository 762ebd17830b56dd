"""A shard's own view of whether it can serve checkout, for the gateway's readiness and
health endpoints (``serve/health.py``).

A shard can serve when it is loaded, not stopped (fenced, or its storage failed) and its
group commit is moving: a writer with events or waiters whose last commit attempt ended
``stall_s`` ago and that makes no progress is stalled (the database froze mid-commit, or a
lock holds it), and durable answers wait behind it. An idle writer is healthy however
long ago it last wrote. Answering never waits on the database: this reads memory only, so
a frozen Postgres cannot make the probe hang.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from engine import errors

STALL_S = 3.0
_LOAD_WAIT_S = 0.5
_PROGRESS_WAIT_S = 0.05


def _state(status: str, reason: str | None = None, **facts: Any) -> dict[str, Any]:
    return {"status": status, "reason": reason, **facts}


async def shard_health(core: Any, *, stall_s: float = STALL_S) -> dict[str, Any]:
    """``{"status": "ok" | "down", "reason": ..., facts}`` of a :class:`ShardCore`."""
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
    facts = {
        "codes": len(core.state.codes),
        "pending_events": pending,
        "commit_waiters": waiting,
        "last_commit_s": round(idle, 3),
    }
    if (pending or waiting) and idle > stall_s:
        # work that arrived just now on a long-idle shard looks the same for a moment:
        # a healthy writer commits it within a batch window
        batches = writer.batches
        await asyncio.sleep(_PROGRESS_WAIT_S)
        if writer.batches == batches and time.monotonic() - core.metrics.last_commit_at > stall_s:
            return _state(
                "down", f"group commit stalled: nothing committed for {idle:.1f}s", **facts
            )
    if not core.metrics.last_commit_ok:
        return _state("degraded", "the last group-commit attempt failed; retrying", **facts)
    return _state("ok", None, **facts)
