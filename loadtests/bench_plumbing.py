"""Plumbing the benchmarks share: an engine with its HTTP API on one machine, waiting for a
server to answer, one count query, and the baseline worker shape of the delivery benchmarks (a Postgres pool and a Valkey client,
``concurrency`` loops popping jobs off one list until it is empty)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from redis.asyncio import Redis


@dataclass(frozen=True)
class HttpEngine:
    """An engine a benchmark drives over HTTP: ``client`` on its API, ``admin`` headers."""

    dsn: str
    client: httpx.Client
    admin: dict[str, str]


@contextlib.contextmanager
def http_engine(name: str, shards: int, **settings: Any) -> Iterator[HttpEngine]:
    """Embedded Postgres and Valkey, a local Ray, ``shards`` shards and one gateway replica
    (namespace ``name``, extra ``settings``), logged in as the admin; all stopped after."""
    import ray

    from actors.client import start_engine
    from engine.settings import Settings
    from loadtests.harness import machine_summary
    from ops.servers import embedded_for_tests
    from ops.start import local_ray_environment, start_http
    from store.migrations import migrate
    from tests.support import free_port

    tmp = Path(tempfile.mkdtemp(prefix=f"{name}-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    svc = embedded_for_tests(tmp)
    try:
        dsn = svc.database_url
        asyncio.run(migrate(dsn))
        print(f"machine: {machine_summary()}", flush=True)
        local_ray_environment()
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, namespace=name)
        conf = Settings(
            shards=shards, namespace=name, http_port=free_port(),
            admin_email="admin@bench.example", admin_password="bench-admin-password",
            data_dir=str(tmp), **settings,
        )
        engine = start_engine(conf, dsn)  # noqa: F841 -- the handle keeps the actors alive
        base = start_http(conf, dsn, svc.redis_url, replicas={"Gateway": 1})
        wait_http(f"{base}/healthz", 60.0)
        with httpx.Client(base_url=base, timeout=600.0) as c:
            r = c.post("/v1/auth/login", json={"email": conf.admin_email, "password": conf.admin_password})
            r.raise_for_status()
            yield HttpEngine(dsn, c, {"Authorization": f"Bearer {r.json()['access_token']}"})
    finally:
        ray.shutdown()
        svc.stop()


def wait_http(url: str, timeout_s: float = 90.0) -> None:
    """Block until ``url`` answers 200; ``RuntimeError`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s")
        time.sleep(0.3)


async def fetch_count(dsn: str, sql: str, *args: Any) -> int:
    """The integer ``sql`` answers, over a connection of its own."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(sql, *args))
    finally:
        await conn.close()


JobFn = Callable[[Any, Redis, str], Awaitable[None]]
"""Handles one job (its id, decoded) with the worker's pool and Valkey client."""


async def drain_queue(dsn: str, redis_url: str, queue: str, concurrency: int, handle: JobFn) -> int:
    """Run ``concurrency`` loops over ``queue`` until it is empty; the number of jobs handled."""
    db = await asyncpg.create_pool(dsn, min_size=1, max_size=concurrency)
    assert db is not None
    redis = Redis.from_url(redis_url)
    done = 0

    async def job_loop() -> None:
        nonlocal done
        while True:
            job = await redis.rpop(queue)
            if job is None:
                return
            assert isinstance(job, bytes)
            await handle(db, redis, job.decode())
            done += 1

    try:
        await asyncio.gather(*(job_loop() for _ in range(concurrency)))
    finally:
        await redis.aclose()
        await db.close()
    return done
