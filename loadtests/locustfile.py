"""Locust entry point for the voucher engine's scenarios (web UI or headless).

Pick the scenario with ``VOUCHER_SCENARIO`` (``flash_sale`` by default, or ``checkout``,
``browse``, ``admin``), or point ``-f`` at ``loadtests/scenarios/<name>.py`` directly.

The easy way, headless, against an engine it starts and stops itself (embedded Postgres,
Valkey, Ray in HAProxy mode), with codes issued through the engine and reports written to
``loadtests/results/<scenario>-<timestamp>/``::

    python -m loadtests.run_scenario flash_sale --users 200 --spawn-rate 100 --seconds 30

The same with Locust's web UI (http://127.0.0.1:8089)::

    python -m loadtests.run_scenario flash_sale --web

By hand, against an engine that is already running (``make run``), as the admin::

    VOUCHER_ADMIN_EMAIL=admin@example.com VOUCHER_ADMIN_PASSWORD=... \\
    VOUCHER_SCENARIO=flash_sale locust -f loadtests/locustfile.py --host http://127.0.0.1:8000

Started by hand, the set-up runs at test start with httpx only: there is no HTTP issuance
endpoint yet, so the parts that need codes issued to customers fall back (see
``loadtests/scenarios/plan.py``). The end-of-run invariants are checked either way; a
violation is logged and makes Locust exit with status 1.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

# Locust puts this file's folder on sys.path, not the repository's root.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from loadtests.scenarios.plan import SCENARIOS  # noqa: E402

SCENARIO = os.environ.get("VOUCHER_SCENARIO", "flash_sale")
if SCENARIO not in SCENARIOS:
    raise SystemExit(f"VOUCHER_SCENARIO={SCENARIO!r}: one of {', '.join(SCENARIOS)}")
_module = importlib.import_module(f"loadtests.scenarios.{SCENARIO}")

# Locust collects the User classes it finds in this module's namespace.
globals().update({
    name: obj for name, obj in vars(_module).items()
    if isinstance(obj, type) and obj.__module__ == _module.__name__
})
