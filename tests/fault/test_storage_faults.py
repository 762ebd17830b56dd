"""A shard facing a database that restarts, loses commits, freezes or refuses a decision,
checked from the outside (answers against the rows in Postgres). Each test runs a shard in
this process on a Postgres of its own (the session's shared one must stay up):

* a server that comes back without commits the shard still holds in memory (a failover to
  an asynchronous standby, emulated by restoring the data directory) is reloaded from;
* a frozen server gets every caller ``unavailable`` within the decision deadline, and the
  retry with the same idempotency key gets the one decision;
* fast ack mode stops answering from memory once the writer is behind its lag bound;
* a decision the database refuses fails alone: the decisions before it are answered, none
  is half-written, and the shard reloads in place and serves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from actors.shard import ShardCore
from engine import errors
from engine.campaigns import Discount
from engine.settings import Settings
from engine.shard_state import Outcome, RedeemRequest
from ops.servers import Services, embedded_for_tests
from store.migrations import migrate
from tests.engine_support import fetch, redeem_on_core, stored_campaign, uid

pytestmark = pytest.mark.fault



def _req(code: str, key: str | None = None, order_id: str | None = None) -> RedeemRequest:
    return RedeemRequest(
        code=code, amount=1000, currency="EUR", idempotency_key=key, order_id=order_id
    )


async def _redeem(core: ShardCore, req: RedeemRequest) -> Outcome:
    return (await redeem_on_core(core, req))[0]


async def _until(core: ShardCore, req: RedeemRequest, within: float = 20) -> Outcome:
    deadline = time.monotonic() + within
    while True:
        try:
            return await _redeem(core, req)
        except errors.Unavailable:
            assert time.monotonic() < deadline, "the shard did not serve again by itself"
            await asyncio.sleep(0.2)


class Db:
    """A private embedded Postgres (and Valkey) that tests stop, restore and freeze."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.svc: Services | None = None

    @property
    def dsn(self) -> str:
        assert self.svc is not None
        return self.svc.database_url

    async def start(self) -> None:
        self.svc = await asyncio.to_thread(embedded_for_tests, self.root)

    async def stop(self) -> None:
        if self.svc is not None:
            await asyncio.to_thread(self.svc.stop)

    def processes(self) -> list[psutil.Process]:
        pid = int((self.root / "postgres" / "postmaster.pid").read_text().split()[0])
        main = psutil.Process(pid)
        return [main, *main.children(recursive=True)]

    def signal(self, sig: int) -> None:
        for p in self.processes():
            with contextlib.suppress(ProcessLookupError):  # a backend that just ended
                os.kill(p.pid, sig)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Db]:
    d = Db(tmp_path)
    await d.start()
    await migrate(d.dsn)
    try:
        yield d
    finally:
        with contextlib.suppress(OSError, ValueError, psutil.Error):
            d.signal(signal.SIGCONT)
        await d.stop()


async def _shard(dsn: str, codes: int, **settings: object) -> tuple[ShardCore, list[str], list[int]]:
    c = await stored_campaign(dsn, id=uid("sf"), type="discount", discount=Discount("amount", 100))
    fields: dict[str, object] = {"batch_window_ms": 1.0, **settings}
    s = Settings(namespace=uid("sf-ns"), shards=1, **fields)  # type: ignore[arg-type]
    core = ShardCore(0, 1, dsn, s)
    exits: list[int] = []
    core.exit_process = exits.append
    names = [uid("SF").upper() for _ in range(codes)]
    assert await core.add_codes(c.id, names) == codes
    return core, names, exits


async def _copy_tree(src: Path, dst: Path) -> None:
    # cp -a keeps the owner (the server may run as another user than the tests)
    proc = await asyncio.create_subprocess_exec("cp", "-a", str(src), str(dst))
    assert await proc.wait() == 0


async def _close(core: ShardCore) -> None:
    if core._housekeeping is not None:
        core._housekeeping.cancel()
    if core.store is not None:
        core.store.terminate()


async def test_memory_follows_a_database_that_came_back_without_its_last_commits(db: Db) -> None:
    core, (a, b), exits = await _shard(db.dsn, 2)
    try:
        await db.stop()
        snapshot = db.root / "snapshot"
        await _copy_tree(db.root / "postgres", snapshot)
        await db.start()
        first = await _until(core, _req(a))  # committed on the server...
        assert first.redemption is not None
        await db.stop()  # ...which then fails over to a standby that never got it
        await asyncio.to_thread(shutil.rmtree, db.root / "postgres")
        await asyncio.to_thread(shutil.move, str(snapshot), str(db.root / "postgres"))
        await db.start()
        assert await fetch(db.dsn, "SELECT 1 FROM redemptions WHERE code = $1", a) == []

        # The shard notices the other server and reloads: the code is available again, as
        # the database says, and is redeemed exactly once more.
        deadline = time.monotonic() + 20
        while True:
            out = await _until(core, _req(a))
            if out.redemption is not None:
                break
            assert out.rejection is not None and out.rejection.error == "already_redeemed"
            assert time.monotonic() < deadline, "memory still holds the lost redemption"
            await asyncio.sleep(0.3)
        rows = await fetch(db.dsn, "SELECT status FROM redemptions WHERE code = $1", a)
        assert len(rows) == 1
        assert (await _redeem(core, _req(b))).redemption is not None
        assert core.reloads >= 1 and exits == []  # reloaded in place, no process restart
    finally:
        await _close(core)


async def test_a_frozen_database_gets_answers_within_the_deadline(db: Db) -> None:
    core, (x, y), _ = await _shard(db.dsn, 2, decision_deadline_s=1.0, commit_timeout_s=60.0)
    try:
        key = uid("key")
        db.signal(signal.SIGSTOP)
        try:
            for req in (_req(x, key=key), _req(y)):
                t0 = time.monotonic()
                with pytest.raises(errors.Unavailable, match="within 1 s"):
                    await asyncio.wait_for(_redeem(core, req), 10)
                assert time.monotonic() - t0 < 1.6
        finally:
            db.signal(signal.SIGCONT)
        # The unanswered request is safe to retry with its key: one decision, replayed.
        again = await _until(core, _req(x, key=key))
        assert again.redemption is not None
        replay = await _redeem(core, _req(x, key=key))
        assert replay.redemption == again.redemption
        rows = await fetch(db.dsn, "SELECT id FROM redemptions WHERE code = $1", x)
        assert [r["id"] for r in rows] == [again.redemption.id]
    finally:
        await _close(core)


async def test_fast_mode_stops_answering_from_memory_behind_a_stalled_commit(db: Db) -> None:
    lag_ms = 100.0
    core, codes, _ = await _shard(
        db.dsn, 400, ack_mode="fast", fast_max_lag_ms=lag_ms, decision_deadline_s=0.5
    )
    try:
        assert (await _redeem(core, _req(codes[0]))).redemption is not None
        await core.flush()
        db.signal(signal.SIGSTOP)
        t0 = time.monotonic()
        acked_at: list[float] = []
        refused = 0
        try:
            for code in codes[1:]:
                if time.monotonic() - t0 > 2.0:
                    break
                try:
                    out = await _redeem(core, _req(code))
                except errors.Unavailable:
                    refused += 1
                    continue
                assert out.redemption is not None
                acked_at.append(time.monotonic() - t0)
                await asyncio.sleep(0.005)  # a steady trickle of checkouts
        finally:
            db.signal(signal.SIGCONT)
        # answers from memory stop once the oldest uncommitted decision is older than the
        # bound (plus one event-loop turn); after that every caller waits and gets 503
        assert acked_at and max(acked_at) < lag_ms / 1000 + 0.25, max(acked_at)
        print(
            f"fast ack, Postgres frozen: {len(acked_at)} answers from memory, the last"
            f" {max(acked_at) * 1000:.0f} ms after the freeze (bound {lag_ms:.0f} ms)"
        )
        assert refused >= 2, (refused, acked_at, time.monotonic() - t0)
        await _until(core, _req(codes[-1]))
        await core.flush()
        stored = {
            r["code"] for r in await fetch(db.dsn, "SELECT code FROM redemptions WHERE code = ANY($1)", codes)
        }
        assert set(codes[1 : 1 + len(acked_at)]) <= stored  # no crash: every ack persisted
    finally:
        await _close(core)


async def test_a_decision_the_database_refuses_fails_alone(db: Db) -> None:
    # A rule the engine does not know of makes Postgres refuse one order id (class 23).
    await fetch(
        db.dsn,
        "ALTER TABLE redemptions ADD CONSTRAINT test_refused CHECK (order_id <> 'poison')",
    )
    core, codes, exits = await _shard(db.dsn, 10, batch_window_ms=20.0)
    try:
        reqs = [_req(c, order_id="poison" if i == 5 else f"o{i}") for i, c in enumerate(codes)]
        # one caller per request, all in one group commit
        got = await asyncio.gather(*[_redeem(core, r) for r in reqs], return_exceptions=True)
        for i in range(5):
            out = got[i]
            assert isinstance(out, Outcome) and out.redemption is not None, (i, out)
        assert all(isinstance(g, errors.Unavailable) for g in got[5:]), got[5:]
        rows = await fetch(db.dsn, "SELECT code FROM redemptions WHERE code = ANY($1)", codes)
        assert sorted(r["code"] for r in rows) == sorted(codes[:5])
        status = {
            r["code"]: r["status"]
            for r in await fetch(db.dsn, "SELECT code, status FROM vouchers WHERE code = ANY($1)", codes)
        }
        assert all(status[c] == 0 for c in codes[5:])  # nothing half-written
        # the shard reloads in place and serves the others (and the refused code) again
        for i in range(5, 10):
            assert (await _until(core, _req(codes[i], order_id=f"o{i}"))).redemption is not None
        assert exits == [] and core.reloads == 1
    finally:
        await _close(core)
