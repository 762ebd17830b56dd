"""What a page of ``GET /v1/events`` costs in Postgres, near the stream's end and far behind.

    python -m loadtests.events_page_cost [--rows 1000000] [--batch 500] [--limit 100] [--rounds 5]

Starts an embedded Postgres, migrates it, and writes ``--rows`` redemptions in
transactions of ``--batch`` (as group commits write them: one transaction id per batch),
so the event stream holds that many ``redemption.succeeded`` events. It then times pages of
``--limit`` events, alternating within each round:

* **near the end** (the baseline): a cursor ``--limit`` events before the stream's end;
* **from the start, one read** (``store.webhooks.read_events`` without a window): how a page
  was read before, one statement over everything after the cursor;
* **from the start, slice by slice** (``store.webhooks.read_page``, what the route does):
  ``VOUCHER_WEBHOOK_SCAN_TXIDS`` transaction ids at a time, at most a second;
* **since a minute ago, no cursor**, both ways: no event is that recent, so the one read
  scans the table to answer an empty page; the sliced read answers within its budget with a
  cursor to follow.

Each is reported in ms per page and ÷ the near-end page of the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from engine.settings import Settings
from engine.webhooks import Position
from loadtests.harness import machine_summary
from store import webhooks as store

BUDGET_S = 1.0


async def _fill(dsn: str, rows: int, batch: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        old = datetime.now(UTC) - timedelta(days=1)
        for start in range(0, rows, batch):
            n = min(batch, rows - start)
            await conn.execute(
                "INSERT INTO redemptions (id, campaign_id, code, bucket, customer_id, order_id,"
                " order_amount, currency, discount_amount, status, created_at)"
                " SELECT 'red_fill' || i, 'cmp_fill', 'FILL' || (i % 1000), (i % 1024)::int2,"
                " 'cus-' || i, 'ord-' || i, 4000, 'EUR', 500, 0, $3"
                " FROM generate_series($1::int8, $2::int8) i",
                start,
                start + n - 1,
                old,
            )
        await conn.execute("VACUUM ANALYZE redemptions")
    finally:
        await conn.close()


async def _rounds(dsn: str, limit: int, window: int, rounds: int) -> list[dict[str, float]]:
    db = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert db is not None
    try:
        xmin = await store.snapshot_xmin(db)
        tail = await db.fetchval(
            "SELECT txid FROM redemptions ORDER BY txid DESC OFFSET $1 LIMIT 1", limit
        )
        near = Position(int(tail) - 1)
        start = Position(0)
        since = datetime.now(UTC) - timedelta(minutes=1)
        cases: dict[str, Callable[[], Awaitable[store.Page]]] = {
            "near": lambda: store.read_page(db, near, limit=limit, window=window, budget_s=BUDGET_S),
            "start, one read": lambda: store.read_events(db, start, limit=limit),
            "start, sliced": lambda: store.read_page(db, start, limit=limit, window=window, budget_s=BUDGET_S),
            "since, one read": lambda: store.read_events(db, start, since=since, limit=limit),
            "since, sliced": lambda: store.read_page(
                db, start, since=since, limit=limit, window=window, budget_s=BUDGET_S
            ),
        }
        out = []
        for rnd in range(rounds):
            ms: dict[str, float] = {}
            names = list(cases) if rnd % 2 == 0 else list(reversed(cases))
            for name in names:
                t0 = time.perf_counter()
                page = await cases[name]()
                ms[name] = (time.perf_counter() - t0) * 1000
                assert page.next.txid <= xmin + 10_000
            out.append(ms)
        return out
    finally:
        await db.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="redemption events in the stream")
    ap.add_argument("--batch", type=int, default=500, help="redemptions per transaction")
    ap.add_argument("--limit", type=int, default=100, help="events per page")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    from ops.servers import embedded_for_tests
    from store.migrations import migrate

    window = Settings().webhook_scan_txids
    tmp = Path(tempfile.mkdtemp(prefix="events-page-cost-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    svc = embedded_for_tests(tmp)
    try:
        dsn = svc.database_url
        asyncio.run(migrate(dsn))
        t0 = time.monotonic()
        asyncio.run(_fill(dsn, args.rows, args.batch))
        print(f"machine: {machine_summary()}; {args.rows:,} redemption events in transactions of"
              f" {args.batch} (written in {time.monotonic() - t0:.0f} s); pages of {args.limit},"
              f" slices of {window:,} transaction ids", flush=True)
        rounds = asyncio.run(_rounds(dsn, args.limit, window, args.rounds))
        for i, ms in enumerate(rounds, 1):
            print(f"round {i}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()), flush=True)
        print("\n| page | ms (median) | ÷ near the end |\n| --- | ---: | ---: |")
        for name in rounds[0]:
            med = statistics.median(r[name] for r in rounds)
            ratio = statistics.median(r[name] / r["near"] for r in rounds)
            print(f"| {name} | {med:.1f} | {ratio:.1f}× |")
        return 0
    finally:
        svc.stop()


if __name__ == "__main__":
    raise SystemExit(main())
