"""A shop's own codes: each row's rules, the streamed CSV / JSON-lines parser, and the
shard taking imported codes into its bank (assigned ones, their own end) across a
restart."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from engine import errors
from engine.code_import import check_row, code_parser
from engine.customers import FieldError
from engine.events import ImportedCode
from tests.unit.test_pools import T0, Shop, discount_campaign, req


def test_rows_are_normalised_and_checked() -> None:
    assert check_row({"code": " ab-12 "}) == ImportedCode("AB-12")
    row = check_row(
        {"code": "P.7_x", "customer_id": "cus-1", "expires_at": "2030-01-31T23:59:59Z", "metadata": '{"batch": 7}'}
    )
    assert row == ImportedCode("P.7_X", "cus-1", datetime(2030, 1, 31, 23, 59, 59, tzinfo=UTC), '{"batch":7}')
    assert check_row({"code": "A1", "metadata": {"k": [1, 2]}, "customer_id": ""}) == ImportedCode(
        "A1", None, None, '{"k":[1,2]}'
    )


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({}, "code"),
        ({"code": "  "}, "code"),
        ({"code": "has space"}, "code"),
        ({"code": "-LEAD"}, "code"),
        ({"code": "X" * 129}, "code"),
        ({"code": "A1", "expires_at": "tomorrow"}, "expires_at"),
        ({"code": "A1", "expires_at": "2030-01-01T00:00:00"}, "expires_at"),
        ({"code": "A1", "metadata": "{not json"}, "metadata"),
        ({"code": "A1", "metadata": "[1]"}, "metadata"),
        ({"code": "A1", "metadata": {"k": "v" * 5000}}, "metadata"),
        ({"code": "A1", "colour": "red"}, "row"),
        ({"code": "A1", "customer_id": "a\x01b"}, "customer_id"),
    ],
)
def test_bad_rows_say_which_field(raw: dict[str, object], field: str) -> None:
    out = check_row(raw)
    assert isinstance(out, list) and field in [p.field for p in out], out


def test_csv_and_json_lines_stream() -> None:
    p = code_parser("text/csv; charset=utf-8")
    rows = p.feed(b"code,customer_id,metadata\nAA1,,\nBB2,cus-2,\"{\"\"a\"\": 1}\"\n")
    rows += p.feed(b"bad code,,\nCC3")
    rows += p.finish()
    assert [line for line, _ in rows] == [2, 3, 4, 5]
    assert rows[1][1] == ImportedCode("BB2", "cus-2", None, '{"a":1}')
    assert isinstance(rows[2][1], list) and rows[2][1][0] == FieldError("code", rows[2][1][0].reason)
    j = code_parser("application/x-ndjson")
    out = j.feed(b'{"code": "dd4", "metadata": {"x": true}}\n[1]\n') + j.finish()
    assert out[0] == (1, ImportedCode("DD4", None, None, '{"x":true}')) and isinstance(out[1][1], list)
    with pytest.raises(errors.InvalidInput, match="'code'"):
        code_parser("text/csv").feed(b"customer_id\nx\n")
    with pytest.raises(errors.UnsupportedMediaType):
        code_parser("application/json")


def test_the_shard_takes_imported_codes_and_keeps_them_after_a_restart() -> None:
    shop = Shop()
    shop.install(discount_campaign(), ["GEN-1"])
    rows = [
        ImportedCode("IMP-1"),
        ImportedCode("IMP-2", customer_id="cus-9"),
        ImportedCode("IMP-3", expires_at=T0 + timedelta(days=1), metadata='{"p":1}'),
    ]
    fresh = shop.state.claim_new_codes([r.code for r in rows] + ["GEN-1"])
    assert fresh == ["IMP-1", "IMP-2", "IMP-3"]  # GEN-1 exists
    asyncio.run(shop.db.copy_imported("disc", rows, None))
    shop.state.admit_imported("disc", rows)
    for state in (shop.state, shop.restart()):
        assert state.voucher("IMP-2")["status"] == "assigned"
        assert state.voucher("IMP-2")["customer_id"] == "cus-9"
        assert state.assign_one("disc", "cus-9").assignment.code == "IMP-2"  # type: ignore[union-attr]
        assert state.validate(req("IMP-2", cust="someone")).error == "wrong_customer"
        assert state.validate(req("IMP-3")).valid
        assert state.stats("disc").assigned >= 1
    shop.clock.advance(days=2)
    assert shop.state.validate(req("IMP-3")).error == "voucher_expired"
    assert shop.db.metadata["IMP-3"] == '{"p":1}'
