"""What marking a decision's end costs the group commit, per decision, in-process.

    python -m loadtests.mark_cost [--decisions 1000000] [--rounds 2]

A decision that appends one event is called with and without the mark the shard adds
after each decision (``WriteBehind.mark``), alternating, in one process; prints ns per
decision for each round.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from actors.write_behind import WriteBehind


async def run(decisions: int, rounds: int) -> list[tuple[str, float]]:
    events: list[int] = []

    async def persist(batch: Sequence[Any]) -> None:
        return None

    writer = WriteBehind(
        drain=lambda n: [], pending=lambda: len(events), persist=persist,
        on_fatal=lambda exc: None, window_s=0,
    )

    def decide(x: int) -> int:
        events.append(x)
        return x

    def marked(x: int) -> int:
        out = decide(x)
        writer.mark()
        return out

    figures: list[tuple[str, float]] = []
    kinds: list[tuple[str, Callable[[int], int]]] = [("plain", decide), ("marked", marked)]
    for _ in range(rounds):
        for label, fn in kinds:
            events.clear()
            writer._units.clear()
            t0 = time.perf_counter()
            for i in range(decisions):
                fn(i)
            figures.append((label, (time.perf_counter() - t0) / decisions * 1e9))
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decisions", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    for label, ns in asyncio.run(run(args.decisions, args.rounds)):
        print(f"{label:7} {ns:6.0f} ns/decision")


if __name__ == "__main__":
    main()
