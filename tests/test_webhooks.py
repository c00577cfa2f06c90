"""Merchant webhooks: signatures, events, and delivery over real HTTP to a shop's receiver."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

import webhooks
from config import load_settings
from store import Transaction, open_store
from tests.helpers import (
    CALLBACK_TOKEN,
    CANCELLED,
    PAID,
    PROCFILE_COMMAND,
    ROOT,
    WAITING,
    ServerProcess,
    free_port,
    wait_until,
)

SECRET = "whsec_test_0123456789abcdef"


def checkout(n: int) -> str:
    """A CheckoutRequestID as Daraja makes them: ws_CO_, 17 digits, the payer's national number."""
    return f"ws_CO_2611202310300{n:04d}712345678"


CHECKOUT = checkout(1)
DATA_FIELDS = {
    "paymentId",
    "orderId",
    "checkoutRequestId",
    "merchantRequestId",
    "status",
    "reason",
    "resultCode",
    "resultDesc",
    "amount",
    "currency",
    "amountConfirmed",
    "receipt",
    "accountReference",
    "description",
    "phone",
    "initiatedAt",
    "completedAt",
    "flags",
}


class Receiver:
    """A shop's webhook endpoint on a loopback port: records raw deliveries, answers a script.

    `answers` are the HTTP statuses of the first requests, 200 after them; `fail_first`
    answers 503 to the first that many deliveries of each event; `delay` is how long each
    answer takes; `port` 0 picks a free one.
    """

    def __init__(self, answers=(), delay: float = 0.0, fail_first: int = 0, port: int = 0):
        self.answers = list(answers)
        self.delay = delay
        self.fail_first = fail_first
        self.calls: list[dict] = []  # {"at", "headers", "raw", "body", "status"} in arrival order
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                arrived = time.time()
                with receiver._cond:
                    body = json.loads(raw)
                    status = receiver.answers.pop(0) if receiver.answers else 200
                    if len(receiver.deliveries_of(body["id"])) < receiver.fail_first:
                        status = 503
                    receiver.calls.append(
                        {"at": arrived, "headers": dict(self.headers), "raw": raw, "body": body, "status": status}
                    )
                    receiver._cond.notify_all()
                time.sleep(receiver.delay)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}/shop/mpesa-events?key=shop-own-token"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def wait(self, count: int = 1, timeout: float = 10.0) -> list[dict]:
        """The first `count` deliveries once they have arrived; fail after `timeout`."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.calls) >= count, timeout):
                raise AssertionError(f"expected {count} delivery(ies) in {timeout}s, got {len(self.calls)}")
            return self.calls[:count]

    def ids(self) -> list[str]:
        with self._cond:
            return [call["body"]["id"] for call in self.calls]

    def deliveries_of(self, event_id: str) -> list[dict]:
        with self._cond:
            return [call for call in self.calls if call["body"]["id"] == event_id]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver_factory():
    started: list[Receiver] = []

    def start(answers=(), delay: float = 0.0, fail_first: int = 0, port: int = 0) -> Receiver:
        started.append(Receiver(answers, delay, fail_first, port))
        return started[-1]

    yield start
    for receiver in started:
        receiver.stop()


@pytest.fixture
def senders():
    """Build WebhookSenders that are closed after the test."""
    built: list[webhooks.WebhookSender] = []

    def build(url, store, **options) -> webhooks.WebhookSender:
        built.append(webhooks.WebhookSender(url, SECRET, store, **options))
        return built[-1]

    yield build
    for sender in built:
        sender.close()


def final_tx(checkout_id=CHECKOUT, status="completed", **fields) -> Transaction:
    values = dict(
        merchant_request_id="29115-34620561-1",
        phone=WAITING,
        amount=150,
        account_reference="CART_12345",
        description="Order 12345",
        initiated_at=time.time() - 30,
        completed_at=time.time() - 20,
        status=status,
        settled_by="callback",
        result_code=0 if status == "completed" else 1032,
        result_desc="Processed" if status == "completed" else "Request cancelled by user",
        reason=None if status == "completed" else "cancelled",
        mpesa_receipt_number="NLJ7RT61SV" if status == "completed" else None,
    )
    values.update(fields)
    return Transaction(payment_id=checkout_id, checkout_request_id=checkout_id, **values)


def history(tx: Transaction | dict, name: str) -> list[dict]:
    entries = tx["history"] if isinstance(tx, dict) else tx.history
    return [entry for entry in entries if entry["event"] == name]


# Signatures.


def test_a_signature_verifies_and_follows_the_documented_formula():
    body = b'{"id":"evt_1","type":"payment.completed"}'
    header = webhooks.sign(SECRET, 1_700_000_000, body)
    assert re.fullmatch(r"t=1700000000,v1=[0-9a-f]{64}", header)
    expected = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header.endswith(expected)
    assert webhooks.verify(SECRET, header, body, now=1_700_000_010)


def test_a_tampered_body_does_not_verify():
    header = webhooks.sign(SECRET, 1_700_000_000, b'{"amount":100}')
    assert not webhooks.verify(SECRET, header, b'{"amount":1000}', now=1_700_000_000)


def test_a_wrong_secret_does_not_verify():
    header = webhooks.sign("someone-else", 1_700_000_000, b"{}")
    assert not webhooks.verify(SECRET, header, b"{}", now=1_700_000_000)


@pytest.mark.parametrize("age, accepted", [(0, True), (299, True), (301, False), (-301, False), (86_400, False)])
def test_old_or_far_future_timestamps_are_refused_as_replays(age, accepted):
    header = webhooks.sign(SECRET, 1_700_000_000, b"{}")
    assert webhooks.verify(SECRET, header, b"{}", now=1_700_000_000 + age) is accepted


@pytest.mark.parametrize(
    "header", [None, "", "v1=00", "t=1700000000", "t=abc,v1=00", "t=-5,v1=00", "garbage", "t=1700000000,v0=00"]
)
def test_malformed_headers_do_not_verify(header):
    assert not webhooks.verify(SECRET, header, b"{}", now=1_700_000_000)


def test_rotation_signs_with_every_secret_and_verifies_with_any():
    body = b'{"id":"evt_2"}'
    both = webhooks.sign(["new-secret", "old-secret"], 1_700_000_000, body)
    assert both.count("v1=") == 2
    assert webhooks.verify("old-secret", both, body, now=1_700_000_000)
    assert webhooks.verify("new-secret", both, body, now=1_700_000_000)
    old_only = webhooks.sign("old-secret", 1_700_000_000, body)
    assert webhooks.verify(["new-secret", "old-secret"], old_only, body, now=1_700_000_000)
    assert not webhooks.verify(["new-secret", "other"], old_only, body, now=1_700_000_000)


def test_an_empty_secret_is_a_configuration_error():
    with pytest.raises(ValueError):
        webhooks.sign("", 1, b"{}")
    with pytest.raises(ValueError):
        webhooks.verify([], "t=1,v1=00", b"{}")


# Events.


def test_events_are_repeatable_and_a_late_result_gets_its_own_id():
    paid = final_tx()
    event = webhooks.event_for(paid)
    assert event == webhooks.event_for(paid)
    assert event["id"] == f"evt_{CHECKOUT}_completed"
    assert event["type"] == "payment.completed" and event["created"] == int(paid.completed_at)
    assert set(event["data"]) == DATA_FIELDS
    assert event["data"]["phone"] == "2547******78" and event["data"]["receipt"] == "NLJ7RT61SV"
    assert event["data"]["amountConfirmed"] is True
    unconfirmed = webhooks.event_for(final_tx(flags=["amount_unconfirmed", "receipt_unconfirmed"]))
    assert unconfirmed["data"]["amountConfirmed"] is False
    assert event["data"]["completedAt"].endswith("Z")

    failed = webhooks.event_for(final_tx(status="failed"))
    assert failed["id"].endswith("_failed") and failed["type"] == "payment.failed"
    assert failed["data"]["amountConfirmed"] is None
    late = webhooks.event_for(final_tx(flags=["late_result"]))
    assert late["id"] == f"evt_{CHECKOUT}_late"
    with pytest.raises(ValueError):
        webhooks.event_for(final_tx(status="pending"))


# Delivery, sender alone.


def test_notify_returns_at_once_while_the_shop_is_slow(receiver_factory, senders):
    receiver = receiver_factory(delay=1.0)
    store = open_store("memory://")
    store.create(final_tx())
    sender = senders(receiver.url, store)
    started = time.monotonic()
    event = sender.notify(store.get(CHECKOUT))
    assert time.monotonic() - started < 0.3
    assert store.get(CHECKOUT).extra["webhooks"][event]["delivered"] is False
    receiver.wait(1)
    assert wait_until(lambda: store.get(CHECKOUT).extra["webhooks"][event]["delivered"])


def test_a_shop_that_never_succeeds_is_retried_with_growing_delays_then_given_up(receiver_factory, senders):
    receiver = receiver_factory(answers=[500] * 10)
    store = open_store("memory://")
    store.create(final_tx())
    delays: list[float] = []
    sender = senders(receiver.url, store, max_attempts=4, base_delay=1.0, max_delay=3.0, sleep=delays.append)
    event = sender.notify(store.get(CHECKOUT))
    assert sender.flush(10)
    assert receiver.ids() == [event] * 4
    # base * 2**(n-1), capped at max_delay, jittered into its upper half
    assert len(delays) == 3
    for delay, (low, high) in zip(delays, [(0.5, 1.0), (1.0, 2.0), (1.5, 3.0)], strict=True):
        assert low <= delay <= high
    tx = store.get(CHECKOUT)
    assert [e["status"] for e in history(tx, "webhook_attempt")] == [500] * 4
    assert [e["attempt"] for e in history(tx, "webhook_attempt")] == [1, 2, 3, 4]
    assert history(tx, "webhook_given_up")[0]["attempts"] == 4
    assert not history(tx, "webhook_delivered")
    assert tx.extra["webhooks"][event]["givenUp"] is True
    assert sender.redeliver_pending() == 0  # given up stays given up


def test_the_webhook_page_gives_the_settings_figures_and_the_spread_they_make(receiver_factory, senders):
    settings = load_settings({})
    attempts, base, longest = settings.webhook_max_attempts, settings.webhook_base_delay, settings.webhook_max_delay
    # The documented rule: base, 2 base, 4 base ... each at most the longest, drawn from half to all of it.
    nominal = [min(longest, base * 2**n) for n in range(attempts - 1)]
    receiver = receiver_factory(answers=[500] * attempts)
    store = open_store("memory://")
    store.create(final_tx())
    delays: list[float] = []
    sender = senders(
        receiver.url, store, max_attempts=attempts, base_delay=base, max_delay=longest, sleep=delays.append
    )
    sender.notify(store.get(CHECKOUT))
    assert sender.flush(30) and len(receiver.ids()) == attempts
    assert len(delays) == len(nominal)
    for delay, most in zip(delays, nominal, strict=True):
        assert most / 2 <= delay <= most
    page = (ROOT / "docs" / "webhooks.md").read_text(encoding="utf-8")
    assert f"`WEBHOOK_MAX_ATTEMPTS` ({attempts}) attempts" in page
    assert f"`WEBHOOK_BASE_DELAY` ({base:g} s)" in page and f"`WEBHOOK_MAX_DELAY` ({longest:g} s)" in page
    spread = f"about {round(sum(nominal) / 2 / 60)} to {round(sum(nominal) / 60)} minutes"
    assert spread in " ".join(page.split()), spread


def test_an_unreachable_shop_is_recorded_as_a_connection_failure(senders):
    store = open_store("memory://")
    store.create(final_tx())
    sender = senders(f"http://127.0.0.1:{free_port()}/hooks", store, max_attempts=2, base_delay=0.01)
    event = sender.notify(store.get(CHECKOUT))
    assert sender.flush(10)
    attempts = history(store.get(CHECKOUT), "webhook_attempt")
    assert [(a["status"], a["error"]) for a in attempts] == [(None, "connection failed")] * 2
    assert store.get(CHECKOUT).extra["webhooks"][event]["givenUp"]


def test_redeliver_pending_sends_what_a_crashed_process_left_and_nothing_delivered(receiver_factory, senders, tmp_path):
    receiver = receiver_factory()
    store = open_store(f"sqlite:///{tmp_path / 'payments.db'}")
    left, delivered, given_up = (final_tx(checkout(1)), final_tx(checkout(2)), final_tx(checkout(3), status="failed"))
    for tx in (left, delivered, given_up):
        store.create(tx)
    sender = senders(receiver.url, store)
    delivered_id = sender.notify(delivered)
    assert sender.flush(5)
    # What a process leaves when it dies after two failed attempts at one event:
    left_event = webhooks.event_for(left)

    def crashed(tx):
        webhooks.record_event(tx, left_event, time.time())
        tx.extra["webhooks"][left_event["id"]]["attempts"] = 2

    store.update(left.checkout_request_id, crashed)

    def gave_up(tx):
        webhooks.record_event(tx, webhooks.event_for(given_up), time.time())
        tx.extra["webhooks"][webhooks.event_id(given_up)]["givenUp"] = True

    store.update(given_up.checkout_request_id, gave_up)

    restarted = senders(receiver.url, open_store(f"sqlite:///{tmp_path / 'payments.db'}"))
    assert restarted.redeliver_pending() == 1
    assert restarted.flush(5)
    assert receiver.ids() == [delivered_id, left_event["id"]]
    assert receiver.calls[1]["body"] == left_event
    tx = store.get(left.checkout_request_id)
    assert [(e["attempt"], e["status"]) for e in history(tx, "webhook_attempt")] == [(3, 200)]
    assert tx.extra["webhooks"][left_event["id"]]["delivered"] is True
    assert restarted.redeliver_pending() == 0


@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgres"])
def test_two_senders_sharing_a_store_send_an_event_once(backend, receiver_factory, senders, tmp_path, request):
    url = (
        f"sqlite:///{tmp_path / 'payments.db'}"
        if backend == "sqlite"
        else request.getfixturevalue(f"clean_{backend}_url")
    )
    store = open_store(url)
    tx = final_tx()
    store.create(tx)
    store.update(tx.checkout_request_id, lambda t: webhooks.record_event(t, webhooks.event_for(tx), time.time()))
    receiver = receiver_factory(delay=0.3)
    first, second = senders(receiver.url, store), senders(receiver.url, open_store(url))
    with ThreadPoolExecutor(2) as pool:
        sent = list(pool.map(lambda sender: sender.redeliver_pending(wait=5), (first, second)))
    assert sorted(sent) == [0, 1]  # each counts only what it sent itself
    assert receiver.ids() == [webhooks.event_id(tx)]
    assert len(history(store.get(tx.checkout_request_id), "webhook_attempt")) == 1


def test_redeliver_pending_counts_only_events_it_sends(receiver_factory, senders):
    store = open_store("memory://")
    locked, waiting = final_tx(checkout(1)), final_tx(checkout(2))
    for tx in (locked, waiting):
        store.create(tx)
        store.update(tx.checkout_request_id, lambda t: webhooks.record_event(t, webhooks.event_for(t), time.time()))

    def retry_in_a_minute(tx):  # a live process made attempt 1 and keeps attempt 2 for later
        entry = tx.extra["webhooks"][webhooks.event_id(tx)]
        entry.update(attempts=1, nextAttemptAt=time.time() + 60)

    store.update(waiting.checkout_request_id, retry_in_a_minute)
    # A process that died mid-attempt leaves the event's delivery lock until it expires.
    store.add(f"webhook-lock:{webhooks.event_id(locked)}", {"pid": 1}, 60)
    receiver = receiver_factory()
    sender = senders(receiver.url, store)

    assert sender.redeliver_pending() == 0
    assert sender.redeliver_pending(wait=5) == 0
    assert receiver.calls == []
    store.delete(f"webhook-lock:{webhooks.event_id(locked)}")
    assert sender.redeliver_pending(wait=5) == 1
    assert receiver.ids() == [webhooks.event_id(locked)]


def test_a_retry_another_process_has_made_is_not_made_again(receiver_factory, senders, tmp_path):
    url = f"sqlite:///{tmp_path / 'payments.db'}"
    store = open_store(url)
    tx = final_tx()
    store.create(tx)
    store.update(tx.checkout_request_id, lambda t: webhooks.record_event(t, webhooks.event_for(t), time.time()))
    receiver = receiver_factory(answers=[503, 503])
    overtaken = threading.Event()
    owner = senders(receiver.url, store, sleep=lambda delay: overtaken.wait(10))  # its retry waits for us
    assert owner.redeliver_pending() == 1
    wait_until(lambda: history(store.get(CHECKOUT), "webhook_attempt"))

    def fall_due(t):  # as if the retry's time had come while the owner was busy
        t.extra["webhooks"][webhooks.event_id(t)]["nextAttemptAt"] = time.time()

    store.update(CHECKOUT, fall_due)
    other = senders(receiver.url, open_store(url), base_delay=60, max_delay=60)
    assert other.redeliver_pending() == 1
    wait_until(lambda: len(history(store.get(CHECKOUT), "webhook_attempt")) == 2)
    overtaken.set()
    assert owner.flush(5)
    assert [call["status"] for call in receiver.calls] == [503, 503]  # attempt 3 is the other's, later
    attempts = history(store.get(CHECKOUT), "webhook_attempt")
    assert [(a["attempt"], a["status"]) for a in attempts] == [(1, 503), (2, 503)]
    assert attempts[1]["nextAttemptIn"] >= 30


def test_logs_name_the_event_but_never_the_secret_or_the_phone(receiver_factory, senders, caplog):
    receiver = receiver_factory(answers=[503])
    store = open_store("memory://")
    store.create(final_tx())
    sender = senders(receiver.url, store, base_delay=0.01)
    with caplog.at_level(logging.DEBUG, logger="webhooks"):
        sender.notify(store.get(CHECKOUT))
        assert sender.flush(5)
    assert "attempt 1 failed: HTTP 503" in caplog.text and "delivered: HTTP 200, attempt 2" in caplog.text
    assert "evt_ws_CO_2611202310300000171*****78_completed" in caplog.text
    for secret in (SECRET, WAITING, "712345678", "shop-own-token"):
        assert secret not in caplog.text


# End to end.


def push(live, phone, amount=100, **extra) -> tuple[str, str]:
    """Start a payment; its payment id (which event ids carry) and CheckoutRequestID."""
    response = live.post("/stkpush", json={"phone": phone, "amount": amount, **extra})
    assert response.status_code == 200, response.text
    return response.json()["paymentId"], response.json()["checkoutRequestId"]


def admin(live, checkout_id) -> dict:
    response = live.get(f"/transactions/{checkout_id}", headers={"Authorization": "Bearer admin-secret-0123456789"})
    assert response.status_code == 200, response.text
    return response.json()["transaction"]


def delivered(live, checkout_id, count=1) -> dict:
    """The record once `count` webhook deliveries are in its history."""
    tx = wait_until(lambda: (tx := admin(live, checkout_id)) and len(history(tx, "webhook_delivered")) >= count and tx)
    assert tx, f"no {count} delivery(ies) recorded for {checkout_id}"
    return tx


@pytest.fixture
def shop(live_server_factory, receiver_factory):
    """Start a payment server whose merchant webhooks go to a fresh receiver."""

    def start(answers=(), **env):
        receiver = receiver_factory(answers)
        live = live_server_factory(
            **{
                "MERCHANT_WEBHOOK_URL": receiver.url,
                "WEBHOOK_SECRET": SECRET,
                "ADMIN_TOKEN": "admin-secret-0123456789",
                **env,
            }
        )
        return live, receiver

    return start


def test_a_paid_payment_is_delivered_once_signed_with_the_documented_fields(shop):
    live, receiver = shop()
    payment_id, checkout_id = push(live, PAID, 150, description="Order 12345", accountReference="CART_12345")
    (call,) = receiver.wait(1)
    assert webhooks.verify(SECRET, call["headers"][webhooks.SIGNATURE_HEADER], call["raw"])
    assert call["headers"]["Content-Type"] == "application/json"
    event = call["body"]
    assert event["id"] == f"evt_{payment_id}_completed" and event["type"] == "payment.completed"
    assert isinstance(event["created"], int)
    data = event["data"]
    assert set(data) == DATA_FIELDS
    assert data["checkoutRequestId"] == checkout_id and data["status"] == "completed"
    assert data["paymentId"] == payment_id and data["orderId"].startswith("ord_")
    assert data["amount"] == 150 and data["currency"] == "KES" and data["reason"] is None
    assert data["resultCode"] == 0 and len(data["receipt"]) == 10
    assert data["accountReference"] == "CART_12345" and data["description"] == "Order 12345"
    assert data["phone"] == "2547******00" and data["flags"] == []
    assert data["initiatedAt"].endswith("Z") and data["completedAt"].endswith("Z")

    tx = delivered(live, checkout_id)
    assert [(e["status"], e["attempt"]) for e in history(tx, "webhook_attempt")] == [(200, 1)]
    assert tx["extra"]["webhooks"][event["id"]]["delivered"] is True
    time.sleep(0.5)
    assert receiver.ids() == [event["id"]]


def test_while_the_shop_switches_secrets_each_configured_secret_signs_the_event(shop):
    new_secret = "whsec_next_0123456789abcdef"
    live, receiver = shop(WEBHOOK_SECRET=f"{new_secret}, {SECRET}")
    push(live, PAID)
    (call,) = receiver.wait(1)
    header = call["headers"][webhooks.SIGNATURE_HEADER]
    assert header.count("v1=") == 2
    assert webhooks.verify(SECRET, header, call["raw"]) and webhooks.verify(new_secret, header, call["raw"])


def test_a_cancelled_payment_is_delivered_as_failed(shop):
    live, receiver = shop()
    payment_id, checkout_id = push(live, CANCELLED)
    event = receiver.wait(1)[0]["body"]
    assert event["id"] == f"evt_{payment_id}_failed" and event["type"] == "payment.failed"
    assert event["data"]["status"] == "failed" and event["data"]["reason"] == "cancelled"
    assert event["data"]["resultCode"] == 1032 and event["data"]["receipt"] is None
    delivered(live, checkout_id)
    assert receiver.ids() == [event["id"]]


def test_a_process_that_dies_just_after_settling_leaves_the_event_to_be_sent(shop):
    live, receiver = shop()
    payments = live.app.extensions["payments"]

    def dies_before_queueing(tx):  # as if the process were killed right after the write
        raise RuntimeError("gone between the settling write and the webhook queue")

    payments.on_final = dies_before_queueing
    payment_id, checkout_id = push(live, PAID)
    tx = wait_until(lambda: (tx := admin(live, checkout_id)) and tx["status"] == "completed" and tx)
    event_id = f"evt_{payment_id}_completed"
    assert tx["extra"]["webhooks"][event_id]["delivered"] is False  # saved with the verdict
    time.sleep(0.3)
    assert receiver.ids() == []

    # What `flask reconcile` runs after the restart:
    assert live.app.extensions["webhooks"].redeliver_pending() == 1
    assert receiver.wait(1)[0]["body"]["id"] == event_id
    delivered(live, checkout_id)
    assert live.app.extensions["webhooks"].redeliver_pending() == 0


def test_a_failing_shop_gets_the_same_event_until_it_answers_2xx(shop):
    live, receiver = shop(answers=[500, 500])
    payment_id, checkout_id = push(live, PAID)
    calls = receiver.wait(3)
    assert {call["body"]["id"] for call in calls} == {f"evt_{payment_id}_completed"}
    assert len({call["raw"] for call in calls}) == 1  # the same body every time
    for call in calls:
        assert webhooks.verify(SECRET, call["headers"][webhooks.SIGNATURE_HEADER], call["raw"])
    tx = delivered(live, checkout_id)
    assert [(e["status"], e["attempt"]) for e in history(tx, "webhook_attempt")] == [(500, 1), (500, 2), (200, 3)]
    assert len(history(tx, "webhook_delivered")) == 1
    assert len(receiver.ids()) == 3


def test_duplicate_callbacks_from_daraja_cause_no_second_delivery(shop):
    live, receiver = shop()
    response = live.sim(
        "POST", "/simulator/scenarios", json={"phone": WAITING, "resultCode": 0, "delay": 0.1, "callback": "duplicate"}
    )
    assert response.status_code == 201, response.text
    payment_id, checkout_id = push(live, WAITING)
    receiver.wait(1)
    assert wait_until(lambda: history(admin(live, checkout_id), "duplicate_ignored"))
    time.sleep(0.3)
    assert receiver.ids() == [f"evt_{payment_id}_completed"]


def test_a_real_result_after_our_timeout_is_a_second_event(shop, simulator):
    live, receiver = shop(TRANSACTION_TTL="1")
    live.sim("PATCH", "/simulator/config", json={"query_min_interval": 0})
    payment_id, checkout_id = push(live, WAITING)
    time.sleep(1.1)
    assert live.post("/stkpush/status", json={"checkoutRequestId": checkout_id}).json()["reason"] == "timeout"
    timed_out = receiver.wait(1)[0]["body"]
    assert timed_out["id"] == f"evt_{payment_id}_failed"
    assert timed_out["data"]["reason"] == "timeout"

    live.sim("POST", f"/simulator/prompts/{checkout_id}/pin", json={"pin": "1234"})
    late = receiver.wait(2)[1]["body"]
    assert late["id"] == f"evt_{payment_id}_late" and late["type"] == "payment.completed"
    assert late["data"]["flags"] == ["late_result"] and late["created"] >= timed_out["created"]
    delivered(live, checkout_id, count=2)


# Resuming by itself after a restart, once across workers (real server processes).

SERVER_PY = [sys.executable, "server.py"]


def serve(command, simulator, store_url: str, shop_url: str, log_path, **env) -> ServerProcess:
    """The server as an operator runs it, its webhooks going to shop_url, upkeep every second."""
    port = free_port()
    settings = {
        "MPESA_ENV": "simulator",
        "MPESA_BASE_URL": simulator.url,
        "PORT": str(port),
        "CALLBACK_URL": f"http://127.0.0.1:{port}",
        "CALLBACK_TOKEN": CALLBACK_TOKEN,
        "STORE_URL": store_url,
        "RATELIMIT_ENABLED": "false",
        "MERCHANT_WEBHOOK_URL": shop_url,
        "WEBHOOK_SECRET": SECRET,
        "UPKEEP_SECONDS": "1",
        **env,
    }
    return ServerProcess(command, settings, port, log_path)


def pay(server: ServerProcess, simulator, count: int) -> list[str]:
    """Start `count` payments and pay each on the simulated handset; their payment ids."""
    answers = []
    for n in range(count):
        response = requests.post(server.url + "/stkpush", json={"phone": f"0711{n:06d}", "amount": 100}, timeout=10)
        assert response.status_code == 200, response.text
        answers.append(response.json())
    for answer in answers:
        prompt = f"{simulator.url}/simulator/prompts/{answer['checkoutRequestId']}/pin"
        requests.post(prompt, json={"pin": "1234"}, timeout=5)
    return [answer["paymentId"] for answer in answers]


def every_event(store, ids: list[str], check) -> bool:
    """Whether every payment has its completed event, each entry passing check."""
    records = [store.get(payment_id) for payment_id in ids]
    entries = [(tx.extra.get("webhooks") or {}).get(f"evt_{tx.payment_id}_completed") for tx in records if tx]
    return len(entries) == len(ids) and all(entry and check(entry) for entry in entries)


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def shared_store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'payments.db'}"
    return request.getfixturevalue(f"clean_{request.param}_url")


@pytest.mark.parametrize(
    "command, stop, workers",
    [(SERVER_PY, signal.SIGINT, "1"), (PROCFILE_COMMAND, signal.SIGTERM, "3")],
    ids=["server.py", "procfile"],
)
def test_a_restarted_server_sends_the_pending_events_by_itself(
    command, stop, workers, shared_store_url, simulator, receiver_factory, tmp_path
):
    shop_port = free_port()  # nothing listens there yet: the shop is down
    shop_url = f"http://127.0.0.1:{shop_port}/shop/mpesa-events"
    env = {"WEB_CONCURRENCY": workers, "WEBHOOK_BASE_DELAY": "2", "WEBHOOK_MAX_DELAY": "2"}
    server = serve(command, simulator, shared_store_url, shop_url, tmp_path / "first.log", **env)
    store = open_store(shared_store_url)
    try:
        ids = pay(server, simulator, 5)
        wait_until(lambda: every_event(store, ids, lambda entry: entry["attempts"] >= 1), timeout=20)
    finally:
        server.kill(stop)  # stopped as an operator stops it
    assert every_event(store, ids, lambda entry: not entry["delivered"])

    shop = receiver_factory(port=shop_port)
    restarted = serve(command, simulator, shared_store_url, shop_url, tmp_path / "second.log", **env)
    try:
        wait_until(lambda: every_event(store, ids, lambda entry: entry["delivered"]), timeout=20)
    finally:
        restarted.kill(signal.SIGTERM)
    # No reconcile ran; each event came once, verified, and resumed at its recorded attempt count.
    for payment_id in ids:
        (delivery,) = shop.deliveries_of(f"evt_{payment_id}_completed")
        assert webhooks.verify(SECRET, delivery["headers"][webhooks.SIGNATURE_HEADER], delivery["raw"])
        attempts = history(store.get(payment_id), "webhook_attempt")
        assert [a["status"] for a in attempts] == [None] * (len(attempts) - 1) + [200]
        assert [a["attempt"] for a in attempts] == list(range(1, len(attempts) + 1))


def test_several_workers_make_each_attempt_once_and_on_time(shared_store_url, simulator, receiver_factory, tmp_path):
    shop = receiver_factory(fail_first=2)
    # Retries fall due every 1 to 2 s and upkeep rounds come every second, in whichever
    # worker holds the lease: both try to send the same attempts.
    env = {"WEB_CONCURRENCY": "3", "WEB_THREADS": "4", "WEBHOOK_BASE_DELAY": "2", "WEBHOOK_MAX_DELAY": "2"}
    server = serve(PROCFILE_COMMAND, simulator, shared_store_url, shop.url, tmp_path / "server.log", **env)
    store = open_store(shared_store_url)
    try:
        ids = pay(server, simulator, 5)
        wait_until(lambda: every_event(store, ids, lambda entry: entry["delivered"]), timeout=30)
    finally:
        server.kill(signal.SIGTERM)
    for payment_id in ids:
        deliveries = shop.deliveries_of(f"evt_{payment_id}_completed")
        attempts = history(store.get(payment_id), "webhook_attempt")
        assert [(a["attempt"], a["status"]) for a in attempts] == [(1, 503), (2, 503), (3, 200)]
        assert [d["status"] for d in deliveries] == [503, 503, 200]
        for previous, delivery in zip(attempts, deliveries[1:], strict=False):
            # Sent when due, not by a round that found it pending: at or after the recorded time.
            assert delivery["at"] >= previous["at"] + previous["nextAttemptIn"] - 0.001


def test_reconcile_counts_only_the_events_it_sent(simulator, receiver_factory, tmp_path):
    store_url = f"sqlite:///{tmp_path / 'payments.db'}"
    store = open_store(store_url)
    tx = final_tx()
    store.create(tx)
    store.update(CHECKOUT, lambda t: webhooks.record_event(t, webhooks.event_for(t), time.time()))
    lock = f"webhook-lock:{webhooks.event_id(tx)}"
    store.add(lock, {"pid": 1}, 60)  # left by a process killed mid-attempt
    shop = receiver_factory()

    def reconcile() -> str:
        env = {
            **os.environ,
            "MPESA_ENV": "simulator",
            "MPESA_BASE_URL": simulator.url,
            "STORE_URL": store_url,
            "CALLBACK_TOKEN": CALLBACK_TOKEN,
            "MERCHANT_WEBHOOK_URL": shop.url,
            "WEBHOOK_SECRET": SECRET,
        }
        command = [sys.executable, "-m", "flask", "--app", "server", "reconcile"]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "0 webhook event(s) re-sent" in reconcile()
    assert shop.calls == []
    store.delete(lock)  # expired
    assert "1 webhook event(s) re-sent" in reconcile()
    assert shop.ids() == [webhooks.event_id(tx)]
    assert "0 webhook event(s) re-sent" in reconcile()
