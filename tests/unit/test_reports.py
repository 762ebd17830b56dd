"""Report computations against small hand-checked datasets: exact numbers, empty
campaigns, and time-zone boundaries (DST changes, half-hour zones)."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from engine import errors
from engine import reports as rep
from engine.reports import CodeCounts, Counts


def utc(*a: int) -> datetime:
    return datetime(*a, tzinfo=UTC)  # type: ignore[misc]


BERLIN = ZoneInfo("Europe/Berlin")


# --- buckets ------------------------------------------------------------------------------


def test_local_day_is_23_hours_on_spring_forward_and_25_on_fall_back() -> None:
    # Europe/Berlin: 2026-03-29 02:00 CET -> 03:00 CEST (01:00 UTC);
    # 2026-10-25 03:00 CEST -> 02:00 CET (01:00 UTC)
    start = rep.bucket_start(utc(2026, 3, 29, 12), "day", BERLIN)
    assert start == utc(2026, 3, 28, 23)
    assert rep.next_bucket(start, "day", BERLIN) == utc(2026, 3, 29, 22)
    start = rep.bucket_start(utc(2026, 10, 25, 12), "day", BERLIN)
    assert start == utc(2026, 10, 24, 22)
    assert rep.next_bucket(start, "day", BERLIN) == utc(2026, 10, 25, 23)


def test_day_series_puts_points_on_the_right_side_of_local_midnight() -> None:
    points = [
        (utc(2026, 3, 28, 22, 59), Counts(1, 0, 100, 1000)),  # 23:59 CET on the 28th
        (utc(2026, 3, 28, 23, 0), Counts(2, 1, 200, 2000)),  # 00:00 CET on the 29th
        (utc(2026, 3, 29, 21, 59), Counts(4, 0, 400, 4000)),  # 23:59 CEST on the 29th
        (utc(2026, 3, 29, 22, 0), Counts(8, 0, 800, 8000)),  # 00:00 CEST on the 30th
    ]
    rows = rep.time_series(points, "day", "Europe/Berlin", utc(2026, 3, 28, 0), utc(2026, 3, 30, 12))
    assert [r["start"] for r in rows] == [
        "2026-03-27T23:00:00Z",
        "2026-03-28T23:00:00Z",
        "2026-03-29T22:00:00Z",
    ]
    assert [r["local"] for r in rows] == [
        "2026-03-28T00:00:00+01:00",
        "2026-03-29T00:00:00+01:00",
        "2026-03-30T00:00:00+02:00",
    ]
    assert [r["redemptions"] for r in rows] == [1, 6, 8]
    assert [r["rolled_back"] for r in rows] == [0, 1, 0]
    assert [r["net_redemptions"] for r in rows] == [1, 5, 8]
    assert [r["discount"] for r in rows] == [100, 600, 800]


def test_repeated_hour_of_fall_back_is_two_hour_buckets() -> None:
    points = [
        (utc(2026, 10, 25, 0, 30), Counts(3)),  # 02:30 CEST
        (utc(2026, 10, 25, 1, 30), Counts(5)),  # 02:30 CET, the same wall-clock time
    ]
    rows = rep.time_series(points, "hour", "Europe/Berlin", utc(2026, 10, 24, 23), utc(2026, 10, 25, 3))
    assert [(r["local"], r["redemptions"]) for r in rows] == [
        ("2026-10-25T01:00:00+02:00", 0),
        ("2026-10-25T02:00:00+02:00", 3),
        ("2026-10-25T02:00:00+01:00", 5),
        ("2026-10-25T03:00:00+01:00", 0),
    ]


def test_hour_buckets_of_a_half_hour_zone() -> None:
    # Asia/Kolkata is UTC+05:30: local hours start at :30 UTC
    points = [(utc(2026, 1, 1, 18, 15), Counts(1)), (utc(2026, 1, 1, 18, 30), Counts(2))]
    rows = rep.time_series(points, "hour", "Asia/Kolkata", utc(2026, 1, 1, 17, 30), utc(2026, 1, 1, 19, 30))
    assert [(r["start"], r["redemptions"]) for r in rows] == [
        ("2026-01-01T17:30:00Z", 1),  # 23:00-24:00 IST
        ("2026-01-01T18:30:00Z", 2),  # 00:00-01:00 IST
    ]


def test_minute_series_fills_gaps_and_starts_at_the_whole_minute() -> None:
    points = [(utc(2026, 5, 1, 10, 0), Counts(2, 0, 50, 500)), (utc(2026, 5, 1, 10, 2), Counts(1))]
    rows = rep.time_series(points, "minute", "UTC", utc(2026, 5, 1, 10, 0, 30), utc(2026, 5, 1, 10, 3))
    assert [(r["start"], r["redemptions"]) for r in rows] == [
        ("2026-05-01T10:00:00Z", 2),
        ("2026-05-01T10:01:00Z", 0),
        ("2026-05-01T10:02:00Z", 1),
    ]
    # points outside the buckets are left out
    assert rep.time_series(points, "minute", "UTC", utc(2026, 5, 1, 11), utc(2026, 5, 1, 11, 2)) == [
        {"start": "2026-05-01T11:00:00Z", "local": "2026-05-01T11:00:00+00:00", **Counts().as_dict()},
        {"start": "2026-05-01T11:01:00Z", "local": "2026-05-01T11:01:00+00:00", **Counts().as_dict()},
    ]


def test_series_input_errors() -> None:
    with pytest.raises(errors.InvalidInput, match="bucket"):
        rep.time_series([], "week", "UTC", utc(2026, 1, 1), utc(2026, 1, 2))
    with pytest.raises(errors.InvalidInput, match="after"):
        rep.time_series([], "day", "UTC", utc(2026, 1, 2), utc(2026, 1, 1))
    with pytest.raises(errors.InvalidInput, match="offset"):
        rep.time_series([], "day", "UTC", datetime(2026, 1, 1), utc(2026, 1, 2))
    with pytest.raises(errors.InvalidInput, match="IANA"):
        rep.time_series([], "day", "Mars/Olympus", utc(2026, 1, 1), utc(2026, 1, 2))
    with pytest.raises(errors.InvalidInput, match="10000"):
        rep.time_series([], "minute", "UTC", utc(2026, 1, 1), utc(2026, 1, 8))
    # exactly the limit is fine
    assert len(rep.time_series([], "minute", "UTC", utc(2026, 1, 1), utc(2026, 1, 1) + timedelta(minutes=10_000))) == 10_000


# --- hour of day ------------------------------------------------------------------------


def test_hours_of_day_in_the_campaign_zone_across_dst() -> None:
    # America/New_York springs forward on 2026-03-08 at 07:00 UTC (02:00 EST -> 03:00 EDT)
    points = [
        (utc(2026, 3, 8, 6, 30), Counts(1, 0, 10, 100)),  # 01:30 EST
        (utc(2026, 3, 8, 7, 30), Counts(2, 1, 20, 200)),  # 03:30 EDT
        (utc(2026, 3, 9, 7, 30), Counts(4, 0, 40, 400)),  # 03:30 EDT the next day
        (utc(2026, 1, 9, 8, 45), Counts(8, 0, 80, 800)),  # 03:45 EST in winter
    ]
    rows = rep.hours_of_day(points, "America/New_York")
    assert len(rows) == 24 and [r["hour"] for r in rows] == list(range(24))
    assert rows[1]["redemptions"] == 1
    assert rows[2]["redemptions"] == 0  # the hour that does not exist that day
    assert rows[3] == {"hour": 3, "redemptions": 14, "rolled_back": 1, "net_redemptions": 13,
                       "discount": 140, "order_amount": 1400}
    assert sum(r["redemptions"] for r in rows) == 15


def test_hours_of_day_of_a_half_hour_zone_and_of_nothing() -> None:
    rows = rep.hours_of_day(
        [(utc(2026, 1, 1, 18, 15), Counts(1)), (utc(2026, 1, 1, 18, 30), Counts(2))], "Asia/Kolkata"
    )
    assert rows[23]["redemptions"] == 1 and rows[0]["redemptions"] == 2
    empty = rep.hours_of_day([], "UTC")
    assert all(r["redemptions"] == 0 and r["net_redemptions"] == 0 for r in empty)


# --- summary ----------------------------------------------------------------------------


def _campaign(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": "c1", "name": "Spring", "type": "discount", "state": "active", "currency": "EUR",
        "timezone": "Europe/Berlin", "created_at": utc(2026, 4, 1, 8), "starts_at": None,
        "shared_code": None,
    }
    base.update(kw)
    return base


def test_summary_hand_checked() -> None:
    codes = CodeCounts(available=600, assigned=250, redeemed=140, void=10)
    totals = Counts(redemptions=150, rolled_back=10, discount=14_000, order_amount=700_000)
    s = rep.campaign_summary(_campaign(), codes, totals, utc(2026, 4, 1, 9, 30), delivered=300)
    assert s["funnel"] == {"generated": 1000, "assigned": 390, "delivered": 300, "redeemed": 140}
    assert s["rates"] == {
        "redemption_rate": 140 / 390,
        "redemption_rate_of_generated": 0.14,
        "assignment_rate": 0.39,
        "delivery_rate": 300 / 390,
        "rollback_rate": 10 / 150,
    }
    assert s["money"] == {
        "discount_given": 14_000,
        "order_value_influenced": 700_000,
        "average_discount": 100.0,
        "average_order": 5000.0,
        "gift_balance_outstanding": None,
    }
    assert s["time_to_first_redemption_s"] == 5400.0
    assert s["redemptions"]["net_redemptions"] == 140
    # starts_at wins over created_at; a redemption before it counts as 0
    s = rep.campaign_summary(_campaign(starts_at=utc(2026, 4, 2)), codes, totals, utc(2026, 4, 1, 9), 0)
    assert s["time_to_first_redemption_s"] == 0.0


def test_summary_of_an_empty_campaign_has_no_rates() -> None:
    s = rep.campaign_summary(_campaign(), CodeCounts(), Counts(), None, 0)
    assert s["funnel"] == {"generated": 0, "assigned": 0, "delivered": 0, "redeemed": 0}
    assert set(s["rates"].values()) == {None}
    assert s["money"]["average_discount"] is None and s["money"]["discount_given"] == 0
    assert s["time_to_first_redemption_s"] is None and s["first_redemption_at"] is None


def test_summary_of_gift_cards_and_shared_codes() -> None:
    g = rep.campaign_summary(
        _campaign(type="gift_card"), CodeCounts(available=8, assigned=2, gift_balance=42_000),
        Counts(3, 0, 8000, 9000), utc(2026, 4, 1, 8), 2,
    )
    assert g["money"]["gift_balance_outstanding"] == 42_000
    sh = rep.campaign_summary(
        _campaign(type="shared_code", shared_code="SPRING"), CodeCounts(available=1),
        Counts(7, 1, 3000, 24_000), utc(2026, 4, 1, 8), 0,
    )
    assert sh["funnel"] == {"generated": None, "assigned": None, "delivered": 0, "redeemed": 6}
    assert sh["rates"]["redemption_rate"] is None and sh["rates"]["rollback_rate"] == 1 / 7


def test_channels_and_segments() -> None:
    rows = rep.channel_rows({
        ("sms", "sent"): 3, ("email", "sent"): 8, ("email", "failed"): 1, ("email", "dead"): 1,
        ("email", "queued"): 5, ("push", "queued"): 2,
    })
    assert rows == [
        {"channel": "email", "queued": 5, "sent": 8, "failed": 1, "dead": 1, "total": 15, "success_rate": 0.8},
        {"channel": "sms", "queued": 0, "sent": 3, "failed": 0, "dead": 0, "total": 3, "success_rate": 1.0},
        {"channel": "push", "queued": 2, "sent": 0, "failed": 0, "dead": 0, "total": 2, "success_rate": None},
    ]
    assert rep.channel_rows({}) == []
    segs = rep.segment_rows({"vip": Counts(5, 1), "new": Counts(4), "eu": Counts(4, 0, 10)})
    assert [(r["segment"], r["net_redemptions"]) for r in segs] == [("eu", 4), ("new", 4), ("vip", 4)]
    assert rep.segment_rows({}) == []


def test_top_campaigns() -> None:
    rows = [{"name": "b", "net_redemptions": 5}, {"name": "a", "net_redemptions": 5},
            {"name": "c", "net_redemptions": 9}, {"name": "d", "net_redemptions": 0}]
    assert [r["name"] for r in rep.top_campaigns(rows, limit=3)] == ["c", "a", "b"]
    assert rep.top_campaigns([], limit=3) == []


# --- live -------------------------------------------------------------------------------


def test_rate_and_sellout_forecast() -> None:
    samples = [(0.0, 0), (5.0, 50), (10.0, 120)]
    assert rep.rate_per_second(samples, now=10.0, window_s=10.0) == 12.0
    assert rep.rate_per_second(samples, now=10.0, window_s=6.0) == 14.0
    assert rep.rate_per_second(samples[:1], now=0.0) is None
    assert rep.rate_per_second([(1.0, 5), (1.0, 9)], now=1.0) is None
    assert rep.rate_per_second([(0.0, 9), (1.0, 5)], now=1.0) == 0.0  # rollbacks: not negative
    assert rep.forecast_sellout_s(120, 12.0) == 10.0
    assert rep.forecast_sellout_s(0, None) == 0.0
    assert rep.forecast_sellout_s(5, None) is None and rep.forecast_sellout_s(5, 0.0) is None
    assert rep.forecast_sellout_s(None, 3.0) is None


def test_flash_remaining() -> None:
    assert rep.flash_remaining(shared=True, total=500, uses=120, held=5, available=1, assigned=0) == 375
    assert rep.flash_remaining(shared=True, total=10, uses=12, held=0, available=1, assigned=0) == 0
    assert rep.flash_remaining(shared=True, total=None, uses=3, held=0, available=1, assigned=0) is None
    # unique codes: the unredeemed ones, capped by the limit
    assert rep.flash_remaining(shared=False, total=None, uses=7, held=1, available=18, assigned=5) == 22
    assert rep.flash_remaining(shared=False, total=10, uses=7, held=1, available=18, assigned=5) == 2


# --- CSV --------------------------------------------------------------------------------


def test_csv_of_a_table_and_of_a_single_report() -> None:
    body = {"rows": [{"a": 1, "b": None}, {"a": 2, "c": utc(2026, 1, 1), "d": True}], "x": 5}
    text = rep.to_csv(rep.table_of(body))
    assert text == "a,b,c,d\r\n1,,,\r\n2,,2026-01-01T00:00:00+00:00,true\r\n"
    single = {"funnel": {"generated": 10, "assigned": 4}, "campaign": {"name": 'He said "hi", ok'}, "rows2": [1]}
    (row,) = list(csv.DictReader(io.StringIO(rep.to_csv(rep.table_of(single)))))
    assert row == {"funnel.generated": "10", "funnel.assigned": "4", "campaign.name": 'He said "hi", ok'}
    assert rep.to_csv(rep.table_of({"rows": []})) == "\r\n"


# --- the command line that starts the app -------------------------------------------------


def test_reports_command_and_parser() -> None:
    from engine.settings import Settings
    from ops.cli import build_parser
    from ops.start import reports_command, reports_env

    s = Settings(http_host="127.0.0.1", http_port=8123, reports_port=8555)
    cmd = reports_command(s)
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith("reporting/app.py")
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.port") + 1] == "8555"
    assert reports_env(s)["VOUCHER_API_URL"] == "http://127.0.0.1:8123"
    assert reports_env(s, "http://10.0.0.5:9000")["VOUCHER_API_URL"] == "http://10.0.0.5:9000"
    args = build_parser().parse_args(["demo-data", "--scale", "0.5", "--live", "30"])
    assert (args.scale, args.days, args.live) == (0.5, 14, 30.0)
    assert build_parser().parse_args(["up", "--no-reports"]).no_reports is True
    assert build_parser().parse_args(["reports", "--api-url", "http://x:1"]).api_url == "http://x:1"
