"""Garbage-collector settings for the long-lived, latency-critical processes (the gateway
replicas and the shard actors).

Both hold a large, long-lived heap (Ray and Serve internals; a shard's codes, redemptions
and idempotency records) and make mostly short-lived garbage per request. CPython's
default collector walks the whole tracked heap in every full (generation 2) collection:
measured at 3,000 redemptions/s, the gateway ran one twice a second at ~7 ms each, finding
no garbage, and a shard holding ~130k redemptions paused 40-180 ms per full collection.
Every decision in flight waits for such a pause.

:func:`settle_heap` collects once, then freezes what exists (start-up state, a shard's
loaded pool) into the permanent generation, which collections never walk, and raises the
thresholds so young garbage is collected in bigger, rarer steps and full collections are
rare. Freezing disables CPython's own brake on full collections (they run only once the
old generation grew by 25 %, measured against the unfrozen rest), hence the high third
threshold.
"""

from __future__ import annotations

import gc

#: gen0 every 7,000 net allocations (CPython: 700), gen1 every 20 gen0 (10), gen2 every
#: 100 gen1 (10)
THRESHOLDS = (7000, 20, 100)


def settle_heap() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


__all__ = ["THRESHOLDS", "settle_heap"]
