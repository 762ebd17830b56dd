"""Customer import and issuance figures on this machine (producer side only: no delivery
workers run, so the figure is read customers -> codes assigned -> messages recorded and
queued on the Redis stream).

    python -m loadtests.bench_issuance [--customers 100000] [--import-only]

One run starts embedded Postgres and Valkey in a throwaway directory, a local Ray, the
shard actors and the HTTP app, then:

1. streams a CSV of N customers (every one with email consent, tag ``bench``) to
   ``POST /v1/customers/import`` in 256 KiB chunks, and reads the gateway replica's RSS
   before and after (the import is parsed and upserted batch by batch, so memory must not
   grow with the file);
2. generates N codes (``POST /v1/campaigns/{id}/generate``);
3. runs ``POST /v1/campaigns/{id}/issuance`` on the tag with the email channel and polls
   ``GET /v1/jobs/{id}`` to the end; then checks N distinct codes, N delivery rows and N
   stream entries;
4. runs the same issuance again (nothing new may be assigned or queued).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psutil


def _gateway_rss() -> int:
    total = 0
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "ServeReplica:voucher:Gateway" in cmd:
            total = max(total, p.memory_info().rss)
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--customers", type=int, default=100_000)
    ap.add_argument("--import-only", action="store_true", help="measure the import only")
    args = ap.parse_args(argv)
    n = args.customers

    from actors.client import start_engine
    from engine.settings import Settings
    from ops.start import start_http
    from tests.support import RAY_NAMESPACE, free_port, running_ray, running_services

    with tempfile.TemporaryDirectory() as tmp, running_services(Path(tmp)) as svc, running_ray():
        settings = Settings(
            shards=4,
            namespace=RAY_NAMESPACE,
            http_port=free_port(),
            admin_email="bench@example.com",
            admin_password="bench-password",
            data_dir=tmp,
        )
        engine = start_engine(settings, svc.database_url)  # keep the handles: actors live with them
        url = start_http(settings, svc.database_url, svc.redis_url)
        tok = httpx.post(
            f"{url}/v1/auth/login", json={"email": "bench@example.com", "password": "bench-password"}
        ).json()["access_token"]
        h = {"Authorization": f"Bearer {tok}"}
        client = httpx.Client(headers=h, timeout=600)

        def csv() -> Any:
            yield b"id,email,consent_email,tags\n"
            buf: list[bytes] = []
            size = 0
            for i in range(n):
                line = f"bench-{i:08d},c{i}@example.com,true,bench\n".encode()
                buf.append(line)
                size += len(line)
                if size >= 256 * 1024:
                    yield b"".join(buf)
                    buf, size = [], 0
            if buf:
                yield b"".join(buf)

        client.get(f"{url}/v1/customers", params={"limit": 1})  # warm the gateway
        rss0 = _gateway_rss()
        samples: list[int] = []
        done = threading.Event()

        def sample() -> None:  # the gateway's RSS while the import runs
            while not done.wait(0.5):
                samples.append(_gateway_rss())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        r = client.post(f"{url}/v1/customers/import", content=csv(), headers={"Content-Type": "text/csv"})
        t_import = time.perf_counter() - t0
        done.set()
        sampler.join()
        quarter = [round(samples[int(i * (len(samples) - 1) / 4)] / 2**20, 1) for i in range(5)] if samples else []
        assert r.status_code == 200 and r.json()["imported"] == n, r.text
        rss1 = _gateway_rss()
        if args.import_only:
            print(msgspec.json.format(msgspec.json.encode({
                "customers": n,
                "csv_mb": round(sum(len(b) for b in csv()) / 2**20, 1),
                "import_s": round(t_import, 2),
                "import_rows_per_s": round(n / t_import),
                "gateway_rss_before_mb": round(rss0 / 2**20, 1),
                "gateway_rss_after_mb": round(rss1 / 2**20, 1),
                "gateway_rss_during_mb_at_0_25_50_75_100pct": quarter,
            })).decode())
            del engine
            return 0

        c = client.post(
            f"{url}/v1/campaigns",
            json={"name": "bench", "type": "discount", "currency": "EUR",
                  "discount": {"kind": "percent", "value": 10}},
        ).json()
        job = client.post(f"{url}/v1/campaigns/{c['id']}/generate", json={"count": n}).json()
        while job["state"] == "running":
            time.sleep(0.2)
            job = client.get(f"{url}/v1/jobs/{job['id']}").json()
        assert job["state"] == "done", job

        def issue() -> tuple[dict[str, Any], float]:
            t = time.perf_counter()
            j = client.post(
                f"{url}/v1/campaigns/{c['id']}/issuance",
                json={"selection": {"tag": "bench"}, "channels": ["email"]},
            ).json()
            while j["state"] == "running":
                time.sleep(0.1)
                j = client.get(f"{url}/v1/jobs/{j['id']}").json()
            return j, time.perf_counter() - t

        first, t_issue = issue()
        assert first["state"] == "done" and first["counts"]["enqueued"] == n, first
        second, t_again = issue()
        assert second["counts"]["new_codes"] == 0 and second["counts"]["enqueued"] == 0, second

        async def check() -> tuple[int, int, int]:
            import asyncpg
            from redis.asyncio import Redis

            conn = await asyncpg.connect(svc.database_url)
            codes = await conn.fetchval(
                "SELECT count(DISTINCT code) FROM vouchers WHERE campaign_id = $1 AND customer_id IS NOT NULL",
                c["id"],
            )
            rows = await conn.fetchval("SELECT count(*) FROM deliveries WHERE campaign_id = $1", c["id"])
            await conn.close()
            redis = Redis.from_url(svc.redis_url)
            entries = await redis.xlen("voucher:delivery:email")
            await redis.aclose()
            return int(codes), int(rows), int(entries)

        codes, rows, entries = asyncio.run(check())
        assert codes == rows == entries == n, (codes, rows, entries)
        result = {
            "customers": n,
            "import_s": round(t_import, 2),
            "import_rows_per_s": round(n / t_import),
            "gateway_rss_before_mb": round(rss0 / 2**20, 1),
            "gateway_rss_after_mb": round(rss1 / 2**20, 1),
            "gateway_rss_during_mb_at_0_25_50_75_100pct": quarter,
            "issuance_s": round(t_issue, 2),
            "issuance_customers_per_s": round(n / t_issue),
            "rerun_s": round(t_again, 2),
            "distinct_codes": codes,
            "delivery_rows": rows,
            "stream_entries": entries,
            "cpus": os.cpu_count(),
        }
        print(msgspec.json.format(msgspec.json.encode(result)).decode())
        del engine
    return 0


if __name__ == "__main__":
    sys.exit(main())
