"""``kill <pid>`` (SIGTERM, what systemd and Kubernetes send) stops ``voucher-engine up``
the way Ctrl-C does: the real command, on its own embedded Postgres and Valkey and its own
Ray, answers some redemptions, gets SIGTERM, and exits 0 in bounded time with no native
stack trace; every acknowledged redemption is in Postgres and no process it started
(Postgres, Valkey, Ray, HAProxy) is left running.

A SIGTERM during start-up (after Ray is up, before the engine runs: where Ray's native
handler used to abort the process) stops it just as cleanly.

Fast ack mode with a long batch window: the answers leave before their commit, so the
check also proves that stopping flushes the shards' group commits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import psutil
import pytest

from ops.servers import embedded_for_tests
from tests.http_support import bearer
from tests.support import free_port

pytestmark = pytest.mark.fault

_START_S = 150.0  # start-up of Postgres, Valkey, Ray and Serve on a busy 2-core machine
_STOP_S = 45.0


def _engine_env(data_dir: Path, port: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VOUCHER_", "RAY_ADDRESS", "RAY_SERVE_HAPROXY_"))
    }
    env.update(
        VOUCHER_DATA_DIR=str(data_dir),
        VOUCHER_HTTP_PORT=str(port),
        VOUCHER_SHARDS="2",
        VOUCHER_DELIVERY_WORKERS="0",
        VOUCHER_ACK_MODE="fast",
        VOUCHER_BATCH_WINDOW_MS="100",
        VOUCHER_ADMIN_EMAIL="admin@sigterm.example",
        VOUCHER_ADMIN_PASSWORD="admin-password-for-sigterm",
        VOUCHER_RAY_NAMESPACE="sigterm",
        # a second HAProxy on the machine must not collide with the session's
        RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()),
        RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()),
        PYTHONUNBUFFERED="1",
    )
    return env


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + _START_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"voucher-engine up exited early:\n{log.read_text()}"
        if "running;" not in log.read_text(errors="replace"):  # start-up not finished
            time.sleep(0.5)
            continue
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"not ready within {_START_S:.0f}s:\n{log.read_text()}")


async def _redeem_some(url: str, n: int) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        r = await client.post(
            "/v1/auth/login",
            json={"email": "admin@sigterm.example", "password": "admin-password-for-sigterm"},
        )
        r.raise_for_status()
        admin = bearer(r.json()["access_token"])
        code = f"SIGTERM{os.getpid()}"
        r = await client.post(
            "/v1/campaigns",
            headers=admin,
            json={
                "name": "stop", "type": "shared_code", "currency": "EUR",
                "discount": {"kind": "amount", "value": 100},
                "limits": {"total": 1000, "per_customer": 1}, "shared_code": code,
                "ends_at": (datetime.now(UTC) + timedelta(days=1)).isoformat(),
            },
        )
        assert r.status_code == 201, r.text
        (await client.post(f"/v1/campaigns/{r.json()['id']}/activate", headers=admin)).raise_for_status()

        async def one(i: int) -> str:
            r = await client.post(
                "/v1/redemptions",
                headers={**admin, "Idempotency-Key": f"stop-{i}"},
                json={"code": code, "customer_id": f"c-{i}", "order": {"amount": 5000, "currency": "EUR"}},
            )
            assert r.status_code == 201, r.text
            return str(r.json()["id"])

        return list(await asyncio.gather(*[one(i) for i in range(n)]))


def _postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])


def _alive(pids: set[int]) -> set[int]:
    left = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.add(pid)
        except psutil.NoSuchProcess:
            pass
    return left


async def _stored(dsn: str, ids: list[str]) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id FROM redemptions WHERE id = ANY($1::text[])", ids)
    finally:
        await conn.close()
    return {r["id"] for r in rows}


def _up(data_dir: Path, port: int, log: Path, *flags: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [str(Path(sys.executable).with_name("voucher-engine")), "up", *flags],
            env=_engine_env(data_dir, port),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )


def _reap(proc: subprocess.Popen[bytes], data_dir: Path) -> None:
    """After a failed test: stop the engine as an operator would, then anything it left."""
    if proc.poll() is not None:
        return
    left = [*psutil.Process(proc.pid).children(recursive=True)]
    with contextlib.suppress(Exception):
        left.append(psutil.Process(_postmaster_pid(data_dir)))
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(_STOP_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _assert_clean_exit(rc: int, log: Path, started: set[int]) -> None:
    text = log.read_text(errors="replace")
    assert rc == 0, f"exit status {rc} after SIGTERM:\n{text}"
    assert "SIGTERM received" not in text and "PC: @" not in text, text
    assert "stopping (SIGTERM)" in text, text
    deadline = time.monotonic() + 10  # Ray's processes exit right after its shutdown
    while _alive(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {p: psutil.Process(p).cmdline()[:1] for p in _alive(started)}
    assert not left, f"left running after the stop: {left}"


def test_sigterm_during_start_up(tmp_path: Path) -> None:
    data_dir, log = tmp_path / "data", tmp_path / "up.log"
    proc = _up(data_dir, free_port(), log, "--no-http")
    try:
        deadline = time.monotonic() + _START_S
        while "engine:" not in log.read_text(errors="replace"):  # Ray is up
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        started = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        started.add(_postmaster_pid(data_dir))
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(_STOP_S)
    finally:
        _reap(proc, data_dir)
    _assert_clean_exit(rc, log, started)


def test_sigterm_stops_up_cleanly(tmp_path: Path) -> None:
    data_dir, log = tmp_path / "data", tmp_path / "up.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _up(data_dir, port, log, "--no-reports")
    try:
        _wait_ready(proc, url, log)
        acked = asyncio.run(_redeem_some(url, 20))
        started = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        started.add(_postmaster_pid(data_dir))

        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(_STOP_S)
        took = time.monotonic() - t0
    finally:
        _reap(proc, data_dir)
    _assert_clean_exit(rc, log, started)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/readyz", timeout=2)

    svc = embedded_for_tests(data_dir)  # the engine's own Postgres, started again to check
    try:
        stored = asyncio.run(_stored(svc.database_url, acked))
    finally:
        svc.stop()
    assert stored == set(acked), f"{len(set(acked) - stored)} acknowledged redemptions lost"
    print(f"stopped in {took:.1f}s after SIGTERM")
