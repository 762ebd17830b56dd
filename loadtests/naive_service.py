"""The naive HTTP baseline of ``loadtests.bench_http``: one uvicorn worker, FastAPI and an
asyncpg pool, one Postgres transaction per redemption on one shared-code row.

    python -m loadtests.naive_service --dsn postgresql://... --port 8100 [--pool 16]

``POST /v1/redemptions`` takes the engine's request body (the same pydantic model,
``serve.models.CheckoutIn``, so validation costs the same) and an optional
``Idempotency-Key`` header, and does the obvious thing::

    BEGIN
    SELECT id, remaining, discount FROM campaigns WHERE shared_code = $code FOR UPDATE
    -- 404 unknown code, 409 sold out
    UPDATE campaigns SET remaining = remaining - 1 WHERE id = $id
    INSERT INTO redemptions (...) VALUES (...)
    COMMIT                                   -- 201 with the redemption

Every redemption of the shared code queues on that one row lock, held until its commit has
been flushed. The server's ``synchronous_commit`` is left as it is: the engine answers a
durable redemption only after its group commit, so the baseline pays for its commits too.
No authentication and no rate limit (the engine does both): the baseline is the cheapest
honest way to get the same durable answer.

``GET /healthz`` is a no-op. :func:`prepare` creates the schema and the shared code.
"""

from __future__ import annotations

import argparse
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse

from serve.models import CheckoutIn

SCHEMA = "bench_http_naive"

_SELECT = f"SELECT id, remaining, discount, currency FROM {SCHEMA}.campaigns WHERE shared_code = $1 FOR UPDATE"
_UPDATE = f"UPDATE {SCHEMA}.campaigns SET remaining = remaining - 1 WHERE id = $1"
_INSERT = (
    f"INSERT INTO {SCHEMA}.redemptions (id, campaign_id, code, customer_id, order_id, "
    "order_amount, currency, discount_amount, idempotency_key, created_at) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
)


async def prepare(dsn: str, code: str, stock: int) -> str:
    """(Re)create the baseline's schema with one active shared-code campaign; its id."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            f"""
            DROP SCHEMA IF EXISTS {SCHEMA} CASCADE;
            CREATE SCHEMA {SCHEMA};
            CREATE TABLE {SCHEMA}.campaigns (
                id          text PRIMARY KEY,
                shared_code text NOT NULL UNIQUE,
                currency    text NOT NULL,
                discount    bigint NOT NULL,
                remaining   bigint NOT NULL
            );
            CREATE TABLE {SCHEMA}.redemptions (
                id              text PRIMARY KEY,
                campaign_id     text NOT NULL,
                code            text NOT NULL,
                customer_id     text,
                order_id        text,
                order_amount    bigint NOT NULL,
                currency        text NOT NULL,
                discount_amount bigint NOT NULL,
                idempotency_key text UNIQUE,
                created_at      timestamptz NOT NULL
            );
            CREATE INDEX ON {SCHEMA}.redemptions (campaign_id);
            """
        )
        campaign_id = "naive-shared"
        await conn.execute(
            f"INSERT INTO {SCHEMA}.campaigns VALUES ($1, $2, 'EUR', 500, $3)",
            campaign_id,
            code,
            stock,
        )
        return campaign_id
    finally:
        await conn.close()


async def drop(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    finally:
        await conn.close()


def _problem(status: int, kind: str, detail: str) -> JSONResponse:
    return JSONResponse(
        {"type": f"urn:problem:{kind}", "status": status, "detail": detail},
        status_code=status,
        media_type="application/problem+json",
    )


def build_app(dsn: str, pool_size: int) -> FastAPI:
    pool: asyncpg.Pool | None = None

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        nonlocal pool
        pool = await asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size)
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/redemptions", status_code=201)
    async def redeem(
        body: CheckoutIn,
        idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
    ) -> JSONResponse:
        assert pool is not None
        if body.order.currency != "EUR":
            return _problem(422, "currency_mismatch", "the campaign is in EUR")
        rid = f"red_{uuid.uuid4().hex}"
        now = datetime.now(UTC)
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_SELECT, body.code)
            if row is None:
                return _problem(404, "unknown_code", f"no voucher has code {body.code!r}")
            if row["remaining"] <= 0:
                return _problem(409, "exhausted", "the campaign has no redemptions left")
            discount = min(int(row["discount"]), body.order.amount)
            await conn.execute(_UPDATE, row["id"])
            await conn.execute(
                _INSERT,
                rid,
                row["id"],
                body.code,
                body.customer_id,
                body.order.id,
                body.order.amount,
                body.order.currency,
                discount,
                idempotency_key,
                now,
            )
        return JSONResponse(
            {
                "id": rid,
                "code": body.code,
                "campaign_id": row["id"],
                "customer_id": body.customer_id,
                "order_id": body.order.id,
                "order_amount": body.order.amount,
                "currency": body.order.currency,
                "discount_amount": discount,
                "balance": None,
                "status": "redeemed",
            },
            status_code=201,
            headers={"Location": f"/v1/redemptions/{rid}"},
        )

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pool", type=int, default=16, help="asyncpg connections")
    args = p.parse_args(argv)
    uvicorn.run(
        build_app(args.dsn, args.pool),
        host=args.host,
        port=args.port,
        workers=1,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
