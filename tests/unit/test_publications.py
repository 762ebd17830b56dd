"""Which campaigns publish, and where a published code's messages go (engine/publications.py)."""

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from engine import errors
from engine.campaigns import Campaign
from engine.customers import Customer, validate
from engine.publications import (
    SKIPPED_NO_ADDRESS,
    SKIPPED_NO_CONSENT,
    Target,
    check_publishable,
    plan_deliveries,
    unique_channels,
)

NOW = datetime(2026, 12, 3, 6, 0, tzinfo=UTC)


def campaign(**kw: object) -> Campaign:
    return msgspec.convert({"id": "c1", "name": "c", "type": "discount", "currency": "EUR", **kw}, Campaign)


@pytest.mark.parametrize(
    ("state", "error"),
    [("draft", errors.CampaignNotActive), ("paused", errors.CampaignPaused), ("ended", errors.CannotIssueEnded)],
)
def test_only_active_campaigns_publish(state: str, error: type[errors.VoucherError]) -> None:
    with pytest.raises(error) as info:
        check_publishable(campaign(state=state), NOW)
    assert "c1" in info.value.message
    check_publishable(campaign(state="active"), NOW)


def test_an_expired_campaign_refuses_and_one_not_started_publishes() -> None:
    with pytest.raises(errors.CannotIssueEnded):
        check_publishable(campaign(state="active", ends_at=NOW), NOW)
    check_publishable(campaign(state="active", starts_at=NOW + timedelta(days=1)), NOW)


def test_channels_once_each_in_order() -> None:
    assert unique_channels(["sms", "email", "sms"]) == ("sms", "email")
    with pytest.raises(errors.InvalidInput):
        unique_channels(["fax"])


def test_deliveries_go_where_the_customer_consented() -> None:
    c = Customer(id="k1", email="a@shop.example", consent_email=True, phone="+4915112345678")
    assert plan_deliveries(c, ["email", "sms", "push", "email"]) == [
        Target("email", "a@shop.example"),
        Target("sms", None, SKIPPED_NO_CONSENT),
        Target("push", None, SKIPPED_NO_ADDRESS),
    ]
    assert plan_deliveries(c, []) == []


def test_customer_metadata_is_validated_from_json_and_csv_text() -> None:
    ok = validate({"id": "k1", "metadata": {"tier": "gold"}})
    assert isinstance(ok, Customer) and ok.metadata == '{"tier":"gold"}'
    ok = validate({"id": "k1", "metadata": '{"tier": 3}'})
    assert isinstance(ok, Customer) and ok.metadata == '{"tier":3}'
    assert isinstance(validate({"id": "k1", "metadata": ""}), Customer)
    for bad in ("[1]", "{nope", {"": 1}, "[" * 5000):
        problems = validate({"id": "k1", "metadata": bad})
        assert isinstance(problems, list) and problems[0].field == "metadata", bad
