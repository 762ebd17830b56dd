"""A shard holding a big campaign: how long its load, an end and the end's void take.

    python -m loadtests.bench_bigshard --codes 10000000 --redemptions 1000000

One shard (``shards=1``, so it owns every bucket) on a Postgres of its own in ``--dir``:
the campaign's codes are written with COPY (``--redemptions`` of them redeemed, with their
redemption rows), then the benchmark measures, from the shard's side:

* the load: a shard start reading every row (cursors, no statement over a whole table),
  its time and the process's resident memory per code;
* one redemption answered right after;
* the end: the campaign change confirmed by the shard (O(1) in memory), then the
  background void of every unredeemed row in chunks, and the decisions answered while it
  runs (a redemption of another campaign, timed);
* a load again after the end (the void found finished).

Prints one table and, with ``--json``, writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import psutil

from actors.shard import ShardCore
from engine.campaigns import Discount, new_campaign, transition
from engine.routing import BUCKETS, new_id
from engine.settings import Settings
from engine.shard_state import Outcome, RedeemRequest
from loadtests.bench_plumbing import fetch_count
from ops.servers import embedded_for_tests
from store.campaigns import insert_campaign, update_campaign
from store.migrations import migrate

_outs = msgspec.msgpack.Decoder(list[Outcome])
_CHUNK = 500_000


def _bucket(code: str) -> int:
    return zlib.crc32(code.encode()) % BUCKETS


async def _fill(dsn: str, cid: str, codes: int, redeemed: int) -> float:
    t0 = time.perf_counter()
    now = datetime.now(UTC)
    conn = await asyncpg.connect(dsn)
    try:
        for start in range(0, codes, _CHUNK):
            rows = []
            reds = []
            for i in range(start, min(codes, start + _CHUNK)):
                code = f"BIG{i:010d}"
                b = _bucket(code)
                if i < redeemed:
                    rows.append((code, cid, b, 2, 1))
                    reds.append(
                        (new_id("red", b, os.urandom), cid, code, b, 10_000, "EUR", 1_000, 0, now)
                    )
                else:
                    rows.append((code, cid, b, 0, 0))
            await conn.copy_records_to_table(
                "vouchers", records=rows, columns=["code", "campaign_id", "bucket", "status", "uses"]
            )
            if reds:
                await conn.copy_records_to_table(
                    "redemptions",
                    records=reds,
                    columns=[
                        "id", "campaign_id", "code", "bucket", "order_amount", "currency",
                        "discount_amount", "status", "created_at",
                    ],
                )
            print(f"  stored {min(codes, start + _CHUNK):,} codes", flush=True)
        await conn.execute("ANALYZE vouchers; ANALYZE redemptions")
    finally:
        await conn.close()
    return time.perf_counter() - t0


async def _redeem(core: ShardCore, code: str) -> tuple[Outcome, float]:
    t0 = time.perf_counter()
    req = RedeemRequest(code=code, amount=10_000, currency="EUR")
    out = _outs.decode(await core.redeem_many(msgspec.msgpack.encode([req])))[0]
    return out, time.perf_counter() - t0


async def _stop(core: ShardCore) -> None:
    if core._housekeeping is not None:
        core._housekeeping.cancel()
    if core.store is not None:
        await core.store.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    svc = await asyncio.to_thread(embedded_for_tests, root)
    figures: dict[str, Any] = {"codes": args.codes, "redemptions": args.redemptions}
    try:
        dsn = svc.database_url
        await migrate(dsn)
        now = datetime.now(UTC)
        fields = {"name": "big", "type": "discount", "currency": "EUR", "discount": Discount("amount", 1000)}
        big = transition(new_campaign(now=now, id="big", **fields), "activate", now)
        other = transition(new_campaign(now=now, id="other", **fields), "activate", now)
        conn = await asyncpg.connect(dsn)
        try:
            for c in (big, other):
                await insert_campaign(conn, c, fence=None)
        finally:
            await conn.close()
        print(f"storing {args.codes:,} codes, {args.redemptions:,} redeemed ...", flush=True)
        figures["store_s"] = await _fill(dsn, big.id, args.codes, args.redemptions)
        settings = Settings(namespace="bench-bigshard", shards=1, batch_window_ms=1.0)

        rss0 = psutil.Process().memory_info().rss
        core = ShardCore(0, 1, dsn, settings)
        core.exit_process = lambda code: None
        t0 = time.perf_counter()
        await core.ready()
        figures["load_s"] = time.perf_counter() - t0
        figures["rss_per_code_b"] = (psutil.Process().memory_info().rss - rss0) / args.codes
        spare = [f"SPARE{i:06d}" for i in range(200)]
        assert await core.add_codes(other.id, spare) == len(spare)
        out, took = await _redeem(core, f"BIG{args.codes - 1:010d}")
        assert out.redemption is not None, out
        figures["first_redemption_ms"] = took * 1000

        ended = transition(big, "end", datetime.now(UTC))
        ended = msgspec.structs.replace(ended, version=big.version + 1)
        conn = await asyncpg.connect(dsn)
        try:
            await update_campaign(conn, ended, was=big.version, fence=None)
        finally:
            await conn.close()
        t0 = time.perf_counter()
        await core.put_campaign(msgspec.msgpack.encode(ended))
        figures["end_confirmed_ms"] = (time.perf_counter() - t0) * 1000
        # checkout goes on while the void runs
        worst = 0.0
        for code in spare:
            out, took = await _redeem(core, code)
            assert out.redemption is not None, out
            worst = max(worst, took)
            await asyncio.sleep(0.005)
        figures["redemption_during_void_max_ms"] = worst * 1000
        await core.voids_done()
        figures["void_s"] = time.perf_counter() - t0
        left = await fetch_count(dsn, "SELECT count(*) FROM vouchers WHERE campaign_id = 'big' AND status IN (0, 1)")
        figures["unvoided_rows_left"] = left
        await _stop(core)

        again = ShardCore(0, 1, dsn, settings)
        again.exit_process = lambda code: None
        t0 = time.perf_counter()
        await again.ready()
        await again.voids_done()
        figures["reload_after_end_s"] = time.perf_counter() - t0
        await _stop(again)
    finally:
        await asyncio.to_thread(svc.stop)
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--codes", type=int, default=10_000_000)
    p.add_argument("--redemptions", type=int, default=1_000_000)
    p.add_argument("--dir", default=".data/bench-bigshard")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    figures = asyncio.run(run(args))
    for k, v in figures.items():
        print(f"{k:32} {v:,.1f}" if isinstance(v, float) else f"{k:32} {v:,}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
