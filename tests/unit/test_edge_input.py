"""What the HTTP edge refuses before anything reaches a shard or Postgres: text Postgres
cannot store (NUL, unpaired surrogates) anywhere in a request, values of the wrong JSON
type, integers past int64; and what a 405 says about the methods of a path.

The gateway app itself is driven through ASGI (no Ray, no Serve): every refusal here is
answered before a route's handler, so no deployment is needed.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from serve import models
from serve.models import (
    MAX_INT64,
    CampaignIn,
    CheckoutIn,
    CustomerIn,
    GenerateIn,
    RolesIn,
    Strict,
    TemplateIn,
    storable,
    unstorable,
)

CHECKOUT = {"code": "SPRING-1", "customer_id": "cust-1", "order": {"id": "o-1", "amount": 4999, "currency": "EUR"}}


def _errors(model: type[Strict], data: dict[str, Any]) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return list(info.value.errors())


def _with(path: tuple[str, ...], value: Any, base: dict[str, Any] = CHECKOUT) -> dict[str, Any]:
    out: dict[str, Any] = {**base, "order": dict(base["order"])} if "order" in base else dict(base)
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


# --- text Postgres can store -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "bad"),
    [
        ("plain", False),
        ("ünïcödé 🎉", False),  # astral characters are fine (a surrogate *pair* in JSON)
        ("a\x00b", True),
        ("\ud800", True),
        ("x\udfffy", True),
        (["ok", "no\x00"], True),
        ({"k": "v\x00"}, True),
        ({"k\x00": "v"}, True),  # keys count too (jsonb refuses them as well)
        ({"k": ["deep", {"deeper": "\ud83d"}]}, True),
        ({"k": [1, 2.5, None, True]}, False),
        (None, False),
    ],
)
def test_unstorable(value: Any, bad: bool) -> None:
    assert unstorable(value) is bad
    if not bad:
        assert storable(value) is value


@pytest.mark.parametrize(
    ("path", "loc"),
    [
        (("customer_id",), ("customer_id",)),
        (("code",), ("code",)),
        (("order", "id"), ("order", "id")),
    ],
)
def test_checkout_refuses_nul_naming_the_field(path: tuple[str, ...], loc: tuple[str, ...]) -> None:
    errs = _errors(CheckoutIn, _with(path, "evil\x00id"))
    assert [(e["loc"], e["type"]) for e in errs] == [(loc, models.UNSTORABLE_TEXT)]


def test_unpaired_surrogates_are_refused() -> None:
    errs = _errors(CheckoutIn, _with(("order", "id"), "o\ud800"))
    assert errs[0]["loc"] == ("order", "id")


@pytest.mark.parametrize(
    ("model", "data", "loc"),
    [
        (TemplateIn, {"locale": "en", "subject": "Hi", "body": "a\x00b"}, ("body",)),
        (TemplateIn, {"locale": "en", "subject": "Hi\x00", "body": "b"}, ("subject",)),
        (CustomerIn, {"id": "c1", "tags": ["vip", "x\x00"]}, ("tags",)),
        (CustomerIn, {"id": "c\x001"}, ("id",)),
        (CampaignIn, {"name": "n\x00", "type": "discount"}, ("name",)),
        (models.RegisterIn, {"email": "a@b.example\x00", "password": "long-enough", "name": "A"}, ("email",)),
        (models.IssuanceIn, {"selection": {"tag": "v\x00"}, "channels": ["email"]}, ("selection", "tag")),
        (models.WebhookIn, {"url": "https://x.example/\x00"}, ("url",)),
    ],
)
def test_every_model_refuses_unstorable_text(model: type[Strict], data: dict[str, Any], loc: tuple[str, ...]) -> None:
    errs = _errors(model, data)
    assert any(e["loc"] == loc and e["type"] == models.UNSTORABLE_TEXT for e in errs), errs


def test_every_request_model_is_strict() -> None:
    """The checks live in the Strict base, so a new request model gets them by inheriting
    it: every model whose name ends in ``In`` must."""
    request_models = [
        obj for name, obj in vars(models).items()
        if inspect.isclass(obj) and name.endswith("In") and issubclass(obj, models.BaseModel)
    ]
    assert len(request_models) >= 15
    assert all(issubclass(m, Strict) for m in request_models), [m for m in request_models if not issubclass(m, Strict)]


# --- JSON types as the schema says -------------------------------------------------------


@pytest.mark.parametrize("amount", [1.5, "3", True, False, [3], {"v": 3}])
def test_integers_are_json_integers(amount: Any) -> None:
    errs = _errors(CheckoutIn, _with(("order", "amount"), amount))
    assert errs[0]["loc"] == ("order", "amount")


@pytest.mark.parametrize("amount", [3, 3.0, 0, 10**12])
def test_integral_numbers_are_integers(amount: Any) -> None:
    """JSON Schema's integer includes 3.0; it is taken as the integer 3."""
    body = CheckoutIn.model_validate(_with(("order", "amount"), amount))
    assert body.order.amount == int(amount) and type(body.order.amount) is int


def test_integer_lists_and_bounds() -> None:
    assert GenerateIn.model_validate({"count": 951.0}).count == 951
    assert _errors(GenerateIn, {"count": 50_000_001})[0]["type"] == "less_than_equal"
    window = models.WindowIn.model_validate({"days": [1.0, 2], "start": "10:00", "end": "11:00"})
    assert window.days == [1, 2]
    assert _errors(models.WindowIn, {"days": [1, "2"], "start": "10:00", "end": "11:00"})[0]["loc"] == ("days", 1)


@pytest.mark.parametrize("value", [0, 1, "true", "yes"])
def test_booleans_are_json_booleans(value: Any) -> None:
    errs = _errors(TemplateIn, {"locale": "en", "subject": "s", "body": "b", "default": value})
    assert errs[0]["loc"] == ("default",)
    errs = _errors(CustomerIn, {"id": "c1", "consent_push": value})
    assert errs[0]["loc"] == ("consent_push",)


@pytest.mark.parametrize("value", [0, 1.5, "0.5", "1700000000", "tomorrow"])
def test_date_times_are_iso_8601_strings(value: Any) -> None:
    errs = _errors(CampaignIn, {"name": "n", "type": "discount", "ends_at": value})
    assert errs[0]["loc"] == ("ends_at",)


def test_iso_8601_date_times_are_taken() -> None:
    c = CampaignIn.model_validate({"name": "n", "type": "discount", "ends_at": "2099-12-31T23:59:59Z"})
    assert c.ends_at is not None and c.ends_at.year == 2099 and c.ends_at.tzinfo is not None


def test_roles_are_an_enum_in_the_schema() -> None:
    from serve.auth import ROLES

    items = RolesIn.model_json_schema()["properties"]["roles"]["items"]
    assert tuple(items["enum"]) == ROLES
    assert _errors(RolesIn, {"roles": [""]})[0]["loc"] == ("roles", 0)


# --- the gateway app: parameters, fast lane, 405 -----------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    from tests.route_fakes import gateway

    # Fake services, never reached: every request here is refused before its handler runs.
    with gateway() as (test_client, _):
        yield test_client


def _assert_422(r: Any, loc: list[Any]) -> None:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["type"].endswith("/validation-error")
    assert any(e["loc"] == loc for e in body["errors"]), body


@pytest.mark.parametrize(
    ("method", "url", "loc"),
    [
        ("GET", "/v1/customers?tag=vip%00", ["query", "tag"]),
        ("GET", "/v1/customers?after=c%00", ["query", "after"]),
        ("GET", "/v1/customers/c%001", ["path", "customer_id"]),
        ("GET", "/v1/campaigns/x%00y", ["path", "campaign_id"]),
        ("POST", "/v1/campaigns/x%00y/activate", ["path", "campaign_id"]),
        ("GET", "/v1/vouchers/AB%00CD", ["path", "code"]),
        ("GET", "/v1/deliveries/dead?campaign_id=a%00", ["query", "campaign_id"]),
        ("POST", "/v1/redemptions/r%00/rollback", ["path", "redemption_id"]),
    ],
)
def test_parameters_with_nul_are_refused(client: TestClient, method: str, url: str, loc: list[Any]) -> None:
    _assert_422(client.request(method, url), loc)


@pytest.mark.parametrize(
    ("method", "url", "loc"),
    [
        ("POST", f"/v1/notifications/{2**64}/read", ["path", "notification_id"]),
        ("GET", f"/v1/notifications/{MAX_INT64 + 1}/deliveries", ["path", "notification_id"]),
        ("POST", "/v1/notifications/0/read", ["path", "notification_id"]),
        ("GET", f"/v1/campaigns?offset={2**64}", ["query", "offset"]),
        ("GET", f"/v1/campaigns/c/deliveries?offset={2**63}", ["query", "offset"]),
        ("GET", "/v1/reports/campaigns/c/timeseries?until=0.5", ["query", "until"]),
    ],
)
def test_integer_and_date_parameters_are_bounded(client: TestClient, method: str, url: str, loc: list[Any]) -> None:
    _assert_422(client.request(method, url), loc)


def test_fast_lane_hands_unstorable_bodies_to_the_validating_route(client: TestClient) -> None:
    from serve.checkout import decode_checkout

    ok = msgspec.json.encode(CHECKOUT)
    assert decode_checkout(ok).customer_id == "cust-1"
    for path in (("customer_id",), ("code",), ("order", "id")):
        with pytest.raises(msgspec.ValidationError):
            decode_checkout(msgspec.json.encode(_with(path, "a\x00b")))
    # and the route it hands them to names the field
    r = client.post("/v1/redemptions", json=_with(("order", "id"), "o\x00"))
    _assert_422(r, ["body", "order", "id"])
    r = client.post("/v1/redemptions", content=b'{"code":"A","order":{"amount":1,"currency":"EUR","id":"\\ud800"}}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "order", "id"]


@pytest.mark.parametrize(
    ("method", "url", "allow"),
    [
        ("OPTIONS", "/v1/api-keys", "GET, POST"),
        ("DELETE", "/v1/campaigns", "GET, POST"),
        ("PUT", "/v1/customers", "GET, POST"),
        ("OPTIONS", "/v1/notification-webhooks", "GET, POST"),
        ("PATCH", "/v1/redemptions", "GET, POST"),  # the fast lane's path too
        ("OPTIONS", "/v1/campaigns/c1", "GET, PATCH"),
        ("DELETE", "/v1/campaigns/c1/templates/email", "PUT"),
        # a concrete path shadows the templated one (/v1/customers/{customer_id}): GET of
        # the import endpoint is not a look-up of the customer "import"
        ("GET", "/v1/customers/import", "POST"),
        ("OPTIONS", "/v1/customers/import", "POST"),
    ],
)
def test_405_allow_lists_every_method_of_the_path(client: TestClient, method: str, url: str, allow: str) -> None:
    r = client.request(method, url)
    assert r.status_code == 405, r.text
    assert r.headers["allow"] == allow
    assert r.json()["type"].endswith("/method-not-allowed")
