"""The dashboard in a real headless Chromium: sign in, read the overview, find a payment by
its receipt, open its timeline, download the CSV; and the same pages on a 360 px screen.

Screenshots go to test-artifacts/screenshots/admin-*.png. Any console error (a CSP
violation included) fails the test. Skips, loudly, without Debian's chromium.
"""

from __future__ import annotations

import csv
import io
import re
import signal
import sys
import time

import pytest

from store import Transaction
from tests.helpers import CANCELLED, PAID, ServerProcess, Watched, free_port, payment, poll, shot, started, visible

TOKEN = "admin-secret-0123456789"


@pytest.fixture
def dashboard(live_server_factory):
    """A server with two real payments and a day of hand-made ones behind them."""
    live = live_server_factory(ADMIN_TOKEN=TOKEN)
    paid = payment(live, PAID, 150, accountReference="SHOP-77", description="Two tickets")
    receipt = poll(live, paid["checkoutRequestId"])["MpesaReceiptNumber"]
    poll(live, started(live, CANCELLED, 40, accountReference="SHOP-78"))
    store = live.app.extensions["store"]
    now = time.time()
    outcomes = [
        ("completed", None),
        ("completed", None),
        ("failed", "cancelled"),
        ("completed", None),
        ("failed", "insufficient_funds"),
        ("failed", "timeout"),
    ]
    for n in range(36):
        status, reason = outcomes[n % len(outcomes)]
        at = now - 1800 - n * 2300
        store.create(
            Transaction(
                f"ws_CO_demo{n:02d}",
                f"2547{n:08d}",
                50 + 25 * (n % 7),
                checkout_request_id=f"ws_CO_demo{n:02d}",
                merchant_request_id=f"m-{n}",
                status=status,
                reason=reason,
                initiated_at=at,
                completed_at=at + 6 + n % 20,
                settled_by="timeout" if reason == "timeout" else "callback",
                mpesa_receipt_number=f"QDEMO{n:05d}" if status == "completed" else None,
                account_reference=f"ORDER-{n}",
                history=[{"at": at, "event": "initiated"}, {"at": at, "event": "push_accepted"}],
            )
        )
    return live, paid["paymentId"], receipt


def test_operator_signs_in_finds_a_payment_and_exports_the_csv(browser, dashboard):
    live, payment_id, receipt = dashboard
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-KE", accept_downloads=True)
    try:
        # The wrong token on purpose: Chromium logs its 401 as an error.
        watched = Watched(context.new_page(), allow=("status of 401",))
        page = watched.page
        page.goto(f"{live.url}/admin/")
        visible(page, "#login-form")
        page.fill("#token", "not-the-token")
        page.click("#sign-in")
        visible(page, "#login-error")
        shot(page, "admin-login-wrong-token")
        page.fill("#token", TOKEN)
        page.click("#sign-in")

        visible(page, "#kpi-started")
        assert page.text_content("#kpi-started") == "38"
        assert page.text_content("#kpi-completed") == "19"
        assert page.locator("svg.chart").count() == 3
        shot(page, "admin-overview")
        page.select_option("#window", "hour")  # the script shows it without a click
        page.wait_for_url("**/admin/?window=hour")
        assert page.text_content("#kpi-started") == "3"
        shot(page, "admin-overview-hour")

        page.click("nav >> text=Transactions")
        page.fill("#q", receipt.lower())
        page.click("#filter-button")
        page.wait_for_url("**/admin/transactions?q=*")
        assert page.text_content("#result-count") == "1"
        shot(page, "admin-search-by-receipt")

        page.click(f"tr[data-id='{payment_id}'] a")
        visible(page, "#timeline")
        events = page.locator("#timeline > li").evaluate_all("items => items.map(i => i.dataset.event)")
        assert events[:2] == ["initiated", "push_accepted"]
        assert "callback_received" in events and events[-1] == "completed"
        assert page.text_content("#detail-receipt") == receipt
        page.click("#timeline summary")
        visible(page, "#timeline pre")
        shot(page, "admin-timeline")

        page.click("nav >> text=Transactions")
        page.select_option("#status", "completed")
        page.click("#filter-button")
        with page.expect_download() as download:
            page.click("#export-button")
        text = open(download.value.path(), encoding="utf-8-sig").read()
        rows = list(csv.DictReader(io.StringIO(text)))
        assert download.value.suggested_filename.endswith(".csv")
        assert len(rows) == 19 and {row["Status"] for row in rows} == {"completed"}
        mine = next(row for row in rows if row["Receipt"] == receipt)
        assert (mine["Phone"], mine["Amount (KES)"], mine["Reference"]) == ("2547******00", "150", "SHOP-77")

        page.goto(f"{live.url}/admin/")
        page.click("#reconcile-button")
        visible(page, "#reconcile-summary")
        assert "Nothing to settle" in page.text_content("#reconcile-summary")
        page.click("#sign-out")
        visible(page, "#login-form")
        page.goto(f"{live.url}/admin/transactions")
        visible(page, "#login-form")  # signed out for real
        assert not watched.problems, watched.problems
    finally:
        context.close()


def test_dashboard_fits_a_360px_screen(browser, dashboard):
    live, payment_id, _ = dashboard
    context = browser.new_context(
        viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True, locale="en-KE"
    )
    try:
        watched = Watched(context.new_page())
        page = watched.page
        page.goto(f"{live.url}/admin/login")
        page.fill("#token", TOKEN)
        page.click("#sign-in")
        visible(page, "#kpi-started")
        for path, name in (
            ("/admin/", "admin-overview-360px"),
            ("/admin/transactions", "admin-transactions-360px"),
            (f"/admin/transactions/{payment_id}", "admin-timeline-360px"),
        ):
            page.goto(live.url + path)
            # Only a wide table may scroll, inside its own box; the page itself never does.
            assert page.evaluate("document.documentElement.scrollWidth") <= 360, path
            shot(page, name)
        assert not watched.problems, watched.problems
    finally:
        context.close()


def test_the_demo_opens_the_dashboard_with_the_token_its_banner_prints(browser, tmp_path):
    port = free_port()
    settings = {"PORT": str(port), "LOG_FORMAT": "text", "STORE_URL": "memory://", "ADMIN_TOKEN": ""}
    demo = ServerProcess([sys.executable, "server.py"], settings, port, tmp_path / "demo.log")
    try:
        token = re.search(r"token for this run: (\S+)\)", demo.log_path.read_text()).group(1)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-KE")
        page = Watched(context.new_page()).page
        page.goto(f"{demo.url}/admin/")
        visible(page, "#login-form")
        page.fill("#token", token)
        page.click("#sign-in")
        visible(page, "#kpi-started")
        shot(page, "admin-demo-overview")
        context.close()
    finally:
        demo.kill(signal.SIGTERM)
