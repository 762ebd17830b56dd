"""Back office: give one customer a code now (``POST /v1/campaigns/{id}/publications``) or
issue codes to a segment (``POST /v1/campaigns/{id}/issuance``, a job followed at
``GET /v1/jobs/{id}``)."""

from __future__ import annotations

from typing import Any

import streamlit as st

from reporting.backoffice import ui
from reporting.client import ApiError

CHANNELS = ("email", "sms", "push")


def publish(cid: str) -> None:
    st.subheader("Publish a code to a customer")
    if not ui.offered("POST", "/v1/campaigns/{campaign_id}/publications", "publish a code to one customer"):
        return
    with st.form("bo-publish"):
        customer = st.text_input("Customer id", key="bo_publish_customer")
        channels = st.multiselect("Also send it by (optional)", CHANNELS, key="bo_publish_channels")
        go = st.form_submit_button("Publish")
    if not go:
        return
    if not customer.strip():
        st.error("Customer id: name the customer.")
        return
    try:
        pub = ui.client().publish(cid, customer.strip(), list(channels) or None)
    except ApiError as exc:
        ui.show_problem(exc, "publish codes")
        return
    again = "" if pub.get("created", True) else " (published to them before: the same code, nothing sent again)"
    st.success(f"Customer {pub['customer_id']} has code {pub['code']}{again}.")
    sent = pub.get("deliveries") or []
    if sent:
        st.dataframe(sent, hide_index=True)


def selection_of(kind: str, tag: str, ids: str) -> dict[str, Any] | None:
    if kind == "tag":
        return {"tag": tag.strip()} if tag.strip() else None
    if kind == "listed customers":
        listed = [x.strip() for x in ids.replace(",", "\n").splitlines() if x.strip()]
        return {"customer_ids": listed} if listed else None
    return {"all": True}


def issue(cid: str) -> None:
    st.subheader("Issue to a segment")
    st.caption("Every selected customer gets a code (the same one on a re-run) and one message per consented channel.")
    with st.form("bo-issue"):
        kind = st.radio("Customers", ("tag", "listed customers", "all customers"), horizontal=True, key="bo_issue_kind")
        tag = st.text_input("Tag", key="bo_issue_tag")
        ids = st.text_area("Customer ids (one a line)", key="bo_issue_ids")
        channels = st.multiselect("Channels", CHANNELS, default=["email"], key="bo_issue_channels")
        go = st.form_submit_button("Issue")
    if not go:
        return
    selection = selection_of(kind, tag, ids)
    if selection is None:
        st.error("Name a tag or list the customers.")
        return
    if not channels:
        st.error("Channels: choose at least one.")
        return
    api = ui.client()
    try:
        job = api.issue(cid, selection, list(channels))
        job = ui.follow_job(lambda: api.job(job["id"]), job)
    except ApiError as exc:
        ui.show_problem(exc, "issue codes")
        return
    counts = job.get("counts") or {}
    if job.get("state") == "done":
        st.success(
            f"Issued to {counts.get('selected', 0):,} customers: {counts.get('assigned', 0):,} have a code "
            f"({counts.get('new_codes', 0):,} new), {counts.get('enqueued', 0):,} messages queued."
        )
    elif job.get("state") == "failed":
        st.error(f"Issuance failed: {job.get('error')}")
    else:
        st.info(f"Still issuing: {ui.job_line(job)}.")
    if counts:
        st.dataframe([{"counter": k, "value": v} for k, v in counts.items()], hide_index=True)


def main() -> None:
    ui.header("Publish and issue", "Hand codes to customers, one or a whole segment.")
    cid = ui.pick_campaign("bo_issue_pick")
    if cid is None:
        return
    publish(cid)
    issue(cid)


main()
