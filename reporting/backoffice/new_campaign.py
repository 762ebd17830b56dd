"""Back office: create a campaign (``POST /v1/campaigns``)."""

from __future__ import annotations

import json
from typing import Any

import streamlit as st

from reporting.backoffice import ui
from reporting.client import ApiError

TYPES = ("discount", "gift_card", "shared_code", "flash_sale", "promotion")
KINDS = ("percent", "amount", "fixed_price", "free_units", "free_shipping")
TARGETS = ("order", "items", "cheapest_item", "shipping")


def body_from_form(v: dict[str, Any]) -> dict[str, Any]:
    """The ``POST /v1/campaigns`` body for the form's values (empty fields left out)."""
    body: dict[str, Any] = {
        "name": v["name"].strip(), "type": v["type"], "currency": v["currency"].strip().upper(),
        "timezone": v["timezone"].strip() or "UTC",
    }
    if v["type"] == "gift_card":
        body["gift_balance"] = int(v["gift_balance"])
    else:
        discount: dict[str, Any] = {"kind": v["kind"]}
        if v["kind"] != "free_shipping":
            discount["value"] = int(v["value"])
        if v.get("target", "order") != "order":
            discount["target"] = v["target"]
        body["discount"] = discount
    rules = (v.get("rules") or "").strip()
    if rules:
        try:
            body["rules"] = json.loads(rules)
        except ValueError as exc:
            raise ValueError(f"Rules: not JSON ({exc}); see docs/cart-rules.md") from None
    if v["type"] in ("shared_code", "flash_sale"):
        body["shared_code"] = v["shared_code"].strip()
    if v["min_order"]:
        body["min_order"] = int(v["min_order"])
    limits = {k: int(v[k]) for k in ("total", "per_customer") if v[k]}
    if limits:
        body["limits"] = limits
    for field in ("starts_at", "ends_at"):
        when = ui.parse_time(v[field], field)
        if when:
            body[field] = when
    if v["type"] == "promotion":
        return body  # no code: applied to every order it fits
    code = {k: v[k].strip() for k in ("prefix", "pattern") if v[k].strip()}
    if v["length"]:
        code["length"] = int(v["length"])
    if code:
        body["code"] = code
    return body


def main() -> None:
    ui.header("New campaign", "Create a campaign in draft; generate or import its codes, then activate it.")
    with st.form("bo-new-campaign"):
        a, b, c = st.columns(3)
        v: dict[str, Any] = {
            "name": a.text_input("Name", key="bo_new_name"),
            "type": b.selectbox("Type", TYPES, key="bo_new_type"),
            "currency": c.text_input("Currency", "EUR", max_chars=3, key="bo_new_currency"),
        }
        a, b, c, d = st.columns(4)
        v["kind"] = a.selectbox("Discount kind", KINDS, key="bo_new_kind")
        v["value"] = b.number_input("Discount value (percent, minor units or units)", 0, 10**12, 10, key="bo_new_value")
        v["target"] = c.selectbox("On", TARGETS, key="bo_new_target")
        v["gift_balance"] = d.number_input("Gift card balance (minor units)", 1, 10**12, 5000, key="bo_new_gift")
        v["rules"] = st.text_area(
            "Rules (JSON, optional), e.g. {\"items\": [{\"any_of\": {\"categories\": [\"shoes\"]}}]}",
            key="bo_new_rules",
        )
        a, b, c = st.columns(3)
        v["shared_code"] = a.text_input("Shared code (shared code, flash sale)", key="bo_new_shared")
        v["min_order"] = b.number_input("Minimum order (minor units)", 0, 10**12, 0, key="bo_new_min_order")
        v["timezone"] = c.text_input("Time zone", "UTC", key="bo_new_tz")
        a, b = st.columns(2)
        v["starts_at"] = a.text_input("Starts at (ISO 8601, empty: at activation)", key="bo_new_starts")
        v["ends_at"] = b.text_input("Ends at (ISO 8601, empty: never)", key="bo_new_ends")
        a, b = st.columns(2)
        v["total"] = a.number_input("Redemptions in total (0: no limit)", 0, 10**12, 0, key="bo_new_total")
        v["per_customer"] = b.number_input("Per customer (0: no limit)", 0, 10**9, 0, key="bo_new_per_customer")
        a, b, c = st.columns(3)
        v["prefix"] = a.text_input("Code prefix", key="bo_new_prefix")
        v["length"] = b.number_input("Code length (0: default)", 0, 64, 0, key="bo_new_length")
        v["pattern"] = c.text_input("Code pattern (e.g. ####-####)", key="bo_new_pattern")
        submitted = st.form_submit_button("Create campaign")
    if not submitted:
        return
    if not v["name"].strip():
        st.error("Name: give the campaign a name.")
        return
    try:
        body = body_from_form(v)
    except ValueError as exc:
        st.error(str(exc))
        return
    try:
        made = ui.client().create_campaign(body)
    except ApiError as exc:
        ui.show_problem(exc, "create campaigns")
        return
    st.session_state["bo_campaign"] = made["id"]
    st.success(f"Created campaign {made['name']} ({made['id']}), state {made['state']}.")
    with st.expander("What the API answered"):
        st.json(made)


main()
