"""The reporting app (Streamlit): campaign effectiveness over the engine's HTTP API.

    streamlit run reporting/app.py          (VOUCHER_API_URL=http://127.0.0.1:8000)
    voucher-engine reports                  (the same, with the configured host and port)

Log in with a user of the engine (role analyst, manager or admin); the access token and
the user's roles stay in the session. Reports: an overview across campaigns, a campaign
page (funnel, redemptions over time, hour of day, segments, channel comparison, CSV
downloads) and a live flash-sale view that refreshes itself, all read through the reports
endpoints. Back office (``reporting/backoffice/``, pages registered with
``st.navigation``): managers and admins create, edit, pause and end campaigns, generate,
import, export and switch off codes and hand codes to customers; analysts browse codes and
look up codes, customers and orders. The app never opens the database.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from engine.settings import Settings
from reporting.backoffice import ui
from reporting.client import Api, ApiError, api_url

API_URL = api_url(Settings.from_env())

PAGES = ("Overview", "Campaign", "Live flash sale")
LIVE_EVERY_S = 2.0
STAGES = ("generated", "assigned", "delivered", "redeemed")


def money(minor: int | float | None, currency: str | None = "EUR") -> str:
    if minor is None:
        return "–"
    return f"{minor / 100:,.2f} {currency or ''}".strip()


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def duration(s: float | None) -> str:
    if s is None:
        return "–"
    s = float(s)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def api() -> Api:
    return Api(API_URL, st.session_state.get("token"))


def show_error(exc: ApiError) -> None:
    if exc.status == 401:  # the token expired: log in again
        st.session_state.pop("token", None)
        st.warning("Your session expired; please log in again.")
        st.rerun()
    st.error(f"The API answered {exc.status}: {exc.detail}" if exc.status else exc.detail)


# --- login -------------------------------------------------------------------------------


def login_page() -> None:
    st.title("Voucher engine reports")
    st.caption(f"API: {API_URL}")
    with st.form("login"):
        email = st.text_input("Email", key="email")
        password = st.text_input("Password", type="password", key="password")
        submitted = st.form_submit_button("Log in")
    if submitted:
        try:
            token = Api(API_URL).login(email.strip(), password)
        except ApiError as exc:
            st.error(f"Login failed: {exc.detail}")
            return
        st.session_state["token"] = token
        st.session_state["user"] = email.strip()
        try:
            st.session_state["roles"] = list(Api(API_URL, token).me().get("roles") or ())
        except ApiError:
            st.session_state["roles"] = []
        st.rerun()


# --- overview ----------------------------------------------------------------------------


def overview_page(data: dict[str, Any]) -> None:
    st.header("All campaigns")
    t = data["totals"]
    cols = st.columns(4)
    cols[0].metric("Campaigns", data["campaigns"])
    cols[1].metric("Net redemptions", f"{t['net_redemptions']:,}")
    by = sorted(t["by_currency"].items(), key=lambda kv: -kv[1]["order_amount"])
    cols[2].metric("Discount given", " · ".join(money(v["discount"], c) for c, v in by) or "–")
    cols[3].metric("Order value influenced", " · ".join(money(v["order_amount"], c) for c, v in by) or "–")
    if not data["rows"]:
        st.info("No campaigns yet. `voucher-engine demo-data` creates some.")
        return
    top = pd.DataFrame(data["top"])
    st.subheader("Top campaigns by net redemptions")
    chart = (
        alt.Chart(top)
        .mark_bar()
        .encode(
            x=alt.X("net_redemptions:Q", title="net redemptions"),
            y=alt.Y("name:N", sort="-x", title=None),
            color=alt.Color("type:N", title="type"),
            tooltip=["name", "type", "state", "net_redemptions", "discount", "order_amount"],
        )
    )
    st.altair_chart(chart, width="stretch")
    st.subheader("Every campaign")
    table = pd.DataFrame(data["rows"])[
        ["name", "type", "state", "generated", "assigned", "delivered", "net_redemptions",
         "rolled_back", "discount", "order_amount", "id"]
    ]
    st.dataframe(table, hide_index=True, width="stretch")
    st.download_button(
        "Download CSV", api().csv("/v1/reports/campaigns"), "campaigns.csv", "text/csv",
        key="dl-overview",
    )


# --- one campaign ------------------------------------------------------------------------


def funnel_frame(funnel: dict[str, Any]) -> pd.DataFrame:
    rows = [{"stage": s, "count": funnel[s]} for s in STAGES if funnel.get(s) is not None]
    return pd.DataFrame(rows, columns=["stage", "count"])


def campaign_page(cid: str) -> None:
    client = api()
    rep = client.campaign(cid)
    c = rep["campaign"]
    st.header(c["name"])
    st.caption(f"{c['type']} · {c['state']} · {c['currency']} · time zone {c['timezone']} · id {c['id']}")

    f = rep["funnel"]
    cols = st.columns(4)
    for col, stage in zip(cols, STAGES):
        v = f.get(stage)
        col.metric(stage.capitalize(), "–" if v is None else f"{v:,}")

    st.subheader("Funnel")
    ff = funnel_frame(f)
    chart = (
        alt.Chart(ff)
        .mark_bar()
        .encode(
            y=alt.Y("stage:N", sort=list(STAGES), title=None),
            x=alt.X("count:Q", title="codes / messages / redemptions"),
            tooltip=["stage", "count"],
        )
    )
    st.altair_chart(chart + chart.mark_text(align="left", dx=3).encode(text="count:Q"),
                    width="stretch")

    r, m = rep["rates"], rep["money"]
    cols = st.columns(4)
    cols[0].metric("Redemption rate", pct(r["redemption_rate"]))
    cols[1].metric("Rollback rate", pct(r["rollback_rate"]))
    cols[2].metric("Time to first redemption", duration(rep["time_to_first_redemption_s"]))
    cols[3].metric("Rolled back", f"{rep['redemptions']['rolled_back']:,}")
    cols = st.columns(4)
    cols[0].metric("Discount given", money(m["discount_given"], c["currency"]))
    cols[1].metric("Order value influenced", money(m["order_value_influenced"], c["currency"]))
    cols[2].metric("Average order", money(m["average_order"], c["currency"]))
    if m["gift_balance_outstanding"] is not None:
        cols[3].metric("Gift balance outstanding", money(m["gift_balance_outstanding"], c["currency"]))

    st.subheader("Redemptions over time")
    bucket = st.radio("Bucket", ("minute", "hour", "day"), index=1, horizontal=True, key="bucket")
    ts = client.timeseries(cid, bucket)
    frame = pd.DataFrame(ts["rows"])
    total = int(frame["redemptions"].sum()) if len(frame) else 0
    st.caption(
        f"{total:,} redemptions in {len(frame)} {bucket} buckets ({ts['timezone']} time)"
    )
    if len(frame):
        frame["time"] = [datetime.fromisoformat(x).replace(tzinfo=None) for x in frame["local"]]
        long = frame.melt(
            id_vars=["time"], value_vars=["net_redemptions", "rolled_back"],
            var_name="series", value_name="count",
        )
        st.altair_chart(
            alt.Chart(long)
            .mark_area(opacity=0.7, interpolate="step-after")
            .encode(
                x=alt.X("time:T", title=f"local time ({ts['timezone']})"),
                y=alt.Y("count:Q", stack=True, title="redemptions"),
                color=alt.Color("series:N", title=None),
                tooltip=["time:T", "series", "count"],
            ),
            width="stretch",
        )

    left, right = st.columns(2)
    with left:
        st.subheader("By hour of day")
        hours = pd.DataFrame(client.hours(cid)["rows"])
        st.altair_chart(
            alt.Chart(hours).mark_bar().encode(
                x=alt.X("hour:O", title=f"hour ({c['timezone']})"),
                y=alt.Y("net_redemptions:Q", title="net redemptions"),
                tooltip=["hour", "net_redemptions", "discount"],
            ),
            width="stretch",
        )
    with right:
        st.subheader("By customer segment")
        segs = pd.DataFrame(client.segments(cid)["rows"])
        if len(segs):
            st.altair_chart(
                alt.Chart(segs).mark_bar().encode(
                    x=alt.X("net_redemptions:Q", title="net redemptions"),
                    y=alt.Y("segment:N", sort="-x", title=None),
                    tooltip=["segment", "net_redemptions", "discount", "order_amount"],
                ),
                width="stretch",
            )
        else:
            st.caption("No redemptions yet.")

    st.subheader("Channel comparison")
    ch = pd.DataFrame(rep["channels"])
    if len(ch):
        long = ch.melt(id_vars=["channel"], value_vars=["sent", "failed", "dead", "queued"],
                       var_name="state", value_name="messages")
        a, b = st.columns(2)
        a.altair_chart(
            alt.Chart(long).mark_bar().encode(
                x=alt.X("channel:N", title=None),
                y=alt.Y("messages:Q", stack=True),
                color=alt.Color("state:N", sort=["sent", "failed", "dead", "queued"]),
                tooltip=["channel", "state", "messages"],
            ),
            width="stretch",
        )
        rates = ch.assign(success=[None if x is None else 100 * x for x in ch["success_rate"]])
        b.altair_chart(
            alt.Chart(rates).mark_bar().encode(
                x=alt.X("channel:N", title=None),
                y=alt.Y("success:Q", title="delivery success %", scale=alt.Scale(domain=[0, 100])),
                tooltip=["channel", "success", "sent", "failed", "dead"],
            ),
            width="stretch",
        )
    else:
        st.caption("No deliveries for this campaign.")

    st.subheader("Export")
    cols = st.columns(5)
    base = f"/v1/reports/campaigns/{cid}"
    for col, (label, path, params) in zip(
        cols,
        [
            ("Summary", base, {}),
            ("Time series", f"{base}/timeseries", {"bucket": bucket}),
            ("Hours", f"{base}/hours", {}),
            ("Segments", f"{base}/segments", {}),
            ("Channels", f"{base}/channels", {}),
        ],
    ):
        col.download_button(
            f"{label} CSV", client.csv(path, **params), f"{cid}-{label.lower().replace(' ', '-')}.csv",
            "text/csv", key=f"dl-{label}",
        )


# --- live --------------------------------------------------------------------------------


@st.fragment(run_every=LIVE_EVERY_S)
def live_panel(cid: str) -> None:
    try:
        live = api().live(cid)
    except ApiError as exc:
        show_error(exc)
        return
    history = st.session_state.setdefault("live_history", {}).setdefault(cid, [])
    history.append({"time": datetime.now(), "remaining": live["remaining"], "redemptions": live["active_redemptions"]})
    del history[:-300]
    st.header(f"Live: {live['name']}")
    cols = st.columns(4)
    rps = live["redemptions_per_second"]
    cols[0].metric("Redemptions / s", "measuring…" if rps is None else f"{rps:,.1f}")
    cols[1].metric("Remaining", "–" if live["remaining"] is None else f"{live['remaining']:,}")
    cols[2].metric("Sell-out in", duration(live["sellout_in_s"]))
    cols[3].metric("Redeemed", f"{live['active_redemptions']:,}")
    st.caption(
        f"{live['type']} · {live['state']} · limit {live['limit'] if live['limit'] is not None else 'none'}"
        f" · updated {datetime.now():%H:%M:%S}, every {LIVE_EVERY_S:.0f} s"
    )
    if len(history) > 1:
        frame = pd.DataFrame(history)
        st.altair_chart(
            alt.Chart(frame).mark_line(point=True).encode(
                x=alt.X("time:T", title=None), y=alt.Y("redemptions:Q", title="redeemed")
            ),
            width="stretch",
        )


# --- the app -----------------------------------------------------------------------------


def reports_page() -> None:
    try:
        data = api().overview(top=10)
    except ApiError as exc:
        show_error(exc)
        return
    rows = data["rows"]
    names = {r["id"]: f"{r['name']} ({r['type']})" for r in rows}
    with st.sidebar:
        page = st.radio("Page", PAGES, key="page")
        wanted = st.query_params.get("campaign")
        ids = list(names)
        if page == "Live flash sale":
            flash = [r["id"] for r in rows if r["type"] == "flash_sale"]
            ids = flash + [i for i in ids if i not in flash]
        index = ids.index(wanted) if wanted in ids else 0
        cid = st.selectbox("Campaign", ids, index=index, format_func=names.get, key=f"campaign-{page}") if ids else None
    try:
        if page == "Overview":
            overview_page(data)
        elif cid is None:
            st.info("No campaigns yet. `voucher-engine demo-data` creates some.")
        elif page == "Campaign":
            campaign_page(cid)
        else:
            live_panel(cid)
    except ApiError as exc:
        show_error(exc)


# The back office's pages (scripts in reporting/backoffice/): title, file, who sees it.
BACK_OFFICE: tuple[tuple[str, str, str, bool], ...] = (
    ("New campaign", "backoffice/new_campaign.py", ":material/add_circle:", True),
    ("Campaign", "backoffice/campaign.py", ":material/tune:", True),
    ("Codes", "backoffice/codes.py", ":material/upload:", True),
    ("Browse codes", "backoffice/browse.py", ":material/list:", False),
    ("Look up a code", "backoffice/voucher.py", ":material/search:", False),
    ("Customers and orders", "backoffice/customers.py", ":material/person_search:", False),
    ("Publish and issue", "backoffice/issue.py", ":material/send:", True),
)


def user_roles() -> set[str]:
    """The logged-in user's roles (asked once per session; the API checks them again)."""
    if "roles" not in st.session_state:
        try:
            st.session_state["roles"] = list(api().me().get("roles") or ())
        except ApiError as exc:
            show_error(exc)
            st.session_state["roles"] = []
    return set(st.session_state["roles"])


def pages_for(roles: set[str]) -> dict[str, list[Any]]:
    """The navigation a user gets: the reports, and the back-office pages of their roles
    (analysts only the read-only ones)."""
    nav: dict[str, list[Any]] = {
        "Reports": [st.Page(reports_page, title="Reports", icon=":material/monitoring:", default=True)]
    }
    writes, reads = bool(roles & ui.WRITE_ROLES), bool(roles & ui.READ_ROLES)
    office = [st.Page(path, title=title, icon=icon) for title, path, icon, write in BACK_OFFICE
              if (writes if write else reads)]
    if office:
        nav["Back office"] = office
    return nav


def main() -> None:
    st.set_page_config(page_title="Voucher reports", layout="wide")
    if not st.session_state.get("token"):
        st.navigation([st.Page(login_page, title="Log in", default=True)], position="hidden").run()
        return
    roles = user_roles()
    nav = st.navigation(pages_for(roles))
    with st.sidebar:
        st.write(f"Logged in as **{st.session_state.get('user', '')}**")
        st.caption("roles: " + (", ".join(sorted(roles)) or "none"))
        if st.button("Log out"):
            st.session_state.clear()
            st.rerun()
    nav.run()


main()
