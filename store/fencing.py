"""Ownership epochs of the single writers (fencing tokens) and the stored shard topology.

One writer per part of the data is the engine's design, and "one" must survive a network
split, a frozen process and a change of the shard count. Ray only makes two live owners
unlikely; Postgres makes their overlap harmless (``store/sql/0008_fencing.sql``):

* a writer *claims* its epoch when it loads (:func:`claim`, :func:`claim_shard`): the
  claim's row update waits for the share lock of the old owner's in-flight commit and
  commits before the new owner reads anything, so every old commit is either in what the
  new owner loads or refused;
* every write runs ``voucher_fence(owner, epoch)`` inside its own statement or transaction
  (:data:`FENCE_SQL` / :meth:`Fence.check`): a stale epoch aborts it with SQLSTATE VF001,
  which :func:`fenced_error` turns into :class:`engine.errors.Fenced`;
* the shard count of a deployment lives in ``topology``; :func:`reshard` changes it and
  bumps every shard owner's epoch in one transaction, fencing every old shard at once.

Owner names carry the deployment (the Ray namespace): ``voucher/shard-3``,
``voucher/coordinator``. One database serves one deployment of a given name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg

from engine import errors

FENCED_SQLSTATE = "VF001"
CLAIM_LOST_SQLSTATE = "VF002"
#: a statement (or a CTE statement's final SELECT) that checks the fence: ``$1`` owner, ``$2`` epoch
FENCE_SQL = "SELECT voucher_fence($1, $2)"


def shard_owner(namespace: str, shard_id: int) -> str:
    return f"{namespace}/shard-{shard_id}"


def owner_name(namespace: str, role: str) -> str:
    """The owner name of a singleton writer (``coordinator``, ``issuer``)."""
    return f"{namespace}/{role}"


@dataclass(frozen=True)
class Fence:
    """The epoch one writer claimed; every write it makes checks it."""

    owner: str
    epoch: int

    @property
    def args(self) -> tuple[str, int]:
        return (self.owner, self.epoch)

    async def check(self, conn: asyncpg.Connection) -> None:
        """Check the fence on ``conn``: call it first in a transaction (its share lock on
        the owner row lasts until the transaction ends). Raises :class:`errors.Fenced`."""
        try:
            await conn.fetchval(FENCE_SQL, self.owner, self.epoch)
        except asyncpg.PostgresError as exc:
            raise fenced_error(exc) from None

    async def execute(self, pool: asyncpg.Pool, sql: str, *args: Any) -> str:
        """One write statement in a transaction that checks the fence first."""
        async with pool.acquire() as conn, fenced(conn, self):
            result: str = await conn.execute(sql, *args)
        return result


def fenced_error(exc: BaseException) -> BaseException:
    """``exc`` as :class:`errors.Fenced` when it is the fence's refusal, else unchanged."""
    state = getattr(exc, "sqlstate", None) if isinstance(exc, asyncpg.PostgresError) else None
    if state == FENCED_SQLSTATE:
        return errors.Fenced(str(exc))
    if state == CLAIM_LOST_SQLSTATE:
        return errors.ClaimLost(str(exc))
    return exc


@asynccontextmanager
async def fenced(conn: asyncpg.Connection, fence: Fence | None) -> AsyncIterator[None]:
    """A transaction on ``conn`` that checks ``fence`` first (none: a plain transaction,
    for tools and tests writing outside any engine); a refusal raises
    :class:`errors.Fenced` (or :class:`errors.ClaimLost`)."""
    try:
        async with conn.transaction():
            if fence is not None:
                await fence.check(conn)
            yield
    except asyncpg.PostgresError as exc:
        raise fenced_error(exc) from None


_CLAIM = (
    "INSERT INTO owners (name, epoch) VALUES ($1, 1)"
    " ON CONFLICT (name) DO UPDATE SET epoch = owners.epoch + 1, claimed_at = now()"
    " RETURNING epoch"
)


async def bump(conn: asyncpg.Connection, owner: str) -> int:
    """A new epoch for ``owner`` in the caller's transaction (waits for the owner's
    in-flight commit); the owner's next write is refused once this commits."""
    return int(await conn.fetchval(_CLAIM, owner))


async def claim(conn: asyncpg.Connection, owner: str) -> Fence:
    """Take ownership: a new epoch, committed before this returns (waits for the old
    owner's in-flight commit to finish)."""
    async with conn.transaction():
        epoch = await bump(conn, owner)
    return Fence(owner, epoch)


async def claim_shard(
    conn: asyncpg.Connection, namespace: str, shard_id: int, shards: int
) -> Fence:
    """Claim shard ``shard_id`` of a deployment of ``shards`` shards. Refuses (with
    :class:`errors.Fenced`) when the stored topology has another shard count: this process
    belongs to a topology that was replaced."""
    async with conn.transaction():
        # a deployment's first shard stores the topology (start_engine usually did)
        await conn.execute(
            "INSERT INTO topology (deployment, shards) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            namespace,
            shards,
        )
        stored = await conn.fetchval(
            "SELECT shards FROM topology WHERE deployment = $1 FOR SHARE", namespace
        )
        if stored != shards or not 0 <= shard_id < shards:
            raise errors.Fenced(
                f"shard {shard_id} of {shards} belongs to a replaced topology: "
                f"deployment {namespace!r} has {stored} shards"
            )
        epoch = await bump(conn, shard_owner(namespace, shard_id))
    return Fence(shard_owner(namespace, shard_id), epoch)


async def current_epoch(conn: asyncpg.Connection, owner: str) -> int | None:
    value = await conn.fetchval("SELECT epoch FROM owners WHERE name = $1", owner)
    return None if value is None else int(value)


async def stored_topology(conn: asyncpg.Connection, namespace: str) -> tuple[int, int] | None:
    """``(shards, version)`` stored for the deployment, or None."""
    row = await conn.fetchrow(
        "SELECT shards, version FROM topology WHERE deployment = $1", namespace
    )
    return None if row is None else (int(row["shards"]), int(row["version"]))


async def ensure_topology(conn: asyncpg.Connection, namespace: str, shards: int) -> tuple[int, int]:
    """The stored topology; a new deployment stores ``shards``. Raises
    :class:`errors.TopologyMismatch` when another count is stored (``reshard`` changes it)."""
    await conn.execute(
        "INSERT INTO topology (deployment, shards) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        namespace,
        shards,
    )
    found = await stored_topology(conn, namespace)
    assert found is not None
    if found[0] != shards:
        raise errors.TopologyMismatch(
            f"deployment {namespace!r} runs {found[0]} shards, VOUCHER_SHARDS asks for {shards}:"
            f" change it with `voucher-engine reshard {shards}`"
        )
    return found


async def reshard(conn: asyncpg.Connection, namespace: str, shards: int) -> int:
    """Store a new shard count and fence every shard owner of the deployment in one
    transaction (it waits for their in-flight commits); returns the new topology version."""
    if not 1 <= shards <= 1024:
        raise errors.InvalidInput("the shard count must be between 1 and 1024")
    async with conn.transaction():
        version = await conn.fetchval(
            "INSERT INTO topology (deployment, shards) VALUES ($1, $2)"
            " ON CONFLICT (deployment) DO UPDATE SET shards = EXCLUDED.shards,"
            " version = topology.version + 1, changed_at = now() RETURNING version",
            namespace,
            shards,
        )
        await conn.execute(
            "UPDATE owners SET epoch = epoch + 1, claimed_at = now()"
            " WHERE starts_with(name, $1)",
            f"{namespace}/shard-",
        )
    return int(version)
