"""Multi-node fault scenario, on one machine: several raylets, one node removed mid-load.

Run by ``tests/fault/test_multinode.py`` in a subprocess, because it needs a Ray of its
own (``ray.cluster_utils.Cluster``: a head and two worker raylets on this machine) while the
test session already holds one local Ray. Usable by hand too::

    python tests/fault/multinode_scenario.py --dsn postgresql://...

Steps: start the cluster and the engine (shards placed with SPREAD), check the shards sit on
at least two nodes, create a unique-code campaign and a shared code with a global limit
(owned by a shard on the node that will die), run concurrent redemptions with idempotency
keys, remove a worker node that hosts shards while the load runs (callers retry the same
keys while a shard is unavailable), then check: the lost shards were restarted on surviving
nodes and reloaded from Postgres, every acknowledged redemption is in Postgres, no code was
redeemed twice, the shared limit held, replays of every key return the first answers, and
the engine's stats agree with the database.

Prints one JSON summary line on stdout and exits 0; on a failed check it prints
``SCENARIO FAILED: <reason>`` on stderr and exits 1.

Isolation: Ray's temp dir (sessions, sockets and the "current cluster" address file that a
bare ``ray.init()`` would pick up) is private to this run, and so is the database: a fresh
one is created on the given server, migrated, and dropped at the end (when the role may not
create databases, the given one is used; campaigns keep the runs apart).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(_REPO))

import asyncpg  # noqa: E402

from engine import errors  # noqa: E402
from engine.routing import shard_of_bucket  # noqa: E402
from engine.shard_state import Outcome, RedeemRequest, route_bucket  # noqa: E402
from tests.engine_support import fetch  # noqa: E402

# A crashed node is noticed by the GCS health check of its raylet: one every 500 ms, dead
# after 6 misses, so ~3 s (the defaults, 3 s x 5, would keep the lost shards unavailable for
# ~15 s). Not tighter: on a busy 2-core machine a live raylet must not be declared dead.
SYSTEM_CONFIG = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 6,
}
_T0 = time.monotonic()


class ScenarioFailed(Exception):
    pass


def check(cond: bool, message: str) -> None:
    if not cond:
        raise ScenarioFailed(message)


def log(msg: str) -> None:
    print(f"[multinode {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


async def retrying(what: str, fn: Any, deadline: float) -> Any:
    """``await fn()``, again while an actor is unavailable (restarting), up to ``deadline``."""
    while True:
        try:
            return await fn()
        except errors.Unavailable:
            if time.monotonic() > deadline:
                raise ScenarioFailed(f"{what}: still unavailable at the deadline") from None
            await asyncio.sleep(0.1)


# --- an isolated database ------------------------------------------------------------------


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


async def create_database(dsn: str, name: str) -> str | None:
    """A fresh, migrated database next to ``dsn``'s; None if the role may not create one."""
    from store.migrations import migrate

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    except asyncpg.InsufficientPrivilegeError:
        return None
    finally:
        await conn.close()
    own = with_database(dsn, name)
    await migrate(own)
    return own


async def drop_database(dsn: str, name: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# --- load ---------------------------------------------------------------------------------


class Load:
    """Concurrent batches of redemptions; a batch that meets an unavailable shard is sent
    again with the same idempotency keys until ``deadline`` (bounded)."""

    def __init__(self, engine: Any, deadline: float) -> None:
        self.engine = engine
        self.deadline = deadline
        self.retries = 0
        self.batches_done = 0
        self.acked_at: dict[str, float] = {}  # idempotency key -> monotonic time of the ack

    async def redeem(self, reqs: list[RedeemRequest]) -> list[Outcome]:
        while True:
            try:
                outs = await asyncio.wait_for(
                    self.engine.redeem_many(reqs), max(1.0, self.deadline - time.monotonic())
                )
            except errors.Unavailable:
                self.retries += 1
                if time.monotonic() > self.deadline:
                    raise ScenarioFailed("a shard never came back (retries ran out)") from None
                await asyncio.sleep(0.1)
                continue
            except TimeoutError:
                raise ScenarioFailed("a redemption call hung past the deadline") from None
            now = time.monotonic()
            for r in reqs:
                assert r.idempotency_key is not None
                self.acked_at[r.idempotency_key] = now
            return list(outs)

    async def run(
        self, reqs: list[RedeemRequest], batch: int, parallel: int, pace_s: float = 0.0
    ) -> list[Outcome]:
        out: list[Outcome | None] = [None] * len(reqs)
        starts = list(range(0, len(reqs), batch))
        queue: asyncio.Queue[int] = asyncio.Queue()
        for s in starts:
            queue.put_nowait(s)

        async def worker() -> None:
            while not queue.empty():
                start = queue.get_nowait()
                chunk = reqs[start : start + batch]
                out[start : start + len(chunk)] = await self.redeem(chunk)
                self.batches_done += 1
                if pace_s:
                    await asyncio.sleep(pace_s)

        await asyncio.gather(*[worker() for _ in range(parallel)])
        check(all(o is not None for o in out), "a request got no answer")
        return [o for o in out if o is not None]


# --- the scenario -------------------------------------------------------------------------


async def processes_gone(pids: list[int], deadline: float) -> float:
    """When every process in ``pids`` has exited (zombies count as exited)."""
    import psutil

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            raise ScenarioFailed(f"shard processes {pids} of the removed node never exited")
        await asyncio.sleep(0.02)
    return time.monotonic()


def shard_of_code(code: str, n: int) -> int:
    return shard_of_bucket(route_bucket(code), n)


def gcs_actor(name: str, namespace: str) -> dict[str, Any] | None:
    """The GCS's record of a named actor (state, restarts, node), if it can be read."""
    import ray

    try:
        table = ray._private.state.actors()
    except Exception:  # a private API: the checks do not depend on it
        return None
    for rec in table.values():
        if rec.get("Name") == name and rec.get("RayNamespace", namespace) == namespace:
            return dict(rec)
    return None


async def scenario(args: argparse.Namespace, dsn: str, summary: dict[str, Any]) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from actors.client import shard_name, start_engine
    from engine.settings import Settings

    t_start = time.monotonic()
    deadline = t_start + args.timeout
    tag = os.urandom(3).hex()
    namespace = f"multinode-{tag}"

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": False,
            "_system_config": SYSTEM_CONFIG,
        },
    )
    try:
        # Connect before the workers join: the driver sits on the head, never on a victim.
        ray.init(
            address=cluster.address,
            namespace=namespace,
            log_to_driver=False,
            configure_logging=False,
        )
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes(timeout=60)
        head_id = cluster.head_node.node_id
        check(ray.get_runtime_context().get_node_id() == head_id, "the driver is not on the head")
        log(f"cluster up: head + {len(workers)} workers, namespace {namespace}")
        summary["cluster_start_s"] = round(time.monotonic() - t_start, 2)

        settings = Settings(shards=args.shards, namespace=namespace, batch_window_ms=1.0)
        engine = start_engine(settings, dsn)
        before = await engine.shard_info()
        nodes_before = {i["shard_id"]: i["node_id"] for i in before}
        summary["nodes_before"] = {str(k): v[:8] for k, v in nodes_before.items()}
        check(
            len(set(nodes_before.values())) >= 2,
            f"SPREAD left every shard on one node: {nodes_before}",
        )
        # The victim: a worker node with at least one shard (the most, if it can choose).
        by_node = {
            w.node_id: [s for s, n in nodes_before.items() if n == w.node_id] for w in workers
        }
        victim = max(workers, key=lambda w: len(by_node[w.node_id]))
        lost = by_node[victim.node_id]
        check(bool(lost), f"no shard on a worker node: {nodes_before}")
        survivors = {head_id} | {w.node_id for w in workers if w is not victim}
        summary["victim_node"] = victim.node_id[:8]
        summary["lost_shards"] = lost
        coord = gcs_actor("coordinator", namespace)
        coord_node = (coord or {}).get("Address", {}).get("NodeID")
        summary["coordinator_on_victim"] = coord_node == victim.node_id
        log(f"shards on nodes {summary['nodes_before']}; victim {victim.node_id[:8]} has {lost}")

        # A unique-code campaign: every code is tried by two customers, one must win.
        disc = await engine.create_campaign(
            id=f"mn-disc-{tag}",
            name="multinode ten percent",
            type="discount",
            currency="EUR",
            discount={"kind": "percent", "value": 10},
        )
        await engine.generate(disc.id, args.codes, poll_s=0.05)
        await engine.activate(disc.id)
        codes = [
            r["code"]
            for r in await fetch(dsn, "SELECT code FROM vouchers WHERE campaign_id=$1", disc.id)
        ]
        check(len(codes) == args.codes, f"generated {len(codes)} codes, wanted {args.codes}")
        on_victim = sum(1 for c in codes if shard_of_code(c, args.shards) in lost)
        check(on_victim > 0, "no code of the campaign lives on the victim node")

        # A shared code with a global limit, owned by a shard on the node that will die.
        shared = next(
            c
            for c in (f"MN{tag}{k}".upper() for k in range(100_000))
            if shard_of_code(c, args.shards) in lost
        )
        flash = await engine.create_campaign(
            id=f"mn-shared-{tag}",
            name="multinode shared",
            type="shared_code",
            currency="EUR",
            discount={"kind": "percent", "value": 20},
            limits={"total": args.limit, "per_customer": 1},
            shared_code=shared,
        )
        await engine.activate(flash.id)

        unique_reqs = [
            RedeemRequest(
                code=code,
                amount=8000,
                currency="EUR",
                customer_id=f"u-{who}-{i}",
                idempotency_key=f"{disc.id}-{who}-{i}",
            )
            for i, code in enumerate(codes)
            for who in ("a", "b")
        ]
        shared_reqs = [
            RedeemRequest(
                code=shared,
                amount=1000,
                currency="EUR",
                customer_id=f"s-{i % (args.limit * 2)}",
                idempotency_key=f"{flash.id}-{i}",
            )
            for i in range(args.limit * 4)
        ]
        reqs = unique_reqs + shared_reqs
        random.Random(7).shuffle(reqs)
        victim_keys = {
            r.idempotency_key
            for r in reqs
            if r.idempotency_key and shard_of_code(r.code, args.shards) in lost
        }

        load = Load(engine, deadline)
        run = asyncio.ensure_future(
            load.run(reqs, batch=args.batch, parallel=args.parallel, pace_s=args.pace)
        )
        total_batches = -(-len(reqs) // args.batch)
        # Remove the node once about a quarter of the load is acknowledged.
        while load.batches_done < total_batches // 4:
            check(not run.done(), "the load ended before the node was removed")
            check(time.monotonic() < deadline, "the load is too slow to reach the kill point")
            await asyncio.sleep(0.01)
        check(not run.done(), "the load ended before the node was removed")
        t_kill, wall_kill = time.monotonic(), datetime.now(UTC)
        done_at_kill = load.batches_done
        log(f"removing node {victim.node_id[:8]} after {done_at_kill}/{total_batches} batches")
        # Blocking (it waits for the processes to exit): off the event loop, the load goes on.
        await asyncio.to_thread(cluster.remove_node, victim, allow_graceful=args.graceful)
        summary["remove_node_s"] = round(time.monotonic() - t_kill, 2)
        check(not run.done(), "the load ended while the node was being removed")
        old_pids = [i["pid"] for i in before if i["shard_id"] in lost]
        gone = asyncio.ensure_future(processes_gone(old_pids, deadline))
        outcomes = await run
        gone_s = (await gone) - t_kill
        summary["old_processes_gone_after_s"] = round(gone_s, 2)
        summary["load_after_kill_s"] = round(time.monotonic() - t_kill, 2)
        summary["batches_done_at_kill"] = done_at_kill
        summary["batches"] = total_batches
        summary["retries"] = load.retries
        late = sum(1 for k in victim_keys if load.acked_at.get(k, 0.0) > t_kill)
        summary["victim_requests_acked_after_kill"] = late
        check(late > 0, "no request to a lost shard was answered after the node went away")
        log(f"load done: {len(reqs)} requests, {load.retries} retried batches")

        # The lost shards run again, on surviving nodes, reloaded from Postgres.
        await engine.wait_ready(timeout_s=max(5.0, deadline - time.monotonic()))
        after = await engine.shard_info()
        nodes_after = {i["shard_id"]: i["node_id"] for i in after}
        summary["nodes_after"] = {str(k): v[:8] for k, v in nodes_after.items()}
        check(
            set(nodes_after.values()) <= survivors,
            f"a shard still claims the removed node: {nodes_after}",
        )
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        check(victim.node_id not in alive, "Ray still counts the removed node as alive")
        by_id = {i["shard_id"]: i for i in after}
        before_by_id = {i["shard_id"]: i for i in before}
        recovered = {}
        for s in lost:
            loaded = datetime.fromisoformat(by_id[s]["loaded_at"])
            check(
                by_id[s]["pid"] != before_by_id[s]["pid"] and loaded > wall_kill,
                f"shard {s} was not restarted after the node went (same process or load time)",
            )
            recovered[str(s)] = round((loaded - wall_kill).total_seconds(), 2)
        summary["reloaded_after_kill_s"] = recovered
        # No two live incarnations of a shard: the old processes (on the lost node) were gone
        # before the new ones loaded, so nothing the old ones did can follow the reload.
        check(
            gone_s < min(recovered.values()),
            f"old shard processes lived {gone_s:.2f} s after the kill, past the reload {recovered}",
        )
        restarts = {}
        for s in range(args.shards):
            rec = gcs_actor(shard_name(s), namespace)
            if rec is not None and "NumRestarts" in rec:
                restarts[str(s)] = int(rec["NumRestarts"])
        if restarts:
            summary["num_restarts"] = restarts
            for s in lost:
                check(restarts[str(s)] >= 1, f"Ray reports no restart of shard {s}")

        # Every acknowledged redemption is in Postgres, none doubled, the limit held.
        acked = {r.idempotency_key: o for r, o in zip(reqs, outcomes, strict=True)}
        wins = [o.redemption for o in outcomes if o.redemption is not None]
        disc_wins = [w for w in wins if w.campaign_id == disc.id]
        shared_wins = [w for w in wins if w.campaign_id == flash.id]
        check(
            len(disc_wins) == args.codes and len({w.code for w in disc_wins}) == args.codes,
            f"unique codes: {len(disc_wins)} wins over {len({w.code for w in disc_wins})} codes, want {args.codes}",
        )
        check(
            len(shared_wins) == args.limit,
            f"shared code: {len(shared_wins)} wins, limit {args.limit}",
        )
        check(
            len({w.customer_id for w in shared_wins}) == args.limit,
            "shared code: a customer won twice (per_customer is 1)",
        )
        rejections = {o.rejection.error for o in outcomes if o.rejection is not None}
        summary["rejections"] = sorted(rejections)
        check(
            rejections <= {"already_redeemed", "exhausted", "customer_limit_reached"},
            f"unexpected rejections: {sorted(rejections)}",
        )
        rows = await fetch(
            dsn,
            "SELECT id, code, campaign_id FROM redemptions WHERE campaign_id = ANY($1::text[]) AND status = 0",
            [disc.id, flash.id],
        )
        check(
            {r["id"] for r in rows} == {w.id for w in wins},
            f"acknowledged != persisted: {len(wins)} acked, {len(rows)} rows",
        )
        disc_rows = [r for r in rows if r["campaign_id"] == disc.id]
        check(len({r["code"] for r in disc_rows}) == len(disc_rows), "a code was redeemed twice")
        redeemed = await fetch(
            dsn, "SELECT count(*) AS n FROM vouchers WHERE campaign_id=$1 AND status=2", disc.id
        )
        check(redeemed[0]["n"] == args.codes, f"vouchers redeemed in Postgres: {redeemed[0]['n']}")

        # Replays of every key (the in-flight ones included) return the first answers.
        replay = await Load(engine, deadline).run(reqs, batch=200, parallel=4)
        diff = sum(1 for r, o in zip(reqs, replay, strict=True) if o != acked[r.idempotency_key])
        check(diff == 0, f"{diff} replays answered differently from the first answer")

        # The engine's counters (rebuilt from Postgres on the restarted shards) agree with
        # the acknowledged answers and with the rows.
        for cid, n_codes, camp_wins in (
            (disc.id, args.codes, disc_wins),
            (flash.id, 0, shared_wins),
        ):
            st = await retrying("stats", lambda cid=cid: engine.stats(cid), deadline)
            pg = await fetch(
                dsn,
                "SELECT count(*) AS n, coalesce(sum(discount_amount), 0) AS d"
                " FROM redemptions WHERE campaign_id=$1 AND status=0",
                cid,
            )
            want = (
                n_codes,
                0,
                len(camp_wins),
                len(camp_wins),
                sum(w.discount_amount for w in camp_wins),
            )
            got = (
                st.redeemed,
                st.available,
                st.redemptions,
                st.active_redemptions,
                st.discount_total,
            )
            check(
                got == want and (pg[0]["n"], pg[0]["d"]) == (want[2], want[4]),
                f"stats of {cid}: (redeemed, available, redemptions, active, discount) = {got},"
                f" acknowledged {want}, postgres {tuple(pg[0])}",
            )
        summary.update(
            requests=len(reqs),
            victim_requests=len(victim_keys),
            unique_codes=args.codes,
            shared_limit=args.limit,
            redemptions=len(wins),
            replays_checked=len(reqs),
            total_s=round(time.monotonic() - t_start, 2),
        )
    finally:
        ray.shutdown()
        cluster.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dsn", required=True, help="Postgres DSN (a server the scenario may use)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--codes", type=int, default=3000, help="unique codes (each tried twice)")
    p.add_argument("--limit", type=int, default=300, help="global limit of the shared code")
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--pace", type=float, default=0.01, help="pause of a caller between batches")
    p.add_argument("--timeout", type=float, default=150.0, help="deadline of the whole run (s)")
    p.add_argument(
        "--graceful",
        action="store_true",
        help="stop the node's processes with SIGTERM first (default: SIGKILL, like a crash)",
    )
    args = p.parse_args(argv)

    # A private Ray temp dir (short: it holds unix sockets) keeps this cluster's address
    # file away from any other Ray on the machine, and theirs away from it.
    own_tmp = "RAY_TMPDIR" not in os.environ
    if own_tmp:
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="vmn-", dir="/tmp")
    tmp = os.environ["RAY_TMPDIR"]
    dbname = f"multinode_{os.urandom(4).hex()}"
    summary: dict[str, Any] = {"ok": False}
    code = 1
    try:
        own = asyncio.run(create_database(args.dsn, dbname))
        summary["database"] = "own" if own else "shared"
        asyncio.run(scenario(args, own or args.dsn, summary))
        summary["ok"] = True
        code = 0
    except ScenarioFailed as exc:
        print(f"SCENARIO FAILED: {exc}", file=sys.stderr, flush=True)
        summary["error"] = str(exc)
    finally:
        try:
            asyncio.run(drop_database(args.dsn, dbname))
        except Exception as exc:  # leave the database; the run's verdict stands
            print(f"could not drop database {dbname}: {exc!r}", file=sys.stderr)
        if own_tmp:  # Ray's exiting processes may still write there for a moment
            for _ in range(50):
                shutil.rmtree(tmp, ignore_errors=True)
                if not os.path.exists(tmp):
                    break
                time.sleep(0.1)
        print(json.dumps(summary, sort_keys=True), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
