"""The notification service: recording notices, threshold crossings, and the dispatcher
actor that fans every notification out by email and signed webhooks.

Anyone may insert into ``notifications`` (the gateway on campaign transitions, the issuer
and the coordinator on jobs, the delivery workers on dead letters and failure rates): the
dispatcher claims rows whose ``dispatched_at`` is NULL (``FOR UPDATE SKIP LOCKED``, so two
dispatchers never take the same row), creates one send per target (``email`` to every
admin and manager, ``webhook:<id>`` per active webhook that wants the kind) and works the
sends off with retries: attempt n+1 waits ``VOUCHER_NOTIFY_RETRY_BASE_S * 2^(n-1)``; after
``VOUCHER_NOTIFY_MAX_ATTEMPTS`` a send is ``dead``. Each attempt is a row in
``notification_attempts``.

Thresholds (bank low, limit nearly exhausted) fire once per crossing: a row per threshold
in ``notification_thresholds`` is disarmed atomically by the notice that fires it and
re-armed when the value recovers (``engine.notify.crossing``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any
from urllib.parse import unquote, urlsplit

import aiosmtplib
import asyncpg
import httpx
import msgspec
import ray

from actors import outbound
from actors.observability import configure_json_logging
from engine import errors, notify, urls
from engine.notify import Notice
from engine.settings import Settings
from store import notifications
from store.pools import open_pool

log = logging.getLogger("voucher.notifier")
_json = msgspec.json.Encoder()
LEASE_S = 60  # a claimed send is retried by anyone after this if its dispatcher died
SCAN_EVERY_S = 5.0
MAIL_FROM = "voucher-engine <notifications@voucher-engine.invalid>"


# --- recording (used by every producer) ------------------------------------------------


async def record(db: asyncpg.Pool | asyncpg.Connection, n: Notice) -> int:
    return await notifications.record(db, n.kind, n.campaign_id, n.message)


async def threshold(
    pool: asyncpg.Pool, key: str, breached: bool, recovered: bool, n: Notice
) -> bool:
    """Apply one observation of a threshold; records ``n`` (and returns True) only when this
    observation is the crossing. Safe under concurrent observers: the disarm is atomic."""
    async with pool.acquire() as conn, conn.transaction():
        armed = await notifications.armed(conn, key)
        fire, armed_after = notify.crossing(True if armed is None else armed, breached, recovered)
        if fire:
            if await notifications.disarm(conn, key):
                await record(conn, n)
                return True
            return False
        if armed is None or armed_after != armed:
            await notifications.set_armed(conn, key, armed_after)
    return False


async def check_campaign(pool: asyncpg.Pool, campaign: Any, stats: Any, settings: Settings) -> int:
    """Bank-low and limit-nearly-exhausted checks of one campaign; returns notices fired."""
    fired = 0
    if not campaign.is_shared and (stats.available + stats.assigned + stats.redeemed) > 0:
        breached, recovered = notify.bank_low(stats.available, settings.bank_low_threshold)
        fired += await threshold(
            pool,
            f"bank_low:{campaign.id}",
            breached,
            recovered,
            Notice(
                "bank_low",
                campaign.id,
                f"campaign {campaign.name} ({campaign.id}): {stats.available} codes left in the "
                f"bank (threshold {settings.bank_low_threshold})",
            ),
        )
    total = campaign.limits.total
    used = stats.active_redemptions
    breached, recovered = notify.limit_nearly_exhausted(used, total, settings.limit_warn_ratio)
    if total:
        fired += await threshold(
            pool,
            f"limit:{campaign.id}",
            breached,
            recovered,
            Notice(
                "limit_nearly_exhausted",
                campaign.id,
                f"campaign {campaign.name} ({campaign.id}): {used} of {total} redemptions used "
                f"({100 * used / total:.0f}%)",
            ),
        )
    return fired


# --- webhooks (the API's store) --------------------------------------------------------


def check_webhook(url: Any, secret: Any, kinds: Any) -> tuple[str, str, list[str] | None]:
    """The syntax checks of a registration (the address check needs DNS: :func:`add_webhook`)."""
    url = urls.parse(url, "url").url
    if secret is None:
        secret = "whsec_" + secrets.token_urlsafe(32)
    elif not isinstance(secret, str) or not 16 <= len(secret) <= 256:
        raise errors.InvalidInput("secret must be 16..256 characters (or left out to get one)")
    if kinds is not None:
        if not isinstance(kinds, list) or not kinds:
            raise errors.InvalidInput("kinds must be a non-empty list (or left out for all)")
        for k in kinds:
            if k not in notify.KINDS:
                raise errors.InvalidInput(f"unknown kind {k!r}; kinds are {', '.join(notify.KINDS)}")
        kinds = sorted(set(kinds))
    return url, secret, kinds


async def add_webhook(
    db: asyncpg.Pool,
    url: Any,
    secret: Any,
    kinds: Any,
    allow: tuple[urls.AllowEntry, ...] = (),
    resolver: outbound.Resolver = outbound.system_resolve,
) -> dict[str, Any]:
    """Register a webhook; refused (InternalAddress, 422) when its URL is or resolves to an
    internal address that ``allow`` does not name. Sends check again at connect time."""
    url, secret, kinds = check_webhook(url, secret, kinds)
    await outbound.check_url(url, allow, resolver)
    wid = "wh_" + secrets.token_hex(8)
    row = await notifications.add_webhook(db, wid, url, secret, kinds)
    return {**row, "secret": secret}


# --- the dispatcher --------------------------------------------------------------------


def smtp_target(url: str) -> dict[str, Any]:
    """aiosmtplib.send() keywords for an smtp:// or smtps:// URL."""
    parts = urlsplit(url)
    tls = parts.scheme == "smtps"
    return {
        "hostname": parts.hostname or "127.0.0.1",
        "port": parts.port or (465 if tls else 25),
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "use_tls": tls,
        "start_tls": False if tls else None,
        "timeout": 10,
    }


class Dispatcher:
    def __init__(self, dsn: str, settings: Settings, engine: Any = None) -> None:
        self.dsn = dsn
        self.settings = settings
        self.engine = engine
        self.pool: asyncpg.Pool | None = None
        self.http: httpx.AsyncClient | None = None
        self._last_scan = 0.0
        self.rounds = 0

    async def open(self) -> None:
        if self.pool is None:
            self.pool = await open_pool(self.dsn, 4, writer=True)
            self.http = outbound.client(outbound.allow_of(self.settings), timeout=10.0)

    async def run_forever(self) -> None:
        await self.open()
        while True:
            try:
                busy = await self.step()
            except Exception:
                log.exception("notification dispatch round failed")
                busy = False
            if not busy:
                await asyncio.sleep(self.settings.notify_poll_s)

    async def step(self) -> bool:
        """One round: claim new notifications, attempt due sends, scan thresholds now and
        then. Returns whether there was work (then the next round starts at once)."""
        await self.open()
        claimed = await self.claim_new()
        attempted = await self.attempt_due()
        if self.engine is not None and time.monotonic() - self._last_scan >= SCAN_EVERY_S:
            self._last_scan = time.monotonic()
            await self.scan_thresholds()
        self.rounds += 1
        return bool(claimed or attempted)

    async def claim_new(self) -> int:
        assert self.pool is not None
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await notifications.claim_new(conn)
            if not rows:
                return 0
            hooks = await notifications.active_webhooks(conn)
            ids: list[int] = []
            targets: list[str] = []
            for r in rows:
                if self.settings.smtp_url:
                    ids.append(r["id"])
                    targets.append("email")
                for h in hooks:
                    if h["kinds"] is None or r["kind"] in h["kinds"]:
                        ids.append(r["id"])
                        targets.append(f"webhook:{h['id']}")
            if ids:
                await notifications.add_sends(conn, ids, targets)
        return len(rows)

    async def attempt_due(self) -> int:
        assert self.pool is not None
        rows = await notifications.lease_due(self.pool, LEASE_S)
        if rows:
            await asyncio.gather(*[self._attempt(r) for r in rows])
        return len(rows)

    async def _attempt(self, r: asyncpg.Record) -> None:
        assert self.pool is not None
        ok, status, error = False, None, None
        try:
            if r["target"] == "email":
                ok, status, error = await self._email(r)
            else:
                ok, status, error = await self._webhook(r, r["target"].split(":", 1)[1])
        except Exception as exc:  # a send must never kill the dispatcher
            error = f"{exc.__class__.__name__}: {exc}"[:500]
        attempt = r["attempts"]
        dead = not ok and attempt >= self.settings.notify_max_attempts
        delay = notify.backoff_s(attempt, self.settings.notify_retry_base_s)
        await notifications.record_attempt(
            self.pool,
            r["id"],
            attempt,
            ok=ok,
            status=status,
            error=error,
            state="sent" if ok else ("dead" if dead else "pending"),
            delay_s=delay,
        )
        if not ok:
            log.warning(
                "notification %s to %s failed (attempt %d%s): %s",
                r["nid"],
                r["target"],
                attempt,
                ", giving up" if dead else "",
                error,
            )

    def _payload(self, r: asyncpg.Record) -> dict[str, Any]:
        return {
            "id": r["nid"],
            "kind": r["kind"],
            "campaign_id": r["campaign_id"],
            "message": r["message"],
            "created_at": r["created_at"].isoformat(),
        }

    async def _email(self, r: asyncpg.Record) -> tuple[bool, int | None, str | None]:
        assert self.pool is not None and self.settings.smtp_url
        recipients = await notifications.staff_emails(self.pool)
        if not recipients:
            return True, None, "no admin or manager to notify"
        msg = EmailMessage()
        msg["From"] = MAIL_FROM
        msg["To"] = MAIL_FROM
        msg["Subject"] = f"[voucher-engine] {r['kind'].replace('_', ' ')}" + (
            f": {r['campaign_id']}" if r["campaign_id"] else ""
        )
        msg["X-Voucher-Notification"] = str(r["nid"])
        msg.set_content(
            f"{r['message']}\n\nkind: {r['kind']}\ncampaign: {r['campaign_id'] or '-'}\n"
            f"at: {r['created_at'].isoformat()}\nnotification: {r['nid']}\n"
        )
        try:
            errors_, reply = await aiosmtplib.send(
                msg, recipients=recipients, **smtp_target(self.settings.smtp_url)
            )
        except aiosmtplib.SMTPResponseException as exc:
            return False, exc.code, exc.message[:500]
        if errors_:
            return False, None, f"refused recipients: {', '.join(sorted(errors_))}"[:500]
        return True, 250, None

    async def _webhook(
        self, r: asyncpg.Record, webhook_id: str
    ) -> tuple[bool, int | None, str | None]:
        assert self.pool is not None and self.http is not None
        hook = await notifications.webhook(self.pool, webhook_id)
        if hook is None or not hook["active"]:
            return True, None, "webhook removed; not sent"
        body = _json.encode(self._payload(r))
        headers = {
            "Content-Type": "application/json",
            notify.SIGNATURE_HEADER: notify.sign(hook["secret"], body, int(time.time())),
            notify.EVENT_HEADER: r["kind"],
            "X-Voucher-Delivery": str(r["id"]),
        }
        resp = await self.http.post(hook["url"], content=body, headers=headers)
        if 200 <= resp.status_code < 300:
            return True, resp.status_code, None
        return False, resp.status_code, f"HTTP {resp.status_code}: {resp.text[:200]}"

    async def scan_thresholds(self) -> int:
        """Bank and limit checks of every running campaign (the hot path never checks)."""
        assert self.pool is not None
        fired = 0
        for c in await self.engine.campaigns():
            if c.state != "active":
                continue
            try:
                stats = await self.engine.stats(c.id)
                fired += await check_campaign(self.pool, c, stats, self.settings)
            except errors.VoucherError as exc:
                log.info("threshold scan of %s skipped: %s", c.id, exc.code)
        return fired


@ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=100, num_cpus=0)
class Notifier:
    """Ray face of :class:`Dispatcher`. The loop runs on its own thread and event loop from
    construction on, so an actor that Ray restarts resumes dispatching by itself."""

    def __init__(self, settings: bytes, dsn: str) -> None:
        import threading

        from actors.client import attach_engine

        decoded = msgspec.msgpack.decode(settings, type=Settings)
        configure_json_logging(decoded.log_level)
        self.dispatcher = Dispatcher(dsn, decoded, attach_engine(decoded))
        self._thread = threading.Thread(
            target=asyncio.run, args=(self.dispatcher.run_forever(),), daemon=True, name="notify"
        )
        self._thread.start()

    async def start(self) -> bool:
        """Whether the dispatch loop is alive (it starts with the actor)."""
        return self._thread.is_alive()

    async def info(self) -> dict[str, Any]:
        return {
            "rounds": self.dispatcher.rounds,
            "smtp": bool(self.dispatcher.settings.smtp_url),
            "at": datetime.now(UTC).isoformat(),
        }


def start_notifier(settings: Settings, dsn: str, *, name: str = "notifier") -> Any:
    """Create (or attach to) the named dispatcher actor and start its loop."""
    enc = msgspec.msgpack.encode(settings)
    actor = Notifier.options(  # type: ignore[attr-defined]
        name=name, namespace=settings.namespace, get_if_exists=True, lifetime="detached"
    ).remote(enc, dsn)
    if not ray.get(actor.start.remote()):
        raise errors.Unavailable("the notification dispatcher is not running")
    return actor
