"""Rows of Postgres as the record endpoints show them (store/records.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from store.records import redemption_row, voucher_row

AT = datetime(2026, 12, 3, tzinfo=UTC)


def test_a_code_row_has_its_own_fields_only() -> None:
    row = {"code": "A-1", "status": 0, "customer_id": None, "active": True, "starts_at": None,
           "expires_at": None, "metadata": '{"k": 1}'}
    assert voucher_row(row) == {"code": "A-1", "status": "available", "customer_id": None, "active": True,
                                "starts_at": None, "expires_at": None, "metadata": {"k": 1}}


def test_a_redemption_row_explains_its_discount() -> None:
    row = {"id": "red_1", "campaign_id": "c", "code": "A-1", "customer_id": None, "order_id": "o",
           "order_amount": 1000, "currency": "EUR", "discount_amount": 150, "balance_after": None,
           "status": 0, "created_at": AT, "rolled_back_at": None, "metadata": None,
           "detail": '{"items": [{"line": 0, "sku": "S", "discount": 100}], "shipping_discount": 50}'}
    out = redemption_row(row)
    assert (out["items"], out["shipping_discount"]) == ([{"line": 0, "sku": "S", "discount": 100}], 50)
    assert redemption_row({**row, "detail": None})["items"] == []
