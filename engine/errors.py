"""The one exception hierarchy of the engine.

Every error has a stable snake_case ``code``; ``serve/`` maps codes to HTTP problem
responses (RFC 9457). Errors cross actor boundaries as ``(code, message)`` pairs and are
rebuilt with :func:`from_code`, so callers can ``except`` the same classes everywhere.
Each class registers its code when it is defined, and a code taken twice fails the import
(:func:`registry`).

The tree (codes in parentheses; a transient error and its subclasses only mean "not now";
``serve/auth.py`` and ``serve/users.py`` add the authentication and account errors):

* VoucherError (``voucher_error``)
  * ConfigError (``config_error``)
  * InvalidInput (``invalid_input``)
    * InfeasibleGeneration (``infeasible_generation``)
    * CapacityExceeded (``capacity_exceeded``)
    * MalformedCode (``malformed_code``)
    * UnsupportedMediaType (``unsupported_media_type``)
    * InternalAddress (``internal_address``)
    * CurrencyMismatch (``currency_mismatch``)
    * UnknownCurrency (``unknown_currency``)
    * InvalidOrder (``invalid_order``)
      * OrderAmountMismatch (``order_amount_mismatch``)
    * InvalidRule (``invalid_rule``)
  * NotFound (``not_found``)
    * UnknownCampaign (``unknown_campaign``)
    * UnknownCode (``unknown_code``)
    * UnknownRedemption (``unknown_redemption``)
    * UnknownReservation (``unknown_reservation``)
    * UnknownJob (``unknown_job``)
  * Conflict (``conflict``)
    * DuplicateCampaign (``duplicate_campaign``)
    * IdempotencyConflict (``idempotency_conflict``)
    * IdempotencyInProgress (``idempotency_in_progress``, transient)
    * AlreadyRolledBack (``already_rolled_back``)
    * ReservationClosed (``reservation_closed``)
    * BankExhausted (``bank_exhausted``)
    * AlreadyAssigned (``already_assigned``)
    * IllegalTransition (``illegal_transition``)
      * CannotActivateEnded (``cannot_activate_ended``)
      * CannotPauseDraft (``cannot_pause_draft``)
      * CannotPauseEnded (``cannot_pause_ended``)
      * CannotIssueEnded (``cannot_issue_ended``)
      * CannotGenerateEnded (``cannot_generate_ended``)
    * TopologyMismatch (``topology_mismatch``)
    * UnsafeEdit (``unsafe_edit``)
      * CannotEditEnded (``cannot_edit_ended``)
      * LimitBelowUsage (``limit_below_usage``)
      * StartAlreadyPassed (``start_already_passed``)
    * VersionMismatch (``version_mismatch``, answered 412)
  * NotRedeemable (``not_redeemable``)
    * CampaignNotStarted (``not_started``, transient)
    * CampaignExpired (``expired``)
    * CampaignNotActive (``campaign_not_active``, transient)
    * CampaignPaused (``campaign_paused``, transient)
    * CampaignEnded (``campaign_ended``)
    * OutsideSaleWindow (``outside_window``, transient)
    * Exhausted (``exhausted``)
    * CustomerLimitReached (``customer_limit_reached``)
    * WrongCustomer (``wrong_customer``)
    * OrderTooSmall (``order_too_small``)
    * RuleNotMet (``rule_not_met``)
    * TagsNeeded (``customer_tags_needed``, transient)
    * AlreadyRedeemed (``already_redeemed``)
    * CodeVoid (``code_void``)
    * CodeReserved (``code_reserved``, transient)
  * Unavailable (``unavailable``, transient)
    * Fenced (``fenced``)
      * ClaimLost (``claim_lost``)
    * NotOwner (``not_owner``)
"""

from __future__ import annotations

from typing import Any

_REGISTRY: dict[str, type[VoucherError]] = {}


def _register(cls: type[VoucherError]) -> None:
    taken = _REGISTRY.get(cls.code)
    # The same class defined again (a module re-executed, a class pickled by value) is no
    # duplicate: it takes its own place.
    if taken is not None and _name(taken) != _name(cls):
        raise TypeError(
            f"error code {cls.code!r} of {_name(cls)} is taken by {_name(taken)}: give it its "
            "own code, or declare it with register=False if it only groups subclasses"
        )
    _REGISTRY[cls.code] = cls


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class VoucherError(Exception):
    """Base of every error the engine raises on purpose.

    A subclass is registered by its ``code`` when it is defined; a second class with a
    code already taken raises ``TypeError`` there. A base that only groups others (its
    code is a subclass's) says ``class Base(VoucherError, register=False)``.
    """

    code: str = "voucher_error"
    #: the answer only means "not now": a retry with the same request may succeed, so an
    #: idempotency key never stores it (the operation did not really run)
    transient: bool = False

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Ray derives a class per remote failure (``RayTaskError(Unavailable)``), which
        # must never be what a code rebuilds.
        if register and all(issubclass(b, VoucherError) for b in cls.__bases__):
            _register(cls)

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)

    def __reduce__(self) -> tuple[type[VoucherError], tuple[str]]:
        return (type(self), (self.message,))


_REGISTRY[VoucherError.code] = VoucherError


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


class InvalidMetadata(InvalidInput):
    """Metadata is not a JSON object of at most 4 KB (compact UTF-8), or a metadata filter
    is not ``key=value``."""

    code = "invalid_metadata"


class InvalidCursor(InvalidInput):
    """A list's ``cursor`` is not one this list handed out."""

    code = "invalid_cursor"


class CurrencyMismatch(InvalidInput):
    """The order's currency differs from the campaign's."""

    code = "currency_mismatch"


class UnknownCurrency(InvalidInput):
    """A currency that is not an ISO 4217 code."""

    code = "unknown_currency"


class InvalidOrder(InvalidInput):
    """An order's lines, shipping or amount are malformed (a negative price, a zero
    quantity, a subtotal out of range...)."""

    code = "invalid_order"


class OrderAmountMismatch(InvalidOrder):
    """An order gives both ``amount`` and items, and the amount is not their subtotal."""

    code = "order_amount_mismatch"


class InvalidRule(InvalidInput):
    """A campaign's rules or discount target cannot work: a condition that can never hold
    (a category both required and excluded, a minimum above the maximum), a kind that does
    not fit its target."""

    code = "invalid_rule"


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


class UnknownExport(NotFound):
    """No export has this id."""

    code = "unknown_export"


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


class ExportNotReady(Conflict):
    """The export is still running (or failed): there is nothing to download yet."""

    code = "export_not_ready"


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


class RuleNotMet(NotRedeemable):
    """The order or customer does not meet one of the campaign's rules; the message names
    the condition and what the order has ("needs 2 items in category shoes, the order
    has 1")."""

    code = "rule_not_met"


class TagsNeeded(NotRedeemable):
    """The campaign has customer rules and the request carries no customer tags: the
    gateway looks up the stored customer's and asks again (never answered to a client)."""

    code = "customer_tags_needed"
    transient = True


class AlreadyRedeemed(NotRedeemable):
    """The single-use code was redeemed already."""

    code = "already_redeemed"


class CodeVoid(NotRedeemable):
    """The code was voided."""

    code = "code_void"


class VoucherDisabled(NotRedeemable):
    """The code was switched off on its own (``active: false``) and is refused until it
    is switched on again."""

    code = "voucher_disabled"
    transient = True


class VoucherNotStarted(NotRedeemable):
    """The code's own window has not started yet (it narrows its campaign's)."""

    code = "voucher_not_started"
    transient = True


class VoucherExpired(NotRedeemable):
    """The code's own window has ended (it narrows its campaign's)."""

    code = "voucher_expired"


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


# --- editing a campaign ----------------------------------------------------------------


class UnsafeEdit(Conflict):
    """A campaign change that is not safe for the campaign's state."""

    code = "unsafe_edit"


class CannotEditEnded(UnsafeEdit):
    """An ended campaign is final: nothing of it can change."""

    code = "cannot_edit_ended"


class LimitBelowUsage(UnsafeEdit):
    """A limit lowered below what the campaign already used (codes in circulation,
    redemptions, or one customer's redemptions)."""

    code = "limit_below_usage"


class StartAlreadyPassed(UnsafeEdit):
    """``starts_at`` of a campaign that has started selling cannot move."""

    code = "start_already_passed"


class VersionMismatch(Conflict):
    """The request's ``If-Match`` names a version the resource no longer has."""

    code = "version_mismatch"




def registry() -> dict[str, type[VoucherError]]:
    """Every error class by its code (a copy; classes register themselves when defined)."""
    return dict(_REGISTRY)


def is_transient(code: str) -> bool:
    """Whether the error with this code only means "not now" (see ``VoucherError.transient``)."""
    cls = _REGISTRY.get(code)
    return cls is not None and cls.transient


def from_code(code: str, message: str) -> VoucherError:
    """Rebuild an error that crossed a process boundary as ``(code, message)``."""
    return _REGISTRY.get(code, VoucherError)(message)


def rebuild(failure: Any) -> VoucherError:
    """The engine error a failure stands for, rebuilt by its code: a returned
    ``(code, message)`` value, or an engine error whose class Ray derived on the way."""
    message = getattr(failure, "message", None)
    return from_code(failure.code, str(failure) if message is None else message)
