"""Idempotency keys on the real Postgres: one decision per key for the whole deployment
(whichever shard sees it, across restarts), expiry, transient answers, and the scoping of
keys to their caller over HTTP.

Shards are driven in-process (``ShardCore``, no Ray) in a namespace of their own and on
campaigns of their own, so they never write the session engine's rows. Every check reads
Postgres."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from actors.shard import ShardCore
from engine import errors
from engine.campaigns import Campaign, Discount, transition
from engine.idempotency import Claim
from engine.orders import Item
from engine.routing import bucket_of
from engine.settings import Settings
from engine.shard_state import Outcome, RedeemRequest, fingerprint
from store import manifests
from store.fencing import claim as claim_owner
from tests.engine_support import _OUTCOMES, fetch, fetchval, redeem_on_core, stored_campaign, uid
from tests.http_support import bearer
from tests.integration.test_http_api import _campaign, _codes_of, _generate, _login

pytestmark = pytest.mark.integration



async def _gift_campaign(dsn: str, *, paused: bool = False) -> Campaign:
    return await stored_campaign(
        dsn, paused=paused, id=uid("idem-gift"), type="gift_card", gift_balance=5000
    )


def _settings(namespace: str, shards: int, **kw: Any) -> Settings:
    return Settings(namespace=namespace, shards=shards, batch_window_ms=1.0, **kw)


async def _core(dsn: str, shard_id: int, settings: Settings) -> ShardCore:
    core = ShardCore(shard_id, settings.shards, dsn, settings)
    await core.ready()
    return core


async def _stop(core: ShardCore) -> None:
    if core._housekeeping is not None:
        core._housekeeping.cancel()
    if core.writer is not None:
        await core.writer.close()
    if core.store is not None:
        await core.store.close()


def _codes_on(shards: int, shard_id: int, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        code = uid("IDEM").upper()
        if bucket_of(code) % shards == shard_id:
            out.append(code)
    return out


def _req(code: str, key: str | None, amount: int = 1000) -> RedeemRequest:
    return RedeemRequest(code=code, amount=amount, currency="EUR", idempotency_key=key)


async def _redeem(core: ShardCore, *reqs: RedeemRequest) -> list[Outcome]:
    return await redeem_on_core(core, *reqs)


async def _key_row(dsn: str, key: str) -> asyncpg.Record | None:
    rows = await fetch(
        dsn, "SELECT bucket, fingerprint, response, created_at FROM idempotency_keys WHERE key=$1", key
    )
    return rows[0] if rows else None


def _error(out: Outcome) -> str | None:
    return out.rejection.error if out.rejection is not None else None


# --- one decision per key, whichever shard, across restarts ----------------------------


async def test_one_key_with_two_codes_on_two_shards_runs_once_and_survives_restarts(services) -> None:
    dsn = services.database_url
    settings = _settings(uid("idem"), 2)
    c = await _gift_campaign(dsn)
    [code0], [code1] = _codes_on(2, 0, 1), _codes_on(2, 1, 1)
    s0, s1 = await _core(dsn, 0, settings), await _core(dsn, 1, settings)
    assert await s0.add_codes(c.id, [code0]) == 1 and await s1.add_codes(c.id, [code1]) == 1
    key = uid("u:shopper:order")

    [first] = await _redeem(s0, _req(code0, key))
    assert first.redemption is not None
    [other] = await _redeem(s1, _req(code1, key))
    assert _error(other) == "idempotency_conflict"
    # the same again on the live shards: memory and storage agree
    assert (await _redeem(s0, _req(code0, key)))[0] == first
    assert _error((await _redeem(s1, _req(code1, key)))[0]) == "idempotency_conflict"

    # both shards restart and rebuild from Postgres
    await _stop(s0)
    await _stop(s1)
    n0, n1 = await _core(dsn, 0, settings), await _core(dsn, 1, settings)
    try:
        # each side asked again, the other shard first this time
        assert _error((await _redeem(n1, _req(code1, key)))[0]) == "idempotency_conflict"
        [again] = await _redeem(n0, _req(code0, key))
        assert again == first  # the same redemption id, the same balance
    finally:
        await _stop(n0)
        await _stop(n1)

    # Postgres: one redemption, one spend, one final record holding the first answer
    rows = await fetch(dsn, "SELECT id, code FROM redemptions WHERE campaign_id=$1", c.id)
    assert [(r["id"], r["code"]) for r in rows] == [(first.redemption.id, code0)]
    balances = dict(
        (r["code"], r["balance"])
        for r in await fetch(dsn, "SELECT code, balance FROM vouchers WHERE campaign_id=$1", c.id)
    )
    assert balances == {code0: 4000, code1: 5000}
    row = await _key_row(dsn, key)
    assert row is not None and bytes(row["response"]) == msgspec.msgpack.encode(first)
    assert row["bucket"] == bucket_of(code0)


async def test_a_redemption_rolled_back_after_a_restart_answers_as_before_it(services) -> None:
    """A cart redemption with metadata, rolled back by a shard that restarted since: the
    rollback's answer still says how the discount fell on the lines, and the metadata."""
    dsn = services.database_url
    settings = _settings(uid("idem"), 1)
    c = await stored_campaign(dsn, id=uid("idem-cart"), type="discount",
                              discount=Discount("percent", 10, target="items"))
    [code] = _codes_on(1, 0, 1)
    core = await _core(dsn, 0, settings)
    await core.add_codes(c.id, [code])
    req = msgspec.structs.replace(
        _req(code, None, 2500), metadata='{"channel":"web","basket":[1,2]}', shipping=300,
        items=(Item("SHOE", 2, 1000), Item("SOCK", 1, 500)),
    )
    [made] = await _redeem(core, req)
    assert made.redemption is not None and made.redemption.detail is not None
    await core.flush()
    await _stop(core)
    core = await _core(dsn, 0, settings)
    try:
        [back] = _OUTCOMES.decode(await core.refs_many(
            "rollback", msgspec.msgpack.encode([(made.redemption.id, None)])))
    finally:
        await _stop(core)
    r = back.redemption
    assert r is not None and r.status == 1
    assert msgspec.json.decode(r.detail or "null") == msgspec.json.decode(made.redemption.detail)
    assert msgspec.json.decode(r.metadata or "null") == {"channel": "web", "basket": [1, 2]}


async def test_two_bodies_racing_on_two_shards_run_once(services) -> None:
    dsn = services.database_url
    settings = _settings(uid("idem"), 2)
    c = await _gift_campaign(dsn)
    codes0, codes1 = _codes_on(2, 0, 5), _codes_on(2, 1, 5)
    s0, s1 = await _core(dsn, 0, settings), await _core(dsn, 1, settings)
    try:
        await s0.add_codes(c.id, codes0)
        await s1.add_codes(c.id, codes1)
        for a, b in zip(codes0, codes1, strict=True):
            key = uid("race")
            x, y = await asyncio.gather(_redeem(s0, _req(a, key)), _redeem(s1, _req(b, key)))
            outs = x + y
            assert sum(o.redemption is not None for o in outs) == 1, outs
            assert [_error(o) for o in outs if o.redemption is None] == ["idempotency_conflict"]
    finally:
        await _stop(s0)
        await _stop(s1)
    assert await fetchval(dsn, "SELECT count(*) FROM redemptions WHERE campaign_id=$1", c.id) == 5


async def test_a_claim_whose_decision_never_committed_does_not_block_the_key(services) -> None:
    dsn = services.database_url
    settings = _settings(uid("idem"), 1)
    c = await _gift_campaign(dsn)
    [code] = _codes_on(1, 0, 1)
    core = ShardCore(0, 1, dsn, settings)
    core.exit_process = lambda code: None  # stay in this process
    await core.ready()
    await core.add_codes(c.id, [code])
    key = uid("crash")

    async def broken(*_: Any) -> None:
        raise ConnectionError("storage went away")

    core.store.write = broken  # type: ignore[method-assign,union-attr]
    with pytest.raises(errors.Unavailable):  # the batch fails as a whole
        await _redeem(core, _req(code, key))
    # the claim committed, the decision did not
    row = await _key_row(dsn, key)
    assert row is not None and row["response"] is None

    # the shard reloads its memory in place (a fresh store, the real write again)
    deadline = time.monotonic() + 20
    while True:
        try:
            [out] = await _redeem(core, _req(code, key))
            break
        except errors.Unavailable:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    try:
        assert out.redemption is not None  # ran for real: nothing was spent before
        assert (await _redeem(core, _req(code, key)))[0] == out
        assert core.reloads == 1
    finally:
        await _stop(core)
    assert await fetchval(dsn, "SELECT count(*) FROM redemptions WHERE campaign_id=$1", c.id) == 1
    row = await _key_row(dsn, key)
    assert row is not None and bytes(row["response"]) == msgspec.msgpack.encode(out)


async def test_a_pending_claim_of_another_shard_blocks_until_stale(services) -> None:
    dsn = services.database_url
    settings = _settings(uid("idem"), 2)
    c = await _gift_campaign(dsn)
    [code] = _codes_on(2, 0, 1)
    core = await _core(dsn, 0, settings)
    try:
        await core.add_codes(c.id, [code])
        fresh, stale = uid("fresh"), uid("stale")
        other_bucket = next(b for b in range(1024) if b % 2 == 1)
        elsewhere = fingerprint("reserve", "another body")
        now = datetime.now(UTC)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.executemany(
                "INSERT INTO idempotency_keys (key, bucket, fingerprint, response, created_at)"
                " VALUES ($1, $2, $3, NULL, $4)",
                [(fresh, other_bucket, elsewhere, now), (stale, other_bucket, elsewhere, now - timedelta(minutes=5))],
            )
        finally:
            await conn.close()
        out_fresh, out_stale = await _redeem(core, _req(code, fresh), _req(code, stale, 500))
        assert _error(out_fresh) == "idempotency_conflict"  # another body holds it right now
        assert out_stale.redemption is not None  # its holder never committed: taken over
        row = await _key_row(dsn, stale)
        assert row is not None and row["bucket"] == bucket_of(code) and row["response"] is not None
    finally:
        await _stop(core)


# --- only final answers are kept ---------------------------------------------------------


async def test_a_transient_rejection_is_answered_but_not_recorded(services) -> None:
    dsn = services.database_url
    settings = _settings(uid("idem"), 1)
    c = await _gift_campaign(dsn, paused=True)
    [code] = _codes_on(1, 0, 1)
    core = await _core(dsn, 0, settings)
    try:
        await core.add_codes(c.id, [code])
        key = uid("paused")
        [out] = await _redeem(core, _req(code, key))
        assert _error(out) == "campaign_paused"
        assert await fetchval(
            dsn, "SELECT count(*) FROM idempotency_keys WHERE key=$1 AND response IS NOT NULL", key
        ) == 0
        await core.put_campaign(
            msgspec.msgpack.encode(transition(c, "activate", datetime.now(UTC)))
        )
        [ran] = await _redeem(core, _req(code, key))
        assert ran.redemption is not None
    finally:
        await _stop(core)
    again = await _core(dsn, 0, settings)
    try:
        assert (await _redeem(again, _req(code, key)))[0] == ran
    finally:
        await _stop(again)
    assert await fetchval(dsn, "SELECT count(*) FROM redemptions WHERE campaign_id=$1", c.id) == 1


# --- expiry ------------------------------------------------------------------------------


async def test_expired_keys_are_deleted_and_a_reused_key_runs_again(services) -> None:
    dsn = services.database_url
    # a shard of 4 buckets: the 1-second TTL sweeps no other test's keys
    settings = _settings(uid("idem"), 256, idempotency_ttl_s=1)
    c = await _gift_campaign(dsn)
    [code] = _codes_on(256, 0, 1)
    core = await _core(dsn, 0, settings)
    try:
        await core.add_codes(c.id, [code])
        swept, reused = uid("swept"), uid("reused")
        first = await _redeem(core, _req(code, swept), _req(code, reused))
        assert all(o.redemption is not None for o in first)
        await asyncio.sleep(1.2)
        # `swept` is deleted by the housekeeping's sweep before its reuse ...
        assert await core.expire_idempotency() >= 2
        assert await _key_row(dsn, swept) is None and await _key_row(dsn, reused) is None
        # ... and both run again when reused (the expired row itself is never replayed)
        second = await _redeem(core, _req(code, swept), _req(code, reused))
        assert all(o.redemption is not None for o in second)
        assert {o.redemption.id for o in first}.isdisjoint(o.redemption.id for o in second)  # type: ignore[union-attr]
        for key, out in zip((swept, reused), second, strict=True):
            row = await _key_row(dsn, key)
            assert row is not None and bytes(row["response"]) == msgspec.msgpack.encode(out)
        await asyncio.sleep(1.2)
        # reused after expiry but before any sweep: the claim takes the old row over
        [third] = await _redeem(core, _req(code, reused))
        assert third.redemption is not None and third.redemption.balance_after == 0
    finally:
        await _stop(core)
    assert await fetchval(dsn, "SELECT count(*) FROM redemptions WHERE campaign_id=$1", c.id) == 5
    assert await fetchval(dsn, "SELECT balance FROM vouchers WHERE code=$1", code) == 0


async def test_the_sweep_deletes_in_chunks_and_only_its_own_buckets(services) -> None:
    dsn = services.database_url
    core = await _core(dsn, 0, _settings(uid("idem"), 2))
    try:
        now = datetime.now(UTC)
        old = now - timedelta(days=3)
        mine = [b for b in core.buckets[:5]]
        theirs = 1
        expired = [uid("old") for _ in mine]
        kept = {uid("theirs"): (theirs, old), uid("young"): (mine[0], now)}
        fp = fingerprint("redeem", "body")
        conn = await asyncpg.connect(dsn)
        try:
            await conn.executemany(
                "INSERT INTO idempotency_keys (key, bucket, fingerprint, response, created_at)"
                " VALUES ($1, $2, $3, $4, $5)",
                [(k, b, fp, b"answer", old) for k, b in zip(expired, mine, strict=True)]
                + [(k, b, fp, b"answer", at) for k, (b, at) in kept.items()],
            )
        finally:
            await conn.close()
        assert core.store is not None
        deleted = await core.store.delete_expired_keys(core.buckets, now - timedelta(days=1), chunk=2)
        assert deleted >= len(expired)
        left = {r["key"] for r in await fetch(
            dsn, "SELECT key FROM idempotency_keys WHERE key = ANY($1::text[])", expired + list(kept)
        )}
        assert left == set(kept)
    finally:
        await _stop(core)


async def test_a_promotion_manifest_stands_as_first_written_and_goes_with_its_bucket(services) -> None:
    """The promotions a keyed redemption asked: the first list written stands (a retry,
    or a concurrent attempt, reads it back), and the sweep of the key's bucket deletes it
    with the idempotency keys once expired."""
    dsn = services.database_url
    core = await _core(dsn, 0, _settings(uid("idem"), 2))
    try:
        now = datetime.now(UTC)
        old = now - timedelta(days=3)
        mine = set(core.buckets)

        def key_in(want_mine: bool) -> str:
            while (bucket_of(k := uid("man")) in mine) != want_mine:
                pass
            return k

        expired, young, theirs = key_in(True), key_in(True), key_in(False)
        fp, other = fingerprint("promotions", "a"), fingerprint("promotions", "b")
        conn = await asyncpg.connect(dsn)
        try:
            assert await manifests.fix(conn, expired, fp, ["p1", "p2"], old) == (fp, ["p1", "p2"])
            # a retry with the catalog changed: the first list, and what it was for
            assert await manifests.fix(conn, expired, fp, ["p3"], now) == (fp, ["p1", "p2"])
            assert await manifests.fix(conn, expired, other, [], now) == (fp, ["p1", "p2"])
            await manifests.fix(conn, young, fp, ["p1"], now)
            await manifests.fix(conn, theirs, fp, ["p1"], old)
        finally:
            await conn.close()
        pool = await asyncpg.create_pool(dsn, min_size=4, max_size=4)
        try:  # attempts at once: one list stands, and every attempt is answered that one
            race = uid("man")
            answers = await asyncio.gather(*(manifests.fix(pool, race, fp, [f"r{i}"], now) for i in range(8)))
            assert len(set(map(str, answers))) == 1 and answers[0][1][0].startswith("r"), answers
        finally:
            await pool.close()
        assert core.store is not None
        await core.store.delete_expired_keys(core.buckets, now - timedelta(days=1), chunk=1)
        left = {r["key"] for r in await fetch(
            dsn, "SELECT key FROM promotion_manifests WHERE key = ANY($1::text[])", [expired, young, theirs]
        )}
        assert left == {young, theirs}
    finally:
        await _stop(core)


async def test_claims_and_sweeps_check_the_writers_fence(services) -> None:
    dsn = services.database_url
    core = await _core(dsn, 0, _settings(uid("idem"), 1))
    owner = f"{uid('idem')}/shard-0"
    conn = await asyncpg.connect(dsn)
    try:
        stale_fence = await claim_owner(conn, owner)
        fence = await claim_owner(conn, owner)  # a newer owner: the first one is fenced
    finally:
        await conn.close()
    try:
        assert core.store is not None
        now = datetime.now(UTC)
        fp = fingerprint("redeem", "body")
        window = (core.buckets, now - timedelta(days=5), now - timedelta(seconds=10))
        ok, refused = uid("fenced-ok"), uid("fenced-no")
        old = now - timedelta(days=3)  # only rows this old are swept below: none but ours
        [stored] = await core.store.claim_keys([Claim(ok, 3, fp, old)], *window, fence=fence)
        assert stored.won and stored.response is None
        with pytest.raises(errors.Fenced):
            await core.store.claim_keys([Claim(refused, 3, fp, now)], *window, fence=stale_fence)
        assert await _key_row(dsn, refused) is None  # the whole statement was refused
        with pytest.raises(errors.Fenced):
            await core.store.delete_expired_keys([3], old + timedelta(seconds=1), fence=stale_fence)
        assert await _key_row(dsn, ok) is not None
        assert await core.store.delete_expired_keys([3], old + timedelta(seconds=1), fence=fence) >= 1
        assert await _key_row(dsn, ok) is None
    finally:
        await _stop(core)


# --- cost --------------------------------------------------------------------------------


async def test_only_a_batch_with_new_keys_pays_one_claim(services, monkeypatch) -> None:
    dsn = services.database_url
    c = await _gift_campaign(dsn)
    codes = _codes_on(1, 0, 6)
    core = await _core(dsn, 0, _settings(uid("idem"), 1))
    try:
        await core.add_codes(c.id, codes)
        assert core.store is not None
        calls: list[int] = []
        claim = core.store.claim_keys

        async def counted(claims: Any, *args: Any, **kw: Any) -> Any:
            calls.append(len(claims))
            return await claim(claims, *args, **kw)

        monkeypatch.setattr(core.store, "claim_keys", counted)
        await _redeem(core, *[_req(x, None) for x in codes[:3]])
        assert calls == []  # no key, no extra round trip
        keyed = [_req(x, uid("k")) for x in codes[3:]]
        first = await _redeem(core, *keyed)
        assert calls == [3]  # one statement for the whole batch
        assert await _redeem(core, *keyed) == first
        assert calls == [3]  # replays come from memory
    finally:
        await _stop(core)


# --- scoping over HTTP ---------------------------------------------------------------------


def test_an_api_key_and_its_owner_never_share_idempotency_keys(http_api: Any) -> None:
    url = http_api.url
    admin = bearer(_login(http_api, http_api.admin_email, http_api.admin_password))
    keys = [
        httpx.post(f"{url}/v1/api-keys", json={"name": n, "roles": ["integration"]}, headers=admin).json()["key"]
        for n in ("checkout-a", "checkout-b")
    ]
    c = _campaign(http_api, admin)
    _generate(http_api, admin, c["id"], 2)
    httpx.post(f"{url}/v1/campaigns/{c['id']}/activate", headers=admin).raise_for_status()
    code_x, code_y = _codes_of(http_api, c["id"])
    idem = f"order-{random.getrandbits(32)}"

    def body(code: str) -> dict[str, Any]:
        return {"code": code, "order": {"id": "o-1", "amount": 3000, "currency": "EUR"}}

    def post(path: str, headers: dict[str, str], json: Any = None, key: str = idem) -> httpx.Response:
        return httpx.post(f"{url}{path}", json=json, headers={**headers, "Idempotency-Key": key})

    api_a, api_b = {"X-API-Key": keys[0]}, {"X-API-Key": keys[1]}
    first = post("/v1/redemptions", api_a, body(code_x))
    assert first.status_code == 201, first.text
    # the owner (an admin, same user id) with the same key and another body: no collision
    # with the API key's record, the owner's request runs
    owner_y = post("/v1/redemptions", admin, body(code_y))
    assert owner_y.status_code == 201, owner_y.text
    assert owner_y.json()["id"] != first.json()["id"]
    # ... and with the API key's body: never its answer (here: the owner's own record)
    owner = post("/v1/redemptions", admin, body(code_x))
    assert owner.status_code == 409 and owner.json()["code"] == "idempotency_conflict", owner.text
    # another API key of the same owner: its own scope too
    other = post("/v1/redemptions", api_b, body(code_x))
    assert other.status_code == 409 and other.json()["code"] == "already_redeemed", other.text
    # the API key itself still gets its first answer
    again = post("/v1/redemptions", api_a, body(code_x))
    assert again.status_code == 201 and again.json() == first.json()
    # the same scoping on rollback
    rid, undo = first.json()["id"], f"undo-{idem}"
    rb = post(f"/v1/redemptions/{rid}/rollback", api_a, key=undo)
    assert rb.status_code == 200 and rb.json()["status"] == "rolled_back", rb.text
    rb_owner = post(f"/v1/redemptions/{rid}/rollback", admin, key=undo)
    assert rb_owner.status_code == 409 and rb_owner.json()["code"] == "already_rolled_back"
    assert post(f"/v1/redemptions/{rid}/rollback", api_a, key=undo).json() == rb.json()
    assert asyncio.run(
        fetchval(http_api.database_url, "SELECT count(*) FROM redemptions WHERE campaign_id=$1", c["id"])
    ) == 2
