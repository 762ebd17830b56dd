"""What the redemption history's indexes cost the group commit, per commit, in Postgres.

    python -m loadtests.history_index_cost [--rows 200000] [--commits 300] [--batch 100] [--rounds 4]

Starts an embedded Postgres, migrates it, and makes two copies of ``redemptions`` with its
columns and indexes (``LIKE ... INCLUDING ALL``; neither has the reports' triggers), each
filled with the same ``--rows`` rows; one then loses the two indexes migration 0015 adds
for the history (by customer, by order). Per round it commits ``--commits`` transactions of
``--batch`` redemptions to each, alternating commit by commit (so load from elsewhere on the
machine falls on both alike), with the shards' own statement
(``store.shards._INSERT_REDEMPTIONS``: unique ids, customers and orders, as a flash sale
writes them), and reports the mean milliseconds per commit and the ratio. Without the
triggers the base is cheaper than the real commit, so the ratio overstates the cost. The
HTTP benchmark's A/B (``bench_http --history-index-ab``) measures it end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from loadtests.harness import machine_summary

TABLES = {True: "bench_with", False: "bench_without"}


def _statement(table: str) -> str:
    from store.shards import _INSERT_REDEMPTIONS

    sql = _INSERT_REDEMPTIONS.format(*(f"${i}" for i in range(1, 15)))
    return sql.replace("INSERT INTO redemptions", f"INSERT INTO {table}", 1)


def _batch(tag: str, n: int) -> list[list[Any]]:
    now = datetime.now(UTC)
    ids = [f"red_{tag}{i:08d}{os.urandom(4).hex()}" for i in range(n)]
    return [
        ids, ["cmp_bench"] * n, ["FLASH"] * n, [7] * n,
        [f"cus-{tag}-{i}-{os.urandom(3).hex()}" for i in range(n)],
        [f"ord-{tag}-{i}-{os.urandom(3).hex()}" for i in range(n)],
        [4000] * n, ["EUR"] * n, [500] * n, [None] * n, [0] * n, [now] * n, [None] * n, [None] * n,
    ]


async def _fill(dsn: str, rows: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for table in TABLES.values():
            await conn.execute(f"CREATE TABLE {table} (LIKE redemptions INCLUDING ALL)")
        await conn.execute(
            "INSERT INTO bench_with (id, campaign_id, code, bucket, customer_id, order_id,"
            " order_amount, currency, discount_amount, status, created_at)"
            " SELECT 'red_fill' || i, 'cmp_fill', 'FILL' || (i % 1000), (i % 1024)::int2,"
            " 'cus-' || md5(i::text), 'ord-' || md5((i * 7)::text), 4000, 'EUR', 500, 0, now()"
            " FROM generate_series(1, $1) i",
            rows,
        )
        await conn.execute("INSERT INTO bench_without SELECT * FROM bench_with")
        # the copy's names of the two history indexes: every index on customer_id or order_id
        for name in await conn.fetch(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'bench_without'"
            " AND (indexdef LIKE '%(customer_id)%' OR indexdef LIKE '%(order_id)%')"
        ):
            await conn.execute(f'DROP INDEX "{name[0]}"')
        await conn.execute("VACUUM ANALYZE bench_with")
        await conn.execute("VACUUM ANALYZE bench_without")
    finally:
        await conn.close()


async def _commits(dsn: str, tag: str, commits: int, batch: int) -> dict[bool, float]:
    """Mean ms per commit of ``commits`` transactions of ``batch`` redemptions into each
    table, alternating."""
    conn = await asyncpg.connect(dsn)
    try:
        stmts = {on: await conn.prepare(_statement(t)) for on, t in TABLES.items()}
        spent = {True: 0.0, False: 0.0}
        for c in range(commits):
            for on in ((True, False) if c % 2 == 0 else (False, True)):
                args = _batch(f"{tag}{c}{'y' if on else 'n'}", batch)
                t0 = time.perf_counter()
                async with conn.transaction():
                    await stmts[on].fetch(*args)
                spent[on] += time.perf_counter() - t0
        return {on: s * 1000 / commits for on, s in spent.items()}
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000, help="redemptions in the table before")
    ap.add_argument("--commits", type=int, default=300)
    ap.add_argument("--batch", type=int, default=100, help="redemptions per commit")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args(argv)

    from ops.servers import embedded_for_tests
    from store.migrations import migrate

    tmp = Path(tempfile.mkdtemp(prefix="history-index-cost-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    svc = embedded_for_tests(tmp)
    try:
        dsn = svc.database_url
        asyncio.run(migrate(dsn))
        asyncio.run(_fill(dsn, args.rows))
        print(f"machine: {machine_summary()}; {args.rows:,} redemptions before; {args.commits} commits"
              f" of {args.batch} per target and round", flush=True)
        ratios = []
        for rnd in range(args.rounds):
            ms = asyncio.run(_commits(dsn, f"r{rnd}", args.commits, args.batch))
            ratios.append(ms[True] / ms[False])
            print(f"round {rnd + 1}: with the indexes {ms[True]:.2f} ms per commit, without"
                  f" {ms[False]:.2f} ms, with ÷ without {ratios[-1]:.3f}", flush=True)
        print(f"median with ÷ without: {statistics.median(ratios):.3f}"
              f" (geometric mean {statistics.geometric_mean(ratios):.3f})")
        return 0
    finally:
        svc.stop()


if __name__ == "__main__":
    raise SystemExit(main())
