"""The Python API of the engine: start or attach to the actors and talk to them.

Requests are routed to the shard that owns their code (or the bucket embedded in a
redemption/reservation id). The ``*_many`` calls group requests per shard so one actor
call carries many of them. Errors come back as the engine's own typed exceptions.

The shard count (topology) is stored in Postgres per deployment (``store/fencing.py``).
:func:`start_engine` refuses a ``VOUCHER_SHARDS`` that differs from it; :func:`reshard`
changes it: it fences every old shard in Postgres, retires the old actors and starts the
new ones. Callers holding a :class:`VoucherEngine` learn the new count from the
coordinator when a shard answers ``not_owner`` or dies (:meth:`VoucherEngine.refresh`),
and requests a shard refused as ``not_owner`` (never decided) are routed again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

import msgspec
import ray

from actors.calls import call as _call
from actors.coordinator import Coordinator, TransitionResult
from actors.shard_actor import VoucherShard
from engine import errors
from engine.audit import SYSTEM, Actor
from engine.campaigns import Campaign, Discount, Limits, Window
from engine.codes import CodeSpec
from engine.events import Assignment, ImportedCode, Redemption, Reservation, Validation
from engine.qualification import QualifyRequest, Ranked, cut_short, merge_ranked, share
from engine.routing import assignment_key, bucket_of, shard_of_bucket
from engine.rules import Rules
from engine.settings import Settings
from engine.shard_state import (
    CampaignStats,
    Outcome,
    RedeemRequest,
    bucket_of_reference,
    route_bucket,
)
from store import fencing
from store.pools import with_connection

_enc = msgspec.msgpack.Encoder()
_outs = msgspec.msgpack.Decoder(list[Outcome])
_stats = msgspec.msgpack.Decoder(CampaignStats)
_ranked = msgspec.msgpack.Decoder(Ranked)
T = TypeVar("T")
log = logging.getLogger(__name__)
COORDINATOR = "coordinator"
_REFRESH_EVERY_S = 1.0  # at most one topology look-up per engine handle per second
_BRIEF_REFRESH_S = 1.0  # how long an answer waits for a topology look-up it triggered
_REROUTES = 3  # times a request refused as not_owner is routed again


def shard_name(i: int) -> str:
    return f"shard-{i}"


def _sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code, even under a running loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


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
    # the stored topology decides; a different VOUCHER_SHARDS is refused (use reshard)
    _sync(with_connection(dsn, lambda c: fencing.ensure_topology(c, settings.namespace, settings.shards)))
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
        name=COORDINATOR, namespace=settings.namespace, get_if_exists=True, **lifetime
    ).remote([shard_name(i) for i in range(settings.shards)], settings.namespace, dsn, blob)
    ray.get(coordinator.ready.remote())
    return VoucherEngine(shards, coordinator, settings.namespace)


def attach_engine(settings: Settings) -> VoucherEngine:
    """Handles to a running engine's actors (started by ``start_engine`` elsewhere); the
    shard count is the coordinator's."""
    coordinator = ray.get_actor(COORDINATOR, namespace=settings.namespace)
    n = int(ray.get(coordinator.shard_count.remote(), timeout=60))
    shards = [ray.get_actor(shard_name(i), namespace=settings.namespace) for i in range(n)]
    return VoucherEngine(shards, coordinator, settings.namespace)


def adopt_stored_topology(settings: Settings, dsn: str) -> Settings:
    """``settings`` with the shard count stored for its deployment, when one is stored (for
    a start where ``VOUCHER_SHARDS`` was not given: the last reshard decides)."""
    found = _sync(with_connection(dsn, lambda c: fencing.stored_topology(c, settings.namespace)))
    return settings if found is None else msgspec.structs.replace(settings, shards=found[0])


def reshard(settings: Settings, dsn: str, shards: int, *, detached: bool = False) -> VoucherEngine:
    """Move a deployment to ``shards`` shards: store the new count and fence every old
    shard in one Postgres transaction (it waits for their in-flight commits), retire the
    old shard actors and the coordinator, then start the new ones, which load their
    buckets from Postgres. Requests in flight meanwhile get ``unavailable`` / ``not_owner``
    (503, retry with the same idempotency keys); none is decided twice."""
    ns = settings.namespace
    old = _sync(with_connection(dsn, lambda c: fencing.stored_topology(c, ns)))
    if old is not None and old[0] == shards:
        raise errors.InvalidInput(f"deployment {ns!r} runs {shards} shards already")
    _sync(with_connection(dsn, lambda c: fencing.reshard(c, ns, shards)))
    names = [COORDINATOR] + [shard_name(i) for i in range(max(old[0] if old else 0, shards))]
    doomed = []
    for name in names:
        try:
            handle = ray.get_actor(name, namespace=ns)
        except ValueError:
            continue  # no such actor
        ray.kill(handle, no_restart=True)
        doomed.append((name, handle))
    # The names must be free before the new actors take them: a name lookup can fail while
    # the killed actor still answers, and `get_if_exists` would then hand back the old one.
    deadline = time.monotonic() + 60
    for name, handle in doomed:
        while True:
            try:
                ray.get(handle.__ray_ready__.remote(), timeout=5)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                try:
                    ray.get_actor(name, namespace=ns)
                except ValueError:
                    break
            except ray.exceptions.GetTimeoutError:
                pass
            if time.monotonic() > deadline:
                raise errors.Unavailable(f"actor {name} did not stop within 60 s")
            time.sleep(0.05)
    new = msgspec.structs.replace(settings, shards=shards)
    return start_engine(new, dsn, detached=detached)


class VoucherEngine:
    def __init__(self, shards: list[Any], coordinator: Any, namespace: str | None = None) -> None:
        self.shards = shards
        self.coordinator = coordinator
        self.n = len(shards)
        self.namespace = namespace
        self._refreshed = 0.0
        self._refreshing: asyncio.Future[bool] | None = None
        self._retained: list[tuple[Any, list[Any]]] = []
        #: called with no arguments after the shard handles changed (gateway batchers)
        self.on_topology: list[Callable[[], None]] = []

    async def refresh(self) -> bool:
        """Re-read the shard count from the coordinator (at most once a second; concurrent
        callers share one look-up); True when the handles changed."""
        if self.namespace is None:
            return False
        if self._refreshing is not None:
            return await asyncio.shield(self._refreshing)
        if time.monotonic() - self._refreshed < _REFRESH_EVERY_S:
            return False
        self._refreshed = time.monotonic()
        self._refreshing = asyncio.ensure_future(self._refresh(self.namespace))
        try:
            return await asyncio.shield(self._refreshing)
        finally:
            self._refreshing = None

    async def _refresh(self, ns: str) -> bool:
        coordinator = self.coordinator
        try:
            try:
                n = int(await _call(coordinator.shard_count.remote()))
            except errors.Unavailable:  # replaced by a reshard: look it up by name
                coordinator = ray.get_actor(COORDINATOR, namespace=ns)
                n = int(await _call(coordinator.shard_count.remote()))
            if n == self.n and coordinator is self.coordinator:
                return False
            shards = [ray.get_actor(shard_name(i), namespace=ns) for i in range(n)]
        except (ValueError, errors.VoucherError) as exc:  # mid-reshard: try again later
            log.info("topology look-up failed: %s", exc)
            return False
        # Keep the handles this one replaces: a process that created the actors owns them,
        # and Ray destroys an owned, non-detached actor once its owner drops every handle.
        self._retained.append((self.coordinator, self.shards))
        changed = n != self.n
        self.coordinator = coordinator
        self.shards, self.n = shards, n
        if changed:
            log.warning("the engine now runs %d shards", n)
            for listener in self.on_topology:
                listener()
        return changed

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
        metadata: dict[str, Any] | None = None,
        rules: Rules | dict[str, Any] | None = None,
        actor: Actor = SYSTEM,
    ) -> Campaign:
        """A new campaign in ``draft``, recorded with its ``campaign.created`` event and
        an audit entry naming ``actor``."""
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
            if metadata is not None:
                fields["metadata"] = metadata
            if rules is not None:
                fields["rules"] = _conv(rules, Rules)
        except msgspec.ValidationError as exc:
            raise errors.InvalidInput(str(exc)) from exc
        result: Campaign = await _call(self.coordinator.create_campaign.remote(fields, actor))
        return result

    async def activate(self, campaign_id: str) -> Campaign:
        return await self.transition(campaign_id, "activate")

    async def pause(self, campaign_id: str) -> Campaign:
        return await self.transition(campaign_id, "pause")

    async def end(self, campaign_id: str) -> Campaign:
        return await self.transition(campaign_id, "end")

    async def transition(self, campaign_id: str, action: str) -> Campaign:
        return (await self.transition_result(campaign_id, action)).campaign

    async def transition_result(
        self, campaign_id: str, action: str, actor: Actor = SYSTEM
    ) -> TransitionResult:
        """A lifecycle move, answered once every shard applied it; the answer also names
        the shards that did not confirm in time and were fenced (they restart and reload)."""
        result: TransitionResult = await _call(
            self.coordinator.transition.remote(campaign_id, action, actor)
        )
        return result

    async def edit_campaign(
        self,
        campaign_id: str,
        changes: dict[str, Any],
        if_version: int | None = None,
        actor: Actor = SYSTEM,
    ) -> TransitionResult:
        """A shop's change to a campaign (:func:`engine.campaigns.edit`), made against
        version ``if_version`` (any when None; another one raises
        :class:`errors.VersionMismatch`), answered like a lifecycle move: once every shard
        applied the new version or was fenced."""
        result: TransitionResult = await _call(
            self.coordinator.edit_campaign.remote(campaign_id, changes, if_version, actor)
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

    async def import_codes(self, campaign_id: str, rows: list[ImportedCode]) -> dict[str, Any]:
        """One chunk of a shop's own codes (see ``CoordinatorCore.import_codes``)."""
        out: dict[str, Any] = await _call(self.coordinator.import_codes.remote(campaign_id, rows))
        return out

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
        return await self._routed(
            keys,
            lambda shard, idx: getattr(self.shards[shard], method).remote(
                *extra, _enc.encode([payloads[i] for i in idx])
            ),
        )

    async def _routed(self, keys: list[int], send: Callable[[int, list[int]], Any]) -> list[Outcome]:
        """``send(shard, indices)`` per owning shard of ``keys`` (buckets); answers in input
        order. Items a shard refused as ``not_owner`` (never decided) go out again after a
        topology refresh; a failed call refreshes the topology for the caller's retry."""
        out: list[Outcome | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for attempt in range(_REROUTES + 1):
            groups: dict[int, list[int]] = {}
            for i in todo:
                groups.setdefault(shard_of_bucket(keys[i], self.n), []).append(i)

            async def one(shard: int, idx: list[int]) -> None:
                res = await _call(send(shard, idx))
                for i, o in zip(idx, _outs.decode(res), strict=True):
                    out[i] = o

            try:
                await asyncio.gather(*[one(s, idx) for s, idx in groups.items()])
            except errors.Unavailable:
                await self.refresh()
                raise
            todo = [i for i in todo if _not_owner(out[i])]
            if not todo or attempt == _REROUTES or not await self.refresh():
                break
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
        return await self._routed(
            [bucket_of(assignment_key(campaign_id, c)) for c in custs],
            lambda shard, idx: self.shards[shard].assign_many.remote(
                campaign_id, [custs[i] for i in idx]
            ),
        )

    async def assign(self, campaign_id: str, customer_id: str) -> Assignment:
        a: Assignment = (await self.assign_many(campaign_id, [customer_id]))[0].unwrap()
        return a

    # --- reads ---------------------------------------------------------------------------

    async def _everywhere(self, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every shard; answers in shard order. A read: when a shard is
        unavailable, the topology is looked up and the call made once more."""
        for attempt in (0, 1):
            try:
                return list(
                    await asyncio.gather(
                        *[_call(getattr(s, method).remote(*args)) for s in self.shards]
                    )
                )
            except errors.Unavailable:
                if attempt or not await self.refresh():
                    raise
        raise AssertionError("unreachable")

    async def stats(self, campaign_id: str) -> CampaignStats:
        await self.campaign(campaign_id)
        total = CampaignStats(campaign_id)
        for p in await self._everywhere("stats", campaign_id):
            total = total.merge(_stats.decode(p))
        return total

    async def qualify(
        self,
        req: QualifyRequest,
        deadline_s: float,
        send: Callable[[int, str, bytes], Awaitable[bytes]] | None = None,
    ) -> Ranked:
        """Every offer for ``req`` across the shards, best first (the best ``req.limit``):
        one call per shard, all at once (``send(shard, "qualify", payload)`` when given,
        e.g. the gateway's direct lines to the shards; Ray calls otherwise). A shard that
        cannot answer within ``deadline_s`` (it is reloading, its node is away) makes the
        whole answer ``unavailable``: a list missing one shard's offers would look
        complete. The topology is looked up again for the caller's retry.

        With a limit, each shard is first asked for its best :func:`share` of it, not the
        whole: the best ``limit`` offers are spread over the shards. A shard whose list
        was cut while its last offer still ranks among the best ``limit`` of all is asked
        again for the whole limit (:func:`engine.qualification.cut_short`), which a
        request needs only when one shard holds far more than its share of the best."""
        k = req.limit
        n = self.n

        async def ask(r: QualifyRequest, shards: list[int]) -> list[Ranked]:
            payload = _enc.encode(r)
            calls: list[Awaitable[Any]]
            if send is None:
                calls = [_call(self.shards[i].qualify.remote(payload)) for i in shards]
            else:
                calls = [send(i, "qualify", payload) for i in shards]
            return [_ranked.decode(p) for p in await asyncio.gather(*calls)]

        async def both_rounds() -> list[Ranked]:
            if k is None or n == 1 or share(k, n) >= k:
                return await ask(req, list(range(n)))
            parts = await ask(msgspec.structs.replace(req, limit=share(k, n)), list(range(n)))
            again = cut_short(parts, k)
            if again:
                for i, part in zip(again, await ask(req, again), strict=True):
                    parts[i] = part
            return parts

        try:
            parts = await asyncio.wait_for(both_rounds(), deadline_s)
        except TimeoutError:
            await self._refresh_briefly()
            raise errors.Unavailable(
                f"a shard did not answer the qualification within {deadline_s:g} s; retry"
            ) from None
        except errors.Unavailable:
            await self._refresh_briefly()
            raise
        return merge_ranked(parts, k)

    async def _refresh_briefly(self) -> None:
        """:meth:`refresh` for an answer that must not wait on it: at most a second (a
        slow look-up goes on for the next caller)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self.refresh()), _BRIEF_REFRESH_S)

    async def voucher(self, code: str) -> dict[str, Any]:
        for attempt in (0, 1):
            shard = self.shards[shard_of_bucket(route_bucket(code), self.n)]
            try:
                result: dict[str, Any] = await _call(shard.voucher.remote(code))
                return result
            except errors.Unavailable:
                if attempt or not await self.refresh():
                    raise
        raise AssertionError("unreachable")

    async def control(self, code: str, changes: dict[str, Any], actor: Actor) -> dict[str, Any]:
        """A shop's change to one code, decided by its owner shard (see
        :meth:`actors.shard.ShardCore.control`). Not retried after an unavailable shard:
        the change may have been applied; the caller sends it again."""
        shard = self.shards[shard_of_bucket(route_bucket(code), self.n)]
        result: dict[str, Any] = await _call(shard.control.remote(code, changes, actor))
        return result

    async def flush(self) -> None:
        await self._everywhere("flush")

    async def shard_info(self) -> list[dict[str, Any]]:
        return await self._everywhere("info")

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait until every shard answers (after a restart it reloads first; after a
        reshard the new shards are looked up)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await asyncio.gather(*[_call(s.ready.remote()) for s in self.shards])
                return
            except errors.Unavailable:
                if time.monotonic() > deadline:
                    raise
                await self.refresh()
                await asyncio.sleep(0.2)


def _not_owner(out: Outcome | None) -> bool:
    return out is not None and out.rejection is not None and out.rejection.error == errors.NotOwner.code


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
