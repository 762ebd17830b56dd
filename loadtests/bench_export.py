"""Exporting a campaign's codes as CSV over HTTP: the job, then the download.

    python -m loadtests.bench_export --codes 1000000 --rounds 2

Starts embedded Postgres and Valkey, the engine and the HTTP API, generates ``--codes``
codes into one campaign (not timed) and redeems ``--redeem`` of them, then per round:
``POST /v1/campaigns/{id}/exports`` and polls ``GET /v1/exports/{id}`` until it is done
(the job: Postgres formats the CSV a 50,000-code chunk per transaction), then streams
``GET /v1/exports/{id}/download`` to the end (the download). The file is checked against
Postgres: one line per code, the codes in code order and each code's status as stored.
Reports the job's, the download's and the total time, and codes/s. Target: 1M codes
exported (job and download) in at most 10 s. Then the export is deleted
(``DELETE /v1/exports/{id}``): the time until the answer, and until Postgres holds nothing
of it (the gateway's sweep purges the file in the background).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx

from loadtests.bench_plumbing import http_engine

TARGET_S = 10.0


def _campaign(c: httpx.Client, admin: dict[str, str]) -> str:
    r = c.post("/v1/campaigns", headers=admin, json={
        "name": "bench export", "type": "discount", "currency": "EUR",
        "discount": {"kind": "percent", "value": 10},
        "code": {"length": 12},
        "ends_at": (datetime.now(UTC) + timedelta(days=30)).isoformat(),
    })
    r.raise_for_status()
    return str(r.json()["id"])


def _generate(c: httpx.Client, admin: dict[str, str], cid: str, n: int) -> None:
    r = c.post(f"/v1/campaigns/{cid}/generate", json={"count": n}, headers=admin)
    r.raise_for_status()
    while (j := c.get(f"/v1/jobs/{r.json()['id']}", headers=admin).json())["state"] == "running":
        time.sleep(0.2)
    assert j["state"] == "done" and j["generated"] == n, j


async def _expected(dsn: str, cid: str) -> tuple[int, str]:
    """The campaign's code and status lines as the export writes them: count and digest."""
    from store.pools import connect

    conn = await connect(dsn)
    try:
        digest = hashlib.sha256()
        count = 0
        async with conn.transaction():
            async for r in conn.cursor(
                "SELECT code, status FROM vouchers WHERE campaign_id = $1 ORDER BY code", cid,
                prefetch=50_000,
            ):
                digest.update(f"{r['code']},{r['status']}\n".encode())
                count += 1
        return count, digest.hexdigest()
    finally:
        await conn.close()


def _delete(c: httpx.Client, admin: dict[str, str], dsn: str, export_id: str) -> tuple[float, float]:
    """(s until ``DELETE /v1/exports/{id}`` answers, s until Postgres holds nothing of the
    export) of deleting a finished export."""
    t0 = time.perf_counter()
    r = c.delete(f"/v1/exports/{export_id}", headers=admin)
    assert r.status_code == 200, r.text
    answered = time.perf_counter() - t0
    assert c.get(f"/v1/exports/{export_id}", headers=admin).status_code == 404

    async def left() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            return int(await conn.fetchval(
                "SELECT (SELECT count(*) FROM exports WHERE id = $1)"
                " + (SELECT count(*) FROM export_chunks WHERE export_id = $1)", export_id))
        finally:
            await conn.close()

    while asyncio.run(left()):
        assert time.perf_counter() - t0 < 600, "the export's file was not purged in 600 s"
        time.sleep(0.1)
    return answered, time.perf_counter() - t0


def _export(c: httpx.Client, admin: dict[str, str], cid: str) -> tuple[float, float, int, str, str]:
    """(job s, download s, bytes, digest of code,status lines, export id) of one export."""
    names = {"available": 0, "assigned": 1, "redeemed": 2, "void": 3}
    t0 = time.perf_counter()
    r = c.post(f"/v1/campaigns/{cid}/exports", json={"format": "csv"}, headers=admin)
    assert r.status_code == 202, r.text
    export_id = r.json()["id"]
    while (j := c.get(f"/v1/exports/{export_id}", headers=admin).json())["state"] == "running":
        time.sleep(0.05)
    job_s = time.perf_counter() - t0
    assert j["state"] == "done", j
    t1 = time.perf_counter()
    size = 0
    chunks = []
    with c.stream("GET", j["download"], headers=admin) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/csv")
        for data in resp.iter_raw():
            size += len(data)
            chunks.append(data)
    download_s = time.perf_counter() - t1
    # checked after the clock stopped: code and status of every line (codes hold no commas)
    digest = hashlib.sha256()
    lines = b"".join(chunks).decode().splitlines()[1:]
    for line in lines:
        code, status, _ = line.split(",", 2)
        digest.update(f"{code},{names[status]}\n".encode())
    return job_s, download_s, size, digest.hexdigest(), export_id


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", type=int, default=1_000_000)
    ap.add_argument("--redeem", type=int, default=1000, help="codes redeemed before the exports")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--shards", type=int, default=2)
    args = ap.parse_args(argv)

    from engine.gcra import parse_limit

    rows = []
    # a high admin rate: the redemptions before the exports
    with http_engine("bench-export", args.shards, rate_admin=parse_limit("100000/200000")) as e:
        c, admin, dsn = e.client, e.admin, e.dsn
        cid = _campaign(c, admin)
        t0 = time.perf_counter()
        _generate(c, admin, cid, args.codes)
        print(f"generated {args.codes:,} codes in {time.perf_counter() - t0:.1f} s (not timed)", flush=True)
        c.post(f"/v1/campaigns/{cid}/activate", headers=admin).raise_for_status()
        page = c.get(f"/v1/campaigns/{cid}/vouchers", params={"limit": min(args.redeem, 1000)},
                     headers=admin).json()["data"]
        for i, v in enumerate(page[: args.redeem]):
            c.post("/v1/redemptions", headers=admin, json={
                "code": v["code"], "order": {"id": f"o{i}", "amount": 5000, "currency": "EUR"},
            }).raise_for_status()
        count, want = asyncio.run(_expected(dsn, cid))
        assert count == args.codes, count
        for i in range(args.rounds):
            job_s, dl_s, size, got, export_id = _export(c, admin, cid)
            assert got == want, "the CSV differs from Postgres"
            total = job_s + dl_s
            rows.append((job_s, dl_s, total))
            answered, purged = _delete(c, admin, dsn, export_id)
            print(
                f"round {i + 1}: job {job_s:.2f} s, download {dl_s:.2f} s ({size / 1e6:.1f} MB,"
                f" {size / 1e6 / dl_s:.0f} MB/s), total {total:.2f} s"
                f" ({args.codes / total:,.0f} codes/s); every line checked against Postgres;"
                f" deleted: answered in {answered * 1000:.0f} ms, file purged after {purged:.2f} s",
                flush=True,
            )
    med = statistics.median(t for _, _, t in rows)
    print(f"median total: {med:.2f} s for {args.codes:,} codes (target <= {TARGET_S:.0f} s:"
          f" {'met' if med <= TARGET_S else 'NOT met'})")
    return 0 if med <= TARGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
