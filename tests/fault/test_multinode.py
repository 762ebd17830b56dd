"""Multi-node behaviour on one machine: shards spread over several raylets, and removing a
node under load moves its shards to the surviving nodes, where they recover from Postgres,
with no acknowledged redemption lost and none doubled.

A ``ray.cluster_utils.Cluster`` needs a Ray of its own, and this session already holds one
(the ``ray_cluster`` fixture), so the scenario runs in a subprocess:
``tests/fault/multinode_scenario.py`` (it checks everything itself and prints a JSON
summary). It gets the session's Postgres server and works in a database of its own there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.fault,
    pytest.mark.skipif(sys.platform == "win32", reason="ray.cluster_utils needs POSIX"),
]

REPO = Path(__file__).resolve().parents[2]
SCENARIO = Path(__file__).with_name("multinode_scenario.py")
# The scenario's own deadline for load and recovery, and the hard limit of the subprocess
# (cluster start-up and shutdown included). A passing run takes ~15 s on 2 cores.
DEADLINE_S = 90
HARD_LIMIT_S = 150


def _remove_tree(path: str) -> None:
    # Ray's exiting processes may still write into their session dir for a moment.
    for _ in range(50):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            return
        time.sleep(0.1)


def _excerpt(stderr: str, lines: int = 40) -> str:
    """The scenario's own lines and the tail of stderr (Ray's logs are long)."""
    own = [ln for ln in stderr.splitlines() if ln.startswith(("[multinode", "SCENARIO FAILED"))]
    tail = stderr.splitlines()[-lines:]
    return "\n".join(["--- scenario log ---", *own, "--- stderr tail ---", *tail])


def test_node_removed_under_load_moves_its_shards_and_loses_nothing(services):
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # the scenario builds its own cluster
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    # A private, short (unix sockets live there) Ray temp dir: the cluster's address file
    # and sessions stay away from the session's Ray and from any other Ray on the machine.
    ray_tmp = tempfile.mkdtemp(prefix="vmn-", dir="/tmp")
    env["RAY_TMPDIR"] = ray_tmp
    cmd = [
        sys.executable,
        str(SCENARIO),
        "--dsn",
        services.database_url,
        "--timeout",
        str(DEADLINE_S),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a hung run is killed whole
    )
    try:
        try:
            out, err = proc.communicate(timeout=HARD_LIMIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"the scenario hung past {HARD_LIMIT_S} s\n{_excerpt(err)}")
    finally:
        _remove_tree(ray_tmp)

    lines = out.strip().splitlines()
    assert lines, f"no summary (exit {proc.returncode})\n{_excerpt(err)}"
    summary = json.loads(lines[-1])
    print(json.dumps(summary, indent=2, sort_keys=True))
    assert proc.returncode == 0 and summary["ok"], (
        f"{summary.get('error', f'exit {proc.returncode}')}\n{_excerpt(err)}"
    )
    # The scenario asserted all of this itself; restated as the test's contract.
    assert len(set(summary["nodes_before"].values())) >= 2, "shards were spread over nodes"
    assert summary["lost_shards"], "the removed node hosted shards"
    assert summary["victim_node"] not in summary["nodes_after"].values(), "they moved"
    assert summary["victim_requests_acked_after_kill"] > 0, "the load went on after the loss"
    assert summary["redemptions"] == summary["unique_codes"] + summary["shared_limit"]
    assert summary["replays_checked"] == summary["requests"]
