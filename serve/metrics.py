"""Prometheus metrics of the gateway process, rendered at ``GET /metrics``.

Each gateway replica reports its own counters (Prometheus sums replicas at query time).

This is the gateway's HTTP-side view only. The actors' metrics (shard decisions by op and
outcome, batch sizes, group-commit latency and events, pending events and waiters) and the
micro-batcher's per-shard queue depths, calls in flight and batch sizes are Ray metrics
(``actors/observability.py``), exported with a ``ray_`` prefix by every Ray node's metrics
agent (``http://<node>:<metrics export port>/metrics``; fix the port with
``ray start --metrics-export-port``, or let ``ray metrics launch-prometheus`` discover the
nodes). Scrape both.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

REGISTRY = CollectorRegistry()
CONTENT_TYPE = CONTENT_TYPE_LATEST

DECISIONS = Counter(
    "voucher_decisions_total",
    "Validations, redemptions and reservations decided, by operation and outcome",
    ["op", "outcome"],
    registry=REGISTRY,
)
DECISION_SECONDS = Histogram(
    "voucher_decision_seconds",
    "Time from the gateway handing a request to the micro-batcher to its answer",
    ["op"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
    registry=REGISTRY,
)
RATE_LIMITED = Counter(
    "voucher_rate_limited_total", "Requests refused with 429, by limit", ["limit"], registry=REGISTRY
)
BATCHES = Gauge(
    "voucher_gateway_batches", "Actor calls made by the micro-batcher", registry=REGISTRY
)
BATCH_ITEMS = Gauge(
    "voucher_gateway_batch_items", "Requests carried by those actor calls", registry=REGISTRY
)
CALL_SECONDS = Gauge(
    "voucher_gateway_call_seconds_total",
    "Summed round trip of those actor calls (send to answer; includes the group commit)",
    registry=REGISTRY,
)
CHANNELS = Gauge(
    "voucher_gateway_shard_channels",
    "Shards this replica reaches over their Unix socket (the others through Ray calls)",
    registry=REGISTRY,
)
BATCH_MAX = Gauge(
    "voucher_gateway_batch_max", "Largest micro-batch so far", registry=REGISTRY
)

READY = Gauge(
    "voucher_ready",
    "1 when this replica can serve checkout (what GET /readyz says), else 0",
    registry=REGISTRY,
)
HEALTH = Gauge(
    "voucher_health",
    "State of a dependency as the last health report saw it: 1 ok, 0.5 degraded, 0 down",
    ["component"],
    registry=REGISTRY,
)
SHARD_HEALTH = Gauge(
    "voucher_shard_health",
    "State of a shard as the last health report saw it: 1 ok, 0.5 degraded, 0 down",
    ["shard"],
    registry=REGISTRY,
)
_LEVEL = {"ok": 1.0, "degraded": 0.5}


def observe_health(report: Any) -> None:
    READY.set(1 if report.ready else 0)
    for name, component in report.components.items():
        HEALTH.labels(name).set(_LEVEL.get(component.status, 0.0))
    for shard in report.shards:
        SHARD_HEALTH.labels(str(shard["shard"])).set(_LEVEL.get(shard["status"], 0.0))


def observe_decision(op: str, outcome: Any, seconds: float) -> None:
    if outcome.rejection is not None:
        label = outcome.rejection.error
    elif outcome.validation is not None:
        label = "valid" if outcome.validation.valid else (outcome.validation.error or "invalid")
    else:
        label = "ok"
    DECISIONS.labels(op, label).inc()
    DECISION_SECONDS.labels(op).observe(seconds)


def observe_batcher(batcher: Any) -> None:
    stats = batcher.stats() if hasattr(batcher, "stats") else {}
    BATCHES.set(stats.get("batches", 0))
    BATCH_ITEMS.set(stats.get("items", 0))
    BATCH_MAX.set(stats.get("max_batch", 0))
    CALL_SECONDS.set(stats.get("call_seconds", 0.0))
    CHANNELS.set(stats.get("channels", 0))


def render() -> bytes:
    return generate_latest(REGISTRY)
