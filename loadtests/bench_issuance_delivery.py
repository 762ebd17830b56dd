"""Issuance benchmark: issuance + email delivery of 100,000 customers end to end, against
a design of one queue job per customer, in the same run.

    python -m loadtests.bench_issuance_delivery [--customers 100000] [--baseline 3000] [--record]

One run starts the embedded Postgres and Valkey in a throwaway directory, a local Ray, the
shard actors, the HTTP app, the issuer, ``--workers`` delivery worker actors and the
embedded SMTP sink in its own process (as a real provider would be). Set-up (not timed):
the customers are imported over HTTP (CSV, every one with email consent), and a campaign's
bank is generated with one code per customer.

Timed: ``POST /v1/campaigns/{id}/issuance`` (tag, email) until every one of the N
deliveries is ``sent`` in Postgres AND the sink has recorded N accepted messages. The
issuer assigns codes through the shard actors and queues messages while the workers send:
the two stages overlap.

Baseline (one queue job per customer, the common design): the request fires one job
per customer on a Redis list; each assignment job takes a code from the voucher bank
(``UPDATE ... FOR UPDATE SKIP LOCKED``), records the customer's delivery row and fires an
email job on a second list; each email job looks its row up, renders the template, opens
its own SMTP connection, sends and updates its row (``loadtests.bench_delivery``'s job-per-message
worker). Both kinds run at the same time, each with as many worker processes as the pipeline has
delivery workers, on ``--baseline`` customers of a second campaign; the ratio compares
customers per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from redis.asyncio import Redis

from engine.delivery import message_id
from loadtests.bench_delivery import _baseline_worker_async, _other_load, sent_count, store_template
from loadtests.bench_plumbing import drain_queue, fetch_count
from loadtests.harness import machine_summary, record

SECTION = "Issuance + delivery: 100,000 customers end to end"


def _accepted_keys(index: Path, keys: set[str]) -> int:
    """Messages of ``keys`` the sink accepted (each key counted once per receipt)."""
    if not index.exists():
        return 0
    n = 0
    with index.open("rb") as f:
        for line in f:
            if b'"accepted"' not in line:
                continue
            if json.loads(line).get("key") in keys:
                n += 1
    return n


async def _seed_assign_async(dsn: str, redis_url: str, queue: str, email_queue: str, cid: str, concurrency: int) -> int:
    async def handle(db: Any, redis: Redis, customer: str) -> None:
        async with db.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "UPDATE vouchers SET status = 1, customer_id = $2, updated_at = now() WHERE code ="
                " (SELECT code FROM vouchers WHERE campaign_id = $1 AND status = 0 LIMIT 1"
                "  FOR UPDATE SKIP LOCKED) RETURNING code",
                cid,
                customer,
            )
            email = await conn.fetchval("SELECT email FROM customers WHERE id = $1", customer)
            mid = message_id(cid, customer, "email")
            await conn.execute(
                "INSERT INTO deliveries (id, campaign_id, customer_id, channel, recipient, code)"
                " VALUES ($1, $2, $3, 'email', $4, $5)",
                mid, cid, customer, email, row["code"],
            )
        await redis.lpush(email_queue, mid)

    return await drain_queue(dsn, redis_url, queue, concurrency, handle)


def _seed_assign(*args: Any) -> int:
    return asyncio.run(_seed_assign_async(*args))


def _seed_email(*args: Any) -> int:
    return asyncio.run(_baseline_worker_async(*args))


async def _wait_sent(dsn: str, cid: str, index: Path, keys: set[str], n: int, timeout_s: float) -> tuple[int, int]:
    deadline = time.monotonic() + timeout_s
    sent = sink = 0
    while time.monotonic() < deadline:
        sent = await sent_count(dsn, cid)
        if sent >= n:
            sink = _accepted_keys(index, keys)
            if sink >= n:
                break
        await asyncio.sleep(0.25)
    return sent, sink


def run(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    import ray

    from actors.client import start_engine
    from actors.delivery import start_delivery
    from actors.issuance import issuer_handle
    from engine.settings import Settings
    from ops.start import start_http
    from tests.support import RAY_NAMESPACE, free_port, running_ray, running_services

    n, nb = args.customers, args.baseline
    with tempfile.TemporaryDirectory() as tmp, running_services(Path(tmp)) as svc, running_ray():
        sink = subprocess.Popen(
            [sys.executable, "-m", "ops.sinks", "--dir", str(Path(tmp) / "outbox")],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            assert sink.stdout is not None
            urls = json.loads(sink.stdout.readline())
            urls = {"email": urls["smtp"], "sms": urls["sms"], "push": urls["push"]}
            index = Path(tmp) / "outbox" / "index.jsonl"
            settings = Settings(
                shards=4, namespace=RAY_NAMESPACE, http_port=free_port(),
                admin_email="bench@example.com", admin_password="bench-password", data_dir=tmp,
                delivery_workers=args.workers, delivery_rate_email=0.0,
            )
            engine = start_engine(settings, svc.database_url)  # noqa: F841 (actors live with it)
            url = start_http(settings, svc.database_url, svc.redis_url)
            issuer_handle(settings, svc.database_url, svc.redis_url)
            tok = httpx.post(f"{url}/v1/auth/login", json={"email": "bench@example.com", "password": "bench-password"}).json()["access_token"]
            client = httpx.Client(headers={"Authorization": f"Bearer {tok}"}, timeout=600)

            def csv() -> Any:
                yield b"id,email,name,consent_email,tags\n"
                for start in range(0, n, 5000):
                    yield "".join(
                        f"cu-{i:08d},cu-{i:08d}@shop.example,Customer {i},true,bench\n"
                        for i in range(start, min(n, start + 5000))
                    ).encode()

            r = client.post(f"{url}/v1/customers/import", content=csv(), headers={"Content-Type": "text/csv"})
            assert r.status_code == 200 and r.json()["imported"] == n, r.text

            def campaign(name: str, count: int) -> str:
                c = client.post(f"{url}/v1/campaigns", json={
                    "name": name, "type": "discount", "currency": "EUR",
                    "discount": {"kind": "percent", "value": 10}}).json()
                job = client.post(f"{url}/v1/campaigns/{c['id']}/generate", json={"count": count}).json()
                while job["state"] == "running":
                    time.sleep(0.2)
                    job = client.get(f"{url}/v1/jobs/{job['id']}").json()
                assert job["state"] == "done", job
                client.post(f"{url}/v1/campaigns/{c['id']}/activate").raise_for_status()
                asyncio.run(store_template(svc.database_url, str(c["id"])))
                return str(c["id"])

            cid = campaign("bench pipeline", n)
            seed_cid = campaign("bench seed", nb)
            keys = {message_id(cid, f"cu-{i:08d}", "email") for i in range(n)}
            seed_keys = {message_id(seed_cid, f"cu-{i:08d}", "email") for i in range(nb)}

            handles = start_delivery(settings, svc.database_url, svc.redis_url, urls=urls, workers=args.workers, channels=("email",))
            other_before, top_before = _other_load()
            cpu0 = psutil.cpu_times()
            t0 = time.perf_counter()
            j = client.post(f"{url}/v1/campaigns/{cid}/issuance", json={"selection": {"tag": "bench"}, "channels": ["email"]}).json()
            while j["state"] == "running":
                time.sleep(0.1)
                j = client.get(f"{url}/v1/jobs/{j['id']}").json()
            t_issue = time.perf_counter() - t0
            assert j["state"] == "done" and j["counts"]["enqueued"] == n, j
            sent, received = asyncio.run(_wait_sent(svc.database_url, cid, index, keys, n, 600))
            elapsed = time.perf_counter() - t0
            cpu1 = psutil.cpu_times()
            handles.stop()
            codes = asyncio.run(fetch_count(svc.database_url, "SELECT count(DISTINCT code) FROM vouchers WHERE campaign_id = $1 AND customer_id IS NOT NULL", cid))

            # --- one job per customer -----------------------------------------------------
            mail_from = settings.mail_from
            assign_q, email_q = f"bench:seed-assign:{seed_cid}", f"bench:seed-email:{seed_cid}"
            assign_remote = ray.remote(num_cpus=0)(_seed_assign)
            email_remote = ray.remote(num_cpus=0)(_seed_email)

            async def seed() -> tuple[int, int, float]:
                redis = Redis.from_url(svc.redis_url)
                try:
                    # warm the worker processes on empty queues (start-up is not timed)
                    warm = [assign_remote.remote(svc.database_url, svc.redis_url, assign_q, email_q, seed_cid, 1) for _ in range(args.workers)]
                    warm += [email_remote.remote(svc.database_url, svc.redis_url, urls["email"], email_q, 1, mail_from) for _ in range(args.workers)]
                    await asyncio.gather(*[asyncio.wrap_future(x.future()) for x in warm])
                    t = time.perf_counter()
                    for start in range(0, nb, 5000):
                        await redis.lpush(assign_q, *[f"cu-{i:08d}" for i in range(start, min(nb, start + 5000))])
                    # Both stages run at once, as two queues would; email workers that find
                    # their queue empty before the assignments are done are started again.
                    def emails() -> list[Any]:
                        return [
                            asyncio.wrap_future(x.future()) for x in
                            [email_remote.remote(svc.database_url, svc.redis_url, urls["email"], email_q, args.concurrency, mail_from) for _ in range(args.workers)]
                        ]

                    assigning = [
                        asyncio.wrap_future(x.future()) for x in
                        [assign_remote.remote(svc.database_url, svc.redis_url, assign_q, email_q, seed_cid, args.concurrency) for _ in range(args.workers)]
                    ]
                    emailing = emails()
                    assigned = sum(await asyncio.gather(*assigning))
                    emailed = sum(await asyncio.gather(*emailing))
                    emailed += sum(await asyncio.gather(*emails()))
                    return assigned, emailed, time.perf_counter() - t
                finally:
                    await redis.aclose()

            s_assigned, s_emailed, s_elapsed = asyncio.run(seed())
            s_sent = asyncio.run(sent_count(svc.database_url, seed_cid))
            s_received = _accepted_keys(index, seed_keys)
            other_after, top_after = _other_load()
        finally:
            if ray.is_initialized():
                ray.shutdown()
            sink.terminate()
            sink.wait(10)

    rate, s_rate = n / elapsed, nb / s_elapsed
    ratio = rate / s_rate
    busy = ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / elapsed
    ok = elapsed <= 60 and sent == received == codes == n
    lines = [
        "| design | customers | seconds | customers/s | codes assigned | rows sent | received by the SMTP sink | engine ÷ this |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| engine: issuance job (shard actors) + delivery workers (streams, pooled SMTP) | {n:,} | {elapsed:.1f} | {rate:,.0f} | {codes:,} | {sent:,} | {received:,} | 1.00× |",
        f"| seed: one assignment job + one email job per customer (Redis lists, bank row lock, own SMTP connection) | {nb:,} | {s_elapsed:.1f} | {s_rate:,.0f} | {s_assigned:,} | {s_sent:,} | {s_received:,} | {ratio:.1f}× |",
        "",
        "| check | value | target | met |",
        "| --- | ---: | --- | --- |",
        f"| {n:,} customers: issuance → every email sent and received | {elapsed:.1f} s | ≤ 60 s | {'yes' if elapsed <= 60 else '**no**'} |",
        f"| codes = rows sent = sink receipts = customers | {codes:,} / {sent:,} / {received:,} / {n:,} | equal | {'yes' if sent == received == codes == n else '**no**'} |",
        f"| engine ÷ job-per-customer design (customers/s) | {ratio:.1f}× | > 1× | {'yes' if ratio > 1 else '**no**'} |",
        "",
        f"The issuance job itself (assign + record + queue) finished after {t_issue:.1f} s; the workers sent while it ran. "
        f"Delivery: {args.workers} worker actors; seed: {args.workers} assignment + {args.workers} email worker processes x {args.concurrency} jobs in flight. "
        f"Whole machine busy during the engine run: {busy:.2f} of {os.cpu_count()} cores. "
        f"Other load (outside this benchmark) before / after: {other_before:.2f} / {other_after:.2f} cores "
        f"({top_before}; {top_after}). Machine: {machine_summary()}.",
    ]
    return "\n".join(lines), {"ok": ok}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--customers", type=int, default=100_000)
    p.add_argument("--baseline", type=int, default=3000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=16, help="baseline jobs in flight per worker")
    p.add_argument("--record", action="store_true", help="write the section into BENCHMARKS.md")
    args = p.parse_args(argv)
    table, raw = run(args)
    print(table)
    if args.record:
        cmd = "python -m loadtests.bench_issuance_delivery" + (" --record" if args.record else "")
        record(SECTION, cmd, table)
    return 0 if raw["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
