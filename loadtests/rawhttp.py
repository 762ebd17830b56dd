"""A lean HTTP/1.1 load client for latency benchmarks that must run their client in Python.

The benchmarks share the machine's two cores with the engine they measure, so the client's
own CPU is taken from the server and its event loop's backlog is counted as latency. An
httpx request costs about 1.6-3 ms of CPU (headers built and parsed, the body read through
several layers); here a request is one pre-encoded ``bytes`` written on a kept-alive
connection and its answer read by ``Content-Length``: about 0.5 ms (CPU per process, read
from ``/proc``). Only what a benchmark needs: POST of one fixed body, answers with a
``Content-Length`` (anything else raises).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

import msgspec


class Post:
    """``POST path`` with ``body`` (JSON) and ``headers``, to the server at ``base``, over
    kept-alive connections (a pool that grows as requests overlap)."""

    def __init__(self, base: str, path: str, body: Any, headers: dict[str, str]) -> None:
        u = urlsplit(base)
        if u.scheme != "http" or u.hostname is None or u.port is None:
            raise ValueError(f"{base!r}: an http://host:port address is needed")
        self.host, self.port = u.hostname, u.port
        payload = msgspec.json.encode(body)
        head = "".join(
            [f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n",
             "Content-Type: application/json\r\n",
             *(f"{k}: {v}\r\n" for k, v in headers.items()),
             f"Content-Length: {len(payload)}\r\n\r\n"]
        )
        self.request = head.encode("latin-1") + payload
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open(self, n: int) -> None:
        """Open ``n`` connections ahead (not timed), each used once."""
        conns = [await asyncio.open_connection(self.host, self.port) for _ in range(n)]
        self._idle.extend(conns)
        await asyncio.gather(*(self.send() for _ in range(n)))

    async def send(self) -> tuple[int, bytes]:
        """One request: its status and body. A kept-alive connection the server closed
        while it was idle is replaced once."""
        reused = bool(self._idle)
        conn = self._idle.pop() if reused else await asyncio.open_connection(self.host, self.port)
        reader, writer = conn
        writer.write(self.request)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            writer.close()
            if not reused or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                raise
            conn = await asyncio.open_connection(self.host, self.port)
            reader, writer = conn
            writer.write(self.request)
            head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        at = head.lower().find(b"\r\ncontent-length:")
        if at < 0:
            writer.close()
            raise RuntimeError(f"an answer without Content-Length: {head[:200]!r}")
        length = int(head[at + 17 : head.index(b"\r\n", at + 2)])
        body = await reader.readexactly(length)
        self._idle.append(conn)
        return status, body

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def closed_loop(
    base: str, path: str, body: Any, headers: dict[str, str], clients: int, seconds: float,
    want: int = 200,
) -> tuple[list[float], float, int]:
    """``clients`` loops posting ``body`` for ``seconds``: latencies (ms), elapsed s, and
    answers whose status was not ``want``."""
    post = Post(base, path, body, headers)
    await post.open(clients)
    lat: list[float] = []
    bad = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def loop() -> None:
        nonlocal bad
        while time.perf_counter() < deadline:
            s = time.perf_counter()
            status, _ = await post.send()
            lat.append((time.perf_counter() - s) * 1000)
            bad += status != want

    try:
        await asyncio.gather(*(loop() for _ in range(clients)))
        return lat, time.perf_counter() - t0, bad
    finally:
        post.close()


async def open_loop(
    base: str, path: str, body: Any, headers: dict[str, str], rate: float, seconds: float,
    rng: random.Random, want: int = 200,
) -> tuple[list[float], int]:
    """Requests arriving at ``rate`` per second (Poisson) for ``seconds``, each sent at its
    arrival whatever the others are doing: latencies (ms, from the arrival, so a request
    that waited on the client's own backlog counts that wait), answers not ``want``."""
    post = Post(base, path, body, headers)
    await post.open(8)
    lat: list[float] = []
    bad = 0

    async def one(at: float) -> None:
        nonlocal bad
        status, _ = await post.send()
        lat.append((time.perf_counter() - at) * 1000)
        bad += status != want

    try:
        await poisson(rate, seconds, rng, one)
        return lat, bad
    finally:
        post.close()


async def poisson(
    rate: float, seconds: float, rng: random.Random, start: Callable[[float], Coroutine[Any, Any, None]]
) -> None:
    """``start(at)`` at each arrival of a Poisson process of ``rate`` per second for
    ``seconds`` (``at``: its ``perf_counter`` time), whatever the earlier ones are doing;
    returns when every one has finished."""
    t0 = time.perf_counter()
    at, tasks = t0, list[asyncio.Task[None]]()
    while at < t0 + seconds:
        at += rng.expovariate(rate)
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(start(at)))
    await asyncio.gather(*tasks)
