"""Request and response bodies at the HTTP edge (pydantic lives only here and in serve/).

Every request model forbids unknown fields, so a typo in a field name is a 422 that names
the field instead of being silently ignored (:class:`serve.strict.Strict`). Amounts are
integers in minor units.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve.auth import Role
from serve.cart_models import DiscountIn, ItemIn, LineOut, RulesIn
from serve.strict import (
    MAX_INT64,
    UNSTORABLE_MSG,
    UNSTORABLE_TEXT,
    IsoDateTime,
    Metadata,
    MetadataKey,
    Strict,
    storable,
    unstorable,
    unstorable_params,
)

__all__ = [
    "MAX_INT64",
    "UNSTORABLE_MSG",
    "UNSTORABLE_TEXT",
    "IsoDateTime",
    "ItemIn",
    "Metadata",
    "MetadataKey",
    "Strict",
    "storable",
    "unstorable",
    "unstorable_params",
]

# --- problems --------------------------------------------------------------------------


class ProblemIssue(BaseModel):
    """One failed field of a request validation problem."""

    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem: the body of every error, sent as ``application/problem+json``.

    Problem types may add extension members (``code``, ``errors``, ``max_bytes``,
    ``incident``), so unknown members are allowed.
    """

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    code: str | None = Field(default=None, description="the engine's stable error code")
    errors: list[ProblemIssue] | None = Field(default=None, description="validation problems only")


# --- users -----------------------------------------------------------------------------


class RegisterIn(Strict):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"email": "ada@shop.example", "password": "correct horse battery", "name": "Ada"}]}
    )

    email: str = Field(max_length=254)
    password: str = Field(min_length=8, max_length=128)
    name: str = Field(min_length=1, max_length=200)


class LoginIn(Strict):
    email: str = Field(max_length=254)
    password: str = Field(min_length=1, max_length=128)
    device_token: str | None = Field(
        None,
        max_length=256,
        description="The device_token of an earlier successful login to this account: the "
        "attempt is then checked against this device's own failure budget, so strangers' "
        "failed attempts never hold it up.",
    )


class TokenOut(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int
    device_token: str | None = Field(
        None, description="Send it with later logins to this account from this device."
    )


def _integration_role() -> list[Role]:
    return ["integration"]


class ApiKeyIn(Strict):
    name: str = Field(min_length=1, max_length=100)
    roles: list[Role] = Field(default_factory=_integration_role, min_length=1, max_length=5)


class ApiKeyOut(BaseModel):
    id: str
    key: str = Field(description="The key itself; shown once, store it now.")
    name: str
    roles: list[str]


class RolesIn(Strict):
    roles: list[Role] = Field(min_length=1, max_length=5)


class UserOut(BaseModel):
    id: str
    email: str | None = None
    name: str | None = None
    roles: list[str]
    kind: str = "user"


# --- campaigns -------------------------------------------------------------------------


class LimitsIn(Strict):
    total: int | None = Field(default=None, ge=1, le=10**12)
    per_customer: int | None = Field(default=None, ge=1, le=10**9)


class WindowIn(Strict):
    days: list[int] = Field(min_length=1, max_length=7)
    start: str = Field(pattern=r"^\d{2}:\d{2}$")
    end: str = Field(pattern=r"^\d{2}:\d{2}$")


class VoucherPatchIn(Strict):
    """A shop's change to one code; fields left out stay as they are, ``null`` clears a
    bound of the code's own window or its metadata."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"active": False}, {"expires_at": "2030-01-31T23:59:59Z"}]}
    )

    active: bool | None = None
    starts_at: IsoDateTime | None = None
    expires_at: IsoDateTime | None = None
    metadata: Metadata | None = None


class VoucherOut(BaseModel):
    """One code as its owner shard holds it (``metadata`` from Postgres)."""

    code: str
    campaign_id: str
    status: Literal["available", "assigned", "redeemed", "void"]
    customer_id: str | None = None
    reserved: bool = False
    active: bool = True
    starts_at: datetime | None = None
    expires_at: datetime | None = None
    metadata: dict[str, Any] | None = None
    balance: int | None = None
    redemptions: int | None = None
    limit: int | None = None


class CodeIn(Strict):
    length: int | None = Field(default=None, ge=4, le=64)
    charset: str = Field(default="alphanumeric", max_length=100)
    pattern: str | None = Field(default=None, max_length=100)
    prefix: str = Field(default="", max_length=32)
    postfix: str = Field(default="", max_length=32)
    check_char: bool = False


class CampaignIn(Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "Spring sale",
                    "type": "discount",
                    "currency": "EUR",
                    "discount": {"kind": "percent", "value": 10},
                    "ends_at": "2099-12-31T23:59:59Z",
                    "timezone": "Europe/Berlin",
                }
            ]
        }
    )

    id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    name: str = Field(min_length=1, max_length=200)
    type: Literal["discount", "gift_card", "shared_code", "flash_sale", "promotion"]
    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$")
    discount: DiscountIn | None = None
    gift_balance: int | None = Field(default=None, ge=1, le=10**12)
    min_order: int = Field(default=0, ge=0, le=10**12)
    starts_at: IsoDateTime | None = None
    ends_at: IsoDateTime | None = None
    timezone: str = Field(default="UTC", max_length=64)
    limits: LimitsIn | None = None
    windows: list[WindowIn] = Field(default_factory=list, max_length=28)
    code: CodeIn | None = None
    shared_code: str | None = Field(default=None, max_length=64)
    metadata: Metadata | None = None
    rules: RulesIn | None = None


class LimitsPatchIn(Strict):
    """Limits merge: a key sent sets that limit, ``null`` removes it, a key left out stays."""

    total: int | None = Field(default=None, ge=1, le=10**12)
    per_customer: int | None = Field(default=None, ge=1, le=10**9)


class CampaignPatchIn(Strict):
    """A shop's change to a campaign: fields left out stay as they are; ``null`` clears
    ``starts_at``, ``ends_at``, ``metadata`` or ``rules``. Only changes safe for the campaign's state
    apply (see ``PATCH /v1/campaigns/{id}``)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"ends_at": "2099-12-31T23:59:59Z"},
                {"limits": {"total": 5000}, "discount": {"kind": "percent", "value": 15}},
            ]
        }
    )

    name: str = Field(default=None, min_length=1, max_length=200)  # type: ignore[assignment]
    starts_at: IsoDateTime | None = None
    ends_at: IsoDateTime | None = None
    limits: LimitsPatchIn = Field(default=None)  # type: ignore[assignment]
    discount: DiscountIn = Field(default=None)  # type: ignore[assignment]
    min_order: int = Field(default=None, ge=0, le=10**12)  # type: ignore[assignment]
    windows: list[WindowIn] = Field(default=None, max_length=28)  # type: ignore[arg-type]
    metadata: Metadata | None = None
    rules: RulesIn | None = None

    def changes(self) -> dict[str, Any]:
        """The fields the request sent, as plain values (``limits`` with only its sent
        keys)."""
        out: dict[str, Any] = {}
        for name in self.model_fields_set:
            value = getattr(self, name)
            if name == "limits":
                value = value.model_dump(include=value.model_fields_set)
            elif isinstance(value, BaseModel):
                value = value.model_dump(exclude_none=True)
            elif name == "windows":
                value = [w.model_dump() for w in value]
            out[name] = value
        return out


class GenerateIn(Strict):
    count: int = Field(ge=1, le=50_000_000)


# --- vouchers --------------------------------------------------------------------------


class OrderIn(Strict):
    """An order: an ``amount``, or ``items`` (then the amount is their subtotal; given
    both, they must agree), and optional ``shipping``; all in minor units (cents)."""

    id: str | None = Field(default=None, max_length=128)
    amount: int | None = Field(default=None, ge=0, le=10**12, description="minor units (cents)")
    currency: str = Field(pattern=r"^[A-Z]{3}$", description="an ISO 4217 code")
    shipping: int | None = Field(default=None, ge=0, le=10**12)
    items: list[ItemIn] | None = Field(default=None, max_length=500)


class CheckoutIn(Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"code": "SPRING-7XK2Q9", "customer_id": "cust-42",
                 "order": {"id": "order-1001", "amount": 4999, "currency": "EUR"}}
            ]
        }
    )

    code: str | None = Field(
        default=None, min_length=1, max_length=128, description="required unless apply_promotions"
    )
    customer_id: str | None = Field(default=None, min_length=1, max_length=128)
    order: OrderIn
    metadata: Metadata | None = None
    apply_promotions: bool = Field(
        default=False,
        description="also give every automatic promotion that fits the order (validations "
        "and redemptions); the answer lists them under promotions",
    )
    customer_tags: list[str] | None = Field(
        default=None,
        max_length=50,
        description="the customer's tags for customer rules, from a trusted caller (not a "
        "customer); without them the stored customer's tags are used",
    )


class PromotionOut(BaseModel):
    """An automatic promotion given to the order (``apply_promotions``)."""

    campaign_id: str
    discount_amount: int
    items: list[LineOut] = Field(default_factory=list)
    shipping_discount: int = 0
    redemption_id: str | None = Field(default=None, description="redemptions only: its record")


class ValidationOut(BaseModel):
    code: str | None = Field(description="null for promotions alone")
    valid: bool
    campaign_id: str | None = None
    discount_amount: int = 0
    items: list[LineOut] = Field(default_factory=list, description="the discount per order line")
    shipping_discount: int = 0
    balance: int | None = None
    reason: str | None = None
    message: str | None = None
    promotions: list[PromotionOut] | None = Field(default=None, description="with apply_promotions")
    total_discount: int | None = Field(default=None, description="with apply_promotions: all of it")


class RedemptionOut(BaseModel):
    id: str | None = Field(description="null for promotions alone (each has its own record)")
    code: str | None
    campaign_id: str | None
    customer_id: str | None
    order_id: str | None
    order_amount: int
    currency: str
    discount_amount: int
    items: list[LineOut] = Field(default_factory=list, description="the discount per order line")
    shipping_discount: int = 0
    balance: int | None = None
    status: Literal["redeemed", "rolled_back"]
    created_at: datetime
    rolled_back_at: datetime | None = None
    metadata: dict[str, Any] | None = None
    promotions: list[PromotionOut] | None = Field(default=None, description="with apply_promotions")
    total_discount: int | None = Field(default=None, description="with apply_promotions: all of it")


class ReservationOut(BaseModel):
    id: str
    code: str
    campaign_id: str
    customer_id: str | None
    order_id: str | None
    order_amount: int
    currency: str
    discount_amount: int
    items: list[LineOut] = Field(default_factory=list, description="the discount per order line")
    shipping_discount: int = 0
    expires_at: datetime
    state: Literal["held", "confirmed", "released", "expired"]
    redemption_id: str | None = None
    metadata: dict[str, Any] | None = None


class CampaignOut(BaseModel):
    id: str
    name: str
    type: str
    state: str
    currency: str
    discount: dict[str, Any] | None = None
    gift_balance: int | None = None
    min_order: int = 0
    limits: dict[str, Any] = Field(default_factory=dict)
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    timezone: str = "UTC"
    windows: list[dict[str, Any]] = Field(default_factory=list)
    code: dict[str, Any] = Field(default_factory=dict)
    shared_code: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    version: int = 0
    metadata: dict[str, Any] | None = None
    rules: dict[str, Any] | None = None


class TransitionOut(CampaignOut):
    """A lifecycle move's answer: it is sent once every shard applied the move. Shards that
    did not confirm in time were fenced: they restart and reload the campaign before they
    take traffic again."""

    fenced_shards: list[int] = Field(default_factory=list)


class JobOut(BaseModel):
    id: str
    campaign_id: str
    requested: int
    generated: int
    state: str
    error: str | None = None
    rate: float = 0.0
    eta_s: float | None = None
    created_at: datetime | None = None
    finished_at: datetime | None = None
    plan: dict[str, Any] | None = None


# --- customers, issuance and notification webhooks -----------------------------------------


class CustomerIn(Strict):
    """A customer. Consent is never assumed: give ``consent_<channel>`` for every channel
    you give an address for (email, phone for sms, push_token for push)."""

    id: str = Field(min_length=1, max_length=128)
    email: str | None = None
    phone: str | None = Field(None, description="E.164, e.g. +4915112345678")
    push_token: str | None = None
    name: str | None = None
    locale: str | None = Field(None, description="BCP 47, e.g. de-AT (default en)")
    time_zone: str | None = Field(None, description="IANA zone, e.g. Europe/Berlin (default UTC)")
    consent_email: bool | None = None
    consent_sms: bool | None = None
    consent_push: bool | None = None
    tags: list[str] | None = Field(None, max_length=50)
    metadata: Metadata | None = None


class CustomerPatchIn(Strict):
    """Changes to a customer: fields given are set (``null`` clears one; consent rules
    apply to the record as changed), fields absent stay. ``user_id`` links the user account
    that signs in as this customer (its "my vouchers" then lists the customer's codes);
    ``null`` unlinks it. A user account is linked to one customer at most."""

    email: str | None = None
    phone: str | None = Field(None, description="E.164, e.g. +4915112345678")
    push_token: str | None = None
    name: str | None = None
    locale: str | None = Field(None, description="BCP 47, e.g. de-AT (null: en)")
    time_zone: str | None = Field(None, description="IANA zone, e.g. Europe/Berlin (null: UTC)")
    consent_email: bool | None = None
    consent_sms: bool | None = None
    consent_push: bool | None = None
    tags: list[str] | None = Field(None, max_length=50)
    metadata: Metadata | None = None
    user_id: str | None = Field(None, min_length=1, max_length=128)


class CustomerOut(BaseModel):
    id: str
    email: str | None = None
    phone: str | None = None
    push_token: str | None = None
    name: str | None = None
    locale: str
    time_zone: str
    consent_email: bool
    consent_sms: bool
    consent_push: bool
    tags: list[str]
    metadata: dict[str, Any] | None = None
    user_id: str | None = Field(None, description="the user account linked to this customer")
    created_at: datetime | None = None
    updated_at: datetime | None = None


class ImportRejection(BaseModel):
    line: int
    field: str
    reason: str


class ImportOut(BaseModel):
    rows: int
    imported: int
    rejected: int
    rejections: list[ImportRejection]
    rejections_truncated: bool


class SelectionIn(Strict):
    """Exactly one of: ``customer_ids`` (up to 10,000), ``tag``, ``all: true``."""

    customer_ids: list[str] | None = Field(None, min_length=1, max_length=10_000)
    tag: str | None = None
    all: bool | None = None


class IssuanceIn(Strict):
    selection: SelectionIn
    channels: list[Literal["email", "sms", "push"]] = Field(min_length=1, max_length=3)


class IssuanceJobOut(BaseModel):
    kind: Literal["issuance"]
    id: str
    campaign_id: str
    selection: dict[str, Any]
    channels: list[str]
    state: str
    error: str | None = None
    counts: dict[str, int]
    rate: float = 0.0
    eta_s: float | None = None
    created_at: datetime | None = None
    finished_at: datetime | None = None


class WebhookIn(Strict):
    url: str = Field(min_length=1, max_length=2048)
    secret: str | None = Field(None, description="16..256 characters; left out: one is made")
    kinds: list[str] | None = Field(None, description="notification kinds; left out: all")
# --- delivery --------------------------------------------------------------------------


class TemplateIn(Strict):
    """A campaign's message template for one channel and locale (Jinja2; docs/delivery.md,
    "Templates", lists the variables)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "locale": "de",
                    "subject": "Ihr Gutschein für {{ campaign_name }}",
                    "body": "<p>Hallo {{ customer_name }}, Ihr Code: <b>{{ code }}</b> ({{ discount }})</p>",
                    "default": True,
                }
            ]
        },
    )
    locale: str = Field(min_length=2, max_length=35, pattern=r"^[A-Za-z]{2,8}([_-][A-Za-z0-9]{1,8})*$")
    subject: str | None = Field(None, max_length=998)
    # The whole request must fit the 64 KiB body limit (VOUCHER_MAX_BODY_BYTES).
    body: str = Field(min_length=1, max_length=60_000)
    default: bool = False


# --- audit log --------------------------------------------------------------------------


class AuditActorOut(BaseModel):
    kind: Literal["user", "api_key", "system"]
    id: str
    key_id: str | None = None


class AuditEntryOut(BaseModel):
    """Who did what to which resource, when, and the change (``{field: [before, after]}``
    for most actions)."""

    id: int
    at: datetime
    actor: AuditActorOut
    action: str
    resource_type: str
    resource_id: str
    change: dict[str, Any]


class AuditPageOut(BaseModel):
    data: list[AuditEntryOut]
    next_cursor: str | None = None
