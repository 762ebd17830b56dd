"""Issuance and delivery end to end, every component real: customers imported over HTTP, an issuance job
(Issuer actor, shard actors) queueing one email per customer on the Valkey stream, delivery
worker actors sending over SMTP to the embedded aiosmtpd sink. 10,000 customers end with
exactly 10,000 assigned codes and 10,000 emails at the sink, each customer with one code and
one message carrying that code; running the issuance again sends nothing."""

from __future__ import annotations

import asyncio
import email
import email.policy
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.delivery_support import receipts_of, running_pipeline, wait_states
from tests.engine_support import uid
from tests.http_support import admin_headers, finished_job
from tests.integration.test_issuance import (
    _campaign,
    _generate,
    _import,
    _issue,
    _sql,
)

pytestmark = pytest.mark.integration

N = 10_000


@pytest.fixture(scope="module")
def admin(http_api: Any) -> dict[str, str]:
    return admin_headers(http_api)


def test_issuance_of_10000_customers_reaches_the_smtp_sink_exactly_once(
    http_api: Any, admin: dict[str, str], services: Any, engine_settings: Any, tmp_path: Any
) -> None:
    p = uid("e2e")
    tag = p.lower()
    lines = ["id,email,name,locale,consent_email,tags"]
    lines += [f"{p}-{i:05d},{p}-{i:05d}@shop.example,Customer {i},en,true,{tag}" for i in range(N)]
    r = _import(http_api, admin, ("\n".join(lines) + "\n").encode())
    assert r.status_code == 200 and r.json()["imported"] == N, r.text

    c = _campaign(http_api, admin, name="end to end")
    _generate(http_api, admin, c["id"], N + 500)
    httpx.post(f"{http_api.url}/v1/campaigns/{c['id']}/activate", headers=admin).raise_for_status()

    with running_pipeline(services, engine_settings, tmp_path / "outbox") as pipeline:
        t0 = time.perf_counter()
        r = _issue(http_api, admin, c["id"], {"tag": tag}, ["email"])
        assert r.status_code == 202, r.text
        job = finished_job(http_api.url, admin, r.json()["id"], timeout_s=120)
        assert job["state"] == "done", job
        assert job["counts"]["assigned"] == job["counts"]["enqueued"] == N
        states = asyncio.run(wait_states(services.database_url, c["id"], {"sent": N}, timeout_s=180))
        took = time.perf_counter() - t0
        assert states == {"sent": N}, states
        print(f"\nissuance + delivery of {N:,} emails: {took:.1f}s ({N / took:,.0f}/s)")

        assigned = _sql(
            services,
            "SELECT code, customer_id FROM vouchers WHERE campaign_id = $1 AND customer_id IS NOT NULL",
            c["id"],
        )
        assert len(assigned) == N
        code_of = {r["customer_id"]: r["code"] for r in assigned}
        assert len(code_of) == N and len(set(code_of.values())) == N

        got = receipts_of(pipeline.sinks, p)
        per_key = Counter(r["key"] for r in got)
        per_recipient = Counter(r["to"] for r in got)
        assert len(per_key) == N and set(per_key.values()) == {1}, per_key.most_common(3)
        assert len(per_recipient) == N and set(per_recipient.values()) == {1}
        assert all(r["status"] == "accepted" for r in got)
        # Each message carries the code assigned to its recipient (a sample, parsed as mail).
        for r in got[:: N // 50]:
            customer = r["to"].split("@", 1)[0]
            eml = (pipeline.sinks.outbox.root / "email" / f"{r['key']}.eml").read_bytes()
            msg = email.message_from_bytes(eml, policy=email.policy.default)
            assert msg["To"] == r["to"]
            assert code_of[customer] in msg.get_body(preferencelist=("plain", "html")).get_content()

        # The same issuance again: no code, no message, nothing more at the sink.
        r = _issue(http_api, admin, c["id"], {"tag": tag}, ["email"])
        again = finished_job(http_api.url, admin, r.json()["id"], timeout_s=120)
        assert again["state"] == "done" and again["counts"]["new_codes"] == 0
        assert again["counts"]["enqueued"] == 0
        time.sleep(2.0)
        assert len(receipts_of(pipeline.sinks, p)) == N
        rows = _sql(services, "SELECT count(*) AS n FROM deliveries WHERE campaign_id = $1", c["id"])
        assert rows[0]["n"] == N
