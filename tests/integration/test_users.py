"""UserStore against the real (embedded) Postgres. Each test uses its own emails."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from argon2 import PasswordHasher, Type

from engine.errors import Conflict, InvalidInput, NotFound
from engine.settings import Settings
from ops.servers import Services
from serve.auth import (
    ApiKeyRevoked,
    InvalidApiKey,
    InvalidCredentials,
    InvalidRole,
    Principal,
    RoleNotDelegable,
    TokenIssuer,
    WeakPassword,
    parse_api_key,
    verify_password,
)
from serve.permissions import authorize
from serve.users import (
    DuplicateEmail,
    LastAdmin,
    UnknownApiKey,
    UnknownUser,
    UserStore,
    bootstrap_admin,
)

PW = "correct horse battery"


def email(tag: str = "u") -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}@Example.com"


@pytest.fixture
async def store(services: Services) -> AsyncIterator[UserStore]:
    s = UserStore(services.database_url)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def make_user(store: UserStore, *roles: str) -> Principal:
    e = email(roles[0] if roles else "c")
    u = await store.register(e, PW, "Someone")
    if roles:
        await store.set_roles(u["id"], list(roles))
    return await store.login(e, PW)


async def test_migration_created_tables(services: Services) -> None:
    conn = await asyncpg.connect(services.database_url)
    try:
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
        assert {"users", "api_keys"} <= tables
        assert await conn.fetchval("SELECT 1 FROM schema_migrations WHERE version = '0002'") == 1
    finally:
        await conn.close()


async def test_register_and_login(store: UserStore, services: Services) -> None:
    e = email()
    u = await store.register(e, PW, "  Ada  ")
    assert u["email"] == e.lower()
    assert u["name"] == "Ada"
    assert u["roles"] == ["customer"]
    assert u["id"].startswith("usr_")
    assert "password_hash" not in u
    conn = await asyncpg.connect(services.database_url)
    try:
        stored = await conn.fetchval("SELECT password_hash FROM users WHERE id = $1", u["id"])
    finally:
        await conn.close()
    assert stored.startswith("$argon2id$") and PW not in stored

    p = await store.login(e.upper(), PW)
    assert p == Principal(user_id=u["id"], roles=("customer",), kind="user", email=e.lower())
    assert await store.get(u["id"]) == u


async def test_duplicate_email_conflicts(store: UserStore) -> None:
    e = email()
    await store.register(e, PW, "a")
    with pytest.raises(DuplicateEmail) as info:
        await store.register(e.upper(), "another password", "b")
    assert isinstance(info.value, Conflict)
    assert info.value.code == "duplicate_email"


async def test_concurrent_registration_one_wins(store: UserStore) -> None:
    e = email()
    results = await asyncio.gather(
        *(store.register(e, PW, str(i)) for i in range(4)), return_exceptions=True
    )
    assert sum(isinstance(r, dict) for r in results) == 1
    assert sum(isinstance(r, DuplicateEmail) for r in results) == 3


async def test_register_validates(store: UserStore) -> None:
    with pytest.raises(WeakPassword):
        await store.register(email(), "short", "x")
    with pytest.raises(InvalidInput):
        await store.register("not-an-email", PW, "x")


async def test_login_failures_are_uniform(store: UserStore) -> None:
    e = email()
    await store.register(e, PW, "x")
    with pytest.raises(InvalidCredentials) as wrong:
        await store.login(e, "wrong password")
    with pytest.raises(InvalidCredentials) as unknown:
        await store.login(email("ghost"), PW)
    with pytest.raises(InvalidCredentials):
        await store.login("garbage", PW)
    assert wrong.value.detail == unknown.value.detail
    assert wrong.value.status == 401

    # Timing: an unknown email still pays for an Argon2 verification.
    async def timed(addr: str) -> float:
        t0 = time.perf_counter()
        with pytest.raises(InvalidCredentials):
            await store.login(addr, "wrong password")
        return time.perf_counter() - t0

    await timed(email("ghost"))  # warms the dummy hash
    # interleaved, so a burst of other work on the machine slows both kinds alike
    knowns, ghosts = [], []
    for _ in range(5):
        knowns.append(await timed(e))
        ghosts.append(await timed(email("ghost")))
    known, ghost = min(knowns), min(ghosts)
    assert ghost > known * 0.5, (knowns, ghosts)


async def test_login_rehashes_old_parameters(store: UserStore, services: Services) -> None:
    e = email()
    u = await store.register(e, PW, "x")
    old = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1, type=Type.ID).hash(PW)
    conn = await asyncpg.connect(services.database_url)
    try:
        await conn.execute("UPDATE users SET password_hash = $2 WHERE id = $1", u["id"], old)
        await store.login(e, PW)
        new = await conn.fetchval("SELECT password_hash FROM users WHERE id = $1", u["id"])
    finally:
        await conn.close()
    assert new != old and "m=19456,t=2,p=1" in new
    assert verify_password(new, PW)


async def test_get_unknown_user(store: UserStore) -> None:
    with pytest.raises(UnknownUser) as info:
        await store.get("usr_nope")
    assert isinstance(info.value, NotFound)


async def test_set_roles_applies_at_next_login(store: UserStore) -> None:
    issuer = TokenIssuer(b"s" * 32)
    e = email()
    u = await store.register(e, PW, "x")
    old_token, _ = issuer.issue(await store.login(e, PW))
    updated = await store.set_roles(u["id"], ["analyst", "manager", "manager"])
    assert updated["roles"] == ["manager", "analyst"]
    # The old token keeps its roles until it expires; a new login carries the new ones.
    assert issuer.verify(old_token).roles == ("customer",)
    assert issuer.verify(issuer.issue(await store.login(e, PW))[0]).roles == ("manager", "analyst")


async def test_set_roles_validates(store: UserStore) -> None:
    u = await store.register(email(), PW, "x")
    with pytest.raises(InvalidRole) as info:
        await store.set_roles(u["id"], ["root"])
    assert isinstance(info.value, InvalidInput)
    with pytest.raises(UnknownUser):
        await store.set_roles("usr_nope", ["analyst"])


async def test_last_admin_guard(services: Services) -> None:
    # In a schema of its own, so other tests' admins do not count.
    schema = f"users_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(services.database_url)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(f"CREATE TABLE {schema}.users (LIKE public.users INCLUDING ALL)")
        pool = await asyncpg.create_pool(
            services.database_url,
            min_size=1,
            max_size=2,
            server_settings={"search_path": schema},
        )
        assert pool is not None
        s = UserStore(pool)
        try:
            first = await s.ensure_admin(email("root"), "root password")
            with pytest.raises(LastAdmin):
                await s.set_roles(first.user_id, ["manager"])
            second = await s.ensure_admin(email("root2"), "root password")
            results = await asyncio.gather(
                s.set_roles(first.user_id, ["manager"]),
                s.set_roles(second.user_id, ["manager"]),
                return_exceptions=True,
            )
            assert sum(isinstance(r, LastAdmin) for r in results) == 1
        finally:
            await pool.close()
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


async def test_ensure_admin_bootstrap(store: UserStore, services: Services) -> None:
    e = email("admin")
    first = await store.ensure_admin(e, None)
    assert first.created and first.generated_password
    p = await store.login(e, first.generated_password)
    assert p.roles == ("admin",)
    authorize(p, "users.set_roles")
    # Idempotent; never overwrites the password, even when another one is configured now.
    again = await store.ensure_admin(e, "a different password")
    assert (again.created, again.promoted, again.generated_password) == (False, False, None)
    assert again.user_id == first.user_id
    await store.login(e, first.generated_password)
    with pytest.raises(InvalidCredentials):
        await store.login(e, "a different password")
    conn = await asyncpg.connect(services.database_url)
    try:
        stored = await conn.fetchval("SELECT password_hash FROM users WHERE id = $1", p.user_id)
    finally:
        await conn.close()
    assert first.generated_password not in stored


async def test_ensure_admin_promotes_existing_user(store: UserStore) -> None:
    e = email()
    u = await store.register(e, PW, "x")
    result = await store.ensure_admin(e, "ignored password")
    assert (result.user_id, result.created, result.promoted) == (u["id"], False, True)
    assert (await store.login(e, PW)).roles == ("admin", "customer")


async def test_ensure_admin_concurrent_replicas(services: Services) -> None:
    e = email("admin")
    stores = [UserStore(services.database_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(s.ensure_admin(e, None) for s in stores))
    finally:
        for s in stores:
            await s.close()
    assert sum(r.created for r in results) == 1
    passwords = [r.generated_password for r in results if r.generated_password]
    assert len(passwords) == 1
    assert len({r.user_id for r in results}) == 1


async def test_bootstrap_admin_from_settings(services: Services) -> None:
    e = email("boot")
    settings = Settings(admin_email=e)
    generated = await bootstrap_admin(settings, services.database_url)
    assert generated
    assert await bootstrap_admin(settings, services.database_url) is None
    s = UserStore(services.database_url)
    try:
        assert (await s.login(e, generated)).roles == ("admin",)
        e2 = email("boot")
        assert (
            await bootstrap_admin(Settings(admin_email=e2, admin_password="configured pw"), s)
            is None
        )
        assert (await s.login(e2, "configured pw")).roles == ("admin",)
    finally:
        await s.close()


# --- API keys --------------------------------------------------------------------------


async def test_api_key_lifecycle(store: UserStore, services: Services) -> None:
    manager = await make_user(store, "manager")
    key_id, plaintext = await store.create_api_key(manager, "checkout", ["integration"])
    assert parse_api_key(plaintext)[0] == key_id
    conn = await asyncpg.connect(services.database_url)
    try:
        row = await conn.fetchrow("SELECT * FROM api_keys WHERE id = $1", key_id)
    finally:
        await conn.close()
    assert row["secret_hash"] != parse_api_key(plaintext)[1]
    assert plaintext not in str(dict(row))

    p = await store.authenticate_api_key(plaintext)
    assert p == Principal(
        user_id=manager.user_id,
        roles=("integration",),
        kind="api_key",
        api_key_id=key_id,
        email=manager.email,
    )
    authorize(p, "redemptions.create")

    listed = await store.list_api_keys(manager)
    assert [k["id"] for k in listed] == [key_id]
    assert listed[0]["name"] == "checkout" and listed[0]["revoked"] is False
    assert "secret_hash" not in listed[0] and plaintext not in str(listed)

    await store.revoke_api_key(key_id, manager)
    with pytest.raises(ApiKeyRevoked) as info:
        await store.authenticate_api_key(plaintext)
    assert info.value.status == 401 and info.value.type == "api_key_revoked"
    await store.revoke_api_key(key_id, manager)  # idempotent
    assert (await store.list_api_keys(manager))[0]["revoked"] is True


async def test_revocation_seen_at_once_by_other_replicas(services: Services) -> None:
    a, b = UserStore(services.database_url), UserStore(services.database_url)
    try:
        admin = await make_user(a, "admin")
        key_id, plaintext = await a.create_api_key(admin, "svc", ["integration"])
        for _ in range(3):
            await b.authenticate_api_key(plaintext)
        await a.revoke_api_key(key_id, admin)
        with pytest.raises(ApiKeyRevoked):
            await b.authenticate_api_key(plaintext)
    finally:
        await a.close()
        await b.close()


async def test_wrong_or_unknown_keys_rejected(store: UserStore) -> None:
    admin = await make_user(store, "admin")
    key_id, plaintext = await store.create_api_key(admin, "svc", ["analyst"])
    tampered = plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")
    for bad in (tampered, "vk_" + "a" * 12 + "_" + "b" * 32, "vk_nope", "Bearer x"):
        with pytest.raises(InvalidApiKey):
            await store.authenticate_api_key(bad)


async def test_api_key_roles_limited_by_creator(store: UserStore) -> None:
    manager = await make_user(store, "manager")
    for roles in (["admin"], ["manager"], ["integration", "analyst"]):
        with pytest.raises(RoleNotDelegable):
            await store.create_api_key(manager, "x", roles)
    with pytest.raises(InvalidRole):
        await store.create_api_key(manager, "x", ["root"])
    admin = await make_user(store, "admin")
    _, plaintext = await store.create_api_key(admin, "x", ["analyst", "customer"])
    assert (await store.authenticate_api_key(plaintext)).roles == ("analyst", "customer")
    customer = await make_user(store)
    with pytest.raises(RoleNotDelegable):
        await store.create_api_key(customer, "x", ["customer"])
    key = await store.authenticate_api_key(plaintext)
    with pytest.raises(RoleNotDelegable):
        await store.create_api_key(key, "x", ["customer"])


async def test_creator_roles_read_from_database_not_token(store: UserStore) -> None:
    manager = await make_user(store, "manager")
    await store.set_roles(manager.user_id, ["analyst"])
    # The principal (as from a still-valid token) says manager; the database says not.
    with pytest.raises(RoleNotDelegable):
        await store.create_api_key(manager, "x", ["integration"])


async def test_demoting_owner_narrows_its_keys_at_once(store: UserStore) -> None:
    manager = await make_user(store, "manager")
    _, plaintext = await store.create_api_key(manager, "svc", ["integration"])
    assert (await store.authenticate_api_key(plaintext)).roles == ("integration",)
    await store.set_roles(manager.user_id, ["analyst"])
    assert (await store.authenticate_api_key(plaintext)).roles == ()


async def test_revoke_permissions(store: UserStore) -> None:
    m1 = await make_user(store, "manager")
    m2 = await make_user(store, "manager")
    admin = await make_user(store, "admin")
    key_id, plaintext = await store.create_api_key(m1, "svc", ["integration"])
    with pytest.raises(UnknownApiKey):
        await store.revoke_api_key(key_id, m2)
    with pytest.raises(UnknownApiKey):
        await store.revoke_api_key("abcdefghijkl", m1)
    assert await store.list_api_keys(m2) == []
    await store.authenticate_api_key(plaintext)
    await store.revoke_api_key(key_id, admin)
    with pytest.raises(ApiKeyRevoked):
        await store.authenticate_api_key(plaintext)


async def test_last_used_recorded(store: UserStore) -> None:
    admin = await make_user(store, "admin")
    key_id, plaintext = await store.create_api_key(admin, "svc", ["integration"])
    assert (await store.list_api_keys(admin))[0]["last_used_at"] is None
    await store.authenticate_api_key(plaintext)
    for _ in range(50):
        if (await store.list_api_keys(admin))[0]["last_used_at"] is not None:
            break
        await asyncio.sleep(0.02)
    assert (await store.list_api_keys(admin))[0]["last_used_at"] is not None


async def test_api_key_authentication_is_fast(store: UserStore) -> None:
    admin = await make_user(store, "admin")
    _, plaintext = await store.create_api_key(admin, "svc", ["integration"])
    await store.authenticate_api_key(plaintext)
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        await store.authenticate_api_key(plaintext)
    per_call = (time.perf_counter() - t0) / n
    # One indexed query, no cache: well under a millisecond here; bound loosely for CI.
    print(f"authenticate_api_key: {per_call * 1e3:.3f} ms per call")
    assert per_call < 0.02, per_call
