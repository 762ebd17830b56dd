"""What the redemption events' ``txid`` column (0016) costs the group commit, measured on
Postgres alone: the group commit's redemption insert (one ``unnest`` statement per batch)
into copies of ``redemptions`` without the column, with it (BRIN, as shipped), and with a
b-tree instead, interleaved batch by batch so drift falls on all three.

    python -m loadtests.mark_cost_txid [--batches 300] [--batch 200]
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

import asyncpg

from ops.servers import embedded_for_tests
from store.migrations import migrate

_INSERT = (
    "INSERT INTO {t} (id, campaign_id, code, bucket, customer_id, order_id, order_amount,"
    " currency, discount_amount, balance_after, status, created_at, rolled_back_at, metadata)"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int2[], $5::text[],"
    " $6::text[], $7::int8[], $8::text[], $9::int8[], $10::int8[], $11::int2[],"
    " $12::timestamptz[], $13::timestamptz[], $14::jsonb[])"
)
VARIANTS = {
    "no txid column": "ALTER TABLE {t} DROP COLUMN txid, DROP COLUMN rb_txid",
    "txid + BRIN (shipped)": "",
    "txid + b-tree": "DROP INDEX IF EXISTS {t}_txid_idx1; CREATE INDEX ON {t} (txid)",
}


async def main(dsn: str, batches: int, batch: int) -> list[tuple[str, float, float]]:
    conn = await asyncpg.connect(dsn)
    tables = {}
    for i, (name, alter) in enumerate(VARIANTS.items()):
        t = f"red_cost_{i}"
        await conn.execute(f"DROP TABLE IF EXISTS {t}")
        await conn.execute(f"CREATE TABLE {t} (LIKE redemptions INCLUDING ALL)")
        if i == 2:  # swap the BRIN for a b-tree
            for (idx,) in await conn.fetch(
                "SELECT indexname FROM pg_indexes WHERE tablename = $1 AND indexdef LIKE '%brin%'", t
            ):
                await conn.execute(f"DROP INDEX {idx}")
            await conn.execute(f"CREATE INDEX ON {t} (txid)")
        elif alter:
            await conn.execute(alter.format(t=t))
        tables[name] = t
    times: dict[str, list[float]] = {n: [] for n in VARIANTS}
    now = datetime.now(UTC)
    for b in range(batches):
        for name, t in tables.items():
            ids = [f"red_{b:05d}{os.urandom(8).hex()}" for _ in range(batch)]
            args = [
                ids, ["cmp"] * batch, [f"CODE{x}" for x in ids], [b % 1024] * batch,
                [f"cus{x}" for x in ids], [f"ord{x}" for x in ids], [4000] * batch,
                ["EUR"] * batch, [500] * batch, [None] * batch, [0] * batch,
                [now] * batch, [None] * batch, [None] * batch,
            ]
            t0 = time.perf_counter()
            await conn.execute(_INSERT.format(t=t), *args)
            times[name].append(time.perf_counter() - t0)
    await conn.close()
    return [
        (n, statistics.median(v) * 1000, sum(v) / (batches * batch) * 1e6) for n, v in times.items()
    ]


def run() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--batch", type=int, default=200)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mark-txid-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    svc = embedded_for_tests(tmp)
    try:
        asyncio.run(migrate(svc.database_url))
        rows = asyncio.run(main(svc.database_url, a.batches, a.batch))
    finally:
        svc.stop()
    print(f"| redemptions table | median ms per batch of {a.batch} | µs per row (mean) |")
    print("| --- | ---: | ---: |")
    for n, med, per in rows:
        print(f"| {n} | {med:.2f} | {per:.1f} |")


if __name__ == "__main__":
    run()
