"""Customers: validation of one record, incremental CSV / JSON-lines parsing with per-row
rejections, and the selection of an issuance. Pure: no I/O.

Rules (documented in docs/delivery.md, "Customers"):

* ``id``: 1..128 printable characters, no whitespace.
* ``email``: syntax checked by ``email-validator`` (deliverability checks off, no DNS);
  stored normalised (the domain lower-cased).
* ``phone``: E.164 (``+`` then country code and number), checked by ``phonenumbers``
  (a real numbering plan, not just a digit count); stored as E.164.
* ``locale``: BCP 47 language[-Script][-REGION] (``de``, ``de-AT``, ``zh-Hant-TW``;
  ``_`` is accepted for ``-``); stored canonical (``pt-BR``). Default ``en``.
* ``time_zone``: an IANA zone known to ``zoneinfo`` (``Europe/Berlin``). Default ``UTC``.
* consent: ``consent_email`` / ``consent_sms`` / ``consent_push`` are booleans (CSV:
  true/false, yes/no, 1/0). Consent is never assumed: a record that gives an address for a
  channel must say whether the customer consented to it (a missing consent is rejected).
* ``tags``: up to 50 segment tags, each 1..64 characters of letters, digits and ``_ . : -``
  (CSV: separated by ``;`` or ``|``); stored lower-case, deduplicated.
* ``metadata``: the shop's own JSON object (``engine.metadata``; CSV: its JSON text in a
  quoted cell). Kept as compact JSON text.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
import zoneinfo
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

import msgspec
import phonenumbers
from email_validator import EmailNotValidError, validate_email

from engine import errors, metadata
from engine.delivery import CHANNELS

FIELDS = (
    "id",
    "email",
    "phone",
    "push_token",
    "name",
    "locale",
    "time_zone",
    "consent_email",
    "consent_sms",
    "consent_push",
    "tags",
    "metadata",
)
# the address field of each channel, and its consent field
ADDRESS = {"email": "email", "sms": "phone", "push": "push_token"}
CONSENT = {"email": "consent_email", "sms": "consent_sms", "push": "consent_push"}

MAX_ID_LEN = 128
MAX_TAGS = 50
MAX_NAME_LEN = 200
MAX_PUSH_TOKEN_LEN = 4096
MAX_RECORD_BYTES = 64 * 1024  # one CSV record or JSON line at most
_ID_RE = re.compile(r"^[^\s\x00-\x1f\x7f]{1,128}$")
_TAG_RE = re.compile(r"^[a-z0-9][a-z0-9_.:\-]{0,63}$")
_LOCALE_RE = re.compile(r"^([a-zA-Z]{2,3})(?:-([a-zA-Z]{4}))?(?:-([a-zA-Z]{2}|[0-9]{3}))?$")
_TRUE = frozenset({"true", "t", "yes", "y", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "0"})


class Customer(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    email: str | None = None
    phone: str | None = None
    push_token: str | None = None
    name: str | None = None
    locale: str = "en"
    time_zone: str = "UTC"
    consent_email: bool = False
    consent_sms: bool = False
    consent_push: bool = False
    tags: tuple[str, ...] = ()
    metadata: str | None = None  # compact JSON text of a valid metadata object

    def address(self, channel: str) -> str | None:
        value: str | None = getattr(self, ADDRESS[channel])
        return value

    def consents(self, channel: str) -> bool:
        return bool(getattr(self, CONSENT[channel]))


class FieldError(msgspec.Struct, frozen=True):
    """Why one field of one record was refused."""

    field: str
    reason: str


class Rejection(msgspec.Struct, frozen=True):
    """A rejected row of an import: its line (1-based, the header is line 1 in CSV)."""

    line: int
    field: str
    reason: str


# --- single fields ---------------------------------------------------------------------


@lru_cache(maxsize=1)
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def check_email(value: str) -> str:
    try:
        info = validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(str(exc)) from None
    return str(info.normalized)


def check_phone(value: str) -> str:
    if not value.startswith("+"):
        raise ValueError("must be in E.164 form: '+', country code, number (e.g. +4915112345678)")
    digits = value[1:]
    if not digits.isdigit() or not 8 <= len(value) <= 16:
        raise ValueError("must be in E.164 form: '+' followed by 7 to 15 digits, nothing else")
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"not a phone number: {exc}") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("not a valid number in its country's numbering plan")
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def check_locale(value: str) -> str:
    m = _LOCALE_RE.match(value.replace("_", "-"))
    if m is None:
        raise ValueError("must be a BCP 47 tag: language[-Script][-REGION], e.g. en, de-AT, zh-Hant-TW")
    lang, script, region = m.groups()
    parts = [lang.lower()]
    if script:
        parts.append(script.title())
    if region:
        parts.append(region.upper())
    return "-".join(parts)


def check_time_zone(value: str) -> str:
    if value not in _zones():
        raise ValueError("must be an IANA time zone name, e.g. Europe/Berlin or UTC")
    return value


def check_tag(value: str) -> str:
    tag = value.strip().lower()
    if not _TAG_RE.match(tag):
        raise ValueError(
            f"tag {value!r} must be 1..64 characters of letters, digits and _ . : - "
            "(starting with a letter or digit)"
        )
    return tag


def check_tags(values: Any) -> tuple[str, ...]:
    if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
        raise ValueError("must be a list of strings")
    tags = list(dict.fromkeys(check_tag(v) for v in values))
    if len(tags) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags")
    return tuple(tags)


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE:
        return True
    if isinstance(value, str) and value.strip().lower() in _FALSE:
        return False
    raise ValueError("must be true or false")


# --- one record ------------------------------------------------------------------------


def _is_text(value: str) -> bool:
    """Storable text: encodes as UTF-8 (no lone surrogates) and has no NUL."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def validate(raw: dict[str, Any]) -> Customer | list[FieldError]:
    """A customer from a record (JSON object or CSV row as dict), or every reason it is
    refused. Unknown fields are refused by name."""
    problems: list[FieldError] = []
    out: dict[str, Any] = {}

    def fail(field: str, reason: str) -> None:
        problems.append(FieldError(field, reason))

    for key in raw:
        if key not in FIELDS:
            fail(str(key), f"unknown field; fields are {', '.join(FIELDS)}")
    raw = dict(raw)
    for key, value in list(raw.items()):
        if isinstance(value, str) and not _is_text(value):
            fail(str(key), "must be valid Unicode text without NUL characters")
            raw[key] = None

    cid = raw.get("id")
    if _missing(cid):
        fail("id", "is required")
    elif not isinstance(cid, str) or not _ID_RE.match(cid.strip()):
        fail("id", f"must be 1..{MAX_ID_LEN} printable characters without spaces")
    else:
        out["id"] = cid.strip()

    checks = {
        "email": check_email,
        "phone": check_phone,
        "locale": check_locale,
        "time_zone": check_time_zone,
    }
    for field, check in checks.items():
        value = raw.get(field)
        if _missing(value):
            continue
        if not isinstance(value, str):
            fail(field, "must be a string")
            continue
        try:
            out[field] = check(value.strip())
        except ValueError as exc:
            fail(field, str(exc))

    for field, limit in (("name", MAX_NAME_LEN), ("push_token", MAX_PUSH_TOKEN_LEN)):
        value = raw.get(field)
        if _missing(value):
            continue
        if not isinstance(value, str) or len(value.strip()) > limit or "\x00" in value:
            fail(field, f"must be a string of at most {limit} characters")
        else:
            out[field] = value.strip()

    for channel, field in CONSENT.items():
        value = raw.get(field)
        if _missing(value):
            if out.get(ADDRESS[channel]) is not None:
                fail(field, f"is required (true or false) when {ADDRESS[channel]} is given")
            continue
        try:
            out[field] = parse_bool(value)
        except ValueError as exc:
            fail(field, str(exc))

    tags = raw.get("tags")
    if not _missing(tags):
        if isinstance(tags, str):
            tags = [t for t in re.split(r"[;|]", tags) if t.strip()]
        try:
            out["tags"] = check_tags(tags)
        except ValueError as exc:
            fail("tags", str(exc))

    meta = raw.get("metadata")
    if not _missing(meta):
        try:
            value = json.loads(meta) if isinstance(meta, str) else meta
            out["metadata"] = metadata.encoded(metadata.check(value))
        except (ValueError, RecursionError):
            fail("metadata", "not JSON: a JSON object is expected")
        except errors.InvalidMetadata as exc:
            fail("metadata", exc.message)

    if problems:
        return problems
    return Customer(**out)


def validate_or_raise(raw: dict[str, Any]) -> Customer:
    result = validate(raw)
    if isinstance(result, list):
        raise errors.InvalidInput(
            "; ".join(f"{p.field}: {p.reason}" for p in result)
        )
    return result


# --- streamed imports ------------------------------------------------------------------


ParsedRow = tuple[int, Any]
"""(line number, the record (a Customer, ...) or the list of FieldErrors refusing it)"""
Validator = Callable[[dict[str, Any]], Any]


class CsvImport:
    """Incremental CSV parser: ``feed(chunk)`` bytes as they arrive, ``finish()`` at the end;
    each returns the rows completed so far. Holds at most one record in memory.

    The first record is the header (must name ``id``; unknown columns refuse the whole
    import with :class:`errors.InvalidInput` before any row is read). A record ends at a
    line break outside quotes (RFC 4180: ``""`` inside a quoted field is a quote), so
    quoted fields may span lines; a record is numbered by the line it starts on.
    """

    def __init__(
        self, fields: tuple[str, ...] = FIELDS, check: Validator | None = None, key: str = "id"
    ) -> None:
        """``fields``: the columns a header may name, ``key`` the one it must name;
        ``check``: a raw row to its record or its FieldErrors (customers by default)."""
        self.fields, self.check, self.key = fields, check or validate, key
        self._buf = b""  # bytes after the last line break
        self._skipping = False  # inside an overlong line, already rejected
        self._record: list[str] = []  # lines of the current, unfinished record
        self._record_len = 0
        self._quotes = 0
        self._line = 0  # lines consumed
        self._start = 1  # line the current record starts on
        self.header: list[str] | None = None
        self.rows = 0

    def feed(self, chunk: bytes) -> list[ParsedRow]:
        out: list[ParsedRow] = []
        lines = (self._buf + chunk).split(b"\n")
        self._buf = lines.pop()
        for raw in lines:
            out += self._raw_line(raw + b"\n")
        if len(self._buf) > MAX_RECORD_BYTES:
            # a line with no end in sight: refuse it now instead of buffering it
            self._buf = b""
            if not self._skipping:
                self._line += 1
                start = self._start if self._record else self._line
                self._reset()
                if self.header is None:
                    raise errors.InvalidInput(f"the CSV header is longer than {MAX_RECORD_BYTES} bytes")
                self.rows += 1
                out.append((start, [FieldError("row", f"line longer than {MAX_RECORD_BYTES} bytes")]))
                self._skipping = True
        return out

    def finish(self) -> list[ParsedRow]:
        out: list[ParsedRow] = []
        tail, self._buf = self._buf, b""
        if tail:
            out += self._raw_line(tail)
        if self._record:
            line = self._start
            self._reset()
            self.rows += 1
            out.append((line, [FieldError("row", "unterminated quoted field at the end of the file")]))
        if self.header is None:
            raise errors.InvalidInput("the CSV is empty: it needs a header line naming the columns")
        return out

    def _raw_line(self, raw: bytes) -> list[ParsedRow]:
        if self._skipping:
            self._skipping = False  # the end of the overlong line already rejected
            return []
        if self._line == 0 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._line += 1
            if self.header is None:
                raise errors.InvalidInput(f"the CSV header is not UTF-8: {exc.reason}") from None
            start = self._start if self._record else self._line
            self._reset()
            self.rows += 1
            return [(start, [FieldError("row", f"not valid UTF-8: {exc.reason}")])]
        return list(self._lines([text]))

    def _lines(self, parts: list[str]) -> Iterator[ParsedRow]:
        for line in parts:
            self._line += 1
            if not self._record:
                self._start = self._line
            self._record.append(line)
            self._record_len += len(line)
            self._quotes += line.count('"')
            if self._record_len > MAX_RECORD_BYTES:
                start = self._start
                self._reset()
                self.rows += 1
                yield start, [FieldError("row", f"record longer than {MAX_RECORD_BYTES} bytes (an unclosed quote?)")]
                continue
            if self._quotes % 2:
                continue  # inside a quoted field: the record goes on
            record, start = "".join(self._record), self._start
            self._reset()
            row = self._row(record, start)
            if row is not None:
                yield row

    def _reset(self) -> None:
        self._record = []
        self._record_len = 0
        self._quotes = 0

    def _row(self, record: str, line: int) -> ParsedRow | None:
        if not record.strip():
            return None  # blank line
        if self.header is not None:
            self.rows += 1
        try:
            body = record.rstrip("\r\n")
            if '"' in body or "\r" in body or "\n" in body:
                cells = next(csv.reader([record], strict=True))
            else:  # what csv.reader makes of a plain record, at a fraction of its cost
                cells = body.split(",")
        except (csv.Error, StopIteration) as exc:
            if self.header is None:
                raise errors.InvalidInput(f"malformed CSV header: {exc}") from None
            return line, [FieldError("row", f"malformed CSV: {exc}")]
        if self.header is None:
            header = [c.strip().lower() for c in cells]
            unknown = [h for h in header if h not in self.fields]
            if unknown:
                raise errors.InvalidInput(
                    f"unknown CSV column(s) {', '.join(map(repr, unknown))}; columns are {', '.join(self.fields)}"
                )
            if self.key not in header:
                raise errors.InvalidInput(f"the CSV header must name a {self.key!r} column")
            if len(set(header)) != len(header):
                raise errors.InvalidInput("the CSV header names a column twice")
            self.header = header
            return None
        if len(cells) != len(self.header):
            return line, [
                FieldError("row", f"has {len(cells)} fields, the header has {len(self.header)}")
            ]
        return line, self.check(dict(zip(self.header, cells, strict=True)))


class JsonLinesImport:
    """Incremental JSON-lines parser: one JSON object per line (blank lines skipped).
    Holds at most one line (up to MAX_RECORD_BYTES) in memory."""

    def __init__(self, check: Validator | None = None) -> None:
        self.check = check or validate
        self._tail = b""
        self._line = 0
        self._skipping = False  # inside an overlong line, already rejected
        self.rows = 0

    def feed(self, chunk: bytes) -> list[ParsedRow]:
        out: list[ParsedRow] = []
        lines = (self._tail + chunk).split(b"\n")
        self._tail = lines.pop()
        for raw in lines:
            if self._skipping:
                self._skipping = False  # the overlong line ends here
                continue
            row = self._row(raw)
            if row is not None:
                out.append(row)
        if len(self._tail) > MAX_RECORD_BYTES:
            if not self._skipping:
                self._line += 1
                self.rows += 1
                out.append((self._line, [FieldError("row", f"line longer than {MAX_RECORD_BYTES} bytes")]))
                self._skipping = True
            self._tail = b""
        return out

    def finish(self) -> list[ParsedRow]:
        tail, self._tail = self._tail, b""
        if self._skipping:
            return []
        row = self._row(tail)
        return [row] if row is not None else []

    def _row(self, raw: bytes) -> ParsedRow | None:
        self._line += 1
        if self._line == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        if not raw.strip():
            return None
        self.rows += 1
        try:
            obj = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            return self._line, [FieldError("row", f"malformed JSON: {exc}")]
        if not isinstance(obj, dict):
            return self._line, [FieldError("row", "each line must be a JSON object")]
        return self._line, self.check(obj)


def parser_for(
    content_type: str | None,
    fields: tuple[str, ...] = FIELDS,
    check: Validator | None = None,
    key: str = "id",
    what: str = "customers",
) -> CsvImport | JsonLinesImport:
    """The streamed parser for ``content_type`` (customers unless told otherwise)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media in ("text/csv", "application/csv"):
        return CsvImport(fields, check, key)
    if media in ("application/x-ndjson", "application/jsonl", "application/x-jsonlines"):
        return JsonLinesImport(check)
    raise errors.UnsupportedMediaType(
        f"send the {what} as text/csv or application/x-ndjson (one JSON object per line)"
    )


# --- issuance selection ----------------------------------------------------------------


MAX_SELECTED_IDS = 10_000


class Selection(msgspec.Struct, frozen=True, kw_only=True):
    """Which customers an issuance goes to: exactly one of ids, a tag, or all."""

    customer_ids: tuple[str, ...] | None = None
    tag: str | None = None
    all: bool = False

    def describe(self) -> str:
        if self.customer_ids is not None:
            return f"{len(self.customer_ids)} listed customers"
        if self.tag is not None:
            return f"customers tagged {self.tag!r}"
        return "all customers"


def check_selection(selection: Any, channels: Any) -> tuple[Selection, tuple[str, ...]]:
    """Validate an issuance request's selection and channels; raises InvalidInput."""
    if not isinstance(selection, dict):
        raise errors.InvalidInput("selection must be an object with customer_ids, tag or all")
    unknown = set(selection) - {"customer_ids", "tag", "all"}
    if unknown:
        raise errors.InvalidInput(f"unknown selection field(s): {', '.join(sorted(unknown))}")
    given = [k for k in ("customer_ids", "tag", "all") if selection.get(k) not in (None, False)]
    if len(given) != 1:
        raise errors.InvalidInput(
            "selection needs exactly one of customer_ids (a list), tag (a string) or all (true)"
        )
    sel: Selection
    if given[0] == "customer_ids":
        ids = selection["customer_ids"]
        if not isinstance(ids, list) or not ids:
            raise errors.InvalidInput("selection.customer_ids must be a non-empty list")
        if len(ids) > MAX_SELECTED_IDS:
            raise errors.InvalidInput(
                f"selection.customer_ids lists at most {MAX_SELECTED_IDS} ids; use a tag for more"
            )
        for i in ids:
            if not isinstance(i, str) or not _ID_RE.match(i):
                raise errors.InvalidInput(f"selection.customer_ids has an invalid id: {i!r}")
        sel = Selection(customer_ids=tuple(dict.fromkeys(ids)))
    elif given[0] == "tag":
        tag = selection["tag"]
        if not isinstance(tag, str):
            raise errors.InvalidInput("selection.tag must be a string")
        try:
            sel = Selection(tag=check_tag(tag))
        except ValueError as exc:
            raise errors.InvalidInput(f"selection.tag: {exc}") from None
    else:
        if selection["all"] is not True:
            raise errors.InvalidInput("selection.all must be true")
        sel = Selection(all=True)
    if not isinstance(channels, list) or not channels:
        raise errors.InvalidInput(f"channels must be a non-empty list of {', '.join(CHANNELS)}")
    for ch in channels:
        if ch not in CHANNELS:
            raise errors.InvalidInput(f"unknown channel {ch!r}; channels are {', '.join(CHANNELS)}")
    return sel, tuple(dict.fromkeys(channels))


def route(customer: Customer, channels: tuple[str, ...]) -> tuple[list[tuple[str, str]], int, int]:
    """Where a customer's message goes: ``([(channel, address)], no_consent, no_address)``
    over the requested channels."""
    out: list[tuple[str, str]] = []
    no_consent = no_address = 0
    for ch in channels:
        addr = customer.address(ch)
        if addr is None:
            no_address += 1
        elif not customer.consents(ch):
            no_consent += 1
        else:
            out.append((ch, addr))
    return out, no_consent, no_address
