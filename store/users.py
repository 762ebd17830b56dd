"""Users and API keys in Postgres: the statements behind :class:`serve.users.UserStore`
(which holds the rules: hashing, role checks, error names)."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from engine.audit import Actor
from store import audit
from store.pools import Db

USER_COLUMNS = "id, email, name, roles, created_at, updated_at"
API_KEY_COLUMNS = "id, owner_id, name, roles, created_at, revoked_at, last_used_at"

# last_used_at is bookkeeping, not security: write it at most once a minute per key so the
# checkout hot path does not turn every request into a write.
LAST_USED_EVERY_S = 60

_AUTH_KEY_SQL = f"""
SELECT k.secret_hash, k.roles, k.revoked_at, k.owner_id, u.roles AS owner_roles, u.email,
       (k.last_used_at IS NULL
        OR k.last_used_at < now() - interval '{LAST_USED_EVERY_S} seconds') AS stale
FROM api_keys k JOIN users u ON u.id = k.owner_id
WHERE k.id = $1
"""


# --- users -------------------------------------------------------------------------------


async def insert_user(
    db: Db, user_id: str, email: str, name: str | None, password_hash: str, roles: list[str]
) -> asyncpg.Record | None:
    """The new user's row, or None when the email is taken."""
    return await db.fetchrow(
        f"""
        INSERT INTO users (id, email, name, password_hash, roles)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (email) DO NOTHING
        RETURNING {USER_COLUMNS}
        """,
        user_id,
        email,
        name,
        password_hash,
        roles,
    )


async def credentials(db: Db, email: str) -> asyncpg.Record | None:
    """``id, email, roles, password_hash`` of the user with ``email``."""
    return await db.fetchrow(
        "SELECT id, email, roles, password_hash FROM users WHERE email = $1", email
    )


async def replace_hash(db: Db, user_id: str, old_hash: str, new_hash: str) -> None:
    """Compare-and-set: a password changed meanwhile is not overwritten."""
    await db.execute(
        "UPDATE users SET password_hash = $3, updated_at = now()"
        " WHERE id = $1 AND password_hash = $2",
        user_id,
        old_hash,
        new_hash,
    )


async def user_by_id(db: Db, user_id: str) -> asyncpg.Record | None:
    return await db.fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE id = $1", user_id)


async def user_by_email(db: Db, email: str) -> asyncpg.Record | None:
    return await db.fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE email = $1", email)


async def ref_by_email(db: Db, email: str) -> asyncpg.Record | None:
    """``id, roles`` of the user with ``email``."""
    return await db.fetchrow("SELECT id, roles FROM users WHERE email = $1", email)


async def roles_of(db: Db, user_id: str) -> list[str] | None:
    roles = await db.fetchval("SELECT roles FROM users WHERE id = $1", user_id)
    return None if roles is None else list(roles)


async def set_roles(
    pool: asyncpg.Pool,
    user_id: str,
    roles: list[str],
    check_admins: Callable[[set[str]], None] | None,
    actor: Actor | None = None,
) -> asyncpg.Record | None:
    """Replace the user's roles in one transaction (with ``actor``'s audit entry); the
    updated row, or None for an unknown user. ``check_admins`` (when given) sees the ids of
    every admin, their rows locked first (two concurrent demotions cannot both pass it),
    and may refuse."""
    async with pool.acquire() as conn, conn.transaction():
        if check_admins is not None:
            admins = await conn.fetch(
                "SELECT id FROM users WHERE 'admin' = ANY(roles) ORDER BY id FOR UPDATE"
            )
            check_admins({r["id"] for r in admins})
        before = await conn.fetchval("SELECT roles FROM users WHERE id = $1 FOR UPDATE", user_id)
        row = await conn.fetchrow(
            f"UPDATE users SET roles = $2, updated_at = now() WHERE id = $1"
            f" RETURNING {USER_COLUMNS}",
            user_id,
            roles,
        )
        if row is not None and actor is not None and list(before) != roles:
            change = {"roles": [list(before), roles]}
            await audit.record(conn, actor, "user.set_roles", "user", user_id, change)
        return row


async def grant_admin(db: Db, user_id: str) -> bool:
    """Add the admin role; whether the user lacked it."""
    promoted = await db.fetchval(
        """
        UPDATE users SET roles = array_append(roles, 'admin'), updated_at = now()
        WHERE id = $1 AND NOT ('admin' = ANY(roles))
        RETURNING true
        """,
        user_id,
    )
    return bool(promoted)


# --- API keys ----------------------------------------------------------------------------


async def insert_api_key(
    db: Db,
    key_id: str,
    owner_id: str,
    name: str,
    secret_hash: str,
    roles: list[str],
    actor: Actor | None = None,
) -> bool:
    """Store a key (with ``actor``'s audit entry); False when ``key_id`` is taken
    already."""
    try:
        async with audit.changing(db) as conn:
            await conn.execute(
                "INSERT INTO api_keys (id, owner_id, name, secret_hash, roles)"
                " VALUES ($1, $2, $3, $4, $5)",
                key_id,
                owner_id,
                name,
                secret_hash,
                roles,
            )
            if actor is not None:
                change = {"owner_id": [None, owner_id], "name": [None, name], "roles": [None, roles]}
                await audit.record(conn, actor, "api_key.create", "api_key", key_id, change)
    except asyncpg.UniqueViolationError:
        return False
    return True


async def api_key_owner(db: Db, key_id: str) -> str | None:
    row = await db.fetchrow("SELECT owner_id FROM api_keys WHERE id = $1", key_id)
    return None if row is None else str(row["owner_id"])


async def revoke_api_key(db: Db, key_id: str, actor: Actor | None = None) -> None:
    async with audit.changing(db) as conn:
        status = await conn.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", key_id
        )
        if status == "UPDATE 1" and actor is not None:
            change = {"revoked": [False, True]}
            await audit.record(conn, actor, "api_key.revoke", "api_key", key_id, change)


async def api_key_ids(db: Db, owner_id: str) -> list[str]:
    rows = await db.fetch("SELECT id FROM api_keys WHERE owner_id = $1", owner_id)
    return [r["id"] for r in rows]


async def api_keys_of(db: Db, owner_id: str) -> list[asyncpg.Record]:
    """The owner's keys, newest first, without secrets or hashes."""
    return await db.fetch(
        f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE owner_id = $1"
        " ORDER BY created_at DESC, id",
        owner_id,
    )


async def api_key_auth(db: Db, key_id: str) -> asyncpg.Record | None:
    """What authenticating a key needs: its hash, roles and revocation, its owner's id,
    roles and email, and whether ``last_used_at`` is older than :data:`LAST_USED_EVERY_S`
    (``stale``)."""
    return await db.fetchrow(_AUTH_KEY_SQL, key_id)


async def mark_api_key_used(db: Db, key_id: str) -> None:
    await db.execute("UPDATE api_keys SET last_used_at = now() WHERE id = $1", key_id)


