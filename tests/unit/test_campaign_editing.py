"""Editing a campaign (engine.campaigns.edit): which changes are safe in which state, limits
never below what is used, the diff an edit reports, and the metadata filter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from engine import errors
from engine.campaigns import (
    Campaign,
    Discount,
    Limits,
    Usage,
    Window,
    edit,
    has_metadata,
    new_campaign,
    supersedes,
    transition,
)

NOW = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(days=30)


def make(state: str = "draft", **overrides: Any) -> Campaign:
    kw: dict[str, Any] = dict(
        id="c1", name="ten percent", type="discount", currency="EUR", now=NOW,
        discount=Discount("percent", 10), ends_at=LATER,
    )
    kw.update(overrides)
    c = new_campaign(**kw)
    if state in ("active", "paused", "ended"):
        c = transition(c, "activate", NOW)
    if state in ("paused", "ended"):
        c = transition(c, "pause" if state == "paused" else "end", NOW)
    return c


def shared(state: str = "active", **kw: Any) -> Campaign:
    return make(state, type="shared_code", shared_code="SPRING", **kw)


def test_each_editable_field_changes_and_the_version_moves_on() -> None:
    c = make("active", limits=Limits(total=100))
    cases: dict[str, Any] = {
        "name": "renamed",
        "ends_at": LATER + timedelta(days=1),
        "min_order": 500,
        "discount": Discount("amount", 300, None),
        "limits": {"total": 200},
        "metadata": {"channel": "print", "n": 1},
    }
    for field, value in cases.items():
        out, diff = edit(c, {field: value}, NOW + timedelta(minutes=1), Usage(codes=50))
        assert out.version == c.version + 1
        assert out.updated_at == NOW + timedelta(minutes=1)
        assert list(diff) == [field]
        assert diff[field][0] != diff[field][1]
    out, _ = edit(c, {"discount": {"kind": "amount", "value": 300}}, NOW)
    assert out.discount == Discount("amount", 300)
    assert out.state == "active" and out.id == c.id and out.type == c.type


def test_diff_is_json_before_and_after() -> None:
    c = make()
    _, diff = edit(c, {"name": "x", "limits": {"per_customer": 2}}, NOW, Usage())
    assert diff == {
        "name": ["ten percent", "x"],
        "limits": [{"total": None, "per_customer": None}, {"total": None, "per_customer": 2}],
    }


def test_a_change_to_the_same_values_changes_nothing() -> None:
    c = make(metadata={"a": 1})
    out, diff = edit(c, {"name": c.name, "metadata": {"a": 1}, "ends_at": c.ends_at}, NOW)
    assert out is c and diff == {}


def test_an_ended_campaign_cannot_change() -> None:
    with pytest.raises(errors.CannotEditEnded):
        edit(make("ended"), {"name": "again"}, NOW)
    assert issubclass(errors.CannotEditEnded, errors.Conflict)


def test_immutable_or_unknown_fields_and_empty_changes_are_refused() -> None:
    c = make()
    for field in ("type", "currency", "shared_code", "timezone", "state", "version"):
        with pytest.raises(errors.InvalidInput, match="cannot be changed"):
            edit(c, {field: "x"}, NOW)
    with pytest.raises(errors.InvalidInput, match="nothing to change"):
        edit(c, {}, NOW)


def test_starts_at_moves_in_a_draft_and_before_the_start_only() -> None:
    start = NOW + timedelta(days=1)
    draft = make(starts_at=start)
    out, _ = edit(draft, {"starts_at": NOW + timedelta(days=2)}, NOW)
    assert out.starts_at == NOW + timedelta(days=2)
    # active but not started yet: it may still move
    scheduled = make("active", starts_at=start)
    out, _ = edit(scheduled, {"starts_at": NOW + timedelta(hours=2)}, NOW)
    assert out.starts_at == NOW + timedelta(hours=2)
    # selling: it stays
    for state in ("active", "paused"):
        with pytest.raises(errors.StartAlreadyPassed):
            edit(make(state, starts_at=start), {"starts_at": NOW}, start + timedelta(hours=1))
        with pytest.raises(errors.StartAlreadyPassed):
            edit(make(state), {"starts_at": NOW + timedelta(days=3)}, NOW)
    # the same value again is no move
    running = make("active", starts_at=NOW - timedelta(days=1))
    out, diff = edit(running, {"starts_at": NOW - timedelta(days=1), "name": "n"}, NOW)
    assert list(diff) == ["name"]


def test_ends_at_may_close_the_campaign_but_stays_after_the_start() -> None:
    c = make("active", starts_at=NOW - timedelta(days=1))
    out, _ = edit(c, {"ends_at": NOW - timedelta(hours=1)}, NOW)
    assert out.ends_at == NOW - timedelta(hours=1)
    with pytest.raises(errors.InvalidInput, match="after starts_at"):
        edit(c, {"ends_at": NOW - timedelta(days=2)}, NOW)
    out, _ = edit(c, {"ends_at": None}, NOW)
    assert out.ends_at is None
    with pytest.raises(errors.InvalidInput, match="time zone"):
        edit(c, {"ends_at": datetime(2030, 1, 1)}, NOW)
    with pytest.raises(errors.InvalidInput, match="date-time"):
        edit(c, {"ends_at": "tomorrow"}, NOW)


def test_total_of_unique_codes_never_below_the_codes_in_circulation() -> None:
    c = make("active", limits=Limits(total=1000))
    with pytest.raises(errors.LimitBelowUsage, match="400 codes"):
        edit(c, {"limits": {"total": 399}}, NOW, Usage(codes=400))
    out, _ = edit(c, {"limits": {"total": 400}}, NOW, Usage(codes=400))
    assert out.limits.total == 400
    # raising, or removing, needs no usage at all
    out, _ = edit(c, {"limits": {"total": 5000}}, NOW)
    assert out.limits.total == 5000
    out, _ = edit(c, {"limits": {"total": None}}, NOW)
    assert out.limits == Limits()
    # setting a limit where there was none is lowering it from infinity
    with pytest.raises(errors.LimitBelowUsage):
        edit(make(), {"limits": {"total": 1}}, NOW, Usage(codes=2))
    with pytest.raises(ValueError):
        edit(c, {"limits": {"total": 10}}, NOW)


def test_shared_code_limits_count_redemptions_and_one_customers_use() -> None:
    c = shared(limits=Limits(total=100, per_customer=5))
    used = Usage(redemptions=40, per_customer=3)
    with pytest.raises(errors.LimitBelowUsage, match="40 redemptions"):
        edit(c, {"limits": {"total": 39}}, NOW, used)
    with pytest.raises(errors.LimitBelowUsage, match="one customer"):
        edit(c, {"limits": {"per_customer": 2}}, NOW, used)
    out, _ = edit(c, {"limits": {"per_customer": 3}}, NOW, used)
    assert out.limits == Limits(total=100, per_customer=3)  # total kept: limits merge


def test_bad_values_are_refused_like_at_creation() -> None:
    c = make("active")
    bad: list[dict[str, Any]] = [
        {"name": ""},
        {"name": "x" * 201},
        {"min_order": -1},
        {"min_order": None},
        {"discount": None},
        {"discount": {"kind": "percent", "value": 101}},
        {"discount": {"kind": "bogus", "value": 1}},
        {"limits": {"total": 0}},
        {"limits": {"bogus": 1}},
        {"limits": 5},
        {"windows": [{"days": [0], "start": "09:00", "end": "10:00"}]},
    ]
    for change in bad:
        with pytest.raises(errors.InvalidInput):
            edit(c, change, NOW, Usage())
    with pytest.raises(errors.InvalidInput, match="ends of the calendar"):
        edit(c, {"starts_at": datetime.fromisoformat("0001-01-01T00:00:00+05:00")}, NOW)
    with pytest.raises(errors.InvalidMetadata):
        edit(c, {"metadata": {"": 1}}, NOW)
    with pytest.raises(errors.InvalidMetadata):
        edit(c, {"metadata": {"k": "x" * 5000}}, NOW)


def test_gift_cards_have_no_discount() -> None:
    gift = make(type="gift_card", discount=None, gift_balance=5000)
    with pytest.raises(errors.InvalidInput, match="gift_balance"):
        edit(gift, {"discount": {"kind": "amount", "value": 1}}, NOW)


def test_flash_sale_keeps_its_quantity_and_its_dates_and_edits_its_windows() -> None:
    c = make(
        "active", type="flash_sale", shared_code="FLASH", limits=Limits(total=100),
        starts_at=NOW - timedelta(days=1),
    )
    with pytest.raises(errors.InvalidInput, match="limits.total"):
        edit(c, {"limits": {"total": None}}, NOW)
    with pytest.raises(errors.InvalidInput, match="starts_at and ends_at"):
        edit(c, {"ends_at": None}, NOW)
    out, diff = edit(c, {"windows": [{"days": [0, 1], "start": "22:00", "end": "02:00"}]}, NOW)
    assert out.windows == (Window((0, 1), "22:00", "02:00"),)
    assert diff["windows"][1] == [{"days": [0, 1], "start": "22:00", "end": "02:00"}]
    with pytest.raises(errors.InvalidInput, match="empty"):
        edit(c, {"windows": [{"days": [0], "start": "10:00", "end": "10:00"}]}, NOW)
    out, _ = edit(out, {"windows": []}, NOW)
    assert out.windows == ()


def test_an_edited_version_supersedes_its_replicas() -> None:
    c = make("active")
    out, _ = edit(c, {"name": "v3"}, NOW)
    assert supersedes(out, c) and not supersedes(c, out)


def test_metadata_set_on_creation_and_cleared_by_an_edit() -> None:
    c = make(metadata={"channel": "print"})
    assert c.metadata == {"channel": "print"}
    out, diff = edit(c, {"metadata": None}, NOW)
    assert out.metadata is None and diff == {"metadata": [{"channel": "print"}, None]}
    with pytest.raises(errors.InvalidMetadata):
        make(metadata=["not", "an", "object"])


def test_metadata_filter_matches_json_values() -> None:
    c = make(metadata={"channel": "print", "n": 1, "flag": True, "f": 1.0})
    assert has_metadata(c, {"channel": "print"})
    assert has_metadata(c, {"n": 1}) and has_metadata(c, {"f": 1})
    assert has_metadata(c, {"flag": True})
    assert not has_metadata(c, {"n": True}) and not has_metadata(c, {"flag": 1})
    assert not has_metadata(c, {"n": "1"})
    assert not has_metadata(c, {"channel": "web"}) and not has_metadata(c, {"other": "print"})
    assert not has_metadata(make(), {"channel": "print"})


def test_a_shards_limit_usage_counts_redemptions_and_holds_per_customer() -> None:
    import random

    from engine.shard_state import RedeemRequest, ShardState

    state = ShardState(clock=lambda: NOW, random_bytes=random.Random(1).randbytes)
    c = shared(limits=Limits(total=10, per_customer=5))
    state.put_campaign(c)
    assert state.limit_usage(c.id) == (0, 0)
    assert state.limit_usage("unknown") == (0, 0)
    for customer in ("a", "b", "b"):
        state.redeem(RedeemRequest("SPRING", 1000, "EUR", customer))
    state.reserve(RedeemRequest("SPRING", 1000, "EUR", "a"))
    state.reserve(RedeemRequest("SPRING", 1000, "EUR", "a"))
    assert state.limit_usage(c.id) == (5, 3)
