"""Chaos run: mixed checkout load over HTTP while a seeded schedule breaks the engine's
processes, its Postgres and its Valkey; then a checker compares what the clients were told
with what Postgres and the SMTP sink hold.

    python -m loadtests.chaos --seed 7 --duration 600 [--faults shard_kill,pg_restart,...]
                              [--clients 8] [--recovery-timeout 30] [--json out.json]

One run starts everything privately in a throwaway directory: embedded Postgres and Valkey,
a local Ray, the shard actors, the coordinator, the HTTP app (Serve), the issuer, delivery
workers and the SMTP sink. Clients on 127.0.0.1 then send, with an integration API key:
redemptions of unique codes, of a shared code with a total and a per-customer limit, and of
gift cards (partial spends), rollbacks of gift-card spends, reservations that are confirmed
or released, and replays of answered requests. Every request that gets no answer (a
timeout, a refused connection, 429 or 5xx) is sent again with the same idempotency key
until it is answered. An admin imports customers and issues them codes by email now and
then, re-running the issuance whenever its job fails.

Meanwhile a schedule drawn from ``random.Random(seed)`` injects faults, one at a time:

* ``shard_kill``, ``coordinator_kill``, ``issuer_kill``, ``worker_kill``: SIGKILL of the
  process of a shard, the coordinator, the issuer or a delivery worker (Ray restarts it);
* ``pg_freeze``: SIGSTOP of the postmaster and every backend, SIGCONT after a while;
* ``pg_restart``: Postgres stopped (fast shutdown) and started again after a while;
* ``valkey_restart`` / ``valkey_wipe``: Valkey stopped and started on the same port, with
  its data, or with its data directory emptied;
* ``zombie_shard``: a shard's process is frozen with requests queued in it, a replacement
  claims the shard and serves redemptions (through the engine API), then the replacement
  goes away and the frozen process is thawed: it must be fenced, exit and reload.

After each fault the injector waits until a probe redemption succeeds on every shard (and
records when ``/readyz`` said ready again), at most ``--recovery-timeout`` seconds, then
waits a drawn gap before the next fault. Same seed, same schedule (kinds, targets, hold
times, gaps); the timing of the load around it is the machine's.

The checker (Jepsen's bank and set checkers, on this engine's data): every acknowledged
redemption is in Postgres as answered; no unique code is redeemed twice; the shared code's
limits and every gift card's balance hold (balance = start - what its live redemptions
spent); acknowledged rollbacks, confirmations and releases are in Postgres; replays of
answered requests get the first answer again; no answer was a 500; every queued email was
accepted by the SMTP sink exactly once; and the engine served again within the recovery
timeout after each fault. Exit status 0 only when there is no anomaly and every fault
recovered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.support import free_port

FAULT_KINDS = (
    "shard_kill",
    "coordinator_kill",
    "issuer_kill",
    "worker_kill",
    "pg_freeze",
    "pg_restart",
    "valkey_restart",
    "valkey_wipe",
    "zombie_shard",
)
NAMESPACE = "chaos"
GIFT_BALANCE = 10_000
GIFT_SPEND = 2_500
ORDER_AMOUNT = 5_000
SHARED_PER_CUSTOMER = 2
# Answers that say "not decided, try again": the request is sent again with its key.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
HIGH_INTEGRATION_RATE = "10000000/20000000"


# --------------------------------------------------------------------------------------
# the schedule


@dataclass
class Fault:
    n: int
    kind: str
    gap_s: float  # pause before it, after the previous fault recovered
    hold_s: float  # how long a freeze or an outage lasts (0 for a kill)
    target: int  # which shard / worker
    started: float | None = None  # seconds since the run's start
    ended: float | None = None
    recovered_s: float | None = None  # fault end -> every shard redeems again
    ready_s: float | None = None  # fault end -> /readyz 200
    note: str = ""

    def describe(self) -> str:
        hold = f" hold {self.hold_s:.1f}s" if self.hold_s else ""
        return f"#{self.n} {self.kind}{hold} target {self.target} after {self.gap_s:.1f}s"


def plan(seed: int, kinds: list[str], duration_s: float, gaps: tuple[float, float] = (2.0, 6.0)) -> list[Fault]:
    """The faults of a run, drawn from the random seed alone (more than the run will reach)."""
    rng = random.Random(seed)
    faults: list[Fault] = []
    budget = 0.0
    while budget < duration_s * 3 and len(faults) < 10_000:
        kind = rng.choice(kinds)
        gap = rng.uniform(*gaps)
        hold = {
            "pg_freeze": rng.uniform(2.0, 8.0),
            "pg_restart": rng.uniform(1.0, 5.0),
            "valkey_restart": rng.uniform(1.0, 4.0),
            "valkey_wipe": rng.uniform(1.0, 4.0),
            "zombie_shard": rng.uniform(3.0, 6.0),
        }.get(kind, 0.0)
        faults.append(Fault(len(faults) + 1, kind, round(gap, 2), round(hold, 2), rng.randrange(1 << 16)))
        budget += gap + hold + 2.0
    return faults


# --------------------------------------------------------------------------------------
# Postgres and Valkey under our control


class Backends:
    """The embedded Postgres and Valkey of this run, which faults stop, freeze and wipe.
    Both come back at the same address (socket path, port), as a restarted server does."""

    def __init__(self, root: Path) -> None:
        from ops.servers import DATABASE, _EmbeddedPostgres, _EmbeddedValkey

        self._valkey_cls = _EmbeddedValkey
        self.pg = _EmbeddedPostgres(root / "postgres")
        self.pg.start()
        self.pg.ensure_database(DATABASE)
        self.database_url = self.pg.url(DATABASE)
        self.valkey_dir = root / "valkey"
        self.vk = _EmbeddedValkey(self.valkey_dir)
        self.vk.start()
        self.redis_url = self.vk.url
        self.frozen: list[psutil.Process] = []

    def pg_processes(self) -> list[psutil.Process]:
        assert self.pg.pid is not None
        master = psutil.Process(self.pg.pid)
        return [master, *master.children(recursive=True)]

    def pg_freeze(self) -> None:
        self.frozen = self.pg_processes()  # the postmaster first: it forks no one new
        for proc in self.frozen:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        for proc in reversed(self.frozen):
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGCONT)
        self.frozen = []

    def pg_stop(self) -> None:
        self.pg.stop()

    def pg_start(self) -> None:
        self.pg.start()
        from ops.servers import DATABASE

        if self.pg.url(DATABASE) != self.database_url:
            raise RuntimeError(f"postgres came back at {self.pg.url(DATABASE)}")

    def valkey_stop(self, wipe: bool) -> None:
        self.vk.stop()
        if wipe:
            for p in self.valkey_dir.iterdir():
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()

    def valkey_start(self) -> None:
        port = self.vk.port
        self.vk = self._valkey_cls(self.valkey_dir)
        self.vk._spawn(port)
        self.vk.owned = True
        self.vk._write_state()
        if self.vk.url != self.redis_url:
            raise RuntimeError(f"valkey came back at {self.vk.url}")

    def stop(self) -> None:
        self.thaw()
        for stop in (self.vk.stop, self.pg.stop):
            with contextlib.suppress(Exception):
                stop()


# --------------------------------------------------------------------------------------
# the clients' log


@dataclass
class Op:
    """One logical request and what the client was told (the first answer)."""

    kind: str
    method: str
    path: str
    body: Any
    key: str | None
    status: int | None = None
    answer: Any = None
    attempts: int = 0
    unanswered: int = 0  # attempts without an answer (sent again with the same key)
    via: str = "http"


def digest(status: int | None, body: Any) -> Any:
    """What must be the same when a request is answered again: the status and, for a
    success, the decision itself (not fields that change later, like a state)."""
    if not isinstance(body, dict) or status is None:
        return (status, None)
    if 200 <= status < 300:
        fields = ("id", "code", "campaign_id", "discount_amount", "balance", "order_amount",
                  "customer_id", "order_id")
        return (status, tuple(body.get(f) for f in fields))
    return (status, body.get("type"))


def _code(body: Any) -> str | None:
    return body.get("code") if isinstance(body, dict) else None


def _in_progress(body: Any) -> bool:
    """409 idempotency_in_progress: the key's first request is still being decided."""
    return _code(body) == "idempotency_in_progress"


def _transient(body: Any) -> bool:
    from engine.errors import is_transient

    code = _code(body)
    return code is not None and is_transient(code)


@dataclass
class Acked:
    id: str
    code: str
    campaign_id: str
    discount_amount: int


@dataclass
class World:
    """What the setup created: campaigns, codes, credentials."""

    url: str
    api_key: str
    admin_token: str
    shards: int
    unique: str
    codes: list[str]
    shared: str
    shared_code: str
    shared_total: int
    gift: str
    cards: list[str]
    probes: list[tuple[str, str]]  # (campaign id, shared code) per shard
    issuance_campaign: str


# --------------------------------------------------------------------------------------
# the run


@dataclass
class Run:
    args: argparse.Namespace
    world: World
    backends: Backends
    engine: Any
    pipeline: Any
    sinks: Any
    settings: Any
    t0: float = field(default_factory=time.monotonic)
    ops: list[Op] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    replays: int = 0
    probe_ok: list[tuple[float, float]] = field(default_factory=list)  # full rounds (start, end)
    ready_ok: list[float] = field(default_factory=list)
    issuances: list[dict[str, Any]] = field(default_factory=list)
    server_errors: list[tuple[float, str, int, str]] = field(default_factory=list)  # never a 500
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    hard_stop: float = float("inf")

    def now(self) -> float:
        return time.monotonic() - self.t0

    # --- HTTP -----------------------------------------------------------------------

    async def attempt(
        self, http: httpx.AsyncClient, op: Op, headers: dict[str, str] | None = None
    ) -> tuple[int | None, Any]:
        h = {"X-API-Key": self.world.api_key, **(headers or {})}
        if op.key:
            h["Idempotency-Key"] = op.key
        try:
            r = await http.request(op.method, op.path, json=op.body, headers=h)
        except httpx.HTTPError as exc:
            return None, type(exc).__name__
        try:
            data = r.json()
        except ValueError:
            data = r.text[:200]
        if r.status_code >= 500 and r.status_code not in (502, 503, 504):
            self.server_errors.append((self.now(), op.kind, r.status_code, str(data)[:120]))
        return r.status_code, data

    async def perform(self, http: httpx.AsyncClient, op: Op) -> Op:
        """Send ``op`` until it is answered (same idempotency key every time)."""
        self.ops.append(op)
        while time.monotonic() < self.hard_stop:
            op.attempts += 1
            status, data = await self.attempt(http, op)
            if status is not None and status not in RETRY_STATUSES and not _in_progress(data):
                op.status, op.answer = status, data
                return op
            op.unanswered += 1
            await asyncio.sleep(random.uniform(0.1, 0.5))
        return op

    # --- the load ---------------------------------------------------------------------

    def _checkout(self, code: str, key: str, customer: str, amount: int) -> dict[str, Any]:
        return {"code": code, "customer_id": customer,
                "order": {"id": f"o-{key}", "amount": amount, "currency": "EUR"}}

    async def client(self, http: httpx.AsyncClient, k: int) -> None:
        w = self.world
        rng = random.Random(f"{self.args.seed}-{k}")
        spends: list[str] = []  # this client's live gift-card redemptions
        answered: list[Op] = []
        n = 0
        while not self.stop.is_set():
            n += 1
            key = f"c{k}-{n}"
            pick = rng.random()
            if pick < 0.30:
                op = Op("redeem_unique", "POST", "/v1/redemptions",
                        self._checkout(rng.choice(w.codes), key, f"u{k}-{n}", ORDER_AMOUNT), key)
            elif pick < 0.50:
                customer = f"s{rng.randrange(max(1, w.shared_total // SHARED_PER_CUSTOMER))}"
                op = Op("redeem_shared", "POST", "/v1/redemptions",
                        self._checkout(w.shared_code, key, customer, ORDER_AMOUNT), key)
            elif pick < 0.65:
                op = Op("redeem_gift", "POST", "/v1/redemptions",
                        self._checkout(rng.choice(w.cards), key, f"g{k}-{n}", GIFT_SPEND), key)
            elif pick < 0.72 and spends:
                rid = spends.pop(rng.randrange(len(spends)))
                op = Op("rollback", "POST", f"/v1/redemptions/{rid}/rollback", None, key)
            elif pick < 0.90:
                await self.reservation(http, rng, key, f"r{k}-{n}", answered)
                continue
            elif answered:
                await self.replay(http, rng.choice(answered))
                continue
            else:
                continue
            await self.perform(http, op)
            if op.status is not None:
                answered.append(op)
                if op.kind == "redeem_gift" and op.status == 201:
                    spends.append(op.answer["id"])

    async def reservation(
        self, http: httpx.AsyncClient, rng: random.Random, key: str, customer: str, answered: list[Op]
    ) -> None:
        hold = await self.perform(http, Op(
            "reserve", "POST", "/v1/reservations",
            self._checkout(rng.choice(self.world.codes), key, customer, ORDER_AMOUNT), key))
        if hold.status is None:
            return
        answered.append(hold)
        if hold.status != 201:
            return
        verb = "confirm" if rng.random() < 0.6 else "release"
        then = await self.perform(http, Op(
            verb, "POST", f"/v1/reservations/{hold.answer['id']}/{verb}", None, f"{key}-{verb}"))
        if then.status is not None:
            answered.append(then)

    async def replay(self, http: httpx.AsyncClient, first: Op) -> None:
        """The same request with the same key, once it is answered: the first answer again
        (unless that was a "not now" rejection, which is not kept and runs again)."""
        if _transient(first.answer):
            return
        again = Op(first.kind, first.method, first.path, first.body, first.key)
        for _ in range(20):
            status, data = await self.attempt(http, again)
            if status is not None and status not in RETRY_STATUSES and not _in_progress(data):
                self.replays += 1
                if digest(status, data) != digest(first.status, first.answer):
                    self.anomalies.append(
                        f"replay of {first.kind} key {first.key} answered {status} {str(data)[:160]}"
                        f" but first {first.status} {str(first.answer)[:160]}")
                return
            if time.monotonic() > self.hard_stop:
                return
            await asyncio.sleep(0.3)

    # --- probes -----------------------------------------------------------------------

    async def probe(self, http: httpx.AsyncClient) -> None:
        """A redemption on every shard (a shared code each) every 0.3 s; a round where all
        were decided is the engine serving."""
        n = 0
        while not self.stop.is_set():
            n += 1
            began = self.now()
            ops = [Op("probe", "POST", "/v1/redemptions",
                      self._checkout(code, f"p{n}-{i}", f"p{n}-{i}", ORDER_AMOUNT), f"p{n}-{i}")
                   for i, (_cid, code) in enumerate(self.world.probes)]
            results = await asyncio.gather(*[self.attempt(http, op) for op in ops])
            for op, (status, data) in zip(ops, results, strict=True):
                op.attempts, op.status, op.answer = 1, status, data
                if status == 201:
                    self.ops.append(op)
            if all(s == 201 for s, _ in results):
                self.probe_ok.append((began, self.now()))
            await asyncio.sleep(0.3)

    async def readiness(self, http: httpx.AsyncClient) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/readyz")).status_code == 200:
                    self.ready_ok.append(self.now())
            await asyncio.sleep(0.5)

    # --- issuance ---------------------------------------------------------------------

    async def issuer_load(self, http: httpx.AsyncClient) -> None:
        """Import a batch of customers and issue them codes by email, every so often; a
        failed or unanswered job is run again (a re-run gives the same codes)."""
        rounds = max(1, self.args.issuances)
        every = self.args.duration / rounds
        for m in range(rounds):
            started = time.monotonic()
            await self.issue_once(http, m)
            rest = every - (time.monotonic() - started)
            if rest > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), rest)
            if self.stop.is_set():
                return

    async def admin(self, http: httpx.AsyncClient, method: str, path: str, **kw: Any) -> tuple[int | None, Any]:
        try:
            r = await http.request(method, path, headers={
                "Authorization": f"Bearer {self.world.admin_token}", **kw.pop("headers", {})}, **kw)
        except httpx.HTTPError as exc:
            return None, type(exc).__name__
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text[:200]

    async def issue_once(self, http: httpx.AsyncClient, m: int) -> None:
        tag = f"chaos{m}"
        n = self.args.customers
        record: dict[str, Any] = {"tag": tag, "customers": n, "runs": 0, "state": None,
                                  "started": round(self.now(), 1), "finished": None}
        self.issuances.append(record)
        body = "\n".join(json.dumps({"id": f"{tag}-{i}", "email": f"{tag}-{i}@shop.example",
                                     "consent_email": True, "tags": [tag]}) for i in range(n))
        while time.monotonic() < self.hard_stop:
            status, data = await self.admin(http, "POST", "/v1/customers/import", content=body.encode(),
                                            headers={"Content-Type": "application/x-ndjson"})
            if status is not None and status < 300:
                break
            await asyncio.sleep(0.5)
        while time.monotonic() < self.hard_stop:
            record["runs"] += 1
            status, job = await self.admin(
                http, "POST", f"/v1/campaigns/{self.world.issuance_campaign}/issuance",
                json={"selection": {"tag": tag}, "channels": ["email"]})
            if status != 202:
                await asyncio.sleep(0.5)
                continue
            while time.monotonic() < self.hard_stop:
                await asyncio.sleep(0.5)
                status, seen = await self.admin(http, "GET", f"/v1/jobs/{job['id']}")
                if status == 200 and seen["state"] != "running":
                    record["state"] = seen["state"]
                    break
                if status == 404:
                    break  # the job was lost with its process: issue again
            if record["state"] == "done":
                record["finished"] = round(self.now(), 1)
                return


# --------------------------------------------------------------------------------------
# fault injection


async def _pid_of(handle: Any, timeout_s: float = 30.0) -> int:
    pid = await asyncio.wait_for(handle.__ray_call__.remote(lambda _self: os.getpid()), timeout_s)
    return int(pid)


async def _sigkill(handle: Any) -> str:
    pid = await _pid_of(handle)
    os.kill(pid, signal.SIGKILL)
    return f"pid {pid}"


async def inject(run: Run, fault: Fault) -> None:
    """Apply one fault; returns when it is over (thawed, restarted, killed)."""
    kind, b = fault.kind, run.backends
    engine = run.engine
    if kind == "shard_kill":
        i = fault.target % engine.n
        fault.note = f"shard {i} " + await _sigkill(engine.shards[i])
    elif kind == "coordinator_kill":
        fault.note = await _sigkill(engine.coordinator)
    elif kind == "issuer_kill":
        import ray

        fault.note = await _sigkill(ray.get_actor("issuer", namespace=NAMESPACE))
    elif kind == "worker_kill":
        workers = run.pipeline.workers
        i = fault.target % len(workers)
        fault.note = f"worker {i} " + await _sigkill(workers[i])
    elif kind == "pg_freeze":
        await asyncio.to_thread(b.pg_freeze)
        try:
            await asyncio.sleep(fault.hold_s)
        finally:
            await asyncio.to_thread(b.thaw)
    elif kind == "pg_restart":
        await asyncio.to_thread(b.pg_stop)
        await asyncio.sleep(fault.hold_s)
        await asyncio.to_thread(b.pg_start)
    elif kind in ("valkey_restart", "valkey_wipe"):
        await asyncio.to_thread(b.valkey_stop, kind == "valkey_wipe")
        await asyncio.sleep(fault.hold_s)
        await asyncio.to_thread(b.valkey_start)
    elif kind == "zombie_shard":
        fault.note = await zombie(run, fault)
    else:
        raise ValueError(kind)


async def zombie(run: Run, fault: Fault) -> str:
    """Freeze a shard with requests queued in it; a replacement claims the shard and serves
    redemptions meanwhile; then the replacement goes and the old process is thawed.

    Thawed, the old process must stop answering from its memory: it exits when it learns
    it was fenced, or, when a commit it had in flight timed out across the freeze (outcome
    unknown), it reloads and claims the shard anew, above the replacement's epoch. Either
    is safe; a process that goes on at its old epoch is the anomaly."""
    import msgspec
    import ray

    from actors.client import VoucherEngine
    from actors.shard_actor import VoucherShard
    from engine.shard_state import RedeemRequest

    engine = run.engine
    i = fault.target % engine.n
    pid = await _pid_of(engine.shards[i])
    os.kill(pid, signal.SIGSTOP)
    replacement = None
    fenced_at: int | None = None  # the replacement's epoch
    served = 0
    try:
        await asyncio.sleep(0.5)
        replacement = VoucherShard.options(  # type: ignore[attr-defined]
            name=f"zombie-replacement-{fault.n}", namespace=NAMESPACE, max_restarts=0,
        ).remote(i, engine.n, run.backends.database_url, msgspec.msgpack.encode(run.settings))
        await asyncio.wait_for(replacement.ready.remote(), 60)
        shards = list(engine.shards)
        shards[i] = replacement
        side = VoucherEngine(shards, engine.coordinator)
        rng = random.Random(f"{run.args.seed}-zombie-{fault.n}")
        deadline = time.monotonic() + max(1.0, fault.hold_s - 0.5)
        n = 0
        while time.monotonic() < deadline:
            n += 1
            w = run.world
            code, amount = ((rng.choice(w.codes), ORDER_AMOUNT) if rng.random() < 0.6
                            else (rng.choice(w.cards), GIFT_SPEND))
            req = RedeemRequest(code=code, amount=amount, currency="EUR",
                                idempotency_key=f"z{fault.n}-{n}", customer_id=f"z{fault.n}-{n}")
            op = Op("redeem_replacement", "ENGINE", "", {"code": code}, req.idempotency_key, via="engine")
            try:
                out = (await asyncio.wait_for(side.redeem_many([req]), 3.0))[0]
            except Exception:
                await asyncio.sleep(0.1)
                continue
            op.attempts = 1
            if out.redemption is not None:
                r = out.redemption
                op.status, op.answer = 201, {"id": r.id, "code": r.code, "campaign_id": r.campaign_id,
                                             "discount_amount": r.discount_amount}
                served += 1
            else:
                op.status, op.answer = 409, {"error": out.rejection.error if out.rejection else None}
            run.ops.append(op)
    finally:
        if replacement is not None:
            with contextlib.suppress(Exception):
                fenced_at = await asyncio.wait_for(replacement.__ray_call__.remote(_epoch), 5.0)
            ray.kill(replacement, no_restart=True)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    thawed = time.monotonic()
    reclaimed: int | None = None
    while _running(pid) and time.monotonic() - thawed < run.args.recovery_timeout:
        if fenced_at is not None:
            with contextlib.suppress(Exception):
                owner_pid, epoch = await asyncio.wait_for(
                    engine.shards[i].__ray_call__.remote(_pid_and_epoch), 2.0)
                if owner_pid == pid and epoch is not None and epoch > fenced_at:
                    reclaimed = epoch
                    break
        await asyncio.sleep(0.1)
    took = time.monotonic() - thawed
    if reclaimed is not None:
        return (f"shard {i} pid {pid}; replacement redeemed {served}; the thawed process reloaded"
                f" and claimed epoch {reclaimed} (the replacement's was {fenced_at}) {took:.1f}s after the thaw")
    if _running(pid):
        run.anomalies.append(
            f"zombie_shard #{fault.n}: the fenced process {pid} of shard {i} still runs at its old"
            f" epoch {run.args.recovery_timeout:.0f}s after it was thawed")
        return f"shard {i} pid {pid}; replacement redeemed {served}; fenced process still running"
    return f"shard {i} pid {pid}; replacement redeemed {served}; fenced process exited {took:.1f}s after the thaw"


def _epoch(actor: Any) -> int | None:
    """The fencing epoch a shard actor holds (run inside the actor)."""
    fence = actor.core.fence
    return None if fence is None else int(fence.epoch)


def _pid_and_epoch(actor: Any) -> tuple[int, int | None]:
    return os.getpid(), _epoch(actor)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def _actor_back(run: Run, fault: Fault) -> None:
    """Kills of actors off the checkout path: their restart answers a call again."""
    import ray

    if fault.kind == "issuer_kill":
        await _pid_of(ray.get_actor("issuer", namespace=NAMESPACE), 3.0)
    elif fault.kind == "worker_kill":
        workers = run.pipeline.workers
        await _pid_of(workers[fault.target % len(workers)], 3.0)


async def wait_recovered(run: Run, fault: Fault) -> None:
    """Until every shard redeems again (and a killed issuer or worker answers), then a
    little longer for ``/readyz``; at most the recovery timeout."""
    assert fault.ended is not None
    end = fault.ended
    limit = end + run.args.recovery_timeout
    actor_at = None if fault.kind in ("issuer_kill", "worker_kill") else end
    while run.now() < limit:
        if fault.ready_s is None:
            ready = [t for t in run.ready_ok if t > end]
            if ready:
                fault.ready_s = round(ready[0] - end, 2)
        if actor_at is None:
            with contextlib.suppress(Exception):
                await _actor_back(run, fault)
                actor_at = run.now()
        served = [t for (s, t) in run.probe_ok if s > end]
        if fault.recovered_s is None and served and actor_at is not None:
            fault.recovered_s = round(max(served[0], actor_at) - end, 2)
        if fault.recovered_s is not None and (
            fault.ready_s is not None or run.now() > end + fault.recovered_s + 5.0
        ):
            return
        await asyncio.sleep(0.1)


async def injector(run: Run, faults: list[Fault], until: float) -> list[Fault]:
    done: list[Fault] = []
    for fault in faults:
        await asyncio.sleep(fault.gap_s)
        if run.now() + fault.hold_s > until:
            break
        fault.started = round(run.now(), 2)
        print(f"[{fault.started:7.1f}s] fault {fault.describe()}", flush=True)
        try:
            await inject(run, fault)
        except Exception as exc:
            fault.note = f"injection failed: {exc!r}"
        fault.ended = round(run.now(), 2)
        done.append(fault)
        await wait_recovered(run, fault)
        print(f"[{run.now():7.1f}s]   recovered in {fault.recovered_s}s, ready in {fault.ready_s}s"
              f" {fault.note}", flush=True)
    return done


# --------------------------------------------------------------------------------------
# setup


async def _code_on_shard(shard: int, shards: int, rng: random.Random) -> str:
    from engine.routing import shard_of_bucket
    from engine.shard_state import route_bucket

    while True:
        code = f"PROBE{rng.randrange(1 << 40):010X}"
        if shard_of_bucket(route_bucket(code), shards) == shard:
            return code


async def create_world(args: argparse.Namespace, engine: Any, dsn: str, url: str, settings: Any) -> World:
    from tests.engine_support import campaign_codes, discount_campaign, later, uid

    rng = random.Random(args.seed)
    unique = await discount_campaign(engine, args.codes)
    shared_total = args.shared_limit
    shared = await engine.create_campaign(
        id=uid("shared"), name="flash", type="shared_code", currency="EUR",
        discount={"kind": "amount", "value": 100}, shared_code=f"FLASH{rng.randrange(1 << 30):08X}",
        limits={"total": shared_total, "per_customer": SHARED_PER_CUSTOMER}, ends_at=later(),
    )
    await engine.activate(shared.id)
    gift = await engine.create_campaign(
        id=uid("gift"), name="gift", type="gift_card", currency="EUR",
        gift_balance=GIFT_BALANCE, ends_at=later(),
    )
    await engine.generate(gift.id, args.cards)
    await engine.activate(gift.id)
    probes = []
    for i in range(engine.n):
        code = await _code_on_shard(i, engine.n, rng)
        c = await engine.create_campaign(
            id=uid(f"probe{i}"), name=f"probe {i}", type="shared_code", currency="EUR",
            discount={"kind": "amount", "value": 1}, shared_code=code, ends_at=later())
        await engine.activate(c.id)
        probes.append((c.id, code))
    issuance = await discount_campaign(engine, args.customers * max(1, args.issuances) + 100)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        r = await http.post("/v1/auth/login", json={
            "email": settings.admin_email, "password": settings.admin_password})
        r.raise_for_status()
        token = r.json()["access_token"]
        r = await http.post("/v1/api-keys", json={"name": "chaos", "roles": ["integration"]},
                            headers={"Authorization": f"Bearer {token}"})
        r.raise_for_status()
        key = r.json()["key"]
    return World(url, key, token, engine.n, unique, await campaign_codes(dsn, unique), shared.id,
                 shared.shared_code, shared_total, gift.id, await campaign_codes(dsn, gift.id), probes,
                 issuance)


async def _wait_http(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{url}/readyz")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not become ready")
            await asyncio.sleep(0.5)


# --------------------------------------------------------------------------------------
# the checker


async def check(run: Run) -> dict[str, Any]:
    """Every anomaly, from the clients' log against Postgres and the SMTP sink."""
    from tests.engine_support import fetch
    from tests.invariants import redemption_anomalies

    w, dsn = run.world, run.backends.database_url
    answered = [op for op in run.ops if op.status is not None]
    redeemed = [op for op in answered if op.status == 201 and op.kind in
                ("redeem_unique", "redeem_shared", "redeem_gift", "confirm", "probe", "redeem_replacement")]
    acked = [Acked(op.answer["id"], op.answer["code"], op.answer["campaign_id"], op.answer["discount_amount"])
             for op in redeemed]
    counts, found = await redemption_anomalies(
        dsn, acked, unique=[w.unique], gift={w.gift: GIFT_BALANCE},
        shared={w.shared: (w.shared_total, SHARED_PER_CUSTOMER), **{c: (None, None) for c, _ in w.probes}},
    )
    run.anomalies.extend(found)

    rolled = [op.path.split("/")[3] for op in answered if op.kind == "rollback" and op.status == 200]
    if rolled:
        rows = await fetch(dsn, "SELECT id, status FROM redemptions WHERE id = ANY($1)", rolled)
        live = [r["id"] for r in rows if r["status"] == 0]
        if live or len(rows) != len(rolled):
            run.anomalies.append(f"acknowledged rollbacks not in Postgres: {(live + ['?'])[:5]}")
    for verb, state in (("confirm", 1), ("release", 2)):
        ids = [op.path.split("/")[3] for op in answered if op.kind == verb and 200 <= op.status < 300]
        if ids:
            rows = await fetch(dsn, "SELECT id, state FROM reservations WHERE id = ANY($1)", ids)
            wrong = [r["id"] for r in rows if r["state"] != state]
            if wrong or len(rows) != len(ids):
                run.anomalies.append(f"{len(wrong) + len(ids) - len(rows)} acknowledged {verb}s"
                                     f" not in Postgres: {wrong[:5]}")

    # replays of answered requests, after the faults: the first answer again
    http_ops = [op for op in answered if op.via == "http" and op.kind != "probe"]
    sample = random.Random(run.args.seed).sample(http_ops, min(len(http_ops), run.args.replays))
    async with httpx.AsyncClient(base_url=w.url, timeout=10) as http:
        sem = asyncio.Semaphore(8)

        async def one(op: Op) -> None:
            async with sem:
                await run.replay(http, op)

        await asyncio.gather(*[one(op) for op in sample])

    deliveries = await check_deliveries(run)
    return {"redemptions": counts, "deliveries": deliveries}


async def check_deliveries(run: Run) -> dict[str, int]:
    """Each issued customer has one email row; every row is ``sent`` and was accepted by
    the SMTP sink exactly once."""
    from tests.engine_support import fetch

    dsn, cid = run.backends.database_url, run.world.issuance_campaign
    tags = [r["tag"] for r in run.issuances if r["state"] == "done"]
    for r in run.issuances:
        if r["state"] != "done":
            run.anomalies.append(f"issuance of {r['tag']} never finished ({r['runs']} runs, last {r['state']})")
    expected = sum(r["customers"] for r in run.issuances if r["state"] == "done")
    deadline = time.monotonic() + run.args.recovery_timeout + 30
    rows: list[Any] = []
    while True:
        rows = await fetch(dsn, "SELECT id, customer_id, state FROM deliveries WHERE campaign_id = $1", cid)
        if all(r["state"] == "sent" for r in rows) or time.monotonic() > deadline:
            break
        await asyncio.sleep(1.0)
    per_customer = Counter(r["customer_id"] for r in rows)
    issued = {f"{t}-{i}" for t in tags for i in range(run.args.customers)}
    missing = issued - set(per_customer)
    twice = [c for c, n in per_customer.items() if n > 1]
    if missing:
        run.anomalies.append(f"{len(missing)} issued customers have no delivery: {sorted(missing)[:5]}")
    if twice:
        run.anomalies.append(f"{len(twice)} customers got more than one email row: {twice[:5]}")
    stuck = Counter((r["customer_id"].rsplit("-", 1)[0], r["state"]) for r in rows if r["state"] != "sent")
    for (tag, state), n in sorted(stuck.items()):
        run.anomalies.append(
            f"issuance {tag}: {n} deliveries still {state!r} {run.args.recovery_timeout + 30:.0f}s after the run")
    ids = {r["id"] for r in rows}
    accepted = Counter(x["key"] for x in list(run.sinks.outbox.receipts)
                       if x["status"] == "accepted" and x["key"] in ids)
    dups = sum(1 for x in list(run.sinks.outbox.receipts) if x["status"] == "duplicate" and x["key"] in ids)
    sent = {r["id"] for r in rows if r["state"] == "sent"}
    never = sent - set(accepted)
    if never:
        run.anomalies.append(f"{len(never)} deliveries marked sent that the SMTP sink never accepted")
    over = [k for k, n in accepted.items() if n > 1]
    if over:
        run.anomalies.append(f"{len(over)} messages accepted more than once")
    return {"expected": expected, "rows": len(rows), "sent": len(sent), "accepted": len(accepted),
            "duplicate_handovers": dups}


# --------------------------------------------------------------------------------------
# the report


def recovery_table(faults: list[Fault], timeout_s: float) -> list[dict[str, Any]]:
    by_kind: dict[str, list[Fault]] = defaultdict(list)
    for f in faults:
        by_kind[f.kind].append(f)
    table = []
    for kind in FAULT_KINDS:
        fs = by_kind.get(kind)
        if not fs:
            continue
        rec = [f.recovered_s for f in fs if f.recovered_s is not None]
        ready = [f.ready_s for f in fs if f.ready_s is not None]
        table.append({
            "kind": kind, "faults": len(fs),
            "recovered_median_s": round(statistics.median(rec), 2) if rec else None,
            "recovered_max_s": max(rec) if rec else None,
            "not_recovered": len(fs) - len(rec),
            "ready_median_s": round(statistics.median(ready), 2) if ready else None,
            "ready_max_s": max(ready) if ready else None,
            "not_ready": len(fs) - len(ready),
        })
    return table


def server_error_anomalies(run: Run, faults: list[Fault]) -> list[str]:
    """500s, grouped by the fault they came during or after (up to the recovery timeout)."""
    groups: dict[str, list[tuple[float, str, int, str]]] = defaultdict(list)
    for e in run.server_errors:
        t = e[0]
        near = [f for f in faults if f.started is not None and f.ended is not None
                and f.started <= t <= f.ended + run.args.recovery_timeout]
        label = f"during/after fault {near[-1].describe()}" if near else "with no fault near"
        groups[label].append(e)
    out = []
    for label, es in groups.items():
        kinds = Counter(e[1] for e in es)
        bodies = Counter(f"{e[2]} {e[3]}" for e in es)
        out.append(f"{len(es)} answers 5xx {label}, at {es[0][0]:.1f}-{es[-1][0]:.1f}s"
                   f" ({', '.join(f'{k} {v}' for k, v in kinds.items())}):"
                   f" {bodies.most_common(1)[0][0]}")
    return out


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def report(run: Run, faults: list[Fault], checked: dict[str, Any]) -> dict[str, Any]:
    run.anomalies.extend(server_error_anomalies(run, faults))
    answered = [op for op in run.ops if op.status is not None]
    kinds = Counter(op.kind for op in answered)
    acks = Counter(op.kind for op in answered if 200 <= (op.status or 0) < 300)
    retried = sum(1 for op in run.ops if op.unanswered)
    never = [op for op in run.ops if op.status is None and op.kind != "probe"]
    table = recovery_table(faults, run.args.recovery_timeout)
    failed = [f for f in faults if f.recovered_s is None]
    summary = {
        "seed": run.args.seed, "duration_s": run.args.duration, "faults_enabled": run.args.faults,
        "faults": [asdict(f) for f in faults],
        "operations": {"answered": dict(kinds), "acknowledged": dict(acks), "retried": retried,
                       "never_answered": len(never), "replays_checked": run.replays},
        "checked": checked, "issuances": run.issuances, "anomalies": run.anomalies, "recovery": table,
        "not_recovered": [f.describe() for f in failed],
    }
    print()
    print(f"seed {run.args.seed}, {run.args.duration:.0f}s, faults enabled: {','.join(run.args.faults)}")
    print("schedule (start, end: seconds into the run):")
    for f in faults:
        print(f"  {f.describe():55} {_fmt(f.started):>7} {_fmt(f.ended):>7}  recovered {_fmt(f.recovered_s)}s"
              f"  ready {_fmt(f.ready_s)}s  {f.note}")
    print(f"faults injected: {len(faults)}")
    print(f"operations acknowledged: {sum(acks.values())} ({', '.join(f'{k} {v}' for k, v in sorted(acks.items()))});"
          f" answered {sum(kinds.values())}; sent again after no answer: {retried};"
          f" never answered: {len(never)}; replays checked: {run.replays}")
    print(f"deliveries: {checked.get('deliveries')}")
    for r in run.issuances:
        print(f"  issuance {r['tag']}: {r['customers']} customers, {r['runs']} run(s), {r['state']},"
              f" {r['started']}s -> {r['finished']}s")
    print(f"anomalies: {len(run.anomalies)}")
    for a in run.anomalies[:50]:
        print(f"  - {a}")
    print(f"recovery per fault kind (every shard redeems again / /readyz 200; limit"
          f" {run.args.recovery_timeout:.0f}s):")
    print(f"  {'kind':18} {'faults':>6} {'median s':>9} {'max s':>7} {'failed':>6}"
          f" {'ready med':>9} {'ready max':>9} {'not ready':>9}")
    for row in table:
        print(f"  {row['kind']:18} {row['faults']:>6} {_fmt(row['recovered_median_s']):>9}"
              f" {_fmt(row['recovered_max_s']):>7} {row['not_recovered']:>6}"
              f" {_fmt(row['ready_median_s']):>9} {_fmt(row['ready_max_s']):>9} {row['not_ready']:>9}")
    verdict = "PASS" if not run.anomalies and not failed else "FAIL"
    print(f"{verdict}: {len(run.anomalies)} anomalies, {len(failed)} faults without recovery"
          f" (reproduce with --seed {run.args.seed} --faults {','.join(run.args.faults)})")
    return summary


# --------------------------------------------------------------------------------------
# main


async def drive(run: Run, faults: list[Fault]) -> list[Fault]:
    args = run.args
    limits = httpx.Limits(max_connections=args.clients + 16, max_keepalive_connections=args.clients + 16)
    async with httpx.AsyncClient(base_url=run.world.url, timeout=args.http_timeout, limits=limits) as http, \
            httpx.AsyncClient(base_url=run.world.url, timeout=3.0) as probe_http:
        run.t0 = time.monotonic()
        tasks = [asyncio.ensure_future(run.client(http, k)) for k in range(args.clients)]
        tasks += [asyncio.ensure_future(run.probe(probe_http)),
                  asyncio.ensure_future(run.readiness(probe_http)),
                  asyncio.ensure_future(run.issuer_load(http))]
        await asyncio.sleep(min(3.0, args.duration / 10))
        try:
            done = await asyncio.wait_for(injector(run, faults, args.duration), args.duration + args.recovery_timeout + 120)
        except TimeoutError:
            done = [f for f in faults if f.started is not None]
        rest = args.duration - run.now()
        if rest > 0:
            await asyncio.sleep(rest)
        # stop sending new requests; unanswered ones keep being sent until answered
        run.hard_stop = time.monotonic() + args.recovery_timeout + 30
        run.stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return done


async def _amain(args: argparse.Namespace, run: Run, faults: list[Fault]) -> int:
    done = await drive(run, faults)
    phase("load stopped; checking")
    for f in faults:  # a fault that began but did not end before a timeout
        if f.started is not None and f not in done:
            done.append(f)
    checked = await check(run)
    summary = report(run, done, checked)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    failed = [f for f in done if f.recovered_s is None]
    return 0 if not run.anomalies and not failed else 1


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=None, help="the schedule's seed (default: random, printed)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load and faults")
    p.add_argument("--faults", default=",".join(FAULT_KINDS),
                   help=f"comma-separated fault kinds (default all): {','.join(FAULT_KINDS)}")
    p.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--codes", type=int, default=5000, help="unique codes")
    p.add_argument("--cards", type=int, default=40, help="gift cards")
    p.add_argument("--shared-limit", type=int, default=2000, help="the shared code's total limit")
    p.add_argument("--customers", type=int, default=100, help="customers per issuance")
    p.add_argument("--issuances", type=int, default=4, help="issuances during the run")
    p.add_argument("--replays", type=int, default=1000, help="answered requests replayed at the end")
    p.add_argument("--recovery-timeout", type=float, default=30.0,
                   help="seconds after a fault by which the engine must serve again")
    p.add_argument("--http-timeout", type=float, default=10.0, help="seconds a client waits for an answer")
    p.add_argument("--gaps", default="2,6", help="seconds between a recovery and the next fault: min,max")
    p.add_argument("--dir", help="data directory (default: a new temp dir, removed afterwards)")
    p.add_argument("--json", help="write the summary here")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    args.faults = [k for k in args.faults.split(",") if k]
    low, high = (float(x) for x in args.gaps.split(","))
    args.gaps = (low, high)
    unknown = set(args.faults) - set(FAULT_KINDS)
    if unknown:
        p.error(f"unknown fault kinds {sorted(unknown)}; known: {','.join(FAULT_KINDS)}")
    return args


_BEGAN = time.monotonic()


def phase(what: str) -> None:
    print(f"[{time.monotonic() - _BEGAN:6.1f}s since start] {what}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    faults = plan(args.seed, args.faults, args.duration, args.gaps) if args.faults else []
    print(f"chaos: seed {args.seed}, duration {args.duration:.0f}s, faults {','.join(args.faults) or 'none'}",
          flush=True)
    print("planned: " + "; ".join(f.describe() for f in faults[:12]) + (" ..." if len(faults) > 12 else ""),
          flush=True)
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    # its own ports always: a value inherited from another engine (a test session) is taken
    os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] = str(free_port())
    os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_port())
    os.environ["VOUCHER_RATE_INTEGRATION"] = HIGH_INTEGRATION_RATE
    import msgspec
    import ray

    from actors.client import start_engine
    from actors.delivery import provider_urls, start_delivery
    from actors.issuance import issuer_handle
    from actors.outbound import allowing
    from engine.gcra import parse_limit
    from engine.settings import Settings
    from ops.sinks import Sinks
    from ops.start import local_ray_environment, start_http
    from store.migrations import migrate

    owned_dir = args.dir is None
    root = Path(args.dir or tempfile.mkdtemp(prefix="chaos-", dir="/tmp")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)  # the embedded Postgres may run as another user (under root)
    backends = sinks = None
    try:
        backends = Backends(root)
        dsn = backends.database_url
        asyncio.run(migrate(dsn))
        phase("postgres and valkey up")
        local_ray_environment()
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 namespace=NAMESPACE)
        settings = Settings(
            shards=args.shards, namespace=NAMESPACE, batch_window_ms=1.0, http_port=free_port(),
            rate_integration=parse_limit(HIGH_INTEGRATION_RATE),
            admin_email="admin@chaos.example", admin_password="chaos-admin-password", data_dir=str(root),
            delivery_workers=2, delivery_claim_idle_s=3.0, delivery_backoff_base_s=0.05,
            delivery_backoff_max_s=0.5, delivery_send_timeout_s=5.0,
        )
        phase("ray up")
        engine = start_engine(settings, dsn)
        url = start_http(settings, dsn, backends.redis_url, replicas={"Gateway": 1})
        issuer_handle(settings, dsn, backends.redis_url)
        sinks = Sinks(root / "outbox").start()
        pipeline = start_delivery(
            allowing(settings, [sinks.urls["page"]]), dsn, backends.redis_url,
            urls=provider_urls(settings, sinks.urls),
        )
        asyncio.run(_wait_http(url))
        phase("http app, issuer and delivery up")
        world = asyncio.run(create_world(args, engine, dsn, url, msgspec.structs.replace(settings)))
        print(f"engine up: {engine.n} shards, {url}, {len(world.codes)} codes, {len(world.cards)} cards;"
              f" Ray logs in {ray._private.worker.global_worker.node.get_session_dir_path()}/logs",
              flush=True)

        async def go() -> int:
            run = Run(args, world, backends, engine, pipeline, sinks, settings)
            return await _amain(args, run, faults)

        return asyncio.run(go())
    finally:
        phase("stopping")
        if backends is not None:
            backends.thaw()
        if ray.is_initialized():
            ray.shutdown()
        if sinks is not None:
            sinks.stop()
        if backends is not None:
            backends.stop()
        if owned_dir:
            shutil.rmtree(root, ignore_errors=True)
        phase("stopped")


if __name__ == "__main__":
    sys.exit(main())
