"""The shard actor: the Ray face of :class:`actors.shard.ShardCore` (every method
delegates), its direct line for decision batches, and how its process ends."""

from __future__ import annotations

import logging
import os
from typing import Any

import msgspec
import ray

from actors.calls import guarded
from actors.health import InFlight, shard_health
from actors.observability import configure_json_logging
from actors.shard import ShardCore
from actors.shard_socket import ChannelServer
from engine.audit import Actor
from engine.events import ImportedCode
from engine.settings import Settings

log = logging.getLogger(__name__)


@ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=4096, num_cpus=0)
class VoucherShard:
    """Ray face of :class:`ShardCore` (every method delegates)."""

    def __init__(self, shard_id: int, shards: int, dsn: str, settings: bytes) -> None:
        decoded = msgspec.msgpack.decode(settings, type=Settings)
        configure_json_logging(decoded.log_level)
        self.core = ShardCore(shard_id, shards, dsn, decoded)
        peers: dict[int, Any] = {}
        namespace = decoded.namespace

        def peer(k: int) -> Any:
            if k not in peers:
                peers[k] = ray.get_actor(f"shard-{k}", namespace=namespace)
            return peers[k]

        self.core.peer = peer
        self.core.exit_process = _exit_actor
        self._channel = ChannelServer(self._channel_call)
        self._inflight = InFlight()

    async def ready(self) -> bool:
        await self.core.ready()
        return True

    async def health(self) -> dict[str, Any]:
        """Whether this shard can serve checkout now (``actors/health.py``); never waits
        on the database."""
        return await shard_health(self.core, self._inflight)

    async def channel(self) -> tuple[str, str] | None:
        """``(node id, socket path)`` of this shard's direct line for decision batches
        (``actors/shard_socket.py``), or None when ``VOUCHER_SHARD_CHANNEL`` is off."""
        if not self.core.settings.shard_channel:
            return None
        await self.core.ready()
        path = await self._channel.start(f"shard{self.core.shard_id}")
        return ray.get_runtime_context().get_node_id(), path

    async def _channel_call(
        self, op: str, payload: bytes, request_ids: list[str | None] | None
    ) -> bytes:
        with self._inflight.track():
            if op == "redeem":
                return await self.core.redeem_many(payload, request_ids)
            if op == "validate":
                return await self.core.validate_many(payload, request_ids)
            if op == "qualify":
                return await self.core.qualify(payload)
            return await self.core.reserve_many(payload, request_ids)

    @guarded
    async def redeem_many(
        self, payload: bytes, request_ids: list[str | None] | None = None
    ) -> bytes:
        with self._inflight.track():
            return await self.core.redeem_many(payload, request_ids)

    @guarded
    async def validate_many(
        self, payload: bytes, request_ids: list[str | None] | None = None
    ) -> bytes:
        with self._inflight.track():
            return await self.core.validate_many(payload, request_ids)

    @guarded
    async def reserve_many(
        self, payload: bytes, request_ids: list[str | None] | None = None
    ) -> bytes:
        with self._inflight.track():
            return await self.core.reserve_many(payload, request_ids)

    @guarded
    async def refs_many(self, op: str, payload: bytes) -> bytes:
        with self._inflight.track():
            return await self.core.refs_many(op, payload)

    @guarded
    async def assign_many(
        self, campaign_id: str, customers: list[str], fallback: bool = True
    ) -> bytes:
        return await self.core.assign_many(campaign_id, customers, fallback)

    @guarded
    async def assignments_of(self, campaign_id: str, customers: list[str]) -> dict[str, str]:
        return await self.core.assignments_of(campaign_id, customers)

    @guarded
    async def put_campaign(self, payload: bytes) -> int:
        return await self.core.put_campaign(payload)

    @guarded
    async def put_campaigns(self, payload: bytes) -> int:
        return await self.core.put_campaigns(payload)

    @guarded
    async def add_codes(self, campaign_id: str, codes: list[str]) -> int:
        return await self.core.add_codes(campaign_id, codes)

    @guarded
    async def codes_in_campaign(self, campaign_id: str) -> int:
        return await self.core.codes_in_campaign(campaign_id)

    @guarded
    async def limit_usage(self, campaign_id: str) -> tuple[int, int]:
        return await self.core.limit_usage(campaign_id)

    @guarded
    async def codes_held(self) -> int:
        return await self.core.codes_held()

    @guarded
    async def stats(self, campaign_id: str) -> bytes:
        return await self.core.stats(campaign_id)

    @guarded
    async def voucher(self, code: str) -> dict[str, Any]:
        return await self.core.voucher(code)

    @guarded
    async def qualify(self, payload: bytes) -> bytes:
        with self._inflight.track():
            return await self.core.qualify(payload)

    @guarded
    async def control(self, code: str, changes: dict[str, Any], actor: Actor) -> dict[str, Any]:
        return await self.core.control(code, changes, actor)

    @guarded
    async def import_codes(self, campaign_id: str, rows: list[ImportedCode]) -> list[str]:
        return await self.core.import_codes(campaign_id, rows)

    @guarded
    async def record_assignments(self, campaign_id: str, pairs: list[tuple[str, str]]) -> None:
        await self.core.record_assignments(campaign_id, pairs)

    @guarded
    async def flush(self) -> None:
        await self.core.flush()

    @guarded
    async def info(self) -> dict[str, Any]:
        # gateways connected to this shard's direct line
        return {**await self.core.info(), "channel_peers": len(self._channel.conns)}


def _exit_actor(code: int) -> None:
    """Crash (Ray restarts the actor, which reloads) or, with code 0, retire: the actor's
    topology was replaced, so Ray must not bring it back."""
    if code == 0 and ray.is_initialized():
        try:
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
            return
        except Exception:
            log.exception("retiring through Ray failed; exiting")
    os._exit(code)
