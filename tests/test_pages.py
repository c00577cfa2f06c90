"""The pages blueprint on its own: every page served, CSP-clean markup, the handset proxy.

The blueprint is mounted on a bare Flask app with only the settings object it reads, so these
tests need neither the payment server nor its store; the proxy talks over loopback HTTP
to a real simulator.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
from flask import Flask

import mpesa
import pages
import simulator as sim_module
from config import Settings
from tests.helpers import ROOT, free_port

PAGES = ["/", "/pay.html", "/confirmation.html", "/test.html", "/handset.html"]
HANDSET_PHONE = "254712345678"  # not a built-in test number: it waits for the handset


def make_app(**settings) -> Flask:
    """The blueprint on a bare app; settings are Settings fields (base_url: the simulator's URL)."""
    app = Flask("pages_test", root_path=str(ROOT))
    app.config.update(TESTING=True)
    app.extensions["settings"] = Settings(**{"mpesa_env": "simulator", "shortcode": "174379", **settings})
    app.register_blueprint(pages.bp)
    return app


@pytest.fixture
def client():
    return make_app().test_client()


@pytest.fixture
def sim(simulator):
    """The shared test simulator (tests/conftest.py), freshly reset."""
    return simulator


@pytest.fixture
def sim_client(sim):
    return make_app(base_url=sim.url).test_client()


def push(sim, phone=HANDSET_PHONE, amount=100, reference="CART-12345") -> str:
    """Start a prompt on the simulated handset, as the payment server would."""
    with mpesa.Daraja(
        base_url=sim.url, consumer_key=sim_module.SIM_CONSUMER_KEY, consumer_secret=sim_module.SIM_CONSUMER_SECRET
    ) as daraja:
        accepted = daraja.stk_push(
            phone,
            amount,
            callback_url="http://127.0.0.1:9/hooks/stk/x",
            account_reference=reference,
            description="Test",
        )
    return accepted.checkout_request_id


def unused_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


class Markup(HTMLParser):
    """Collects what the CSP and the offline rule care about."""

    def __init__(self):
        super().__init__()
        self.scripts: list[dict] = []
        self.style_elements = 0
        self.style_attributes: list[str] = []
        self.event_handlers: list[str] = []
        self.urls: list[str] = []
        self.ids: list[str] = []
        self.labels_for: set[str] = set()
        self.inputs: list[dict] = []
        self._script: dict | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "style" in attrs:
            self.style_attributes.append(tag)
        self.event_handlers += [name for name in attrs if name.startswith("on")]
        for name in ("src", "href", "action", "formaction", "poster", "data"):
            if attrs.get(name):
                self.urls.append(attrs[name])
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "style":
            self.style_elements += 1
        if tag == "label" and attrs.get("for"):
            self.labels_for.add(attrs["for"])
        if tag in ("input", "select", "textarea") and attrs.get("type") != "hidden":
            self.inputs.append(attrs)
        if tag == "script":
            self._script = {"attrs": attrs, "body": ""}
            self.scripts.append(self._script)

    def handle_data(self, data):
        if self._script is not None:
            self._script["body"] += data

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = None


def parse(html: str) -> Markup:
    markup = Markup()
    markup.feed(html)
    return markup


# Pages.


@pytest.mark.parametrize("path", PAGES)
def test_every_page_is_served_as_html(client, path):
    answer = client.get(path)
    assert answer.status_code == 200
    assert answer.mimetype == "text/html"
    assert "<!doctype html>" in answer.get_data(as_text=True).lower()


@pytest.mark.parametrize("path", PAGES)
def test_pages_have_no_inline_script_or_style(client, path):
    markup = parse(client.get(path).get_data(as_text=True))
    for script in markup.scripts:
        if "src" in script["attrs"]:
            assert not script["body"].strip(), f"{path}: a script with src has a body"
        else:
            assert script["attrs"].get("type") == "application/json", f"{path}: inline script"
    assert markup.style_elements == 0, f"{path}: <style> element"
    assert markup.style_attributes == [], f"{path}: style= attribute on {markup.style_attributes}"
    assert markup.event_handlers == [], f"{path}: inline event handlers {markup.event_handlers}"
    assert "javascript:" not in client.get(path).get_data(as_text=True).lower()


@pytest.mark.parametrize("path", PAGES)
def test_pages_use_only_their_own_origin(client, path):
    markup = parse(client.get(path).get_data(as_text=True))
    for url in markup.urls:
        assert not re.match(r"^([a-z][a-z0-9+.\-]*:)?//", url, re.I), f"{path}: external URL {url}"
        if ":" in url.split("/")[0]:
            assert url == "data:,", f"{path}: unexpected scheme in {url}"
    for script in markup.scripts:
        assert script["attrs"].get("type") in ("module", "application/json"), script["attrs"]


@pytest.mark.parametrize("path", PAGES)
def test_page_assets_exist_and_every_field_has_a_label(client, path):
    markup = parse(client.get(path).get_data(as_text=True))
    for url in markup.urls:
        if url.startswith("/static/"):
            assert client.get(url).status_code == 200, url
    assert len(markup.ids) == len(set(markup.ids)), f"{path}: duplicate ids"
    for field in markup.inputs:
        assert field.get("id") in markup.labels_for, f"{path}: no <label> for {field}"


def test_static_files_load_nothing_from_elsewhere():
    for path in sorted((ROOT / "static").rglob("*")):
        if path.suffix in (".js", ".css"):
            text = path.read_text()
            assert not re.search(r"https?://|@import|\burl\(\s*['\"]?(?!data:)[^)]*//", text), path
            assert "innerHTML" not in text and "eval(" not in text, path


def page_config(client, path: str) -> dict:
    html = client.get(path).get_data(as_text=True)
    block = re.search(r'<script type="application/json" id="page-config">(.*?)</script>', html, re.S)
    return json.loads(block.group(1))


def test_page_config_carries_the_servers_settings():
    app = make_app(max_amount=5000, usd_to_kes_rate=129.5, shortcode="600999")
    config = page_config(app.test_client(), "/pay.html")
    assert config["maxAmount"] == 5000
    assert config["usdToKesRate"] == 129.5
    assert config["shortcode"] == "600999"
    assert config["urls"]["stkpush"] == "/stkpush"
    assert config["urls"]["status"] == "/stkpush/status"
    assert config["urls"]["handset"] == "/handset.html"


def test_page_config_cannot_break_out_of_its_script_block():
    app = make_app(shortcode="</script><script>alert(1)</script>")
    html = app.test_client().get("/pay.html").get_data(as_text=True)
    assert "<script>alert(1)" not in html
    assert page_config(app.test_client(), "/pay.html")["shortcode"].startswith("</script>")


def test_pay_page_is_prefilled_from_the_link_and_locks_the_amount(client):
    html = client.get("/pay.html?amount=1500&description=DJ%20Kraph%20Checkout&accountReference=CART_12345").get_data(
        as_text=True
    )
    amount = re.search(r'<input id="amount"[^>]*>', html, re.S).group(0)
    assert 'value="1500"' in amount and "readonly" in amount
    assert "DJ Kraph Checkout" in html and "CART_12345" in html
    assert 'name="accountReference" value="CART_12345"' in html


def test_pay_page_leaves_the_amount_editable_without_one(client):
    amount = re.search(r'<input id="amount"[^>]*>', client.get("/").get_data(as_text=True), re.S).group(0)
    assert "readonly" not in amount


@pytest.mark.parametrize("amount", ["0", "12.50", "abc", "150001", "-5"])
def test_pay_page_says_when_the_links_amount_is_not_valid(client, amount):
    html = client.get(f"/pay.html?amount={amount}").get_data(as_text=True)
    field = re.search(r'<input id="amount"[^>]*>', html, re.S).group(0)
    assert "readonly" not in field
    assert "The amount in this payment link is not valid" in html


def test_pay_page_with_items_shows_a_cart_instead_of_the_amount(client):
    html = client.get("/pay.html?items=ticket-regular:2,tshirt").get_data(as_text=True)
    assert 'id="cart"' in html and 'id="cart-rows"' in html and 'id="cart-total"' in html
    assert '<input id="amount"' not in html  # the server prices the cart from its catalogue
    markup = parse(html)
    assert len(markup.ids) == len(set(markup.ids))
    assert all(field.get("id") in markup.labels_for for field in markup.inputs)
    assert 'id="cart"' not in client.get("/pay.html?amount=100").get_data(as_text=True)


def test_pay_page_escapes_what_the_link_says(client):
    html = client.get("/pay.html?description=<img src=x onerror=alert(1)>").get_data(as_text=True)
    assert "<img src=x" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html


def test_simulator_mode_shows_the_demo_note_and_handset_link(client):
    html = client.get("/pay.html").get_data(as_text=True)
    assert "Demo:" in html and "Open the simulated phone" in html


@pytest.mark.parametrize("mode", ["sandbox", "production"])
def test_handset_and_its_proxy_are_hidden_outside_simulator_mode(mode):
    client = make_app(mpesa_env=mode, base_url="http://127.0.0.1:9").test_client()
    assert client.get("/handset.html").status_code == 404
    assert client.get("/simulator/prompts?phone=0712345678").status_code == 404
    assert client.post("/simulator/prompts/ws_CO_1/pin", json={"pin": "1234"}).status_code == 404
    html = client.get("/pay.html").get_data(as_text=True)
    assert "simulated phone" not in html and "Demo:" not in html
    assert "handset" not in page_config(client, "/pay.html")["urls"]


def test_production_test_page_warns_that_pushes_are_real():
    client = make_app(mpesa_env="production").test_client()
    assert "real payment request" in client.get("/test.html").get_data(as_text=True)


# Handset proxy.


def test_proxy_lists_the_phones_pending_prompts(sim, sim_client):
    checkout_id = push(sim)
    push(sim, phone="254798765432")
    answer = sim_client.get("/simulator/prompts?phone=0712 345 678")
    assert answer.status_code == 200
    prompts = answer.get_json()["prompts"]
    assert [p["checkoutRequestId"] for p in prompts] == [checkout_id]
    assert prompts[0]["amount"] == 100 and prompts[0]["accountReference"] == "CART-12345"


def test_proxy_relays_the_pin_and_only_pending_prompts_are_listed(sim, sim_client):
    checkout_id = push(sim)
    answer = sim_client.post(f"/simulator/prompts/{checkout_id}/pin", json={"pin": sim_module.SIM_PIN})
    assert answer.status_code == 200
    assert answer.get_json()["status"] == "completed" and answer.get_json()["receipt"]
    assert sim_client.get(f"/simulator/prompts?phone={HANDSET_PHONE}").get_json() == {"prompts": []}


@pytest.mark.parametrize("action, code", [("cancel", 1032), ("timeout", 1037)])
def test_proxy_relays_cancel_and_timeout(sim, sim_client, action, code):
    checkout_id = push(sim)
    answer = sim_client.post(f"/simulator/prompts/{checkout_id}/{action}", json={})
    assert answer.status_code == 200
    assert answer.get_json()["status"] == "failed" and answer.get_json()["resultCode"] == code


def test_proxy_relays_the_simulators_refusals(sim, sim_client):
    checkout_id = push(sim)
    assert sim_client.post(f"/simulator/prompts/{checkout_id}/cancel").status_code == 200
    again = sim_client.post(f"/simulator/prompts/{checkout_id}/cancel")
    assert again.status_code == 409 and "error" in again.get_json()
    unknown = sim_client.post("/simulator/prompts/ws_CO_unknown/cancel")
    assert unknown.status_code == 404


def test_proxy_refuses_unknown_actions_and_bad_phones(sim_client):
    assert sim_client.post("/simulator/prompts/ws_CO_1/resolve", json={"resultCode": 0}).status_code == 404
    assert sim_client.post("/simulator/prompts/..%2Fconfig/pin").status_code == 404
    bad = sim_client.get("/simulator/prompts?phone=12345")
    assert bad.status_code == 400 and bad.get_json()["field"] == "phone"


def test_proxy_says_simulator_unavailable_when_it_cannot_be_reached():
    client = make_app(base_url=unused_port_url()).test_client()
    expected = {"success": False, "message": "Simulator unavailable"}
    listed = client.get("/simulator/prompts?phone=0712345678")
    assert (listed.status_code, listed.get_json()) == (503, expected)
    acted = client.post("/simulator/prompts/ws_CO_1/pin", json={"pin": "1234"})
    assert (acted.status_code, acted.get_json()) == (503, expected)
    unset = make_app(base_url=None).test_client().get("/simulator/prompts?phone=0712345678")
    assert (unset.status_code, unset.get_json()) == (503, expected)
