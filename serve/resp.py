"""One pipelined Redis connection for the rate limiter's script calls, read by the event loop
itself: the reply is parsed (hiredis) in ``data_received`` and handed to its caller's
callback right there.

Why not redis-py for this one call: its asyncio client reads a reply in a coroutine woken by
a ``StreamReader``, which costs one more event-loop turn per call than a protocol callback,
and under load a turn of the gateway's loop is milliseconds; its command packing, pool and
retry wrappers were ~7 % of the gateway's CPU at 3,000 redemptions/s. Everything else (and
this call whenever the pipe is not connected) still goes through redis-py.

Supports ``redis://[[user]:password@]host[:port][/db]`` and ``unix://path[?db=N]`` URLs;
``rediss://`` (TLS) is left to redis-py (:func:`pipe_address` answers None).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import hiredis

log = logging.getLogger(__name__)

#: called once with the reply (bytes, int, list, ...), or an exception
Reply = Callable[[Any], None]


class ReplyError(Exception):
    """Redis answered with an error (``-ERR ...``, ``-NOSCRIPT ...``)."""

    @property
    def noscript(self) -> bool:
        return str(self).startswith("NOSCRIPT")


@dataclass(frozen=True)
class Address:
    host: str | None = None
    port: int = 6379
    path: str | None = None  # unix socket
    username: str | None = None
    password: str | None = None
    db: int = 0


def pipe_address(url: str) -> Address | None:
    """Where to connect, or None for URLs this pipe does not handle (TLS, unknown)."""
    u = urlparse(url)
    db = 0
    if u.scheme == "unix":
        q = parse_qs(u.query)
        db = int(q.get("db", ["0"])[0])
        return Address(
            path=u.path,
            username=unquote(u.username) if u.username else None,
            password=unquote(u.password) if u.password else None,
            db=db,
        )
    if u.scheme != "redis" or not u.hostname:
        return None
    if u.path and u.path.strip("/"):
        db = int(u.path.strip("/"))
    return Address(
        host=u.hostname,
        port=u.port or 6379,
        username=unquote(u.username) if u.username else None,
        password=unquote(u.password) if u.password else None,
        db=db,
    )


def pack(args: list[Any]) -> bytes:
    """A command in RESP: ``*n`` then ``$len`` + bytes per argument."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, bytes):
            b = a
        elif isinstance(a, str):
            b = a.encode()
        elif isinstance(a, int | float):
            b = repr(a).encode()
        else:
            raise TypeError(f"cannot send {type(a).__name__} to Redis")
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class RespPipe(asyncio.Protocol):
    """Replies come back in the order the commands went out: one FIFO of callbacks."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(replyError=ReplyError)
        self.pending: deque[Reply] = deque()
        self.closed = False

    @property
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def send(self, args: list[Any], reply: Reply) -> None:
        if not self.usable:
            reply(ConnectionError("redis pipe closed"))
            return
        assert self.transport is not None
        self.pending.append(reply)
        self.transport.write(pack(args))

    async def command(self, *args: Any) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(res: Any) -> None:
            if fut.done():
                return
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)

        self.send(list(args), done)
        return await fut

    def data_received(self, data: bytes) -> None:
        try:
            self.reader.feed(data)
            while True:
                res = self.reader.gets()
                if res is False:
                    break
                if not self.pending:
                    raise hiredis.ProtocolError("a reply nobody asked for")
                _call(self.pending.popleft(), res)
        except hiredis.ProtocolError as exc:
            log.error("redis pipe: protocol error, closing: %s", exc)
            self.close(ConnectionError(f"redis protocol error: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self._fail(ConnectionError(f"redis connection lost: {exc}" if exc else "redis connection closed"))

    def close(self, exc: Exception | None = None) -> None:
        """Close; every reply still awaited gets ``exc`` (a later reply would be out of step)."""
        self.closed = True
        if exc is not None:
            self._fail(exc)
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        pending, self.pending = self.pending, deque()
        for reply in pending:
            _call(reply, exc)


def _call(reply: Reply, res: Any) -> None:
    try:
        reply(res)
    except Exception:  # one caller's bug must not stall the others
        log.exception("redis pipe: a reply callback failed")


async def open_pipe(addr: Address, timeout_s: float) -> RespPipe:
    """Connect, authenticate and select the database; raises OSError / ReplyError."""
    loop = asyncio.get_running_loop()

    opened: list[RespPipe] = []

    async def dial() -> RespPipe:
        if addr.path is not None:
            _, proto = await loop.create_unix_connection(RespPipe, addr.path)
        else:
            _, proto = await loop.create_connection(RespPipe, addr.host or "localhost", addr.port)
        opened.append(proto)
        if addr.password is not None:
            if addr.username is not None:
                await proto.command("AUTH", addr.username, addr.password)
            else:
                await proto.command("AUTH", addr.password)
        if addr.db:
            await proto.command("SELECT", addr.db)
        return proto

    try:
        return await asyncio.wait_for(dial(), timeout_s)
    except BaseException:
        for proto in opened:
            proto.close()
        raise


__all__ = ["Address", "ReplyError", "RespPipe", "open_pipe", "pack", "pipe_address"]
