"""A shop's own codes (printed, partner, legacy) brought into a campaign: one row's rules
and the streamed parser. Pure: no I/O.

A row is ``code`` and optionally ``customer_id`` (the code is then that customer's),
``expires_at`` (an ISO 8601 date-time with a time zone: the code's own end, inside its
campaign's) and ``metadata`` (a JSON object; in CSV a cell holding its JSON text). Codes
are stored normalised (:func:`engine.codes.normalize`: trimmed, upper-cased), so ``ab-1``
and ``AB-1`` are one code.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from engine import errors, metadata
from engine.codes import normalize
from engine.customers import CsvImport, FieldError, JsonLinesImport, parser_for
from engine.events import ImportedCode

FIELDS = ("code", "customer_id", "expires_at", "metadata")
MAX_CODE_LEN = 128
MAX_CUSTOMER_LEN = 128
_CODE_RE = re.compile(r"^[A-Z0-9][A-Z0-9._\-]*$")


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def check_row(raw: dict[str, Any]) -> ImportedCode | list[FieldError]:
    """One row as the code it imports, or every reason it is refused."""
    if len(raw) == 1:  # the usual row: a code alone
        only = raw.get("code")
        if isinstance(only, str):
            plain = normalize(only)
            if len(plain) <= MAX_CODE_LEN and _CODE_RE.match(plain):
                return ImportedCode(plain)
    problems: list[FieldError] = []
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        problems.append(FieldError("row", f"unknown field(s) {', '.join(unknown)}; fields are {', '.join(FIELDS)}"))
    code = raw.get("code")
    if not isinstance(code, str) or _blank(code):
        problems.append(FieldError("code", "required: a non-empty string"))
        code = None
    else:
        code = normalize(code)
        if len(code) > MAX_CODE_LEN:
            problems.append(FieldError("code", f"longer than {MAX_CODE_LEN} characters"))
        elif not _CODE_RE.match(code):
            problems.append(
                FieldError("code", "only letters, digits and . _ - are allowed, starting with a letter or digit")
            )
    customer = raw.get("customer_id")
    if _blank(customer):
        customer = None
    elif not isinstance(customer, str) or len(customer) > MAX_CUSTOMER_LEN or not customer.isprintable():
        problems.append(FieldError("customer_id", f"a printable string of at most {MAX_CUSTOMER_LEN} characters"))
        customer = None
    expires: datetime | None = None
    raw_expires = raw.get("expires_at")
    if not _blank(raw_expires):
        try:
            if not isinstance(raw_expires, str):
                raise ValueError
            expires = datetime.fromisoformat(raw_expires.strip())
        except ValueError:
            problems.append(FieldError("expires_at", "an ISO 8601 date-time, e.g. 2030-01-31T23:59:59Z"))
        else:
            if expires.tzinfo is None:
                problems.append(FieldError("expires_at", "needs a time zone, e.g. Z or +01:00"))
                expires = None
    meta: str | None = None
    raw_meta = raw.get("metadata")
    if not _blank(raw_meta):
        try:
            value = json.loads(raw_meta) if isinstance(raw_meta, str) else raw_meta
            meta = metadata.encoded(metadata.check(value))
        except ValueError:
            problems.append(FieldError("metadata", "not JSON: a JSON object is expected"))
        except errors.InvalidMetadata as exc:
            problems.append(FieldError("metadata", exc.message))
    if problems or code is None:
        return problems
    return ImportedCode(code, customer, expires, meta)


def code_parser(content_type: str | None) -> CsvImport | JsonLinesImport:
    """The streamed parser of a code import (a CSV header must name ``code``)."""
    return parser_for(content_type, FIELDS, check_row, "code", "codes")
