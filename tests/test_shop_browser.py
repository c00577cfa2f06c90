"""The example shop (examples/shop/) as `make shop` runs it, paying through the server's checkout module.

The tests run the Makefile's `shop` command, with no options unless a test needs one: it
serves the shop on one free loopback port and starts the payment server on another with
FRONTEND_URL set to the shop's origin and the example catalogue; the tests read the addresses
it prints. A shopper fills a cart, pays, approves on the simulated handset and gets the
server's confirmation with the order and its tickets' QR codes; a sold-out item cannot be
bought twice; a pay link whose signed amount was changed is refused. The command stops both
on SIGTERM, and a taken port or a server that will not start ends it with one line.
Screenshots go to test-artifacts/screenshots/.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.helpers import (
    CHECKOUT_SECRET,
    HANDSET_PHONE,
    PAID_AT_ONCE,
    ROOT,
    SERVER_DEFAULTS,
    WAIT,
    LiveServer,
    shot,
    signed_query,
    visible,
    wait_until,
)

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


def make_shop_command() -> list[str]:
    """The command `make shop` runs, this interpreter standing in for the venv's python."""
    recipe = re.search(r"^shop:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert recipe, "the Makefile has a shop target"
    return [sys.executable if word == "$(BIN)/python" else word for word in shlex.split(recipe.group(1))]


class MakeShop:
    """`make shop`'s command running in its own process, and the addresses it printed."""

    def __init__(self, args: list[str], env: dict, log_path: Path):
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                make_shop_command() + args,
                cwd=ROOT,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.origin, self.server_url = wait_until(self._addresses, timeout=60)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _addresses(self) -> tuple[str, str] | None:
        if self.process.poll() is not None:
            raise AssertionError(f"make shop exited: {self.output()[-2000:]}")
        said = self.output()
        if "Press Ctrl+C to stop the shop" not in said:
            return None
        shop = re.search(r"^  Shop: +(http://\S+)/$", said, re.MULTILINE)
        server = re.search(r"^  Payment server: +(http://\S+)", said, re.MULTILINE)
        assert shop and server, said
        return shop.group(1), server.group(1)

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)
        return self.process.returncode


def shop_settings(simulator, **env) -> dict:
    """The test server settings, talking to the test simulator; the environment make shop passes on."""
    return {**SERVER_DEFAULTS, "MPESA_BASE_URL": simulator.url, **env}


@pytest.fixture
def shop_factory(simulator, tmp_path):
    """Run `make shop`'s command (options as arguments, server settings as keywords): (shop origin, server)."""
    running: list[MakeShop] = []

    def start(*args: str, **env) -> tuple[str, LiveServer]:
        log_path = tmp_path / f"make-shop-{len(running)}.log"
        running.append(MakeShop(list(args), shop_settings(simulator, **env), log_path))
        server = LiveServer(running[-1].server_url, simulator.url, app=None)
        # Time enough for a person on the handset (the test settings expire prompts in 5 s).
        server.sim("PATCH", "/simulator/config", json={"prompt_timeout": 60}).raise_for_status()
        return running[-1].origin, server

    yield start
    for shop in running:
        shop.stop()


@pytest.fixture
def open_page(shop_factory, open_page):
    """The conftest's pages, closed before the shops stop (the handset would log its failed polls)."""
    return open_page


def test_make_shop_says_where_everything_is_and_stops_both_on_sigterm(simulator, tmp_path):
    shop = MakeShop([], shop_settings(simulator), tmp_path / "make-shop.log")
    said = shop.output()
    assert f"FRONTEND_URL={shop.origin}" in said
    assert f"Simulated phone: {shop.server_url}/handset.html" in said

    page = requests.get(f"{shop.origin}/", timeout=10)
    assert page.status_code == 200 and f'data-server="{shop.server_url}"' in page.text
    assert 'data-server="http://127.0.0.1:3001"' in (ROOT / "examples/shop/index.html").read_text(), "file untouched"
    assert requests.get(f"{shop.origin}/shop.js", timeout=10).status_code == 200
    for launcher in ("/__main__.py", "/__main__%2Epy"):
        assert requests.get(f"{shop.origin}{launcher}", timeout=10).status_code == 404, "the launcher is not the shop"
    assert requests.get(f"{shop.server_url}/health", timeout=10).json()["mode"] == "simulator"

    assert shop.stop() == 0
    for url in (shop.origin, shop.server_url):
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/", timeout=10)
    assert "Traceback" not in shop.output()


def run_make_shop(*args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        make_shop_command() + list(args),
        cwd=ROOT,
        env={**os.environ, **SERVER_DEFAULTS, **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("option", ["--shop-port", "--server-port"])
def test_a_taken_port_ends_make_shop_with_one_line(option):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ended = run_make_shop(option, str(port))
    said = (ended.stdout + ended.stderr).strip()
    assert ended.returncode == 1
    assert said.splitlines() == [said]
    assert f"Cannot listen on port {port}" in said and f"Leave {option} out for a free port" in said


def test_a_payment_server_that_will_not_start_ends_make_shop_with_its_reason():
    ended = run_make_shop(CHECKOUT_SECRET="too-short")
    said = (ended.stdout + ended.stderr).strip().splitlines()
    assert ended.returncode == 1
    assert len(said) == 2, said
    assert said[0].startswith("Configuration error: CHECKOUT_SECRET must be at least 16 characters")
    assert said[1] == "The payment server did not start (exit status 1; its reason is above)."


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
    origin, server = shop_factory("--catalog", str(catalog))
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
