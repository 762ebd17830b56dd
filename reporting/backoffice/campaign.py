"""Back office: one campaign's lifecycle (activate, pause, end) and its editing
(``PATCH /v1/campaigns/{id}`` with ``If-Match``)."""

from __future__ import annotations

from typing import Any

import streamlit as st

from reporting.backoffice import ui
from reporting.client import ApiError

MOVES = {"activate": "Activate", "pause": "Pause", "end": "End"}
ALLOWED = {"draft": ("activate", "end"), "active": ("pause", "end"), "paused": ("activate", "end"), "ended": ()}


def lifecycle(c: dict[str, Any]) -> None:
    st.subheader("Lifecycle")
    moves = ALLOWED.get(c["state"], tuple(MOVES))
    if not moves:
        st.caption("The campaign has ended; nothing more can happen to it.")
        return
    cols = st.columns(len(moves) + 1)
    sure = cols[-1].checkbox("Yes, end it for good", key="bo_end_sure") if "end" in moves else False
    for col, move in zip(cols, moves):
        if col.button(MOVES[move], key=f"bo_{move}"):
            if move == "end" and not sure:
                st.warning("Ending cannot be undone: tick the box next to the button first.")
                return
            try:
                after = ui.client().transition(c["id"], move)
            except ApiError as exc:
                ui.show_problem(exc, f"{move} campaigns")
                return
            st.session_state["bo_flash"] = f"Campaign {after['name']} is {after['state']}."
            st.rerun()


def edit_form(c: dict[str, Any], etag: str) -> None:
    """The form shows the campaign as read now; a save sends the entity tag of the version
    the user saw when the form was drawn, so a change made by someone else in between is
    refused (412) instead of overwritten."""
    st.subheader("Edit")
    if not ui.offered("PATCH", "/v1/campaigns/{campaign_id}", "edit campaigns"):
        return
    seen = st.session_state.get("bo_edit_seen")
    seen_etag = seen[1] if isinstance(seen, tuple) and seen[0] == c["id"] else etag
    st.session_state["bo_edit_seen"] = (c["id"], etag)
    limits = c.get("limits") or {}
    discount = c.get("discount") or {}
    with st.form("bo-edit-campaign"):
        name = st.text_input("Name", c["name"], key="bo_edit_name")
        ends = st.text_input("Ends at (ISO 8601; empty: never)", c.get("ends_at") or "", key="bo_edit_ends")
        a, b, d = st.columns(3)
        total = a.number_input("Redemptions in total (0: no limit)", 0, 10**12, int(limits.get("total") or 0), key="bo_edit_total")
        per = b.number_input("Per customer (0: no limit)", 0, 10**9, int(limits.get("per_customer") or 0), key="bo_edit_per")
        min_order = d.number_input("Minimum order (minor units)", 0, 10**12, int(c.get("min_order") or 0), key="bo_edit_min_order")
        value = None
        if discount:
            value = st.number_input(f"Discount value ({discount.get('kind')})", 1, 10**12, int(discount["value"]), key="bo_edit_value")
        saved = st.form_submit_button("Save changes")
    if not saved:
        return
    changes: dict[str, Any] = {}
    if name.strip() and name.strip() != c["name"]:
        changes["name"] = name.strip()
    if ends.strip() != (c.get("ends_at") or ""):
        changes["ends_at"] = ui.parse_time(ends, "Ends at")  # empty: no end
    # limits merge: send the limits that changed, null for one taken away (0)
    new_limits = {k: int(x) or None for k, x in (("total", total), ("per_customer", per))
                  if (int(x) or None) != (limits.get(k) or None)}
    if new_limits:
        changes["limits"] = new_limits
    if int(min_order) != int(c.get("min_order") or 0):
        changes["min_order"] = int(min_order)
    if value is not None and int(value) != int(discount["value"]):
        changes["discount"] = {"kind": discount["kind"], "value": int(value)}
        if discount.get("max") is not None:
            changes["discount"]["max"] = discount["max"]
    if not changes:
        st.info("Nothing changed.")
        return
    try:
        after = ui.client().edit_campaign(c["id"], changes, seen_etag)
    except ApiError as exc:
        ui.show_problem(exc, "edit campaigns")
        return
    st.session_state["bo_flash"] = f"Saved {', '.join(sorted(changes))}; version {after.get('version')}."
    st.rerun()


def main() -> None:
    ui.header("Campaign", "Activate, pause or end a campaign, and change what is safe to change.")
    cid = ui.pick_campaign("bo_campaign_pick")
    if cid is None:
        return
    flash = st.session_state.pop("bo_flash", None)
    if flash:
        st.success(flash)
    try:
        c, etag = ui.client().campaign_with_etag(cid)
    except ApiError as exc:
        ui.show_problem(exc, "read campaigns")
        return
    cols = st.columns(4)
    cols[0].metric("State", c["state"])
    cols[1].metric("Type", c["type"])
    cols[2].metric("Version", c.get("version", "–"))
    cols[3].metric("Ends", (c.get("ends_at") or "never")[:16])
    with st.expander("Everything the API holds for it"):
        st.json(c)
    lifecycle(c)
    if c["state"] != "ended":
        edit_form(c, etag)


main()
