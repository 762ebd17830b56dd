from __future__ import annotations

import asyncio
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import redis.asyncio as aioredis

from ops.servers import Services
from store.migrations import Migration, load_migrations, migrate


async def test_postgres_answers_through_asyncpg(services: Services) -> None:
    conn = await asyncpg.connect(services.database_url)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT current_database()") == "voucher"
        # Durability is not traded for speed in the embedded default.
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
        assert await conn.fetchval("SHOW fsync") == "on"
    finally:
        await conn.close()


async def test_migrations_applied_and_idempotent(services: Services) -> None:
    # The session fixture migrated already: running again applies nothing.
    assert await migrate(services.database_url) == []
    assert await migrate(services.database_url) == []
    conn = await asyncpg.connect(services.database_url)
    try:
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
        assert "0001" in versions
        assert versions == [m.version for m in load_migrations()]
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        assert {"campaigns", "vouchers", "redemptions", "reservations"} <= tables
    finally:
        await conn.close()


async def test_concurrent_migrate_applies_each_file_once(services: Services) -> None:
    conn = await asyncpg.connect(services.database_url)
    try:
        await conn.execute("CREATE SCHEMA IF NOT EXISTS migrate_race")
    finally:
        await conn.close()
    # Race in a throwaway schema (own schema_migrations, own tables) to leave the real one alone.
    dsn = _with_query(services.database_url, options="-csearch_path=migrate_race")
    probe = [Migration("9001", "probe", "CREATE TABLE probe (id int PRIMARY KEY)")]
    try:
        results = await asyncio.gather(*(migrate(dsn, probe) for _ in range(4)))
        assert sorted(results) == [[], [], [], ["9001"]]
    finally:
        conn = await asyncpg.connect(services.database_url)
        try:
            await conn.execute("DROP SCHEMA migrate_race CASCADE")
        finally:
            await conn.close()


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


async def test_valkey_answers_ping_and_lua(services: Services) -> None:
    client = aioredis.from_url(services.redis_url)
    try:
        assert await client.ping() is True
        # The shape of the rate limiter / quota scripts: check and decrement atomically.
        script = """
        local left = tonumber(redis.call('GET', KEYS[1]) or ARGV[1])
        if left <= 0 then return -1 end
        redis.call('SET', KEYS[1], left - 1)
        return left - 1
        """
        await client.delete("test:quota")
        results = [await client.eval(script, 1, "test:quota", 2) for _ in range(3)]
        assert results == [1, 0, -1]
        await client.delete("test:quota")
    finally:
        await client.aclose()
