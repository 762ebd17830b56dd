"""The engine client's scatter-gather of a qualification (actors/client.py): one call per
shard, the answers merged best first, and a shard that does not answer within the deadline
(or is away) an ``unavailable``, never a hang and never a partial list."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import msgspec
import pytest

from actors.client import VoucherEngine
from engine import errors
from engine.orders import Order
from engine.qualification import Offer, Qualified, QualifyRequest, best_first, merge, ranked, share

REQ = QualifyRequest("ann", Order(4000, "EUR"), None, None)


class _Shard:
    """A shard handle whose ``qualify.remote`` answers ``offers`` after ``delay_s`` (or
    raises ``fail``)."""

    def __init__(
        self, offers: list[Offer], delay_s: float = 0.0, fail: Exception | None = None,
        tags_needed: bool = False,
    ) -> None:
        self.offers, self.delay_s, self.fail, self.tags_needed = offers, delay_s, fail, tags_needed
        self.asked: list[QualifyRequest] = []
        self.qualify = self

    def remote(self, payload: bytes) -> Any:
        self.asked.append(msgspec.msgpack.decode(payload, type=QualifyRequest))

        async def answer() -> bytes:
            await asyncio.sleep(self.delay_s)
            if self.fail is not None:
                raise self.fail
            limit = self.asked[-1].limit
            best = best_first(self.offers)
            listed = best if limit is None else best[:limit]
            more = limit is not None and len(best) > limit
            return msgspec.msgpack.encode(ranked(Qualified(listed, self.tags_needed, more)))

        return answer()


def _offer(cid: str, discount: int, code: str | None = None) -> Offer:
    return Offer("shared_code", cid, cid, "shared_code", code or cid.upper(), discount)


def test_every_shard_is_asked_and_the_answers_merge_best_first() -> None:
    shards = [
        _Shard([_offer("b", 300), _offer("c", 900)]), _Shard([_offer("a", 300)]),
        _Shard([], tags_needed=True),
    ]
    engine = VoucherEngine(shards, None)  # type: ignore[arg-type]
    got = asyncio.run(engine.qualify(REQ, 1.0))
    assert [o[1] for o in got.offers] == ["c", "a", "b"] and got.tags_needed
    assert all(s.asked == [REQ] for s in shards)
    limited = msgspec.structs.replace(REQ, limit=2)
    assert [o[1] for o in asyncio.run(engine.qualify(limited, 1.0)).offers] == ["c", "a"]


def test_with_a_limit_shards_list_their_share_and_one_holding_more_of_the_best_is_asked_again() -> None:
    """Each shard lists its share of the limit first; only a shard whose list was cut while
    its last offer still ranks among the best is asked for the whole limit. The answer is
    always the best ``limit`` of every shard's offers."""
    rich = _Shard([_offer(f"r{i:02d}", 1000 - i) for i in range(15)])  # the best 15 of all
    poor = [_Shard([_offer(f"p{j}{i}", 10 + i) for i in range(6)]) for j in range(3)]
    engine = VoucherEngine([rich, *poor], None)  # type: ignore[arg-type]
    req = msgspec.structs.replace(REQ, limit=10)
    got = asyncio.run(engine.qualify(req, 1.0))
    assert [o[1] for o in got.offers] == [f"r{i:02d}" for i in range(10)]
    assert [a.limit for a in rich.asked] == [share(10, 4), 10]  # asked again, for the whole
    assert all([a.limit for a in s.asked] == [share(10, 4)] for s in poor)  # their lists sufficed

    rng = random.Random(5)
    again = 0
    for _ in range(300):
        shards = [_Shard([_offer(f"c{s}-{i}", rng.randint(1, 40)) for i in range(rng.randint(0, 12))])
                  for s in range(rng.randint(2, 5))]
        k = rng.randint(1, 25)
        want = merge([Qualified(s.offers) for s in shards], k).offers
        got = asyncio.run(VoucherEngine(shards, None).qualify(  # type: ignore[arg-type]
            msgspec.structs.replace(REQ, limit=k), 1.0))
        assert [(o[0], o[1], o[2]) for o in got.offers] == [(o.discount_amount, o.campaign_id, o.code) for o in want]
        again += sum(len(s.asked) - 1 for s in shards)
    assert 0 < again < 300  # second rounds happen, for few requests


def test_a_shard_that_does_not_answer_in_time_is_unavailable_within_the_deadline() -> None:
    engine = VoucherEngine([_Shard([_offer("a", 1)]), _Shard([], delay_s=30)], None)  # type: ignore[arg-type]
    t0 = time.monotonic()
    with pytest.raises(errors.Unavailable, match="did not answer"):
        asyncio.run(engine.qualify(REQ, 0.2))
    assert time.monotonic() - t0 < 2.0


def test_a_shard_away_is_unavailable() -> None:
    away = _Shard([], fail=errors.Unavailable("actor unavailable, retry"))
    engine = VoucherEngine([_Shard([_offer("a", 1)]), away], None)  # type: ignore[arg-type]
    with pytest.raises(errors.Unavailable):
        asyncio.run(engine.qualify(REQ, 1.0))


async def test_the_gateway_sends_a_qualification_over_a_shards_direct_line() -> None:
    """``MicroBatcher.direct``: the shard's Unix socket when connected (op ``qualify``),
    a Ray call to its ``qualify`` method otherwise; the engine scatters through it."""
    from types import SimpleNamespace

    from actors.shard_socket import ChannelServer, connect
    from serve.batching import MicroBatcher

    answered = msgspec.msgpack.encode(ranked(Qualified([_offer("a", 5)])))
    seen: list[tuple[str, QualifyRequest]] = []

    async def handler(op: str, payload: bytes, ids: list[str | None] | None) -> bytes:
        seen.append((op, msgspec.msgpack.decode(payload, type=QualifyRequest)))
        return answered

    server = ChannelServer(handler)
    chan = await connect(await server.start("q"))
    by_ray = _Shard([_offer("b", 7)])
    engine = SimpleNamespace(shards=[SimpleNamespace(), by_ray], n=2)
    batcher = MicroBatcher(engine, channels=True)
    batcher._channels[0] = chan  # shard 0 on this node; shard 1 not (yet) connected
    batcher._dialing[1] = 1e18  # and no dial attempt
    real = VoucherEngine(engine.shards, None)  # type: ignore[arg-type]
    got = await real.qualify(REQ, 1.0, batcher.direct)
    assert [o[1] for o in got.offers] == ["b", "a"]
    assert seen == [("qualify", REQ)] and by_ray.asked == [REQ]
    chan.close()
    await server.close()
