"""A short chaos run (``loadtests/chaos.py``) with a fixed seed: mixed checkout load over
HTTP, issuance with email delivery, and a seeded schedule of faults; then the checker over
the clients' log, Postgres and the SMTP sink must find no anomaly, and the engine must
serve again within the recovery timeout after every fault.

Fault kinds: every kind the full command knows (shard_kill, coordinator_kill, zombie_shard,
issuer_kill, worker_kill, pg_freeze, pg_restart, valkey_restart, valkey_wipe); in 30 s the
seed's schedule reaches the first few of them (valkey_wipe, pg_restart, zombie_shard).
The full command (``python -m loadtests.chaos``) runs for minutes, see BENCHMARKS.md.

The run is a subprocess: it has its own Ray (with its own Serve app), Postgres and Valkey,
so the session's shared ones are untouched and its faults stay private."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fault

SEED = 34
KINDS = (
    "shard_kill,coordinator_kill,zombie_shard,issuer_kill,worker_kill,pg_freeze,pg_restart,"
    "valkey_restart,valkey_wipe"
)
ROOT = Path(__file__).resolve().parents[2]


def test_short_chaos_run_finds_no_anomaly(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    cmd = [
        sys.executable, "-m", "loadtests.chaos", "--seed", str(SEED), "--duration", "30", "--gaps", "1,3",
        "--faults", KINDS, "--clients", "6", "--codes", "800", "--cards", "20",
        "--customers", "40", "--issuances", "1", "--replays", "300",
        "--recovery-timeout", "20", "--dir", str(tmp_path / "data"), "--json", str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=170, check=False)
    print(proc.stdout[-6000:])
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads(out.read_text())
    assert summary["anomalies"] == [], summary["anomalies"]
    assert summary["not_recovered"] == [], summary["not_recovered"]
    # the run proves something: faults happened and clients were answered through them
    kinds = [f["kind"] for f in summary["faults"]]
    assert kinds[:3] == ["valkey_wipe", "pg_restart", "zombie_shard"], kinds
    acked = summary["operations"]["acknowledged"]
    assert acked.get("redeem_unique", 0) + acked.get("redeem_gift", 0) > 100, acked
    assert summary["checked"]["deliveries"]["sent"] == 40, summary["checked"]
    assert proc.returncode == 0, proc.stdout[-2000:]
