"""The example shop (examples/shop/) on its own origin, paying through the server's checkout module.

The shop's static files are served on a second loopback port; the payment server runs with
FRONTEND_URL set to the shop's origin and the example catalogue. A shopper fills a cart,
pays, approves on the simulated handset and gets the server's confirmation with the order
and its tickets' QR codes; a sold-out item cannot be bought twice; a pay link whose signed
amount was changed is refused. Screenshots go to test-artifacts/screenshots/.
"""

from __future__ import annotations

import json
import re
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.helpers import (
    CHECKOUT_SECRET,
    HANDSET_PHONE,
    PAID_AT_ONCE,
    ROOT,
    WAIT,
    free_port,
    shot,
    signed_query,
    visible,
)

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

SHOP = ROOT / "examples" / "shop"
CATALOG = ROOT / "catalog.example.json"


class ShopFiles(SimpleHTTPRequestHandler):
    """The shop's files as any static host would serve them, pointed at one payment server."""

    def __init__(self, *args, payment_server: str, **kwargs):
        self.payment_server = payment_server
        super().__init__(*args, directory=str(SHOP), **kwargs)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path.split("?")[0] not in ("/", "/index.html"):
            return super().do_GET()
        html = (SHOP / "index.html").read_text(encoding="utf-8")
        body = re.sub(r'data-server="[^"]*"', f'data-server="{self.payment_server}"', html, count=1).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def shop_factory(live_server_factory, simulator):
    """Start a payment server that trusts a shop origin, and the shop on that origin."""
    started = []

    def start(catalog=CATALOG, **env):
        port = free_port()
        origin = f"http://127.0.0.1:{port}"
        server = live_server_factory(FRONTEND_URL=origin, CATALOG_FILE=str(catalog), **env)
        # Time enough for a person on the handset (the test settings expire prompts in 5 s).
        server.sim("PATCH", "/simulator/config", json={"prompt_timeout": 60}).raise_for_status()
        httpd = ThreadingHTTPServer(("127.0.0.1", port), partial(ShopFiles, payment_server=server.url))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        started.append(httpd)
        return origin, server

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(
    "path", ["/catalog", "/static/js/mpesa-checkout.js", "/static/js/api.js", "/static/js/phone.js", "/health"]
)
def test_the_server_lets_the_shop_origin_read_what_the_shop_needs(shop_factory, path):
    # A module script from another origin is fetched with CORS, like the catalogue.
    origin, server = shop_factory()
    answer = server.get(path, headers={"Origin": origin})
    assert answer.status_code == 200
    assert answer.headers.get("Access-Control-Allow-Origin") in (origin, "*"), (
        f"{path} answers the shop's origin without Access-Control-Allow-Origin (FRONTEND_URL)"
    )
    stranger = server.get(path, headers={"Origin": "http://127.0.0.1:9"})
    assert stranger.headers.get("Access-Control-Allow-Origin") in (None, "*")


def open_shop(open_page, origin, allow=()):
    page = open_page(allow=allow)
    page.goto(f"{origin}/")
    page.wait_for_selector("#products .product")
    return page


def add(page, item_id, times=1):
    for _ in range(times):
        page.click(f'#products .product[data-id="{item_id}"] .add-button')


def test_fill_the_cart_pay_approve_and_get_the_tickets(open_page, shop_factory):
    origin, server = shop_factory()
    shop = open_shop(open_page, origin)
    assert shop.url.startswith(origin) and not origin.startswith(server.url)
    names = shop.locator("#products .product-name").all_text_contents()
    assert names == ["Regular ticket", "VIP ticket", "Tour T-shirt", "Mixtape download"]
    assert shop.text_content('.product[data-id="ticket-vip"] .product-stock') == "20 left"

    add(shop, "ticket-regular")
    add(shop, "ticket-vip")
    add(shop, "mixtape")
    shop.click('#cart-lines .cart-line[data-id="ticket-regular"] .qty-button >> text="+"')
    shop.click('#cart-lines .cart-line[data-id="mixtape"] .qty-button >> text="−"')  # gone again
    assert shop.locator("#cart-lines .cart-line").count() == 2
    assert shop.text_content('.cart-line[data-id="ticket-regular"] .qty-count') == "2"
    assert shop.text_content("#cart-total").replace("\xa0", " ") == "KES 8,000"
    shop.fill("#phone", HANDSET_PHONE)
    shot(shop, "shop-cart")

    pushes = []
    shop.on("request", lambda r: r.url == f"{server.url}/stkpush" and r.method == "POST" and pushes.append(r))
    shop.click("#pay-button")
    visible(shop, "#progress-view")
    sync_api.expect(shop.locator("#progress-order")).to_have_text(re.compile(r"^Order ORD-"))
    order = shop.text_content("#progress-order").removeprefix("Order ")
    assert "KES 8,000" in shop.text_content("#progress-detail").replace("\xa0", " ")
    assert pushes[0].post_data_json["items"] == [
        {"id": "ticket-regular", "quantity": 2},
        {"id": "ticket-vip", "quantity": 1},
    ]
    assert pushes[0].headers["idempotency-key"]
    shot(shop, "shop-waiting")

    handset = open_page()
    handset.goto(shop.get_attribute("#handset-link", "href"))
    visible(handset, "#prompt-view")
    assert "Ksh 8,000.00" in handset.text_content("#prompt-text")
    handset.fill("#pin", "1234")
    handset.click("#ok-button")
    visible(handset, "#result-view")

    visible(shop, "#result-view")
    assert shop.text_content("#result-heading") == "Payment received"
    assert shop.text_content("#result-order") == f"Order {order}"
    assert "3 tickets are ready" in shop.text_content("#result-message")
    shot(shop, "shop-paid")
    assert shop.text_content('.product[data-id="ticket-vip"] .product-stock') == "19 left"

    shop.click("#receipt-link")
    shop.wait_for_url(re.compile(re.escape(server.url) + r"/confirmation\.html\?paymentId=pay_[0-9a-f]{24}$"))
    visible(shop, "#receipt-view")
    assert shop.text_content("#receipt-order") == order
    tickets = shop.locator("#ticket-list .ticket")
    sync_api.expect(tickets).to_have_count(3)
    assert tickets.locator(".ticket-name").all_text_contents() == ["Regular ticket", "Regular ticket", "VIP ticket"]
    for n in range(3):
        image = tickets.nth(n).locator("img.ticket-qr")
        sync_api.expect(image).to_have_js_property("complete", True)
        assert image.evaluate("img => img.naturalWidth") > 0
    shot(shop, "shop-confirmation")


def test_a_sold_out_item_cannot_be_bought_twice(open_page, shop_factory, tmp_path):
    catalog = tmp_path / "catalog.json"
    catalog.write_text(
        json.dumps(
            {
                "items": [
                    {"id": "last-seat", "name": "Last seat", "price": 50, "kind": "ticket", "capacity": 1},
                    {"id": "sticker", "name": "Sticker", "price": 20},
                ]
            }
        )
    )
    origin, server = shop_factory(catalog)
    late = open_shop(open_page, origin, allow=("status of 409",))  # saw the seat before it went
    add(late, "last-seat")

    first = open_shop(open_page, origin)
    add(first, "last-seat")
    assert first.is_disabled('.product[data-id="last-seat"] .add-button')  # one left, one in the cart
    first.fill("#phone", PAID_AT_ONCE)
    first.click("#pay-button")
    sync_api.expect(first.locator("#result-heading")).to_have_text("Payment received", timeout=WAIT)

    late.fill("#phone", PAID_AT_ONCE)
    late.click("#pay-button")
    sync_api.expect(late.locator("#banner")).to_have_text("Sold out: Last seat", timeout=WAIT)
    assert late.is_visible("#cart-view")
    sync_api.expect(late.locator('.product[data-id="last-seat"] .product-stock')).to_have_text("Sold out")
    assert late.is_disabled('.product[data-id="last-seat"] .add-button')
    assert late.text_content('.cart-line[data-id="last-seat"] .cart-note') == "Sold out"
    assert late.is_disabled("#pay-button")
    shot(late, "shop-sold-out")


def test_a_tampered_amount_in_a_signed_pay_link_is_refused(open_page, shop_factory):
    origin, server = shop_factory(CHECKOUT_SECRET=CHECKOUT_SECRET)
    pay = open_page(allow=("status of 400",))
    pushes = []
    pay.on("request", lambda r: r.url.endswith("/stkpush") and pushes.append(r))
    tampered = signed_query(amount="1500").replace("amount=1500", "amount=15")
    pay.goto(f"{server.url}/pay.html{tampered}")
    assert pay.input_value("#amount") == "15" and pay.get_attribute("#amount", "readonly") is not None
    pay.fill("#phone", PAID_AT_ONCE)
    pay.click("#pay-button")
    sync_api.expect(pay.locator("#banner")).to_have_text(
        "The checkout link was changed or is invalid. Ask the shop for a new payment link."
    )
    assert pushes[0].post_data_json["amount"] == "15"
    assert pay.is_visible("#form-view") and pay.is_disabled("#pay-button")
    assert server.sim("GET", "/simulator/prompts").json()["prompts"] == [], "no phone was prompted"
    shot(pay, "pay-link-tampered")
