from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import pickle
import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from engine import errors
from engine.errors import ConfigError, InvalidInput
from engine.settings import Settings
from serve import auth, permissions
from serve.auth import (
    ROLES,
    ApiKeyRevoked,
    AuthError,
    Forbidden,
    InvalidApiKey,
    InvalidEmail,
    InvalidRole,
    InvalidToken,
    NotPermitted,
    Principal,
    RoleNotDelegable,
    TokenExpired,
    TokenIssuer,
    Unauthenticated,
    WeakPassword,
    canonical_roles,
    check_api_key_roles,
    check_password,
    delegable_roles,
    generate_api_key,
    hash_api_secret,
    hash_password,
    load_or_create_secret,
    needs_rehash,
    normalize_email,
    parse_api_key,
    password_hasher,
    verify_api_secret,
    verify_password,
)
from serve.permissions import PERMISSIONS, authorize, role_matrix_markdown

SECRET = b"k" * 32
OTHER = b"o" * 32
NOW = 1_700_000_000


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def user(*roles: str, user_id: str = "usr_1") -> Principal:
    return Principal(user_id=user_id, roles=canonical_roles(roles), kind="user", email="a@b.io")


def issuer(clock: Clock | None = None, **kw: Any) -> TokenIssuer:
    return TokenIssuer(SECRET, clock=clock or Clock(), **kw)


def b64(obj: Any) -> str:
    raw = json.dumps(obj, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims(**over: Any) -> dict[str, Any]:
    c: dict[str, Any] = {
        "sub": "usr_1",
        "aud": "voucher-engine",
        "iss": "voucher-engine",
        "iat": NOW,
        "exp": NOW + 900,
        "roles": ["admin"],
    }
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def forge(
    payload: dict[str, Any], key: bytes = SECRET, header: dict[str, Any] | None = None
) -> str:
    """An HS256 token with an arbitrary header, signed with ``key``."""
    h = b64(header or {"alg": "HS256", "typ": "JWT"})
    p = b64(payload)
    sig = hmac.new(key, f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"


# --- passwords -------------------------------------------------------------------------


def test_password_hash_is_argon2id_and_verifies() -> None:
    h = hash_password("correct horse")
    assert h.startswith("$argon2id$")
    assert f"m={auth.ARGON2_MEMORY_KIB},t={auth.ARGON2_TIME_COST},p={auth.ARGON2_PARALLELISM}" in h
    assert verify_password(h, "correct horse")
    assert not verify_password(h, "correct horsE")
    assert not verify_password("not a hash", "correct horse")
    assert hash_password("correct horse") != h  # salted


def test_password_hash_cost_is_in_budget() -> None:
    h = hash_password("correct horse")
    t0 = time.perf_counter()
    verify_password(h, "correct horse")
    took = time.perf_counter() - t0
    # ~21 ms on the reference machine; generous bounds so a busy CI does not flake.
    assert 0.003 < took < 1.0


def test_needs_rehash_when_parameters_change() -> None:
    weak = password_hasher()
    from argon2 import PasswordHasher, Type

    old = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1, type=Type.ID)
    assert needs_rehash(old.hash("pw-123456"))
    assert not needs_rehash(weak.hash("pw-123456"))
    assert needs_rehash("garbage")


@pytest.mark.parametrize("pw", ["", "short", "x" * 7, "x" * 129])
def test_password_policy_rejects(pw: str) -> None:
    with pytest.raises(WeakPassword) as info:
        check_password(pw)
    assert isinstance(info.value, InvalidInput)
    assert info.value.code == "invalid_password"


@pytest.mark.parametrize("pw", ["x" * 8, "x" * 128, "pässwörd😀"])
def test_password_policy_accepts(pw: str) -> None:
    check_password(pw)


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        (" Alice@Example.COM ", "alice@example.com"),
        ("a.b+tag@sub.example.co", "a.b+tag@sub.example.co"),
    ],
)
def test_email_normalised(raw: str, normal: str) -> None:
    assert normalize_email(raw) == normal


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "plain",
        "a@b",
        "a@@b.io",
        "a b@c.io",
        "@b.io",
        "a@.io",
        "a@b.",
        "a@b..io",
        "x" * 250 + "@b.io",
    ],
)
def test_email_rejected(bad: str) -> None:
    with pytest.raises(InvalidEmail):
        normalize_email(bad)


# --- tokens ----------------------------------------------------------------------------


def test_issue_and_verify_round_trip() -> None:
    tokens = issuer()
    token, expires_in = tokens.issue(user("manager", "admin"))
    assert expires_in == 900
    p = tokens.verify(token)
    assert p == Principal(
        user_id="usr_1", roles=("admin", "manager"), kind="user", api_key_id=None, email="a@b.io"
    )
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    body = jwt.decode(token, options={"verify_signature": False})
    assert body["exp"] - body["iat"] == 900
    assert {"sub", "aud", "iss", "iat", "exp", "roles"} <= body.keys()


def test_tokens_are_for_users_only() -> None:
    key = Principal(user_id="usr_1", roles=("integration",), kind="api_key", api_key_id="k")
    with pytest.raises(ValueError):
        issuer().issue(key)


def test_short_secret_refused() -> None:
    with pytest.raises(ValueError):
        TokenIssuer(b"x" * 31)


def test_expired_token() -> None:
    clock = Clock()
    tokens = issuer(clock)
    token, _ = tokens.issue(user("admin"))
    clock.t = NOW + 900 + tokens.leeway_s - 1
    tokens.verify(token)  # inside the leeway
    clock.t = NOW + 900 + tokens.leeway_s
    with pytest.raises(TokenExpired) as info:
        tokens.verify(token)
    assert info.value.status == 401
    assert info.value.type == "token_expired"


def test_token_from_the_future_rejected() -> None:
    clock = Clock(NOW - 3600)
    with pytest.raises(InvalidToken):
        issuer(clock).verify(forge(claims()))


def test_lifetime_longer_than_ttl_rejected() -> None:
    # A correctly signed token whose lifetime exceeds the TTL (e.g. minted before the TTL
    # was lowered) is refused.
    with pytest.raises(InvalidToken):
        issuer().verify(forge(claims(exp=NOW + 86400)))


def test_forged_hs256_token_with_right_key_accepted() -> None:
    # The forging helper is sound: the same claims with the right key pass.
    assert issuer().verify(forge(claims())).roles == ("admin",)


def test_alg_none_rejected() -> None:
    header = b64({"alg": "none", "typ": "JWT"})
    payload = b64(claims())
    for token in (f"{header}.{payload}.", f"{header}.{payload}"):
        with pytest.raises(InvalidToken):
            issuer().verify(token)
    # Case variants of "none" too.
    for alg in ("None", "NONE", "nOnE"):
        with pytest.raises(InvalidToken):
            issuer().verify(f"{b64({'alg': alg})}.{payload}.")


def test_wrong_key_rejected() -> None:
    token = jwt.encode(claims(), OTHER, algorithm="HS256")
    with pytest.raises(InvalidToken) as info:
        issuer().verify(token)
    assert info.value.type == "invalid_token"


@pytest.mark.parametrize("alg", ["RS256", "ES256", "HS384", "HS512", "PS256", "EdDSA"])
def test_other_algorithm_headers_rejected(alg: str) -> None:
    # Algorithm confusion: an HMAC signature made with our own secret under another
    # header, e.g. RS256 (where a verifier that trusts the header would use the "public
    # key", which the attacker knows, as the HMAC key).
    with pytest.raises(InvalidToken):
        issuer().verify(forge(claims(), header={"alg": alg, "typ": "JWT"}))


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_hs512_signed_with_our_key_rejected() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS512")
    with pytest.raises(InvalidToken):
        issuer().verify(token)


def test_wrong_audience_rejected() -> None:
    for aud in ("someone-else", ["voucher-engine", "x"], ["voucher-engine"]):
        with pytest.raises(InvalidToken):
            issuer().verify(forge(claims(aud=aud)))


def test_wrong_issuer_rejected() -> None:
    with pytest.raises(InvalidToken):
        issuer().verify(forge(claims(iss="evil")))


@pytest.mark.parametrize("claim", ["exp", "iat", "aud", "iss", "sub"])
def test_missing_claim_rejected(claim: str) -> None:
    c = claims()
    del c[claim]
    with pytest.raises(InvalidToken):
        issuer().verify(forge(c))


@pytest.mark.parametrize(
    "over",
    [
        {"exp": "soon"},
        {"exp": True},
        {"iat": "now"},
        {"sub": 42},
        {"sub": ""},
        {"roles": "admin"},
        {"roles": ["root"]},
        {"email": 5},
        {"nbf": NOW + 3600},
    ],
)
def test_malformed_claims_rejected(over: dict[str, Any]) -> None:
    with pytest.raises(InvalidToken):
        issuer().verify(forge(claims(**over)))


def test_tampered_payload_rejected() -> None:
    tokens = issuer()
    token, _ = tokens.issue(user("customer"))
    header, _payload, sig = token.split(".")
    body = jwt.decode(token, options={"verify_signature": False})
    body["roles"] = ["admin"]
    with pytest.raises(InvalidToken):
        tokens.verify(f"{header}.{b64(body)}.{sig}")


@pytest.mark.parametrize("junk", ["", "abc", "a.b.c", "x" * 5000, "...."])
def test_garbage_rejected(junk: str) -> None:
    with pytest.raises(InvalidToken):
        issuer().verify(junk)


def test_other_audience_issuer_instance() -> None:
    token, _ = TokenIssuer(SECRET, audience="other", clock=Clock()).issue(user("admin"))
    with pytest.raises(InvalidToken):
        issuer().verify(token)


# --- secrets on disk -------------------------------------------------------------------


def test_secret_from_settings() -> None:
    s = Settings(jwt_secret="s" * 40)
    assert load_or_create_secret(s) == b"s" * 40


def test_secret_generated_once_with_mode_0600(tmp_path: Path) -> None:
    s = Settings(data_dir=str(tmp_path / "data"))
    first = load_or_create_secret(s)
    assert len(first) == 32
    path = tmp_path / "data" / "jwt_secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(s) == first
    assert [p.name for p in path.parent.iterdir()] == ["jwt_secret"]  # no temp files left


def test_secret_file_corrupt(tmp_path: Path) -> None:
    (tmp_path / "jwt_secret").write_text("zz")
    with pytest.raises(ConfigError):
        load_or_create_secret(Settings(data_dir=str(tmp_path)))


def test_short_secret_setting_refused_without_echo() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"VOUCHER_JWT_SECRET": "tooshort-but-secret"})
    assert "VOUCHER_JWT_SECRET" in str(info.value)
    assert "tooshort-but-secret" not in str(info.value)
    assert "x" * 40 not in repr(Settings(jwt_secret="x" * 40, admin_password="p" * 12))
    assert "p" * 12 not in repr(Settings(admin_password="p" * 12))


def test_auth_settings_from_env() -> None:
    s = Settings.from_env(
        {
            "VOUCHER_JWT_SECRET": "j" * 32,
            "VOUCHER_TOKEN_TTL_S": "300",
            "VOUCHER_ADMIN_EMAIL": "Root@Shop.io",
            "VOUCHER_ADMIN_PASSWORD": "hunter2hunter2",
            "VOUCHER_HTTP_HOST": "0.0.0.0",
            "VOUCHER_HTTP_PORT": "9000",
            "VOUCHER_SERVE_MODE": "Default",
            "VOUCHER_MAX_BODY_BYTES": "1048576",
        }
    )
    assert (s.jwt_secret, s.token_ttl_s, s.admin_email, s.admin_password) == (
        "j" * 32,
        300,
        "root@shop.io",
        "hunter2hunter2",
    )
    assert (s.http_host, s.http_port, s.serve_mode, s.max_body_bytes) == (
        "0.0.0.0",
        9000,
        "default",
        1048576,
    )
    d = Settings()
    assert (d.jwt_secret, d.token_ttl_s, d.admin_email, d.admin_password) == (
        None,
        900,
        "admin@example.com",
        None,
    )
    assert (d.http_host, d.http_port, d.serve_mode, d.max_body_bytes) == (
        "127.0.0.1",
        8000,
        "haproxy",
        65536,
    )


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("VOUCHER_TOKEN_TTL_S", "0"),
        ("VOUCHER_HTTP_PORT", "70000"),
        ("VOUCHER_SERVE_MODE", "x"),
        ("VOUCHER_MAX_BODY_BYTES", "10"),
        ("VOUCHER_ADMIN_PASSWORD", "short"),
    ],
)
def test_auth_settings_bad_values(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: value})
    assert var in str(info.value)


# --- API keys --------------------------------------------------------------------------


def test_api_key_format() -> None:
    parts = generate_api_key()
    assert parts.plaintext == f"vk_{parts.key_id}_{parts.secret}"
    assert len(parts.key_id) == 12 and set(parts.key_id) <= set("abcdefghijklmnopqrstuvwxyz234567")
    assert len(parts.secret) == 32
    assert parse_api_key(parts.plaintext) == (parts.key_id, parts.secret)
    assert generate_api_key().plaintext != parts.plaintext


def test_api_key_secret_with_underscores_parses() -> None:
    parts = generate_api_key(lambda n: b"\xff" * n)  # urlsafe base64 of 0xff.. is "____"
    assert "_" in parts.secret
    assert parse_api_key(parts.plaintext) == (parts.key_id, parts.secret)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "vk_",
        "vk_abc_def",
        "xx_abcdefghijkl_" + "a" * 32,
        "vk_abcdefghijkl-" + "a" * 32,
        "vk_ABCDEFGHIJKL_" + "a" * 32,
        "vk_abcdefghijkl_" + "a" * 31,
        "vk_abcdefghijkl_" + "a" * 33,
        "vk_abcdefghijkl_" + "a" * 31 + "!",
        "vk_abcdefghijk1_" + "a" * 32,
    ],
)
def test_malformed_api_keys(bad: str) -> None:
    with pytest.raises(InvalidApiKey):
        parse_api_key(bad)


def test_api_secret_stored_hashed() -> None:
    parts = generate_api_key()
    stored = hash_api_secret(parts.secret)
    assert stored == hashlib.sha256(parts.secret.encode()).hexdigest()
    assert parts.secret not in stored
    assert verify_api_secret(parts.secret, stored)
    assert not verify_api_secret(generate_api_key().secret, stored)


def test_delegable_roles() -> None:
    assert delegable_roles(["admin"]) == frozenset(ROLES)
    assert delegable_roles(["manager"]) == {"integration"}
    assert delegable_roles(["manager", "analyst"]) == {"integration"}
    for role in ("analyst", "integration", "customer"):
        assert delegable_roles([role]) == frozenset()


def test_api_key_roles_subset_of_creator() -> None:
    assert check_api_key_roles(user("admin"), ["customer", "manager"]) == ("manager", "customer")
    assert check_api_key_roles(user("manager"), ["integration"]) == ("integration",)
    with pytest.raises(RoleNotDelegable) as info:
        check_api_key_roles(user("manager"), ["admin"])
    assert info.value.status == 403
    with pytest.raises(RoleNotDelegable):
        check_api_key_roles(user("manager"), ["integration", "analyst"])
    with pytest.raises(RoleNotDelegable):
        check_api_key_roles(user("customer"), ["customer"])
    with pytest.raises(InvalidRole):
        check_api_key_roles(user("admin"), ["root"])
    with pytest.raises(InvalidRole):
        check_api_key_roles(user("admin"), [])
    key = Principal(user_id="usr_1", roles=("admin",), kind="api_key", api_key_id="k")
    with pytest.raises(RoleNotDelegable):
        check_api_key_roles(key, ["integration"])


# --- permissions -----------------------------------------------------------------------

EXPECTED = {
    "users.me": set(ROLES),
    "users.set_roles": {"admin"},
    "api_keys.create": {"admin", "manager"},
    "campaigns.read": {"admin", "manager", "analyst"},
    "campaigns.write": {"admin", "manager"},
    "campaigns.generate": {"admin", "manager"},
    "jobs.read": {"admin", "manager", "analyst"},
    "vouchers.read": set(ROLES),
    "vouchers.write": {"admin", "manager"},
    "validations.create": {"admin", "manager", "integration", "customer"},
    "qualifications.create": {"admin", "manager", "integration", "customer"},
    "redemptions.create": {"admin", "manager", "integration"},
    "redemptions.rollback": {"admin", "manager", "integration"},
    "reservations.write": {"admin", "manager", "integration"},
    "overview.read": {"admin", "manager", "analyst"},
    "reports.read": {"admin", "manager", "analyst"},
    "notifications.read": {"admin", "manager"},
    "metrics.read": {"admin"},
    "customers.read": {"admin", "manager", "analyst"},
    "customers.write": {"admin", "manager"},
    "issuance.create": {"admin", "manager"},
    "publications.create": {"admin", "manager", "integration"},
    "webhooks.manage": {"admin", "manager"},
    "templates.write": {"admin", "manager"},
    "deliveries.read": {"admin", "manager", "analyst"},
    "codes.read": {"admin", "manager", "analyst"},
    "exports.create": {"admin", "manager"},
    "exports.read": {"admin", "manager", "analyst"},
    "exports.delete": {"admin", "manager"},
    "redemptions.read": {"admin", "manager", "analyst", "integration"},
    "webhooks.read": {"admin", "manager"},
    "webhooks.write": {"admin", "manager"},
    "events.read": {"admin", "manager"},
    "audit.read": {"admin"},
}


def test_permission_table() -> None:
    assert {k: set(v) for k, v in PERMISSIONS.items()} == EXPECTED


@pytest.mark.parametrize("action", sorted(EXPECTED))
@pytest.mark.parametrize("role", ROLES)
def test_authorize_matrix(action: str, role: str) -> None:
    p = user(role)
    if role in EXPECTED[action]:
        authorize(p, action)
        assert permissions.allowed(p, action)
    else:
        with pytest.raises(Forbidden) as info:
            authorize(p, action)
        assert info.value.status == 403
        assert not permissions.allowed(p, action)


def test_analyst_is_read_only_and_integration_cannot_manage() -> None:
    writes = [a for a in PERMISSIONS if not a.endswith(".read") and a != "users.me"]
    for action in writes:
        assert "analyst" not in PERMISSIONS[action], action
    for action in ("campaigns.write", "campaigns.generate", "api_keys.create", "users.set_roles"):
        assert "integration" not in PERMISSIONS[action]


def test_unknown_action_fails_closed() -> None:
    with pytest.raises(Forbidden):
        authorize(user(*ROLES), "campaigns.wrtie")


def test_no_roles_can_do_nothing() -> None:
    nobody = Principal(user_id="u", roles=())
    for action in PERMISSIONS:
        with pytest.raises(Forbidden):
            authorize(nobody, action)


def test_role_matrix_markdown() -> None:
    table = role_matrix_markdown()
    lines = table.splitlines()
    assert lines[0] == "| action | admin | manager | analyst | integration | customer |"
    assert len(lines) == 2 + len(PERMISSIONS)
    assert "| `metrics.read` | yes | - | - | - | - |" in lines
    assert "| `vouchers.read` | yes | yes | yes | yes | own |" in lines
    by_endpoint = role_matrix_markdown(
        [("POST /v1/auth/login", permissions.PUBLIC), ("PUT /v1/users/{id}/roles", "users.set_roles")]
    )
    assert "| `PUT /v1/users/{id}/roles` | `users.set_roles` | yes | - | - | - | - |" in by_endpoint
    assert "| `POST /v1/auth/login` | `public` |" in by_endpoint
    with pytest.raises(ValueError):
        role_matrix_markdown([("GET /x", "nope")])


def test_canonical_roles() -> None:
    assert canonical_roles(["customer", "admin", "admin"]) == ("admin", "customer")
    with pytest.raises(InvalidRole):
        canonical_roles(["Admin"])


# --- errors ----------------------------------------------------------------------------


def test_error_shapes() -> None:
    e = Unauthenticated("invalid_token", "bad")
    assert (e.status, e.type, e.detail, e.code) == (401, "invalid_token", "bad", "invalid_token")
    f = Forbidden("forbidden", "customers act only for themselves")
    assert (f.status, f.type, f.detail) == (403, "forbidden", "customers act only for themselves")
    assert isinstance(AuthError.unauthenticated("api_key_revoked", "x"), ApiKeyRevoked)
    assert isinstance(AuthError.unauthenticated("missing_credentials"), Unauthenticated)
    odd = AuthError.unauthenticated("odd_case", "x")
    assert (odd.type, odd.status) == ("odd_case", 401)
    assert isinstance(AuthError.forbidden(), NotPermitted)
    assert isinstance(e, Exception)


@pytest.mark.parametrize(
    "exc",
    [
        TokenExpired("late"),
        InvalidToken("bad"),
        ApiKeyRevoked("gone"),
        NotPermitted("no"),
        RoleNotDelegable("no"),
        Unauthenticated("odd_case", "x"),
        Forbidden("forbidden", "y"),
    ],
)
def test_errors_survive_pickle_and_from_code(exc: AuthError) -> None:
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc)
    assert (back.type, back.detail, back.status) == (exc.type, exc.detail, exc.status)
    # Across an actor boundary (actors.calls.guarded -> errors.from_code):
    if exc.type in auth._FIXED or exc.type == "forbidden":
        rebuilt = errors.from_code(exc.code, exc.message)
        assert isinstance(rebuilt, AuthError)
        assert (rebuilt.type, rebuilt.detail, rebuilt.status) == (exc.type, exc.detail, exc.status)


def test_secret_file_not_world_readable_even_with_loose_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        load_or_create_secret(Settings(data_dir=str(tmp_path)))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "jwt_secret").stat().st_mode) == 0o600
