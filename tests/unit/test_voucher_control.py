"""A code's own switch, window and metadata, decided by its shard: refused on every path
(validation, reservation, redemption, confirmation, assignment) while off or outside its
window, persisted with its event and audit entry, and the same after a restart."""

from __future__ import annotations

from datetime import timedelta

import pytest

from engine import errors
from engine.audit import Actor
from engine.events import VoucherControlled
from tests.unit.test_pools import T0, Shop, discount_campaign, req, shared_campaign

ALICE = Actor("user", "usr_alice")
KEY = Actor("api_key", "usr_alice", "key_1")


@pytest.fixture
def shop() -> Shop:
    s = Shop()
    s.install(discount_campaign(), ["DISC-A", "DISC-B"])
    s.sync()
    return s


def _refusal(shop: Shop, code: str) -> set[str | None]:
    """The reason each path gives for ``code`` (None: it went through)."""
    reasons: set[str | None] = set()
    v = shop.state.validate(req(code))
    reasons.add(v.error)
    for out in (shop.state.reserve_one(req(code)), shop.state.redeem_one(req(code))):
        reasons.add(out.rejection.error if out.rejection else None)
    return reasons


def test_a_switched_off_code_is_refused_on_every_path_until_switched_on(shop: Shop) -> None:
    out = shop.state.control("disc-a", {"active": False}, ALICE)
    assert out["active"] is False and out["code"] == "DISC-A"
    assert _refusal(shop, "DISC-A") == {"voucher_disabled"}
    shop.state.control("DISC-A", {"active": True}, ALICE)
    assert shop.state.validate(req("DISC-A")).valid
    assert shop.state.redeem_one(req("DISC-A")).redemption is not None


def test_a_reservation_made_before_the_switch_cannot_be_confirmed_while_off(shop: Shop) -> None:
    held = shop.state.reserve_one(req("DISC-A")).reservation
    assert held is not None
    shop.state.control("DISC-A", {"active": False}, ALICE)
    out = shop.state.confirm_one(held.id)
    assert out.rejection is not None and out.rejection.error == "voucher_disabled"


def test_the_codes_own_window_narrows_its_campaigns(shop: Shop) -> None:
    shop.state.control(
        "DISC-A",
        {"starts_at": T0 + timedelta(days=1), "expires_at": T0 + timedelta(days=2)},
        ALICE,
    )
    assert _refusal(shop, "DISC-A") == {"voucher_not_started"}
    shop.clock.advance(days=2)
    assert _refusal(shop, "DISC-A") == {"voucher_expired"}
    shop.state.control("DISC-A", {"expires_at": None}, ALICE)
    assert shop.state.validate(req("DISC-A")).valid
    # the campaign's own end still holds
    shop.clock.advance(days=40)
    assert shop.state.validate(req("DISC-A")).error == "expired"


def test_a_switched_off_code_is_never_assigned(shop: Shop) -> None:
    shop.state.control("DISC-A", {"active": False}, ALICE)
    shop.state.control("DISC-B", {"active": False}, ALICE)
    assert shop.state.assign_one("disc", "cust-1").rejection.error == "bank_exhausted"  # type: ignore[union-attr]
    shop.state.control("DISC-B", {"active": True}, ALICE)
    a = shop.state.assign_one("disc", "cust-1").assignment
    assert a is not None and a.code == "DISC-B"


def test_a_shared_code_can_be_switched_off(shop: Shop) -> None:
    shop.install(shared_campaign())
    shop.state.control("SAVE5", {"active": False}, KEY)
    assert shop.state.validate(req("SAVE5", cust="c1")).error == "voucher_disabled"


def test_changes_are_checked_before_anything_changes(shop: Shop) -> None:
    shop.sync()
    bad = [
        ({"active": None}, errors.InvalidInput),
        ({"starts_at": T0 + timedelta(days=2), "expires_at": T0 + timedelta(days=1)}, errors.InvalidInput),
        ({"expires_at": T0.replace(tzinfo=None)}, errors.InvalidInput),
        ({"metadata": {"x": "y" * 5000}}, errors.InvalidMetadata),
        ({"metadata": ["not", "an", "object"]}, errors.InvalidMetadata),
        ({"colour": "red"}, errors.InvalidInput),
    ]
    for changes, exc in bad:
        with pytest.raises(exc):
            shop.state.control("DISC-A", changes, ALICE)
    with pytest.raises(errors.UnknownCode):
        shop.state.control("NOPE", {"active": False}, ALICE)
    assert shop.state.events == [] and shop.state.controls == {}


def test_a_change_is_persisted_with_its_event_and_audit_entry_and_survives_a_restart(
    shop: Shop,
) -> None:
    shop.state.control("DISC-A", {"active": False, "metadata": {"batch": "print-7"}}, KEY)
    shop.state.control("DISC-B", {"expires_at": T0 + timedelta(days=3)}, ALICE)
    events = shop.sync()
    changed = [e for e in events if isinstance(e, VoucherControlled)]
    assert [e.code for e in changed] == ["DISC-A", "DISC-B"]
    assert shop.db.metadata == {"DISC-A": '{"batch":"print-7"}'}
    assert [t for _, t in shop.db.events] == ["voucher.updated", "voucher.updated"]
    assert shop.db.audit == [(KEY, "voucher.update", "DISC-A"), (ALICE, "voucher.update", "DISC-B")]
    state = shop.restart()
    assert state.validate(req("DISC-A")).error == "voucher_disabled"
    assert state.voucher("DISC-B")["expires_at"] == T0 + timedelta(days=3)
    # switched back to the default: nothing of its own is kept
    state.control("DISC-A", {"active": True}, ALICE)
    shop.sync()
    assert "DISC-A" not in shop.db.controls
    assert shop.restart().validate(req("DISC-A")).valid


def test_the_change_records_before_and_after(shop: Shop) -> None:
    shop.state.control("DISC-A", {"active": False}, ALICE)
    (e,) = shop.state.drain()
    assert isinstance(e, VoucherControlled)
    assert e.change == '{"active":[true,false]}'
    assert e.event_id.startswith("evt_")
