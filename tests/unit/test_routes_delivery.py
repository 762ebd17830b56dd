"""Templates, delivery records and dead letters (serve/routes/delivery.py) over fakes."""

from tests.route_fakes import assert_refused, gateway, problem_of

TEMPLATE = {"locale": "de", "subject": "Ihr Code", "body": "{{ code }}", "default": True}


def test_templates_are_written_by_staff_who_write() -> None:
    with gateway(delivery={"put_template": {"ok": True}, "templates": [TEMPLATE]}) as (client, fakes):
        url = "/v1/campaigns/cmp_1/templates/email"
        assert_refused(client, fakes, "PUT", url, "templates.write", "analyst", json=TEMPLATE)
        r = client.put(url, json=TEMPLATE, headers=fakes.token("manager"))
        assert r.json() == {"ok": True}
        assert fakes.delivery.called("put_template") == [("cmp_1", "email", "de", "Ihr Code", "{{ code }}", True)]
        r = client.get("/v1/campaigns/cmp_1/templates", headers=fakes.token("analyst"))
        assert r.json() == [TEMPLATE] and fakes.delivery.called("templates") == [("cmp_1",)]


def test_an_unknown_channel_is_422_for_anyone() -> None:
    with gateway() as (client, fakes):
        r = client.put("/v1/campaigns/cmp_1/templates/fax", json=TEMPLATE)
        assert any(e["loc"] == ["path", "channel"] for e in problem_of(r, 422)["errors"])
        r = client.get("/v1/campaigns/cmp_1/deliveries?channel=fax", headers=fakes.token("analyst"))
        assert any(e["loc"] == ["query", "channel"] for e in problem_of(r, 422)["errors"])
        assert fakes.delivery.calls == [] and fakes.limiter.hits == []


def test_delivery_records_status_and_dead_letters() -> None:
    answers = {"deliveries": {"items": []}, "status": {"email": {"sent": 1}}, "dead": {"items": []}}
    with gateway(delivery=answers) as (client, fakes):
        assert_refused(client, fakes, "GET", "/v1/deliveries/dead", "deliveries.read", "integration")
        r = client.get("/v1/campaigns/cmp_1/deliveries?state=dead&channel=sms&limit=2&offset=4",
                       headers=fakes.token("analyst"))
        assert r.json() == {"items": []}
        assert fakes.delivery.called("deliveries") == [("cmp_1", "dead", "sms", 2, 4)]
        r = client.get("/v1/campaigns/cmp_1/delivery", headers=fakes.token("analyst"))
        assert r.json() == {"email": {"sent": 1}}
        client.get("/v1/deliveries/dead?campaign_id=cmp_1&limit=3", headers=fakes.token("manager"))
        client.get("/v1/deliveries/dead", headers=fakes.token("manager"))
        assert fakes.delivery.called("dead") == [("cmp_1", 3), (None, 100)]
