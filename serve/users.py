"""Users, roles and API keys (their statements are in :mod:`store.users`; the rules live in
:mod:`serve.auth`).

Choices worth knowing:

* Argon2id hashing and verification take ~20 ms of CPU each; they run in a worker thread
  (argon2-cffi releases the GIL), so the event loop keeps serving other requests.
* Login costs the same whether or not the email exists: an unknown email is verified
  against a dummy hash, and every failure is the same ``invalid_credentials``.
* API keys: this store looks a key up on every call (primary key of the key, joined to its
  owner by primary key). The gateway caches verified keys for ``API_KEY_CACHE_S`` and
  learns of revocations and owner role changes from a Redis flag it reads in the same
  call as the rate limits (``serve.auth.api_key_flag``): the Users deployment sets the flag
  before and after changing the database, so every replica sees the change at once.
* An API key's roles are fixed at creation, and at every use they are narrowed to what
  its owner may still delegate: demoting a manager disables its integration keys at once.
* A user's roles travel in its (short-lived) token; ``set_roles`` applies at its next login.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import asyncpg
import msgspec

from engine.audit import Actor
from engine.errors import Conflict, InvalidInput, NotFound
from engine.settings import Settings
from serve.auth import (
    ApiKeyRevoked,
    InvalidApiKey,
    InvalidCredentials,
    InvalidEmail,
    InvalidName,
    InvalidRole,
    Principal,
    RoleNotDelegable,
    WeakPassword,
    actor_of,
    canonical_roles,
    check_api_key_roles,
    check_password,
    delegable_roles,
    generate_api_key,
    hash_api_secret,
    hash_password,
    needs_rehash,
    normalize_email,
    normalize_name,
    parse_api_key,
    verify_api_secret,
    verify_password,
)
from store import users
from store.pools import LazyPool

log = logging.getLogger("voucher.users")

__all__ = [
    "ApiKeyRevoked",
    "AdminBootstrap",
    "DuplicateEmail",
    "InvalidApiKey",
    "InvalidCredentials",
    "InvalidEmail",
    "InvalidName",
    "InvalidRole",
    "LastAdmin",
    "RoleNotDelegable",
    "UnknownApiKey",
    "UnknownUser",
    "UserStore",
    "WeakPassword",
    "bootstrap_admin",
]


class DuplicateEmail(Conflict):
    """A user with this email exists already."""

    code = "duplicate_email"


class UnknownUser(NotFound):
    code = "unknown_user"


class UnknownApiKey(NotFound):
    """No API key has this id (or it belongs to someone else)."""

    code = "unknown_api_key"


class LastAdmin(Conflict):
    """Taking the admin role from the last admin would lock everyone out."""

    code = "last_admin"


class AdminBootstrap(msgspec.Struct, frozen=True, kw_only=True):
    """What :meth:`UserStore.ensure_admin` did."""

    user_id: str
    created: bool
    promoted: bool
    generated_password: str | None = None


def _user(row: Mapping[str, Any]) -> dict[str, Any]:
    d = dict(row)
    d["roles"] = list(d["roles"])
    return d


def _api_key(row: Mapping[str, Any]) -> dict[str, Any]:
    d = dict(row)
    d["roles"] = list(d["roles"])
    d["prefix"] = f"vk_{d['id']}_"
    d["revoked"] = d["revoked_at"] is not None
    return d


def _new_user_id() -> str:
    return "usr_" + base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()


class UserStore:
    """Users and API keys over an asyncpg pool.

    ``UserStore(dsn)`` owns its pool (opened lazily or by :meth:`open`, closed by
    :meth:`close`); ``UserStore(pool)`` borrows one. All methods may be called before
    :meth:`open`.
    """

    def __init__(
        self,
        dsn_or_pool: str | asyncpg.Pool,
        *,
        pool_size: int = 4,
        hash_fn: Callable[[str], str] = hash_password,
        verify_fn: Callable[[str, str], bool] = verify_password,
        needs_rehash_fn: Callable[[str], bool] = needs_rehash,
    ) -> None:
        if isinstance(dsn_or_pool, str):
            self._lazy: LazyPool | None = LazyPool(dsn_or_pool, pool_size)
            self._pool: asyncpg.Pool | None = None
        else:
            self._lazy = None
            self._pool = dsn_or_pool
        self._hash = hash_fn
        self._verify = verify_fn
        self._needs_rehash = needs_rehash_fn
        self._dummy_hash: str | None = None
        self._background: set[asyncio.Task[Any]] = set()

    # --- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Create the pool and the dummy hash (idempotent, safe to call concurrently)."""
        await self._db()
        await self._dummy()

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        self._background.clear()
        if self._lazy is not None:
            await self._lazy.close()

    async def _db(self) -> asyncpg.Pool:
        if self._lazy is not None:
            return await self._lazy()
        assert self._pool is not None
        return self._pool

    async def _cpu(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    # --- users -------------------------------------------------------------------------

    async def register(self, email: str, password: str, name: str | None) -> dict[str, Any]:
        """A new user with the ``customer`` role. DuplicateEmail (409) when taken."""
        email = normalize_email(email)
        check_password(password)
        name = normalize_name(name)
        password_hash = await self._cpu(self._hash, password)
        row = await users.insert_user(
            await self._db(), _new_user_id(), email, name, password_hash, ["customer"]
        )
        if row is None:
            raise DuplicateEmail("a user with this email exists already")
        return _user(row)

    async def login(self, email: str, password: str) -> Principal:
        """The user's principal when the password matches; InvalidCredentials otherwise."""
        try:
            email = normalize_email(email)
        except InvalidInput:
            email = ""
        if not isinstance(password, str) or len(password) > 1024:
            password = ""
        row = None
        if email:
            row = await users.credentials(await self._db(), email)
        stored = row["password_hash"] if row is not None else None
        if row is None or stored is None:
            # Spend the same time as a real check, so response times do not reveal
            # which emails have accounts.
            await self._cpu(self._verify, await self._dummy(), password)
            raise InvalidCredentials("wrong email or password")
        if not await self._cpu(self._verify, stored, password):
            raise InvalidCredentials("wrong email or password")
        if self._needs_rehash(stored):
            await self._rehash(row["id"], stored, password)
        return Principal(
            user_id=row["id"],
            roles=canonical_roles(row["roles"]),
            kind="user",
            email=row["email"],
        )

    async def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = await self._cpu(self._hash, secrets.token_urlsafe(16))
        return self._dummy_hash

    async def _rehash(self, user_id: str, old_hash: str, password: str) -> None:
        new_hash = await self._cpu(self._hash, password)
        # Compare-and-set: a password changed meanwhile is not overwritten.
        await users.replace_hash(await self._db(), user_id, old_hash, new_hash)
        log.info("upgraded the password hash of %s", user_id)

    async def get(self, user_id: str) -> dict[str, Any]:
        row = await users.user_by_id(await self._db(), user_id)
        if row is None:
            raise UnknownUser(f"no user {user_id!r}")
        return _user(row)

    async def get_by_email(self, email: str) -> dict[str, Any]:
        try:
            email = normalize_email(email)
        except InvalidInput:
            raise UnknownUser("no user with this email") from None
        row = await users.user_by_email(await self._db(), email)
        if row is None:
            raise UnknownUser("no user with this email")
        return _user(row)

    async def set_roles(
        self, user_id: str, roles: Sequence[str], actor: Actor | None = None
    ) -> dict[str, Any]:
        """Replace the user's roles (``actor`` recorded in the audit log). InvalidRole
        (422) for an unknown name, UnknownUser (404), LastAdmin (409) when it would leave
        no admin. Applies at the next login."""
        wanted = canonical_roles(roles)

        def keep_an_admin(admins: set[str]) -> None:
            if admins == {user_id}:
                raise LastAdmin("this is the last admin; make another admin first")

        row = await users.set_roles(
            await self._db(),
            user_id,
            list(wanted),
            None if "admin" in wanted else keep_an_admin,
            actor,
        )
        if row is None:
            raise UnknownUser(f"no user {user_id!r}")
        return _user(row)

    async def ensure_admin(self, email: str, password: str | None = None) -> AdminBootstrap:
        """Make sure ``email`` is an admin (idempotent, safe on several replicas at once).

        A missing user is created with ``password`` (or a generated one, returned once in
        ``generated_password``; only its hash is stored). An existing user gets the admin
        role if it lacks it; its password is never touched.
        """
        email = normalize_email(email)
        generated = None
        if password is None:
            generated = secrets.token_urlsafe(18)
            password = generated
        check_password(password)
        pool = await self._db()
        row = await users.ref_by_email(pool, email)
        if row is None:
            password_hash = await self._cpu(self._hash, password)
            row = await users.insert_user(
                pool, _new_user_id(), email, "Administrator", password_hash, ["admin"]
            )
            if row is not None:
                log.info("created the first admin %s", email)
                return AdminBootstrap(
                    user_id=row["id"], created=True, promoted=False, generated_password=generated
                )
            # Another replica created it just now.
            row = await users.ref_by_email(pool, email)
            assert row is not None
        promoted = await users.grant_admin(pool, row["id"])
        if promoted:
            log.warning("gave the admin role to existing user %s", email)
        return AdminBootstrap(user_id=row["id"], created=False, promoted=promoted)

    # --- API keys ----------------------------------------------------------------------

    async def create_api_key(
        self, owner: Principal, name: str, roles: Sequence[str]
    ) -> tuple[str, str]:
        """``(key_id, plaintext_key)``; the plaintext is not kept anywhere, show it once.

        The roles must be delegable by the owner's roles as stored now (not as in its
        token): admins any role, managers ``integration`` only.
        """
        label = normalize_name(name)
        if label is None or len(label) > 100:
            raise InvalidName("an API key needs a name of 1 to 100 characters")
        if owner.kind != "user":
            raise RoleNotDelegable("API keys cannot create API keys; log in as a user")
        canonical_roles(roles)  # an unknown role name is a 422 before anything else
        pool = await self._db()
        current = await users.roles_of(pool, owner.user_id)
        if current is None:
            raise UnknownUser(f"no user {owner.user_id!r}")
        wanted = check_api_key_roles(
            Principal(user_id=owner.user_id, roles=canonical_roles(current), kind="user"), roles
        )
        for _ in range(3):
            parts = generate_api_key()
            stored = await users.insert_api_key(
                pool,
                parts.key_id,
                owner.user_id,
                label,
                hash_api_secret(parts.secret),
                list(wanted),
                actor_of(owner),
            )
            if not stored:
                continue  # 60-bit id collision: astronomically rare, just draw again
            log.info("API key %s created by %s with roles %s", parts.key_id, owner.user_id, wanted)
            return parts.key_id, parts.plaintext
        raise RuntimeError("could not draw a free API key id")

    async def revoke_api_key(self, key_id: str, by: Principal) -> None:
        """Revoke at once. Owners revoke their keys, admins any key. Idempotent.
        UnknownApiKey (404) for a key that does not exist or is someone else's."""
        pool = await self._db()
        owner_id = await users.api_key_owner(pool, key_id)
        if owner_id is None or not (owner_id == by.user_id or by.has("admin")):
            raise UnknownApiKey(f"no API key {key_id!r}")
        await users.revoke_api_key(pool, key_id, actor_of(by))
        log.info("API key %s revoked by %s", key_id, by.user_id)

    async def api_key_ids(self, owner_id: str) -> list[str]:
        """Every key id of ``owner_id`` (revoked ones included)."""
        return await users.api_key_ids(await self._db(), owner_id)

    async def list_api_keys(self, owner: Principal) -> list[dict[str, Any]]:
        """The owner's keys, newest first, without secrets or hashes."""
        return [_api_key(r) for r in await users.api_keys_of(await self._db(), owner.user_id)]

    async def authenticate_api_key(self, plaintext: str) -> Principal:
        """The principal of a valid, unrevoked key: InvalidApiKey or ApiKeyRevoked (401).

        One indexed query, no cache here (see the module docstring).
        """
        key_id, secret = parse_api_key(plaintext)
        row = await users.api_key_auth(await self._db(), key_id)
        if row is None:
            # Same work as a real check; the key id itself is not secret, but keep the
            # two failure paths alike anyway.
            verify_api_secret(secret, "0" * 64)
            raise InvalidApiKey("unknown API key")
        if not verify_api_secret(secret, row["secret_hash"]):
            raise InvalidApiKey("unknown API key")
        # Revocation is reported only to someone who holds the secret.
        if row["revoked_at"] is not None:
            raise ApiKeyRevoked("this API key was revoked")
        roles = [r for r in row["roles"] if r in delegable_roles(row["owner_roles"])]
        if row["stale"]:
            self._touch(key_id)
        return Principal(
            user_id=row["owner_id"],
            roles=canonical_roles(roles),
            kind="api_key",
            api_key_id=key_id,
            email=row["email"],
        )

    def _touch(self, key_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._mark_used(key_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _mark_used(self, key_id: str) -> None:
        try:
            await users.mark_api_key_used(await self._db(), key_id)
        except Exception:  # bookkeeping only; never fail or log-spam a request for it
            log.debug("could not record the use of API key %s", key_id, exc_info=True)


async def bootstrap_admin(settings: Settings, db: str | UserStore) -> str | None:
    """Start-up step: make sure ``VOUCHER_ADMIN_EMAIL`` is an admin.

    ``db`` is a DSN (a store is opened and closed for the call) or an open store.
    Returns the generated password when the admin was created just now without
    ``VOUCHER_ADMIN_PASSWORD`` (only its hash is stored: the caller shows it once), else
    None. Safe to run on every start and on several replicas at once.
    """
    store = UserStore(db, pool_size=1) if isinstance(db, str) else db
    try:
        result = await store.ensure_admin(settings.admin_email, settings.admin_password)
    finally:
        if isinstance(db, str):
            await store.close()
    return result.generated_password
