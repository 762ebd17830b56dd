"""Report computations: funnel, rates, money, time buckets in the campaign's time zone,
hour-of-day, segments, delivery success per channel, flash-sale rate and sell-out forecast,
and CSV rendering.

Pure: the rollup rows come in as plain values (``store/reports.py`` reads them from
Postgres), the clock is passed in. Amounts are integers in minor units; rates are floats
in 0..1, or ``None`` where the denominator is zero (an empty campaign has no rate, not a
rate of 0).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from engine import errors

Bucket = Literal["minute", "hour", "day"]
BUCKETS: tuple[str, ...] = ("minute", "hour", "day")
MAX_BUCKETS = 10_000
"""Longest time series one request may ask for (e.g. a week of minutes)."""

DELIVERY_STATES: tuple[str, ...] = ("queued", "sent", "failed", "dead")
CHANNELS: tuple[str, ...] = ("email", "sms", "push")


@dataclass(frozen=True)
class Counts:
    """Redemption figures of one time bucket, segment or campaign. ``discount`` and
    ``order_amount`` are net of rollbacks; ``redemptions`` counts every redemption made,
    ``rolled_back`` those of them later rolled back."""

    redemptions: int = 0
    rolled_back: int = 0
    discount: int = 0
    order_amount: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.redemptions + other.redemptions,
            self.rolled_back + other.rolled_back,
            self.discount + other.discount,
            self.order_amount + other.order_amount,
        )

    @property
    def net(self) -> int:
        return self.redemptions - self.rolled_back

    def as_dict(self) -> dict[str, int]:
        return {
            "redemptions": self.redemptions,
            "rolled_back": self.rolled_back,
            "net_redemptions": self.net,
            "discount": self.discount,
            "order_amount": self.order_amount,
        }


@dataclass(frozen=True)
class CodeCounts:
    """Codes of a campaign by current status (unique-code campaigns; a shared-code
    campaign has its one code)."""

    available: int = 0
    assigned: int = 0
    redeemed: int = 0
    void: int = 0
    gift_balance: int = 0

    @property
    def generated(self) -> int:
        return self.available + self.assigned + self.redeemed + self.void


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise errors.InvalidInput(f"timezone {name!r} is not a known IANA zone") from exc


def ratio(num: int | float, den: int | float) -> float | None:
    return None if not den else num / den


# --- time buckets ------------------------------------------------------------------------


def _aware(t: datetime, what: str) -> datetime:
    if t.tzinfo is None:
        raise errors.InvalidInput(f"{what} must carry a time zone offset")
    return t.astimezone(UTC)


def bucket_start(t: datetime, bucket: str, tz: ZoneInfo) -> datetime:
    """The UTC start of the ``bucket`` (minute, or the campaign-local hour/day) holding ``t``.

    Local hours and days follow the zone's rules: a local day across a DST change is 23 or
    25 hours long, and the repeated hour of a fall-back is two buckets (one per offset)."""
    t = _aware(t, "time")
    if bucket == "minute":
        return t.replace(second=0, microsecond=0)
    local = t.astimezone(tz)
    if bucket == "hour":
        start = local.replace(minute=0, second=0, microsecond=0)
        # a half-hour zone whose offset changes at :30 cannot make start > t; a fold keeps
        # its fold attribute, so the repeated hour maps to its own instant
        return start.astimezone(UTC)
    if bucket == "day":
        midnight = datetime(local.year, local.month, local.day, tzinfo=tz)
        return midnight.astimezone(UTC)
    raise errors.InvalidInput(f"bucket must be one of {', '.join(BUCKETS)}, got {bucket!r}")


def next_bucket(start: datetime, bucket: str, tz: ZoneInfo) -> datetime:
    """The UTC start of the bucket after the one starting at ``start``."""
    if bucket == "minute":
        return start + timedelta(minutes=1)
    if bucket == "hour":
        # one real hour later is the next local hour start in every zone whose offsets are
        # whole hours apart from each other's changes (all of today's zones but Lord Howe)
        return bucket_start(start + timedelta(hours=1), "hour", tz)
    local = start.astimezone(tz)
    day = datetime(local.year, local.month, local.day, tzinfo=tz) + timedelta(days=1)
    nxt = datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(UTC)
    if nxt <= start:  # pragma: no cover - defensive, no zone jumps back a whole day
        nxt = start + timedelta(days=1)
    return nxt


def time_series(
    points: Iterable[tuple[datetime, Counts]],
    bucket: str,
    tz_name: str,
    since: datetime,
    until: datetime,
) -> list[dict[str, Any]]:
    """Sum ``points`` (UTC instants of minutes or quarter hours, with their counts) into
    ``bucket``s of the campaign's zone from ``since`` to ``until`` (exclusive); every bucket
    in the range is present, empty ones with zeros, so a chart shows the gaps."""
    if bucket not in BUCKETS:
        raise errors.InvalidInput(f"bucket must be one of {', '.join(BUCKETS)}, got {bucket!r}")
    tz = zone(tz_name)
    since, until = _aware(since, "since"), _aware(until, "until")
    if until <= since:
        raise errors.InvalidInput("until must be after since")
    starts: list[datetime] = []
    cur = bucket_start(since, bucket, tz)
    while cur < until:
        starts.append(cur)
        if len(starts) > MAX_BUCKETS:
            raise errors.InvalidInput(
                f"the range holds more than {MAX_BUCKETS} {bucket} buckets; narrow since/until "
                "or use a larger bucket"
            )
        cur = next_bucket(cur, bucket, tz)
    sums: dict[datetime, Counts] = {s: Counts() for s in starts}
    for t, c in points:
        key = bucket_start(t, bucket, tz)
        if key in sums:  # whole buckets: the first one may start before ``since``
            sums[key] = sums[key] + c
    out = []
    for s in starts:
        local = s.astimezone(tz)
        out.append(
            {
                "start": s.isoformat().replace("+00:00", "Z"),
                "local": local.isoformat(),
                **sums[s].as_dict(),
            }
        )
    return out


def hours_of_day(points: Iterable[tuple[datetime, Counts]], tz_name: str) -> list[dict[str, Any]]:
    """Redemptions by local hour of day (0..23) in the campaign's zone. ``points`` must be
    at most quarter-hour grained (every zone's offset is a multiple of 15 minutes)."""
    tz = zone(tz_name)
    hours = [Counts() for _ in range(24)]
    for t, c in points:
        h = _aware(t, "point").astimezone(tz).hour
        hours[h] = hours[h] + c
    return [{"hour": h, **hours[h].as_dict()} for h in range(24)]


# --- campaign summary -------------------------------------------------------------------


def channel_rows(counts: Mapping[tuple[str, str], int]) -> list[dict[str, Any]]:
    """Delivery success per channel from ``{(channel, state): n}``: success rate is
    sent / (sent + failed + dead); queued messages are still pending and not counted."""
    known = [c for c in CHANNELS if any(ch == c for ch, _ in counts)]
    channels = known + sorted({ch for ch, _ in counts} - set(CHANNELS))
    rows = []
    for ch in channels:
        by_state = {s: int(counts.get((ch, s), 0)) for s in DELIVERY_STATES}
        settled = by_state["sent"] + by_state["failed"] + by_state["dead"]
        rows.append(
            {
                "channel": ch,
                **by_state,
                "total": sum(by_state.values()),
                "success_rate": ratio(by_state["sent"], settled),
            }
        )
    return rows


def segment_rows(segments: Mapping[str, Counts]) -> list[dict[str, Any]]:
    """Redemptions by customer segment, most net redemptions first."""
    ordered = sorted(segments.items(), key=lambda kv: (-kv[1].net, kv[0]))
    return [{"segment": s, **c.as_dict()} for s, c in ordered]


def campaign_summary(
    campaign: Mapping[str, Any],
    codes: CodeCounts,
    totals: Counts,
    first_redemption_at: datetime | None,
    delivered: int,
) -> dict[str, Any]:
    """Funnel, rates and money of one campaign.

    Funnel: generated (codes created) -> assigned (issued to a customer or used: codes now
    assigned or redeemed) -> delivered (messages sent) -> redeemed (redemptions not rolled
    back). A shared-code campaign has one code that every customer uses, so its funnel
    starts at redemptions and the code stages are left out (None).

    ``campaign`` carries ``id``, ``name``, ``type``, ``state``, ``currency``, ``timezone``,
    ``created_at``/``starts_at`` (datetimes or None) and ``shared_code``."""
    shared = campaign.get("shared_code") is not None
    net = totals.net
    issued = codes.assigned + codes.redeemed
    start = campaign.get("starts_at") or campaign.get("created_at")
    ttf: float | None = None
    if first_redemption_at is not None and start is not None:
        ttf = max(0.0, (first_redemption_at - start).total_seconds())
    funnel = {
        "generated": None if shared else codes.generated,
        "assigned": None if shared else issued,
        "delivered": delivered,
        "redeemed": net,
    }
    return {
        "campaign": {
            k: campaign.get(k) for k in ("id", "name", "type", "state", "currency", "timezone")
        },
        "funnel": funnel,
        "codes": {
            "available": codes.available,
            "assigned": codes.assigned,
            "redeemed": codes.redeemed,
            "void": codes.void,
        },
        "redemptions": totals.as_dict(),
        "rates": {
            "redemption_rate": None if shared else ratio(net, issued),
            "redemption_rate_of_generated": None if shared else ratio(net, codes.generated),
            "assignment_rate": None if shared else ratio(issued, codes.generated),
            "delivery_rate": None if shared else ratio(delivered, issued),
            "rollback_rate": ratio(totals.rolled_back, totals.redemptions),
        },
        "money": {
            "discount_given": totals.discount,
            "order_value_influenced": totals.order_amount,
            "average_discount": ratio(totals.discount, net),
            "average_order": ratio(totals.order_amount, net),
            "gift_balance_outstanding": codes.gift_balance
            if campaign.get("type") == "gift_card"
            else None,
        },
        "first_redemption_at": first_redemption_at,
        "time_to_first_redemption_s": ttf,
    }


def top_campaigns(
    rows: Sequence[Mapping[str, Any]], by: str = "net_redemptions", limit: int = 10
) -> list[dict[str, Any]]:
    """The ``limit`` campaigns with the most ``by`` (ties by name)."""
    ranked = sorted(rows, key=lambda r: (-(r.get(by) or 0), str(r.get("name", ""))))
    return [dict(r) for r in ranked[:limit]]


# --- live flash-sale counters ------------------------------------------------------------


def rate_per_second(
    samples: Sequence[tuple[float, int]], now: float, window_s: float = 10.0
) -> float | None:
    """Redemptions per second over the last ``window_s`` seconds from ``(time, total)``
    samples (monotonic seconds, cumulative count), oldest first. None with fewer than two
    samples in the window or no time between them."""
    recent = [s for s in samples if now - s[0] <= window_s]
    if len(recent) < 2:
        return None
    (t0, n0), (t1, n1) = recent[0], recent[-1]
    if t1 <= t0:
        return None
    return max(0.0, (n1 - n0) / (t1 - t0))


def flash_remaining(
    *, shared: bool, total: int | None, uses: int, held: int, available: int, assigned: int
) -> int | None:
    """Quantity left on sale: a shared code's limit less the units used or held; unique
    codes: the unredeemed codes, capped by what the limit still allows."""
    if shared:
        return None if total is None else max(0, total - uses - held)
    left = max(0, available + assigned - held)
    if total is not None:
        left = min(left, max(0, total - uses - held))
    return left


def forecast_sellout_s(remaining: int | None, rate: float | None) -> float | None:
    """Seconds until ``remaining`` is gone at ``rate`` per second; 0 when sold out, None
    when it cannot be told (no limit, or no redemptions going on)."""
    if remaining is None:
        return None
    if remaining == 0:
        return 0.0
    if not rate:
        return None
    return remaining / rate


# --- CSV ---------------------------------------------------------------------------------


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested objects become dotted columns (``funnel.generated``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list | tuple):
            continue  # tables of their own; a CSV row holds scalars
        else:
            out[key] = v
    return out


def table_of(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows a report exports: its ``rows`` when it is a table, else one flat row."""
    rows = report.get("rows")
    if isinstance(rows, list):
        return [flatten(r) for r in rows]
    return [flatten(report)]


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """RFC 4180 CSV with a header; columns in first-seen order; datetimes in ISO 8601;
    None as an empty field."""
    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in columns])
    return buf.getvalue()


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, bool):
        return "true" if v else "false"
    return v
