"""Stand-ins for Ray actor handles, for tests that drive actor cores in-process."""

from __future__ import annotations

from typing import Any


class RemoteMethod:
    """An actor method as its handle shows it: ``.remote(*args)`` calls ``fn`` with them and
    returns what it returns (a coroutine stands for the object ref the caller awaits)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return self.fn(*args)
