"""The per-domain Serve deployments behind the gateway.

Each is a thin adapter over the engine's Python API or a store; business rules stay in
``engine/``. Methods return values or a :class:`actors.calls.Failure` (never raise an
engine error across the handle), so the gateway maps errors to problems without Ray's
remote tracebacks. The redemption hot path does not come through here: the gateway
coalesces it per shard and calls the shard actors directly (one hop, not two).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
from ray import serve

from actors.calls import Failure, guarded
from actors.client import attach_engine
from engine import errors
from engine.audit import Actor
from engine.settings import Settings
from store.pools import LazyPool

log = logging.getLogger("voucher.serve")


def campaign_json(c: Any) -> dict[str, Any]:
    """A campaign as the API shows it (``code_spec`` is called ``code`` at the edge)."""
    d = msgspec.to_builtins(c)
    d["code"] = d.pop("code_spec", {})
    if d.get("type") == "promotion":
        d["shared_code"] = None  # its key on its shard is no code anyone can use
    return d


def _settings(blob: dict[str, Any]) -> Settings:
    return msgspec.convert(blob, Settings)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Users:
    """Registration, login (Argon2id is CPU-heavy: it runs here, not on the gateway's
    event loop), API keys and roles."""

    def __init__(self, settings: dict[str, Any], dsn: str, redis_url: str) -> None:
        from serve.auth import TokenIssuer, load_or_create_secret
        from serve.ratelimit import RateLimiter
        from serve.users import UserStore

        self.settings = _settings(settings)
        self.store = UserStore(dsn)
        # Writes the gateways' API-key cache flags (same Redis and prefix as their limiter).
        self.flags = RateLimiter(redis_url)
        self.tokens = TokenIssuer(load_or_create_secret(self.settings), ttl_s=self.settings.token_ttl_s)
        self._started = False

    async def _start(self) -> None:
        if not self._started:
            self._started = True
            await self.store.open()

    @guarded
    async def register(self, email: str, password: str, name: str) -> dict[str, Any]:
        await self._start()
        return dict(await self.store.register(email, password, name))

    @guarded
    async def login(self, email: str, password: str) -> dict[str, Any]:
        await self._start()
        principal = await self.store.login(email, password)
        token, expires_in = self.tokens.issue(principal)
        return {"access_token": token, "token_type": "bearer", "expires_in": expires_in}

    @guarded
    async def get(self, user_id: str) -> dict[str, Any]:
        await self._start()
        return dict(await self.store.get(user_id))

    async def _flag_keys(self, key_ids: list[str], *, strict: bool) -> None:
        """Tell every gateway replica to re-check these API keys against the database.
        The flag after the change (not strict) waits until it is on Redis's disk."""
        from engine.keys import api_key_flag
        from serve.auth import API_KEY_FLAG_TTL_S

        try:
            await self.flags.flag(
                [api_key_flag(k) for k in key_ids], API_KEY_FLAG_TTL_S, durable=not strict
            )
        except Exception as exc:
            if strict:
                raise errors.Unavailable(
                    "cannot reach Redis to invalidate cached API keys; nothing was changed"
                ) from exc
            log.warning("could not re-flag API keys %s after the change: %s", key_ids, exc)

    @guarded
    async def set_roles(
        self, user_id: str, roles: list[str], actor: Actor | None = None
    ) -> dict[str, Any]:
        await self._start()
        # Flag before the change (a failure changes nothing) and after it (the flag then
        # outlives every cache entry made before the commit).
        keys = await self.store.api_key_ids(user_id)
        await self._flag_keys(keys, strict=True)
        out = dict(await self.store.set_roles(user_id, roles, actor))
        await self._flag_keys(keys, strict=False)
        return out

    @guarded
    async def create_api_key(self, owner: Any, name: str, roles: list[str]) -> dict[str, Any]:
        await self._start()
        key_id, plaintext = await self.store.create_api_key(owner, name, roles)
        return {"id": key_id, "key": plaintext, "name": name, "roles": sorted(roles)}

    @guarded
    async def revoke_api_key(self, key_id: str, by: Any) -> dict[str, Any]:
        await self._start()
        await self._flag_keys([key_id], strict=True)
        await self.store.revoke_api_key(key_id, by)
        await self._flag_keys([key_id], strict=False)
        return {"id": key_id, "revoked": True}

    @guarded
    async def list_api_keys(self, owner: Any) -> list[dict[str, Any]]:
        await self._start()
        return [dict(k) for k in await self.store.list_api_keys(owner)]


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Campaigns:
    """Campaign definitions, lifecycle and generation jobs (through the coordinator)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.engine = attach_engine(_settings(settings))

    @guarded
    async def create(self, fields: dict[str, Any], actor: Actor | None = None) -> dict[str, Any]:
        from engine.audit import SYSTEM

        return campaign_json(await self.engine.create_campaign(**fields, actor=actor or SYSTEM))

    @guarded
    async def get(self, campaign_id: str) -> dict[str, Any]:
        return campaign_json(await self.engine.campaign(campaign_id))

    @guarded
    async def list(
        self,
        state: str | None,
        limit: int,
        offset: int,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        from engine.campaigns import has_metadata

        items = await self.engine.campaigns()
        if state is not None:
            items = [c for c in items if c.state == state]
        if metadata is not None:
            items = [c for c in items if has_metadata(c, metadata)]
        items.sort(key=lambda c: (c.created_at or datetime.min.replace(tzinfo=UTC)), reverse=True)
        return {
            "items": [campaign_json(c) for c in items[offset : offset + limit]],
            "total": len(items),
        }

    @guarded
    async def transition(
        self, campaign_id: str, action: str, actor: Actor | None = None
    ) -> dict[str, Any]:
        from engine.audit import SYSTEM

        result = await self.engine.transition_result(campaign_id, action, actor or SYSTEM)
        return campaign_json(result.campaign) | {"fenced_shards": list(result.fenced)}

    @guarded
    async def edit(
        self, campaign_id: str, changes: dict[str, Any], if_version: int | None, actor: Actor
    ) -> dict[str, Any]:
        """A shop's change (``engine.campaigns.edit``), answered once every shard holds
        the new version or was fenced."""
        result = await self.engine.edit_campaign(campaign_id, changes, if_version, actor)
        return campaign_json(result.campaign) | {"fenced_shards": list(result.fenced)}

    @guarded
    async def start_generation(self, campaign_id: str, count: int) -> dict[str, Any]:
        return await self.engine.start_generation(campaign_id, count)

    @guarded
    async def job(self, job_id: str) -> dict[str, Any]:
        return await self.engine.job(job_id)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Vouchers:
    """Voucher look-ups (the shard that owns the code answers) and a customer's wallet."""

    def __init__(self, settings: dict[str, Any], dsn: str) -> None:
        self.engine = attach_engine(_settings(settings))
        self._pool = LazyPool(dsn, 2)

    @guarded
    async def get(self, code: str) -> dict[str, Any]:
        from store import vouchers

        found = await self.engine.voucher(code)
        found["metadata"] = await vouchers.metadata_of(await self._pool(), found["code"])
        return found

    @guarded
    async def control(self, code: str, changes: dict[str, Any], actor: Actor) -> dict[str, Any]:
        """Change one code (its owner shard decides); the answer shows its metadata."""
        from store import vouchers

        out = await self.engine.control(code, changes, actor)
        if "metadata" not in out:
            out["metadata"] = await vouchers.metadata_of(await self._pool(), out["code"])
        return out

    @guarded
    async def of_customer(self, customer_id: str, limit: int) -> list[dict[str, Any]]:
        from store import customers

        codes = await customers.codes_of(await self._pool(), customer_id, limit)
        found = await asyncio.gather(*[self.engine.voucher(c) for c in codes])
        return list(found)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Reports:
    """Campaign reports from the rollups (``store/reports.py``; never a scan of the
    vouchers or redemptions per request) and live flash-sale counters from the shards'
    memory. Each replica folds new changes into the rollups every
    ``report_refresh_ms`` (one at a time across replicas: an advisory lock) and samples
    the live counters of the campaigns someone watches, for redemptions per second."""

    WATCH_S = 120.0  # sample a campaign's live counters this long after it was asked for

    def __init__(self, settings: dict[str, Any], dsn: str | None = None) -> None:
        from collections import deque

        self.settings = _settings(settings)
        self.engine = attach_engine(self.settings)
        self.dsn = dsn
        self._db = LazyPool(dsn, 4) if dsn is not None else None
        self._task: asyncio.Task[None] | None = None
        self._samples: dict[str, deque[tuple[float, int]]] = {}
        self._watched: dict[str, float] = {}
        self.refreshes = 0

    async def _pool(self) -> asyncpg.Pool:
        if self._db is None:
            raise errors.Unavailable("the reporting service has no database configured")
        try:
            pool = await self._db()
        except (OSError, asyncpg.PostgresError) as exc:
            raise errors.Unavailable(f"reporting database unreachable: {exc}") from None
        self._start()
        return pool

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def check_health(self) -> None:
        # Serve calls this every few seconds: it starts the refresher without traffic. A
        # database that is down is not this replica's fault (restarting would not help):
        # reports answer 503 meanwhile and the refresher retries.
        if self.dsn is not None:
            try:
                await self._pool()
            except Exception:
                log.warning("reports: database not reachable yet", exc_info=True)

    async def _loop(self) -> None:
        from store import reports as store

        period = self.settings.report_refresh_ms / 1000
        while True:
            try:
                assert self._db is not None
                async with (await self._db()).acquire() as conn:
                    await store.refresh(conn)
                self.refreshes += 1
                await self._sample_watched()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep refreshing: the next tick may find the database back
                log.exception("report refresh failed")
            await asyncio.sleep(period)

    async def _sample_watched(self) -> None:
        import time

        now = time.monotonic()
        for cid, at in list(self._watched.items()):
            if now - at > self.WATCH_S:
                self._watched.pop(cid, None)
                self._samples.pop(cid, None)
                continue
            try:
                await self._sample(cid)
            except errors.VoucherError:
                self._watched.pop(cid, None)

    async def _sample(self, campaign_id: str) -> Any:
        import time
        from collections import deque

        stats = await self.engine.stats(campaign_id)
        q = self._samples.setdefault(campaign_id, deque(maxlen=600))
        now = time.monotonic()
        q.append((now, stats.redemptions - stats.rollbacks))
        while q and now - q[0][0] > 300:
            q.popleft()
        return stats

    async def _campaign(self, conn: Any, campaign_id: str) -> dict[str, Any]:
        from store import reports as store

        c = await store.campaign_row(conn, campaign_id)
        if c is None:
            raise errors.UnknownCampaign(f"unknown campaign {campaign_id!r}")
        return c

    @guarded
    async def refresh(self) -> dict[str, Any]:
        """Fold pending changes now (the periodic job does the same)."""
        from store import reports as store

        db = await self._pool()
        async with db.acquire() as conn:
            folded = await store.refresh(conn)
        return {"folded": folded}

    @guarded
    async def overview(self, top: int) -> dict[str, Any]:
        from engine import reports as rep
        from store import reports as store

        db = await self._pool()
        async with db.acquire() as conn:
            rows = await store.overview_rows(conn)
        totals: dict[str, Any] = {
            k: sum(r[k] or 0 for r in rows)
            for k in ("redemptions", "rolled_back", "net_redemptions", "delivered")
        }
        money: dict[str, dict[str, int]] = {}  # amounts add up only within a currency
        for r in rows:
            m = money.setdefault(r["currency"] or "?", {"discount": 0, "order_amount": 0})
            m["discount"] += r["discount"]
            m["order_amount"] += r["order_amount"]
        totals["by_currency"] = money
        by_state: dict[str, int] = {}
        for r in rows:
            by_state[r["state"]] = by_state.get(r["state"], 0) + 1
        return {
            "campaigns": len(rows),
            "by_state": by_state,
            "totals": totals,
            "top": rep.top_campaigns(rows, "net_redemptions", top),
            "rows": rows,
        }

    @guarded
    async def campaign(self, campaign_id: str) -> dict[str, Any]:
        from engine import reports as rep
        from store import reports as store

        db = await self._pool()
        async with db.acquire() as conn:
            c = await self._campaign(conn, campaign_id)
            codes, totals, first, chans = await store.campaign_figures(conn, campaign_id)
        channels = rep.channel_rows(chans)
        delivered = sum(r["sent"] for r in channels)
        out = rep.campaign_summary(c, codes, totals, first, delivered)
        out["channels"] = channels
        return out

    @guarded
    async def timeseries(
        self, campaign_id: str, bucket: str, since: datetime | None, until: datetime | None
    ) -> dict[str, Any]:
        from datetime import timedelta

        from engine import reports as rep

        spans = {"minute": timedelta(hours=6), "hour": timedelta(days=14), "day": timedelta(days=366)}
        if bucket not in spans:
            raise errors.InvalidInput(f"bucket must be one of {', '.join(rep.BUCKETS)}")
        try:
            return await self._timeseries(campaign_id, bucket, since, until, spans[bucket])
        except OverflowError:
            raise errors.InvalidInput("since/until are too close to the ends of the calendar") from None

    async def _timeseries(
        self, campaign_id: str, bucket: str, since: datetime | None, until: datetime | None,
        span: Any,
    ) -> dict[str, Any]:
        from datetime import timedelta

        from engine import reports as rep
        from store import reports as store

        db = await self._pool()
        async with db.acquire() as conn:
            c = await self._campaign(conn, campaign_id)
            if until is None or since is None:
                lo, hi = await store.activity_range(conn, campaign_id)
                now = datetime.now(UTC)
                if until is None:
                    until = max(now, hi + timedelta(minutes=1)) if hi is not None else now
                if since is None:
                    since = until - span
                    if lo is not None and lo > since:
                        since = lo
                    elif lo is None:
                        since = until - timedelta(hours=1)
            if until <= since:
                raise errors.InvalidInput("until must be after since")
            tz = rep.zone(c["timezone"])
            lo_b = rep.bucket_start(since, bucket, tz)
            points = await store.minute_points(
                conn, campaign_id, lo_b, until, 60 if bucket == "minute" else 900
            )
        rows = rep.time_series(points, bucket, c["timezone"], since, until)
        return {
            "campaign_id": campaign_id,
            "bucket": bucket,
            "timezone": c["timezone"],
            "since": since,
            "until": until,
            "rows": rows,
        }

    @guarded
    async def hours(self, campaign_id: str) -> dict[str, Any]:
        from engine import reports as rep
        from store import reports as store

        db = await self._pool()
        async with db.acquire() as conn:
            c = await self._campaign(conn, campaign_id)
            points = await store.all_quarter_points(conn, campaign_id)
        return {
            "campaign_id": campaign_id,
            "timezone": c["timezone"],
            "rows": rep.hours_of_day(points, c["timezone"]),
        }

    @guarded
    async def segments(self, campaign_id: str) -> dict[str, Any]:
        from engine import reports as rep
        from store import reports as store

        db = await self._pool()
        async with db.acquire() as conn:
            await self._campaign(conn, campaign_id)
            segs = await store.segments(conn, campaign_id)
        return {"campaign_id": campaign_id, "rows": rep.segment_rows(segs)}

    @guarded
    async def channels(self, campaign_id: str) -> dict[str, Any]:
        from engine import reports as rep
        from store import reports as store

        db = await self._pool()
        async with db.acquire() as conn:
            await self._campaign(conn, campaign_id)
            _codes, _totals, _first, chans = await store.campaign_figures(conn, campaign_id)
        return {"campaign_id": campaign_id, "rows": rep.channel_rows(chans)}

    @guarded
    async def live(self, campaign_id: str) -> dict[str, Any]:
        """Counters from the shards' memory; for a flash sale also redemptions per second
        (from samples of those counters), the quantity left and when it sells out."""
        import time

        from engine import reports as rep

        campaign = await self.engine.campaign(campaign_id)
        raw = await self._sample(campaign_id)
        self._watched[campaign_id] = time.monotonic()
        if self.dsn is not None:
            await self._pool()  # starts the loop that keeps sampling while watched
        stats = msgspec.to_builtins(raw)
        issued = stats["assigned"] + stats["redeemed"]
        stats["redemption_rate"] = stats["redeemed"] / issued if issued else 0.0
        rate = rep.rate_per_second(list(self._samples.get(campaign_id, ())), time.monotonic())
        remaining = rep.flash_remaining(
            shared=campaign.shared_code is not None,
            total=campaign.limits.total,
            uses=raw.active_redemptions,
            held=raw.held,
            available=raw.available,
            assigned=raw.assigned,
        )
        stats.update(
            {
                "name": campaign.name,
                "type": campaign.type,
                "state": campaign.state,
                "limit": campaign.limits.total,
                "redemptions_per_second": rate,
                "remaining": remaining,
                "sellout_in_s": rep.forecast_sellout_s(remaining, rate),
                "ends_at": campaign.ends_at,
                "at": datetime.now(UTC),
            }
        )
        return stats


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Delivery:
    """Delivery status and records per campaign (from ``deliveries``), the dead letters,
    and the campaigns' message templates. The sending itself is done by the delivery
    worker actors (``actors/delivery.py``)."""

    def __init__(self, settings: dict[str, Any], dsn: str) -> None:
        self.engine = attach_engine(_settings(settings))
        self.dsn = dsn
        self._pool = LazyPool(dsn, 2)

    @guarded
    async def status(self, campaign_id: str) -> dict[str, Any]:
        from store import delivery as delivery_store

        stats = await self.engine.stats(campaign_id)  # UnknownCampaign -> 404
        out = await delivery_store.status(await self._pool(), campaign_id)
        out["issued"] = stats.assigned + stats.redeemed
        out["pipeline"] = "redis_streams"
        return out

    @guarded
    async def put_template(
        self, campaign_id: str, channel: str, locale: str, subject: str | None, body: str, default: bool
    ) -> dict[str, Any]:
        from store import delivery as delivery_store

        return await delivery_store.put_template(
            await self._pool(), campaign_id, channel, locale, subject, body, default
        )

    @guarded
    async def templates(self, campaign_id: str) -> dict[str, Any]:
        from store import delivery as delivery_store

        return await delivery_store.list_templates(await self._pool(), campaign_id)

    @guarded
    async def deliveries(
        self, campaign_id: str, state: str | None, channel: str | None, limit: int, offset: int
    ) -> dict[str, Any]:
        from store import delivery as delivery_store

        return await delivery_store.list_deliveries(
            await self._pool(), campaign_id, state, channel, limit, offset
        )

    @guarded
    async def dead(self, campaign_id: str | None, limit: int) -> dict[str, Any]:
        from store import delivery as delivery_store

        return await delivery_store.list_dead(await self._pool(), campaign_id, limit)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Notifications:
    """In-app notifications for admins and managers (campaign lifecycle events)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._pool = LazyPool(dsn, 2)

    @guarded
    async def record(self, kind: str, campaign_id: str | None, message: str) -> None:
        from store import notifications

        await notifications.record(await self._pool(), kind, campaign_id, message)

    @guarded
    async def list(self, unread_only: bool, limit: int) -> list[dict[str, Any]]:
        from store import notifications

        return await notifications.list_recent(await self._pool(), unread_only, limit)

    @guarded
    async def mark_read(self, notification_id: int) -> dict[str, Any]:
        from store import notifications

        return await notifications.mark_read(await self._pool(), notification_id)


__all__ = [
    "Campaigns",
    "Delivery",
    "Failure",
    "Notifications",
    "Reports",
    "Users",
    "Vouchers",
    "campaign_json",
]


# --- customers, issuance and notification fan-out ---------------------------------------


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Customers:
    """Customer records (create, get, list). Bulk imports stream through the gateway."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._pool = LazyPool(dsn, 2)

    @guarded
    async def create(self, fields: dict[str, Any], actor: Actor | None = None) -> dict[str, Any]:
        from engine.customers import validate_or_raise
        from store import customers

        return await customers.create(await self._pool(), validate_or_raise(fields), actor)

    @guarded
    async def get(self, customer_id: str) -> dict[str, Any]:
        from store import customers

        return await customers.get(await self._pool(), customer_id)

    @guarded
    async def list(
        self, tag: str | None, after: str | None, limit: int, metadata: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        from store import customers

        return await customers.page(
            await self._pool(), tag=tag, after=after, limit=limit, metadata=metadata
        )

    @guarded
    async def update(self, customer_id: str, changes: dict[str, Any], actor: Actor) -> dict[str, Any]:
        from store import customers

        return await customers.update(await self._pool(), customer_id, changes, actor)

    @guarded
    async def linked_customer(self, user_id: str) -> str | None:
        from store import customers

        return await customers.linked_customer(await self._pool(), user_id)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Issuance:
    """Issuance jobs (run by the ``Issuer`` actor) and notification webhooks."""

    def __init__(self, settings: dict[str, Any], dsn: str, redis_url: str) -> None:
        from actors.issuance import issuer_handle

        self.settings = _settings(settings)
        self.dsn = dsn
        self.redis_url = redis_url
        self.issuer = issuer_handle(self.settings, dsn, redis_url)
        self._pool = LazyPool(dsn, 2)
        self._publisher: Any = None

    async def start(self, campaign_id: str, selection: dict[str, Any], channels: list[str]) -> Any:
        return await self.issuer.start.remote(campaign_id, selection, channels)

    async def job(self, job_id: str) -> Any:
        return await self.issuer.job.remote(job_id)

    @guarded
    async def publish(
        self, campaign_id: str, customer_id: str, channels: list[str], actor: Actor | None = None
    ) -> dict[str, Any]:
        """One customer given a code now (``actors.publications``)."""
        if self._publisher is None:
            from redis.asyncio import Redis

            from actors.publications import Publisher

            redis = Redis.from_url(self.redis_url, socket_connect_timeout=5, socket_timeout=10)
            self._publisher = Publisher(attach_engine(self.settings), self._pool, redis)
        out: dict[str, Any] = await self._publisher.publish(campaign_id, customer_id, channels, actor)
        return out

    @guarded
    async def add_webhook(self, url: str, secret: str | None, kinds: list[str] | None) -> dict[str, Any]:
        from actors.notifier import add_webhook
        from actors.outbound import allow_of

        return await add_webhook(await self._pool(), url, secret, kinds, allow_of(self.settings))

    @guarded
    async def list_webhooks(self) -> list[dict[str, Any]]:
        from store.notifications import list_webhooks

        return await list_webhooks(await self._pool())

    @guarded
    async def remove_webhook(self, webhook_id: str) -> dict[str, Any]:
        from store.notifications import remove_webhook

        return await remove_webhook(await self._pool(), webhook_id)

    @guarded
    async def sends(self, notification_id: int) -> list[dict[str, Any]]:
        from store.notifications import sends_of

        return await sends_of(await self._pool(), notification_id)


__all__ += ["Customers", "Issuance"]
