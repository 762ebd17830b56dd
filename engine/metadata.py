"""Metadata: a shop's own JSON object on campaigns, vouchers, customers and redemptions.

At most :data:`MAX_BYTES` as compact UTF-8 JSON, an object at the top, string keys, no
more than :data:`MAX_DEPTH` levels. Lists filter by one key: ``metadata=key=value`` where
``value`` is read as JSON when it is a JSON scalar (``42``, ``true``, ``"x"``) and as a
string otherwise, and matches rows whose metadata holds that key with that value.
"""

from __future__ import annotations

import json
from typing import Any

from engine.errors import InvalidMetadata

MAX_BYTES = 4096
MAX_DEPTH = 8
MAX_KEY_LEN = 64


def _depth(value: Any, level: int = 1) -> int:
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level


def encoded(value: Any) -> str:
    """The compact JSON text of valid metadata (what is stored and measured)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def check(value: Any) -> dict[str, Any]:
    """``value`` when it is valid metadata, else :class:`InvalidMetadata` saying why."""
    if not isinstance(value, dict):
        raise InvalidMetadata("metadata must be a JSON object")
    for key in value:
        if not isinstance(key, str) or not key:
            raise InvalidMetadata("metadata keys must be non-empty strings")
        if len(key) > MAX_KEY_LEN:
            raise InvalidMetadata(f"metadata key {key[:20]!r}... is longer than {MAX_KEY_LEN} characters")
    try:
        size = len(encoded(value).encode())
    except (TypeError, ValueError) as exc:
        raise InvalidMetadata(f"metadata must be plain JSON: {exc}") from None
    if size > MAX_BYTES:
        raise InvalidMetadata(f"metadata is {size} bytes as compact JSON; at most {MAX_BYTES} are allowed")
    if _depth(value) > MAX_DEPTH:
        raise InvalidMetadata(f"metadata nests deeper than {MAX_DEPTH} levels")
    return value


def parse_filter(text: str) -> dict[str, Any]:
    """``key=value`` as the JSON object a row's metadata must contain (``@>`` in SQL)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise InvalidMetadata("a metadata filter is key=value, e.g. metadata=channel=print")
    if len(key) > MAX_KEY_LEN:
        raise InvalidMetadata(f"metadata key is longer than {MAX_KEY_LEN} characters")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    if isinstance(value, (dict, list)):
        value = raw
    return {key: value}
