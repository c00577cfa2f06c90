"""Selling things: server-side prices, stock that is never oversold, tickets, signed links."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

import checkout
from store import Transaction, open_store
from tests.helpers import CALLBACK_TOKEN, CANCELLED, PAID, ROOT, WAITING, admin, callback_body, hook, poll, wait_until

CATALOG = {
    "items": [
        {"id": "seat", "name": "Concert seat", "price": 1500, "kind": "ticket", "capacity": 3},
        {"id": "vip", "name": "VIP seat", "price": 5000, "kind": "ticket", "capacity": 1},
        {"id": "tshirt", "name": "Tour T-shirt", "price": 1200},
    ]
}
SECRET = "shop-checkout-secret-0123456789"
ADMIN = {"Authorization": "Bearer admin-secret-0123456789"}


@pytest.fixture
def catalog_file(tmp_path):
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(CATALOG))
    return str(path)


@pytest.fixture
def shop(live_server_factory, catalog_file, simulator):
    requests.patch(simulator.url + "/simulator/config", json={"auto_delay": 0.2}, timeout=5)
    return live_server_factory(CATALOG_FILE=catalog_file, ADMIN_TOKEN="admin-secret-0123456789")


def buy(live, items, phone="0712345678", **extra):
    return live.post("/stkpush", json={"phone": phone, "items": items, **extra})


def available(live, item_id):
    items = live.get("/catalog").json()["items"]
    return next(item["available"] for item in items if item["id"] == item_id)


# Pricing.


def test_catalog_lists_items_with_what_is_left(shop):
    body = shop.get("/catalog").json()
    assert body["success"] is True and body["currency"] == "KES"
    assert [item["id"] for item in body["items"]] == ["seat", "vip", "tshirt"]
    assert body["items"][0] == {
        "id": "seat",
        "name": "Concert seat",
        "price": 1500,
        "description": "",
        "kind": "ticket",
        "capacity": 3,
        "available": 3,
    }
    assert body["items"][2]["available"] is None


def test_the_server_prices_the_order(shop):
    response = buy(shop, [{"id": "seat", "quantity": 2}, {"id": "tshirt", "quantity": 1}])
    assert response.status_code == 200
    body = response.json()
    assert body["amount"] == 2 * 1500 + 1200
    assert body["orderNumber"].startswith("ORD-")
    assert body["items"] == [
        {"id": "seat", "name": "Concert seat", "quantity": 2, "unitPrice": 1500, "lineTotal": 3000, "kind": "ticket"},
        {"id": "tshirt", "name": "Tour T-shirt", "quantity": 1, "unitPrice": 1200, "lineTotal": 1200, "kind": "item"},
    ]
    prompt = shop.sim("GET", f"/simulator/prompts/{body['checkoutRequestId']}").json()
    assert prompt["amount"] == 4200
    assert prompt["accountReference"] == body["orderNumber"]  # the order number is the reference
    tx = admin(shop, body["checkoutRequestId"])
    assert tx["extra"]["order"]["items"] == body["items"]


@pytest.mark.parametrize(
    "items, message",
    [
        ([{"id": "nope", "quantity": 1}], "Unknown item: nope"),
        ([{"id": "seat", "quantity": 0}], "Quantity of seat"),
        ([{"id": "seat", "quantity": 1.5}], "Quantity of seat"),
        ([{"id": "seat", "quantity": "2"}], "Quantity of seat"),
        ([{"id": "tshirt", "quantity": 100}, {"id": "tshirt", "quantity": 30}], "at most 100"),
        ([], "non-empty list"),
        ("seat", "non-empty list"),
        ([{"id": "tshirt", "quantity": 100}, {"id": "seat", "quantity": 3}], "exceeds the maximum"),
    ],
)
def test_bad_orders_are_refused_naming_items(live_server_factory, catalog_file, items, message):
    live = live_server_factory(CATALOG_FILE=catalog_file, MAX_AMOUNT="120000")
    response = buy(live, items)
    assert response.status_code == 400
    assert response.json()["field"] == "items" and message in response.json()["message"]


def test_items_and_an_amount_together_are_refused(shop):
    response = buy(shop, [{"id": "seat", "quantity": 1}], amount=1)
    assert response.status_code == 400 and response.json()["field"] == "amount"


def test_catalog_pricing_refuses_client_amounts(live_server_factory, catalog_file):
    live = live_server_factory(CATALOG_FILE=catalog_file, PRICING="catalog")
    response = live.post("/stkpush", json={"phone": "0712345678", "amount": 1})
    assert response.status_code == 400 and response.json()["field"] == "amount"
    assert "catalogue" in response.json()["message"]
    assert buy(live, [{"id": "tshirt", "quantity": 1}]).status_code == 200


# Stock.


def test_sold_out_is_a_409(shop):
    assert buy(shop, [{"id": "vip", "quantity": 1}]).status_code == 200
    second = buy(shop, [{"id": "vip", "quantity": 1}], phone="0712345679")
    assert second.status_code == 409
    body = second.json()
    assert body == {
        "success": False,
        "message": "Sold out: VIP seat",
        "field": "items",
        "itemId": "vip",
        "paymentId": body["paymentId"],
        "orderId": body["orderId"],
    }
    assert available(shop, "vip") == 0
    refused = shop.post("/stkpush/status", json={"paymentId": body["paymentId"]}).json()
    assert (refused["status"], refused["reason"], refused["orderId"]) == ("failed", "rejected", body["orderId"])


def test_a_failed_payment_gives_its_units_back(shop):
    checkout_id = buy(shop, [{"id": "seat", "quantity": 2}], phone="254700001032").json()["checkoutRequestId"]
    assert available(shop, "seat") == 1
    assert poll(shop, checkout_id)["reason"] == "cancelled"
    assert available(shop, "seat") == 3
    assert admin(shop, checkout_id)["extra"]["stock"] == "released"


def test_a_paid_payment_keeps_its_units(shop):
    checkout_id = buy(shop, [{"id": "seat", "quantity": 2}], phone="254700000000").json()["checkoutRequestId"]
    assert poll(shop, checkout_id)["status"] == "completed"
    assert available(shop, "seat") == 1
    assert admin(shop, checkout_id)["extra"]["stock"] == "sold"


def test_a_refused_push_holds_nothing(live_server_factory, catalog_file):
    live = live_server_factory(CATALOG_FILE=catalog_file, MPESA_BASE_URL="http://127.0.0.1:9")
    assert buy(live, [{"id": "vip", "quantity": 1}]).status_code == 503
    assert available(live, "vip") == 1


def test_a_timeout_releases_and_a_late_payment_takes_them_back(live_server_factory, catalog_file):
    live = live_server_factory(CATALOG_FILE=catalog_file, TRANSACTION_TTL="1", ADMIN_TOKEN="admin-secret-0123456789")
    checkout_id = buy(live, [{"id": "vip", "quantity": 1}]).json()["checkoutRequestId"]
    time.sleep(1.1)
    assert poll(live, checkout_id)["reason"] == "timeout"
    assert available(live, "vip") == 1
    other = buy(live, [{"id": "vip", "quantity": 1}], phone="0712345679")
    assert other.status_code == 200  # the seat was free again
    # The first customer's money arrives after all: recorded, and flagged as oversold.
    live.post(hook(live), json=callback_body(checkout_id, amount=5000.0))
    assert poll(live, checkout_id)["status"] == "completed"
    tx = admin(live, checkout_id)
    assert "late_result" in tx["flags"] and "oversold" in tx["flags"]


def store_url_of(kind: str, request, tmp_path) -> str:
    """A store of each kind: in memory, a SQLite file, the test's Redis or PostgreSQL database."""
    urls = {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path / 'shop.db'}"}
    return urls.get(kind) or request.getfixturevalue(f"clean_{kind}_url")


@pytest.mark.parametrize("store", ["memory", "sqlite", "redis", "postgres"])
def test_concurrent_buyers_never_oversell(live_server_factory, catalog_file, tmp_path, request, store):
    store_url = store_url_of(store, request, tmp_path)
    live = live_server_factory(CATALOG_FILE=catalog_file, STORE_URL=store_url)
    phones = [f"07110{n:05d}" for n in range(12)]
    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda phone: buy(live, [{"id": "seat", "quantity": 1}], phone).status_code, phones))
    assert sorted(codes) == [200] * 3 + [409] * 9
    assert available(live, "seat") == 0


# Holds: per payment, ended by its verdict, and by reconcile after a crash.


@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
def stocked(request, live_server_factory, catalog_file, tmp_path, simulator):
    """A shop with seats (capacity 3) on each store in turn."""
    requests.patch(simulator.url + "/simulator/config", json={"auto_delay": 0.2}, timeout=5)
    store_url = store_url_of(request.param, request, tmp_path)
    return live_server_factory(CATALOG_FILE=catalog_file, STORE_URL=store_url, ADMIN_TOKEN="admin-secret-0123456789")


def seats(live, quantity=1, phone=WAITING) -> str:
    response = buy(live, [{"id": "seat", "quantity": quantity}], phone)
    assert response.status_code == 200, response.text
    return response.json()["checkoutRequestId"]


def reconcile(live) -> None:
    live.app.extensions["payments"].reconcile()


def dying(store, verb: str, monkeypatch) -> threading.Event:
    """Make store.<verb> raise as if the worker died there; the event is set once it did."""
    died = threading.Event()

    def die(owner):
        died.set()
        raise RuntimeError("the worker died here")

    monkeypatch.setattr(store, verb, die)
    return died


def test_holds_of_cancelled_prompts_all_come_back(stocked):
    phones = [f"07120{n:05d}" for n in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda phone: buy(stocked, [{"id": "seat", "quantity": 1}], phone), phones))
    holding = [answer.json()["checkoutRequestId"] for answer in answers if answer.status_code == 200]
    assert len(holding) == 3 and available(stocked, "seat") == 0
    for checkout_id in holding:
        stocked.sim("POST", f"/simulator/prompts/{checkout_id}/cancel").raise_for_status()
    wait_until(lambda: available(stocked, "seat") == 3)
    assert [poll(stocked, checkout_id)["reason"] for checkout_id in holding] == ["cancelled"] * 3
    assert stocked.app.extensions["store"].stock_holders() == []
    assert seats(stocked, quantity=3)  # and they sell again


def test_reconcile_releases_the_hold_of_a_failed_payment_whose_worker_died(stocked, monkeypatch):
    store = stocked.app.extensions["store"]
    died = dying(store, "release_stock", monkeypatch)
    checkout_id = seats(stocked, quantity=2, phone=CANCELLED)
    wait_until(died.is_set)
    monkeypatch.undo()
    assert admin(stocked, checkout_id)["status"] == "failed"
    assert available(stocked, "seat") == 1
    reconcile(stocked)
    assert available(stocked, "seat") == 3 and store.stock_holders() == []


def test_reconcile_keeps_the_hold_of_a_paid_payment_whose_worker_died(stocked, monkeypatch):
    store = stocked.app.extensions["store"]
    died = dying(store, "keep_stock", monkeypatch)
    checkout_id = seats(stocked, quantity=2, phone=PAID)
    wait_until(died.is_set)
    monkeypatch.undo()
    assert admin(stocked, checkout_id)["status"] == "completed"
    assert len(store.stock_holders()) == 1
    reconcile(stocked)
    assert store.stock_holders() == []
    assert available(stocked, "seat") == 1  # sold
    assert poll(stocked, checkout_id)["status"] == "completed"
    reconcile(stocked)
    assert available(stocked, "seat") == 1


def test_reconcile_releases_holds_of_unknown_payments_and_leaves_pending_ones(stocked):
    store = stocked.app.extensions["store"]
    store.hold_stock("a-request-that-died", {"seat": 1}, {"seat": 3})
    waiting = seats(stocked)
    assert available(stocked, "seat") == 1
    reconcile(stocked)
    assert available(stocked, "seat") == 2  # the waiting customer's seat stays held
    assert admin(stocked, waiting)["status"] == "pending"


def test_a_status_poll_moves_the_stock_of_a_verdict_saved_just_before_a_crash(stocked, simulator):
    # No prompt timeout during the test: its callback would move the stock too, racing the poll.
    requests.patch(simulator.url + "/simulator/config", json={"prompt_timeout": 3600}, timeout=5).raise_for_status()
    checkout_id = seats(stocked, quantity=2)

    def saved_failed_then_died(tx):  # what the settling worker wrote before it died
        tx.status, tx.reason = "failed", "cancelled"
        tx.extra["stock"] = "to_release"

    store = stocked.app.extensions["store"]
    saved, _ = store.update(store.find(checkout_id).payment_id, saved_failed_then_died)
    assert saved is not None and saved.status == "failed"
    assert available(stocked, "seat") == 1
    assert poll(stocked, checkout_id)["status"] == "failed"
    assert available(stocked, "seat") == 3
    assert admin(stocked, checkout_id)["extra"]["stock"] == "released"


@pytest.mark.parametrize("left_as", ["to_release", "released"])
def test_a_late_payment_keeps_a_hold_a_dead_worker_did_not_release(stocked, left_as):
    checkout_id = seats(stocked, quantity=2)

    def timed_out_then_died(tx):  # the timeout was saved (and claimed, if "released"), the units not moved
        tx.status, tx.reason, tx.settled_by = "failed", "timeout", "timeout"
        tx.extra["stock"] = left_as

    store = stocked.app.extensions["store"]
    saved, _ = store.update(store.find(checkout_id).payment_id, timed_out_then_died)
    assert saved is not None and saved.status == "failed"
    stocked.post(hook(stocked), json=callback_body(checkout_id, amount=3000.0))
    assert poll(stocked, checkout_id)["status"] == "completed"
    assert available(stocked, "seat") == 1  # counted once: neither given back nor taken twice
    assert store.stock_holders() == []
    tx = admin(stocked, checkout_id)
    assert tx["extra"]["stock"] == "sold" and "oversold" not in tx["flags"]
    reconcile(stocked)
    assert available(stocked, "seat") == 1


def test_a_payment_started_before_holds_had_owners_still_gives_its_units_back(stocked):
    store = stocked.app.extensions["store"]
    store.adjust_counter("stock:seat", 2, maximum=3)  # held in the counter alone, as before
    line = checkout.OrderLine("seat", "Concert seat", 2, 1500, 3000, "ticket")
    order = checkout.Order("ORD-OLD00001", (line,)).to_dict()
    store.create(
        Transaction(  # as records made before payment ids read back: keyed by their CheckoutRequestID
            "ws_CO_before_the_upgrade",
            "254712345678",
            3000,
            checkout_request_id="ws_CO_before_the_upgrade",
            merchant_request_id="1-2-3",
            initiated_at=time.time(),
            extra={"order": order, "stock": "held"},
        )
    )
    assert available(stocked, "seat") == 1
    stocked.post(hook(stocked), json=callback_body("ws_CO_before_the_upgrade", code=1032))
    assert poll(stocked, "ws_CO_before_the_upgrade")["reason"] == "cancelled"
    assert available(stocked, "seat") == 3


def test_the_reconcile_command_releases_a_dead_requests_hold(live_server_factory, catalog_file, tmp_path, simulator):
    store_url = f"sqlite:///{tmp_path / 'shop.db'}"
    live = live_server_factory(CATALOG_FILE=catalog_file, STORE_URL=store_url)
    ledger = open_store(store_url)
    try:
        ledger.hold_stock("a-request-that-died", {"vip": 1}, {"vip": 1})
    finally:
        ledger.close()
    assert available(live, "vip") == 0
    env = {
        **os.environ,
        "MPESA_ENV": "simulator",
        "MPESA_BASE_URL": simulator.url,
        "STORE_URL": store_url,
        "CATALOG_FILE": catalog_file,
        "CALLBACK_TOKEN": CALLBACK_TOKEN,
    }
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "server", "reconcile"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "stock held for unknown payment a-request-that-died released" in result.stdout
    assert available(live, "vip") == 1


# Tickets.


def paid_tickets(shop, quantity=2):
    checkout_id = buy(
        shop, [{"id": "seat", "quantity": quantity}, {"id": "tshirt", "quantity": 1}], phone="254700000000"
    ).json()["checkoutRequestId"]
    answer = poll(shop, checkout_id)
    assert answer["status"] == "completed"
    return checkout_id, answer


def test_each_ticket_unit_paid_for_gets_a_number(shop):
    _, answer = paid_tickets(shop)
    tickets = answer["tickets"]
    assert len(tickets) == 2 and len({t["number"] for t in tickets}) == 2
    assert all(t["number"].startswith("TKT-") and t["itemId"] == "seat" for t in tickets)
    assert tickets[0]["qr"] == f"/tickets/{tickets[0]['number']}/qr.svg"
    assert answer["orderNumber"].startswith("ORD-")


def test_pending_and_failed_orders_have_no_tickets(shop):
    checkout_id = buy(shop, [{"id": "seat", "quantity": 1}]).json()["checkoutRequestId"]
    answer = poll(shop, checkout_id, timeout=0)
    assert answer["status"] == "pending" and "tickets" not in answer and answer["orderNumber"]


def test_ticket_qr_code_is_an_svg(shop):
    _, answer = paid_tickets(shop, quantity=1)
    response = shop.get(answer["tickets"][0]["qr"])
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("image/svg+xml")
    assert response.text.lstrip().startswith("<?xml") and "<svg" in response.text
    assert shop.get("/tickets/TKT-NOPE/qr.svg").status_code == 404


def test_check_in_at_the_door_works_once(shop):
    checkout_id, answer = paid_tickets(shop, quantity=1)
    number = answer["tickets"][0]["number"]
    assert shop.post(f"/tickets/{number}/check-in").status_code == 401
    first = shop.post(f"/tickets/{number}/check-in", headers=ADMIN)
    assert first.status_code == 200 and first.json()["ticket"]["number"] == number
    second = shop.post(f"/tickets/{number}/check-in", headers=ADMIN)
    assert second.status_code == 409
    assert second.json()["success"] is False and "already used at" in second.json()["message"]
    assert second.json()["checkedInAt"].endswith("Z")
    assert shop.post("/tickets/TKT-NOPE/check-in", headers=ADMIN).status_code == 404
    assert "ticket_checked_in" in [e["event"] for e in admin(shop, checkout_id)["history"]]


def test_the_shop_webhook_carries_the_tickets(live_server_factory, catalog_file, callback_receiver, simulator):
    requests.patch(simulator.url + "/simulator/config", json={"auto_delay": 0.2}, timeout=5)
    live = live_server_factory(
        CATALOG_FILE=catalog_file, MERCHANT_WEBHOOK_URL=callback_receiver.url, WEBHOOK_SECRET="shop-secret-0123456789"
    )
    checkout_id = buy(live, [{"id": "seat", "quantity": 2}], phone="254700000000").json()["checkoutRequestId"]
    tickets = poll(live, checkout_id)["tickets"]
    data = callback_receiver.wait(1)[0]["data"]
    assert data["orderNumber"].startswith("ORD-")
    assert [t["number"] for t in data["tickets"]] == [t["number"] for t in tickets]


# Signed links.


def signed(amount=1500, reference="INV-42", description="Invoice 42", expires=None):
    expires = int(time.time()) + 600 if expires is None else expires
    return {
        "amount": amount,
        "accountReference": reference,
        "description": description,
        "expires": expires,
        "signature": checkout.sign_link(SECRET, amount, reference, description, expires),
    }


@pytest.fixture
def signing_shop(live_server_factory):
    return live_server_factory(CHECKOUT_SECRET=SECRET)


def test_a_signed_link_is_accepted(signing_shop):
    response = signing_shop.post("/stkpush", json={"phone": "0712345678", **signed()})
    assert response.status_code == 200 and response.json()["amount"] == 1500


@pytest.mark.parametrize(
    "change, field, message",
    [
        ({"amount": 1}, "signature", "changed"),
        ({"accountReference": "INV-43"}, "signature", "changed"),
        ({"description": "Cheap"}, "signature", "changed"),
        ({"signature": "0" * 64}, "signature", "changed"),
    ],
)
def test_a_tampered_link_is_refused(signing_shop, change, field, message):
    response = signing_shop.post("/stkpush", json={"phone": "0712345678", **signed(), **change})
    assert response.status_code == 400
    assert response.json()["field"] == field and message in response.json()["message"]


def test_an_expired_link_is_refused(signing_shop):
    response = signing_shop.post("/stkpush", json={"phone": "0712345678", **signed(expires=int(time.time()) - 1)})
    assert response.status_code == 400 and response.json()["field"] == "expires"


def test_unsigned_amounts_are_refused_but_catalogue_items_are_fine(signing_shop, catalog_file, live_server_factory):
    response = signing_shop.post("/stkpush", json={"phone": "0712345678", "amount": 1500})
    assert response.status_code == 400 and response.json()["field"] == "signature"
    with_catalog = live_server_factory(CHECKOUT_SECRET=SECRET, CATALOG_FILE=catalog_file)
    assert buy(with_catalog, [{"id": "tshirt", "quantity": 1}]).status_code == 200


def test_link_signature_matches_the_documented_recipe():
    import hashlib
    import hmac

    message = "amount=1500&accountReference=INV-42&description=Invoice 42&expires=1900000000"
    expected = hmac.new(SECRET.encode(), message.encode(), hashlib.sha256).hexdigest()
    assert checkout.sign_link(SECRET, 1500, "INV-42", "Invoice 42", 1900000000) == expected
