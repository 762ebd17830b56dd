"""Every tunable of the engine, read from the environment, validated, documented once.

:class:`Settings` is the single source: constraints live on the fields, the environment
variable and the description live in ``_ENV``, and :data:`SETTINGS_DOC` (rendered into
docs/configuration.md by :func:`settings_markdown`) is built from both, so code and docs
cannot drift.

An empty variable counts as unset, so ``VOUCHER_DATABASE_URL=`` means "use the embedded
Postgres" just as leaving it out does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args

import msgspec

from engine.errors import ConfigError
from engine.gcra import Limit, format_limit, parse_limit, parse_limits

AckMode = Literal["durable", "fast"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
ServeMode = Literal["haproxy", "default"]


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """The engine's configuration. Build it with :meth:`from_env`."""

    database_url: str | None = None
    redis_url: str | None = None
    data_dir: Annotated[str, msgspec.Meta(min_length=1)] = ".data"
    shards: Annotated[int, msgspec.Meta(ge=1, le=256)] = 4
    ack_mode: AckMode = "durable"
    batch_window_ms: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] = 2.0
    batch_max: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 2048
    decision_deadline_s: Annotated[float, msgspec.Meta(ge=0.1, le=120.0)] = 5.0
    commit_timeout_s: Annotated[float, msgspec.Meta(ge=0.5, le=600.0)] = 10.0
    fast_max_lag_ms: Annotated[float, msgspec.Meta(ge=1.0, le=60_000.0)] = 100.0
    reservation_ttl_s: Annotated[int, msgspec.Meta(ge=1, le=30 * 86400)] = 900
    idempotency_ttl_s: Annotated[int, msgspec.Meta(ge=1, le=365 * 86400)] = 86400
    customer_tags_ttl_s: Annotated[float, msgspec.Meta(ge=0.0, le=86400.0)] = 30.0
    ray_address: str | None = None
    namespace: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] = "voucher"
    generation_chunk: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 50_000
    max_codes_per_shard: Annotated[int, msgspec.Meta(ge=1000, le=1_000_000_000)] = 20_000_000
    campaign_confirm_timeout_s: Annotated[float, msgspec.Meta(ge=0.1, le=60.0)] = 3.0
    campaign_sync_s: Annotated[float, msgspec.Meta(ge=0.1, le=60.0)] = 2.0
    log_level: LogLevel = "INFO"
    jwt_secret: Annotated[str, msgspec.Meta(min_length=32)] | None = None
    token_ttl_s: Annotated[int, msgspec.Meta(ge=30, le=86400)] = 900
    admin_email: Annotated[str, msgspec.Meta(min_length=3, max_length=254)] = "admin@example.com"
    admin_password: Annotated[str, msgspec.Meta(min_length=8, max_length=128)] | None = None
    http_host: Annotated[str, msgspec.Meta(min_length=1)] = "127.0.0.1"
    http_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8000
    serve_mode: ServeMode = "haproxy"
    trusted_proxies: Annotated[str, msgspec.Meta(max_length=4096)] = ""
    access_log: bool = False
    shard_channel: bool = True
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=64 * 1024 * 1024)] = 65536
    rate_admin: Limit = Limit(100.0, 200)
    rate_manager: Limit = Limit(100.0, 200)
    rate_analyst: Limit = Limit(50.0, 100)
    rate_integration: Limit = Limit(2000.0, 4000)
    rate_customer: Limit = Limit(20.0, 40)
    rate_anonymous: Limit = Limit(10.0, 20)
    rate_ip: Limit = Limit(200.0, 400)
    rate_failures: Limit = Limit(10 / 60, 20)
    rate_failures_caller: Limit = Limit(100 / 60, 200)
    rate_login_ip: tuple[Limit, ...] = (Limit(5 / 60, 10), Limit(30 / 3600, 50))
    rate_login_account: tuple[Limit, ...] = (Limit(10 / 60, 20), Limit(60 / 3600, 100))
    rate_login_device: tuple[Limit, ...] = (Limit(5 / 60, 10), Limit(30 / 3600, 50))
    shard_resource: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    smtp_url: str | None = None
    import_max_bytes: Annotated[int, msgspec.Meta(ge=1024 * 1024, le=64 * 1024**3)] = 1024**3
    import_batch: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 5000
    issuance_batch: Annotated[int, msgspec.Meta(ge=1, le=50_000)] = 2000
    bank_low_threshold: Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)] = 1000
    refill_size: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 50_000
    limit_warn_ratio: Annotated[float, msgspec.Meta(ge=0.5, le=1.0)] = 0.9
    notify_max_attempts: Annotated[int, msgspec.Meta(ge=1, le=50)] = 6
    notify_retry_base_s: Annotated[float, msgspec.Meta(ge=0.01, le=3600.0)] = 2.0
    notify_poll_s: Annotated[float, msgspec.Meta(ge=0.05, le=60.0)] = 1.0
    webhook_poll_s: Annotated[float, msgspec.Meta(ge=0.01, le=60.0)] = 0.5
    webhook_batch: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 200
    webhook_scan_txids: Annotated[int, msgspec.Meta(ge=100, le=100_000_000)] = 20_000
    webhook_concurrency: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8
    webhook_timeout_s: Annotated[float, msgspec.Meta(ge=0.1, le=120.0)] = 10.0
    webhook_max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 12
    webhook_backoff_base_s: Annotated[float, msgspec.Meta(ge=0.001, le=3600.0)] = 5.0
    webhook_backoff_max_s: Annotated[float, msgspec.Meta(ge=0.001, le=86400.0)] = 3600.0
    webhook_niceness: Annotated[int, msgspec.Meta(ge=0, le=19)] = 10
    webhook_idle_priority: bool = True
    webhook_log_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] = 7
    export_retention_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] = 7
    webhook_max_rate: Annotated[float, msgspec.Meta(ge=0.0, le=1_000_000.0)] = 0.0
    sms_webhook_url: str | None = None
    push_webhook_url: str | None = None
    outbound_allow: str = ""
    mail_from: Annotated[str, msgspec.Meta(min_length=3, max_length=254)] = "vouchers@voucher-engine.local"
    delivery_workers: Annotated[int, msgspec.Meta(ge=0, le=64)] = 2
    delivery_batch: Annotated[int, msgspec.Meta(ge=1, le=5000)] = 500
    delivery_connections: Annotated[int, msgspec.Meta(ge=1, le=256)] = 16
    delivery_max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 6
    delivery_backoff_base_s: Annotated[float, msgspec.Meta(ge=0.001, le=3600.0)] = 2.0
    delivery_backoff_max_s: Annotated[float, msgspec.Meta(ge=0.001, le=86400.0)] = 600.0
    delivery_claim_idle_s: Annotated[float, msgspec.Meta(ge=0.1, le=86400.0)] = 60.0
    delivery_send_timeout_s: Annotated[float, msgspec.Meta(ge=0.1, le=600.0)] = 15.0
    delivery_rate_email: Annotated[float, msgspec.Meta(ge=0.0)] = 10000.0
    delivery_rate_sms: Annotated[float, msgspec.Meta(ge=0.0)] = 100.0
    delivery_rate_push: Annotated[float, msgspec.Meta(ge=0.0)] = 2000.0
    delivery_failure_rate: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.2
    delivery_failure_window_s: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 300
    delivery_failure_min_attempts: Annotated[int, msgspec.Meta(ge=1)] = 20
    report_refresh_ms: Annotated[int, msgspec.Meta(ge=50, le=600_000)] = 1000
    reports_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8501
    api_url: str = "http://127.0.0.1:8000"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read settings from ``env`` (default: ``os.environ``).

        Raises :class:`~engine.errors.ConfigError` naming the variable on a bad value.
        """
        if env is None:
            import os

            env = os.environ
        raw: dict[str, Any] = {}
        for field, (var, _doc) in _ENV.items():
            value = env.get(var, "").strip()
            if not value:
                continue
            if field in _UPPER:
                value = value.upper()
            elif field in _LOWER:
                value = value.lower()
            raw[field] = _parsed(field, var, value)
        try:
            # strict=False lets msgspec parse "4" as int and "2.5" as float, and applies
            # the Meta constraints, so the ranges above are the only place they are stated.
            settings = msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise _config_error(str(exc), raw) from None
        _check_urls(settings)
        _check_allow(settings)
        _check_networks(settings)
        return settings

    @staticmethod
    def given(field: str, env: Mapping[str, str] | None = None) -> bool:
        """Whether ``field``'s variable has a value in ``env`` (default: ``os.environ``),
        as opposed to the field holding its default."""
        if env is None:
            import os

            env = os.environ
        return bool(env.get(_ENV[field][0], "").strip())

    def __repr__(self) -> str:
        # Settings get logged; the token key and the admin password must not be.
        parts = []
        for field in self.__struct_fields__:
            value = getattr(self, field)
            shown = "'<redacted>'" if field in _SECRET and value is not None else repr(value)
            parts.append(f"{field}={shown}")
        return f"Settings({', '.join(parts)})"


# field -> (environment variable, description)
_ENV: dict[str, tuple[str, str]] = {
    "database_url": (
        "VOUCHER_DATABASE_URL",
        "Postgres DSN (postgresql://...). Unset: start the embedded Postgres under the data dir.",
    ),
    "redis_url": (
        "VOUCHER_REDIS_URL",
        "Redis/Valkey URL (redis://, rediss://, unix://). Unset: start the embedded Valkey.",
    ),
    "data_dir": (
        "VOUCHER_DATA_DIR",
        "Where the embedded Postgres and Valkey keep their data.",
    ),
    "shards": ("VOUCHER_SHARDS", "Number of voucher shard actors (1..256)."),
    "ack_mode": (
        "VOUCHER_ACK_MODE",
        "`durable`: answer after the group commit. `fast`: answer from memory "
        "(bounded loss window).",
    ),
    "batch_window_ms": (
        "VOUCHER_BATCH_WINDOW_MS",
        "Longest a shard holds events before a group commit (0..100 ms).",
    ),
    "batch_max": (
        "VOUCHER_BATCH_MAX",
        "Events per group commit at most (a batch is cut between decisions).",
    ),
    "decision_deadline_s": (
        "VOUCHER_DECISION_DEADLINE_S",
        "Seconds a redemption, validation or reservation may take before the client gets "
        "503 with Retry-After (outcome unknown: retry with the same Idempotency-Key).",
    ),
    "customer_tags_ttl_s": (
        "VOUCHER_CUSTOMER_TAGS_TTL_S",
        "Seconds a gateway keeps a stored customer's tags for campaigns with customer rules: "
        "a change to a customer's tags reaches every decision within this time (0: read "
        "them for every request that needs them).",
    ),
    "commit_timeout_s": (
        "VOUCHER_COMMIT_TIMEOUT_S",
        "Seconds a group commit may take; a slower one counts as failed and the shard "
        "reloads its memory from Postgres.",
    ),
    "fast_max_lag_ms": (
        "VOUCHER_FAST_MAX_LAG_MS",
        "Fast ack mode answers from memory only while the oldest uncommitted decision is "
        "younger than this; beyond it, answers wait for the commit (the loss window).",
    ),
    "reservation_ttl_s": (
        "VOUCHER_RESERVATION_TTL_S",
        "Seconds a reservation holds a code before it expires.",
    ),
    "idempotency_ttl_s": (
        "VOUCHER_IDEMPOTENCY_TTL_S",
        "Seconds an idempotency key replays its first answer.",
    ),
    "ray_address": ("RAY_ADDRESS", "Ray cluster to join. Unset: start a local Ray."),
    "namespace": (
        "VOUCHER_RAY_NAMESPACE",
        "Ray namespace of the engine's named actors.",
    ),
    "generation_chunk": (
        "VOUCHER_GENERATION_CHUNK",
        "Codes generated and stored per chunk of a generation job.",
    ),
    "max_codes_per_shard": (
        "VOUCHER_MAX_CODES_PER_SHARD",
        "Codes one shard holds at most (about 100 bytes of shard memory each); generation "
        "beyond shards x this is refused with capacity_exceeded.",
    ),
    "campaign_confirm_timeout_s": (
        "VOUCHER_CAMPAIGN_CONFIRM_TIMEOUT_S",
        "Seconds a campaign change waits for every shard to confirm it; a shard that has not "
        "by then is fenced (it exits and reloads) before the change is answered.",
    ),
    "campaign_sync_s": (
        "VOUCHER_CAMPAIGN_SYNC_S",
        "Seconds between a shard's pulls of campaigns changed in Postgres (a missed "
        "broadcast is caught up within this).",
    ),
    "log_level": ("VOUCHER_LOG_LEVEL", "DEBUG, INFO, WARNING, ERROR or CRITICAL."),
    "jwt_secret": (
        "VOUCHER_JWT_SECRET",
        "HMAC key of the access tokens (at least 32 bytes). Unset: a random key is made once "
        "and kept in `<data dir>/jwt_secret` (mode 0600). Set it on a multi-node cluster.",
    ),
    "token_ttl_s": (
        "VOUCHER_TOKEN_TTL_S",
        "Lifetime of an access token in seconds (30..86400); role changes apply with the next token.",
    ),
    "admin_email": (
        "VOUCHER_ADMIN_EMAIL",
        "Email of the first admin, created (or given the admin role) at start-up.",
    ),
    "admin_password": (
        "VOUCHER_ADMIN_PASSWORD",
        "Password of the first admin when it is created (8..128 chars; an existing password "
        "is never overwritten). Unset: a random one is printed once at its creation.",
    ),
    "http_host": ("VOUCHER_HTTP_HOST", "Address the HTTP API listens on."),
    "http_port": ("VOUCHER_HTTP_PORT", "Port of the HTTP API (1..65535)."),
    "serve_mode": (
        "VOUCHER_SERVE_MODE",
        "`haproxy`: Ray Serve with its HAProxy ingress, throughput-optimized. "
        "`default`: Ray Serve's default proxy.",
    ),
    "trusted_proxies": (
        "VOUCHER_TRUSTED_PROXIES",
        "Comma-separated addresses or CIDRs of the proxies whose `X-Forwarded-For` entry is "
        "believed (right to left; the first untrusted entry is the client). Empty: the TCP "
        "peer is the client and no header can change it (docs/http-api.md: Rate limits).",
    ),
    "access_log": (
        "VOUCHER_ACCESS_LOG",
        "Ray Serve's per-request access log on the gateway (true/false). Off by default: at "
        "peak it costs several percent of the gateway's CPU; Serve's metrics still count "
        "every request.",
    ),
    "shard_channel": (
        "VOUCHER_SHARD_CHANNEL",
        "Gateways send decision batches to a shard on their own node over a Unix socket "
        "(true/false). On by default: on a busy node it answers milliseconds sooner than a "
        "Ray actor call; shards on other nodes are always called through Ray.",
    ),
    "max_body_bytes": (
        "VOUCHER_MAX_BODY_BYTES",
        "Largest request body accepted, in bytes (1024..64 MiB); larger ones get 413.",
    ),
    "rate_admin": (
        "VOUCHER_RATE_ADMIN",
        "Requests of one admin: `RATE/BURST` per second, or `RATE/UNIT/BURST` (unit s, min "
        "or h) as in every `VOUCHER_RATE_*` (docs/http-api.md: Rate limits).",
    ),
    "rate_manager": ("VOUCHER_RATE_MANAGER", "Requests of one manager."),
    "rate_analyst": ("VOUCHER_RATE_ANALYST", "Requests of one analyst."),
    "rate_integration": (
        "VOUCHER_RATE_INTEGRATION",
        "Requests of one integration API key (checkout services).",
    ),
    "rate_customer": ("VOUCHER_RATE_CUSTOMER", "Requests of one customer."),
    "rate_anonymous": (
        "VOUCHER_RATE_ANONYMOUS",
        "Unauthenticated requests (register, login).",
    ),
    "rate_ip": (
        "VOUCHER_RATE_IP",
        "Requests per client address (anonymous and customer traffic).",
    ),
    "rate_failures": (
        "VOUCHER_RATE_FAILURES",
        "Code-guessing failures per customer, and per address without one.",
    ),
    "rate_failures_caller": (
        "VOUCHER_RATE_FAILURES_CALLER",
        "Code-guessing failures per API key or user, all its customers.",
    ),
    "rate_login_ip": (
        "VOUCHER_RATE_LOGIN_IP",
        "Failed logins per client address: comma-separated tiers, each `RATE/UNIT/BURST`.",
    ),
    "rate_login_account": (
        "VOUCHER_RATE_LOGIN_ACCOUNT",
        "Failed logins per account, from addresses without its device token (tiers).",
    ),
    "rate_login_device": (
        "VOUCHER_RATE_LOGIN_DEVICE",
        "Failed logins per device token (tiers).",
    ),
    "shard_resource": (
        "VOUCHER_SHARD_RESOURCE",
        "Custom Ray resource each shard actor asks one unit of (cluster.yaml: `voucher_shard`), "
        "so shards go to shard nodes and keep them from scaling down. Unset: no placement.",
    ),
    "smtp_url": (
        "VOUCHER_SMTP_URL",
        "SMTP server for email (smtp://[user:password@]host:port, upgraded with STARTTLS when "
        "offered; smtps:// for TLS from the start). Unset: "
        "`voucher-engine up` starts the embedded SMTP sink, which records what it receives.",
    ),
    "import_max_bytes": (
        "VOUCHER_IMPORT_MAX_BYTES",
        "Largest body of `POST /v1/customers/import` (streamed and upserted in batches, so "
        "this bounds the upload, not memory); 1 MiB..64 GiB.",
    ),
    "import_batch": ("VOUCHER_IMPORT_BATCH", "Customer rows per upsert of an import."),
    "issuance_batch": (
        "VOUCHER_ISSUANCE_BATCH",
        "Customers read, assigned and enqueued per step of an issuance job.",
    ),
    "bank_low_threshold": (
        "VOUCHER_BANK_LOW_THRESHOLD",
        "Available codes below which an issuance refills the bank (a generation job ahead of "
        "need) and admins are notified once.",
    ),
    "refill_size": (
        "VOUCHER_REFILL_SIZE",
        "Codes a refill generates at least (more when the issuance still needs more).",
    ),
    "limit_warn_ratio": (
        "VOUCHER_LIMIT_WARN_RATIO",
        "Share of `limits.total` used (redemptions or codes) at which admins are notified "
        "that the limit is nearly exhausted (0.5..1.0).",
    ),
    "notify_max_attempts": (
        "VOUCHER_NOTIFY_MAX_ATTEMPTS",
        "Attempts per notification email or webhook before it is given up (dead).",
    ),
    "notify_retry_base_s": (
        "VOUCHER_NOTIFY_RETRY_BASE_S",
        "First retry delay of a notification send; doubles per attempt (capped at 300 s).",
    ),
    "notify_poll_s": (
        "VOUCHER_NOTIFY_POLL_S",
        "How often the notification dispatcher looks for new notifications and due retries.",
    ),
    "webhook_poll_s": (
        "VOUCHER_WEBHOOK_POLL_S",
        "How often the shop webhook dispatcher looks for new events and due retries when it "
        "has nothing to do (a busy dispatcher goes on at once).",
    ),
    "webhook_batch": (
        "VOUCHER_WEBHOOK_BATCH",
        "Events one read of an endpoint takes (delivered together, then its position moves "
        "on in one commit).",
    ),
    "webhook_scan_txids": (
        "VOUCHER_WEBHOOK_SCAN_TXIDS",
        "Transaction ids one slice of the event stream looks through at most; a read starts "
        "with 100 and doubles while the stretch is sparse, so a reader far behind (an "
        "endpoint, GET /v1/events) reads its backlog slice by slice.",
    ),
    "webhook_concurrency": (
        "VOUCHER_WEBHOOK_CONCURRENCY",
        "Deliveries in flight at once, per endpoint.",
    ),
    "webhook_timeout_s": (
        "VOUCHER_WEBHOOK_TIMEOUT_S",
        "Time a receiver has to answer a delivery; no 2xx answer in time is a failed attempt.",
    ),
    "webhook_max_attempts": (
        "VOUCHER_WEBHOOK_MAX_ATTEMPTS",
        "Attempts per event and endpoint before the delivery is given up (logged `failed`).",
    ),
    "webhook_backoff_base_s": (
        "VOUCHER_WEBHOOK_BACKOFF_BASE_S",
        "Delay before the first retry of a delivery; doubles per attempt, with jitter.",
    ),
    "webhook_backoff_max_s": (
        "VOUCHER_WEBHOOK_BACKOFF_MAX_S",
        "Longest delay between two attempts of one delivery.",
    ),
    "webhook_niceness": (
        "VOUCHER_WEBHOOK_NICENESS",
        "Nice level of the webhook dispatcher's process (0..19) when it does not run at idle "
        "priority.",
    ),
    "webhook_idle_priority": (
        "VOUCHER_WEBHOOK_IDLE_PRIORITY",
        "Run the webhook dispatcher's process at idle priority (Linux `SCHED_IDLE`): "
        "deliveries take only the CPU time nothing else wants, so checkout keeps its cores; "
        "in a burst that saturates the node they fall behind and catch up after it. "
        "`false`: the nice level above.",
    ),
    "export_retention_days": (
        "VOUCHER_EXPORT_RETENTION_DAYS",
        "Days a finished (or failed) code export is kept; then it is deleted with its file, "
        "as DELETE /v1/exports/{id} does.",
    ),
    "webhook_max_rate": (
        "VOUCHER_WEBHOOK_MAX_RATE",
        "Deliveries per second the dispatcher makes at most (0: no bound). A bound keeps "
        "deliveries from taking cores checkout wants during a burst; events wait in the "
        "stream and go out after it.",
    ),
    "webhook_log_days": (
        "VOUCHER_WEBHOOK_LOG_DAYS",
        "Days an attempt stays in the delivery log (`GET /v1/webhooks/{id}/deliveries`); "
        "older ones are deleted in small chunks by the dispatcher.",
    ),
    "sms_webhook_url": (
        "VOUCHER_SMS_WEBHOOK_URL",
        "SMS provider webhook (generic JSON POST, `Idempotency-Key` header). Unset: the "
        "embedded webhook sink.",
    ),
    "push_webhook_url": (
        "VOUCHER_PUSH_WEBHOOK_URL",
        "Push provider webhook (generic JSON POST, `Idempotency-Key` header). Unset: the "
        "embedded webhook sink.",
    ),
    "outbound_allow": (
        "VOUCHER_OUTBOUND_ALLOW",
        "Internal hosts outgoing webhooks may reach anyway, comma-separated: `host[:port]`, "
        "`ip[:port]`, `[v6]:port` or a CIDR block. Every other URL that is, or resolves to, "
        "a loopback, private, link-local, metadata or otherwise non-public address is refused "
        "(at registration and at connect time). `voucher-engine up` adds its embedded sinks.",
    ),
    "mail_from": ("VOUCHER_MAIL_FROM", "Sender address of voucher emails."),
    "delivery_workers": (
        "VOUCHER_DELIVERY_WORKERS",
        "Delivery worker actors started by `voucher-engine up` (0: none).",
    ),
    "delivery_batch": (
        "VOUCHER_DELIVERY_BATCH",
        "Stream entries a worker reads, claims and records per round.",
    ),
    "delivery_connections": (
        "VOUCHER_DELIVERY_CONNECTIONS",
        "Concurrent provider connections per worker and channel (SMTP connections are reused).",
    ),
    "delivery_max_attempts": (
        "VOUCHER_DELIVERY_MAX_ATTEMPTS",
        "Send attempts before a message goes to the dead-letter stream.",
    ),
    "delivery_backoff_base_s": (
        "VOUCHER_DELIVERY_BACKOFF_BASE_S",
        "Retry delay after the first failure; doubles per attempt, with jitter.",
    ),
    "delivery_backoff_max_s": (
        "VOUCHER_DELIVERY_BACKOFF_MAX_S",
        "Longest retry delay.",
    ),
    "delivery_claim_idle_s": (
        "VOUCHER_DELIVERY_CLAIM_IDLE_S",
        "Idle time after which a message held by a silent worker is reclaimed (XAUTOCLAIM) "
        "and its claim taken over. Keep it well above the send timeout.",
    ),
    "delivery_send_timeout_s": (
        "VOUCHER_DELIVERY_SEND_TIMEOUT_S",
        "Timeout of one provider call (SMTP transaction, webhook POST).",
    ),
    "delivery_rate_email": (
        "VOUCHER_DELIVERY_RATE_EMAIL",
        "Emails per second, shared by all workers (0: unlimited).",
    ),
    "delivery_rate_sms": (
        "VOUCHER_DELIVERY_RATE_SMS",
        "SMS per second, shared by all workers (0: unlimited).",
    ),
    "delivery_rate_push": (
        "VOUCHER_DELIVERY_RATE_PUSH",
        "Push messages per second, shared by all workers (0: unlimited).",
    ),
    "delivery_failure_rate": (
        "VOUCHER_DELIVERY_FAILURE_RATE",
        "Failed share of a campaign's send attempts in one window above which admins get a "
        "`delivery_failure_rate` notification (once per window).",
    ),
    "delivery_failure_window_s": (
        "VOUCHER_DELIVERY_FAILURE_WINDOW_S",
        "Length of the failure-rate window in seconds.",
    ),
    "delivery_failure_min_attempts": (
        "VOUCHER_DELIVERY_FAILURE_MIN_ATTEMPTS",
        "Attempts a window needs before its failure rate can raise a notification.",
    ),
    "report_refresh_ms": (
        "VOUCHER_REPORT_REFRESH_MS",
        "How often the reporting service folds new changes into its rollups (50 ms..10 min).",
    ),
    "reports_port": (
        "VOUCHER_REPORTS_PORT",
        "Port of the Streamlit reporting app that `voucher-engine up` and `voucher-engine "
        "reports` start on the HTTP host (1..65535).",
    ),
    "api_url": (
        "VOUCHER_API_URL",
        "Base URL of the HTTP API that the reporting app calls (`voucher-engine up` and "
        "`voucher-engine reports` set it to the engine's).",
    ),
}
_UPPER = frozenset({"log_level"})
_CHOICES: dict[str, tuple[str, ...]] = {
    "ack_mode": get_args(AckMode),
    "log_level": get_args(LogLevel),
    "serve_mode": get_args(ServeMode),
}
_LOWER = frozenset({"ack_mode", "serve_mode", "admin_email", "access_log", "shard_channel"})
# Rate limits: one RATE/BURST, or comma-separated tiers of them.
_LIMITS = frozenset(f"rate_{name}" for name in (
    "admin", "manager", "analyst", "integration", "customer", "anonymous",
    "ip", "failures", "failures_caller",
))
_TIERS = frozenset({"rate_login_ip", "rate_login_account", "rate_login_device"})
# Never echoed in error messages (they end up in logs).
_SECRET = frozenset({"jwt_secret", "admin_password"})

_URL_SCHEMES: dict[str, tuple[str, ...]] = {
    "database_url": ("postgres://", "postgresql://"),
    "redis_url": ("redis://", "rediss://", "unix://"),
    "smtp_url": ("smtp://", "smtps://"),
    "sms_webhook_url": ("http://", "https://"),
    "push_webhook_url": ("http://", "https://"),
}


def _parsed(field: str, var: str, value: str) -> Any:
    """A rate limit's text as its Limit(s) (raising ConfigError naming the variable);
    any other value as it is, for msgspec to convert."""
    if field in _LIMITS:
        return parse_limit(value, var)
    if field in _TIERS:
        return parse_limits(value, var)
    return value


def _config_error(detail: str, raw: Mapping[str, Any]) -> ConfigError:
    # msgspec says e.g. "Expected `int` <= 256 - at `$.shards`"; name the variable instead.
    match = re.search(r" - at `\$\.(\w+)`", detail)
    if match is None:
        return ConfigError(f"invalid configuration: {detail}")
    field = match.group(1)
    var = _ENV[field][0]
    reason = detail[: match.start()]
    wanted = re.fullmatch(r"Expected `(\w+)`, got `str`", reason)
    if wanted is not None:
        reason = f"not a valid {wanted.group(1)}"
    elif field in _CHOICES:
        reason = f"expected one of {', '.join(_CHOICES[field])}"
    shown = "<redacted>" if field in _SECRET else repr(raw.get(field))
    return ConfigError(f"{var}={shown} is invalid: {reason}")


def _check_urls(settings: Settings) -> None:
    for field, schemes in _URL_SCHEMES.items():
        value = getattr(settings, field)
        if value is not None and not value.startswith(schemes):
            var = _ENV[field][0]
            wanted = " or ".join(schemes)
            raise ConfigError(f"{var}={value!r} is invalid: expected a URL starting with {wanted}")


def _check_allow(settings: Settings) -> None:
    from engine.urls import parse_allow

    try:
        parse_allow(settings.outbound_allow)
    except ValueError as exc:
        raise ConfigError(f"VOUCHER_OUTBOUND_ALLOW is invalid: {exc}") from None


def _check_networks(settings: Settings) -> None:
    import ipaddress

    for item in (p.strip() for p in settings.trusted_proxies.split(",")):
        try:
            if item:
                ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(
                f"VOUCHER_TRUSTED_PROXIES: {item!r} is not an IP address or network "
                "(e.g. 127.0.0.1, 10.0.0.0/8)"
            ) from None


def _default_text(field: str) -> str:
    value = getattr(_DEFAULTS, field)
    if value is None or value == "":
        return "(unset)"
    if isinstance(value, Limit):
        return format_limit(value)
    if field in _TIERS:
        return ",".join(format_limit(limit) for limit in value)
    return str(value)


_DEFAULTS = Settings()

SETTINGS_DOC: list[tuple[str, str, str]] = [
    (var, _default_text(field), doc) for field, (var, doc) in _ENV.items()
]
"""(environment variable, default, description) for every setting, in field order."""


def settings_markdown() -> str:
    """The configuration table of docs/configuration.md, as Markdown."""
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{var}` | `{default}` | {doc} |" for var, default, doc in SETTINGS_DOC]
    return "\n".join(lines)
