"""Notifications and notification webhooks (serve/routes/notifications.py) over fakes."""

from serve.models import MAX_INT64
from tests.route_fakes import assert_refused, gateway, problem_of


def test_notifications_are_for_staff_who_write() -> None:
    with gateway(notifications={"list": [{"id": 1}], "mark_read": {"id": 1, "read": True}}) as (client, fakes):
        assert_refused(client, fakes, "GET", "/v1/notifications", "notifications.read", "analyst")
        r = client.get("/v1/notifications?unread=true&limit=7", headers=fakes.token("manager"))
        assert r.json() == {"items": [{"id": 1}]}
        assert fakes.notifications.called("list") == [(True, 7)]
        client.get("/v1/notifications", headers=fakes.token("manager"))
        assert fakes.notifications.called("list")[-1] == (False, 50)
        r = client.post("/v1/notifications/1/read", headers=fakes.token("admin"))
        assert r.json() == {"id": 1, "read": True} and fakes.notifications.called("mark_read") == [(1,)]


def test_notification_ids_are_bounded_before_the_caller_is_checked() -> None:
    with gateway() as (client, fakes):
        for url in ("/v1/notifications/0/read", f"/v1/notifications/{MAX_INT64 + 1}/deliveries"):
            r = client.request("POST" if url.endswith("read") else "GET", url)
            assert problem_of(r, 422)["errors"][0]["loc"] == ["path", "notification_id"]
        assert fakes.limiter.hits == []


def test_where_a_notification_went() -> None:
    with gateway(issuance={"sends": [{"channel": "email"}]}) as (client, fakes):
        r = client.get("/v1/notifications/5/deliveries", headers=fakes.token("manager"))
        assert r.json() == {"items": [{"channel": "email"}]}
        assert fakes.issuance.called("sends") == [(5,)]


def test_webhooks_are_managed_by_staff_who_write() -> None:
    hook = {"id": "wh_1", "url": "https://shop.example/hook"}
    answers = {"add_webhook": {**hook, "secret": "s" * 16}, "list_webhooks": [hook], "remove_webhook": {"removed": True}}
    with gateway(issuance=answers) as (client, fakes):
        assert_refused(client, fakes, "POST", "/v1/notification-webhooks", "webhooks.manage", "analyst",
                       json={"url": hook["url"]})
        r = client.post("/v1/notification-webhooks", json={"url": hook["url"], "kinds": ["campaign_started"]},
                        headers=fakes.token("manager"))
        assert r.status_code == 201 and r.json()["secret"] == "s" * 16
        assert fakes.issuance.called("add_webhook") == [(hook["url"], None, ["campaign_started"])]
        assert client.get("/v1/notification-webhooks", headers=fakes.token("admin")).json() == {"items": [hook]}
        r = client.delete("/v1/notification-webhooks/wh_1", headers=fakes.token("admin"))
        assert r.json() == {"removed": True} and fakes.issuance.called("remove_webhook") == [("wh_1",)]
        problem_of(client.post("/v1/notification-webhooks", json={}, headers=fakes.token("admin")), 422)
