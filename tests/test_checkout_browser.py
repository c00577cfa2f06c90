"""The checkout module (static/js/mpesa-checkout.js) and the pay page built on it, in Chromium.

The pay page pushes and polls through the module; the module on its own reports progress,
resolves with the outcome and stops on an AbortSignal; a pay link with items shows the cart
priced from the server's catalogue and the receipt shows the order and its tickets; a signed
link's amount is read-only and its fields reach the server untouched. Screenshots of the end
states go to test-artifacts/screenshots/.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.helpers import CHECKOUT_SECRET, PAID_AT_ONCE, ROOT, Watched, shot, signed_query, visible

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

CATALOG = ROOT / "catalog.example.json"


@pytest.fixture
def shop_server(live_server_factory, simulator):
    """A payment server selling the example catalogue, with a dollar rate to show."""
    return live_server_factory(CATALOG_FILE=str(CATALOG), USD_TO_KES_RATE="129.5")


def run_checkout(page, options: dict, abort_after_ms: int | None = None) -> dict:
    """Call startCheckout in the page; return its result and the progress reports."""
    return page.evaluate(
        """async ([options, abortAfter]) => {
            const checkout = await import("/static/js/mpesa-checkout.js");
            const progress = [];
            const controller = new AbortController();
            if (abortAfter !== null) setTimeout(() => controller.abort(), abortAfter);
            const result = await checkout.startCheckout({
              ...options, signal: controller.signal,
              onProgress: (p) => progress.push({ state: p.state, pollsLeft: p.pollsLeft,
                                                 secondsLeft: p.secondsLeft, id: p.paymentId }),
            });
            return { result, progress };
        }""",
        [options, abort_after_ms],
    )


# The module on its own.


def test_module_pays_and_reports_progress_on_the_way(open_page, live_server_factory, simulator):
    server = live_server_factory()
    page = open_page()
    requests = []
    page.on("request", lambda r: requests.append((r.method, r.url, r.headers)))
    page.goto(f"{server.url}/pay.html")
    outcome = run_checkout(
        page, {"phone": PAID_AT_ONCE, "amount": 42, "accountReference": "MOD-1", "pollInterval": 500, "maxPolls": 20}
    )
    result, progress = outcome["result"], outcome["progress"]
    assert result["status"] == "completed"
    assert result["answer"]["amount"] == 42 and result["answer"]["MpesaReceiptNumber"]
    assert result["paymentId"].startswith("pay_") and result["checkoutRequestId"].startswith("ws_CO_")
    assert result["orderId"].startswith("ord_")
    assert progress[0] == {"state": "sending", "pollsLeft": 20, "secondsLeft": 10, "id": None}
    assert progress[1]["state"] == "waiting" and progress[1]["id"] == result["paymentId"]
    push = [r for r in requests if r[1].endswith("/stkpush")]
    assert len(push) == 1 and push[0][0] == "POST"
    assert push[0][2]["content-type"] == "application/json" and push[0][2]["idempotency-key"]
    polls = [r for r in requests if "/stkpush/status/" in r[1]]
    assert polls and all(method == "GET" for method, _, _ in polls)  # simple requests: no preflight
    assert all(url.endswith(f"/stkpush/status/{result['paymentId']}") for _, url, _ in polls)


def test_module_resolves_failures_in_plain_words(open_page, live_server_factory, simulator):
    server = live_server_factory()
    page = open_page(allow=("status of 400",))
    page.goto(f"{server.url}/pay.html")
    cancelled = run_checkout(page, {"phone": "0700 001 032", "amount": 5, "pollInterval": 300})["result"]
    assert (cancelled["status"], cancelled["reason"]) == ("failed", "cancelled")
    assert cancelled["message"] == "You cancelled the payment on your phone."

    bad_phone = run_checkout(page, {"phone": "0123", "amount": 5})
    assert bad_phone["result"]["status"] == "error" and bad_phone["result"]["field"] == "phone"
    assert bad_phone["progress"] == []  # nothing was sent

    refused = run_checkout(page, {"phone": PAID_AT_ONCE, "amount": "12.5"})["result"]
    assert (refused["status"], refused["reason"], refused["field"]) == ("error", "invalid", "amount")
    assert refused["httpStatus"] == 400 and refused["message"]

    texts = page.evaluate("""async () => {
        const m = await import("/static/js/mpesa-checkout.js");
        let misuse = "";
        try { await m.startCheckout({ phone: "0712345678", amount: 5, items: [{ id: "x", quantity: 1 }] }); }
        catch (error) { misuse = error.name; }
        return { wrongPin: m.reasonText("wrong_pin"), unknown: m.reasonText("???"), misuse,
                 phone: m.normalizePhone("+254 712 345 678") };
    }""")
    assert "PIN" in texts["wrongPin"] and texts["unknown"] == "M-Pesa could not complete the payment."
    assert texts["misuse"] == "TypeError" and texts["phone"] == "254712345678"


def test_module_follows_a_push_whose_answer_was_lost_to_its_payment(open_page, live_server_factory, simulator):
    server = live_server_factory(DARAJA_TIMEOUT="0.5")
    server.get("/health?deep=1")  # the token first, so that only the push is slow
    server.sim("POST", "/simulator/faults", json={"endpoint": "stkpush", "mode": "slow", "delay": 1.5})
    page = open_page(allow=("status of 504",))
    page.goto(f"{server.url}/pay.html")
    outcome = run_checkout(page, {"phone": PAID_AT_ONCE, "amount": 64, "orderId": "CART-64", "pollInterval": 300})
    result = outcome["result"]
    assert result["status"] == "completed" and result["answer"]["MpesaReceiptNumber"]
    assert result["paymentId"].startswith("pay_") and result["orderId"] == "CART-64"
    assert result["checkoutRequestId"].startswith("ws_CO_")  # learnt from the callback, not the push
    assert outcome["progress"][1]["state"] == "waiting"


def test_module_stops_following_when_aborted(open_page, live_server_factory, simulator):
    server = live_server_factory()
    server.sim("PATCH", "/simulator/config", json={"prompt_timeout": 60}).raise_for_status()
    page = open_page()
    page.goto(f"{server.url}/pay.html")
    outcome = run_checkout(page, {"phone": "0798 765 432", "amount": 7, "pollInterval": 200}, abort_after_ms=1500)
    result = outcome["result"]
    assert (result["status"], result["reason"]) == ("cancelled", "aborted")
    assert result["paymentId"].startswith("pay_") and result["checkoutRequestId"].startswith("ws_CO_")
    states = {p["state"] for p in outcome["progress"]}
    assert states == {"sending", "waiting"}


def test_module_gives_up_after_max_polls_with_a_timeout(open_page, live_server_factory, simulator):
    server = live_server_factory()
    server.sim("PATCH", "/simulator/config", json={"prompt_timeout": 60}).raise_for_status()
    page = open_page()
    page.goto(f"{server.url}/pay.html")
    outcome = run_checkout(page, {"phone": "0798 765 432", "amount": 8, "pollInterval": 100, "maxPolls": 3})
    assert (outcome["result"]["status"], outcome["result"]["reason"]) == ("timeout", "no_answer")
    assert [p["pollsLeft"] for p in outcome["progress"]] == [3, 3, 2, 1, 0]


# The pay page.


def test_pay_page_loads_the_checkout_module_and_pays(open_page, live_server_factory, simulator):
    server = live_server_factory()
    pay = open_page()
    scripts = []
    pay.on("request", lambda r: r.resource_type == "script" and scripts.append(r.url))
    pay.goto(f"{server.url}/pay.html?amount=30")
    pay.fill("#phone", PAID_AT_ONCE)
    pay.click("#pay-button")
    pay.wait_for_url(re.compile(r"/confirmation\.html\?paymentId=pay_[0-9a-f]{24}$"))
    visible(pay, "#receipt-view")
    assert any(url.endswith("/static/js/mpesa-checkout.js") for url in scripts)
    assert pay.is_hidden("#order-items") and pay.is_hidden("#tickets")  # an amount, not an order


def test_items_in_the_link_show_the_cart_and_the_receipt_shows_the_tickets(open_page, shop_server):
    pay = open_page()
    pushes = []
    pay.on("request", lambda r: r.url.endswith("/stkpush") and pushes.append(r))
    pay.goto(f"{shop_server.url}/pay.html?items=ticket-regular:2,tshirt:1")
    sync_api.expect(pay.locator("#cart-total")).to_have_text(re.compile(r"KES\s4,200"))
    rows = pay.locator("#cart-rows tr")
    assert rows.count() == 2
    assert [c.replace("\xa0", " ") for c in rows.nth(0).locator("th, td").all_text_contents()] == [
        "Regular ticket (KES 1,500 each)",
        "2",
        "KES 3,000",
    ]
    assert [c.replace("\xa0", " ") for c in rows.nth(1).locator("th, td").all_text_contents()] == [
        "Tour T-shirt",
        "1",
        "KES 1,200",
    ]
    assert pay.text_content("#cart-usd") == "≈ $32.43"
    assert pay.locator("#amount").count() == 0  # the server prices the cart, nobody types it
    shot(pay, "pay-cart")

    pay.fill("#phone", PAID_AT_ONCE)
    pay.click("#pay-button")
    pay.wait_for_url(re.compile(r"/confirmation\.html\?paymentId=pay_[0-9a-f]{24}$"))
    assert pushes[0].post_data_json == {
        "phone": "254700000000",
        "items": [{"id": "ticket-regular", "quantity": 2}, {"id": "tshirt", "quantity": 1}],
    }
    visible(pay, "#receipt-view")
    assert re.fullmatch(r"ORD-[A-Z0-9]+", pay.text_content("#receipt-order"))
    assert pay.text_content("#receipt-amount").replace("\xa0", " ") == "KES 4,200.00"
    assert pay.locator("#order-rows tr").count() == 2
    tickets = pay.locator("#ticket-list .ticket")
    sync_api.expect(tickets).to_have_count(2)
    numbers = tickets.locator(".ticket-number").all_text_contents()
    assert all(re.fullmatch(r"TKT-[A-Z0-9]+", n) for n in numbers) and len(set(numbers)) == 2
    for n, number in enumerate(numbers):
        image = tickets.nth(n).locator("img.ticket-qr")
        assert image.get_attribute("src") == f"/tickets/{number}/qr.svg"
        assert number in image.get_attribute("alt")
        sync_api.expect(image).to_have_js_property("complete", True)
        assert image.evaluate("img => img.naturalWidth") > 0, "the QR code loaded"
    assert pay.text_content("#print-button") == "Print tickets"
    shot(pay, "confirmation-tickets")
    pay.emulate_media(media="print")
    assert pay.is_hidden("#print-button") and pay.is_hidden(".site-header")
    shot(pay, "confirmation-tickets-print")


@pytest.mark.parametrize(
    "items, says",
    [
        ("ticket-regular:0", "not valid"),
        ("ticket-regular:two", "not valid"),
        ("no-such-thing:1", "does not sell (no-such-thing)"),
    ],
)
def test_a_broken_cart_link_cannot_be_paid(open_page, shop_server, items, says):
    pay = open_page()
    pay.goto(f"{shop_server.url}/pay.html?items={items}")
    visible(pay, "#banner")
    assert says in pay.text_content("#banner")
    assert pay.is_disabled("#pay-button")


def test_a_sold_out_cart_cannot_be_paid(open_page, live_server_factory, simulator, tmp_path):
    catalog = tmp_path / "catalog.json"
    catalog.write_text(
        json.dumps({"items": [{"id": "last-seat", "name": "Last seat", "price": 10, "kind": "ticket", "capacity": 0}]})
    )
    server = live_server_factory(CATALOG_FILE=str(catalog))
    pay = open_page()
    pay.goto(f"{server.url}/pay.html?items=last-seat:1")
    sync_api.expect(pay.locator("#banner")).to_have_text("Sold out: Last seat.")
    assert pay.is_disabled("#pay-button")


def test_a_signed_links_amount_is_read_only_and_sent_as_signed(open_page, live_server_factory, simulator):
    server = live_server_factory(CHECKOUT_SECRET=CHECKOUT_SECRET)
    pay = open_page()
    pushes = []
    pay.on("request", lambda r: r.url.endswith("/stkpush") and pushes.append(r))
    query = signed_query(description="DJ Kraph  Checkout ")  # sent untouched, spaces and all
    pay.goto(f"{server.url}/pay.html{query}")
    assert pay.get_attribute("#amount", "readonly") is not None
    assert pay.input_value("#amount") == "1500"
    pay.fill("#phone", PAID_AT_ONCE)
    pay.click("#pay-button")
    pay.wait_for_url(re.compile(r"/confirmation\.html"))
    visible(pay, "#receipt-view")
    sent = pushes[0].post_data_json
    assert sent["amount"] == "1500" and sent["description"] == "DJ Kraph  Checkout "
    assert sent["signature"] and sent["expires"] and sent["accountReference"] == "CART_12345"
    assert pay.text_content("#receipt-amount").replace("\xa0", " ") == "KES 1,500.00"


def test_an_expired_signed_link_is_refused_with_the_servers_words(open_page, live_server_factory, simulator):
    server = live_server_factory(CHECKOUT_SECRET=CHECKOUT_SECRET)
    pay = open_page(allow=("status of 400",))
    pay.goto(f"{server.url}/pay.html{signed_query(expires=int(time.time()) - 60)}")
    pay.fill("#phone", PAID_AT_ONCE)
    pay.click("#pay-button")
    sync_api.expect(pay.locator("#banner")).to_have_text(
        "The checkout link has expired. Ask the shop for a new payment link."
    )
    assert pay.is_visible("#form-view") and pay.is_disabled("#pay-button")
    shot(pay, "pay-link-expired")


def test_the_cart_and_the_tickets_fit_a_360px_screen(browser, shop_server):
    context = browser.new_context(
        viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True, device_scale_factor=2
    )
    try:
        page = Watched(context.new_page())
        pay = page.page
        pay.goto(f"{shop_server.url}/pay.html?items=ticket-vip:1,ticket-regular:3,mixtape:1")
        sync_api.expect(pay.locator("#cart-total")).to_have_text(re.compile(r"KES\s9,800"))
        assert pay.evaluate("document.documentElement.scrollWidth") <= 360
        shot(pay, "pay-cart-360px")
        pay.fill("#phone", PAID_AT_ONCE)
        pay.click("#pay-button")
        pay.wait_for_url(re.compile(r"/confirmation\.html"))
        sync_api.expect(pay.locator("#ticket-list .ticket")).to_have_count(4)
        for image in pay.locator("img.ticket-qr").all():
            sync_api.expect(image).to_have_js_property("complete", True)
            assert image.evaluate("img => img.naturalWidth") > 0
        assert pay.evaluate("document.documentElement.scrollWidth") <= 360
        shot(pay, "confirmation-tickets-360px")
        assert not page.problems, page.problems
    finally:
        context.close()
