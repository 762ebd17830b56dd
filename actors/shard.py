"""A shard: a thin adapter around :class:`engine.shard_state.ShardState` (its Ray actor is
``actors/shard_actor.py``).

It owns the buckets ``b`` with ``b % shards == shard_id``, decides in memory, and hands
its events to the group-commit writer. In ``durable`` ack mode an answer leaves only after
the batch holding its decision has committed; in ``fast`` mode it leaves at once and the
decision is committed within about one batch window (the loss window if the process dies).

Batch entry points take and return msgpack bytes: one Ray call carries many requests and
the payload is (de)serialised by msgspec instead of pickle. Beside the payload, the
gateway may pass ``request_ids`` (one per request, in order) so the shard's logs name the
HTTP requests they are about; callers that pass none (``VoucherEngine``) work unchanged.

Observability (``actors/observability.py``): one metrics update per batch (decisions by
op and outcome, batch size), per commit (latency, events), and per second (queue depths);
a DEBUG line per batch with its request ids, an INFO line per batch that had rejections
(with each rejected request's id and error code, never the voucher code), and a WARNING
with the batch's ids when a batch fails as a whole.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import msgspec
import psutil
import ray

from actors.calls import call as _call
from actors.shard_life import ShardLife
from engine import errors
from engine.audit import Actor
from engine.campaigns import Campaign
from engine.events import ImportedCode, Rejection
from engine.qualification import QualifyRequest, qualify_request, ranked
from engine.routing import assignment_key, bucket_of
from engine.shard_state import CampaignStats, Outcome, RedeemRequest

log = logging.getLogger(__name__)

_req_list = msgspec.msgpack.Decoder(list[RedeemRequest])
_ref_list = msgspec.msgpack.Decoder(list[tuple[str, str | None]])
_enc = msgspec.msgpack.Encoder()
_campaign_dec = msgspec.msgpack.Decoder(Campaign)
_outs = msgspec.msgpack.Decoder(list[Outcome])
_campaigns_dec = msgspec.msgpack.Decoder(list[Campaign])
_qualify_dec = msgspec.msgpack.Decoder(QualifyRequest)



class ShardCore(ShardLife):
    """Everything the actor does, without Ray, so it can be driven in-process: decision
    batches, assignment, campaigns and codes, reads, on the life of
    :class:`actors.shard_life.ShardLife`."""

    # --- batches -------------------------------------------------------------------------

    async def redeem_many(
        self, payload: bytes, request_ids: list[str | None] | None = None
    ) -> bytes:
        return await self._decided("redeem", payload, request_ids)

    async def reserve_many(
        self, payload: bytes, request_ids: list[str | None] | None = None
    ) -> bytes:
        return await self._decided("reserve", payload, request_ids)

    async def _decided(
        self, op: str, payload: bytes, request_ids: list[str | None] | None
    ) -> bytes:
        """A redeem or reserve batch: decided, acknowledged, answered within the
        decision deadline."""
        t0 = time.perf_counter()
        try:
            outs = await self._deadline(self._decide(op, payload))
            self._observe(op, outs, request_ids)
        except Exception as exc:
            self._batch_failed(op, exc, request_ids)
            raise
        return self._answer(outs, t0)

    async def _decide(self, op: str, payload: bytes) -> list[Outcome]:
        with self._answering.batch():
            await self.ready()
            state, writer = self._loaded()
            fn = state.redeem_one if op == "redeem" else state.reserve_one
            outs = await self.keys.decide(
                self.store, op, _req_list.decode(payload), self._units(fn, writer)
            )
            if op == "redeem":
                self.decisions += len(outs)
            await self._ack(writer)
            return outs

    async def validate_many(
        self, payload: bytes, request_ids: list[str | None] | None = None
    ) -> bytes:
        t0 = time.perf_counter()
        try:
            await self.ready_within_deadline()
            outs = [self.state.validate_one(r) for r in _req_list.decode(payload)]
            self._observe("validate", outs, request_ids)
        except Exception as exc:
            self._batch_failed("validate", exc, request_ids)
            raise
        return self._answer(outs, t0)

    def _answer(self, outs: list[Outcome], t0: float) -> bytes:
        self.batch_calls += 1
        self.batch_seconds += time.perf_counter() - t0
        return _enc.encode(outs)

    def _observe(self, op: str, outs: list[Outcome], request_ids: list[str | None] | None) -> None:
        """Metrics and logs of one decided (and, when it writes, acknowledged) batch: one
        pass over the outcomes, log records built only when their level is enabled. Never
        raises: the batch is decided, its answer must leave."""
        try:
            self._report(op, outs, request_ids)
        except Exception:
            log.exception("recording %s batch metrics failed", op, extra={"shard": self.shard_id})

    def _report(self, op: str, outs: list[Outcome], request_ids: list[str | None] | None) -> None:
        failed = self.metrics.batch(op, outs)
        n = len(outs)
        if request_ids is not None and len(request_ids) != n:
            request_ids = None  # a confused caller: better no ids than wrong ones
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s batch of %d decided",
                op,
                n,
                extra={
                    "shard": self.shard_id,
                    "op": op,
                    "size": n,
                    "rejected": len(failed),
                    "request_ids": request_ids,
                },
            )
        if failed and log.isEnabledFor(logging.INFO):
            ids = request_ids
            rejections = [
                {"request_id": ids[i] if ids is not None else None, "error": code}
                for i, code in failed
            ]
            log.info(
                "%s: %d of %d rejected",
                op,
                len(failed),
                n,
                extra={
                    "shard": self.shard_id,
                    "op": op,
                    # the one affected request, when there is one; else see ``rejections``
                    "request_id": rejections[0]["request_id"] if len(rejections) == 1 else None,
                    "rejections": rejections,
                },
            )

    def _batch_failed(
        self, op: str, exc: BaseException, request_ids: list[str | None] | None
    ) -> None:
        log.warning(
            "%s batch failed: %s",
            op,
            getattr(exc, "code", None) or exc.__class__.__name__,
            extra={
                "shard": self.shard_id,
                "op": op,
                "error": getattr(exc, "code", None) or exc.__class__.__name__,
                "request_id": request_ids[0] if request_ids and len(request_ids) == 1 else None,
                "request_ids": request_ids,
            },
        )

    async def refs_many(self, op: str, payload: bytes) -> bytes:
        """``rollback`` / ``confirm`` / ``release`` of ``[(id, idempotency_key)]``."""
        if op not in ("rollback", "confirm", "release"):
            raise errors.InvalidInput(f"unknown operation {op!r}")
        outs = await self._deadline(self._refs(op, payload))
        self._observe(op, outs, None)
        return _enc.encode(outs)

    async def _refs(self, op: str, payload: bytes) -> list[Outcome]:
        with self._answering.batch():
            await self.ready()
            state, writer = self._loaded()
            fn = getattr(state, f"{op}_one")
            outs = await self.keys.decide(
                self.store, op, _ref_list.decode(payload), self._units(lambda item: fn(*item), writer)
            )
            await self._ack(writer)
            return outs

    async def assign_many(
        self, campaign_id: str, customers: list[str], fallback: bool = True
    ) -> bytes:
        """Assign codes to customers this shard decides for (``hash(campaign, customer)``).

        A customer whose code cannot come from this shard's part of the bank gets one from
        another shard's (``fallback``): the peers are first asked whether one of them
        already gave the customer a code (a run interrupted between the two steps), then,
        in a fixed order, to assign one; this shard records the result, so the customer's
        one assignment stays decided here and a re-run returns the same code. While a
        customer's fallback is in flight, other requests for them wait for its answer.
        """
        await self.ready()
        state, writer = self._loaded()
        outs: list[Outcome | None] = []
        waits: dict[int, asyncio.Future[Outcome]] = {}
        for i, cust in enumerate(customers):
            fut = self._inflight.get((campaign_id, cust))
            if fallback and isinstance(cust, str) and not self.state.owns(
                bucket_of(assignment_key(campaign_id, cust))
            ):
                # the customer's assignments are decided by another shard (a caller with
                # a stale topology); a peer's fallback call is the one exception
                outs.append(_not_owner(cust))
            elif fut is not None:
                waits[i] = fut
                outs.append(None)
            else:
                outs.append(state.assign_one(campaign_id, cust))
                writer.mark()
        dry: dict[str, list[int]] = {}
        for i, o in enumerate(outs):
            if o is not None and o.rejection is not None and o.rejection.error == "bank_exhausted":
                dry.setdefault(customers[i], []).append(i)
        if fallback and dry and self.shards > 1 and self.peer is not None:
            loop = asyncio.get_running_loop()
            mine = {c: loop.create_future() for c in dry}
            for c, f in mine.items():
                self._inflight[(campaign_id, c)] = f
            try:
                found = await self._fallback(campaign_id, list(dry))
            except BaseException as exc:
                for f in mine.values():
                    f.set_exception(exc)
                    f.exception()  # retrieved: no "never retrieved" warning
                self._commit_later()  # the batch's local decisions are still persisted
                raise
            finally:
                for c in mine:
                    self._inflight.pop((campaign_id, c), None)
            for c, out in found.items():
                mine[c].set_result(out)
                for i in dry[c]:
                    outs[i] = out
        for i, fut in waits.items():
            outs[i] = await asyncio.shield(fut)
        await self._ack(writer)
        done = [o for o in outs if o is not None]
        self._observe("assign", done, None)
        return _enc.encode(done)

    async def _fallback(self, campaign_id: str, customers: list[str]) -> dict[str, Outcome]:
        """Codes for ``customers`` from the other shards' banks, recorded here."""
        assert self.peer is not None
        others = [(self.shard_id + k) % self.shards for k in range(1, self.shards)]
        result: dict[str, Outcome] = {}
        # 1. a peer that already gave a customer a code (interrupted run) gives it again
        known = await asyncio.gather(
            *[_call(self.peer(k).assignments_of.remote(campaign_id, customers)) for k in others]
        )
        earlier: dict[str, str] = {}
        for part in known:
            for cust, code in part.items():
                earlier.setdefault(cust, code)
        for cust, code in earlier.items():
            result[cust] = self._record(campaign_id, cust, code)
        # 2. the rest: each peer in turn assigns what it can
        left = [c for c in customers if c not in result]
        for k in others:
            if not left:
                break
            raw = await _call(self.peer(k).assign_many.remote(campaign_id, left, False))
            still: list[str] = []
            for cust, out in zip(left, _outs.decode(raw), strict=True):
                if out.assignment is not None:
                    result[cust] = self._record(campaign_id, cust, out.assignment.code)
                elif out.rejection is not None and out.rejection.error == "bank_exhausted":
                    still.append(cust)
                else:
                    result[cust] = out
            left = still
        for cust in left:
            result[cust] = Outcome(
                rejection=Rejection(
                    "bank_exhausted", f"campaign {campaign_id} has no available code left"
                )
            )
        return result

    def _record(self, campaign_id: str, customer_id: str, code: str) -> Outcome:
        try:
            return Outcome(assignment=self.state.record_foreign(campaign_id, customer_id, code))
        except errors.VoucherError as exc:
            return Outcome(rejection=Rejection(exc.code, exc.message))

    async def assignments_of(self, campaign_id: str, customers: list[str]) -> dict[str, str]:
        await self.ready()
        return self.state.assignments_of(campaign_id, customers)

    # --- campaigns and the bank ---------------------------------------------------------

    async def put_campaign(self, payload: bytes) -> int:
        """Apply a campaign change (a newer version only; ended stays ended) and confirm
        it: returns the version held here, once the change's voids are committed and every
        batch decided before it has answered."""
        await self.ready()
        c = _campaign_dec.decode(payload)
        self.state.put_campaign(c)
        await self._settle()
        return self.state.campaign(c.id).version

    async def put_campaigns(self, payload: bytes) -> int:
        """:meth:`put_campaign` for many campaigns (the coordinator's re-broadcast when it
        starts); returns how many changed here."""
        await self.ready()
        changed = sum(self.state.put_campaign(c) for c in _campaigns_dec.decode(payload))
        await self._settle()
        return changed

    async def add_codes(self, campaign_id: str, codes: list[str]) -> int:
        """Add new codes to the bank; duplicates of known codes are skipped. Returns how
        many were added (persisted with COPY before they become redeemable). An ended
        campaign takes no new codes."""
        await self.ready()
        campaign = self.state.campaign(campaign_id)
        if campaign.state == "ended":
            raise errors.CannotGenerateEnded(f"campaign {campaign_id} has ended")
        if not all(self.state.owns(bucket_of(c)) for c in codes):
            raise errors.NotOwner(f"codes of buckets shard {self.shard_id} does not own; retry")
        fresh = self.state.claim_new_codes(codes)
        if not fresh:
            return 0
        balance = campaign.gift_balance if campaign.is_gift_card else None
        assert self.store is not None
        try:
            await self.store.copy_codes(campaign_id, fresh, balance)
        except BaseException:
            self.state.abandon_codes(fresh)
            raise
        self.state.admit_codes(campaign_id, fresh)
        return len(fresh)

    async def import_codes(self, campaign_id: str, rows: list[ImportedCode]) -> list[str]:
        """Add a shop's own codes to the bank, as :meth:`add_codes` adds generated ones;
        returns the codes refused because a code of that name exists (in any campaign:
        every code of this shard's buckets is held here)."""
        await self.ready()
        campaign = self.state.campaign(campaign_id)
        if campaign.state == "ended":
            raise errors.CannotGenerateEnded(f"campaign {campaign_id} has ended")
        if not all(self.state.owns(bucket_of(r.code)) for r in rows):
            raise errors.NotOwner(f"codes of buckets shard {self.shard_id} does not own; retry")
        fresh = set(self.state.claim_new_codes([r.code for r in rows]))
        taken = [r.code for r in rows if r.code not in fresh]
        new = [r for r in rows if r.code in fresh]
        if not new:
            return taken
        balance = campaign.gift_balance if campaign.is_gift_card else None
        assert self.store is not None
        try:
            await self.store.copy_imported(campaign_id, new, balance)
        except BaseException:
            self.state.abandon_codes(fresh)
            raise
        self.state.admit_imported(campaign_id, new)
        return taken

    async def record_assignments(self, campaign_id: str, pairs: list[tuple[str, str]]) -> None:
        """Record, on the shard deciding each customer's assignments, that they hold the
        code (imported for them): the first record wins, so publications and issuance
        answer the same code afterwards. Answered once in Postgres."""
        await self.ready()
        _, writer = self._loaded()
        for customer_id, code in pairs:
            out = self._record(campaign_id, customer_id, code)
            writer.mark()
            if out.rejection is not None:
                raise errors.from_code(out.rejection.error, out.rejection.message)
        await self._ack(writer)
        await writer.durable()

    async def codes_held(self) -> int:
        """Codes in this shard's memory (every campaign, void ones included)."""
        await self.ready()
        return len(self.state.codes)

    async def codes_in_campaign(self, campaign_id: str) -> int:
        await self.ready()
        return self.state.codes_in_campaign(campaign_id)

    async def limit_usage(self, campaign_id: str) -> tuple[int, int]:
        await self.ready()
        return self.state.limit_usage(campaign_id)

    async def stats(self, campaign_id: str) -> bytes:
        await self.ready()
        return _enc.encode(self.state.stats(campaign_id))

    async def voucher(self, code: str) -> dict[str, Any]:
        await self.ready()
        return self.state.voucher(code)

    async def qualify(self, payload: bytes) -> bytes:
        """The offers this shard would apply now to a customer's order, best first
        (:func:`engine.qualification.qualify`), as :class:`engine.qualification.Ranked`: a
        read, answered within the decision deadline. Holds past their TTL expire on the
        way, as on every decision."""
        await self.ready_within_deadline()
        answer = qualify_request(self.state, _qualify_dec.decode(payload))
        if self.state.events:
            self._commit_later()
        return _enc.encode(ranked(answer))

    async def control(self, code: str, changes: dict[str, Any], actor: Actor) -> dict[str, Any]:
        """A shop's change to one code (see :meth:`ShardState.control`), answered once it
        is in Postgres with its event and audit entry, whatever the ack mode."""
        async def decide() -> dict[str, Any]:
            await self.ready()
            state, writer = self._loaded()
            with self._answering.batch():
                out = state.control(code, changes, actor)
                writer.mark()
            await self._ack(writer)
            await writer.durable()
            return out

        return await self._deadline(decide())

    async def flush(self) -> None:
        """Return once everything decided so far is in Postgres, ended campaigns' voids
        included."""
        await self.ready()
        _, writer = self._loaded()
        await writer.durable()
        await self.voids_done()

    async def info(self) -> dict[str, Any]:
        await self.ready()
        _, w = self._loaded()
        return {
            "shard_id": self.shard_id,
            "pid": os.getpid(),
            "rss": psutil.Process().memory_info().rss,
            "codes": len(self.state.codes),
            "redemptions": len(self.state.redemptions),
            "decisions": self.decisions,
            "batches": w.batches,
            "events_written": w.events_written,
            "max_batch": w.max_batch_seen,
            "commit_seconds": w.commit_seconds,
            "refused": w.refused,
            "reloads": self.reloads,
            "batch_calls": self.batch_calls,
            "batch_seconds": self.batch_seconds,
            "loaded_at": self.loaded_at.isoformat() if self.loaded_at else None,
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
        }


def _not_owner(customer_id: str) -> Outcome:
    return Outcome(
        rejection=Rejection(
            errors.NotOwner.code,
            f"customer {customer_id}'s assignments belong to another shard; retry",
        )
    )


__all__ = ["CampaignStats", "ShardCore"]
