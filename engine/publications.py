"""Publications: one customer given a campaign's code on request. Pure: no I/O.

Which campaigns may publish (:func:`check_publishable`): an active one, before its end; a
campaign that has not started yet may already hand out codes (they are redeemable from its
start). Where the code's messages go (:func:`plan_deliveries`): per requested channel, to
the customer's address when they consented, else nowhere with the reason, so the answer
says why a channel was skipped; the code is given either way.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import msgspec

from engine import errors
from engine.campaigns import Campaign
from engine.customers import Customer
from engine.delivery import CHANNELS

SKIPPED_NO_ADDRESS = "skipped_no_address"
SKIPPED_NO_CONSENT = "skipped_no_consent"


class Target(msgspec.Struct, frozen=True):
    """One requested channel: the address a message goes to, or why none goes."""

    channel: str
    address: str | None
    skipped: str | None = None


def check_publishable(campaign: Campaign, now: datetime) -> None:
    """Raise the reason ``campaign`` cannot give a customer a code at ``now`` (409s):
    ``campaign_not_active`` (a draft), ``campaign_paused``, ``cannot_issue_ended`` (ended,
    or past its end)."""
    if campaign.state == "draft":
        raise errors.CampaignNotActive(
            f"campaign {campaign.id} is a draft; activate it before publishing codes"
        )
    if campaign.state == "paused":
        raise errors.CampaignPaused(f"campaign {campaign.id} is paused; resume it to publish codes")
    # an issuance's refusal (409): the campaign is not gone for good as a resource
    if campaign.state == "ended":
        raise errors.CannotIssueEnded(f"campaign {campaign.id} has ended; it publishes no codes")
    if campaign.ends_at is not None and now >= campaign.ends_at:
        raise errors.CannotIssueEnded(
            f"campaign {campaign.id} expired at {campaign.ends_at.isoformat()}; it publishes no codes"
        )


def unique_channels(channels: Iterable[str]) -> tuple[str, ...]:
    """The requested channels, each once, in the order first given."""
    out: list[str] = []
    for ch in channels:
        if ch not in CHANNELS:
            raise errors.InvalidInput(f"unknown channel {ch!r}; channels are {', '.join(CHANNELS)}")
        if ch not in out:
            out.append(ch)
    return tuple(out)


def plan_deliveries(customer: Customer, channels: Iterable[str]) -> list[Target]:
    """Per channel, the customer's address (with their consent) or the reason for none."""
    out = []
    for ch in unique_channels(channels):
        addr = customer.address(ch)
        if addr is None:
            out.append(Target(ch, None, SKIPPED_NO_ADDRESS))
        elif not customer.consents(ch):
            out.append(Target(ch, None, SKIPPED_NO_CONSENT))
        else:
            out.append(Target(ch, addr))
    return out
