"""Loading an actor's state without ever keeping a failed start as the answer.

An actor loads from Postgres on its first call. If that load fails (the database is away),
the next call tries again from a clean slate instead of re-raising the first failure for
the life of the process; callers arriving during one attempt share it, and a failure
reaches them as :class:`engine.errors.Unavailable` (503, retry).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from engine import errors

log = logging.getLogger(__name__)


class Startup:
    def __init__(
        self,
        name: str,
        load: Callable[[], Awaitable[None]],
        reset: Callable[[], Awaitable[None]],
    ) -> None:
        """``load`` fills the actor's state; ``reset`` undoes what a failed ``load`` left
        (half-filled memory, an open pool) before the next attempt."""
        self.name = name
        self._load = load
        self._reset = reset
        self._attempt: asyncio.Future[None] | None = None
        self.loaded = False

    async def __call__(self) -> None:
        if self.loaded:
            return
        if self._attempt is None:
            self._attempt = asyncio.ensure_future(self._run())
        try:
            await asyncio.shield(self._attempt)
        except errors.VoucherError:
            raise
        except Exception as exc:
            raise errors.Unavailable(
                f"{self.name} cannot load yet ({type(exc).__name__}: {exc}); retry"
            ) from None

    async def _run(self) -> None:
        try:
            await self._load()
        except BaseException as exc:
            log.warning("%s load failed: %r; the next call retries", self.name, exc)
            try:
                await self._reset()
            finally:
                self._attempt = None
            raise
        self.loaded = True
