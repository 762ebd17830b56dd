"""A code's own switch and window: what a shop's change to one code makes of its
:class:`engine.events.Control`, and whether that control lets the code be used now.

Pure: the owner shard (:meth:`engine.shard_state.ShardState.control`) applies the result to
its memory and records the change as a ``VoucherControlled`` event.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from engine import errors, metadata
from engine.events import Control

FIELDS = frozenset({"active", "starts_at", "expires_at", "metadata"})


@dataclass(frozen=True)
class ControlChange:
    """A validated change: the new control, what changed (``[before, after]`` per field, as
    JSON), and the metadata when the change sets it (``metadata_set``; ``None`` clears)."""

    control: Control
    change: dict[str, Any]
    metadata_set: bool
    metadata_text: str | None


def change_control(old: Control, changes: dict[str, Any]) -> ControlChange:
    """``changes`` (``active``, ``starts_at``, ``expires_at``: ``None`` clears the code's own
    bound; ``metadata``) applied to ``old``; fields absent stay. InvalidInput says why a
    change cannot be made."""
    unknown = set(changes) - FIELDS
    if unknown:
        raise errors.InvalidInput(f"unknown field(s): {', '.join(sorted(unknown))}")
    active = changes.get("active", old.active)
    if not isinstance(active, bool):
        raise errors.InvalidInput("active must be true or false")
    starts = changes.get("starts_at", old.starts_at)
    expires = changes.get("expires_at", old.expires_at)
    for name, value in (("starts_at", starts), ("expires_at", expires)):
        if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
            raise errors.InvalidInput(f"{name} must be a date-time with a time zone")
    if starts is not None and expires is not None and starts >= expires:
        raise errors.InvalidInput("starts_at must be before expires_at")
    meta_set = "metadata" in changes
    meta_text: str | None = None
    if meta_set and changes["metadata"] is not None:
        meta_text = metadata.encoded(metadata.check(changes["metadata"]))
    new = Control(active, starts, expires)
    change: dict[str, Any] = {}
    for name in ("active", "starts_at", "expires_at"):
        before, after = getattr(old, name), getattr(new, name)
        if before != after:
            change[name] = [_json_value(before), _json_value(after)]
    if meta_set:
        change["metadata"] = [None, changes["metadata"]]
    return ControlChange(new, change, meta_set, meta_text)


def check_control(code: str, ctl: Control, now: datetime) -> None:
    """Raise why a code's own switch or window refuses it at ``now``."""
    if not ctl.active:
        raise errors.VoucherDisabled(f"code {code} is switched off")
    if ctl.starts_at is not None and now < ctl.starts_at:
        raise errors.VoucherNotStarted(f"code {code} is valid from {ctl.starts_at.isoformat()}")
    if ctl.expires_at is not None and now >= ctl.expires_at:
        raise errors.VoucherExpired(f"code {code} expired at {ctl.expires_at.isoformat()}")


def usable(ctl: Control, now: datetime) -> bool:
    """Whether a code with ``ctl`` may still be handed to a customer (on, not expired)."""
    return ctl.active and (ctl.expires_at is None or now < ctl.expires_at)


def _json_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value
