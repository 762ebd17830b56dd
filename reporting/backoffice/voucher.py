"""Back office: look up one code (``GET /v1/vouchers/{code}``), its redemptions, and switch
it off or on or give it a window of its own (``PATCH /v1/vouchers/{code}``)."""

from __future__ import annotations

from typing import Any

import streamlit as st

from reporting.backoffice import ui
from reporting.client import ApiError


def control(v: dict[str, Any]) -> None:
    st.subheader("Control")
    api = ui.client()
    change: dict[str, Any]
    if v.get("active", True):
        st.caption("The code is on: it validates and redeems as its campaign allows.")
        label, change = "Switch off", {"active": False}
    else:
        st.caption("The code is switched off: every check-out refuses it with voucher_disabled.")
        label, change = "Switch on", {"active": True}
    if st.button(label, key="bo_voucher_toggle"):
        try:
            after = api.control_voucher(v["code"], change)
        except ApiError as exc:
            ui.show_problem(exc, "change codes")
            return
        st.session_state["bo_flash"] = f"{after['code']} is {'on' if after.get('active', True) else 'switched off'}."
        st.rerun()
    with st.form("bo-voucher-window"):
        st.caption("A window of the code's own, inside its campaign's (empty: none).")
        a, b = st.columns(2)
        starts = a.text_input("Starts at", v.get("starts_at") or "", key="bo_voucher_starts")
        ends = b.text_input("Expires at", v.get("expires_at") or "", key="bo_voucher_expires")
        go = st.form_submit_button("Save window")
    if go:
        change = {"starts_at": ui.parse_time(starts, "Starts at"), "expires_at": ui.parse_time(ends, "Expires at")}
        try:
            api.control_voucher(v["code"], change)
        except ApiError as exc:
            ui.show_problem(exc, "change codes")
            return
        st.session_state["bo_flash"] = f"{v['code']}: window saved."
        st.rerun()


def main() -> None:
    ui.header("Look up a code", "One code as its owner shard holds it, and what happened to it.")
    code = st.text_input("Code", st.query_params.get("code", ""), key="bo_voucher_code").strip()
    flash = st.session_state.pop("bo_flash", None)
    if flash:
        st.success(flash)
    if not code:
        return
    try:
        v = ui.client().voucher(code)
    except ApiError as exc:
        if exc.status == 404 and exc.code:
            st.warning(f"No code {code!r}: {exc.detail}")
        else:
            ui.show_problem(exc, "look up codes")
        return
    cols = st.columns(4)
    cols[0].metric("Status", v["status"])
    cols[1].metric("Active", "on" if v.get("active", True) else "off")
    cols[2].metric("Customer", v.get("customer_id") or "–")
    cols[3].metric("Reserved", "yes" if v.get("reserved") else "no")
    window = " – ".join(x or "…" for x in (v.get("starts_at"), v.get("expires_at")))
    st.caption(f"campaign {v['campaign_id']}" + (f" · own window {window}" if window != "… – …" else ""))
    st.json(v, expanded=False)
    if ui.can_write():
        control(v)
    st.subheader("Redemptions")
    ui.redemptions_table(f"code {code}", code=code)


main()
