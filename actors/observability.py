"""Observability: the engine's Prometheus metrics and its structured JSON logs.

Metrics
-------
The hot path's metrics are Ray metrics (:mod:`ray.util.metrics`), recorded in the process
that does the work (shard actors, gateway replicas) and exported by each node's metrics
agent in the Prometheus text format, with a ``ray_`` prefix and Ray's own tags
(``WorkerId``, ``NodeAddress``, ``SessionName``...) next to ours. Ray pushes them to the
agent about every 10 seconds (``metrics_report_interval_ms``). To scrape:

* every Ray node serves ``http://<node ip>:<metrics export port>/metrics``; the port is
  random unless fixed with ``ray start --metrics-export-port=8080`` (or
  ``ray.init(_metrics_export_port=8080)`` for a local Ray); from a driver it is
  ``ray._private.worker.global_worker.node.metrics_export_port``;
* with the dashboard running, the head writes every node's address to
  ``/tmp/ray/session_latest/prom_metrics_service_discovery.json`` (usable as any
  Prometheus's ``file_sd_configs``) and ``ray metrics launch-prometheus`` starts a
  Prometheus configured with it.

The gateway's own ``GET /metrics`` (``serve/metrics.py``, a ``prometheus_client``
registry) stays: it is the per-replica view of HTTP decisions and rate limits.

Tags are bounded: ``shard`` (one per shard), ``op`` (a fixed list), ``outcome`` (``ok`` or
one of the engine's error codes, a fixed set), ``channel``. Counters move once per batch
(``inc(n)``), never once per request, so a metric costs a few microseconds per actor call.

Logs
----
:func:`configure_json_logging` makes every record one JSON object per line: ``ts``,
``level``, ``logger``, ``message``, ``request_id`` and the record's ``extra`` fields. The
request id is the gateway's ``X-Request-ID`` (the client's, or one made up); it lives in
:data:`request_id_var` while the gateway handles the request, and travels to the shard
actors as a list beside the batch's msgpack payload (one id per request of the batch).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import IO, Any

import msgspec
from ray.util.metrics import Counter, Gauge, Histogram

from engine.shard_state import Outcome

# --- request ids ------------------------------------------------------------------------

REQUEST_ID_HEADER = "X-Request-ID"
_HEADER_KEY = REQUEST_ID_HEADER.lower().encode()
# What a client may send as its own id: short, visible ASCII (no spaces or controls), so
# it is inert in logs (which JSON-escape it anyway) and in response headers.
_VALID_ID = re.compile(r"[\x21-\x7e]{1,128}")

request_id_var: ContextVar[str | None] = ContextVar("voucher_request_id", default=None)


def new_request_id() -> str:
    return os.urandom(12).hex()


def accept_request_id(value: str | None) -> str:
    """The client's id when it is well-formed (1-128 visible ASCII characters), else a
    fresh one: an id ends up in logs and response headers, so nothing else gets in."""
    if value and _VALID_ID.fullmatch(value):
        return value
    return new_request_id()


def current_request_id() -> str | None:
    return request_id_var.get()


@contextlib.contextmanager
def bound_request_id(request_id: str | None) -> Iterator[str | None]:
    """Make ``request_id`` the current one for the block (and the tasks it starts)."""
    token = request_id_var.set(request_id)
    try:
        yield request_id
    finally:
        request_id_var.reset(token)


class RequestIdMiddleware:
    """ASGI middleware: take ``X-Request-ID`` from the request (or make one), make it the
    current request id while the app runs, and return it on the response.

    Behind Ray Serve use ``echo=False``: Serve itself (its proxy, and the replica's direct
    ingress in HAProxy mode) reads ``X-Request-ID``, makes one when it is missing, forwards
    it to the app and returns it on the response; echoing it again would send the header
    twice. Then the forwarded id is used as is (clipped to 128 characters for the logs),
    so the logs name exactly what the client got back.

    Pure ASGI rather than Starlette's ``BaseHTTPMiddleware``: the app runs in the same
    task (so it sees the context variable) and no response is re-streamed.
    """

    def __init__(self, app: Any, *, echo: bool = True) -> None:
        self.app = app
        self.echo = echo

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = None
        for key, value in scope["headers"]:
            if key == _HEADER_KEY:
                sent = value.decode("latin-1")
                break
        if not self.echo:
            token = request_id_var.set(sent[:128] if sent else new_request_id())
            try:
                await self.app(scope, receive, send)
            finally:
                request_id_var.reset(token)
            return

        rid = accept_request_id(sent)
        header = (_HEADER_KEY, rid.encode())

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", ()) if h[0].lower() != _HEADER_KEY]
                headers.append(header)
                message = {**message, "headers": headers}
            await send(message)

        token = request_id_var.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


# --- JSON logs --------------------------------------------------------------------------

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RESERVED = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName", "request_id"}
)


def _fallback(obj: Any) -> Any:
    return str(obj)


_json = msgspec.json.Encoder(enc_hook=_fallback)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC, ISO 8601, ms), ``level``, ``logger``,
    ``message``, ``request_id`` (the record's ``request_id`` extra, else the current one),
    every other ``extra`` field, and ``exc`` / ``stack`` when present."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        try:
            return _json.encode(doc).decode()
        except Exception:  # e.g. non-string dict keys in an extra: the slow, lenient way
            return json.dumps(doc, default=str)


def _iso(created: float) -> str:
    secs = int(created)
    ms = int((created - secs) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ms:03d}Z"


_OURS = "_voucher_json"


def configure_json_logging(level: str | int, *, stream: IO[str] | None = None) -> logging.Handler:
    """Send the root logger's records to ``stream`` as JSON lines, at ``level`` (the
    ``log_level`` setting). Idempotent: replaces the handler it installed
    before and plain console handlers (``logging.basicConfig``'s), so records are not
    printed twice; file and capture handlers are left alone.

    The default stream is the process's real stderr (``sys.__stderr__``), which Ray sends
    to the worker's ``worker-*.err`` log file: a Serve replica in throughput-optimized mode
    replaces ``sys.stderr`` with a stand-in that re-logs every line through Serve's text
    formatter (and walks the stack per write), which would wrap each JSON line again."""
    if isinstance(level, str):
        level = level.upper()
    root = logging.getLogger()
    consoles = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    for h in list(root.handlers):
        plain_console = type(h) is logging.StreamHandler and h.stream in consoles
        if getattr(h, _OURS, False) or plain_console:
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.__stderr__ or sys.stderr)
    handler.setFormatter(JsonFormatter())
    setattr(handler, _OURS, True)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


# --- metrics ----------------------------------------------------------------------------

_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
_SECONDS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]

SHARD_DECISIONS = Counter(
    "voucher_shard_decisions_total",
    "Requests decided by a shard actor, by operation and outcome (ok or the error code)",
    tag_keys=("shard", "op", "outcome"),
)
SHARD_BATCH_SIZE = Histogram(
    "voucher_shard_batch_size",
    "Requests carried by one *_many call to a shard actor",
    boundaries=_SIZES,
    tag_keys=("shard", "op"),
)
SHARD_COMMIT_SECONDS = Histogram(
    "voucher_shard_commit_seconds",
    "Duration of one successful group commit (one Postgres transaction)",
    boundaries=_SECONDS,
    tag_keys=("shard",),
)
SHARD_COMMIT_EVENTS = Histogram(
    "voucher_shard_commit_events",
    "Events written by one group commit",
    boundaries=_SIZES,
    tag_keys=("shard",),
)
SHARD_COMMIT_FAILURES = Counter(
    "voucher_shard_commit_failures_total",
    "Group-commit attempts that failed (retried, or fatal on the last try)",
    tag_keys=("shard",),
)
SHARD_PENDING_EVENTS = Gauge(
    "voucher_shard_pending_events",
    "Decided events waiting for the next group commit (sampled every second)",
    tag_keys=("shard",),
)
SHARD_COMMIT_WAITERS = Gauge(
    "voucher_shard_commit_waiters",
    "Durable answers waiting for a group commit (sampled every second)",
    tag_keys=("shard",),
)

GATEWAY_BATCH_SIZE = Histogram(
    "voucher_gateway_batch_size",
    "Requests per actor call sent by a gateway's micro-batcher",
    boundaries=_SIZES,
    tag_keys=("shard", "op"),
)
GATEWAY_CALL_SECONDS = Histogram(
    "voucher_gateway_call_seconds",
    "Round trip of one micro-batch actor call (including the shard's group commit)",
    boundaries=_SECONDS,
    tag_keys=("shard", "op"),
)
GATEWAY_BATCH_FAILURES = Counter(
    "voucher_gateway_batch_failures_total",
    "Micro-batch actor calls that failed as a whole (every request in them got the error)",
    tag_keys=("shard", "op"),
)
GATEWAY_QUEUED = Gauge(
    "voucher_gateway_queued",
    "Requests queued in a gateway's micro-batcher, waiting for a call slot",
    tag_keys=("shard", "op"),
)
GATEWAY_INFLIGHT = Gauge(
    "voucher_gateway_inflight",
    "Micro-batch actor calls in flight from a gateway",
    tag_keys=("shard", "op"),
)

# Fed by the delivery workers (actors/delivery.py): one ``inc`` per batch with its count,
# ``channel`` in {email, sms, push} and ``outcome`` in {sent, retried, dead_lettered}.
DELIVERY_MESSAGES = Counter(
    "voucher_delivery_messages_total",
    "Messages handled by the delivery workers, by channel and outcome",
    tag_keys=("channel", "outcome"),
)


def outcome_label(out: Outcome) -> str:
    """``ok``, or the error code of a rejection or of a failed validation."""
    if out.rejection is not None:
        return out.rejection.error
    v = out.validation
    if v is not None and not v.valid:
        return v.error or "invalid"
    return "ok"


class ShardMetrics:
    """The metrics of one shard actor, with its tag dicts built once."""

    def __init__(self, shard_id: int) -> None:
        self.shard = str(shard_id)
        self._tags = {"shard": self.shard}
        self._op_tags: dict[str, dict[str, str]] = {}
        self._outcome_tags: dict[tuple[str, str], dict[str, str]] = {}
        # when the last group-commit attempt ended (monotonic), and whether it committed:
        # the shard's health view tells a stalled writer from an idle one by it
        self.last_commit_at = time.monotonic()
        self.last_commit_ok = True

    def _op(self, op: str) -> dict[str, str]:
        tags = self._op_tags.get(op)
        if tags is None:
            tags = self._op_tags[op] = {"shard": self.shard, "op": op}
        return tags

    def _outcome(self, op: str, outcome: str) -> dict[str, str]:
        tags = self._outcome_tags.get((op, outcome))
        if tags is None:
            tags = self._outcome_tags[(op, outcome)] = {
                "shard": self.shard,
                "op": op,
                "outcome": outcome,
            }
        return tags

    def batch(self, op: str, outs: Sequence[Outcome]) -> list[tuple[int, str]]:
        """Record one batch of decisions; returns the ``(index, error code)`` of the
        requests that were not ``ok`` (for the caller's logs)."""
        n = len(outs)
        if n == 0:
            return []
        SHARD_BATCH_SIZE.observe(n, self._op(op))
        failed: list[tuple[int, str]] = []
        for i, out in enumerate(outs):
            if out.rejection is not None or (
                out.validation is not None and not out.validation.valid
            ):
                failed.append((i, outcome_label(out)))
        if len(failed) < n:
            SHARD_DECISIONS.inc(n - len(failed), self._outcome(op, "ok"))
        if failed:
            counts: dict[str, int] = {}
            for _, code in failed:
                counts[code] = counts.get(code, 0) + 1
            for code, k in counts.items():
                SHARD_DECISIONS.inc(k, self._outcome(op, code))
        return failed

    def commit(self, events: int, seconds: float, ok: bool) -> None:
        """One group-commit attempt (the write-behind's observer)."""
        self.last_commit_at = time.monotonic()
        self.last_commit_ok = ok
        if ok:
            SHARD_COMMIT_SECONDS.observe(seconds, self._tags)
            SHARD_COMMIT_EVENTS.observe(events, self._tags)
        else:
            SHARD_COMMIT_FAILURES.inc(1, self._tags)

    def queues(self, pending_events: int, waiters: int) -> None:
        SHARD_PENDING_EVENTS.set(pending_events, self._tags)
        SHARD_COMMIT_WAITERS.set(waiters, self._tags)


class BatcherMetrics:
    """The micro-batcher's metrics (a gateway replica's lanes, tagged by shard and op)."""

    def __init__(self) -> None:
        self._tags: dict[tuple[int, str], dict[str, str]] = {}

    def _lane(self, shard: int, op: str) -> dict[str, str]:
        tags = self._tags.get((shard, op))
        if tags is None:
            tags = self._tags[(shard, op)] = {"shard": str(shard), "op": op}
        return tags

    def sent(self, shard: int, op: str, size: int, seconds: float, failed: bool) -> None:
        tags = self._lane(shard, op)
        GATEWAY_BATCH_SIZE.observe(size, tags)
        GATEWAY_CALL_SECONDS.observe(seconds, tags)
        if failed:
            GATEWAY_BATCH_FAILURES.inc(1, tags)

    def depth(self, shard: int, op: str, queued: int, inflight: int) -> None:
        tags = self._lane(shard, op)
        GATEWAY_QUEUED.set(queued, tags)
        GATEWAY_INFLIGHT.set(inflight, tags)


__all__ = [
    "REQUEST_ID_HEADER",
    "BatcherMetrics",
    "JsonFormatter",
    "RequestIdMiddleware",
    "ShardMetrics",
    "accept_request_id",
    "bound_request_id",
    "configure_json_logging",
    "current_request_id",
    "new_request_id",
    "outcome_label",
    "request_id_var",
]
