"""Registration, login, the caller's own record, roles and API keys
(serve/routes/users.py) over fake services."""

from actors.calls import Failure
from engine.audit import Actor
from serve.auth import API_KEY_PREFIX, KEY_ID_LEN, SECRET_LEN, Principal
from serve.devices import account_key
from tests.route_fakes import assert_refused, decision, gateway, problem_of

USER = {"id": "usr_1", "email": "ada@shop.example", "name": "Ada", "roles": ["customer"]}


def test_register_is_public_but_limited_per_address() -> None:
    with gateway(users={"register": USER}) as (client, fakes):
        r = client.post(
            "/v1/auth/register", json={"email": "ada@shop.example", "password": "correct horse", "name": "Ada"}
        )
        assert r.status_code == 201, r.text
        assert r.json()["id"] == "usr_1" and r.headers["ratelimit-remaining"] == "99"
        assert fakes.users.called("register") == [("ada@shop.example", "correct horse", "Ada")]
        assert [c[0] for c in fakes.limiter.hits[-1]["checks"]] == ["ip:testclient"]
        fakes.limiter.deny = decision(allowed=False)
        r = client.post(
            "/v1/auth/register", json={"email": "bob@shop.example", "password": "correct horse", "name": "Bob"}
        )
        problem_of(r, 429, "rate_limited")
        assert r.headers["retry-after"] == "7"
        assert len(fakes.users.called("register")) == 1


def test_register_refuses_a_bad_body_with_a_problem() -> None:
    with gateway() as (client, fakes):
        r = client.post("/v1/auth/register", json={"email": "a@b.c", "password": "short", "name": "A"})
        body = problem_of(r, 422)
        assert any(e["loc"] == ["body", "password"] for e in body["errors"])
        assert fakes.users.calls == [] and fakes.limiter.hits == []


def test_login_hands_out_a_device_token_and_charges_failures() -> None:
    bad = Failure("invalid_credentials", "wrong email or password")
    tokens = {"access_token": "t", "expires_in": 900}
    with gateway(users={"login": lambda email, pw: tokens if pw == "right" else bad}) as (client, fakes):
        r = client.post("/v1/auth/login", json={"email": "ada@shop.example", "password": "right"})
        assert r.status_code == 200, r.text
        assert r.json()["access_token"] == "t" and r.json()["device_token"]
        assert fakes.limiter.penalized == []
        r = client.post("/v1/auth/login", json={"email": "ada@shop.example", "password": "wrong"})
        problem_of(r, 401, "invalid_credentials")
        account = account_key("ada@shop.example")
        assert fakes.limiter.penalized == [fakes.services.gate.policy.login_keys("testclient", account, None)]


def test_login_refused_by_its_budget_never_asks_for_the_password() -> None:
    with gateway() as (client, fakes):
        fakes.limiter.deny = decision(allowed=False, key="fail:login:ip:x")
        r = client.post("/v1/auth/login", json={"email": "ada@shop.example", "password": "right"})
        assert "failed-login" in problem_of(r, 429, "rate_limited")["detail"]
        assert fakes.users.calls == []


def test_me_for_users_and_api_keys() -> None:
    key = API_KEY_PREFIX + "a" * KEY_ID_LEN + "_" + "s" * SECRET_LEN
    with gateway(users={"get": USER}) as (client, fakes):
        problem_of(client.get("/v1/users/me"), 401, "missing_credentials")
        r = client.get("/v1/users/me", headers=fakes.token("customer"))
        assert r.status_code == 200 and r.json()["email"] == "ada@shop.example"
        assert r.headers["x-gateway-replica"] == "replica-1" and r.headers["ratelimit-limit"] == "100"
        assert fakes.users.called("get") == [("usr_1",)]
        fakes.store.keys[key] = Principal(user_id="usr_9", roles=("integration",), kind="api_key", api_key_id="k1")
        r = client.get("/v1/users/me", headers={"X-API-Key": key})
        assert r.json() == {"id": "usr_9", "roles": ["integration"], "kind": "api_key", "email": None, "name": None}
        assert len(fakes.users.called("get")) == 1


def test_my_vouchers_are_the_callers() -> None:
    with gateway(vouchers={"of_customer": [{"code": "A"}]}) as (client, fakes):
        r = client.get("/v1/users/me/vouchers?limit=5", headers=fakes.token("customer", user_id="cus_7"))
        assert r.json() == {"items": [{"code": "A"}]}
        assert fakes.vouchers.called("of_customer") == [("cus_7", 5)]
        problem_of(client.get("/v1/users/me/vouchers?limit=0", headers=fakes.token("customer")), 422)


def test_roles_are_set_by_admins_only() -> None:
    with gateway(users={"set_roles": {**USER, "roles": ["manager"]}}) as (client, fakes):
        assert_refused(client, fakes, "PUT", "/v1/users/usr_2/roles", "users.set_roles", "manager",
                       json={"roles": ["manager"]})
        r = client.put("/v1/users/usr_2/roles", json={"roles": ["wizard"]}, headers=fakes.token("admin"))
        assert problem_of(r, 422)["errors"][0]["loc"][:2] == ["body", "roles"]
        r = client.put("/v1/users/usr_2/roles", json={"roles": ["manager"]}, headers=fakes.token("admin"))
        assert r.status_code == 200 and r.json()["roles"] == ["manager"]
        assert fakes.users.called("set_roles") == [("usr_2", ["manager"], Actor("user", "usr_1"))]


def test_api_keys_act_for_their_creator() -> None:
    made = {"id": "key_1", "key": "vk_x", "name": "shop", "roles": ["integration"]}
    answers = {"create_api_key": made, "list_api_keys": [made], "revoke_api_key": {"revoked": True},
               "get": USER}
    with gateway(users=answers) as (client, fakes):
        assert_refused(client, fakes, "POST", "/v1/api-keys", "api_keys.create", "analyst", json={"name": "shop"})
        r = client.post("/v1/api-keys", json={"name": "shop"}, headers=fakes.token("manager", user_id="usr_3"))
        assert r.status_code == 201 and r.json()["key"] == "vk_x"
        [(caller, name, roles)] = fakes.users.called("create_api_key")
        assert (caller.user_id, caller.roles, name, roles) == ("usr_3", ("manager",), "shop", ["integration"])
        r = client.get("/v1/api-keys", headers=fakes.token("manager", user_id="usr_3"))
        assert r.json() == {"items": [made]}
        r = client.delete("/v1/api-keys/key_1", headers=fakes.token("admin", user_id="usr_4"))
        assert r.json() == {"revoked": True}
        [(key_id, caller)] = fakes.users.called("revoke_api_key")
        assert key_id == "key_1" and caller.user_id == "usr_4"
