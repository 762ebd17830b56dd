"""The back office in a real browser (headless Chromium through Playwright, as the reports'
browser test): an admin logs in, creates a campaign on the "New campaign" page, and
switches one of its codes off on the "Look up a code" page; the API then refuses the code
at validation. Screenshots go to ``test-artifacts/``."""

from __future__ import annotations

import asyncio
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.engine_support import fetch, uid
from tests.http_support import admin_headers, generate_codes
from tests.integration.test_reporting_browser import (
    ARTIFACTS,
    CHROMIUM_FLAGS,
    _chromium,
    _start_app,
)
from tests.support import free_port

pytestmark = pytest.mark.integration


def first_code(dsn: str, cid: str) -> str:
    """One code of the campaign, read in a thread of its own (Playwright's sync API runs an
    event loop in this one)."""
    query = "SELECT code FROM vouchers WHERE campaign_id = $1 ORDER BY code LIMIT 1"
    with ThreadPoolExecutor(1) as pool:
        return str(pool.submit(asyncio.run, fetch(dsn, query, cid)).result()[0]["code"])


def test_browser_creates_a_campaign_and_switches_a_code_off(http_api, services, tmp_path):
    chromium = _chromium()
    from playwright.sync_api import expect, sync_playwright

    admin = admin_headers(http_api)
    name = f"Browser back office {uid('c')}"
    ARTIFACTS.mkdir(exist_ok=True)
    port = free_port()
    proc = _start_app(http_api.url, port, tmp_path / "streamlit.log")
    try:
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=chromium, headless=True,
                args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1800},
            )
            try:
                page = ctx.new_page()
                page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
                page.get_by_role("textbox", name="Email").fill(http_api.admin_email, timeout=60_000)
                page.get_by_role("textbox", name="Password").fill(http_api.admin_password)
                page.get_by_role("button", name="Log in").click()
                expect(page.get_by_text("All campaigns")).to_be_visible(timeout=60_000)
                nav = page.get_by_test_id("stSidebarNav")

                nav.get_by_text("New campaign", exact=True).click()
                expect(page.get_by_role("heading", name="New campaign")).to_be_visible(timeout=60_000)
                page.get_by_role("textbox", name="Name").fill(name)
                page.get_by_role("textbox", name="Ends at (ISO 8601, empty: never)").fill("2099-12-31T23:59:59Z")
                page.get_by_role("button", name="Create campaign").click()
                expect(page.get_by_text(f"Created campaign {name}")).to_be_visible(timeout=60_000)
                page.screenshot(path=str(ARTIFACTS / "backoffice-new-campaign.png"), full_page=True)
                listed = httpx.get(f"{http_api.url}/v1/campaigns", params={"limit": 500}, headers=admin).json()
                cid = next(c["id"] for c in listed["items"] if c["name"] == name)

                generate_codes(http_api.url, admin, cid, 10)
                httpx.post(f"{http_api.url}/v1/campaigns/{cid}/activate", headers=admin).raise_for_status()
                code = first_code(services.database_url, cid)

                nav.get_by_text("Look up a code", exact=True).click()
                expect(page.get_by_role("heading", name="Look up a code")).to_be_visible(timeout=60_000)
                box = page.get_by_role("textbox", name="Code")
                box.fill(code)
                box.press("Enter")
                off = page.get_by_role("button", name="Switch off")
                expect(off).to_be_visible(timeout=60_000)
                off.click()
                expect(page.get_by_text(f"{code} is switched off.")).to_be_visible(timeout=60_000)
                expect(page.get_by_role("button", name="Switch on")).to_be_visible(timeout=60_000)
                page.screenshot(path=str(ARTIFACTS / "backoffice-code-switched-off.png"), full_page=True)
                assert page.locator('[data-testid="stException"]').count() == 0
                assert page.locator('[data-testid="stAlertContentError"]').count() == 0
            finally:
                ctx.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()

    assert httpx.get(f"{http_api.url}/v1/vouchers/{code}", headers=admin).json()["active"] is False
    r = httpx.post(f"{http_api.url}/v1/validations", headers=admin,
                   json={"code": code, "order": {"id": uid("o"), "amount": 5000, "currency": "EUR"}})
    assert r.status_code == 200 and r.json()["reason"] == "voucher_disabled", r.text
