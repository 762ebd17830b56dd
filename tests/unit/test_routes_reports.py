"""Reports and their CSV export (serve/routes/reports.py) over fake services."""

from typing import Any

import pytest

from actors.calls import Failure
from tests.route_fakes import assert_refused, gateway, problem_of

ROWS: dict[str, Any] = {"rows": [{"campaign": "cmp_1", "redeemed": 3}]}


@pytest.mark.parametrize(
    ("suffix", "method", "file"),
    [("", "campaign", "campaign"), ("/hours", "hours", "hours"), ("/segments", "segments", "segments"),
     ("/channels", "channels", "channels"), ("/live", "live", "live")],
)
def test_each_campaign_report_asks_its_own_question(suffix: str, method: str, file: str) -> None:
    with gateway(reports={method: ROWS}) as (client, fakes):
        url = f"/v1/reports/campaigns/cmp_1{suffix}"
        assert_refused(client, fakes, "GET", url, "reports.read", "integration")
        r = client.get(url, headers=fakes.token("analyst"))
        assert r.status_code == 200 and r.json() == ROWS
        r = client.get(url + "?format=csv", headers=fakes.token("analyst"))
        assert r.headers["content-type"] == "text/csv; charset=utf-8"
        assert r.headers["content-disposition"] == f'attachment; filename="{file}-cmp_1.csv"'
        # the guard's headers survive the CSV response
        assert r.headers["ratelimit-limit"] == "100" and r.headers["x-gateway-replica"] == "replica-1"
        assert "cmp_1" in r.text
        assert fakes.reports.called(method) == [("cmp_1",), ("cmp_1",)]


def test_the_overview_and_csv_by_accept_header() -> None:
    with gateway(reports={"overview": ROWS}) as (client, fakes):
        r = client.get("/v1/reports/campaigns?top=3", headers={**fakes.token("manager"), "Accept": "text/csv"})
        assert r.headers["content-disposition"] == 'attachment; filename="campaigns.csv"'
        r = client.get("/v1/reports/campaigns?format=json", headers={**fakes.token("manager"), "Accept": "text/csv"})
        assert r.json() == ROWS
        assert fakes.reports.called("overview") == [(3,), (10,)]
        problem_of(client.get("/v1/reports/campaigns?format=xml", headers=fakes.token("manager")), 422)


def test_timeseries_need_offsets_and_pass_their_window() -> None:
    with gateway(reports={"timeseries": ROWS}) as (client, fakes):
        url = "/v1/reports/campaigns/cmp_1/timeseries"
        r = client.get(url + "?bucket=day&since=2026-01-01T00:00:00Z&format=csv", headers=fakes.token("analyst"))
        assert r.headers["content-disposition"] == 'attachment; filename="timeseries-cmp_1-day.csv"'
        [(campaign, bucket, since, until)] = fakes.reports.called("timeseries")
        assert (campaign, bucket, since.isoformat(), until) == ("cmp_1", "day", "2026-01-01T00:00:00+00:00", None)
        r = client.get(url + "?since=2026-01-01T00:00:00", headers=fakes.token("analyst"))
        assert "time zone offset" in problem_of(r, 422)["detail"]
        assert len(fakes.reports.called("timeseries")) == 1


def test_a_report_of_an_unknown_campaign_is_404() -> None:
    with gateway(reports={"live": Failure("unknown_campaign", "no campaign cmp_9")}) as (client, fakes):
        problem_of(client.get("/v1/reports/campaigns/cmp_9/live", headers=fakes.token("admin")), 404, "unknown_campaign")
