"""Demo data for the reporting app: ``voucher-engine demo-data`` (also ``up --demo``).

Additive: every run creates its own campaigns (a fresh suffix in their ids and names),
two of each type, on the running engine:

* codes are generated, assigned and redeemed **through the engine** (so shards, rollups
  and reports see what production would);
* written straight into Postgres (``store/demo.py``): the customers (with segment tags)
  and the delivery records (the customer and delivery services write the same rows in
  production), and the redemptions just made
  are moved back in time to a realistic spread over the past two weeks (a daily rhythm in
  the campaign's time zone). The move is one UPDATE of ``redemptions.created_at`` /
  ``rolled_back_at``: the reporting triggers log it like any change, so the rollups stay
  exact; the shards keep the original times in memory until they next reload, which only
  shows in the ``created_at`` of a rollback's answer.
* the flash sale runs now; ``live_s`` keeps redeeming it a few times a second, so the live
  view has something to show.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from actors.client import VoucherEngine
from engine.events import Redemption
from engine.shard_state import RedeemRequest
from ops.console import generation_bar, print_json
from store import demo
from store.pools import connect

TAGS = ("vip", "new", "returning", "eu", "us", "newsletter")
CHANNELS = (("email", 0.6), ("sms", 0.25), ("push", 0.15))
# relative redemption weight of each local hour: lunch and evening peaks, quiet nights
HOUR_WEIGHTS = (1, 0.5, 0.3, 0.2, 0.2, 0.3, 1, 2, 3, 4, 5, 6, 9, 8, 5, 4, 4, 5, 7, 9, 10, 8, 5, 2)
N_CUSTOMERS = 2000


def _customer_rows() -> list[tuple[str, str, list[str]]]:
    rng = random.Random(42)  # the same customers and tags on every run
    rows = []
    for i in range(N_CUSTOMERS):
        tags = [t for t in TAGS if rng.random() < (0.12 if t == "vip" else 0.3)]
        rows.append((f"demo-cust-{i:05d}", f"demo-cust-{i:05d}@demo.example", tags))
    return rows


def _when(rng: random.Random, now: datetime, tz: ZoneInfo, days: int) -> datetime:
    """A past instant: later days weigh more (the campaign picks up), hours by rhythm."""
    day = min(days - 1, int(days * rng.random() ** 0.6))
    hour = rng.choices(range(24), HOUR_WEIGHTS)[0]
    local_day = (now - timedelta(days=days - 1 - day)).astimezone(tz).date()
    local = datetime(local_day.year, local_day.month, local_day.day, hour, rng.randrange(60),
                     rng.randrange(60), tzinfo=tz)
    t = local.astimezone(UTC)
    # An hour of today that is still to come moves to yesterday: clamping it to "now"
    # would pile those redemptions up in the current hour of the hour-of-day chart.
    if t > now - timedelta(minutes=2):
        t -= timedelta(days=1)
    return min(t, now - timedelta(minutes=2))


async def _backdate(conn: asyncpg.Connection, moves: list[tuple[str, datetime]],
                    rollbacks: dict[str, datetime]) -> None:
    await demo.backdate(
        conn,
        [m[0] for m in moves],
        [m[1] for m in moves],
        [rollbacks.get(m[0], m[1]) for m in moves],
    )


async def _deliveries(conn: asyncpg.Connection, rng: random.Random, cid: str,
                      assigned: list[tuple[str, str]], sent_from: datetime, now: datetime) -> int:
    rows = []
    for cust, code in assigned:
        channel = rng.choices([c for c, _ in CHANNELS], [w for _, w in CHANNELS])[0]
        fail = {"email": 0.05, "sms": 0.12, "push": 0.2}[channel]
        x = rng.random()
        state = "sent" if x > fail else ("dead" if x < fail / 3 else "failed")
        if rng.random() < 0.02:
            state = "queued"
        queued = sent_from + (now - sent_from) * rng.random() * 0.3
        sent_at = queued + timedelta(seconds=rng.uniform(1, 90)) if state == "sent" else None
        rows.append((f"demo-{cid}-{cust}-{channel}", cid, cust, channel, f"{cust}@demo.example",
                     code, state, 1 if state == "sent" else 3, queued, sent_at))
    await demo.add_deliveries(conn, rows)
    return len(rows)


async def create_demo_data(
    engine: VoucherEngine,
    dsn: str,
    *,
    scale: float = 1.0,
    days: int = 14,
    seed: int | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Create the demo campaigns and their history; returns ``{"campaigns": [...], "flash":
    id}``."""
    rng = random.Random(seed)
    suffix = os.urandom(3).hex()
    now = datetime.now(UTC)
    start = now - timedelta(days=days + 1)
    conn = await connect(dsn)
    made: list[str] = []
    try:
        await demo.add_customers(conn, _customer_rows())
        customers = [f"demo-cust-{i:05d}" for i in range(N_CUSTOMERS)]

        def n(x: int) -> int:
            return max(1, int(x * scale))

        specs: list[dict[str, Any]] = [
            {"name": "Spring sale 15% off", "type": "discount", "timezone": "Europe/Berlin",
             "discount": {"kind": "percent", "value": 15, "max": 3000}, "min_order": 2000,
             "codes": n(4000), "assign": n(1600), "redeem": 0.45, "amount": (2500, 20000)},
            {"name": "Welcome 5 off", "type": "discount", "timezone": "America/New_York",
             "discount": {"kind": "amount", "value": 500}, "currency": "USD",
             "codes": n(2000), "assign": n(900), "redeem": 0.3, "amount": (1500, 9000)},
            {"name": "Gift card 50", "type": "gift_card", "timezone": "Europe/Berlin",
             "gift_balance": 5000, "codes": n(600), "assign": n(300), "redeem": 0.7,
             "amount": (800, 4000)},
            {"name": "Gift card 100", "type": "gift_card", "timezone": "Europe/London",
             "currency": "GBP", "gift_balance": 10000, "codes": n(300), "assign": n(150),
             "redeem": 0.6, "amount": (1500, 8000)},
            {"name": "SUMMER10 shared code", "type": "shared_code", "timezone": "Europe/Paris",
             "discount": {"kind": "percent", "value": 10}, "shared": f"SUMMER10-{suffix}".upper(),
             "uses": n(900), "amount": (2000, 15000)},
            {"name": "Newsletter 3 off", "type": "shared_code", "timezone": "UTC",
             "discount": {"kind": "amount", "value": 300}, "shared": f"NEWS3-{suffix}".upper(),
             "uses": n(400), "amount": (1000, 6000)},
            {"name": "Flash sale 100 x 20 off", "type": "flash_sale", "timezone": "America/New_York",
             "discount": {"kind": "amount", "value": 2000}, "currency": "USD",
             "codes": n(100), "total": n(100), "assign": n(100), "redeem": 0.55,
             "amount": (5000, 9000), "recent": True},
            {"name": "Flash sale 30% (weekly)", "type": "flash_sale", "timezone": "Europe/Berlin",
             "discount": {"kind": "percent", "value": 30}, "shared": f"FLASH30-{suffix}".upper(),
             "total": n(1500), "uses": n(600), "amount": (3000, 12000), "recent": True},
        ]
        flash_id: str | None = None
        for i, sp in enumerate(specs):
            cid = f"demo-{sp['type'].replace('_', '')}-{i}-{suffix}"
            tz = ZoneInfo(sp["timezone"])
            recent = bool(sp.get("recent"))
            limits = {"total": sp["total"]} if "total" in sp else None
            c = await engine.create_campaign(
                id=cid,
                name=f"{sp['name']} (demo {suffix})",
                type=sp["type"],
                currency=sp.get("currency", "EUR"),
                discount=sp.get("discount"),
                gift_balance=sp.get("gift_balance"),
                min_order=sp.get("min_order", 0),
                limits=limits,
                starts_at=(now - timedelta(hours=1)) if recent else start,
                ends_at=now + timedelta(days=30 if not recent else 1),
                timezone=sp["timezone"],
                shared_code=sp.get("shared"),
                code={"length": 10, "prefix": "D", "check_char": True},
            )
            made.append(c.id)
            if sp.get("codes"):
                await engine.generate(c.id, sp["codes"])
            await engine.activate(c.id)
            lo, hi = sp["amount"]
            reqs: list[RedeemRequest] = []
            assigned: list[tuple[str, str]] = []
            if sp.get("assign"):
                who = rng.sample(customers, min(sp["assign"], len(customers)))
                outs = await engine.assign_many(c.id, who)
                assigned = [(o.assignment.customer_id, o.assignment.code) for o in outs
                            if o.assignment is not None]
                for cust, code in assigned:
                    if rng.random() < sp["redeem"]:
                        reqs.append(RedeemRequest(code=code, amount=rng.randint(lo, hi) // 100 * 100,
                                                  currency=c.currency, customer_id=cust))
                        if c.type == "gift_card" and rng.random() < 0.5:  # a second purchase
                            reqs.append(RedeemRequest(code=code, amount=rng.randint(lo, hi) // 100 * 100,
                                                      currency=c.currency, customer_id=cust))
            for _ in range(sp.get("uses", 0)):
                buyer = rng.choice(customers) if rng.random() < 0.85 else None
                reqs.append(RedeemRequest(code=c.shared_code or "", amount=rng.randint(lo, hi) // 100 * 100,
                                          currency=c.currency, customer_id=buyer))
            redeemed: list[Redemption] = []
            for j in range(0, len(reqs), 500):
                # one request per code per batch: a gift card's second purchase must see the first
                batch = reqs[j : j + 500]
                seen: set[str] = set()
                first: list[RedeemRequest] = []
                again: list[RedeemRequest] = []
                for q in batch:
                    (again if q.code in seen and c.type == "gift_card" else first).append(q)
                    seen.add(q.code)
                for part in (first, again):
                    if part:
                        outs = await engine.redeem_many(part)
                        redeemed += [o.redemption for o in outs if o.redemption is not None]
            rolled: dict[str, datetime] = {}
            for r in redeemed:
                if rng.random() < 0.03:
                    await engine.rollback(r.id)
                    rolled[r.id] = now
            await engine.flush()
            moves = []
            for r in redeemed:
                if recent:
                    t = now - timedelta(seconds=rng.uniform(60, 3300))
                else:
                    t = _when(rng, now, tz, days)
                moves.append((r.id, t))
            back = {rid: t + timedelta(minutes=rng.uniform(5, 600)) for rid, t in moves if rid in rolled}
            back = {rid: min(t, now) for rid, t in back.items()}
            await _backdate(conn, moves, back)
            sent = await _deliveries(conn, rng, c.id, assigned, now - timedelta(hours=1) if recent else start, now)
            say(f"demo: {c.name}: {sp.get('codes', 0) or 1} code(s), {len(assigned)} assigned,"
                f" {sent} deliveries, {len(redeemed)} redemptions ({len(rolled)} rolled back)")
            if c.type == "flash_sale" and c.shared_code is not None and flash_id is None:
                flash_id = c.id
        return {"campaigns": made, "flash": flash_id}
    finally:
        await conn.close()


async def run_flash_sale(
    engine: VoucherEngine, campaign_id: str, seconds: float, per_second: float = 4.0,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Keep redeeming a shared-code flash sale (live view demo) until it sells out, the time
    is up or ``stop()``; returns the redemptions made."""
    c = await engine.campaign(campaign_id)
    code = c.shared_code or ""
    rng = random.Random()
    made = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end and not stop():
        burst = max(1, int(rng.expovariate(1 / per_second)))
        outs = await engine.redeem_many(
            [RedeemRequest(code=code, amount=rng.randint(30, 120) * 100, currency=c.currency,
                           customer_id=f"demo-cust-{rng.randrange(N_CUSTOMERS):05d}")
             for _ in range(burst)]
        )
        made += sum(1 for o in outs if o.redemption is not None)
        if any(o.rejection is not None and o.rejection.error in ("exhausted", "expired", "campaign_ended")
               for o in outs):
            break
        await asyncio.sleep(1.0)
    return made


async def demo_campaign(engine: Any) -> None:
    now = datetime.now(UTC)
    suffix = os.urandom(3).hex()
    c = await engine.create_campaign(
        id=f"demo-{suffix}",
        name="Demo: 15% off, max 20 EUR",
        type="discount",
        currency="EUR",
        discount={"kind": "percent", "value": 15, "max": 2000},
        min_order=1000,
        ends_at=now + timedelta(days=30),
        code={"length": 10, "prefix": "DEMO-", "check_char": True},
    )
    print(f"created campaign {c.id}")
    t0 = time.perf_counter()
    await engine.generate(c.id, 100_000, progress=generation_bar)
    sys.stderr.write("\n")
    print(f"generated 100,000 codes in {time.perf_counter() - t0:.2f}s")
    await engine.activate(c.id)
    assigned = await engine.assign_many(c.id, [f"customer-{i}" for i in range(100)])
    reqs = [
        RedeemRequest(
            code=a.assignment.code,
            amount=5000 + 100 * i,
            currency="EUR",
            customer_id=a.assignment.customer_id,
            order_id=f"order-{i}",
            idempotency_key=f"demo-{suffix}-{i}",
        )
        for i, a in enumerate(assigned)
        if a.assignment is not None
    ]
    t0 = time.perf_counter()
    outs = await engine.redeem_many(reqs)
    ok = sum(1 for o in outs if o.redemption is not None)
    print(f"redeemed {ok} of {len(reqs)} assigned codes in {1000 * (time.perf_counter() - t0):.1f} ms")
    again = await engine.redeem_many(reqs[:1])
    print(f"replaying an idempotency key returns the first answer: {again[0].redemption.id}")
    second = RedeemRequest(code=reqs[0].code, amount=5000, currency="EUR", customer_id=reqs[0].customer_id)
    out = (await engine.redeem_many([second]))[0]
    print(f"redeeming the same code again: {out.rejection.error if out.rejection else 'ok?!'}")
    print_json(await engine.stats(c.id))


async def demo_data(engine: Any, dsn: str, scale: float, days: int, live_s: float) -> None:

    made = await create_demo_data(engine, dsn, scale=scale, days=days)
    print(f"demo data: {len(made['campaigns'])} campaigns: {', '.join(made['campaigns'])}")
    if live_s > 0 and made["flash"]:
        print(f"demo data: redeeming flash sale {made['flash']} live for {live_s:.0f}s (Ctrl-C stops)")
        n = await run_flash_sale(engine, made["flash"], live_s)
        print(f"demo data: {n} live flash-sale redemptions")


def live_flash_thread(engine: Any, dsn: str, stop: threading.Event) -> threading.Thread:
    """``up --demo``: demo data, then the flash sale keeps selling while the engine runs."""

    def run() -> None:

        async def go() -> None:
            made = await create_demo_data(engine, dsn)
            print(f"demo data: {len(made['campaigns'])} campaigns for the reporting app")
            if made["flash"]:
                await run_flash_sale(engine, made["flash"], 3600.0, stop=stop.is_set)

        try:
            asyncio.run(go())
        except Exception as exc:  # the engine is stopping, or demo data failed: say so
            print(f"demo data stopped: {exc!r}", file=sys.stderr)

    t = threading.Thread(target=run, name="demo-data", daemon=True)
    t.start()
    return t

