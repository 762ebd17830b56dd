"""Message templates: Jinja2 in a sandbox, per campaign x channel x locale.

* The environment is Jinja2's ``ImmutableSandboxedEnvironment``: a template written by a
  campaign manager cannot reach Python internals or mutate what it is given.
* Email bodies are HTML and autoescaped (a customer named ``<script>`` stays text); SMS and
  push bodies and every subject are plain text, not escaped.
* :func:`validate` compiles a template and renders it against a sample of every variable
  with ``StrictUndefined``, so syntax errors and misspelt variables are refused when the
  template is stored (HTTP 422), never discovered at send time. At send time templates
  render with the lenient ``Undefined`` and can therefore not fail on data.

Variables: ``code``, ``customer_name``, ``campaign_name``, ``discount`` (e.g. ``10%``,
``5.00 EUR``, ``gift card of 50.00 EUR``), ``currency``, ``ends_at`` (ISO date or empty),
``locale``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import InvalidInput

VARIABLES: tuple[str, ...] = (
    "code",
    "customer_name",
    "campaign_name",
    "discount",
    "currency",
    "ends_at",
    "locale",
)

SAMPLE: dict[str, Any] = {
    "code": "ABCD-1234",
    "customer_name": "Ada",
    "campaign_name": "Spring sale",
    "discount": "10%",
    "currency": "EUR",
    "ends_at": "2030-01-31",
    "locale": "en",
}

MAX_SUBJECT = 998
MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class TemplateSource:
    subject: str | None
    body: str


@dataclass(frozen=True)
class Rendered:
    subject: str | None
    body: str


# Built-in templates, the last link of the fallback chain.
DEFAULTS: dict[str, TemplateSource] = {
    "email": TemplateSource(
        subject="Your voucher for {{ campaign_name }}",
        body=(
            "<p>Hello {{ customer_name or 'there' }},</p>\n"
            "<p>here is your voucher for <b>{{ campaign_name }}</b>: "
            "<code>{{ code }}</code>{% if discount %} ({{ discount }}){% endif %}.</p>\n"
            "{% if ends_at %}<p>Valid until {{ ends_at }}.</p>\n{% endif %}"
        ),
    ),
    "sms": TemplateSource(
        subject=None,
        body="{{ campaign_name }}: your voucher code is {{ code }}"
        "{% if discount %} ({{ discount }}){% endif %}.",
    ),
    "push": TemplateSource(
        subject="{{ campaign_name }}",
        body="Your voucher code: {{ code }}{% if discount %} ({{ discount }}){% endif %}",
    ),
}

_HTML = ImmutableSandboxedEnvironment(autoescape=True)
_TEXT = ImmutableSandboxedEnvironment(autoescape=False)
_HTML_STRICT = ImmutableSandboxedEnvironment(autoescape=True, undefined=jinja2.StrictUndefined)
_TEXT_STRICT = ImmutableSandboxedEnvironment(autoescape=False, undefined=jinja2.StrictUndefined)


class CompiledTemplate:
    """A template ready to render for one channel."""

    __slots__ = ("_subject", "_body")

    def __init__(self, channel: str, source: TemplateSource) -> None:
        body_env = _HTML if channel == "email" else _TEXT
        self._subject = _TEXT.from_string(source.subject) if source.subject else None
        self._body = body_env.from_string(source.body)

    def render(self, context: Mapping[str, Any]) -> Rendered:
        subject = self._subject.render(context) if self._subject is not None else None
        if subject is not None:
            # A header is one line: newlines in a subject would inject headers.
            subject = " ".join(subject.split())
        return Rendered(subject=subject, body=self._body.render(context))


def validate(channel: str, subject: str | None, body: str) -> None:
    """Raise :class:`InvalidInput` naming the problem when the template cannot be stored."""
    if channel not in DEFAULTS:
        raise InvalidInput(f"unknown channel {channel!r} (email, sms or push)")
    if not body.strip():
        raise InvalidInput("body must not be empty")
    if len(body) > MAX_BODY:
        raise InvalidInput(f"body is longer than {MAX_BODY} characters")
    if channel == "email" and not (subject and subject.strip()):
        raise InvalidInput("an email template needs a subject")
    if channel == "sms" and subject:
        raise InvalidInput("an SMS has no subject; leave it out")
    if subject is not None and len(subject) > MAX_SUBJECT:
        raise InvalidInput(f"subject is longer than {MAX_SUBJECT} characters")
    body_env = _HTML_STRICT if channel == "email" else _TEXT_STRICT
    for part, env, text in (("subject", _TEXT_STRICT, subject), ("body", body_env, body)):
        if text is None:
            continue
        try:
            env.from_string(text).render(SAMPLE)
        except jinja2.TemplateSyntaxError as exc:
            raise InvalidInput(f"{part}: template syntax error on line {exc.lineno}: {exc.message}") from None
        except jinja2.UndefinedError as exc:
            allowed = ", ".join(VARIABLES)
            raise InvalidInput(f"{part}: {exc.message} (variables: {allowed})") from None
        except jinja2.exceptions.SecurityError as exc:
            raise InvalidInput(f"{part}: not allowed in a template: {exc}") from None
        except Exception as exc:  # e.g. a filter applied to the wrong type of sample value
            raise InvalidInput(f"{part}: template fails to render: {exc}") from None


def discount_text(spec: Mapping[str, Any]) -> str:
    """The campaign's offer in words, from its stored spec (``campaigns.spec``)."""
    currency = spec.get("currency") or ""
    d = spec.get("discount")
    if d:
        if d.get("kind") == "percent":
            return f"{d.get('value')}%"
        return f"{_money(d.get('value', 0))} {currency}".strip()
    if spec.get("gift_balance"):
        return f"gift card of {_money(spec['gift_balance'])} {currency}".strip()
    return ""


def _money(minor: int) -> str:
    return f"{minor / 100:.2f}"


def context(
    *, code: str, customer_name: str | None, locale: str, campaign_name: str, spec: Mapping[str, Any]
) -> dict[str, Any]:
    ends_at = spec.get("ends_at") or ""
    return {
        "code": code,
        "customer_name": customer_name or "",
        "campaign_name": campaign_name,
        "discount": discount_text(spec),
        "currency": spec.get("currency") or "",
        "ends_at": str(ends_at)[:10],
        "locale": locale,
    }
