"""The group commit's own rules (actors/write_behind.py), with an in-memory store: batches
capped at ``max_batch`` and cut between decisions, a refused decision isolated (the ones
before it committed and answered, none half-written), lag measured from the oldest
uncommitted decision, and every failure final for the writer."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

import asyncpg
import pytest

from actors.write_behind import BatchRefused, WriteBehind
from engine import errors


class Store:
    """Commits lists of events; refuses (as Postgres would, for content) any batch holding
    an event in ``bad``; can be told to hang."""

    def __init__(self, bad: set[Any] | None = None) -> None:
        self.rows: list[Any] = []
        self.batches: list[list[Any]] = []
        self.bad = bad or set()
        self.hang: asyncio.Event | None = None

    async def persist(self, events: Sequence[Any]) -> None:
        if self.hang is not None:
            await self.hang.wait()
        if any(e in self.bad for e in events):
            raise asyncpg.exceptions.CharacterNotInRepertoireError("invalid byte sequence 0x00")
        self.batches.append(list(events))
        self.rows.extend(events)


class Shard:
    """The pending events and decisions a shard would feed the writer."""

    def __init__(self, store: Store, **kw: Any) -> None:
        self.events: list[Any] = []
        self.fatal: list[BaseException] = []
        self.writer = WriteBehind(
            drain=self.drain,
            pending=lambda: len(self.events),
            persist=store.persist,
            on_fatal=self.fatal.append,
            window_s=kw.pop("window_s", 0.0),
            **kw,
        )

    def drain(self, n: int) -> list[Any]:
        out, self.events = self.events[:n], self.events[n:]
        return out

    def decide(self, *events: Any) -> asyncio.Future[None]:
        """One decision: its events, its unit mark, its caller's wait for durability."""
        self.events.extend(events)
        self.writer.mark()
        return self.writer.durable()


def test_batches_are_capped_and_cut_between_decisions() -> None:
    store = Store()

    async def main() -> None:
        shard = Shard(store, max_batch=7)
        waits = [shard.decide(*[f"d{i}e{j}" for j in range(3)]) for i in range(10)]
        waits.append(shard.decide(*[f"big{j}" for j in range(10)]))  # one decision > cap
        await asyncio.gather(*waits)

    asyncio.run(main())
    sizes = [len(b) for b in store.batches]
    assert sizes == [6, 6, 6, 6, 6, 10]
    # every batch holds whole decisions
    for b in store.batches:
        assert len({e.split("e")[0] for e in b if e.startswith("d")}) * 3 == sum(
            1 for e in b if e.startswith("d")
        )
    assert len(store.rows) == 40


def test_a_refused_decision_is_isolated() -> None:
    store = Store(bad={"d6e1"})

    async def main() -> list[BaseException | None]:
        shard = Shard(store, max_batch=1000)
        waits = [shard.decide(f"d{i}e0", f"d{i}e1") for i in range(10)]
        done = await asyncio.gather(*waits, return_exceptions=True)
        assert [type(e) for e in shard.fatal] == [BatchRefused]
        assert shard.writer.failed and shard.writer.refused == 1
        return list(done)

    done = asyncio.run(main())
    assert done[:6] == [None] * 6  # the decisions before the refused one are answered
    assert all(isinstance(d, errors.Unavailable) for d in done[6:])
    assert store.rows == [f"d{i}e{j}" for i in range(6) for j in range(2)]  # none half-written


@pytest.mark.parametrize("seed", range(40))
def test_isolation_commits_exactly_the_decisions_before_the_first_refused(seed: int) -> None:
    rnd = random.Random(seed)
    sizes = [rnd.randint(1, 4) for _ in range(rnd.randint(1, 30))]
    decisions = [[f"d{i}e{j}" for j in range(n)] for i, n in enumerate(sizes)]
    flat = [e for d in decisions for e in d]
    bad = set(rnd.sample(flat, k=min(len(flat), rnd.randint(0, 3))))
    store = Store(bad=bad)

    async def main() -> list[BaseException | None]:
        shard = Shard(store, max_batch=rnd.randint(1, 50))
        waits = [shard.decide(*d) for d in decisions]
        return list(await asyncio.gather(*waits, return_exceptions=True))

    done = asyncio.run(main())
    first_bad = next((i for i, d in enumerate(decisions) if bad & set(d)), len(decisions))
    assert store.rows == [e for d in decisions[:first_bad] for e in d]
    assert done[:first_bad] == [None] * first_bad
    assert all(isinstance(x, errors.Unavailable) for x in done[first_bad:])


def test_an_unknown_outcome_is_final_and_never_retried() -> None:
    calls = {"n": 0}

    async def persist(events: Sequence[Any]) -> None:
        calls["n"] += 1
        raise ConnectionResetError("connection lost mid-commit")

    async def main() -> None:
        events = ["a"]
        fatal: list[BaseException] = []
        w = WriteBehind(
            drain=lambda n: [events.pop()] if events else [],
            pending=lambda: len(events),
            persist=persist,
            on_fatal=fatal.append,
            window_s=0,
        )
        with pytest.raises(errors.Unavailable):
            await w.durable()
        assert [type(e) for e in fatal] == [ConnectionResetError]
        with pytest.raises(errors.Unavailable):  # and it stays failed
            await w.durable()

    asyncio.run(main())
    assert calls["n"] == 1


def test_a_commit_past_its_timeout_fails_the_writer() -> None:
    store = Store()
    store.hang = asyncio.Event()  # never set

    async def main() -> None:
        shard = Shard(store, commit_timeout_s=0.2)
        with pytest.raises(errors.Unavailable):
            await asyncio.wait_for(shard.decide("a"), 2)
        assert shard.fatal and "longer than 0.2 s" in str(shard.fatal[0])

    asyncio.run(main())


def test_lag_counts_from_the_oldest_uncommitted_decision() -> None:
    store = Store()

    async def main() -> None:
        shard = Shard(store)
        assert shard.writer.behind() == 0.0
        store.hang = asyncio.Event()
        shard.events.append("a")
        shard.writer.mark()
        shard.writer.poke()  # fast ack: nobody waits
        await asyncio.sleep(0.15)
        shard.events.append("b")
        shard.writer.poke()
        assert shard.writer.behind() >= 0.14  # "a" still waits behind the hung commit
        store.hang.set()
        store.hang = None
        await shard.writer.durable()
        assert shard.writer.behind() == 0.0

    asyncio.run(main())
    assert store.rows == ["a", "b"]


def test_durable_with_nothing_pending_answers_at_once() -> None:
    async def main() -> None:
        shard = Shard(Store())
        fut = shard.writer.durable()
        assert fut.done()

    asyncio.run(main())
