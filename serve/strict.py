"""The base of every request model at the HTTP edge: strict JSON types, unknown fields
refused, and only text Postgres can store.

Request models are strict: a field the schema calls an integer takes a JSON integer (``3``
or ``3.0``), not ``1.5``, ``"3"`` or ``true``, and a boolean takes ``true``/``false``, not
``0``, so what the API accepts is what its OpenAPI document says. Every string of a request -- body
fields, path and query parameters, the idempotency key -- must be text Postgres can store:
no NUL character and no unpaired surrogate (a JSON ``"\\ud800"``). Postgres refuses both
when it writes them, which would fail a whole group commit instead of one request, so they
are refused here, as a 422 naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StringConstraints,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from engine import errors, metadata

# --- text Postgres can store -----------------------------------------------------------

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
UNSTORABLE_TEXT = "unstorable_text"
UNSTORABLE_MSG = "text must not contain NUL (U+0000) or unpaired surrogate characters"
# The largest value of a Postgres bigint: every integer path or query parameter is bounded
# by it, so none can overflow a query (a 422 instead of a 500).
MAX_INT64 = 2**63 - 1


def unstorable(value: Any) -> bool:
    """Whether ``value`` (a string, or a list/dict of them, keys included) holds a
    character Postgres cannot store in a text or jsonb column."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _UNSTORABLE.search(item):
                return True
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
    return False


def storable(value: Any) -> Any:
    """``value`` itself, or a validation error when it holds unstorable text."""
    if unstorable(value):
        raise PydanticCustomError(UNSTORABLE_TEXT, UNSTORABLE_MSG)
    return value


def _iso_datetime(value: Any) -> Any:
    # Lax pydantic reads a number (or "0.5") as a Unix time; the schema says an ISO 8601
    # date-time string, so that is what is accepted.
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise PydanticCustomError("datetime_type", "Input should be an ISO 8601 date-time string")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise PydanticCustomError(
            "datetime_from_date_parsing", "Input should be an ISO 8601 date-time, e.g. 2030-01-31T12:00:00Z"
        ) from None


IsoDateTime = Annotated[datetime, BeforeValidator(_iso_datetime)]


def _metadata(value: Any) -> Any:
    try:
        return metadata.check(value)
    except errors.InvalidMetadata as exc:
        raise PydanticCustomError("invalid_metadata", exc.message) from None


MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=metadata.MAX_KEY_LEN)]
Metadata = Annotated[dict[MetadataKey, Any], AfterValidator(_metadata)]
"""A shop's own JSON object (engine.metadata: keys of 1 to 64 characters; at most 4 KB as
compact JSON and 8 levels deep, which JSON Schema cannot say: ``invalid_metadata``)."""


# The one header whose value is stored (scoped, with the redemption it keys).
_STORED_HEADERS = ("idempotency-key",)


def unstorable_params(
    path: Mapping[str, Any], query: Any, headers: Mapping[str, str]
) -> list[dict[str, Any]]:
    """Validation errors (pydantic's shape) for every path parameter, query parameter and
    stored header that holds unstorable text; ``query`` is a multi-dict (``multi_items``)."""
    found: list[dict[str, Any]] = []
    for name, value in path.items():
        if unstorable(value):
            found.append({"loc": ("path", name), "msg": UNSTORABLE_MSG, "type": UNSTORABLE_TEXT})
    for name, value in query.multi_items():
        if unstorable(name) or unstorable(value):
            found.append({"loc": ("query", name), "msg": UNSTORABLE_MSG, "type": UNSTORABLE_TEXT})
    for name in _STORED_HEADERS:
        value = headers.get(name)
        if value is not None and unstorable(value):
            found.append({"loc": ("header", name), "msg": UNSTORABLE_MSG, "type": UNSTORABLE_TEXT})
    return found


def _json_integers(value: Any) -> Any:
    """JSON Schema's integer is any number without a fraction: ``3.0`` is the integer 3
    (``1.5`` stays a float, refused where an integer is expected)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_json_integers(v) for v in value]
    return value


class Strict(BaseModel):
    """The base of every request model: unknown fields, values of the wrong JSON type and
    unstorable text are all refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _integers(cls, value: Any) -> Any:
        return _json_integers(value)

    @field_validator("*", mode="after")
    @classmethod
    def _storable(cls, value: Any, info: ValidationInfo) -> Any:
        return storable(value)
