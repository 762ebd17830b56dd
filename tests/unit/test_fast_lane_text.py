"""The fast lane refuses unstorable text wherever a checkout body holds text (the order's
lines, customer tags, metadata keys and values), and scans only bodies with a JSON escape:
NUL and unpaired surrogates cannot reach a decoded string any other way."""

from __future__ import annotations

import msgspec
import pytest

from serve.checkout import decode_checkout

LINE = '{"sku":"S","product_id":"P","categories":["c"],"quantity":1,"unit_price":100}'


def _body(line: str = LINE, extra: str = "") -> bytes:
    return ('{"code":"A","customer_id":"c1","order":{"id":"o1","currency":"EUR","items":['
            + line + "]}" + extra + "}").encode()


@pytest.mark.parametrize(
    "raw",
    [
        _body(LINE.replace('"S"', '"S\\u0000"')),
        _body(LINE.replace('"P"', '"\\u0000"')),
        _body(LINE.replace('["c"]', '["c","\\u0000"]')),
        _body(extra=',"customer_tags":["vip","\\u0000"]'),
        _body(extra=',"metadata":{"k\\u0000":"v"}'),
        _body(extra=',"metadata":{"k":["\\u0000"]}'),
        b'{"code":"A\\u0000","order":{"amount":1,"currency":"EUR"}}',
    ],
)
def test_unstorable_text_anywhere_in_the_body_goes_to_the_validating_route(raw: bytes) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_checkout(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"\xed\xa0\x80",  # a surrogate as raw UTF-8 bytes
        b"a\x00b",  # a raw NUL
    ],
)
def test_raw_unstorable_bytes_never_decode(raw: bytes) -> None:
    with pytest.raises(msgspec.MsgspecError):
        decode_checkout(_body().replace(b'"S"', b'"' + raw + b'"'))


def test_escapes_of_storable_text_are_taken() -> None:
    body = decode_checkout(_body(LINE.replace('"S"', '"S\\u00e9\\n\\"x"')))
    assert body.order.items is not None and body.order.items[0].sku == 'S\u00e9\n"x'
    assert decode_checkout(_body()).order.items is not None
