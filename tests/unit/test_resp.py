"""The rate limiter's pipelined Redis connection (serve/resp.py) against a scripted RESP
server on a real socket: commands go out in RESP, replies come back in order to the right
callbacks, errors and a dropped or misbehaving server reach every waiting caller."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serve.resp import Address, ReplyError, RespPipe, open_pipe, pack, pipe_address


def test_pack_is_resp() -> None:
    assert pack(["EVALSHA", b"ab", 2, 1.5]) == (
        b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n$3\r\n1.5\r\n"
    )
    with pytest.raises(TypeError):
        pack([object()])


def test_addresses() -> None:
    assert pipe_address("redis://127.0.0.1:6380/2") == Address(host="127.0.0.1", port=6380, db=2)
    assert pipe_address("redis://:s3cret@h") == Address(host="h", password="s3cret")
    assert pipe_address("redis://bob:pw%40x@h:1/0") == Address(
        host="h", port=1, username="bob", password="pw@x"
    )
    assert pipe_address("unix:///run/valkey.sock?db=3") == Address(path="/run/valkey.sock", db=3)
    assert pipe_address("rediss://h:6380/0") is None  # TLS stays with redis-py


class _Server:
    """Answers each command line it receives with the next canned reply (or, for ``None``,
    nothing: a server that hangs)."""

    def __init__(self, replies: list[bytes | None]) -> None:
        self.replies = list(replies)
        self.received: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        while True:
            head = await reader.readline()
            if not head:
                return
            n = int(head[1:])
            parts = []
            for _ in range(n):
                size = int((await reader.readline())[1:])
                parts.append((await reader.readexactly(size + 2))[:-2])
            self.received.append(b" ".join(parts))
            reply = self.replies.pop(0) if self.replies else None
            if reply is not None:
                writer.write(reply)

    async def stop(self) -> None:
        for w in self.writers:
            w.close()
        if self.server is not None:
            self.server.close()


async def test_replies_go_to_their_callers_in_order() -> None:
    srv = _Server([b"+OK\r\n", b"*2\r\n$1\r\na\r\n:7\r\n", b"-NOSCRIPT no script\r\n"])
    port = await srv.start()
    pipe = await open_pipe(Address(host="127.0.0.1", port=port, password="pw"), 2.0)
    assert srv.received == [b"AUTH pw"]
    got: list[Any] = []
    pipe.send(["EVALSHA", "x", 0], got.append)
    pipe.send(["EVALSHA", "y", 0], got.append)
    await asyncio.sleep(0.1)
    assert got[0] == [b"a", 7]
    assert isinstance(got[1], ReplyError) and got[1].noscript
    pipe.close()
    await srv.stop()


async def test_a_dropped_server_fails_every_waiting_caller() -> None:
    srv = _Server([None, None])
    port = await srv.start()
    pipe = await open_pipe(Address(host="127.0.0.1", port=port), 2.0)
    got: list[Any] = []
    pipe.send(["PING"], got.append)
    pipe.send(["PING"], got.append)
    await asyncio.sleep(0.05)
    await srv.stop()
    for _ in range(100):
        if len(got) == 2:
            break
        await asyncio.sleep(0.01)
    assert len(got) == 2 and all(isinstance(g, ConnectionError) for g in got)
    assert not pipe.usable
    pipe.send(["PING"], got.append)  # a closed pipe answers at once
    assert isinstance(got[2], ConnectionError)


async def test_a_reply_nobody_asked_for_closes_the_pipe() -> None:
    srv = _Server([b"+OK\r\n+EXTRA\r\n"])
    port = await srv.start()
    pipe = await open_pipe(Address(host="127.0.0.1", port=port), 2.0)
    got: list[Any] = []
    pipe.send(["PING"], got.append)
    await asyncio.sleep(0.1)
    assert got == [b"OK"] and not pipe.usable
    await srv.stop()


async def test_connecting_to_nothing_raises() -> None:
    with pytest.raises(OSError):
        await open_pipe(Address(host="127.0.0.1", port=1), 1.0)


async def test_a_hanging_handshake_times_out() -> None:
    srv = _Server([None])
    port = await srv.start()
    with pytest.raises(TimeoutError):
        await open_pipe(Address(host="127.0.0.1", port=port, password="pw"), 0.2)
    await srv.stop()


def test_pipe_starts_unusable() -> None:
    assert not RespPipe().usable
