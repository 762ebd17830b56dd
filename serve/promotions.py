"""Automatic promotions at checkout (``apply_promotions: true``): which promotions a
gateway replica asks, and in what order (engine/promotions.py says how they stack).

Each replica keeps the promotions it knows (:class:`PromotionCatalog`), pulled from
Postgres by revision at most every ``refresh_s`` (2 s): a promotion activated, edited or
ended is seen by every replica within that time. The catalog only chooses whom to ask;
each promotion's shard decides for good on its own copy (state, window, limits,
per-customer use), so a stale catalog can miss a promotion for a moment but never gives
one that is no longer on.

A promotion's decision is keyed by the checkout's idempotency key and the promotion's id,
so a retried checkout replays each part once: the code's redemption and every promotion's.
Which promotions a keyed redemption asks is kept too (:class:`Manifests`, in Postgres,
before the first is asked): a retry asks exactly those, in the same order, whatever
started or ended since, so it answers what the first attempt gave and gives nothing more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from engine import errors
from engine.campaigns import Campaign
from engine.checkouts import fingerprint
from engine.orders import Order
from engine.promotions import Taken, add, candidates, explained_pricing, key_of
from engine.shard_state import Outcome, RedeemRequest
from store import campaigns as campaign_store
from store import manifests
from store.pools import LazyPool

Decide = Callable[[str, RedeemRequest], Awaitable[Outcome]]
#: the promotions a keyed redemption asks: given the ids the catalog chose now, the ids
#: its first attempt chose (the same list on a first attempt)
Fix = Callable[[RedeemRequest, list[str]], Awaitable[list[str]]]


class PromotionCatalog:
    def __init__(self, db: LazyPool, *, refresh_s: float = 2.0, timeout_s: float = 2.0) -> None:
        self.db = db
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self._by_id: dict[str, Campaign] = {}
        self._revision = 0
        self._loaded_at: float | None = None
        self._lock = asyncio.Lock()

    async def current(self) -> list[Campaign]:
        """The promotions not ended, as of at most ``refresh_s`` ago. A refresh that fails
        keeps the last list; with none yet, :class:`errors.Unavailable` (503)."""
        if self._loaded_at is None or time.monotonic() - self._loaded_at > self.refresh_s:
            async with self._lock:
                if self._loaded_at is None or time.monotonic() - self._loaded_at > self.refresh_s:
                    await self._refresh()
        return list(self._by_id.values())

    async def _refresh(self) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                changed = await campaign_store.promotions_since(await self.db(), self._revision)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if self._loaded_at is None:
                raise errors.Unavailable("the promotions cannot be read now; retry") from exc
            return
        for revision, c in changed:
            self._revision = max(self._revision, revision)
            if c.state == "ended":
                self._by_id.pop(c.id, None)
            else:
                self._by_id[c.id] = c
        self._loaded_at = time.monotonic()


class Manifests:
    """The promotions each keyed redemption asked (store/manifests.py): written before the
    first is asked, read back by every retry with the key."""

    def __init__(self, db: LazyPool, *, timeout_s: float = 2.0) -> None:
        self.db = db
        self.timeout_s = timeout_s

    async def fix(self, req: RedeemRequest, ids: list[str]) -> list[str]:
        """The promotions ``req`` asks: ``ids`` on its first attempt, its first attempt's
        list on a retry. Raises :class:`errors.IdempotencyConflict` (409) when the key
        was used with another order, :class:`errors.Unavailable` (503) when Postgres
        cannot answer within ``timeout_s`` (nothing was given yet: retry with the key)."""
        key = req.idempotency_key
        if key is None:
            return ids
        fp = fingerprint("promotions", msgspec.structs.replace(req, idempotency_key=None))
        try:
            async with asyncio.timeout(self.timeout_s):
                stored_fp, stored = await manifests.fix(await self.db(), key, fp, ids, datetime.now(UTC))
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise errors.Unavailable("the checkout's promotions cannot be recorded now; retry") from exc
        if stored_fp != fp:
            raise errors.IdempotencyConflict(f"idempotency key {key!r} was used with a different request")
        return stored


class Applied(msgspec.Struct, frozen=True):
    """One promotion given to the order."""

    campaign_id: str
    discount_amount: int
    detail: str | None
    redemption_id: str | None = None


def taken_by(out: Outcome, order: Order) -> Taken | None:
    """What the code's decision took of the order (None when it gave nothing)."""
    if out.redemption is not None:
        r = out.redemption
        return add(None, explained_pricing(r.discount_amount, r.detail), order)
    if out.validation is not None and out.validation.valid:
        v = out.validation
        return add(None, explained_pricing(v.discount_amount, v.detail), order)
    return None


async def apply(
    op: str,
    req: RedeemRequest,
    taken: Taken | None,
    promotions: list[Campaign],
    decide: Decide,
    fix: Fix | None = None,
) -> list[Applied]:
    """Give ``req``'s order every promotion that fits, best first, each on what the code
    and the promotions before it left. ``op``: ``redeem`` or ``validate``; ``fix``: where a
    keyed redemption's list is kept (:meth:`Manifests.fix`), so its retries ask the same.
    A promotion its shard refuses (its limit reached, ended, a rule not met on its own
    copy) is passed over; a shard that cannot answer now fails the whole checkout (503:
    retry with the same key, which replays what was given)."""
    order = req.order()
    ids = [c.id for c, _ in candidates(promotions, order, req.tags, taken, datetime.now(UTC))]
    if fix is not None and req.idempotency_key is not None:
        ids = await fix(req, ids)
    out: list[Applied] = []
    for cid in ids:
        key = None if req.idempotency_key is None else f"{req.idempotency_key}|{cid}"
        preq = msgspec.structs.replace(
            req, code=key_of(cid), promotion=True, taken=taken, idempotency_key=key
        )
        res = await decide(op, preq)
        if res.rejection is not None:
            exc = errors.from_code(res.rejection.error, res.rejection.message)
            if isinstance(
                exc, (errors.Unavailable, errors.IdempotencyInProgress, errors.IdempotencyConflict)
            ):
                # not now (retried whole, with the key), or the key's record of this
                # promotion is another request's: whether it was given cannot be told
                raise exc
            continue  # not for this order (limit reached, ended, a rule on its copy)
        if res.redemption is not None:
            r = res.redemption
            got = Applied(cid, r.discount_amount, r.detail, r.id)
            pricing = explained_pricing(r.discount_amount, r.detail)
        else:
            v = res.validation
            if v is None or not v.valid:
                continue
            got = Applied(cid, v.discount_amount, v.detail)
            pricing = explained_pricing(v.discount_amount, v.detail)
        if got.discount_amount <= 0:
            continue
        out.append(got)
        taken = add(taken, pricing, order)
    return out


def applied_body(a: Applied) -> dict[str, Any]:
    d: dict[str, Any] = {"campaign_id": a.campaign_id, "discount_amount": a.discount_amount}
    if a.redemption_id is not None:
        d["redemption_id"] = a.redemption_id
    if a.detail is None:
        d.update(items=[], shipping_discount=0)
    else:
        d.update(msgspec.json.decode(a.detail))
    return d
