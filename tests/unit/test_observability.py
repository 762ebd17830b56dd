"""JSON logs, request ids and the metrics hooks, without Ray (Ray's metric objects record
into nothing when Ray is not running)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from actors.observability import (
    REQUEST_ID_HEADER,
    JsonFormatter,
    RequestIdMiddleware,
    ShardMetrics,
    accept_request_id,
    bound_request_id,
    configure_json_logging,
    current_request_id,
    new_request_id,
    outcome_label,
    request_id_var,
)
from actors.shard import ShardCore
from actors.write_behind import WriteBehind
from engine.events import Rejection, Validation
from engine.settings import Settings
from engine.shard_state import Outcome, RedeemRequest
from serve.batching import MicroBatcher

_reqs = msgspec.msgpack.Decoder(list[RedeemRequest])
_enc = msgspec.msgpack.Encoder()


def _record(msg: str = "hello %s", *args: Any, **extra: Any) -> logging.LogRecord:
    logger = logging.getLogger("voucher.test")
    return logger.makeRecord(
        "voucher.test", logging.INFO, __file__, 1, msg, args or ("world",), None, extra=extra
    )


# --- the formatter ----------------------------------------------------------------------


def test_formatter_emits_one_json_object_with_the_fixed_fields() -> None:
    line = JsonFormatter().format(_record())
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["level"] == "INFO"
    assert doc["logger"] == "voucher.test"
    assert doc["message"] == "hello world"
    assert doc["request_id"] is None
    assert doc["ts"].endswith("Z") and doc["ts"][10] == "T" and len(doc["ts"]) == 24


def test_formatter_carries_extra_fields_and_stringifies_the_unknown() -> None:
    class Thing:
        def __str__(self) -> str:
            return "a thing"

    doc = json.loads(
        JsonFormatter().format(_record(shard=3, request_ids=["a", None], what=Thing()))
    )
    assert doc["shard"] == 3
    assert doc["request_ids"] == ["a", None]
    assert doc["what"] == "a thing"
    for internal in ("args", "msg", "levelno", "pathname", "created"):
        assert internal not in doc


def test_formatter_survives_extras_msgspec_cannot_encode() -> None:
    doc = json.loads(JsonFormatter().format(_record(odd={1: "int key", (2, 3): "tuple key"})))
    assert doc["odd"]["1"] == "int key"


def test_formatter_takes_the_request_id_from_the_context_or_the_record() -> None:
    fmt = JsonFormatter()
    with bound_request_id("req-ctx"):
        assert json.loads(fmt.format(_record()))["request_id"] == "req-ctx"
        # an explicit one (a shard logging about one item of a batch) wins
        assert json.loads(fmt.format(_record(request_id="req-x")))["request_id"] == "req-x"
    assert json.loads(fmt.format(_record()))["request_id"] is None


def test_formatter_includes_the_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    doc = json.loads(JsonFormatter().format(rec))
    assert doc["message"] == "failed"
    assert "ValueError: boom" in doc["exc"]


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_configure_json_logging_is_idempotent_and_sets_the_level(root_logging: None) -> None:
    out = io.StringIO()
    configure_json_logging("debug", stream=out)
    handler = configure_json_logging("DEBUG", stream=out)  # again: replaces, no duplicate
    ours = [h for h in logging.getLogger().handlers if isinstance(h.formatter, JsonFormatter)]
    assert ours == [handler]
    assert logging.getLogger().level == logging.DEBUG
    with bound_request_id("rid-1"):
        logging.getLogger("voucher.gateway").debug("decided", extra={"op": "redeem"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["request_id"] == "rid-1" and doc["op"] == "redeem" and doc["level"] == "DEBUG"


def test_configure_json_logging_replaces_basic_config(root_logging: None) -> None:
    import sys

    root = logging.getLogger()
    plain = logging.StreamHandler(sys.stderr)
    root.addHandler(plain)
    configure_json_logging("WARNING", stream=io.StringIO())
    assert plain not in root.handlers
    assert root.level == logging.WARNING


# --- request ids ------------------------------------------------------------------------


def test_accept_request_id_keeps_good_ids_and_replaces_bad_ones() -> None:
    assert accept_request_id("test-123") == "test-123"
    assert accept_request_id("a.b:c/d_e=f+g@h~i") == "a.b:c/d_e=f+g@h~i"
    for bad in (None, "", "has space", "new\nline", "x" * 129, "caf\u00e9"):
        fresh = accept_request_id(bad)
        assert fresh != bad and len(fresh) == 24 and int(fresh, 16) >= 0
    assert new_request_id() != new_request_id()


def test_request_id_context_is_per_task() -> None:
    async def handler(rid: str, seen: dict[str, str | None]) -> None:
        with bound_request_id(rid):
            await asyncio.sleep(0.01)  # interleave with the other handlers
            seen[rid] = current_request_id()

    async def main() -> dict[str, str | None]:
        seen: dict[str, str | None] = {}
        await asyncio.gather(*[handler(f"r{i}", seen) for i in range(5)])
        return seen

    seen = asyncio.run(main())
    assert seen == {f"r{i}": f"r{i}" for i in range(5)}
    assert current_request_id() is None


async def _asgi(app: Any, headers: list[tuple[bytes, bytes]]) -> tuple[list[Any], Any]:
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await app({"type": "http", "headers": headers}, receive, send)
    return sent, request_id_var.get()


def _echo_app(seen: list[str | None]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(current_request_id())
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def test_middleware_echoes_the_client_id_and_binds_it_for_the_app() -> None:
    seen: list[str | None] = []
    app = RequestIdMiddleware(_echo_app(seen))
    sent, after = asyncio.run(_asgi(app, [(b"x-request-id", b"test-123")]))
    start = sent[0]
    assert (b"x-request-id", b"test-123") in start["headers"]
    assert (b"content-type", b"text/plain") in start["headers"]
    assert seen == ["test-123"]
    assert after is None  # reset once the request is done


def test_middleware_makes_an_id_when_there_is_none_or_a_bad_one() -> None:
    for headers in ([], [(b"x-request-id", b"bad id with spaces")]):
        seen: list[str | None] = []
        sent, _ = asyncio.run(_asgi(RequestIdMiddleware(_echo_app(seen)), headers))
        echoed = [v for k, v in sent[0]["headers"] if k == REQUEST_ID_HEADER.lower().encode()]
        assert len(echoed) == 1
        assert echoed[0].decode() == seen[0] and len(seen[0] or "") == 24


# --- request ids through the micro-batcher --------------------------------------------------


class _Method:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str | None] | None]] = []

    def remote(self, blob: bytes, request_ids: list[str | None] | None = None) -> Any:
        reqs = _reqs.decode(blob)
        self.calls.append(([r.code for r in reqs], request_ids))

        async def answer() -> bytes:
            await asyncio.sleep(0.001)
            return _enc.encode([Outcome(rejection=Rejection("echo", r.code)) for r in reqs])

        return answer()


class _Shard:
    def __init__(self) -> None:
        self.redeem_many = _Method()


class _Engine:
    def __init__(self) -> None:
        self.shards = [_Shard()]
        self.n = 1


def _req(code: str) -> RedeemRequest:
    return RedeemRequest(code=code, amount=100, currency="EUR")


def test_batcher_sends_each_batch_with_its_request_ids_in_order() -> None:
    engine = _Engine()

    async def one(b: MicroBatcher, code: str, rid: str) -> None:
        with bound_request_id(rid):
            await b.submit("redeem", _req(code))

    async def main() -> None:
        b = MicroBatcher(engine, max_inflight=1)
        await asyncio.gather(*[one(b, f"C{i}", f"rid-{i}") for i in range(4)])
        await b.submit("redeem", _req("EXPLICIT"), request_id="given")
        await b.close()

    asyncio.run(main())
    calls = engine.shards[0].redeem_many.calls
    assert calls[0] == (["C0", "C1", "C2", "C3"], ["rid-0", "rid-1", "rid-2", "rid-3"])
    assert calls[1] == (["EXPLICIT"], ["given"])


def test_batcher_without_ids_keeps_the_plain_call_shape() -> None:
    engine = _Engine()

    async def main() -> None:
        b = MicroBatcher(engine)
        await b.submit("redeem", _req("PLAIN"))
        await b.close()

    asyncio.run(main())
    assert engine.shards[0].redeem_many.calls == [(["PLAIN"], None)]


# --- the shard's metrics and logs ---------------------------------------------------------


def _outs() -> list[Outcome]:
    return [
        Outcome(rejection=Rejection("exhausted", "gone")),
        Outcome(validation=Validation(code="A", valid=True)),
        Outcome(validation=Validation(code="B", valid=False, error="expired")),
        Outcome(),
    ]


def test_outcome_labels_and_batch_metrics_report_the_failures() -> None:
    assert [outcome_label(o) for o in _outs()] == ["exhausted", "ok", "expired", "ok"]
    m = ShardMetrics(2)
    assert m.batch("validate", _outs()) == [(0, "exhausted"), (2, "expired")]
    assert m.batch("redeem", []) == []
    m.commit(10, 0.003, True)
    m.commit(10, 0.5, False)
    m.queues(5, 1)


def test_shard_logs_rejections_with_their_request_ids(caplog: pytest.LogCaptureFixture) -> None:
    core = ShardCore(1, 4, "postgresql://unused", Settings())
    caplog.set_level(logging.DEBUG, logger="actors.shard")
    core._observe("redeem", _outs(), ["r0", "r1", "r2", "r3"])
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    info = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(debug) == 1 and debug[0].request_ids == ["r0", "r1", "r2", "r3"]  # type: ignore[attr-defined]
    assert len(info) == 1
    assert info[0].rejections == [  # type: ignore[attr-defined]
        {"request_id": "r0", "error": "exhausted"},
        {"request_id": "r2", "error": "expired"},
    ]
    assert "gone" not in json.dumps(JsonFormatter().format(info[0]))  # no messages, no codes

    caplog.clear()
    core._observe("redeem", _outs()[:1], ["only"])
    (rec,) = [r for r in caplog.records if r.levelno == logging.INFO]
    assert json.loads(JsonFormatter().format(rec))["request_id"] == "only"

    caplog.clear()
    core._observe("redeem", _outs(), None)  # VoucherEngine callers send no ids
    (rec,) = [r for r in caplog.records if r.levelno == logging.INFO]
    assert [r["request_id"] for r in rec.rejections] == [None, None]  # type: ignore[attr-defined]


def test_shard_logs_a_failed_batch_with_its_ids(caplog: pytest.LogCaptureFixture) -> None:
    from engine import errors

    core = ShardCore(0, 1, "postgresql://unused", Settings())
    caplog.set_level(logging.INFO, logger="actors.shard")
    core._batch_failed("redeem", errors.Unavailable("down"), ["a", "b"])
    (rec,) = caplog.records
    doc = json.loads(JsonFormatter().format(rec))
    assert doc["level"] == "WARNING" and doc["error"] == "unavailable"
    assert doc["request_ids"] == ["a", "b"]


def test_write_behind_reports_each_commit_attempt() -> None:
    seen: list[tuple[int, bool]] = []
    attempts = {"n": 0}
    fatal: list[BaseException] = []

    async def persist(events: Any) -> None:
        attempts["n"] += 1
        if attempts["n"] == 2:
            raise OSError("connection lost")

    async def main() -> None:
        pending: list[Any] = []

        def drain(n: int) -> list[Any]:
            out, pending[:] = pending[:n], pending[n:]
            return out

        w = WriteBehind(
            drain=drain,
            pending=lambda: len(pending),
            persist=persist,
            on_fatal=fatal.append,
            window_s=0,
            observe=lambda n, s, ok: seen.append((n, ok)),
        )
        pending.extend(["e1", "e2"])
        await w.durable()
        pending.append("e3")
        with pytest.raises(Exception, match="reloading"):
            await w.durable()  # an unknown outcome is never retried: the shard reloads
        await w.close()

    asyncio.run(main())
    assert seen == [(2, True), (1, False)]
    assert [type(e) for e in fatal] == [OSError]


def test_write_behind_survives_a_broken_observer() -> None:
    async def persist(events: Any) -> None:
        return None

    def broken(n: int, s: float, ok: bool) -> None:
        raise RuntimeError("metrics bug")

    async def main() -> None:
        pending = ["e"]
        w = WriteBehind(
            drain=lambda n: [pending.pop()] if pending else [],
            pending=lambda: len(pending),
            persist=persist,
            on_fatal=lambda exc: None,
            window_s=0,
            observe=broken,
        )
        await asyncio.wait_for(w.durable(), 2)  # committed despite the observer
        await w.close()

    asyncio.run(main())


def test_middleware_behind_serve_binds_the_forwarded_id_without_echoing_it() -> None:
    seen: list[str | None] = []
    app = RequestIdMiddleware(_echo_app(seen), echo=False)
    sent, _ = asyncio.run(_asgi(app, [(b"x-request-id", b"serve made this one")]))
    assert seen == ["serve made this one"]
    assert all(k != b"x-request-id" for k, _ in sent[0]["headers"])
    seen.clear()
    asyncio.run(_asgi(app, [(b"x-request-id", b"y" * 500)]))
    assert seen == ["y" * 128]


def test_a_metrics_failure_never_fails_a_decided_batch(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = ShardCore(0, 1, "postgresql://unused", Settings())

    def broken(op: str, outs: Any) -> Any:
        raise ValueError("metrics bug")

    monkeypatch.setattr(core.metrics, "batch", broken)
    core._observe("redeem", _outs(), None)  # logs, does not raise
    assert any("metrics failed" in r.getMessage() for r in caplog.records)
