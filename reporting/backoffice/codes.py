"""Back office: generate a campaign's codes (a job, followed at ``GET /v1/jobs/{id}``) or
import the shop's own (``POST /v1/campaigns/{id}/vouchers/import``, with its report)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from reporting.backoffice import ui
from reporting.client import ApiError

FORMATS = {"CSV (header: code, customer_id, expires_at, metadata)": "text/csv",
           "JSON lines": "application/x-ndjson"}


def generate(cid: str) -> None:
    st.subheader("Generate codes")
    with st.form("bo-generate"):
        count = st.number_input("How many codes", 1, 50_000_000, 1000, step=1000, key="bo_gen_count")
        go = st.form_submit_button("Generate")
    if not go:
        return
    api = ui.client()
    try:
        job = api.generate(cid, int(count))
        job = ui.follow_job(lambda: api.job(job["id"]), job)
    except ApiError as exc:
        ui.show_problem(exc, "generate codes")
        return
    if job.get("state") == "done":
        st.success(f"Generated {job['generated']:,} codes (job {job['id']}).")
    elif job.get("state") == "failed":
        st.error(f"Generation failed: {job.get('error')}")
    else:
        st.info(f"Still generating: {ui.job_line(job)}. Its progress is at GET /v1/jobs/{job['id']}.")


def import_codes(cid: str) -> None:
    st.subheader("Import codes")
    st.caption("Printed, partner or legacy codes. Each refused line is listed with the reason.")
    with st.form("bo-import"):
        fmt = st.radio("Format", list(FORMATS), horizontal=True, key="bo_import_format")
        upload = st.file_uploader("File", type=["csv", "txt", "jsonl", "ndjson"], key="bo_import_file")
        pasted = st.text_area("…or paste the lines", height=150, key="bo_import_text",
                              placeholder="code,customer_id,expires_at\nPRINTED-0001,,\nPRINTED-0002,cust-7,2030-12-31T23:59:59Z")
        go = st.form_submit_button("Import")
    if not go:
        return
    data = upload.getvalue() if upload is not None else pasted.encode()
    if not data.strip():
        st.error("Choose a file or paste some lines.")
        return
    with st.spinner("Importing…"):
        try:
            report = ui.client().import_codes(cid, data, FORMATS[fmt])
        except ApiError as exc:
            ui.show_problem(exc, "import codes")
            return
    cols = st.columns(3)
    cols[0].metric("Lines read", f"{report['rows']:,}")
    cols[1].metric("Imported", f"{report['imported']:,}")
    cols[2].metric("Refused", f"{report['rejected']:,}")
    if report["rejections"]:
        st.dataframe(pd.DataFrame(report["rejections"]), hide_index=True, width="stretch")
        if report.get("rejections_truncated"):
            st.caption("Only the first refused lines are listed.")
    (st.success if not report["rejected"] else st.warning)(
        f"Imported {report['imported']:,} of {report['rows']:,} lines."
    )


def main() -> None:
    ui.header("Codes", "Generate a campaign's codes or bring in your own.")
    cid = ui.pick_campaign("bo_codes_pick")
    if cid is None:
        return
    generate(cid)
    import_codes(cid)


main()
