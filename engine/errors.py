"""The one exception hierarchy of the engine.

Every error has a stable snake_case ``code``; ``serve/`` maps codes to HTTP problem
responses (RFC 9457). Errors cross actor boundaries as ``(code, message)`` pairs and are
rebuilt with :func:`from_code`, so callers can ``except`` the same classes everywhere.
"""

from __future__ import annotations

import functools


class VoucherError(Exception):
    """Base of every error the engine raises on purpose."""

    code: str = "voucher_error"
    #: the answer only means "not now": a retry with the same request may succeed, so an
    #: idempotency key never stores it (the operation did not really run)
    transient: bool = False

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)

    def __reduce__(self) -> tuple[type[VoucherError], tuple[str]]:
        return (type(self), (self.message,))


class ConfigError(VoucherError):
    """A setting has a value the engine cannot run with."""

    code = "config_error"


# --- bad input -------------------------------------------------------------------------


class InvalidInput(VoucherError):
    """The request itself is malformed (negative amount, unknown field value...)."""

    code = "invalid_input"


class InfeasibleGeneration(InvalidInput):
    """The requested codes cannot be generated safely from the configured code space."""

    code = "infeasible_generation"


class CapacityExceeded(InvalidInput):
    """The codes asked for would not fit in the shards' memory (every code lives in its
    shard's memory, about 100 bytes each): fewer, more shards, or a higher per-shard cap."""

    code = "capacity_exceeded"


class MalformedCode(InvalidInput):
    """The code is not well-formed for its campaign (wrong length, charset, check char)."""

    code = "malformed_code"


class UnsupportedMediaType(InvalidInput):
    """The request body has a content type this endpoint does not read."""

    code = "unsupported_media_type"


class InternalAddress(InvalidInput):
    """An outgoing URL names, or resolves to, an internal address (loopback, private,
    link-local, metadata...) that no allow-list entry names."""

    code = "internal_address"


class CurrencyMismatch(InvalidInput):
    """The order's currency differs from the campaign's."""

    code = "currency_mismatch"


# --- lookups ---------------------------------------------------------------------------


class NotFound(VoucherError):
    """Base for lookups that found nothing."""

    code = "not_found"


class UnknownCampaign(NotFound):
    """No campaign has this id."""

    code = "unknown_campaign"


class UnknownCode(NotFound):
    """No voucher has this code."""

    code = "unknown_code"


class UnknownRedemption(NotFound):
    """No redemption has this id."""

    code = "unknown_redemption"


class UnknownReservation(NotFound):
    """No reservation has this id."""

    code = "unknown_reservation"


class UnknownJob(NotFound):
    """No generation job has this id."""

    code = "unknown_job"


# --- conflicts -------------------------------------------------------------------------


class Conflict(VoucherError):
    """The request is valid but conflicts with the current state."""

    code = "conflict"


class DuplicateCampaign(Conflict):
    """A campaign with this id or shared code already exists."""

    code = "duplicate_campaign"


class IdempotencyConflict(Conflict):
    """The idempotency key was used before with a different request body."""

    code = "idempotency_conflict"


class IdempotencyInProgress(Conflict):
    """Another request with this idempotency key and body is being decided right now
    (on this shard or another): retry shortly to get its answer."""

    code = "idempotency_in_progress"
    transient = True


class AlreadyRolledBack(Conflict):
    """The redemption was rolled back already."""

    code = "already_rolled_back"


class ReservationClosed(Conflict):
    """The reservation was confirmed, released or expired already."""

    code = "reservation_closed"


class BankExhausted(Conflict):
    """No available code is left in the campaign's voucher bank."""

    code = "bank_exhausted"


class AlreadyAssigned(Conflict):
    """The code is assigned to another customer."""

    code = "already_assigned"


# --- lifecycle: one error per illegal move ---------------------------------------------


class IllegalTransition(Conflict):
    """A campaign lifecycle move that the state machine does not allow."""

    code = "illegal_transition"


class CannotActivateEnded(IllegalTransition):
    """``activate`` on an ended campaign: ending is final."""

    code = "cannot_activate_ended"


class CannotPauseDraft(IllegalTransition):
    """``pause`` on a draft: only an active campaign can pause."""

    code = "cannot_pause_draft"


class CannotPauseEnded(IllegalTransition):
    """``pause`` on an ended campaign."""

    code = "cannot_pause_ended"


class CannotIssueEnded(IllegalTransition):
    """Codes cannot be issued for an ended campaign."""

    code = "cannot_issue_ended"


class CannotGenerateEnded(IllegalTransition):
    """Generating codes into an ended campaign."""

    code = "cannot_generate_ended"


# --- why a code is not valid now (validation answers) ----------------------------------


class NotRedeemable(VoucherError):
    """Base for the reasons a well-formed, known code cannot be redeemed now."""

    code = "not_redeemable"


class CampaignNotStarted(NotRedeemable):
    """The campaign's start time has not come yet."""

    code = "not_started"
    transient = True


class CampaignExpired(NotRedeemable):
    """The campaign's end time has passed."""

    code = "expired"


class CampaignNotActive(NotRedeemable):
    """The campaign is a draft: not activated yet."""

    code = "campaign_not_active"
    transient = True


class CampaignPaused(NotRedeemable):
    """The campaign is paused."""

    code = "campaign_paused"
    transient = True


class CampaignEnded(NotRedeemable):
    """The campaign was ended; its unredeemed codes are void."""

    code = "campaign_ended"


class OutsideSaleWindow(NotRedeemable):
    """A flash sale outside its recurring window (days of week / hours)."""

    code = "outside_window"
    transient = True


class Exhausted(NotRedeemable):
    """The campaign's global limit (or the gift card balance) is used up."""

    code = "exhausted"


class CustomerLimitReached(NotRedeemable):
    """This customer has used the per-customer limit."""

    code = "customer_limit_reached"


class WrongCustomer(NotRedeemable):
    """The code is assigned to another customer."""

    code = "wrong_customer"


class OrderTooSmall(NotRedeemable):
    """The order amount is below the campaign's minimum."""

    code = "order_too_small"


class AlreadyRedeemed(NotRedeemable):
    """The single-use code was redeemed already."""

    code = "already_redeemed"


class CodeVoid(NotRedeemable):
    """The code was voided."""

    code = "code_void"


class CodeReserved(NotRedeemable):
    """The code is held by an open reservation."""

    code = "code_reserved"
    transient = True


# --- infrastructure --------------------------------------------------------------------


class Unavailable(VoucherError):
    """The engine cannot answer now (a shard is recovering, the database is down)."""

    code = "unavailable"
    transient = True


class Fenced(Unavailable):
    """A newer owner took over this writer's part (its epoch is stale): the old one stops
    answering and exits; a retry reaches the new owner."""

    code = "fenced"


class ClaimLost(Fenced):
    """The database holds an older epoch than this writer's, or none: it went back in time
    (a failover to a standby that missed commits, a restore). The writer is not stale but
    its memory may hold what the server lost: it claims and loads again."""

    code = "claim_lost"


class NotOwner(Unavailable):
    """The shard asked does not own the code's bucket (the shard count changed): retry,
    the caller re-reads the topology."""

    code = "not_owner"


class TopologyMismatch(Conflict):
    """The configured shard count differs from the one stored for this deployment."""

    code = "topology_mismatch"


def _all_subclasses(cls: type[VoucherError]) -> list[type[VoucherError]]:
    out: list[type[VoucherError]] = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


def registry() -> dict[str, type[VoucherError]]:
    """Every error class by its code (where subclasses share one, the last defined).
    Classes with a base outside this tree are left out: Ray derives one per remote failure
    (``RayTaskError(Unavailable)``), which must never be what a code rebuilds."""
    return {
        c.code: c
        for c in _all_subclasses(VoucherError)
        if c is VoucherError or all(issubclass(b, VoucherError) for b in c.__bases__)
    }


@functools.cache
def is_transient(code: str) -> bool:
    """Whether the error with this code only means "not now" (see ``VoucherError.transient``)."""
    cls = registry().get(code)
    return cls is not None and cls.transient


def from_code(code: str, message: str) -> VoucherError:
    """Rebuild an error that crossed a process boundary as ``(code, message)``."""
    cls = registry().get(code, VoucherError)
    return cls(message)
