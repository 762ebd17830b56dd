"""Authentication and authorisation, pure logic (no network, no database).

* Passwords: Argon2id through argon2-cffi, parameters measured on this machine kind.
* Access tokens: short-lived HS256 JWTs (PyJWT) with the algorithm pinned and ``exp``,
  ``iat``, ``aud``, ``iss``, ``sub`` required; roles travel in the token, so a role change
  takes effect with the next token.
* API keys for server-to-server callers: ``vk_<key_id>_<secret>``, stored as
  ``sha256(secret)``, shown once, revocable (the look-up lives in :mod:`serve.users`).
* Roles: :data:`ROLES`, carried by a :class:`Principal`; which role may do what is
  :mod:`serve.permissions`.

Errors: :class:`AuthError` (``status`` 401 or 403, ``type`` slug, ``detail``). It derives
from :class:`engine.errors.VoucherError` with one subclass per ``type``, so an auth error
raised inside a Serve deployment crosses the Ray boundary through ``actors.calls.guarded``
/ ``errors.from_code`` like every other engine error and comes back as the same class.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import jwt
import msgspec
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from engine import errors
from engine.audit import Actor
from engine.errors import ConfigError, InvalidInput

# The API-key cache's Redis keys, for the gateway and the Users deployment.
from engine.settings import Settings

log = logging.getLogger("voucher.auth")

Role = Literal["admin", "manager", "analyst", "integration", "customer"]
ROLES: tuple[str, ...] = get_args(Role)
_ROLE_ORDER = {r: i for i, r in enumerate(ROLES)}

PrincipalKind = Literal["user", "api_key"]


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """Who is calling: a logged-in user (from a JWT) or an API key (roles of the key)."""

    user_id: str
    roles: tuple[str, ...]
    kind: PrincipalKind = "user"
    api_key_id: str | None = None
    email: str | None = None

    def has(self, role: str) -> bool:
        return role in self.roles


def actor_of(principal: Principal) -> Actor:
    """The principal as the audit log records it."""
    if principal.kind == "api_key":
        return Actor("api_key", principal.user_id, principal.api_key_id)
    return Actor("user", principal.user_id)


def customer_only(principal: Principal) -> bool:
    """Whether the caller's one role is ``customer``: it acts for itself alone (its own
    vouchers and checkouts, its own rate limits and failed-attempt budgets)."""
    return set(principal.roles) == {"customer"}


def canonical_roles(roles: Iterable[str]) -> tuple[str, ...]:
    """Known roles, deduplicated, in :data:`ROLES` order. Unknown names raise InvalidRole."""
    seen = set()
    for role in roles:
        if not isinstance(role, str) or role not in _ROLE_ORDER:
            raise InvalidRole(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        seen.add(role)
    return tuple(sorted(seen, key=_ROLE_ORDER.__getitem__))


# --- errors ----------------------------------------------------------------------------


def _rebuild(cls: type[AuthError], type_: str, detail: str) -> AuthError:
    exc = Exception.__new__(cls)
    AuthError.__init__(exc, type_, detail)
    return exc


class AuthError(errors.VoucherError, register=False):
    """401/403 problems. ``type`` is the problem slug, ``detail`` a human sentence.

    Build with ``Unauthenticated("invalid_token", "...")`` / ``Forbidden("forbidden", "...")``
    or a fixed-type subclass (``TokenExpired("...")``). Known types map to their subclass,
    so ``errors.from_code(exc.code, exc.message)`` rebuilds the same class.
    """

    status: ClassVar[int] = 401
    code = "unauthenticated"

    def __init__(self, type: str, detail: str = "") -> None:
        self.type = type
        self.detail = detail or type.replace("_", " ")
        super().__init__(self.detail)
        # Instance attribute: guarded() sends exc.code across the actor boundary.
        self.code = type

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.type, self.detail))

    @staticmethod
    def unauthenticated(type: str, detail: str = "") -> AuthError:
        cls = _FIXED.get(type)
        if cls is not None and issubclass(cls, Unauthenticated):
            return cls(detail)
        return Unauthenticated(type, detail)

    @staticmethod
    def forbidden(type: str = "forbidden", detail: str = "") -> AuthError:
        cls = _FIXED.get(type)
        if cls is not None and issubclass(cls, Forbidden):
            return cls(detail)
        return Forbidden(type, detail)


class Unauthenticated(AuthError, register=False):
    """401: no credentials, or credentials that do not prove who the caller is."""

    status: ClassVar[int] = 401
    code = "unauthenticated"


class Forbidden(AuthError, register=False):
    """403: the caller is known but its roles do not allow the action."""

    status: ClassVar[int] = 403
    code = "forbidden"


class _FixedUnauthenticated(Unauthenticated):
    """Base of the 401s whose ``type`` is their class ``code``: built from a detail alone,
    as ``errors.from_code`` does."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(type(self).code, detail)


class _FixedForbidden(Forbidden, register=False):
    """Base of the 403s whose ``type`` is their class ``code``."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(type(self).code, detail)


class MissingCredentials(_FixedUnauthenticated):
    code = "missing_credentials"


class InvalidToken(_FixedUnauthenticated):
    code = "invalid_token"


class TokenExpired(_FixedUnauthenticated):
    code = "token_expired"


class InvalidCredentials(_FixedUnauthenticated):
    """Wrong email or password (never says which)."""

    code = "invalid_credentials"


class InvalidApiKey(_FixedUnauthenticated):
    code = "invalid_api_key"


class ApiKeyRevoked(_FixedUnauthenticated):
    code = "api_key_revoked"


class NotPermitted(_FixedForbidden):
    """The caller's roles do not include one the action allows."""

    code = "forbidden"


class RoleNotDelegable(_FixedForbidden):
    """An API key may only carry roles its creator may delegate."""

    code = "role_not_delegable"


_FIXED: dict[str, type[AuthError]] = {
    c.code: c
    for c in (
        MissingCredentials,
        InvalidToken,
        TokenExpired,
        InvalidCredentials,
        InvalidApiKey,
        ApiKeyRevoked,
        NotPermitted,
        RoleNotDelegable,
    )
}


class InvalidEmail(InvalidInput):
    code = "invalid_email"


class WeakPassword(InvalidInput):
    code = "invalid_password"


class InvalidRole(InvalidInput):
    code = "invalid_role"


class InvalidName(InvalidInput):
    code = "invalid_name"


# --- passwords -------------------------------------------------------------------------

# Argon2id with OWASP's first recommended setting (19 MiB, t=2, p=1). Measured here (2
# cores): ~21 ms per hash or verify, inside the 20-50 ms budget; t=2 with 32 MiB took
# ~51 ms and t=3 with 32 MiB ~70 ms. needs_rehash() upgrades old hashes at the next login
# when these change.
ARGON2_TIME_COST = 2
ARGON2_MEMORY_KIB = 19 * 1024
ARGON2_PARALLELISM = 1

PASSWORD_MIN = 8
PASSWORD_MAX = 128
EMAIL_MAX = 254
NAME_MAX = 200


def password_hasher() -> PasswordHasher:
    return PasswordHasher(
        time_cost=ARGON2_TIME_COST,
        memory_cost=ARGON2_MEMORY_KIB,
        parallelism=ARGON2_PARALLELISM,
        hash_len=32,
        salt_len=16,
        type=Type.ID,
    )


_HASHER = password_hasher()


def hash_password(password: str, hasher: PasswordHasher = _HASHER) -> str:
    """The Argon2id PHC string for ``password`` (CPU-bound: run it off the event loop)."""
    return hasher.hash(password)


def verify_password(stored_hash: str, password: str, hasher: PasswordHasher = _HASHER) -> bool:
    """True when ``password`` matches; False on a mismatch or an unreadable hash."""
    try:
        return hasher.verify(stored_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str, hasher: PasswordHasher = _HASHER) -> bool:
    """True when ``stored_hash`` was made with other parameters than ``hasher``'s."""
    try:
        return hasher.check_needs_rehash(stored_hash)
    except InvalidHashError:
        return True


def check_password(password: str) -> None:
    """Password policy: 8..128 characters. Raises WeakPassword."""
    if not isinstance(password, str):
        raise WeakPassword("password must be a string")
    if not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        raise WeakPassword(f"password must be {PASSWORD_MIN} to {PASSWORD_MAX} characters long")


# Deliberately simple: one @, no whitespace, a dot in the domain, no leading/trailing dot.
# Deliverability is the mail server's question, not a regex's.
_EMAIL = re.compile(r"[^@\s]+@[^@\s.][^@\s]*\.[^@\s.]+")


def normalize_email(email: str) -> str:
    """Trimmed, lower-cased and checked (at most 254 characters). Raises InvalidEmail."""
    if not isinstance(email, str):
        raise InvalidEmail("email must be a string")
    value = email.strip().lower()
    if len(value) > EMAIL_MAX or _EMAIL.fullmatch(value) is None or ".." in value:
        raise InvalidEmail("not a valid email address")
    return value


def normalize_name(name: str | None) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str):
        raise InvalidName("name must be a string")
    value = name.strip()
    if len(value) > NAME_MAX or any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise InvalidName(f"name must be at most {NAME_MAX} printable characters")
    return value or None


# --- access tokens ---------------------------------------------------------------------

JWT_ALGORITHM = "HS256"
MIN_SECRET_BYTES = 32
MAX_TOKEN_CHARS = 4096
_REQUIRED_CLAIMS = ["exp", "iat", "aud", "iss", "sub"]


class TokenIssuer:
    """Issues and verifies the access tokens (HS256, algorithm pinned).

    Time claims are checked here against the injected ``clock`` (PyJWT's own checks use
    the wall clock, which tests cannot move); PyJWT checks the signature, the algorithm,
    ``aud`` (strictly one string), ``iss``, ``sub`` and that every required claim exists.
    """

    def __init__(
        self,
        secret: bytes,
        audience: str = "voucher-engine",
        issuer: str = "voucher-engine",
        ttl_s: int = 900,
        clock: Callable[[], float] = time.time,
        leeway_s: int = 5,
    ) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the token secret must be at least {MIN_SECRET_BYTES} bytes")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self._secret = secret
        self.audience = audience
        self.issuer = issuer
        self.ttl_s = int(ttl_s)
        self.clock = clock
        self.leeway_s = leeway_s

    def issue(self, principal: Principal) -> tuple[str, int]:
        """``(token, expires_in)`` for a user principal."""
        if principal.kind != "user":
            raise ValueError("tokens are issued to users only, not to API keys")
        now = int(self.clock())
        claims: dict[str, Any] = {
            "sub": principal.user_id,
            "aud": self.audience,
            "iss": self.issuer,
            "iat": now,
            "exp": now + self.ttl_s,
            "roles": list(canonical_roles(principal.roles)),
        }
        if principal.email is not None:
            claims["email"] = principal.email
        token = jwt.encode(claims, self._secret, algorithm=JWT_ALGORITHM, headers={"typ": "JWT"})
        return token, self.ttl_s

    def verify(self, token: str) -> Principal:
        """The principal a valid token names. Raises TokenExpired or InvalidToken."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise InvalidToken("malformed token")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[JWT_ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                options={
                    "require": _REQUIRED_CLAIMS,
                    "verify_signature": True,
                    "verify_aud": True,
                    "verify_iss": True,
                    "verify_sub": True,
                    "strict_aud": True,
                    # Checked below against self.clock.
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidAudienceError:
            raise InvalidToken("token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("token is from another issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidAlgorithmError:
            raise InvalidToken("token algorithm not allowed") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("token signature does not verify") from None
        except jwt.InvalidTokenError:
            raise InvalidToken("malformed token") from None
        return self._principal(claims)

    def _principal(self, claims: dict[str, Any]) -> Principal:
        now = self.clock()
        exp, iat, nbf = claims.get("exp"), claims.get("iat"), claims.get("nbf")
        if not _is_number(exp) or not _is_number(iat) or (nbf is not None and not _is_number(nbf)):
            raise InvalidToken("token time claims must be numbers")
        assert exp is not None and iat is not None
        if now >= exp + self.leeway_s:
            raise TokenExpired("token has expired; log in again")
        if iat > now + self.leeway_s or (nbf is not None and nbf > now + self.leeway_s):
            raise InvalidToken("token is not valid yet")
        if exp - iat > self.ttl_s + self.leeway_s:
            # A token we signed never lives longer than our TTL (if the TTL was lowered,
            # older long-lived tokens stop working at once).
            raise InvalidToken("token lifetime exceeds the configured maximum")
        sub, roles, email = claims.get("sub"), claims.get("roles", []), claims.get("email")
        if not isinstance(sub, str) or not sub:
            raise InvalidToken("token subject missing")
        if not isinstance(roles, list) or (email is not None and not isinstance(email, str)):
            raise InvalidToken("token claims malformed")
        try:
            parsed = canonical_roles(roles)
        except InvalidRole:
            raise InvalidToken("token names an unknown role") from None
        return Principal(user_id=sub, roles=parsed, kind="user", email=email)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def load_or_create_secret(settings: Settings) -> bytes:
    """The HMAC key of the access tokens.

    ``VOUCHER_JWT_SECRET`` when set (at least 32 bytes). Otherwise a random 32-byte key is
    made once and kept in ``<data_dir>/jwt_secret`` (mode 0600) so tokens survive restarts.
    Several processes starting at once agree on one key: the file is written under a
    temporary name and hard-linked into place, which fails for all but the first.
    In a multi-node cluster set ``VOUCHER_JWT_SECRET``: each node has its own data dir.
    """
    if settings.jwt_secret is not None:
        secret = settings.jwt_secret.encode("utf-8")
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"VOUCHER_JWT_SECRET is too short: at least {MIN_SECRET_BYTES} bytes")
        return secret
    folder = Path(settings.data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "jwt_secret"
    if not path.exists():
        tmp = folder / f".jwt_secret.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
                log.info("generated a token secret in %s", path)
            except FileExistsError:
                pass  # another process won the race; use its key
        finally:
            tmp.unlink(missing_ok=True)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("%s is readable by others (mode %o); chmod 600 it", path, mode)
    text = path.read_text(encoding="ascii").strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{path} does not hold a hex token secret; delete it") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"{path} holds a secret shorter than {MIN_SECRET_BYTES} bytes")
    return secret


# --- API keys --------------------------------------------------------------------------

API_KEY_PREFIX = "vk_"
KEY_ID_LEN = 12
SECRET_LEN = 32
API_KEY_LEN = len(API_KEY_PREFIX) + KEY_ID_LEN + 1 + SECRET_LEN
_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"
_KEY_ID = re.compile(r"[a-z2-7]{12}")
_SECRET = re.compile(r"[A-Za-z0-9_-]{32}")


class ApiKeyParts(msgspec.Struct, frozen=True):
    key_id: str
    secret: str
    plaintext: str


def generate_api_key(random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> ApiKeyParts:
    """A new key ``vk_<key_id>_<secret>``: 12 base32 chars (60 bits) name the key, 32
    urlsafe chars (192 bits) are the secret."""
    # 256 is a multiple of 32: byte % 32 is unbiased.
    key_id = "".join(_BASE32[b % 32] for b in random_bytes(KEY_ID_LEN))
    secret = base64.urlsafe_b64encode(random_bytes(24)).decode("ascii")
    return ApiKeyParts(key_id, secret, f"{API_KEY_PREFIX}{key_id}_{secret}")


def parse_api_key(plaintext: str) -> tuple[str, str]:
    """``(key_id, secret)`` of a well-formed key. Raises InvalidApiKey.

    Parsed by position, not by splitting on ``_``: the urlsafe secret may contain ``_``.
    """
    if (
        not isinstance(plaintext, str)
        or len(plaintext) != API_KEY_LEN
        or not plaintext.startswith(API_KEY_PREFIX)
        or plaintext[len(API_KEY_PREFIX) + KEY_ID_LEN] != "_"
    ):
        raise InvalidApiKey("malformed API key")
    start = len(API_KEY_PREFIX)
    key_id = plaintext[start : start + KEY_ID_LEN]
    secret = plaintext[start + KEY_ID_LEN + 1 :]
    if _KEY_ID.fullmatch(key_id) is None or _SECRET.fullmatch(secret) is None:
        raise InvalidApiKey("malformed API key")
    return key_id, secret


def hash_api_secret(secret: str) -> str:
    """sha256 hex of the key's secret.

    A fast hash is right here, unlike for passwords: the secret is 192 random bits, so
    there is nothing to brute-force offline, and the check runs on every server-to-server
    request where Argon2's 20 ms would be the whole latency budget.
    """
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


# The gateway keeps a verified API key in memory for this long, so the checkout hot path
# pays no database look-up per request. Revocations and owner role changes still apply at
# once: they set the key's flag in Redis (keys.api_key_flag) for API_KEY_FLAG_TTL_S, longer than
# any cache entry lives, and the gateway reads that flag in the same Redis call as the rate
# limits; a flagged key (or a request answered while Redis is down) is checked against
# Postgres again. Postgres is the truth and the flags only a fast invalidation: should
# Redis lose its data (and the flags with it), the epoch key read in the same call
# (keys.API_KEY_EPOCH) comes back with a new value, and every key cached under the old one is
# checked against Postgres again; the flag set after the change waits until it is in
# Redis's append-only file, and a replica forgets its cached keys when Redis restarts or fails over
# (a partial loss). A revocation needs Redis for its flag: while Redis is unreachable it is
# refused (503) and nothing changes.
API_KEY_CACHE_S = 30.0
API_KEY_FLAG_TTL_S = 120


def verify_api_secret(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_api_secret(secret), stored_hash)


def delegable_roles(creator_roles: Iterable[str]) -> frozenset[str]:
    """Roles an API key created by someone with ``creator_roles`` may carry: any for an
    admin, only ``integration`` for a manager, none otherwise."""
    held = set(creator_roles)
    if "admin" in held:
        return frozenset(ROLES)
    if "manager" in held:
        return frozenset({"integration"})
    return frozenset()


def check_api_key_roles(creator: Principal, roles: Iterable[str]) -> tuple[str, ...]:
    """The canonical roles of a new key, or InvalidRole / RoleNotDelegable."""
    wanted = canonical_roles(roles)
    if not wanted:
        raise InvalidRole("an API key needs at least one role")
    if creator.kind != "user":
        raise RoleNotDelegable("API keys cannot create API keys; log in as a user")
    extra = set(wanted) - delegable_roles(creator.roles)
    if extra:
        raise RoleNotDelegable(
            f"you may not give an API key the role(s) {', '.join(sorted(extra))}"
        )
    return wanted
