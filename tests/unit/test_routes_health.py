"""The ops routes (serve/routes/health.py) over fake services."""

from typing import Any

from serve.health import REQUIRED, Component, Report
from tests.route_fakes import assert_refused, gateway, problem_of


class FakeProbe:
    def __init__(self, ready: bool) -> None:
        self.ready = ready
        self.reports = 0

    async def report(self) -> Report:
        self.reports += 1
        status = "ok" if self.ready else "down"
        components = {n: Component(status, None if self.ready else f"{n} away") for n in REQUIRED}
        return Report(ready=self.ready, status=status, components=components, shards=[{"shard": 0, "status": status}])


def _with_probe(fakes: Any, probe: FakeProbe) -> None:
    object.__setattr__(fakes.services, "health", probe)


def test_liveness_needs_nothing() -> None:
    with gateway() as (client, _):
        r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_readiness_names_what_is_down() -> None:
    with gateway() as (client, fakes):
        _with_probe(fakes, FakeProbe(ready=False))
        r = client.get("/readyz")
        body = problem_of(r, 503, "not_ready")
        assert r.headers["retry-after"] == "1"
        assert "postgres: postgres away" in body["detail"]
        assert body["components"]["shards"]["status"] == "down"
        _with_probe(fakes, FakeProbe(ready=True))
        r = client.get("/readyz")
        assert r.status_code == 200
        assert r.json()["status"] == "ready" and r.json()["shards"] == 1


def test_health_reports_every_component() -> None:
    with gateway() as (client, fakes):
        _with_probe(fakes, FakeProbe(ready=True))
        r = client.get("/health")
    assert r.status_code == 200
    assert set(r.json()["components"]) == set(REQUIRED)


def test_metrics_are_for_admins() -> None:
    with gateway() as (client, fakes):
        probe = FakeProbe(ready=True)
        _with_probe(fakes, probe)
        assert_refused(client, fakes, "GET", "/metrics", "metrics.read", "manager")
        assert probe.reports == 0
        r = client.get("/metrics", headers=fakes.token("admin"))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    # charged to the admin (the route answers its own response: no rate-limit headers)
    assert [c[0] for c in fakes.limiter.hits[-1]["checks"]] == ["admin:user:usr_1"]
    assert probe.reports == 1
    assert "voucher_gateway_batch_items 7.0" in r.text  # the replica's batcher
