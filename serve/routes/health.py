"""Liveness, readiness, dependency health and the gateway's Prometheus metrics."""

from typing import Annotated, Any

import msgspec
from fastapi import Response
from fastapi.responses import JSONResponse, PlainTextResponse

from serve import metrics
from serve.auth import Principal
from serve.health import Report
from serve.problems import problem, problem_responses
from serve.routes.deps import GUARDED, Svc, require, router

routes = router()


async def _health(svc: Svc) -> Report:
    report: Report = await svc.health.report()
    metrics.observe_health(report)
    return report


@routes.get("/healthz", tags=["ops"])
async def healthz() -> dict[str, str]:
    """Liveness: the replica answers. Checks nothing else, costs nothing."""
    return {"status": "ok"}


@routes.get("/readyz", tags=["ops"], responses=problem_responses(503))
async def readyz(svc: Svc) -> Response:
    """Readiness: checkout can be served (shards loaded and committing, Postgres
    answering, coordinator reachable); Valkey away does not count (serve/health.py)."""
    report = await _health(svc)
    if not report.ready:
        why = "; ".join(f"{n}: {report.components[n].reason}" for n in report.not_ready())
        return problem(
            503, "not_ready", "Service Unavailable", f"not ready: {why}",
            headers={"Retry-After": "1"},
            components=msgspec.to_builtins(report.components),
        )
    return JSONResponse(
        {
            "status": "ready",
            "shards": len(report.shards),
            "components": msgspec.to_builtins(report.components),
        }
    )


@routes.get("/health", tags=["ops"])
async def health(svc: Svc) -> dict[str, Any]:
    """Each dependency's state (ok, degraded or down, with a reason) and each shard's."""
    return (await _health(svc)).body()


@routes.get(
    "/metrics", tags=["ops"], response_class=PlainTextResponse, responses=problem_responses(*GUARDED)
)
async def metrics_(
    caller: Annotated[Principal, require("metrics.read")], svc: Svc
) -> PlainTextResponse:
    metrics.observe_batcher(svc.checkout.batcher)
    await _health(svc)
    return PlainTextResponse(metrics.render(), media_type=metrics.CONTENT_TYPE)
