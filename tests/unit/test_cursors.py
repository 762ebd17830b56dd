"""Opaque list cursors: what a list hands out comes back as its key; anything else is
invalid_cursor (422), never an error of the database."""

from __future__ import annotations

import base64
import json

import pytest

from engine import cursors
from engine.errors import InvalidCursor


def _raw(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def test_round_trip() -> None:
    for key in ("A", "K2M9-X4PQ", "code with ünïcode", "x" * 256):
        c = cursors.encode("v", "cmp_1", key)
        assert set(c) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        assert cursors.decode(c, "v", "cmp_1") == key


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "garbage!",
        "eyJ4IjoxfQ",  # {"x":1}
        _raw(["v", "cmp_2", "A"]),  # another campaign's
        _raw(["r", "cmp_1", "A"]),  # another list's
        _raw(["v", "cmp_1", ""]),
        _raw(["v", "cmp_1", 7]),
        _raw(["v", "cmp_1", "x" * 257]),
        _raw(["v", "cmp_1", "a\x00b"]),
        _raw(["v", "cmp_1"]),
        base64.urlsafe_b64encode(b'["v","cmp_1","\\ud800"]').decode(),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        "A" * (cursors.MAX_CURSOR_LEN + 1),
    ],
)
def test_anything_else_is_invalid(cursor: str) -> None:
    with pytest.raises(InvalidCursor) as info:
        cursors.decode(cursor, "v", "cmp_1")
    assert info.value.code == "invalid_cursor"
