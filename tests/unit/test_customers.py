"""Customer validation, streamed CSV / JSON-lines parsing with per-row rejections, and the
issuance selection (engine.customers; pure)."""

from __future__ import annotations

from typing import Any

import pytest

from engine import errors
from engine.customers import (
    CsvImport,
    Customer,
    FieldError,
    JsonLinesImport,
    check_selection,
    parser_for,
    route,
    validate,
)


def ok(raw: dict[str, Any]) -> Customer:
    result = validate(raw)
    assert isinstance(result, Customer), result
    return result


def fields(raw: dict[str, Any]) -> dict[str, str]:
    result = validate(raw)
    assert isinstance(result, list), result
    return {p.field: p.reason for p in result}


def test_valid_customer_is_normalised() -> None:
    c = ok(
        {
            "id": " c-1 ",
            "email": "Jane.Doe@Example.COM",
            "phone": "+4915112345678",
            "locale": "pt_br",
            "time_zone": "Europe/Berlin",
            "consent_email": "yes",
            "consent_sms": False,
            "tags": "VIP; spring-2026|vip",
        }
    )
    assert c.id == "c-1"
    assert c.email == "Jane.Doe@example.com"  # the domain is case-insensitive, the local part not
    assert c.phone == "+4915112345678"
    assert c.locale == "pt-BR"
    assert c.time_zone == "Europe/Berlin"
    assert (c.consent_email, c.consent_sms, c.consent_push) == (True, False, False)
    assert c.tags == ("vip", "spring-2026")


def test_defaults_and_script_locales() -> None:
    c = ok({"id": "x"})
    assert (c.locale, c.time_zone, c.tags, c.email) == ("en", "UTC", (), None)
    assert ok({"id": "x", "locale": "zh-hant-tw"}).locale == "zh-Hant-TW"
    assert ok({"id": "x", "locale": "es-419"}).locale == "es-419"


@pytest.mark.parametrize("email", ["not-an-email", "a@b", "two@@example.com", "sp ace@example.com", "x@-bad-.com"])
def test_invalid_emails(email: str) -> None:
    assert "email" in fields({"id": "x", "email": email, "consent_email": True})


@pytest.mark.parametrize(
    "phone",
    ["015112345678", "+49 151 12345678", "+49", "+999123456789", "+1555", "+4915112345678999", "phone"],
)
def test_invalid_phones(phone: str) -> None:
    assert "phone" in fields({"id": "x", "phone": phone, "consent_sms": True})


def test_valid_phones_of_several_countries() -> None:
    for phone in ("+14155552671", "+442071838750", "+33612345678", "+819012345678"):
        assert ok({"id": "x", "phone": phone, "consent_sms": True}).phone == phone


@pytest.mark.parametrize("locale", ["english", "e", "en-", "en-USA-x", "12"])
def test_invalid_locales(locale: str) -> None:
    assert "locale" in fields({"id": "x", "locale": locale})


@pytest.mark.parametrize("tz", ["Mars/Base", "../etc/passwd", "europe/berlin", "GMT+25"])
def test_invalid_time_zones(tz: str) -> None:
    assert "time_zone" in fields({"id": "x", "time_zone": tz})


def test_consent_is_never_assumed() -> None:
    # an address without a stated consent is refused, per channel
    got = fields({"id": "x", "email": "a@example.com", "phone": "+14155552671", "push_token": "tok"})
    assert set(got) == {"consent_email", "consent_sms", "consent_push"}
    assert "required" in got["consent_email"]
    # consent values must be booleans
    assert "consent_email" in fields({"id": "x", "email": "a@example.com", "consent_email": "maybe"})
    # an explicit "no" is fine, and consent without an address is kept (no address: skipped)
    c = ok({"id": "x", "email": "a@example.com", "consent_email": "no", "consent_push": True})
    assert (c.consent_email, c.consent_push) == (False, True)


def test_id_tags_and_unknown_fields() -> None:
    assert "id" in fields({"email": "a@example.com", "consent_email": True})
    assert "id" in fields({"id": "has space"})
    assert "id" in fields({"id": "x" * 129})
    assert "tags" in fields({"id": "x", "tags": ["ok", "no spaces"]})
    assert "tags" in fields({"id": "x", "tags": [f"t{i}" for i in range(51)]})
    assert "tags" in fields({"id": "x", "tags": "a,b"})  # ',' is not a separator nor a tag char
    assert "colour" in fields({"id": "x", "colour": "red"})
    # every problem of a record is reported, not just the first
    assert set(fields({"id": "", "email": "bad", "locale": "??"})) >= {"id", "email", "locale"}


# --- streamed CSV ----------------------------------------------------------------------

CSV = (
    "\ufeffid,email,phone,consent_email,consent_sms,tags,name\r\n"
    "c1,one@example.com,+14155552671,true,true,vip,One\r\n"
    'c2,two@example.com,,yes,,"a;b","Two, ""the second""\nsecond line"\r\n'
    "c3,not-an-email,,true,,,\r\n"
    "c4,four@example.com,,,,,\r\n"
    "c5,five@example.com,,true\r\n"
    "\r\n"
    "c6,six@example.com,+4915112345678,1,0,,Six\r\n"
)


def run_csv(data: bytes, chunk: int) -> list[tuple[int, Any]]:
    p = CsvImport()
    rows = []
    for i in range(0, len(data), chunk):
        rows += p.feed(data[i : i + chunk])
    rows += p.finish()
    return rows


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 10_000])
def test_csv_rows_and_rejections_whatever_the_chunking(chunk: int) -> None:
    rows = run_csv(CSV.encode(), chunk)
    by_line = {line: r for line, r in rows}
    assert sorted(by_line) == [2, 3, 5, 6, 7, 9]  # numbered by the line a record starts on
    assert isinstance(by_line[2], Customer) and by_line[2].tags == ("vip",)
    two = by_line[3]
    assert isinstance(two, Customer)
    assert two.name == 'Two, "the second"\nsecond line' and two.tags == ("a", "b")
    assert [e.field for e in by_line[5]] == ["email"]
    assert [e.field for e in by_line[6]] == ["consent_email"]
    assert by_line[7] == [FieldError("row", "has 4 fields, the header has 7")]
    assert isinstance(by_line[9], Customer) and by_line[9].phone == "+4915112345678"


def test_csv_header_problems_refuse_the_whole_import() -> None:
    with pytest.raises(errors.InvalidInput, match="unknown CSV column"):
        run_csv(b"id,mail\nc1,a@example.com\n", 5)
    with pytest.raises(errors.InvalidInput, match="'id' column"):
        run_csv(b"email\na@example.com\n", 5)
    with pytest.raises(errors.InvalidInput, match="empty"):
        run_csv(b"", 5)
    with pytest.raises(errors.InvalidInput, match="UTF-8"):
        run_csv(b"id,na\xffme\nc1,x\n", 5)


def test_csv_bad_bytes_and_overlong_lines_are_row_rejections() -> None:
    data = b"id,name\nc1,\xff\xfe\nc2,ok\nc3," + b"x" * 70_000 + b"\nc4,fine\nc5,se\xe2\x80\xa8p\n"
    for chunk in (7, 4096, 1 << 20):
        rows = run_csv(data, chunk)
        by_line = dict(rows)
        assert sorted(by_line) == [2, 3, 4, 5, 6]
        assert "UTF-8" in by_line[2][0].reason
        assert isinstance(by_line[3], Customer)
        assert "longer than" in by_line[4][0].reason
        assert isinstance(by_line[5], Customer) and by_line[5].id == "c4"
        assert isinstance(by_line[6], Customer) and by_line[6].name == "se\u2028p"  # not a line break


def test_csv_malformed_quoting_and_unterminated_quote() -> None:
    rows = run_csv(b'id,name\nc1,"bad"quote\nc2,fine\n', 4)
    assert rows[0][0] == 2 and rows[0][1][0].field == "row" and "malformed" in rows[0][1][0].reason
    assert isinstance(rows[1][1], Customer)
    rows = run_csv(b'id,name\nc1,"never closed\nc2,x\n', 4)
    assert rows == [(2, [FieldError("row", "unterminated quoted field at the end of the file")])]


# --- streamed JSON lines ---------------------------------------------------------------


def test_json_lines_with_rejections() -> None:
    data = (
        b'\xef\xbb\xbf{"id": "j1", "email": "j1@example.com", "consent_email": true, "tags": ["x"]}\n'
        b"\n"
        b'{"id": "j2", "phone": "12345", "consent_sms": true}\n'
        b"{not json}\n"
        b"[1, 2]\n"
        b'{"id": "j5", "email": "j5@example.com"}'
    )
    for chunk in (1, 5, 1000):
        p = JsonLinesImport()
        rows = []
        for i in range(0, len(data), chunk):
            rows += p.feed(data[i : i + chunk])
        rows += p.finish()
        by_line = dict(rows)
        assert sorted(by_line) == [1, 3, 4, 5, 6]
        assert isinstance(by_line[1], Customer) and by_line[1].tags == ("x",)
        assert by_line[3][0].field == "phone"
        assert "malformed JSON" in by_line[4][0].reason
        assert "JSON object" in by_line[5][0].reason
        assert by_line[6][0].field == "consent_email"
        assert p.rows == 5


def test_json_lines_overlong_line_is_rejected_not_buffered() -> None:
    p = JsonLinesImport()
    rows = p.feed(b'{"id": "a"}\n')
    rows += p.feed(b'{"id": "' + b"x" * 70_000)
    rows += p.feed(b'"}\n{"id": "b"}\n')
    rows += p.finish()
    assert [line for line, _ in rows] == [1, 2, 3]
    assert "longer than" in rows[1][1][0].reason
    assert isinstance(rows[2][1], Customer) and rows[2][1].id == "b"


def test_parser_for_content_types() -> None:
    assert isinstance(parser_for("text/csv; charset=utf-8"), CsvImport)
    assert isinstance(parser_for("application/x-ndjson"), JsonLinesImport)
    with pytest.raises(errors.UnsupportedMediaType):
        parser_for("application/json")


# --- selection -------------------------------------------------------------------------


def test_selection_validation() -> None:
    sel, chans = check_selection({"tag": "VIP"}, ["email", "sms", "email"])
    assert sel.tag == "vip" and chans == ("email", "sms")
    sel, _ = check_selection({"customer_ids": ["a", "b", "a"]}, ["push"])
    assert sel.customer_ids == ("a", "b")
    assert check_selection({"all": True}, ["email"])[0].all
    bad = [
        ({}, ["email"]),
        ({"tag": "vip", "all": True}, ["email"]),
        ({"customer_ids": []}, ["email"]),
        ({"customer_ids": "a"}, ["email"]),
        ({"customer_ids": ["ok", "has space"]}, ["email"]),
        ({"customer_ids": [f"c{i}" for i in range(10_001)]}, ["email"]),
        ({"tag": "no spaces"}, ["email"]),
        ({"all": "yes"}, ["email"]),
        ({"segment": "x"}, ["email"]),
        ({"all": True}, []),
        ({"all": True}, ["fax"]),
        ({"all": True}, "email"),
        ("all", ["email"]),
    ]
    for selection, channels in bad:
        with pytest.raises(errors.InvalidInput):
            check_selection(selection, channels)


def test_route_counts_consent_and_address_per_channel() -> None:
    c = Customer(id="x", email="a@example.com", consent_email=True, phone="+14155552671")
    targets, no_consent, no_address = route(c, ("email", "sms", "push"))
    assert targets == [("email", "a@example.com")]
    assert (no_consent, no_address) == (1, 1)


def test_unstorable_text_is_refused_not_crashed_on() -> None:
    assert "push_token" in fields({"id": "x", "push_token": "tok\x00en", "consent_push": True})
    assert "name" in fields({"id": "x", "name": "lone \udc80 surrogate"})
    assert "id" in fields({"id": "a\udbf6"})
