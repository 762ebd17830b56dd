"""Embedded provider sinks: a local SMTP server (aiosmtpd) and an HTTP webhook sink.

With no provider configured, ``voucher-engine up`` starts both on 127.0.0.1 so the whole
pipeline runs on one machine, and records what they receive under ``<data dir>/outbox/``:

* ``email/<message id>.eml``: each email as received (``voucher-engine outbox --show ID``),
* ``sms/<id>.json``, ``push/<id>.json``: each webhook document,
* ``index.jsonl``: one line per receipt, repeats and refusals included.

They behave like a provider that honours idempotency keys: a message whose key (SMTP
``Message-ID``, HTTP ``Idempotency-Key``) was already accepted is acknowledged again but
recorded as ``duplicate`` and not delivered a second time. Every receipt is kept (in
``receipts`` and the index), so tests can tell a repeated send from a single one.

``FailureMode`` makes the sinks refuse on purpose, with real protocol answers: temporary
(SMTP 451, HTTP 503) with probability ``temporary_p``, or always permanent (SMTP 550, HTTP
400); ``delay_s`` makes them slow (each message is answered that much later). Tests change
it while the sinks run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

_MESSAGE_ID = re.compile(rb"^Message-ID:\s*<([^@>]+)@", re.IGNORECASE | re.MULTILINE)
_SUBJECT = re.compile(rb"^Subject:\s*(.*?)\r?$", re.IGNORECASE | re.MULTILINE)
_SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


@dataclass
class FailureMode:
    temporary_p: float = 0.0
    permanent: bool = False
    delay_s: float = 0.0
    rng: random.Random = field(default_factory=random.Random)

    def decide(self) -> str | None:
        if self.permanent:
            return "permanent"
        if self.temporary_p > 0 and self.rng.random() < self.temporary_p:
            return "temporary"
        return None


class Outbox:
    """What the sinks received: in memory (``receipts``) and on disk (``root``)."""

    def __init__(self, root: Path, *, keep_in_memory: bool = True) -> None:
        self.root = root
        for sub in ("email", "sms", "push"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.receipts: list[dict[str, Any]] = []
        self.accepted: dict[str, int] = {}  # key -> times accepted (first + duplicates)
        self.keep_in_memory = keep_in_memory
        self._lock = threading.Lock()
        self._index = open(root / "index.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def record(
        self, channel: str, key: str | None, to: str, subject: str | None, status: str, payload: bytes
    ) -> str:
        """Record one receipt; returns its final status (``accepted`` may become
        ``duplicate``)."""
        with self._lock:
            if status == "accepted" and key is not None:
                n = self.accepted.get(key, 0)
                self.accepted[key] = n + 1
                if n:
                    status = "duplicate"
                elif _SAFE.match(key):
                    ext = "eml" if channel == "email" else "json"
                    (self.root / channel / f"{key}.{ext}").write_bytes(payload)
            row = {
                "at": round(time.time(), 6),
                "channel": channel,
                "key": key,
                "to": to,
                "subject": subject,
                "status": status,
            }
            if self.keep_in_memory:
                self.receipts.append(row)
            self._index.write(json.dumps(row) + "\n")
            self._index.flush()
            return status

    def delivered(self, channel: str | None = None) -> list[dict[str, Any]]:
        """Receipts that delivered a message (first acceptance of each key)."""
        with self._lock:
            return [
                r for r in self.receipts
                if r["status"] == "accepted" and (channel is None or r["channel"] == channel)
            ]

    def count(self, status: str) -> int:
        with self._lock:
            return sum(1 for r in self.receipts if r["status"] == status)

    def close(self) -> None:
        with self._lock:
            self._index.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _SmtpHandler:
    def __init__(self, outbox: Outbox, mode: FailureMode) -> None:
        self.outbox = outbox
        self.mode = mode

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        content: bytes = envelope.original_content or envelope.content
        head = content.split(b"\r\n\r\n", 1)[0]
        m = _MESSAGE_ID.search(head)
        key = m.group(1).decode("ascii", "replace") if m else None
        s = _SUBJECT.search(head)
        subject = s.group(1).decode("utf-8", "replace") if s else None
        to = ",".join(envelope.rcpt_tos)
        if self.mode.delay_s > 0:
            await asyncio.sleep(self.mode.delay_s)
        failure = self.mode.decide()
        if failure == "permanent":
            self.outbox.record("email", key, to, subject, "rejected_permanent", content)
            return "550 5.1.1 Mailbox unavailable (sink failure mode)"
        if failure == "temporary":
            self.outbox.record("email", key, to, subject, "rejected_temporary", content)
            return "451 4.3.0 Try again later (sink failure mode)"
        self.outbox.record("email", key, to, subject, "accepted", content)
        return "250 2.0.0 OK queued"


class SmtpSink:
    """aiosmtpd on 127.0.0.1 in its own thread; ``url`` is ``smtp://127.0.0.1:<port>``."""

    def __init__(self, outbox: Outbox, mode: FailureMode | None = None, port: int = 0) -> None:
        self.outbox = outbox
        self.mode = mode or FailureMode()
        self.port = port or _free_port()
        self._controller = Controller(
            _SmtpHandler(outbox, self.mode),
            hostname="127.0.0.1",
            port=self.port,
            # The message size limit a real MTA would have; our mails are a few KiB.
            data_size_limit=10 * 1024 * 1024,
        )

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def start(self) -> SmtpSink:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()


class WebhookSink:
    """HTTP sink on 127.0.0.1: ``POST /sms`` and ``POST /push`` take the generic webhook
    document; ``GET /`` lists the latest receipts (a page for a person), ``GET /index.json``
    the same as JSON."""

    def __init__(self, outbox: Outbox, mode: FailureMode | None = None, port: int = 0) -> None:
        self.outbox = outbox
        self.mode = mode or FailureMode()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802
                channel = self.path.strip("/")
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if channel not in ("sms", "push"):
                    self._answer(404, b'{"error": "POST /sms or /push"}')
                    return
                try:
                    doc = json.loads(raw)
                    to = str(doc["to"])
                    body = str(doc["body"])
                except (ValueError, KeyError, TypeError):
                    self._answer(400, b'{"error": "expected JSON with to and body"}')
                    return
                key = self.headers.get("Idempotency-Key")
                subject = doc.get("subject")
                if sink.mode.delay_s > 0:
                    time.sleep(sink.mode.delay_s)
                failure = sink.mode.decide()
                if failure == "permanent":
                    sink.outbox.record(channel, key, to, subject, "rejected_permanent", raw)
                    self._answer(400, b'{"error": "recipient refused (sink failure mode)"}')
                    return
                if failure == "temporary":
                    sink.outbox.record(channel, key, to, subject, "rejected_temporary", raw)
                    self._answer(503, b'{"error": "try again later (sink failure mode)"}')
                    return
                status = sink.outbox.record(channel, key, to, subject, "accepted", raw)
                del body
                self._answer(200, json.dumps({"status": status}).encode())

            def do_GET(self) -> None:  # noqa: N802
                rows = _tail(sink.outbox.root / "index.jsonl", 200)
                if self.path.startswith("/index.json"):
                    self._answer(200, json.dumps(rows).encode())
                    return
                if self.path not in ("/", ""):
                    self._answer(404, b'{"error": "not found"}')
                    return
                cells = "".join(
                    "<tr>" + "".join(f"<td>{_esc(str(r.get(k) or ''))}</td>" for k in
                                     ("at", "channel", "status", "to", "subject", "key")) + "</tr>"
                    for r in reversed(rows)
                )
                page = (
                    "<!doctype html><title>voucher-engine outbox</title><h1>Outbox</h1>"
                    "<p>Latest 200 receipts of the embedded sinks.</p><table border=1>"
                    "<tr><th>at</th><th>channel</th><th>status</th><th>to</th><th>subject</th>"
                    f"<th>key</th></tr>{cells}</table>"
                )
                self._answer(200, page.encode(), "text/html; charset=utf-8")

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> WebhookSink:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _tail(path: Path, n: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()[-n:]
    return [json.loads(line) for line in lines if line.strip()]


class Sinks:
    """Both sinks over one outbox."""

    def __init__(self, outbox_dir: Path, *, keep_in_memory: bool = True) -> None:
        self.outbox = Outbox(outbox_dir, keep_in_memory=keep_in_memory)
        self.mode = FailureMode()
        self.smtp = SmtpSink(self.outbox, self.mode)
        self.webhook = WebhookSink(self.outbox, self.mode)

    def start(self) -> Sinks:
        self.smtp.start()
        self.webhook.start()
        return self

    def stop(self) -> None:
        self.smtp.stop()
        self.webhook.stop()
        self.outbox.close()

    @property
    def urls(self) -> dict[str, str]:
        return {
            "smtp": self.smtp.url,
            "sms": f"{self.webhook.url}/sms",
            "push": f"{self.webhook.url}/push",
            "page": self.webhook.url,
        }


def outbox_rows(outbox_dir: Path, limit: int) -> list[dict[str, Any]]:
    """The latest ``limit`` receipts of an outbox (``voucher-engine outbox``)."""
    return _tail(outbox_dir / "index.jsonl", limit)


def main(argv: list[str] | None = None) -> int:
    """Run the sinks as their own process (the delivery benchmark does, so the SMTP server
    has a core of its own): prints the URLs as one JSON line, runs until killed."""
    p = argparse.ArgumentParser(prog="python -m ops.sinks")
    p.add_argument("--dir", required=True)
    args = p.parse_args(argv)
    sinks = Sinks(Path(args.dir), keep_in_memory=False).start()
    print(json.dumps(sinks.urls), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        sinks.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
