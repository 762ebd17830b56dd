"""Back office: browse a campaign's codes a page at a time
(``GET /v1/campaigns/{id}/vouchers``) and export them as CSV (``POST
/v1/campaigns/{id}/exports``, then ``GET /v1/exports/{id}/download``, and
``DELETE /v1/exports/{id}`` when it is no longer needed), and find earlier exports
(``GET /v1/campaigns/{id}/exports``)."""

from __future__ import annotations

import streamlit as st

from reporting.backoffice import ui
from reporting.client import ApiError

STATUSES = ("", "available", "assigned", "redeemed", "void")
COLUMNS = ["code", "status", "customer_id", "active", "starts_at", "expires_at", "metadata"]


def counts(cid: str) -> None:
    """How many codes are in each state, from the shards' memory (every engine has this)."""
    try:
        stats = ui.client().campaign_overview(cid)["stats"]
    except ApiError as exc:
        ui.show_problem(exc, "count a campaign's codes")
        return
    cols = st.columns(5)
    for col, (label, key) in zip(cols, [("Available", "available"), ("Assigned", "assigned"),
                                        ("Redeemed", "redeemed"), ("Reserved", "held"), ("Void", "void")]):
        col.metric(label, f"{stats.get(key, 0):,}")


def browse(cid: str) -> None:
    st.subheader("Codes")
    if not ui.offered("GET", "/v1/campaigns/{campaign_id}/vouchers", "list a campaign's codes"):
        return
    a, b, c = st.columns(3)
    status = a.selectbox("Status", STATUSES, format_func=lambda s: s or "any", key="bo_browse_status")
    customer = b.text_input("Customer id", key="bo_browse_customer").strip() or None
    limit = c.selectbox("Per page", (25, 100, 500, 1000), index=1, key="bo_browse_limit")
    # the cursors of the pages before this one; a new filter starts again at the first page
    where = (cid, status, customer, limit)
    if st.session_state.get("bo_browse_where") != where:
        st.session_state["bo_browse_where"] = where
        st.session_state["bo_browse_cursors"] = [None]
    cursors: list[str | None] = st.session_state["bo_browse_cursors"]
    try:
        page = ui.client().vouchers(cid, status=status or None, customer_id=customer, limit=limit, cursor=cursors[-1])
    except ApiError as exc:
        ui.show_problem(exc, "list a campaign's codes")
        return
    rows = page.get("data") or []
    st.caption(f"Page {len(cursors)} · {len(rows)} codes" + ("" if page.get("next_cursor") else " · the last page"))
    st.dataframe(ui.frame(rows, COLUMNS), hide_index=True, width="stretch")
    left, right = st.columns(2)
    if left.button("Previous page", disabled=len(cursors) < 2, key="bo_browse_prev"):
        cursors.pop()
        st.rerun()
    if right.button("Next page", disabled=not page.get("next_cursor"), key="bo_browse_next"):
        cursors.append(page["next_cursor"])
        st.rerun()


def export(cid: str) -> None:
    st.subheader("Export")
    if not ui.offered("POST", "/v1/campaigns/{campaign_id}/exports", "export a campaign's codes"):
        return
    with st.form("bo-export"):
        status = st.selectbox("Codes", STATUSES, format_func=lambda s: s or "all", key="bo_export_status")
        go = st.form_submit_button("Export as CSV")
    done = st.session_state.get("bo_export_done")
    if go:
        api = ui.client()
        try:
            job = api.start_export(cid, status or None)
            job = ui.follow_job(lambda: api.export_job(job["id"]), job)
        except ApiError as exc:
            ui.show_problem(exc, "export a campaign's codes")
            return
        if job.get("state") not in ("done", "completed"):
            st.warning(f"The export is {job.get('state')}: {ui.job_line(job)}")
            return
        done = {"id": job["id"], "campaign_id": cid}
        st.session_state["bo_export_done"] = done
    picked = earlier(cid)
    if picked is not None:
        done = {"id": picked, "campaign_id": cid}
        st.session_state["bo_export_done"] = done
    if done and done["campaign_id"] == cid:
        try:
            data = ui.client().download_export(done["id"])
        except ApiError as exc:
            ui.show_problem(exc, "download exports")
            return
        lines = max(0, data.count(b"\n") - 1)
        st.success(f"Export {done['id']} is ready: {lines:,} codes.")
        st.download_button("Download CSV", data, f"{cid}-codes.csv", "text/csv", key="bo_export_download")
        if ui.offered("DELETE", "/v1/exports/{export_id}", "delete exports") and st.button(
            "Delete this export", key="bo_export_delete", help="the file is deleted from the engine too"
        ):
            try:
                ui.client().delete_export(done["id"])
            except ApiError as exc:
                ui.show_problem(exc, "delete exports")
                return
            st.session_state.pop("bo_export_done", None)
            st.success(f"Export {done['id']} deleted, its file with it.")


def earlier(cid: str) -> str | None:
    """The campaign's latest exports, newest first; the id of a finished one picked to
    download or delete (None: none picked)."""
    if not ui.client().offers("GET", "/v1/campaigns/{campaign_id}/exports"):
        return None
    try:
        page = ui.client().list_exports(cid)
    except ApiError as exc:
        ui.show_problem(exc, "list exports")
        return None
    rows = page.get("data") or []
    if not rows:
        return None
    st.caption("Latest exports" + (" (the 20 newest)" if page.get("next_cursor") else ""))
    st.dataframe(
        [{"id": r["id"], "state": r["state"], "codes": r.get("status") or "all",
          "rows": f"{r['rows']:,} of {r['total']:,}", "created": r["created_at"],
          "error": r.get("error") or ""} for r in rows],
        hide_index=True,
    )
    ready = [r["id"] for r in rows if r["state"] == "done"]
    if not ready:
        return None
    with st.form("bo-export-pick"):
        chosen = st.selectbox("A finished export", ready, key="bo_export_pick")
        go = st.form_submit_button("Open this export")
    return str(chosen) if go and chosen else None


def main() -> None:
    ui.header("Browse codes", "A campaign's codes as Postgres holds them, a page at a time.")
    cid = ui.pick_campaign("bo_browse_pick")
    if cid is None:
        return
    counts(cid)
    browse(cid)
    if ui.can_write():
        export(cid)


main()
