"""The pages in a real headless Chromium against a real server and simulator.

Pay, approve on the simulated handset, read the receipt; cancel and try again; an invalid
phone never leaves the browser; a payment nobody answers times out; the pay page on a
360 px screen. Each end state is saved under test-artifacts/screenshots/ for a person to
look at. Needs Debian's chromium (`make services` installs it); without it these tests
skip, loudly.
"""

from __future__ import annotations

import re

import pytest

from tests.helpers import HANDSET_PHONE, PAID_AT_ONCE, WAIT, Watched, shot, visible

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


@pytest.fixture
def server(live_server, simulator):
    # Time enough for a person on the handset (the test settings expire prompts in 5 s).
    live_server.sim("PATCH", "/simulator/config", json={"prompt_timeout": 60}).raise_for_status()
    return live_server


def start_payment(
    pay, server, phone=HANDSET_PHONE, query="?amount=100&accountReference=CART-12345&description=Shoes"
) -> None:
    pay.goto(f"{server.url}/pay.html{query}")
    pay.fill("#phone", phone)
    pay.click("#pay-button")
    visible(pay, "#wait-view")
    assert "Check your phone and enter your M-Pesa PIN" in pay.text_content("#wait-heading")


def open_handset(open_page, pay):
    """Follow the pay page's link to the simulated phone and wait for the prompt."""
    link = pay.locator("#handset-link")
    assert link.get_attribute("target") == "_blank"
    assert re.search(r"/handset\.html\?phone=254\d{9}$", link.get_attribute("href"))
    handset = open_page()
    handset.goto(pay.url.split("/pay.html")[0] + link.get_attribute("href"))
    visible(handset, "#prompt-view")
    return handset


def test_pay_and_approve_on_the_handset_shows_the_receipt(open_page, server):
    pay = open_page()
    pushes = []
    pay.on("request", lambda r: r.url.endswith("/stkpush") and pushes.append(r))
    start_payment(pay, server)
    assert re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", pushes[0].headers["idempotency-key"]
    )
    assert pushes[0].post_data_json == {
        "phone": "254712345678",
        "amount": 100,
        "description": "Shoes",
        "accountReference": "CART-12345",
    }
    assert pay.is_disabled("#pay-button")
    assert re.search(r"Time left to enter your PIN: [01]:\d\d", pay.text_content("#time-left"))
    shot(pay, "pay-waiting")

    handset = open_handset(open_page, pay)
    prompt = handset.text_content("#prompt-text")
    assert prompt == "Do you want to pay Ksh 100.00 to 174379 account CART-12345? Enter M-PESA PIN"
    assert "1234" in handset.text_content("#pin-hint")
    shot(handset, "handset-prompt")
    handset.fill("#pin", "1234")
    handset.click("#ok-button")
    visible(handset, "#result-view")
    receipt = handset.text_content("#result-text").split()[0]
    assert "Confirmed" in handset.text_content("#result-text")
    shot(handset, "handset-paid")

    pay.wait_for_url(re.compile(r"/confirmation\.html\?paymentId=pay_[0-9a-f]{24}$"))
    visible(pay, "#receipt-view")
    assert pay.text_content("#receipt-number") == receipt
    assert pay.text_content("#receipt-amount").replace("\xa0", " ") == "KES 100.00"
    assert pay.text_content("#receipt-phone") == "2547******78"
    assert pay.text_content("#receipt-reference") == "CART-12345"
    assert pay.text_content("#receipt-description") == "Shoes"
    assert re.fullmatch(r"\d{1,2} \w{3} 20\d\d, \d\d:\d\d", pay.text_content("#receipt-date"))
    assert pay.is_visible("#print-button")
    shot(pay, "confirmation-receipt")


def test_cancel_on_the_handset_then_try_again_gives_a_usable_form(open_page, server):
    pay = open_page()
    keys = []
    pay.on("request", lambda r: r.url.endswith("/stkpush") and keys.append(r.headers["idempotency-key"]))
    start_payment(pay, server, query="?amount=250")
    handset = open_handset(open_page, pay)
    handset.click("#cancel-button")
    visible(handset, "#result-view")
    assert "cancelled" in handset.text_content("#result-text")

    visible(pay, "#result-view")
    assert pay.text_content("#result-message") == "You cancelled the payment on your phone."
    shot(pay, "pay-cancelled")

    pay.click("#retry-button")
    visible(pay, "#form-view")
    assert pay.input_value("#phone") == HANDSET_PHONE
    assert pay.input_value("#amount") == "250"
    assert pay.is_enabled("#pay-button")
    pay.click("#pay-button")
    visible(pay, "#wait-view")
    assert len(keys) == 2 and keys[0] != keys[1], "each attempt has its own Idempotency-Key"
    handset.click("#dismiss-button")
    visible(handset, "#prompt-view")  # the second request reached the phone


def test_invalid_phone_is_explained_inline_and_nothing_is_sent(open_page, server):
    pay = open_page()
    sent = []
    pay.on("request", lambda r: "/stkpush" in r.url and sent.append(r.url))
    pay.goto(f"{server.url}/pay.html")
    pay.fill("#phone", "0123456789")  # a common example of an invalid number
    pay.fill("#amount", "100")
    pay.click("#pay-button")
    visible(pay, "#phone-error")
    assert "0712 345 678" in pay.text_content("#phone-error")
    assert pay.get_attribute("#phone", "aria-invalid") == "true"
    assert pay.is_visible("#form-view") and pay.is_enabled("#pay-button")
    shot(pay, "pay-invalid-phone")

    pay.fill("#phone", "+254 (712) 345-678")  # live: the error goes as soon as it is right
    assert pay.is_hidden("#phone-error")
    assert "0712 345 678" in pay.text_content("#phone-hint")
    pay.fill("#amount", "12.5")
    pay.click("#pay-button")
    visible(pay, "#amount-error")
    pay.wait_for_timeout(300)
    assert sent == []


def test_a_number_outside_safaricoms_ranges_is_warned_about_not_refused(open_page, server):
    pay = open_page()
    pay.goto(f"{server.url}/pay.html")
    pay.fill("#phone", "0733 123 456")  # an Airtel range: no M-Pesa prompt, unless the number was ported
    assert "does not look like a Safaricom number" in pay.text_content("#phone-hint")
    assert pay.is_hidden("#phone-error") and pay.is_enabled("#pay-button")
    shot(pay, "pay-not-safaricom")
    pay.fill("#phone", "0712 345 678")
    assert pay.text_content("#phone-hint") == "The request goes to 0712 345 678."


def test_polling_rides_out_network_trouble_quietly(open_page, server):
    pay = open_page(allow=("ERR_INTERNET_DISCONNECTED",))
    failed = []

    def drop(route):
        failed.append(route.request.url)
        route.abort("internetdisconnected")

    pay.route("**/stkpush/status/*", drop)
    start_payment(pay, server, phone=PAID_AT_ONCE, query="?amount=10")
    sync_api.expect(pay.locator("#wait-note")).to_have_text(re.compile("trouble reaching"), timeout=WAIT)
    assert pay.is_visible("#wait-view") and len(failed) == 3
    shot(pay, "pay-network-trouble")
    pay.unroute("**/stkpush/status/*")
    pay.wait_for_url(re.compile(r"/confirmation\.html"))
    visible(pay, "#receipt-view")


def test_nobody_answers_the_handset_and_the_payment_times_out(open_page, live_server_factory, simulator):
    server = live_server_factory(TRANSACTION_TTL="3")
    server.sim("PATCH", "/simulator/config", json={"prompt_timeout": 60}).raise_for_status()
    pay = open_page()
    start_payment(pay, server, phone="0798 765 432", query="?amount=75")
    visible(pay, "#result-view")
    assert pay.text_content("#result-heading") == "Payment timed out"
    assert "timed out" in pay.text_content("#result-message")
    assert pay.is_visible("#retry-button")
    shot(pay, "pay-timed-out")


def test_pay_page_fits_a_360px_screen_and_pays(browser, live_server_factory, simulator):
    server = live_server_factory(USD_TO_KES_RATE="129.5")
    context = browser.new_context(
        viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True, device_scale_factor=2
    )
    try:
        page = Watched(context.new_page())
        pay = page.page
        pay.goto(f"{server.url}/pay.html?amount=1500&description=DJ%20Kraph%20Checkout&accountReference=CART_12345")
        assert pay.get_attribute("#amount", "readonly") is not None
        assert pay.text_content("#amount-usd") == "≈ $11.58"
        assert pay.evaluate("document.documentElement.scrollWidth") <= 360
        for selector in ("#phone", "#amount", "#pay-button"):
            box = pay.locator(selector).bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= 360, selector
        pay.fill("#phone", PAID_AT_ONCE)
        shot(pay, "pay-360px-form")
        pay.click("#pay-button")
        pay.wait_for_url(re.compile(r"/confirmation\.html"))
        visible(pay, "#receipt-view")
        assert pay.evaluate("document.documentElement.scrollWidth") <= 360
        shot(pay, "confirmation-360px")
        assert not page.problems, page.problems
    finally:
        context.close()


PHONES = [
    "0712345678",
    "712345678",
    "254712345678",
    "+254712345678",
    "+254 712-345.678",
    "(0712) 345 678",
    "0110123456",
    "0101234567",
    "110123456",
    "254110123456",
    "123456789",
    "0123456789",
    "0612345678",
    "07123456789",
    "071234567",
    "255712345678",
    "+2540712345678",
    "0712 345 67a",
    "",
    "   ",
    "0712_345_678",
    "7123456789",
]
AMOUNTS = ["1", "100", "150000", "150001", "0", "", " 42 ", "12.5", "10.0", "-5", "1e3", "abc", "007"]


def test_the_pages_phone_and_amount_rules_match_the_servers(open_page, server):
    import mpesa

    page = open_page()
    page.goto(f"{server.url}/pay.html")
    results = page.evaluate(
        """async ([phones, amounts, max]) => {
            const rules = await import("/static/js/phone.js");
            return {
              phones: phones.map((p) => rules.normalisePhone(p)),
              amounts: amounts.map((a) => rules.checkAmount(a, max).value ?? null),
            };
        }""",
        [PHONES, AMOUNTS, 150_000],
    )

    def server_phone(raw):
        try:
            return mpesa.normalize_phone(raw)
        except mpesa.InvalidInput:
            return None

    def server_amount(raw):
        try:
            return mpesa.validate_amount(raw, 150_000)
        except mpesa.InvalidInput:
            return None

    assert dict(zip(PHONES, results["phones"], strict=True)) == {p: server_phone(p) for p in PHONES}
    assert dict(zip(AMOUNTS, results["amounts"], strict=True)) == {a: server_amount(a) for a in AMOUNTS}


def test_test_page_checks_the_connection_and_follows_a_test_push(open_page, server):
    page = open_page()
    page.goto(f"{server.url}/test.html")
    page.evaluate("localStorage.clear()")
    page.click("#connection-button")
    page.wait_for_selector("#connection-outcome.outcome-ok")
    assert page.text_content("#connection-mode") == "simulator"
    assert page.text_content("#connection-store") == "memory"

    page.fill("#test-phone", PAID_AT_ONCE)
    page.fill("#test-reference", "TEST-1")
    page.click("#push-button")
    # Locator waits, not wait_for_function: the CSP forbids the eval that one needs.
    sync_api.expect(page.locator("#push-answer")).to_have_text(re.compile(r"^HTTP 200"), timeout=WAIT)
    assert '"phone": "0700 000 000"' in page.text_content("#push-request")
    assert "Idempotency-Key: " in page.text_content("#push-request")
    assert '"paymentId": "pay_' in page.text_content("#push-answer")
    page.click("#refresh-button")  # the page also refreshes pending rows every 5 s
    page.wait_for_selector("#recent-rows td.status-completed")
    link = page.locator("#recent-rows a")
    assert link.get_attribute("href").startswith("/confirmation.html?paymentId=pay_")
    shot(page, "test-page")

    page.reload()  # the list lives in localStorage
    page.wait_for_selector("#recent-rows td.status-completed")


def test_confirmation_page_explains_failed_pending_and_unknown_payments(open_page, server):
    cancelled = server.post("/stkpush", json={"phone": "0700001032", "amount": 5}).json()
    waiting = server.post("/stkpush", json={"phone": "0798765432", "amount": 5}).json()
    page = open_page()

    page.goto(f"{server.url}/confirmation.html?checkoutRequestId={cancelled['checkoutRequestId']}")
    sync_api.expect(page.locator("#problem-heading")).to_have_text("This payment did not go through", timeout=WAIT)
    assert "cancelled" in page.text_content("#problem-message")
    shot(page, "confirmation-failed")

    page.goto(f"{server.url}/confirmation.html?paymentId={waiting['paymentId']}")
    visible(page, "#problem-view")
    assert page.text_content("#problem-heading") == "This payment is not finished yet"
    assert page.is_visible("#check-again") and page.is_visible("#back-link")

    page.goto(f"{server.url}/confirmation.html?checkoutRequestId=ws_CO_unknown")
    visible(page, "#problem-view")
    assert page.text_content("#problem-heading") == "Payment not found"
    shot(page, "confirmation-not-found")
