"""What the command line prints: answers as JSON on stdout, progress bars of long jobs
(generation, issuance) on stderr."""

from __future__ import annotations

import json
import sys
from typing import Any

import msgspec


def print_json(obj: Any) -> None:
    print(json.dumps(msgspec.to_builtins(obj), indent=2, default=str))


def generation_bar(job: dict[str, Any]) -> None:
    done, total = job["generated"], job["requested"]
    width = 40
    filled = int(width * done / max(1, total))
    rate = job.get("rate") or 0.0
    eta = (total - done) / rate if rate else 0.0
    sys.stderr.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,}"
        f"  {rate:,.0f} codes/s  eta {eta:4.1f}s "
    )
    sys.stderr.flush()


def issuance_bar(job: dict[str, Any]) -> None:
    c = job["counts"]
    done, total = c["selected"], c["total"]
    width = 40
    filled = int(width * done / max(1, total))
    rate = job.get("rate") or 0.0
    eta = job.get("eta_s") or 0.0
    sys.stderr.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,} customers"
        f"  assigned {c['assigned']:,}  queued {c['enqueued']:,}"
        f"  skipped {c['skipped_no_consent'] + c['skipped_no_address']:,}"
        f"  {rate:,.0f}/s  eta {eta:4.1f}s "
    )
    sys.stderr.flush()

