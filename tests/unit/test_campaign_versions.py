"""Versioned campaign replicas: a shard applies only newer versions of a campaign, an ended
campaign stays ended whatever arrives later, and a repeated lifecycle move is answered
with the campaign as it is."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from engine import errors
from engine.campaigns import Campaign, Discount, new_campaign, supersedes, transition
from engine.events import AVAILABLE, VOID, CodesVoided
from engine.shard_state import RedeemRequest, ShardState

T0 = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)


def _campaign() -> Campaign:
    return new_campaign(
        id="c1",
        name="ten off",
        type="discount",
        currency="EUR",
        now=T0,
        discount=Discount("percent", 10),
    )


def _state() -> ShardState:
    return ShardState(clock=lambda: T0, random_bytes=random.Random(3).randbytes)


def _redeem(state: ShardState, code: str) -> str | None:
    """The rejection code of a redemption of ``code``, or None when it succeeds."""
    out = state.redeem_one(RedeemRequest(code=code, amount=1000, currency="EUR"))
    return None if out.rejection is None else out.rejection.error


def _lifecycle() -> tuple[Campaign, Campaign, Campaign, Campaign]:
    draft = _campaign()
    active = transition(draft, "activate", T0 + timedelta(minutes=1))
    paused = transition(active, "pause", T0 + timedelta(minutes=2))
    ended = transition(paused, "end", T0 + timedelta(minutes=3))
    return draft, active, paused, ended


def test_every_change_bumps_the_version() -> None:
    draft, active, paused, ended = _lifecycle()
    assert [c.version for c in (draft, active, paused, ended)] == [1, 2, 3, 4]


@pytest.mark.parametrize(("setup", "action"), [(1, "activate"), (2, "pause"), (3, "end")])
def test_a_repeated_move_answers_with_the_campaign_as_it_is(setup: int, action: str) -> None:
    current = _lifecycle()[setup]
    again = transition(current, action, T0 + timedelta(hours=1))
    assert again is current  # same version, same updated_at: nothing to persist


def test_put_campaign_ignores_older_and_equal_versions() -> None:
    _, active, paused, _ = _lifecycle()
    s = _state()
    assert s.put_campaign(active)
    s.admit_codes("c1", s.claim_new_codes(["AAAA1111"]))
    assert s.put_campaign(paused)
    # the broadcast of the activation arrives late, then a duplicate of the pause
    assert not s.put_campaign(active)
    assert not s.put_campaign(paused)
    assert s.campaign("c1") == paused
    assert _redeem(s, "AAAA1111") == "campaign_paused"


def test_ended_is_final_even_for_a_newer_version() -> None:
    _, active, _, ended = _lifecycle()
    s = _state()
    s.put_campaign(active)
    s.admit_codes("c1", s.claim_new_codes(["AAAA1111", "BBBB2222"]))
    assert s.put_campaign(ended)
    revived = msgspec.structs.replace(ended, state="active", version=ended.version + 5)
    assert not s.put_campaign(revived)
    assert s.campaign("c1").state == "ended"
    assert _redeem(s, "AAAA1111") == "campaign_ended"
    # a newer version that stays ended still applies
    renamed = msgspec.structs.replace(ended, name="renamed", version=ended.version + 1)
    assert s.put_campaign(renamed) and s.campaign("c1").name == "renamed"


def test_stale_active_after_ended_is_ignored() -> None:
    _, active, paused, ended = _lifecycle()
    s = _state()
    s.put_campaign(paused)
    s.admit_codes("c1", s.claim_new_codes(["AAAA1111"]))
    s.put_campaign(ended)
    s.drain()
    for stale in (active, paused):
        assert not s.put_campaign(stale)
    assert s.campaign("c1").state == "ended"
    assert _redeem(s, "AAAA1111") == "campaign_ended"
    assert s.stats("c1").void == 1


def test_codes_admitted_after_the_end_enter_void() -> None:
    _, active, _, ended = _lifecycle()
    s = _state()
    s.put_campaign(active)
    fresh = s.claim_new_codes(["AAAA1111", "BBBB2222"])  # persisted while the end arrives
    s.put_campaign(ended)
    s.drain()
    s.admit_codes("c1", fresh)
    assert s.drain() == [CodesVoided("c1")]  # their rows are voided by the next commit
    stats = s.stats("c1")
    assert (stats.available, stats.void) == (0, 2)
    assert s.codes["AAAA1111"] & 3 == VOID != AVAILABLE
    assert _redeem(s, "BBBB2222") == "campaign_ended"


def test_supersedes() -> None:
    draft, active, paused, ended = _lifecycle()
    assert supersedes(active, draft) and supersedes(ended, active)
    assert not supersedes(draft, active) and not supersedes(active, active)
    assert not supersedes(msgspec.structs.replace(paused, version=9), ended)


def test_illegal_moves_still_refused() -> None:
    _, _, _, ended = _lifecycle()
    with pytest.raises(errors.CannotActivateEnded):
        transition(ended, "activate", T0)
    with pytest.raises(errors.CannotPauseEnded):
        transition(ended, "pause", T0)
