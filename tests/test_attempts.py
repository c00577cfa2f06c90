"""A payment exists before its push leaves: found by its own id whatever Daraja's answer did.

End to end, through a live server and the simulator: a push whose answer is lost, a push
Daraja refuses, a payment whose outcome never becomes known, callbacks that match no
payment, and orders paid by a later attempt.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

import simulator as sim
from api import idempotency_slot
from tests.helpers import (
    CALLBACK_TOKEN,
    CANCELLED,
    PAID,
    WAITING,
    FakeClock,
    admin,
    callback_body,
    hook,
    payment,
    wait_until,
)


@pytest.fixture
def live(live_server_factory):
    return live_server_factory(ADMIN_TOKEN="admin-secret-0123456789")


def status(live, payment_id: str) -> dict:
    response = live.get(f"/stkpush/status/{payment_id}")
    assert response.status_code == 200, response.text
    return response.json()


def settled(live, payment_id: str, until=lambda answer: answer["status"] != "pending") -> dict:
    return wait_until(lambda: (answer := status(live, payment_id)) and until(answer) and answer)


def events(record: dict) -> list[str]:
    return [entry["event"] for entry in record["history"]]


def lose_the_push_answer(live) -> None:
    """The next push reaches the simulator but its answer comes after the server gave up."""
    live.get("/health?deep=1")  # the token first, so that only the push is slow
    fault = {"endpoint": "stkpush", "mode": "slow", "delay": 1.5}
    assert live.sim("POST", "/simulator/faults", json=fault).status_code == 201


def prompt_on(live, phone: str) -> dict:
    """The simulator's pending prompt on phone, once it exists."""

    def pending():
        prompts = live.sim("GET", "/simulator/prompts", params={"phone": phone, "status": "pending"}).json()
        return prompts["prompts"][0] if prompts["prompts"] else None

    return wait_until(pending)


def pay(live, checkout_id: str) -> None:
    answer = live.sim("POST", f"/simulator/prompts/{checkout_id}/pin", json={"pin": sim.SIM_PIN})
    assert answer.status_code == 200, answer.text


# A payment is recorded before its push, under an id of its own.


def test_a_push_answer_names_the_payment_and_its_order(live):
    started = payment(live, PAID, orderId="CART-77")
    assert started["paymentId"].startswith("pay_") and len(started["paymentId"]) == 4 + 24
    assert started["orderId"] == "CART-77"
    record = admin(live, started["paymentId"])
    assert record["checkout_request_id"] == started["checkoutRequestId"]
    assert events(record)[:2] == ["initiated", "push_accepted"]
    assert status(live, started["checkoutRequestId"])["paymentId"] == started["paymentId"]


def test_each_attempt_without_an_order_id_gets_an_order_of_its_own(live):
    first, second = payment(live, WAITING), payment(live, "254712345679")
    assert first["orderId"].startswith("ord_") and first["orderId"] != second["orderId"]


@pytest.mark.parametrize("order_id", ["", "a b", "x" * 65, 7, ["ORD-1"]])
def test_a_bad_order_id_is_refused_naming_it(live, order_id):
    response = live.post("/stkpush", json={"phone": PAID, "amount": 100, "orderId": order_id})
    assert response.status_code == 400 and response.json()["field"] == "orderId"


def test_a_push_whose_answer_is_lost_is_found_by_its_payment_id_and_completed_by_its_callback(
    live_server_factory, simulator
):
    live = live_server_factory(ADMIN_TOKEN="admin-secret-0123456789", DARAJA_TIMEOUT="0.5")
    lose_the_push_answer(live)
    response = live.post("/stkpush", json={"phone": WAITING, "amount": 250})
    assert response.status_code == 504
    lost = response.json()
    assert lost["status"] == "pending" and "may still reach the phone" in lost["message"]
    waiting = status(live, lost["paymentId"])
    assert (waiting["status"], waiting["checkoutRequestId"], waiting["amount"]) == ("pending", None, 250)

    prompt = prompt_on(live, WAITING)  # the prompt went out all the same
    pay(live, prompt["checkoutRequestId"])
    paid = settled(live, lost["paymentId"])
    assert (paid["status"], paid["checkoutRequestId"]) == ("completed", prompt["checkoutRequestId"])
    assert paid["MpesaReceiptNumber"] == prompt_on_record(live, prompt["checkoutRequestId"])["receipt"]
    record = admin(live, lost["paymentId"])
    assert events(record)[:4] == ["initiated", "push_outcome_unknown", "matched_by_callback_url", "callback_received"]
    assert status(live, prompt["checkoutRequestId"])["paymentId"] == lost["paymentId"]


def prompt_on_record(live, checkout_id: str) -> dict:
    return live.sim("GET", f"/simulator/prompts/{checkout_id}").json()


def test_a_refused_push_is_a_failed_payment_and_no_prompt_comes(live):
    payment(live, WAITING)
    response = live.post("/stkpush", json={"phone": WAITING, "amount": 100})  # the phone is busy: refused
    assert response.status_code == 502
    refused = response.json()
    assert refused["status"] == "failed" and refused["errorCode"] == "500.001.1001"
    answer = status(live, refused["paymentId"])
    assert (answer["status"], answer["reason"], answer["checkoutRequestId"]) == ("failed", "rejected", None)
    assert "refused" in answer["message"]
    record = admin(live, refused["paymentId"])
    assert record["settled_by"] == "push" and events(record)[:2] == ["initiated", "push_refused"]
    assert "push_accepted" not in events(record)


# Our own verdict when the push's outcome never became known.


def test_a_payment_whose_push_was_never_answered_is_settled_unknown_then_replaced_by_its_callback(
    live_server_factory, simulator
):
    live = live_server_factory(ADMIN_TOKEN="admin-secret-0123456789", DARAJA_TIMEOUT="0.5", TRANSACTION_TTL="2")
    lose_the_push_answer(live)
    lost = live.post("/stkpush", json={"phone": WAITING, "amount": 100}).json()
    prompt = prompt_on(live, WAITING)
    unknown = settled(live, lost["paymentId"])
    assert (unknown["status"], unknown["reason"], unknown["resultCode"]) == ("failed", "unknown", None)
    assert "never said" in unknown["message"]
    assert admin(live, lost["paymentId"])["settled_by"] == "timeout"

    pay(live, prompt["checkoutRequestId"])  # the customer paid after all
    paid = settled(live, lost["paymentId"], until=lambda answer: answer["status"] == "completed")
    assert paid["checkoutRequestId"] == prompt["checkoutRequestId"]
    assert "late_result" in admin(live, lost["paymentId"])["flags"]


def test_reconcile_settles_a_payment_without_a_checkout_id(live_server_factory, simulator):
    live = live_server_factory(ADMIN_TOKEN="admin-secret-0123456789", DARAJA_TIMEOUT="0.5", TRANSACTION_TTL="1")
    lose_the_push_answer(live)
    lost = live.post("/stkpush", json={"phone": WAITING, "amount": 100}).json()
    payments = live.app.extensions["payments"]
    settled_now = wait_until(lambda: payments.reconcile())
    assert [(tx.payment_id, tx.reason, tx.settled_by) for tx in settled_now] == [
        (lost["paymentId"], "unknown", "timeout")
    ]
    prompt_on(live, WAITING)  # the slow push ends here, not in the next test


# Callbacks: by the payment id in their URL, else by CheckoutRequestID, else a record of their own.


def test_a_callback_whose_checkout_id_is_another_payments_settles_that_one(live):
    first, second = payment(live, WAITING), payment(live, "254712345679")
    body = callback_body(second["checkoutRequestId"], amount=100)
    assert live.post(hook(live, CALLBACK_TOKEN, first["paymentId"]), json=body).json()["ResultCode"] == 0
    assert status(live, second["paymentId"])["status"] == "completed"
    assert status(live, first["paymentId"])["status"] == "pending"


def test_a_callback_with_a_wrong_token_changes_nothing_even_with_a_payment_id(live):
    waiting = payment(live, WAITING)
    body = callback_body(waiting["checkoutRequestId"], amount=100)
    answer = live.post(hook(live, "guessed-token-guessed-token", waiting["paymentId"]), json=body)
    assert answer.status_code == 403
    assert status(live, waiting["paymentId"])["status"] == "pending"


def test_an_unmatched_callback_is_never_matched_on_phone_and_amount(live):
    waiting = payment(live, WAITING, 100)
    body = callback_body("ws_CO_foreign", amount=100)  # the same phone and amount
    assert live.post(hook(live), json=body).json() == {"ResultCode": 0, "ResultDesc": "Accepted"}
    assert status(live, waiting["paymentId"])["status"] == "pending"
    unmatched = status(live, "ws_CO_foreign")
    assert unmatched["paymentId"] != waiting["paymentId"] and unmatched["unmatched"] is True
    assert (unmatched["status"], unmatched["amount"]) == ("completed", 100)


def test_a_repeated_unmatched_callback_makes_one_record(live):
    for _ in range(2):
        live.post(hook(live, CALLBACK_TOKEN, "pay_000000000000000000000000"), json=callback_body("ws_CO_twice"))
    found = live.get(
        "/transactions", params={"limit": 100}, headers={"Authorization": "Bearer admin-secret-0123456789"}
    )
    records = [tx for tx in found.json()["transactions"] if tx["checkout_request_id"] == "ws_CO_twice"]
    assert len(records) == 1
    assert events(records[0]).count("duplicate_ignored") == 1


def test_an_unmatched_failure_is_recorded_without_phone_or_amount(live):
    live.post(hook(live), json=callback_body("ws_CO_gone", code=1032))
    answer = status(live, "ws_CO_gone")
    assert (answer["status"], answer["reason"], answer["amount"], answer["phone"]) == ("failed", "cancelled", 0, "")
    assert answer["unmatched"] is True


# Orders and their attempts.


def test_a_later_attempt_completes_the_order_an_earlier_attempt_failed(live):
    first = payment(live, CANCELLED, 300, orderId="ORDER-7")
    assert settled(live, first["paymentId"])["orderStatus"] == "failed"
    second = payment(live, PAID, 300, orderId="ORDER-7")
    assert settled(live, second["paymentId"])["orderStatus"] == "completed"
    again = status(live, first["paymentId"])
    assert (again["status"], again["reason"], again["orderStatus"]) == ("failed", "cancelled", "completed")


@pytest.mark.parametrize("store", ["memory", "sqlite", "redis", "postgres"])
def test_a_pending_attempt_answers_its_order_paid_once_another_attempt_paid_it(
    live_server_factory, request, tmp_path, store
):
    urls = {
        "memory": lambda: "memory://",
        "sqlite": lambda: f"sqlite:///{tmp_path / 'shared.db'}",
        "redis": lambda: request.getfixturevalue("clean_redis_url"),
        "postgres": lambda: request.getfixturevalue("clean_postgres_url"),
    }
    first_server = live_server_factory(STORE_URL=urls[store]())
    # A second server on a shared store polls what the first started (a memory store is its own).
    other = live_server_factory(STORE_URL=urls[store]()) if store != "memory" else first_server
    first = payment(first_server, WAITING, 300, orderId="ORDER-9")  # its prompt waits for the handset
    for server in (first_server, other):  # each server reads the record and the order's marker
        for identifier in (first["paymentId"], first["checkoutRequestId"]):
            assert (status(server, identifier)["status"], status(server, identifier)["orderStatus"]) == (
                "pending",
                "pending",
            )
    second = payment(first_server, PAID, 300, orderId="ORDER-9")
    assert settled(first_server, second["paymentId"])["status"] == "completed"
    for server in (first_server, other):
        for identifier in (first["paymentId"], first["checkoutRequestId"]):
            answer = status(server, identifier)
            assert (answer["status"], answer["orderStatus"]) == ("pending", "completed")


def test_an_attempt_for_another_amount_does_not_complete_the_order(live):
    first = payment(live, CANCELLED, 300, orderId="ORDER-8")
    settled(live, first["paymentId"])
    assert settled(live, payment(live, PAID, 1, orderId="ORDER-8")["paymentId"])["status"] == "completed"
    assert status(live, first["paymentId"])["orderStatus"] == "failed"


def test_old_callback_urls_still_settle_their_payments(live):
    started = payment(live, WAITING)
    body = callback_body(started["checkoutRequestId"], amount=100)
    assert requests.post(live.url + hook(live), json=body, timeout=10).status_code == 200
    assert status(live, started["paymentId"])["status"] == "completed"


# Idempotency-Key: the first answer, or the payment's state when the first request died.


def claim_as_a_dead_request_left_it(live, key: str, body: dict, *, lease_until: float, payment_id: str) -> None:
    """The key's slot as a first request leaves it when it dies before it finishes."""
    fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    slot = {"fingerprint": fingerprint, "state": "started", "lease_until": lease_until, "paymentId": payment_id}
    assert live.app.extensions["store"].add(idempotency_slot(key), slot, 3600)


def test_a_retry_while_the_first_request_may_still_run_is_a_conflict(live):
    body = {"phone": WAITING, "amount": 100}
    claim_as_a_dead_request_left_it(
        live, "order-9", body, lease_until=time.time() + 60, payment_id="pay_00000000000000000000aaaa"
    )
    answer = live.post("/stkpush", json=body, headers={"Idempotency-Key": "order-9"})
    assert answer.status_code == 409 and "still in progress" in answer.json()["message"]
    assert 1 <= answer.json()["retryAfter"] <= 60  # when the lease of the first request ends
    assert live.sim("GET", "/simulator/prompts", params={"phone": WAITING}).json()["prompts"] == []


def test_a_retry_after_a_first_request_that_died_before_its_record_makes_the_push(live):
    body = {"phone": WAITING, "amount": 100}
    payment_id = "pay_00000000000000000000bbbb"
    claim_as_a_dead_request_left_it(live, "order-10", body, lease_until=time.time() - 1, payment_id=payment_id)
    answer = live.post("/stkpush", json=body, headers={"Idempotency-Key": "order-10"})
    assert answer.status_code == 200 and "Idempotent-Replayed" not in answer.headers
    assert answer.json()["paymentId"] == payment_id  # the id the slot named: one payment, whoever makes it
    again = live.post("/stkpush", json=body, headers={"Idempotency-Key": "order-10"})
    assert again.json() == answer.json() and again.headers["Idempotent-Replayed"] == "true"
    assert len(live.sim("GET", "/simulator/prompts", params={"phone": WAITING}).json()["prompts"]) == 1


def test_a_retry_after_a_first_request_that_died_during_its_push_gets_the_payment_state(live_server_factory, simulator):
    live = live_server_factory(ADMIN_TOKEN="admin-secret-0123456789", DARAJA_TIMEOUT="5")
    clock = FakeClock(time.time())
    live.app.extensions["payments"].clock = clock
    live.get("/health?deep=1")
    live.sim("POST", "/simulator/faults", json={"endpoint": "stkpush", "mode": "slow", "delay": 1.0})
    body, headers = {"phone": WAITING, "amount": 100}, {"Idempotency-Key": "order-11"}
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(live.post, "/stkpush", json=body, headers=headers)
        record = wait_until(lambda: live.app.extensions["store"].search(status="pending")[0])
        assert live.post("/stkpush", json=body, headers=headers).status_code == 409  # within its lease
        clock.advance(5 + 30 + 1)  # past the lease: from here on, the first request counts as dead
        retry = live.post("/stkpush", json=body, headers=headers)
        assert retry.status_code == 200 and retry.headers["Idempotent-Replayed"] == "true"
        state = retry.json()
        assert (state["paymentId"], state["status"]) == (record[0].payment_id, "pending")
        assert first.result().status_code == 200  # it was only slow, after all
    assert first.result().json()["paymentId"] == state["paymentId"]
    assert len(live.sim("GET", "/simulator/prompts", params={"phone": WAITING}).json()["prompts"]) == 1


def test_a_push_that_timed_out_keeps_its_answer_for_retries(live_server_factory, simulator):
    live = live_server_factory(ADMIN_TOKEN="admin-secret-0123456789", DARAJA_TIMEOUT="0.5")
    lose_the_push_answer(live)
    body, headers = {"phone": WAITING, "amount": 100}, {"Idempotency-Key": "order-12"}
    first = live.post("/stkpush", json=body, headers=headers)
    retry = live.post("/stkpush", json=body, headers=headers)
    assert first.status_code == retry.status_code == 504
    assert retry.json() == first.json() and retry.json()["paymentId"].startswith("pay_")
    prompt_on(live, WAITING)
    assert len(live.sim("GET", "/simulator/prompts", params={"phone": WAITING}).json()["prompts"]) == 1


def test_a_key_whose_push_was_refused_may_push_again(live):
    payment(live, WAITING)
    body, headers = {"phone": WAITING, "amount": 100}, {"Idempotency-Key": "order-13"}
    first = live.post("/stkpush", json=body, headers=headers)
    assert first.status_code == 502 and first.json()["status"] == "failed"
    live.sim("POST", f"/simulator/prompts/{prompt_on(live, WAITING)['checkoutRequestId']}/cancel")
    again = live.post("/stkpush", json=body, headers=headers)
    assert again.status_code == 200 and "Idempotent-Replayed" not in again.headers
    assert again.json()["paymentId"] != first.json()["paymentId"]
