"""Back office: look up a customer (``GET /v1/customers/{id}``) with their redemptions, or
an order's redemptions (``GET /v1/redemptions?order_id=``)."""

from __future__ import annotations

import streamlit as st

from reporting.backoffice import ui
from reporting.client import ApiError


def main() -> None:
    ui.header("Customers and orders", "Who a customer is, and which redemptions a customer or an order made.")
    customer_tab, order_tab = st.tabs(["Customer", "Order"])
    with customer_tab:
        cust = st.text_input("Customer id", key="bo_customer_id").strip()
        if cust:
            try:
                st.json(ui.client().customer(cust), expanded=True)
            except ApiError as exc:
                if exc.status == 404 and exc.code:
                    st.warning(f"No customer {cust!r} in the customer records: {exc.detail}")
                else:
                    ui.show_problem(exc, "look up customers")
            ui.redemptions_table(f"customer {cust}", customer_id=cust)
    with order_tab:
        order = st.text_input("Order id", key="bo_order_id").strip()
        if order:
            ui.redemptions_table(f"order {order}", order_id=order)


main()
