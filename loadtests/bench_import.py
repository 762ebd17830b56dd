"""Importing a shop's own codes against generating as many, in the same run.

    python -m loadtests.bench_import --codes 1000000 --rounds 2

Starts embedded Postgres and Valkey, the engine and the HTTP API, then per round:
generates ``--codes`` codes into one campaign (``POST .../generate``, timed until its job
is done: the baseline, the same number of codes entering the same bank) and imports as
many codes of its own into another campaign (``POST .../vouchers/import``, one streamed
CSV body, timed until the answer). Each is checked against Postgres: every code is a row
of its campaign. Reports codes/s of both and the ratio import ÷ generation per round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx

from loadtests.bench_plumbing import fetch_count, http_engine

ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def _campaign(c: httpx.Client, admin: dict[str, str], name: str) -> str:
    r = c.post("/v1/campaigns", headers=admin, json={
        "name": name, "type": "discount", "currency": "EUR",
        "discount": {"kind": "percent", "value": 10},
        "code": {"length": 12},
        "ends_at": (datetime.now(UTC) + timedelta(days=30)).isoformat(),
    })
    r.raise_for_status()
    return str(r.json()["id"])


def _csv(prefix: str, n: int, chunk: int = 50_000) -> Iterator[bytes]:
    """``code`` then ``n`` distinct codes, streamed in pieces (never the whole file)."""
    yield b"code\n"
    rnd = os.urandom
    for start in range(0, n, chunk):
        lines = []
        for i in range(start, min(n, start + chunk)):
            tail = "".join(ALPHABET[b % 32] for b in rnd(6))
            lines.append(f"{prefix}{i:07d}{tail}\n")
        yield "".join(lines).encode()


def _generate(c: httpx.Client, admin: dict[str, str], n: int, round_: int) -> tuple[float, str]:
    cid = _campaign(c, admin, f"bench generate {round_}")
    t0 = time.perf_counter()
    r = c.post(f"/v1/campaigns/{cid}/generate", json={"count": n}, headers=admin)
    r.raise_for_status()
    job = r.json()["id"]
    while True:
        j = c.get(f"/v1/jobs/{job}", headers=admin).json()
        if j["state"] != "running":
            break
        time.sleep(0.05)
    took = time.perf_counter() - t0
    assert j["state"] == "done" and j["generated"] == n, j
    return took, cid


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--shards", type=int, default=2)
    args = ap.parse_args(argv)

    rows = []
    with http_engine("bench-import", args.shards) as e:
        c, admin, dsn = e.client, e.admin, e.dsn
        for i in range(args.rounds):
            gen_s, gen_cid = _generate(c, admin, args.codes, i)
            cid = _campaign(c, admin, f"bench import {i}")
            t0 = time.perf_counter()
            r = c.post(
                f"/v1/campaigns/{cid}/vouchers/import",
                content=_csv(f"R{i}X", args.codes),
                headers={**admin, "Content-Type": "text/csv"},
            )
            imp_s = time.perf_counter() - t0
            r.raise_for_status()
            out = r.json()
            assert out["imported"] == args.codes and out["rejected"] == 0, out
            for campaign in (gen_cid, cid):
                rows_in = asyncio.run(fetch_count(dsn, "SELECT count(*) FROM vouchers WHERE campaign_id = $1", campaign))
                assert rows_in == args.codes, (campaign, rows_in)
            rows.append((gen_s, imp_s))
            print(
                f"round {i + 1}: generate {args.codes:,} in {gen_s:.2f} s ({args.codes / gen_s:,.0f}/s),"
                f" import {imp_s:.2f} s ({args.codes / imp_s:,.0f}/s),"
                f" import ÷ generate {gen_s / imp_s:.2f}x (codes/s)",
                flush=True,
            )
    ratios = [g / i for g, i in rows]
    print(
        f"median: import {statistics.median(i for _, i in rows):.2f} s for {args.codes:,} codes,"
        f" ratio {statistics.median(ratios):.2f}x of generation's rate; every code checked in Postgres"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
