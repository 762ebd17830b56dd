"""The Python API of the engine: start or attach to the actors and talk to them.

Requests are routed to the shard that owns their code (or the bucket embedded in a
redemption/reservation id). The ``*_many`` calls group requests per shard so one actor
call carries many of them. Errors come back as the engine's own typed exceptions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import msgspec
import ray

from actors.calls import call as _call
from actors.coordinator import Coordinator, TransitionResult
from actors.shard import VoucherShard
from engine import errors
from engine.campaigns import Campaign, Discount, Limits, Window
from engine.codes import CodeSpec
from engine.events import Assignment, Redemption, Reservation, Validation
from engine.pools import CampaignStats, Outcome, RedeemRequest, bucket_of_reference, route_bucket
from engine.routing import assignment_key, bucket_of, shard_of_bucket
from engine.settings import Settings

_enc = msgspec.msgpack.Encoder()
_outs = msgspec.msgpack.Decoder(list[Outcome])
_stats = msgspec.msgpack.Decoder(CampaignStats)
T = TypeVar("T")


def shard_name(i: int) -> str:
    return f"shard-{i}"


def start_engine(
    settings: Settings, dsn: str, *, spread: bool = True, detached: bool = False
) -> VoucherEngine:
    """Create (or attach to) the named shard and coordinator actors; Ray must be up.

    ``spread`` places the shards with Ray's SPREAD strategy, so on a cluster they land on
    different nodes and one lost node takes only its share of the buckets with it (Ray
    restarts those shards on the surviving nodes, where they reload from Postgres). On one
    machine it changes nothing. ``detached`` keeps the actors alive after the driver that
    created them exits (``voucher-engine deploy`` on a cluster). With
    ``VOUCHER_SHARD_RESOURCE`` set, each shard asks one unit of that custom resource, so
    shards run on the nodes that offer it (cluster.yaml's shard nodes).
    """
    blob = _enc.encode(settings)
    # Ray places an actor that requests no resources at all on a random node, whatever its
    # strategy; a token request (1 byte of `memory`) makes SPREAD's round-robin apply.
    placement: dict[str, Any] = {"scheduling_strategy": "SPREAD", "memory": 1} if spread else {}
    if settings.shard_resource:
        placement["resources"] = {settings.shard_resource: 1}
    lifetime: dict[str, Any] = {"lifetime": "detached"} if detached else {}
    shards = [
        VoucherShard.options(  # type: ignore[attr-defined]
            name=shard_name(i),
            namespace=settings.namespace,
            get_if_exists=True,
            **placement,
            **lifetime,
        ).remote(i, settings.shards, dsn, blob)
        for i in range(settings.shards)
    ]
    ray.get([s.ready.remote() for s in shards])
    coordinator = Coordinator.options(  # type: ignore[attr-defined]
        name="coordinator", namespace=settings.namespace, get_if_exists=True, **lifetime
    ).remote([shard_name(i) for i in range(settings.shards)], settings.namespace, dsn, blob)
    ray.get(coordinator.ready.remote())
    return VoucherEngine(shards, coordinator)


def attach_engine(settings: Settings) -> VoucherEngine:
    """Handles to a running engine's actors (started by ``start_engine`` elsewhere)."""
    shards = [ray.get_actor(shard_name(i), namespace=settings.namespace) for i in range(settings.shards)]
    coordinator = ray.get_actor("coordinator", namespace=settings.namespace)
    return VoucherEngine(shards, coordinator)


class VoucherEngine:
    def __init__(self, shards: list[Any], coordinator: Any) -> None:
        self.shards = shards
        self.coordinator = coordinator
        self.n = len(shards)

    # --- campaigns ---------------------------------------------------------------------

    async def create_campaign(
        self,
        *,
        name: str,
        type: str,
        currency: str,
        id: str | None = None,
        discount: Discount | dict[str, Any] | None = None,
        min_order: int = 0,
        gift_balance: int | None = None,
        limits: Limits | dict[str, Any] | None = None,
        starts_at: Any = None,
        ends_at: Any = None,
        timezone: str = "UTC",
        windows: Sequence[Window | dict[str, Any]] = (),
        code: CodeSpec | dict[str, Any] | None = None,
        shared_code: str | None = None,
    ) -> Campaign:
        try:
            fields: dict[str, Any] = {
                "id": id,
                "name": name,
                "type": type,
                "currency": currency,
                "discount": _conv(discount, Discount),
                "min_order": min_order,
                "gift_balance": gift_balance,
                "limits": _conv(limits, Limits),
                "starts_at": starts_at,
                "ends_at": ends_at,
                "timezone": timezone,
                "windows": tuple(_conv(w, Window) for w in windows),
                "code_spec": _code_spec(code),
                "shared_code": shared_code,
            }
        except msgspec.ValidationError as exc:
            raise errors.InvalidInput(str(exc)) from exc
        result: Campaign = await _call(self.coordinator.create_campaign.remote(fields))
        return result

    async def activate(self, campaign_id: str) -> Campaign:
        return await self.transition(campaign_id, "activate")

    async def pause(self, campaign_id: str) -> Campaign:
        return await self.transition(campaign_id, "pause")

    async def end(self, campaign_id: str) -> Campaign:
        return await self.transition(campaign_id, "end")

    async def transition(self, campaign_id: str, action: str) -> Campaign:
        return (await self.transition_result(campaign_id, action)).campaign

    async def transition_result(self, campaign_id: str, action: str) -> TransitionResult:
        """A lifecycle move, answered once every shard applied it; the answer also names
        the shards that did not confirm in time and were fenced (they restart and reload)."""
        result: TransitionResult = await _call(
            self.coordinator.transition.remote(campaign_id, action)
        )
        return result

    async def campaign(self, campaign_id: str) -> Campaign:
        result: Campaign = await _call(self.coordinator.campaign.remote(campaign_id))
        return result

    async def campaigns(self) -> list[Campaign]:
        result: list[Campaign] = await _call(self.coordinator.list_campaigns.remote())
        return result

    # --- generation --------------------------------------------------------------------

    async def start_generation(
        self, campaign_id: str, count: int, up_to: bool = False
    ) -> dict[str, Any]:
        """Start a generation job of ``count`` codes (``up_to``: of as many of them as the
        campaign's ``limits.total`` still allows, instead of refusing)."""
        job: dict[str, Any] = await _call(
            self.coordinator.start_generation.remote(campaign_id, count, up_to)
        )
        return job

    async def job(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = await _call(self.coordinator.job.remote(job_id))
        return job

    async def generate(
        self,
        campaign_id: str,
        count: int,
        progress: Callable[[dict[str, Any]], None] | None = None,
        poll_s: float = 0.25,
    ) -> dict[str, Any]:
        """Generate ``count`` codes into the bank and wait; raises if the job fails."""
        job = await self.start_generation(campaign_id, count)
        while job["state"] == "running":
            await asyncio.sleep(poll_s)
            job = await self.job(job["id"])
            if progress is not None:
                progress(job)
        if job["state"] != "done":
            raise errors.Unavailable(f"generation job {job['id']} failed: {job['error']}")
        return job

    # --- the hot path --------------------------------------------------------------------

    async def _fanout(
        self, method: str, keys: list[int], payloads: list[Any], *extra: Any
    ) -> list[Outcome]:
        """Group items by owning shard, one call per shard, answers in input order."""
        groups: dict[int, list[int]] = {}
        for i, b in enumerate(keys):
            groups.setdefault(shard_of_bucket(b, self.n), []).append(i)
        out: list[Outcome | None] = [None] * len(payloads)

        async def one(shard: int, idx: list[int]) -> None:
            blob = _enc.encode([payloads[i] for i in idx])
            res = await _call(getattr(self.shards[shard], method).remote(*extra, blob))
            for i, o in zip(idx, _outs.decode(res), strict=True):
                out[i] = o

        await asyncio.gather(*[one(s, idx) for s, idx in groups.items()])
        return [o for o in out if o is not None]

    async def redeem_many(self, reqs: Sequence[RedeemRequest]) -> list[Outcome]:
        return await self._fanout("redeem_many", [route_bucket(r.code) for r in reqs], list(reqs))

    async def validate_many(self, reqs: Sequence[RedeemRequest]) -> list[Outcome]:
        return await self._fanout("validate_many", [route_bucket(r.code) for r in reqs], list(reqs))

    async def reserve_many(self, reqs: Sequence[RedeemRequest]) -> list[Outcome]:
        return await self._fanout("reserve_many", [route_bucket(r.code) for r in reqs], list(reqs))

    async def _ref(self, op: str, ref: str, key: str | None) -> Outcome:
        b = bucket_of_reference(ref)
        return (await self._fanout("refs_many", [b], [(ref, key)], op))[0]

    async def redeem(self, req: RedeemRequest) -> Redemption:
        r: Redemption = (await self.redeem_many([req]))[0].unwrap()
        return r

    async def validate(self, req: RedeemRequest) -> Validation:
        v: Validation = (await self.validate_many([req]))[0].unwrap()
        return v

    async def reserve(self, req: RedeemRequest) -> Reservation:
        r: Reservation = (await self.reserve_many([req]))[0].unwrap()
        return r

    async def rollback(self, redemption_id: str, idempotency_key: str | None = None) -> Redemption:
        r: Redemption = (await self._ref("rollback", redemption_id, idempotency_key)).unwrap()
        return r

    async def confirm(self, reservation_id: str, idempotency_key: str | None = None) -> Redemption:
        r: Redemption = (await self._ref("confirm", reservation_id, idempotency_key)).unwrap()
        return r

    async def release(self, reservation_id: str, idempotency_key: str | None = None) -> Reservation:
        r: Reservation = (await self._ref("release", reservation_id, idempotency_key)).unwrap()
        return r

    # --- assignment ----------------------------------------------------------------------

    async def assign_many(self, campaign_id: str, customers: Iterable[str]) -> list[Outcome]:
        custs = list(customers)
        for c in custs:
            if not isinstance(c, str) or not c:
                raise errors.InvalidInput("customer ids must be non-empty strings")
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(custs):
            s = shard_of_bucket(bucket_of(assignment_key(campaign_id, c)), self.n)
            groups.setdefault(s, []).append(i)
        out: list[Outcome | None] = [None] * len(custs)

        async def one(shard: int, idx: list[int]) -> None:
            res = await _call(
                self.shards[shard].assign_many.remote(campaign_id, [custs[i] for i in idx])
            )
            for i, o in zip(idx, _outs.decode(res), strict=True):
                out[i] = o

        await asyncio.gather(*[one(s, idx) for s, idx in groups.items()])
        return [o for o in out if o is not None]

    async def assign(self, campaign_id: str, customer_id: str) -> Assignment:
        a: Assignment = (await self.assign_many(campaign_id, [customer_id]))[0].unwrap()
        return a

    # --- reads ---------------------------------------------------------------------------

    async def stats(self, campaign_id: str) -> CampaignStats:
        await self.campaign(campaign_id)
        parts = await asyncio.gather(*[_call(s.stats.remote(campaign_id)) for s in self.shards])
        total = CampaignStats(campaign_id)
        for p in parts:
            total = total.merge(_stats.decode(p))
        return total

    async def voucher(self, code: str) -> dict[str, Any]:
        shard = self.shards[shard_of_bucket(route_bucket(code), self.n)]
        result: dict[str, Any] = await _call(shard.voucher.remote(code))
        return result

    async def flush(self) -> None:
        await asyncio.gather(*[_call(s.flush.remote()) for s in self.shards])

    async def shard_info(self) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*[_call(s.info.remote()) for s in self.shards]))

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait until every shard answers (after a restart it reloads first)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await asyncio.gather(*[_call(s.ready.remote()) for s in self.shards])
                return
            except errors.Unavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


def _conv(value: Any, typ: type[T]) -> T | None:
    if value is None or isinstance(value, typ):
        return value
    return msgspec.convert(value, typ)


def _code_spec(value: Any) -> CodeSpec:
    if value is None:
        return CodeSpec()
    if isinstance(value, CodeSpec):
        return value
    if not isinstance(value, dict):
        raise errors.InvalidInput("code must be an object")
    return CodeSpec.create(**value)
