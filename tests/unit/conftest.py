"""Unit tests are pure: no Ray, no database. Starting Ray here is a test failure."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

_RAY_AVAILABLE = importlib.util.find_spec("ray") is not None


@pytest.fixture(autouse=True)
def _forbid_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if not _RAY_AVAILABLE:
        yield
        return
    import ray

    def _refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a unit test started Ray; unit tests must not need it")

    monkeypatch.setattr(ray, "init", _refuse)
    yield
    assert not ray.is_initialized(), "Ray was started during a unit test"
