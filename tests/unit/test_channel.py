"""The gateway's direct line to a shard (actors/shard_socket.py) over a real Unix socket, and the
micro-batcher using it: answers reach the right callers, errors keep their type, a lost
connection fails what was in flight as retryable and the batcher falls back to Ray calls
(the fake shards' ``remote``) until it has reconnected."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import msgspec
import pytest

import serve.batching as batching
from actors.shard_socket import ChannelServer, ShardChannel, connect
from engine import errors
from engine.shard_state import Outcome, RedeemRequest
from serve.batching import MicroBatcher
from tests.unit.test_batching import FakeEngine, answer, codes_on_shard, req

_reqs = msgspec.msgpack.Decoder(list[RedeemRequest])
_enc = msgspec.msgpack.Encoder()


def _settler() -> tuple[asyncio.Future[Any], Any]:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def settle(res: Any) -> None:
        if not fut.done():
            fut.set_result(res)

    return fut, settle


async def test_calls_are_answered_in_any_order_to_the_right_caller() -> None:
    seen: list[tuple[str, list[str | None] | None]] = []

    async def handler(op: str, payload: bytes, ids: list[str | None] | None) -> bytes:
        seen.append((op, ids))
        await asyncio.sleep(0.05 if payload == b"slow" else 0)
        return op.encode() + b":" + payload

    server = ChannelServer(handler)
    path = await server.start("t")
    assert oct(os.stat(os.path.dirname(path)).st_mode & 0o777) == "0o700"
    chan = await connect(path)
    slow, settle_slow = _settler()
    fast, settle_fast = _settler()
    chan.call("redeem", b"slow", ["r1"], settle_slow)
    chan.call("validate", b"fast", None, settle_fast)
    done, _ = await asyncio.wait([slow, fast], return_when=asyncio.FIRST_COMPLETED)
    assert done == {fast}  # the quick one was not held behind the slow one
    assert await fast == b"validate:fast"
    assert await slow == b"redeem:slow"
    assert seen == [("redeem", ["r1"]), ("validate", None)]
    chan.close()
    await server.close()
    assert not os.path.exists(path)


async def test_errors_keep_their_type_and_unknown_ones_are_retryable() -> None:
    async def handler(op: str, payload: bytes, ids: list[str | None] | None) -> bytes:
        if payload == b"engine":
            raise errors.UnknownCampaign("no such campaign")
        raise RuntimeError("boom")

    server = ChannelServer(handler)
    chan = await connect(await server.start("t"))
    a, settle_a = _settler()
    b, settle_b = _settler()
    c, settle_c = _settler()
    chan.call("redeem", b"engine", None, settle_a)
    chan.call("redeem", b"bug", None, settle_b)
    chan.call("bogus-op", b"x", None, settle_c)
    err = await a
    assert isinstance(err, errors.UnknownCampaign) and err.message == "no such campaign"
    assert isinstance(await b, errors.Unavailable) and "boom" in (await b).message
    assert isinstance(await c, errors.Unavailable)
    chan.close()
    await server.close()


async def test_a_lost_connection_fails_what_is_in_flight_as_retryable() -> None:
    gate = asyncio.Event()

    async def handler(op: str, payload: bytes, ids: list[str | None] | None) -> bytes:
        await gate.wait()
        return payload

    server = ChannelServer(handler)
    lost: list[ShardChannel] = []
    chan = await connect(await server.start("t"), on_lost=lost.append)
    pending = [_settler() for _ in range(3)]
    for i, (_, settle) in enumerate(pending):
        chan.call("redeem", str(i).encode(), None, settle)
    await asyncio.sleep(0.02)
    await server.close()  # the shard goes away with three calls unanswered
    for fut, _ in pending:
        res = await asyncio.wait_for(fut, 2)
        assert isinstance(res, errors.Unavailable), res
    assert lost == [chan] and not chan.usable
    late, settle_late = _settler()
    chan.call("redeem", b"after", None, settle_late)  # a closed line answers at once
    assert isinstance(await late, errors.Unavailable)
    gate.set()


async def test_the_shard_drops_a_peer_that_sends_garbage() -> None:
    async def handler(op: str, payload: bytes, ids: list[str | None] | None) -> bytes:
        return payload

    server = ChannelServer(handler)
    path = await server.start("t")
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write((5).to_bytes(4, "big") + b"\xc1\xc1\xc1\xc1\xc1")  # not msgpack
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 2) == b""  # closed, nothing answered
    writer.close()
    chan = await connect(path)  # the server itself is fine
    ok, settle = _settler()
    chan.call("redeem", b"fine", None, settle)
    assert await ok == b"fine"
    chan.close()
    await server.close()


# --- the micro-batcher on channels --------------------------------------------------------


class _Shard:
    """A fake shard's direct line: the same answers as its Ray methods."""

    def __init__(self, engine: FakeEngine, index: int, node: str) -> None:
        self.engine = engine
        self.index = index
        self.node = node
        self.server: ChannelServer | None = None
        self.channel_calls: list[tuple[str, list[str]]] = []
        self.channel = self  # ``shard.channel.remote()``

    def remote(self) -> Any:
        return self._where()

    async def _where(self) -> tuple[str, str]:
        if self.server is None:
            self.server = ChannelServer(self._handle)
        return self.node, await self.server.start(f"fake{self.index}")

    async def _handle(self, op: str, payload: bytes, ids: list[str | None] | None) -> bytes:
        reqs = _reqs.decode(payload)
        self.channel_calls.append((op, [r.code for r in reqs]))
        return _enc.encode([answer(r, op) for r in reqs])


def _engine_with_lines(n: int, node: str) -> tuple[FakeEngine, list[_Shard]]:
    engine = FakeEngine(n)
    lines = [_Shard(engine, i, node) for i in range(n)]
    for shard, line in zip(engine.shards, lines, strict=True):
        shard.channel = line  # type: ignore[attr-defined]
    return engine, lines


@pytest.fixture
def this_node(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(batching, "_node_id", lambda: "node-a")
    monkeypatch.setattr(batching, "_REDIAL_S", 0.05)
    return "node-a"


async def _until(cond: Any, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_batcher_uses_the_line_once_connected(this_node: str) -> None:
    engine, lines = _engine_with_lines(2, this_node)
    batcher = MicroBatcher(engine, channels=True)
    code = codes_on_shard(engine, 1, 1)[0]
    first = await batcher.submit("redeem", req(code))  # through Ray while connecting
    assert first.rejection is not None and first.rejection.message == code
    assert engine.shards[1].calls == [("redeem", [code])]
    await _until(lambda: 1 in batcher._channels)
    outs = await asyncio.gather(*[batcher.submit("validate", req(code)) for _ in range(20)])
    assert all(isinstance(o, Outcome) and o.rejection.message == code for o in outs)  # type: ignore[union-attr]
    assert sum(len(c) for _, c in lines[1].channel_calls) == 20
    assert engine.shards[1].calls == [("redeem", [code])]  # nothing more through Ray
    assert batcher.stats()["channels"] == 1
    await batcher.close()
    for line in lines:
        if line.server is not None:
            await line.server.close()


async def test_batcher_keeps_ray_calls_for_a_shard_on_another_node(this_node: str) -> None:
    engine, lines = _engine_with_lines(1, "node-b")
    batcher = MicroBatcher(engine, channels=True)
    for _ in range(3):
        await batcher.submit("redeem", req("X1"))
        await asyncio.sleep(0.06)
    assert not batcher._channels and lines[0].channel_calls == []
    assert len(engine.shards[0].calls) == 3
    await batcher.close()
    if lines[0].server is not None:
        await lines[0].server.close()


async def test_batcher_survives_a_shard_restart(this_node: str) -> None:
    engine, lines = _engine_with_lines(1, this_node)
    batcher = MicroBatcher(engine, channels=True)
    await batcher.submit("redeem", req("R1"))
    await _until(lambda: 0 in batcher._channels)
    line = lines[0]
    assert line.server is not None
    await line.server.close()  # the shard process is gone...
    line.server = None  # ...and comes back with a new socket
    await _until(lambda: 0 not in batcher._channels)
    out = await batcher.submit("redeem", req("R2"))  # meanwhile: Ray calls
    assert out.rejection is not None and out.rejection.message == "R2"
    for _ in range(100):  # the next submits redial (at most every _REDIAL_S)
        out = await batcher.submit("redeem", req("R3"))
        assert out.rejection is not None and out.rejection.message == "R3"
        if ("redeem", ["R3"]) in line.channel_calls:
            break
        await asyncio.sleep(0.02)
    assert ("redeem", ["R3"]) in line.channel_calls, "never reconnected"
    await batcher.close()
    await line.server.close()  # type: ignore[union-attr]

