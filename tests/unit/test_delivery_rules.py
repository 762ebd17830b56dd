"""Pure parts of delivery: retry schedule, provider-error classification, locale fallback,
failure-rate window, templates (validation, escaping, fallback), the email's bytes."""

from __future__ import annotations

import email
import email.policy
import random

import pytest

from actors.providers import SmtpSettings, build_email
from engine import templates
from engine.delivery import new_message
from engine.errors import ConfigError, InvalidInput
from engine.sending import (
    FailureWindow,
    PermanentError,
    TemporaryError,
    backoff_s,
    classify_http,
    classify_smtp,
    count_outcomes,
    failure_rate_exceeded,
    locale_chain,
    normalize_locale,
    window_index,
)
from engine.settings import Settings

# --- retry schedule ------------------------------------------------------------------


def test_backoff_doubles_within_jitter_bounds_and_caps() -> None:
    rng = random.Random(3)
    for attempt in range(1, 12):
        cap = min(60.0, 0.5 * 2 ** (attempt - 1))
        for _ in range(200):
            d = backoff_s(attempt, base_s=0.5, max_s=60.0, rand=rng.random)
            assert cap / 2 <= d <= cap
    assert backoff_s(1, base_s=1, max_s=100, rand=lambda: 0.0) == 0.5
    assert backoff_s(3, base_s=1, max_s=100, rand=lambda: 1.0) == 4.0
    assert backoff_s(40, base_s=1, max_s=100, rand=lambda: 1.0) == 100.0
    assert backoff_s(10_000, base_s=1, max_s=7, rand=lambda: 1.0) == 7.0  # no overflow


def test_backoff_jitter_spreads_retries() -> None:
    rng = random.Random(1)
    delays = {round(backoff_s(4, base_s=1, max_s=60, rand=rng.random), 3) for _ in range(100)}
    assert len(delays) > 90


def test_backoff_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError):
        backoff_s(0, base_s=1, max_s=2)


# --- provider errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "temporary"),
    [(421, True), (450, True), (451, True), (452, True), (550, False), (552, False), (554, False), (300, True)],
)
def test_smtp_reply_classes(code: int, temporary: bool) -> None:
    err = classify_smtp(code, "text")
    assert isinstance(err, TemporaryError if temporary else PermanentError)
    assert err.temporary is temporary and str(code) in err.reason


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, None), (202, None), (204, None),
        (408, TemporaryError), (425, TemporaryError), (429, TemporaryError),
        (500, TemporaryError), (502, TemporaryError), (503, TemporaryError),
        (400, PermanentError), (401, PermanentError), (404, PermanentError), (422, PermanentError),
        (301, PermanentError),
    ],
)
def test_http_status_classes(status: int, kind: type | None) -> None:
    err = classify_http(status, "x" * 500)
    if kind is None:
        assert err is None
    else:
        assert isinstance(err, kind) and len(err.reason) < 230


# --- locales ---------------------------------------------------------------------------


def test_locale_chain_customer_language_default() -> None:
    assert locale_chain("de_at", "en-GB") == ["de-AT", "de", "en-GB", "en"]
    assert locale_chain("de", "de") == ["de"]
    assert locale_chain(None, "fr") == ["fr"]
    assert locale_chain("", None) == []
    assert normalize_locale("PT_br") == "pt-BR"
    assert normalize_locale("zh-Hant-TW") == "zh-Hant-TW"


def test_template_choice_follows_the_fallback_chain() -> None:
    from actors.delivery import pick_template

    t = {
        ("email", loc): templates.CompiledTemplate("email", templates.TemplateSource(subject=loc, body=loc))
        for loc in ("de-AT", "de", "en")
    }
    assert pick_template("email", "de-AT", "en", t)[0] == "de-AT"
    assert pick_template("email", "de-CH", "en", t)[0] == "de"
    assert pick_template("email", "fr", "en", t)[0] == "en"
    assert pick_template("email", "fr", None, t)[0] is None  # built-in
    assert pick_template("sms", "de-AT", "en", t)[0] is None  # no SMS templates at all
    loc, builtin = pick_template("push", "fr", None, {})
    assert loc is None and "Your voucher code: X" in builtin.render({"code": "X"}).body


# --- failure-rate window --------------------------------------------------------------


def test_failure_rate_needs_samples_and_a_share_above_threshold() -> None:
    assert not failure_rate_exceeded(FailureWindow(3, 3), threshold=0.2, min_attempts=20)
    assert not failure_rate_exceeded(FailureWindow(100, 20), threshold=0.2, min_attempts=20)
    assert failure_rate_exceeded(FailureWindow(100, 21), threshold=0.2, min_attempts=20)
    assert not failure_rate_exceeded(FailureWindow(0, 0), threshold=0.0, min_attempts=0)
    per = count_outcomes([("a", True), ("a", False), ("b", False)])
    assert per["a"] == FailureWindow(2, 1) and per["b"] == FailureWindow(1, 0)
    assert window_index(599.9, 300) == 1 and window_index(600.0, 300) == 2


# --- templates -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "subject", "body", "needle"),
    [
        ("email", "Hi", "{{ code ", "syntax error"),
        ("email", "Hi {% if %}", "x", "subject: template syntax error"),
        ("email", "Hi", "{{ coupon }}", "'coupon' is undefined"),
        ("email", None, "{{ code }}", "needs a subject"),
        ("sms", "Hi", "{{ code }}", "no subject"),
        ("sms", None, "   ", "must not be empty"),
        ("fax", None, "x", "unknown channel"),
        ("email", "Hi", "{{ code.__class__.__mro__ }}", "not allowed"),
        ("push", "t", "{{ code | nosuchfilter }}", "syntax error"),
    ],
)
def test_bad_templates_are_refused_with_the_reason(channel, subject, body, needle) -> None:
    with pytest.raises(InvalidInput) as exc:
        templates.validate(channel, subject, body)
    assert needle in exc.value.message


def test_good_templates_pass_and_render() -> None:
    templates.validate("email", "Für {{ customer_name }}", "<b>{{ code }}</b> {{ discount }} {{ ends_at }}")
    t = templates.CompiledTemplate(
        "email", templates.TemplateSource(subject="Hi {{ customer_name }}\nBcc: x@y", body="<b>{{ customer_name }}</b>")
    )
    r = t.render({"customer_name": "<i>Eve</i>"})
    assert r.body == "<b>&lt;i&gt;Eve&lt;/i&gt;</b>"  # HTML email: escaped
    assert r.subject == "Hi <i>Eve</i> Bcc: x@y"  # one header line, no injection
    sms = templates.CompiledTemplate("sms", templates.TemplateSource(subject=None, body="{{ customer_name }}"))
    assert sms.render({"customer_name": "<i>"}).body == "<i>"  # plain text: not escaped


def test_discount_text() -> None:
    assert templates.discount_text({"discount": {"kind": "percent", "value": 15}}) == "15%"
    assert templates.discount_text({"currency": "EUR", "discount": {"kind": "amount", "value": 500}}) == "5.00 EUR"
    assert templates.discount_text({"currency": "USD", "gift_balance": 5000}) == "gift card of 50.00 USD"
    assert templates.discount_text({}) == ""
    ctx = templates.context(code="C", customer_name=None, locale="en", campaign_name="N",
                            spec={"ends_at": "2030-01-31T23:00:00Z", "currency": "EUR"})
    assert ctx["ends_at"] == "2030-01-31" and ctx["customer_name"] == ""


# --- the email on the wire ------------------------------------------------------------------


def test_email_bytes_carry_the_idempotency_key_and_parse_back() -> None:
    m = new_message("camp", "cust", "email", "ada@shop.example", "CODE-1", locale="de", name="Ada")
    raw = build_email(m, templates.Rendered(subject="Grüße, Ada", body="<p>Ihr Code: CODE-1 – 10%</p>"), "v@x.example")
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Message-ID"] == f"<{m.id}@voucher-engine>"
    assert parsed["Subject"] == "Grüße, Ada"
    assert parsed["To"] == "ada@shop.example" and parsed["From"] == "v@x.example"
    assert parsed.get_content().strip() == "<p>Ihr Code: CODE-1 – 10%</p>"
    assert b"\r\n\r\n" in raw and all(len(line) <= 998 for line in raw.split(b"\r\n"))
    ascii_raw = build_email(m, templates.Rendered(subject="Hi", body="line1\nline2"), "v@x.example")
    assert ascii_raw.endswith(b"\r\n\r\nline1\r\nline2")


def test_smtp_url_parsing_and_settings() -> None:
    s = SmtpSettings.from_url("smtps://user%40x:p%3Ass@mail.example:2465")
    assert (s.host, s.port, s.username, s.password, s.tls) == ("mail.example", 2465, "user@x", "p:ss", True)
    assert SmtpSettings.from_url("smtp://127.0.0.1").port == 25
    with pytest.raises(ValueError):
        SmtpSettings.from_url("http://x")
    env = {
        "VOUCHER_DELIVERY_WORKERS": "3",
        "VOUCHER_SMS_WEBHOOK_URL": "https://sms.example/hook",
        "VOUCHER_DELIVERY_FAILURE_RATE": "0.5",
    }
    st = Settings.from_env(env)
    assert st.delivery_workers == 3 and st.sms_webhook_url == "https://sms.example/hook"
    with pytest.raises(ConfigError, match="VOUCHER_PUSH_WEBHOOK_URL"):
        Settings.from_env({"VOUCHER_PUSH_WEBHOOK_URL": "ftp://x"})
    with pytest.raises(ConfigError, match="VOUCHER_DELIVERY_FAILURE_RATE"):
        Settings.from_env({"VOUCHER_DELIVERY_FAILURE_RATE": "1.5"})
