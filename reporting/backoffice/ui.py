"""What every back-office page shares: the API client of the logged-in user, roles, a
campaign picker, job progress, and problems shown as messages (never a traceback)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pandas as pd
import streamlit as st

from engine.settings import Settings
from reporting.backoffice.client import BackOffice
from reporting.client import ApiError, api_url

API_URL = api_url(Settings.from_env())

# Who may do what, as serve/auth.py PERMISSIONS says for the routes these pages call; the
# API enforces it again, the app only leaves out what a role cannot use.
WRITE_ROLES = frozenset({"admin", "manager"})
READ_ROLES = frozenset({"admin", "manager", "analyst"})

JOB_WAIT_S = 120.0
JOB_POLL_S = 0.3
FINISHED = ("done", "failed", "cancelled", "completed", "error")


def client() -> BackOffice:
    """The API as the logged-in user (one client per session: it remembers the routes)."""
    api = st.session_state.get("_bo_client")
    token = st.session_state.get("token")
    if not isinstance(api, BackOffice) or api.token != token or api.base_url != API_URL:
        api = BackOffice(API_URL, token)
        st.session_state["_bo_client"] = api
    return api


def roles() -> set[str]:
    return set(st.session_state.get("roles") or ())


def can_write() -> bool:
    return bool(roles() & WRITE_ROLES)


def can_read() -> bool:
    return bool(roles() & READ_ROLES)


def show_problem(exc: ApiError, what: str) -> None:
    """An API error as a message: an expired login sends the user back to the login, a
    route the API lacks says so, a refusal names the role."""
    if exc.status == 401:
        st.session_state.pop("token", None)
        st.warning("Your session expired; please log in again.")
        st.rerun()
    if exc.missing_endpoint:
        st.warning(f"This engine's API cannot {what} (it answered {exc.status}: {exc.detail}).")
    elif exc.status == 403:
        st.error(f"Your role may not {what}: {exc.detail}")
    elif exc.status == 412:
        st.error(f"Someone changed this in the meantime; reload and try again ({exc.detail}).")
    else:
        code = f" [{exc.code}]" if exc.code else ""
        st.error(f"The API answered {exc.status}{code}: {exc.detail}" if exc.status else exc.detail)


def offered(method: str, path: str, what: str) -> bool:
    """Whether the API has ``method path``; if not, an explanation on the page."""
    try:
        if client().offers(method, path):
            return True
    except ApiError as exc:
        show_problem(exc, "show its OpenAPI document")
        return False
    st.info(f"This engine's API cannot {what}: it has no `{method} {path}`.")
    return False


def pick_campaign(key: str, label: str = "Campaign") -> str | None:
    """A campaign chosen from the API's list; ``?campaign=`` or the last one chosen on any
    back-office page comes first."""
    try:
        items = client().campaigns()
    except ApiError as exc:
        show_problem(exc, "list campaigns")
        return None
    if not items:
        st.info("No campaigns yet.")
        return None
    names = {c["id"]: f"{c['name']} ({c['type']}, {c['state']})" for c in items}
    ids = list(names)
    wanted = st.session_state.get("bo_campaign") or st.query_params.get("campaign")
    index = ids.index(wanted) if wanted in ids else 0
    cid = st.selectbox(label, ids, index=index, format_func=lambda i: names[i], key=key)
    if cid:
        st.session_state["bo_campaign"] = cid
    return cid


def job_fraction(job: dict[str, Any]) -> float | None:
    """How far a job is, from whichever counters it carries (generation, export, issuance)."""
    for done, total in (("generated", "requested"), ("rows", "total")):
        if isinstance(job.get(done), int) and job.get(total):
            return min(1.0, job[done] / job[total])
    counts = job.get("counts")
    if isinstance(counts, dict) and counts.get("total"):
        return min(1.0, counts.get("processed", counts.get("selected", 0)) / counts["total"])
    return None


def job_line(job: dict[str, Any]) -> str:
    parts = [f"job {job.get('id')}", str(job.get("state"))]
    if isinstance(job.get("generated"), int):
        parts.append(f"{job['generated']:,} of {job['requested']:,} codes")
    if isinstance(job.get("rows"), int) and isinstance(job.get("total"), int):
        parts.append(f"{job['rows']:,} of {job['total']:,} rows")
    if job.get("rate"):
        parts.append(f"{job['rate']:,.0f}/s")
    if job.get("error"):
        parts.append(f"error: {job['error']}")
    return " · ".join(parts)


def follow_job(fetch: Callable[[], dict[str, Any]], first: dict[str, Any], wait_s: float = JOB_WAIT_S) -> dict[str, Any]:
    """Show a job's progress until it finishes (or ``wait_s`` passes); its last state."""
    bar = st.progress(job_fraction(first) or 0.0, text=job_line(first))
    job = first
    deadline = time.monotonic() + wait_s
    while str(job.get("state")) not in FINISHED and time.monotonic() < deadline:
        time.sleep(JOB_POLL_S)
        job = fetch()
        bar.progress(job_fraction(job) or 0.0, text=job_line(job))
    if str(job.get("state")) in FINISHED:
        bar.progress(1.0 if job.get("state") in ("done", "completed") else job_fraction(job) or 0.0,
                     text=job_line(job))
    return job


def parse_time(text: str, field: str) -> str | None:
    """An ISO 8601 date-time with a time zone, or None for an empty field; a bad one stops
    the page with a message."""
    text = text.strip()
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        st.error(f"{field}: {text!r} is not a date-time such as 2030-12-31T23:59:59Z")
        st.stop()
    if value.tzinfo is None:
        st.error(f"{field}: give a time zone, e.g. 2030-12-31T23:59:59Z or +01:00")
        st.stop()
    return value.isoformat()


def frame(rows: list[dict[str, Any]], columns: list[str] | None = None) -> pd.DataFrame:
    """A table of API rows; nested values (metadata) shown as compact JSON."""
    flat = [{k: json.dumps(v, separators=(",", ":")) if isinstance(v, dict | list) else v for k, v in r.items()}
            for r in rows]
    out = pd.DataFrame(flat)
    if columns is None:
        return out
    known = [c for c in columns if c in out.columns] if len(out.columns) else columns
    return pd.DataFrame(flat, columns=known + [c for c in out.columns if c not in known])


def header(title: str, caption: str) -> None:
    st.header(title)
    st.caption(caption)


REDEMPTION_COLUMNS = ["id", "created_at", "code", "campaign_id", "customer_id", "order_id",
                      "order_amount", "discount_amount", "currency", "balance", "status", "rolled_back_at", "metadata"]


def redemptions_table(what: str, **filters: Any) -> None:
    """The redemptions that match ``filters`` (rolled back ones too), if the API lists them."""
    if not offered("GET", "/v1/redemptions", "list redemptions"):
        return
    try:
        page = client().redemptions(**filters, limit=1000)
    except ApiError as exc:
        show_problem(exc, "list redemptions")
        return
    rows = page.get("data") or []
    if not rows:
        st.caption(f"No redemptions of {what}.")
        return
    st.caption(f"{len(rows)} redemptions of {what}" + (" (more on later pages)" if page.get("next_cursor") else ""))
    st.dataframe(frame(rows, REDEMPTION_COLUMNS), hide_index=True, width="stretch")
