"""The reporting app in a real browser: headless Chromium (Debian's ``chromium`` package,
installed by ``make browser-deps``, which ``make test`` runs) driven by Playwright (its own
browser downloads are never used) loads the Streamlit app, started here as a subprocess
against the running HTTP API, logs in, opens a demo campaign and saves screenshots under
``test-artifacts/``. The page must show the campaign's name and no error box.

Where Chromium is missing and cannot be installed (not Debian, not root) the test skips
saying so, except under CI (``CI=true``), where it fails instead.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.http_support import admin_headers
from tests.integration.test_reporting_app import analyst_user, settle
from tests.support import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    why = None
    if path is None:
        debian = Path("/etc/debian_version").exists()
        root = hasattr(os, "geteuid") and os.geteuid() == 0
        why = (
            "chromium is not installed"
            + ("" if debian and root else f" and cannot be installed here ({'not Debian' if not debian else 'not root'})")
            + "; `make browser-deps` installs Debian's chromium package"
        )
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            why = "the playwright package is missing (pip install -e '.[test]')"
    if why is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"browser test cannot run under CI: {why}")
        pytest.skip(why)
    assert path is not None
    return path


def _start_app(api_url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    """The app as `voucher-engine up` and `voucher-engine reports` start it."""
    from engine.settings import Settings
    from ops.start import reports_command, reports_env

    settings = Settings(http_host="127.0.0.1", reports_port=port)
    out = log.open("wb")
    proc = subprocess.Popen(
        reports_command(settings), env=reports_env(settings, api_url),
        stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"streamlit exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).text == "ok":
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise AssertionError(f"streamlit did not come up: {log.read_text()[-2000:]}")


def test_browser_shows_a_demo_campaign_without_errors(http_api, engine, services, tmp_path):
    chromium = _chromium()
    from playwright.sync_api import expect, sync_playwright

    from ops.demo_data import create_demo_data

    made = asyncio.run(
        create_demo_data(engine, services.database_url, scale=0.05, days=5, seed=11, say=lambda s: None)
    )
    asyncio.run(settle(services.database_url))
    cid = made["campaigns"][0]
    name = httpx.get(
        f"{http_api.url}/v1/campaigns/{cid}",
        headers=admin_headers(http_api),
    ).json()["name"]
    email, password = analyst_user(http_api)

    ARTIFACTS.mkdir(exist_ok=True)
    port = free_port()
    proc = _start_app(http_api.url, port, tmp_path / "streamlit.log")
    try:
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"),  # a fresh user data dir
                executable_path=chromium,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1400, "height": 2400},
            )
            try:
                page = ctx.new_page()
                page.goto(f"http://127.0.0.1:{port}/?campaign={cid}", wait_until="domcontentloaded")
                page.get_by_role("textbox", name="Email").fill(email, timeout=60_000)
                page.get_by_role("textbox", name="Password").fill(password)
                page.get_by_role("button", name="Log in").click()
                expect(page.get_by_text("All campaigns")).to_be_visible(timeout=60_000)
                page.wait_for_function(
                    "document.querySelectorAll('[data-testid=\"stVegaLiteChart\"] canvas,"
                    " [data-testid=\"stVegaLiteChart\"] svg').length >= 1",
                    timeout=60_000,
                )
                page.wait_for_timeout(1000)
                assert page.locator('[data-testid="stException"]').count() == 0
                page.screenshot(path=str(ARTIFACTS / "reporting-overview.png"), full_page=True)

                page.get_by_test_id("stSidebar").get_by_test_id("stRadioGroup").get_by_text("Campaign", exact=True).click()
                expect(page.get_by_role("heading", name=name)).to_be_visible(timeout=60_000)
                expect(page.get_by_text("Redemptions over time")).to_be_visible()
                # wait for the charts to draw (funnel, time series, hours, segments, channels)
                page.wait_for_function(
                    "document.querySelectorAll('[data-testid=\"stVegaLiteChart\"] canvas,"
                    " [data-testid=\"stVegaLiteChart\"] svg').length >= 5",
                    timeout=60_000,
                )
                page.wait_for_timeout(1000)
                shot = ARTIFACTS / "reporting-campaign.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
                assert name in page.inner_text("body")
                assert page.locator('[data-testid="stException"]').count() == 0
                assert page.locator('[data-testid="stAlertContentError"]').count() == 0

                # the live flash-sale view refreshes itself (no click, no reload)
                page.get_by_test_id("stSidebar").get_by_test_id("stRadioGroup").get_by_text(
                    "Live flash sale", exact=True).click()
                expect(page.get_by_role("heading", name="Live: ")).to_be_visible(timeout=60_000)
                stamp = page.get_by_text("updated ")
                first = stamp.inner_text()
                page.wait_for_function(
                    "t => !document.body.innerText.includes(t)", arg=first, timeout=20_000
                )
                assert f"Live: {name}" in page.inner_text("body")  # the ?campaign= one
                page.screenshot(path=str(ARTIFACTS / "reporting-live.png"), full_page=True)
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
