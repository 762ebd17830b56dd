"""The Serve application: the gateway bound to one deployment per domain.

``build_app`` is a Serve application builder, so the same app starts from the CLI
(``voucher-engine up``) or from a Serve config file (``serve deploy serve/config.yaml``)
with the runtime facts (database URL, Redis URL, settings) passed as ``args``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import yaml
from ray.serve import Application

from engine.errors import ConfigError
from engine.settings import Settings
from serve.deployments import (
    Campaigns,
    Customers,
    Delivery,
    Issuance,
    Notifications,
    Reports,
    Users,
    Vouchers,
)
from serve.gateway import Gateway

CONFIG_PATH = Path(__file__).with_name("config.yaml")
APP_NAME = "voucher"


def build_app(args: dict[str, Any]) -> Application:
    """``args``: ``database_url``, ``redis_url``, optional ``settings`` (dict; default: from
    the environment) and ``replicas`` ({deployment name: count})."""
    env = Settings.from_env()
    settings = args.get("settings") or msgspec.to_builtins(env)
    # `serve deploy serve/config.cluster.yaml` leaves the URLs null: each node's environment
    # (VOUCHER_DATABASE_URL / VOUCHER_REDIS_URL) supplies them, so no secret is in the file.
    dsn = args.get("database_url") or env.database_url
    redis_url = args.get("redis_url") or env.redis_url
    if not dsn or not redis_url:
        raise ConfigError(
            "the Serve app needs database_url and redis_url (args or VOUCHER_DATABASE_URL / "
            "VOUCHER_REDIS_URL)"
        )
    replicas: dict[str, int] = {**args.get("replicas", {})}

    def n(name: str) -> int:
        return int(replicas.get(name, 1))

    # Serve's decorators make these deployments; mypy sees the plain classes.
    users = Users.options(  # type: ignore[attr-defined]
        num_replicas=n("Users")
    ).bind(settings, dsn, redis_url)
    campaigns = Campaigns.options(  # type: ignore[attr-defined]
        num_replicas=n("Campaigns")
    ).bind(settings)
    vouchers = Vouchers.options(  # type: ignore[attr-defined]
        num_replicas=n("Vouchers")
    ).bind(settings, dsn)
    delivery = Delivery.options(  # type: ignore[attr-defined]
        num_replicas=n("Delivery")
    ).bind(settings, dsn)
    reports = Reports.options(  # type: ignore[attr-defined]
        num_replicas=n("Reports")
    ).bind(settings, dsn)
    notifications = Notifications.options(  # type: ignore[attr-defined]
        num_replicas=n("Notifications")
    ).bind(dsn)
    customers = Customers.options(  # type: ignore[attr-defined]
        num_replicas=n("Customers")
    ).bind(dsn)
    issuance = Issuance.options(  # type: ignore[attr-defined]
        num_replicas=n("Issuance")
    ).bind(settings, dsn, redis_url)
    # Serve's access log costs the gateway a log record per request at peak; off unless
    # VOUCHER_ACCESS_LOG=true (the replica's other Serve logs stay at WARNING and above).
    access_log = bool(settings.get("access_log", False))
    logging_config = None if access_log else {"enable_access_log": False, "log_level": "WARNING"}
    return Gateway.options(  # type: ignore[attr-defined]
        num_replicas=n("Gateway"), logging_config=logging_config
    ).bind(
        users,
        campaigns,
        vouchers,
        delivery,
        reports,
        notifications,
        settings,
        dsn,
        redis_url,
        customers=customers,
        issuance=issuance,
    )


def load_config(path: Path = CONFIG_PATH) -> dict[str, Any]:
    """The application entry of a Serve config file (replica counts and other args)."""
    doc = yaml.safe_load(path.read_text())
    for app in doc.get("applications", []):
        if app.get("name") == APP_NAME:
            return dict(app)
    raise ValueError(f"{path} has no application named {APP_NAME!r}")
