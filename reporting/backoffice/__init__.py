"""The back office of the reporting app: pages that create, change and look up campaigns,
codes, customers and redemptions over the engine's HTTP API (``client.BackOffice``), shown
by role (``ui.can_write`` / ``ui.can_read``). Each page module here is a Streamlit page
script that ``reporting/app.py`` registers with ``st.navigation``."""
