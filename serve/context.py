"""What the gateway's routes work with: one :class:`Services` per replica, kept on the
app (``app.state.services``) and given to routes by ``serve.routes.deps``.

The domain deployments are Serve handles (``.method.remote(...)``); the engine client,
checkout (with the micro-batcher), the gate and the health probe are the replica's own
objects. Tests build a :class:`Services` of fakes (tests/route_fakes.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.settings import Settings
from serve.checkout import Checkout
from serve.devices import DeviceTokens
from serve.gate import Gate
from store.pools import LazyPool


@dataclass(frozen=True, eq=False)
class Services:
    """A gateway replica's settings, deployment handles and helpers."""

    settings: Settings
    users: Any
    campaigns: Any
    vouchers: Any
    delivery: Any
    reports: Any
    notifications: Any
    customers: Any
    issuance: Any
    engine: Any  # actors.client.EngineClient: rollback, confirm, release
    checkout: Checkout  # with the micro-batcher
    gate: Gate
    devices: DeviceTokens
    health: Any  # serve.health.HealthProbe
    import_db: LazyPool  # the gateway's own small pool for streamed customer imports
    records: Any = None  # serve.records.Records: code lists, exports, redemption history
