"""Versioned schema migrations: ``store/sql/NNNN_name.sql``, applied in order, once.

Each file runs in its own transaction together with its row in ``schema_migrations``, so a
failing migration leaves nothing behind and is retried on the next run. Every transaction
first takes one advisory lock: engines starting side by side apply each file exactly once,
the others wait and then skip it. Applied files must never be edited; add a new file.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

from store.pools import connect

log = logging.getLogger("voucher.migrations")

# Any constant shared by all engines on a database; "voucher\0" as a big-endian int64.
ADVISORY_LOCK_KEY = int.from_bytes(b"voucher\0", "big", signed=True)

_FILE_NAME = re.compile(r"(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     text PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str


def load_migrations(package: str = "store", folder: str = "sql") -> list[Migration]:
    """The migration files shipped in ``package``/``folder``, ordered by version."""
    found: dict[str, Migration] = {}
    for entry in resources.files(package).joinpath(folder).iterdir():
        match = _FILE_NAME.fullmatch(entry.name)
        if match is None:
            continue
        version = match["version"]
        if version in found:
            raise RuntimeError(
                f"two migrations share version {version}: {found[version].name}, {match['name']}"
            )
        found[version] = Migration(version, match["name"], entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def migrate(dsn: str, migrations: list[Migration] | None = None) -> list[str]:
    """Apply the migrations not applied yet; return their versions (empty when up to date)."""
    pending = load_migrations() if migrations is None else migrations
    applied: list[str] = []
    conn = await connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK_KEY)
            await conn.execute(_CREATE_TABLE)
        for migration in pending:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK_KEY)
                done = await conn.fetchval(
                    "SELECT 1 FROM schema_migrations WHERE version = $1", migration.version
                )
                if done:
                    continue
                # No parameters: asyncpg sends it as a simple query, so a file may hold
                # many statements.
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, now())",
                    migration.version,
                )
            log.info("applied migration %s_%s", migration.version, migration.name)
            applied.append(migration.version)
    finally:
        await conn.close()
    return applied
