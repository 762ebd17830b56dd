"""Channel adapters: how a rendered message reaches a provider.

The shape every adapter has (:class:`ChannelAdapter`)::

    class MyProvider:
        async def send(self, message: DeliveryMessage, rendered: Rendered) -> None:
            # Hand the message over, passing ``message.id`` as the provider's idempotency
            # key. Return when the provider has accepted it. Raise
            # engine.sending.TemporaryError for what may work later (timeouts, 429, 5xx)
            # and engine.sending.PermanentError for what never will (invalid number, 4xx).
        async def close(self) -> None: ...

Plugging a real provider, e.g. a Twilio-like SMS API (form POST, basic auth, its own
idempotency header) or an FCM-like push API (OAuth bearer, ``{"message": {"token": ...,
"notification": {"title", "body"}}}``)::

    class TwilioLikeSms:
        def __init__(self, account: str, token: str) -> None:
            self.http = httpx.AsyncClient(base_url="https://api.provider.example",
                                          auth=(account, token), timeout=10)
        async def send(self, message, rendered):
            r = await self.http.post(f"/Accounts/{account}/Messages.json",
                                     data={"To": message.recipient, "Body": rendered.body},
                                     headers={"I-Twilio-Idempotency-Token": message.id})
            error = classify_http(r.status_code, r.text)   # 429/5xx temporary, 4xx permanent
            if error is not None:
                raise error
        async def close(self):
            await self.http.aclose()

and return it from :func:`build_adapters` for its channel. The generic
:class:`WebhookAdapter` below covers any provider (or in-house gateway) that accepts one
JSON document per message.

Idempotency keys reach the provider as the SMTP ``Message-ID: <msg_...@voucher-engine>``
header and the HTTP ``Idempotency-Key`` header.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from email.header import Header
from email.utils import formatdate
from typing import Protocol
from urllib.parse import unquote, urlsplit

import aiosmtplib
import httpx
import msgspec

from actors import outbound
from engine.delivery import DeliveryMessage
from engine.errors import InvalidInput
from engine.sending import PermanentError, SendError, TemporaryError, classify_http, classify_smtp
from engine.templates import Rendered
from engine.urls import AllowEntry


class ChannelAdapter(Protocol):
    async def send(self, message: DeliveryMessage, rendered: Rendered) -> None: ...

    async def close(self) -> None: ...


MESSAGE_ID_DOMAIN = "voucher-engine"


def message_id_header(message: DeliveryMessage) -> str:
    return f"<{message.id}@{MESSAGE_ID_DOMAIN}>"


def build_email(message: DeliveryMessage, rendered: Rendered, mail_from: str) -> bytes:
    """The RFC 5322 message, built directly as bytes (the ``email`` package's object model
    costs more than the SMTP round trips at the throughput the workers aim for)."""
    subject = rendered.subject or ""
    if not subject.isascii():
        subject = Header(subject, "utf-8").encode()
    body = rendered.body
    if body.isascii() and all(len(line) < 990 for line in body.splitlines()):
        encoding, payload = "7bit", body.replace("\r\n", "\n").replace("\n", "\r\n")
    else:
        encoding = "base64"
        raw = base64.encodebytes(body.encode()).decode()
        payload = raw.replace("\n", "\r\n")
    headers = (
        f"From: {mail_from}\r\n"
        f"To: {message.recipient}\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"
        f"Message-ID: {message_id_header(message)}\r\n"
        f"X-Voucher-Campaign: {message.campaign_id}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: {encoding}\r\n"
    )
    return (headers + "\r\n" + payload).encode()


class SmtpSettings(msgspec.Struct, frozen=True):
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def from_url(cls, url: str) -> SmtpSettings:
        u = urlsplit(url)
        if u.scheme not in ("smtp", "smtps") or not u.hostname:
            raise ValueError(f"not an SMTP URL: {url!r}")
        return cls(
            host=u.hostname,
            port=u.port or (465 if u.scheme == "smtps" else 25),
            username=unquote(u.username) if u.username else None,
            password=unquote(u.password) if u.password else None,
            tls=u.scheme == "smtps",
        )


class SmtpAdapter:
    """Email over SMTP with a pool of reused connections (``size`` at most).

    A connection that fails mid-transaction is dropped (not returned to the pool) and the
    message's attempt counts as temporary failure; the next send opens a fresh one.
    """

    def __init__(self, cfg: SmtpSettings, mail_from: str, *, size: int, timeout_s: float) -> None:
        self.cfg = cfg
        self.mail_from = mail_from
        self.timeout_s = timeout_s
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(size)

    async def _connect(self) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(
            hostname=self.cfg.host,
            port=self.cfg.port,
            use_tls=self.cfg.tls,
            # smtps://: TLS from the first byte. smtp://: STARTTLS when the server offers it.
            start_tls=False if self.cfg.tls else None,
            timeout=self.timeout_s,
            tls_context=ssl.create_default_context() if self.cfg.tls else None,
        )
        await client.connect()
        if self.cfg.username and self.cfg.password:
            await client.login(self.cfg.username, self.cfg.password)
        return client

    async def send(self, message: DeliveryMessage, rendered: Rendered) -> None:
        data = build_email(message, rendered, self.mail_from)
        async with self._slots:
            client = self._idle.pop() if self._idle else None
            try:
                if client is None:
                    client = await self._connect()
                errors, _ = await client.sendmail(self.mail_from, [message.recipient], data)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                refused = exc.recipients[0] if exc.recipients else None
                self._recycle(client, healthy=True)
                if refused is not None:
                    raise classify_smtp(refused.code, refused.message) from None
                raise PermanentError(str(exc)) from None
            except aiosmtplib.SMTPResponseException as exc:
                # MAIL/DATA refused: the connection itself is fine; reset it for reuse.
                healthy = await _reset(client)
                self._recycle(client, healthy=healthy)
                raise classify_smtp(exc.code, exc.message) from None
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                self._recycle(client, healthy=False)
                raise TemporaryError(f"SMTP connection: {type(exc).__name__}: {exc}") from None
            if errors:
                self._recycle(client, healthy=True)
                code, text = next(iter(errors.values()))
                raise classify_smtp(code, text)
            self._idle.append(client)

    def _recycle(self, client: aiosmtplib.SMTP | None, *, healthy: bool) -> None:
        if client is None:
            return
        if healthy and client.is_connected:
            self._idle.append(client)
        else:
            with contextlib.suppress(Exception):
                client.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.quit(), 2)
            with contextlib.suppress(Exception):
                client.close()


async def _reset(client: aiosmtplib.SMTP | None) -> bool:
    if client is None or not client.is_connected:
        return False
    try:
        await client.rset()
        return True
    except Exception:
        return False


class WebhookAdapter:
    """SMS or push through a generic JSON webhook: one POST per message::

        POST <url>   Idempotency-Key: msg_...
        {"id": "msg_...", "channel": "sms", "to": "+4915...", "subject": null,
         "body": "...", "campaign_id": "...", "customer_id": "..."}

    2xx: accepted. 408/425/429/5xx, timeouts and connection errors: temporary. Other
    4xx: permanent.

    The URL is checked at every connection (``actors.outbound``): one that is or resolves
    to an internal address not named by ``allow`` fails permanently, nothing is sent.
    """

    def __init__(
        self,
        url: str,
        *,
        connections: int,
        timeout_s: float,
        allow: tuple[AllowEntry, ...] = (),
        resolver: outbound.Resolver = outbound.system_resolve,
    ) -> None:
        self.url = url
        self.http = outbound.client(
            allow,
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            resolver=resolver,
        )

    async def send(self, message: DeliveryMessage, rendered: Rendered) -> None:
        doc = {
            "id": message.id,
            "channel": message.channel,
            "to": message.recipient,
            "subject": rendered.subject,
            "body": rendered.body,
            "campaign_id": message.campaign_id,
            "customer_id": message.customer_id,
        }
        try:
            r = await self.http.post(
                self.url,
                content=msgspec.json.encode(doc),
                headers={"Idempotency-Key": message.id, "Content-Type": "application/json"},
            )
        except InvalidInput as exc:  # InternalAddress or a URL the engine never requests
            raise PermanentError(f"refused: {exc.message}") from None
        except httpx.HTTPError as exc:
            raise TemporaryError(f"HTTP {type(exc).__name__}: {exc}") from None
        error = classify_http(r.status_code, r.text)
        if error is not None:
            raise error

    async def close(self) -> None:
        await self.http.aclose()


__all__ = [
    "ChannelAdapter",
    "PermanentError",
    "SendError",
    "SmtpAdapter",
    "SmtpSettings",
    "TemporaryError",
    "WebhookAdapter",
    "build_email",
]
