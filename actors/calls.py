"""How engine errors cross the actor boundary.

An actor method never lets an engine error escape as a Ray task error (that would carry a
remote traceback to the caller); :func:`guarded` turns it into a :class:`Failure` value
and :func:`call` raises the same typed error again on the caller's side.
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import msgspec
import ray

from engine import errors

P = ParamSpec("P")
R = TypeVar("R")


class Failure(msgspec.Struct, frozen=True):
    code: str
    message: str


def guarded(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R | Failure]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | Failure:
        try:
            return await fn(*args, **kwargs)
        except errors.VoucherError as exc:
            return Failure(exc.code, exc.message)

    return wrapper


async def call(ref: Any) -> Any:
    """Await a Ray call; an engine error comes back as itself, an unreachable or crashed
    actor as :class:`errors.Unavailable` (safe to retry with the same idempotency keys)."""
    try:
        result = await ref
    except Exception as exc:
        raise _unavailable(exc) from None
    return unwrap(result)


def settled(fut: concurrent.futures.Future[Any]) -> Any:
    """:func:`call` for a finished ``ObjectRef.future()``: its result, or the same error
    :func:`call` would raise."""
    try:
        result = fut.result(timeout=0)
    except Exception as exc:
        raise _unavailable(exc) from None
    return unwrap(result)


def unwrap(result: Any) -> Any:
    """An actor method's answer: its value, or the engine error a returned
    :class:`Failure` stands for, raised."""
    if isinstance(result, Failure):
        raise errors.rebuild(result)
    return result


def _unavailable(exc: Exception) -> Exception:
    if isinstance(exc, ray.exceptions.RayActorError | ray.exceptions.ActorUnavailableError):
        return errors.Unavailable(f"actor unavailable, retry: {exc.__class__.__name__}")
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, errors.VoucherError):  # an unguarded method's engine error
            return errors.rebuild(cause)
        return errors.Unavailable(f"actor call failed: {exc.__class__.__name__}")
    return exc
