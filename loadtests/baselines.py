"""Naive baselines the engine is measured against, side by side, in the same run.

* ``naive_pg_hot_row`` — a shared code with a global limit, the obvious way: one Postgres
  transaction per redemption that locks the campaign row (``SELECT … FOR UPDATE``),
  decrements it and inserts the redemption. Every redemption queues on one row lock and
  waits for its own commit flush.
* ``naive_pg_distinct_rows`` — unique codes, the obvious way: the same transaction shape
  but each redemption locks a different code row, so only the commit flushes are shared.
* ``redis_lua_decrement`` — a Lua check-and-decrement in Redis/Valkey: fast and *not
  durable* (no fsync per redemption), the ceiling a durable design is compared with.

The Postgres baselines keep the server's ``synchronous_commit`` (never turned off here): the
engine acknowledges a durable redemption only after its group commit, so the baseline must
pay for its commits too. Each baseline builds its own tables or keys and removes them.

A Python client on two cores can be the bottleneck itself, so every baseline takes
``processes``: the clients are split across that many OS processes (spawned, each with its own
event loop) that start measuring at one barrier. Each operation stays one independent
request — no pipelining, no batching.

``python -m loadtests.baselines`` starts the engine's embedded Postgres and Valkey
(``ops.servers``, so the server settings match the engine's) in a throwaway directory,
or uses ``--dsn`` / ``--redis-url``, runs the three baselines and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing as mp
import multiprocessing.queues as mp_queues
import multiprocessing.synchronize as mp_sync
import queue
import shutil
import sys
import tempfile
import traceback
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import AsyncExitStack
from typing import Any, TypeVar

import asyncpg
import msgspec
import redis.asyncio as aioredis

from loadtests.harness import (
    BenchResult,
    Exhausted,
    OpFn,
    RunStats,
    format_table,
    machine_summary,
    record,
    run_clients,
)

__all__ = [
    "BenchResult",
    "naive_pg_distinct_rows",
    "naive_pg_hot_row",
    "redis_lua_decrement",
]

SCHEMA = "bench_naive"
CAMPAIGN_ID = 1
# Far more than any run can redeem: the hot-row baseline must never sell out mid-run.
HOT_ROW_STOCK = 10**12
AMOUNT_CENTS = 1999
DEFAULT_WARMUP_S = 0.5
# Distinct-code runs pre-insert this many codes per second of run time (and at least
# MIN_CODES) so no client runs dry; the naive figure here is ~10k/s.
CODES_PER_SECOND_OF_RUN = 60_000
MIN_CODES = 400_000

T = TypeVar("T")


class BaselineRejected(Exception):
    """A redemption the baseline refused (sold out, already redeemed): counted as an error,
    since the baselines are sized so that it never happens."""


# --------------------------------------------------------------------------------------
# Scenario specs: small, picklable descriptions a client process can rebuild clients from.


class HotRowSpec(msgspec.Struct, frozen=True):
    dsn: str


class DistinctRowsSpec(msgspec.Struct, frozen=True):
    dsn: str
    codes_per_client: int


class LuaSpec(msgspec.Struct, frozen=True):
    redis_url: str
    remaining_key: str
    customers_key: str
    sha: str


Spec = HotRowSpec | DistinctRowsSpec | LuaSpec


_HOT_SELECT = f"SELECT remaining FROM {SCHEMA}.campaigns WHERE id = $1 FOR UPDATE"
_HOT_UPDATE = f"UPDATE {SCHEMA}.campaigns SET remaining = remaining - 1 WHERE id = $1"
_INSERT_REDEMPTION = (
    f"INSERT INTO {SCHEMA}.redemptions (id, campaign_id, code, customer_id, order_id, "
    "amount_cents, created_at) VALUES (gen_random_uuid(), $1, $2, $3, $4, $5, now())"
)
_CODE_SELECT = f"SELECT status FROM {SCHEMA}.codes WHERE code = $1 FOR UPDATE"
_CODE_UPDATE = f"UPDATE {SCHEMA}.codes SET status = 'redeemed', redeemed_at = now() WHERE code = $1"

# Check stock, refuse a second redemption by the same customer, decrement: one round trip.
LUA_CHECK_AND_DECREMENT = """
local remaining = tonumber(redis.call('GET', KEYS[1]) or '0')
if remaining <= 0 then return -1 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return -2 end
return redis.call('DECR', KEYS[1])
"""


def _code(i: int) -> str:
    return f"C{i:010d}"


async def _open_client(spec: Spec, index: int, stack: AsyncExitStack) -> OpFn:
    """One closed-loop client: its own connection and its own operation."""
    if isinstance(spec, LuaSpec):
        client = aioredis.Redis.from_url(spec.redis_url, single_connection_client=True)
        stack.push_async_callback(client.aclose)
        await client.ping()
        keys = (spec.remaining_key, spec.customers_key)
        counter = 0

        async def lua_op() -> None:
            nonlocal counter
            counter += 1
            answer = await client.evalsha(spec.sha, 2, *keys, f"c{index}-{counter}")
            if int(answer) < 0:
                raise BaselineRejected(f"lua answered {answer}")

        return lua_op

    conn: asyncpg.Connection = await asyncpg.connect(spec.dsn)
    stack.push_async_callback(conn.close)
    counter = 0

    if isinstance(spec, HotRowSpec):

        async def hot_row_op() -> None:
            nonlocal counter
            counter += 1
            async with conn.transaction():
                remaining = await conn.fetchval(_HOT_SELECT, CAMPAIGN_ID)
                if remaining is None or remaining <= 0:
                    raise BaselineRejected("sold out")
                await conn.execute(_HOT_UPDATE, CAMPAIGN_ID)
                await conn.execute(
                    _INSERT_REDEMPTION,
                    CAMPAIGN_ID,
                    None,
                    f"c{index}-{counter}",
                    f"o{index}-{counter}",
                    AMOUNT_CENTS,
                )

        return hot_row_op

    first = index * spec.codes_per_client
    end = first + spec.codes_per_client
    next_code = first

    async def distinct_op() -> None:
        nonlocal next_code
        if next_code >= end:
            raise Exhausted(f"client {index} used its {spec.codes_per_client} codes")
        code = _code(next_code)
        next_code += 1
        async with conn.transaction():
            status = await conn.fetchval(_CODE_SELECT, code)
            if status != "available":
                raise BaselineRejected(f"code {code} is {status}")
            await conn.execute(_CODE_UPDATE, code)
            await conn.execute(
                _INSERT_REDEMPTION,
                CAMPAIGN_ID,
                code,
                f"c{index}-{next_code}",
                f"o{index}-{next_code}",
                AMOUNT_CENTS,
            )

    return distinct_op


async def _drive(
    spec: Spec,
    indices: Sequence[int],
    duration_s: float,
    warmup_s: float,
    barrier: mp_sync.Barrier | None,
) -> RunStats:
    async with AsyncExitStack() as stack:
        ops = [await _open_client(spec, i, stack) for i in indices]
        if barrier is not None:
            # Blocking the loop is fine: nothing runs on it until the barrier opens.
            barrier.wait(timeout=120)
        return await run_clients(ops, duration_s, warmup_s=warmup_s)


def _run_async(coro: Coroutine[Any, Any, T], use_uvloop: bool) -> T:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)


def _child_main(
    spec: Spec,
    indices: list[int],
    duration_s: float,
    warmup_s: float,
    barrier: mp_sync.Barrier,
    results: mp_queues.Queue[tuple[str, bytes | str]],
    use_uvloop: bool,
) -> None:
    try:
        stats = _run_async(_drive(spec, indices, duration_s, warmup_s, barrier), use_uvloop)
    except BaseException:
        barrier.abort()  # release the siblings instead of leaving them at the barrier
        results.put(("error", traceback.format_exc()))
        raise SystemExit(1) from None  # the parent reports the traceback
    results.put(("ok", msgspec.msgpack.encode(stats)))


def _split(clients: int, processes: int) -> list[list[int]]:
    """Contiguous blocks of client indices, one per process, sizes differing by at most one."""
    base, extra = divmod(clients, processes)
    blocks: list[list[int]] = []
    start = 0
    for p in range(processes):
        size = base + (1 if p < extra else 0)
        blocks.append(list(range(start, start + size)))
        start += size
    return [b for b in blocks if b]


async def _execute(
    spec: Spec,
    clients: int,
    duration_s: float,
    warmup_s: float,
    processes: int,
    use_uvloop: bool,
) -> RunStats:
    if processes <= 1:
        return await _drive(spec, range(clients), duration_s, warmup_s, None)
    blocks = _split(clients, processes)
    ctx = mp.get_context("spawn")  # fork would copy this process's running event loop
    barrier = ctx.Barrier(len(blocks))
    results: mp_queues.Queue[tuple[str, bytes | str]] = ctx.Queue()
    procs = [
        ctx.Process(
            target=_child_main,
            args=(spec, block, duration_s, warmup_s, barrier, results, use_uvloop),
            daemon=True,
        )
        for block in blocks
    ]
    for proc in procs:
        proc.start()
    parts: list[RunStats] = []
    failures: list[str] = []
    timeout = 60 + warmup_s + duration_s
    try:
        for _ in procs:
            try:
                status, payload = await asyncio.to_thread(results.get, True, timeout)
            except queue.Empty:
                failures.append("a client process sent no result in time")
                break
            if status == "ok":
                assert isinstance(payload, bytes)
                parts.append(msgspec.msgpack.decode(payload, type=RunStats))
            else:
                failures.append(str(payload))
    finally:
        for proc in procs:
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.terminate()
    if failures:
        raise RuntimeError("client process failed:\n" + "\n".join(failures))
    return RunStats.merge(parts)


# --------------------------------------------------------------------------------------
# Setup and teardown, done once in the calling process.

_REDEMPTIONS_DDL = f"""
CREATE TABLE {SCHEMA}.redemptions (
    id uuid PRIMARY KEY,
    campaign_id bigint NOT NULL,
    code text,
    customer_id text NOT NULL,
    order_id text NOT NULL,
    amount_cents bigint NOT NULL,
    created_at timestamptz NOT NULL
)
"""


async def _reset_schema(conn: asyncpg.Connection) -> None:
    await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    await conn.execute(f"CREATE SCHEMA {SCHEMA}")
    await conn.execute(_REDEMPTIONS_DDL)


async def _drop_schema(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    finally:
        await conn.close()


async def _execute_then_drop(
    dsn: str, spec: Spec, clients: int, duration_s: float, warmup_s: float, processes: int, use_uvloop: bool
) -> RunStats:
    """Run ``spec`` over the benchmark schema, then drop the schema whatever happened."""
    try:
        return await _execute(spec, clients, duration_s, warmup_s, processes, use_uvloop)
    finally:
        await _drop_schema(dsn)


async def naive_pg_hot_row(
    dsn: str,
    clients: int = 32,
    duration_s: float = 5.0,
    *,
    processes: int = 1,
    warmup_s: float = DEFAULT_WARMUP_S,
    use_uvloop: bool = True,
) -> BenchResult:
    """Shared code with a global limit: every redemption locks the one campaign row."""
    conn = await asyncpg.connect(dsn)
    try:
        await _reset_schema(conn)
        await conn.execute(
            f"CREATE TABLE {SCHEMA}.campaigns (id bigint PRIMARY KEY, remaining bigint NOT NULL)"
        )
        await conn.execute(
            f"INSERT INTO {SCHEMA}.campaigns (id, remaining) VALUES ($1, $2)",
            CAMPAIGN_ID,
            HOT_ROW_STOCK,
        )
    finally:
        await conn.close()
    stats = await _execute_then_drop(dsn, HotRowSpec(dsn), clients, duration_s, warmup_s, processes, use_uvloop)
    return stats.to_result("naive pg, hot row", processes=processes)


async def naive_pg_distinct_rows(
    dsn: str,
    clients: int = 32,
    duration_s: float = 5.0,
    *,
    processes: int = 1,
    warmup_s: float = DEFAULT_WARMUP_S,
    codes: int | None = None,
    use_uvloop: bool = True,
) -> BenchResult:
    """Unique codes: each redemption locks its own code row; clients never share a code."""
    total = codes or max(MIN_CODES, math.ceil(CODES_PER_SECOND_OF_RUN * (duration_s + warmup_s)))
    per_client = total // clients
    conn = await asyncpg.connect(dsn)
    try:
        await _reset_schema(conn)
        await conn.execute(
            f"""CREATE TABLE {SCHEMA}.codes (
                code text PRIMARY KEY,
                campaign_id bigint NOT NULL,
                status text NOT NULL,
                redeemed_at timestamptz
            )"""
        )
        await conn.copy_records_to_table(
            "codes",
            schema_name=SCHEMA,
            columns=["code", "campaign_id", "status"],
            records=((_code(i), CAMPAIGN_ID, "available") for i in range(per_client * clients)),
        )
        await conn.execute(f"ANALYZE {SCHEMA}.codes")
    finally:
        await conn.close()
    stats = await _execute_then_drop(
        dsn, DistinctRowsSpec(dsn, per_client), clients, duration_s, warmup_s, processes, use_uvloop
    )
    return stats.to_result("naive pg, distinct rows", processes=processes)


async def redis_lua_decrement(
    redis_url: str,
    clients: int = 32,
    duration_s: float = 5.0,
    *,
    processes: int = 1,
    warmup_s: float = DEFAULT_WARMUP_S,
    use_uvloop: bool = True,
) -> BenchResult:
    """Lua check-and-decrement (stock > 0, customer not seen, decrement); not durable."""
    prefix = f"bench:lua:{uuid.uuid4().hex}"
    remaining_key, customers_key = f"{prefix}:remaining", f"{prefix}:customers"
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await admin.set(remaining_key, HOT_ROW_STOCK)
        sha = str(await admin.script_load(LUA_CHECK_AND_DECREMENT))
        spec = LuaSpec(redis_url, remaining_key, customers_key, sha)
        try:
            stats = await _execute(spec, clients, duration_s, warmup_s, processes, use_uvloop)
        finally:
            await admin.delete(remaining_key, customers_key)
    finally:
        await admin.aclose()
    return stats.to_result("redis lua decrement", processes=processes)


# --------------------------------------------------------------------------------------
# python -m loadtests.baselines


@contextlib.contextmanager
def _embedded_servers(need: bool) -> Iterator[tuple[str, str]]:
    """The engine's own embedded Postgres and Valkey (same server settings as the engine),
    in a throwaway data dir under /tmp, stopped and deleted afterwards."""
    if not need:
        yield "", ""
        return
    from ops.servers import embedded_for_tests

    root = tempfile.mkdtemp(prefix="bench-baselines-", dir="/tmp")
    try:
        with embedded_for_tests(root) as services:
            yield services.database_url, services.redis_url
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def _server_settings(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[]) ORDER BY name",
            ["fsync", "synchronous_commit", "wal_sync_method", "server_version", "shared_buffers"],
        )
    finally:
        await conn.close()
    return ", ".join(f"{r['name']}={r['setting']}" for r in rows)


async def _main_async(args: argparse.Namespace, dsn: str, redis_url: str) -> list[BenchResult]:
    results: list[BenchResult] = []
    if dsn:
        print(f"postgres: {await _server_settings(dsn)}", flush=True)
    for processes in args.processes:
        common: dict[str, Any] = {
            "clients": args.clients,
            "duration_s": args.duration,
            "processes": processes,
            "warmup_s": args.warmup,
            "use_uvloop": not args.no_uvloop,
        }
        for which in args.only:
            if which == "hot":
                result = await naive_pg_hot_row(dsn, **common)
            elif which == "distinct":
                result = await naive_pg_distinct_rows(dsn, **common)
            else:
                result = await redis_lua_decrement(redis_url, **common)
            print(
                f"  {result.name}: {result.ops_per_s:,.0f} ops/s, p50 {result.p50_ms:.2f} ms, "
                f"p99 {result.p99_ms:.2f} ms, {result.errors} errors, "
                f"client cpu {result.client_cpu_s / result.seconds:.0%} of a core "
                f"({processes} procs)",
                flush=True,
            )
            for sample in result.error_samples:
                print(f"    error: {sample}", flush=True)
            results.append(result)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.baselines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument(
        "--warmup",
        type=float,
        default=DEFAULT_WARMUP_S,
        help="unmeasured seconds before the window",
    )
    parser.add_argument(
        "--processes",
        type=int,
        nargs="+",
        default=[1],
        help="client processes; several values run everything once per value",
    )
    parser.add_argument(
        "--only", nargs="+", choices=["hot", "distinct", "lua"], default=["hot", "distinct", "lua"]
    )
    parser.add_argument("--dsn", default="", help="use this Postgres instead of an embedded one")
    parser.add_argument("--redis-url", default="", help="use this Redis instead of Valkey")
    parser.add_argument("--no-uvloop", action="store_true", help="plain asyncio event loop")
    parser.add_argument(
        "--record",
        metavar="TITLE",
        default="",
        help="also write the table into BENCHMARKS.md under this heading",
    )
    args = parser.parse_args(argv)

    need_pg = not args.dsn and any(w in ("hot", "distinct") for w in args.only)
    need_redis = not args.redis_url and "lua" in args.only
    with _embedded_servers(need_pg or need_redis) as (embedded_dsn, embedded_redis):
        dsn = args.dsn or embedded_dsn
        redis_url = args.redis_url or embedded_redis
        print(f"machine: {machine_summary()}", flush=True)
        results = _run_async(_main_async(args, dsn, redis_url), not args.no_uvloop)

    table = format_table(results)
    print()
    print(table)
    if args.record:
        command = "python -m loadtests.baselines " + " ".join(
            sys.argv[1:] if argv is None else list(argv)
        )
        record(args.record, command, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
