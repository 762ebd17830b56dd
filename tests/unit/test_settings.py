from __future__ import annotations

import pytest

from engine.errors import ConfigError
from engine.settings import SETTINGS_DOC, Settings, settings_markdown


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert s.database_url is None
    assert s.redis_url is None
    assert s.data_dir == ".data"
    assert s.shards == 4
    assert s.ack_mode == "durable"
    assert s.batch_window_ms == 2.0
    assert s.batch_max == 2048
    assert s.reservation_ttl_s == 900
    assert s.idempotency_ttl_s == 86400
    assert s.ray_address is None
    assert s.namespace == "voucher"
    assert s.generation_chunk == 50_000
    assert s.log_level == "INFO"


def test_reads_every_variable() -> None:
    s = Settings.from_env(
        {
            "VOUCHER_DATABASE_URL": "postgresql://u@db/voucher",
            "VOUCHER_REDIS_URL": "redis://cache:6379/0",
            "VOUCHER_DATA_DIR": "/var/lib/voucher",
            "VOUCHER_SHARDS": " 16 ",
            "VOUCHER_ACK_MODE": "Fast",
            "VOUCHER_BATCH_WINDOW_MS": "0.5",
            "VOUCHER_BATCH_MAX": "100",
            "VOUCHER_RESERVATION_TTL_S": "60",
            "VOUCHER_IDEMPOTENCY_TTL_S": "3600",
            "RAY_ADDRESS": "ray://head:10001",
            "VOUCHER_RAY_NAMESPACE": "prod",
            "VOUCHER_GENERATION_CHUNK": "1000",
            "VOUCHER_LOG_LEVEL": "debug",
            "UNRELATED": "ignored",
        }
    )
    assert s == Settings(
        database_url="postgresql://u@db/voucher",
        redis_url="redis://cache:6379/0",
        data_dir="/var/lib/voucher",
        shards=16,
        ack_mode="fast",
        batch_window_ms=0.5,
        batch_max=100,
        reservation_ttl_s=60,
        idempotency_ttl_s=3600,
        ray_address="ray://head:10001",
        namespace="prod",
        generation_chunk=1000,
        log_level="DEBUG",
    )


def test_empty_variable_means_unset() -> None:
    s = Settings.from_env({"VOUCHER_DATABASE_URL": "", "VOUCHER_SHARDS": "  "})
    assert s.database_url is None
    assert s.shards == 4


def test_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOUCHER_SHARDS", "7")
    assert Settings.from_env().shards == 7


def test_is_frozen() -> None:
    s = Settings()
    with pytest.raises(AttributeError):
        s.shards = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("VOUCHER_SHARDS", "0"),
        ("VOUCHER_SHARDS", "257"),
        ("VOUCHER_SHARDS", "four"),
        ("VOUCHER_SHARDS", "2.5"),
        ("VOUCHER_ACK_MODE", "eventually"),
        ("VOUCHER_BATCH_WINDOW_MS", "-1"),
        ("VOUCHER_BATCH_WINDOW_MS", "100.5"),
        ("VOUCHER_BATCH_WINDOW_MS", "soon"),
        ("VOUCHER_BATCH_WINDOW_MS", "nan"),
        ("VOUCHER_BATCH_MAX", "0"),
        ("VOUCHER_RESERVATION_TTL_S", "0"),
        ("VOUCHER_RESERVATION_TTL_S", "15m"),
        ("VOUCHER_IDEMPOTENCY_TTL_S", "-5"),
        ("VOUCHER_GENERATION_CHUNK", "0"),
        ("VOUCHER_LOG_LEVEL", "chatty"),
        ("VOUCHER_DATABASE_URL", "mysql://db/voucher"),
        ("VOUCHER_REDIS_URL", "localhost:6379"),
    ],
)
def test_bad_value_names_the_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: value})
    assert var in str(info.value)
    assert info.value.code == "config_error"


def test_settings_doc_covers_every_field() -> None:
    assert len(SETTINGS_DOC) == len(Settings.__struct_fields__)
    table = settings_markdown()
    for var, default, description in SETTINGS_DOC:
        assert var.startswith(("VOUCHER_", "RAY_"))
        assert description
        assert f"`{var}` | `{default}`" in table


def test_configuration_page_table_is_current() -> None:
    from pathlib import Path

    page = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    if not page.exists():
        pytest.skip("no docs/configuration.md next to the tests (installed package)")
    assert settings_markdown() in page.read_text(), (
        "docs/configuration.md's configuration table is stale: "
        "paste engine.settings.settings_markdown()"
    )


def test_rate_limits_read_their_text_and_print_it_back() -> None:
    from engine.gcra import Limit, format_limit, parse_limit, parse_limits

    s = Settings.from_env(
        {"VOUCHER_RATE_CUSTOMER": "5/10", "VOUCHER_RATE_LOGIN_IP": "1/min/2, 1/h/5"}
    )
    assert s.rate_customer == Limit(5.0, 10)
    assert s.rate_login_ip == (Limit(1 / 60, 2), Limit(1 / 3600, 5))
    assert s.rate_admin == Settings().rate_admin
    for field in Settings.__struct_fields__:
        value = getattr(Settings(), field)
        if isinstance(value, Limit):
            assert parse_limit(format_limit(value)) == value
        elif field.startswith("rate_login_"):
            assert parse_limits(",".join(format_limit(v) for v in value), field) == value


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("VOUCHER_RATE_CUSTOMER", "fast", "expected RATE/BURST or RATE/UNIT/BURST"),
        ("VOUCHER_RATE_IP", "10/0", "burst must be >= 1"),
        ("VOUCHER_RATE_LOGIN_DEVICE", ",", "expected at least one RATE/BURST"),
    ],
)
def test_bad_rate_limits_name_the_variable(var: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        Settings.from_env({var: value})
    assert str(info.value).startswith(f"{var}={value!r}: ")


def test_given_tells_a_set_variable_from_a_default() -> None:
    assert Settings.given("shards", {"VOUCHER_SHARDS": "8"})
    assert not Settings.given("shards", {"VOUCHER_SHARDS": " "})
    assert not Settings.given("shards", {})
