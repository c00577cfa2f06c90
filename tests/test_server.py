"""The payment server end to end: real HTTP to the server, real HTTP to the simulator."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import requests

from api import FinalAnswers
from payments import settled_for_good
from store import Transaction
from tests.helpers import (
    BROKE,
    CANCELLED,
    PAID,
    PROCFILE_COMMAND,
    ROOT,
    SERVER_DEFAULTS,
    UNREACHABLE,
    WAITING,
    WRONG_PIN,
    FakeClock,
    ServerProcess,
    admin,
    callback_body,
    free_port,
    hook,
    poll,
    started,
    wait_until,
)


def push(live, phone=PAID, amount=100, **extra):
    return live.post("/stkpush", json={"phone": phone, "amount": amount, **extra}, headers=extra.pop("headers", None))


def events(tx) -> list[str]:
    return [entry["event"] for entry in tx["history"]]


def sim_rule(live, **rule):
    response = live.sim("POST", "/simulator/scenarios", json=rule)
    assert response.status_code == 201, response.text


@pytest.fixture
def live(live_server_factory, simulator):
    requests.patch(simulator.url + "/simulator/config", json={"auto_delay": 0.2}, timeout=5)
    return live_server_factory(ADMIN_TOKEN="admin-secret-0123456789")


# Outcomes.


def test_paid_payment_completes_with_its_receipt(live):
    response = push(live, PAID, 150, description="DJ Kraph Checkout", accountReference="CART_12345")
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True and body["status"] == "pending"
    assert body["message"] == "STK push sent successfully"
    assert body["checkoutRequestId"].startswith("ws_CO_") and body["merchantRequestId"]
    assert body["customerMessage"]

    answer = poll(live, body["checkoutRequestId"])
    assert answer["success"] is True and answer["status"] == "completed"
    assert answer["amount"] == 150
    assert answer["transaction_id"] == answer["MpesaReceiptNumber"] and len(answer["transaction_id"]) == 10
    assert answer["phone"] == "2547******00"
    assert answer["completedAt"].endswith("Z")
    assert answer["transactionDate"].endswith("+03:00")

    tx = admin(live, body["checkoutRequestId"])
    assert tx["settled_by"] == "callback"
    assert tx["callback"]["Body"]["stkCallback"]["ResultCode"] == 0
    assert tx["description"] == "DJ Kraph Checkout" and tx["account_reference"] == "CART_12345"
    assert events(tx)[:2] == ["initiated", "push_accepted"]
    assert "callback_received" in events(tx) and events(tx)[-1] == "completed"


@pytest.mark.parametrize(
    "phone, reason, code, words",
    [
        (CANCELLED, "cancelled", 1032, "cancelled"),
        (WRONG_PIN, "wrong_pin", 2001, "PIN"),
        (BROKE, "insufficient_funds", 1, "balance"),
        (UNREACHABLE, "timeout", 1037, "reached"),
    ],
)
def test_failed_payments_say_why(live, phone, reason, code, words):
    answer = poll(live, started(live, phone))
    assert answer["success"] is False and answer["status"] == "failed"
    assert answer["reason"] == reason and answer["resultCode"] == code
    assert words.lower() in answer["message"].lower()


def test_person_on_the_handset_pays_with_the_pin(live):
    checkout_id = started(live)
    assert poll(live, checkout_id, timeout=0.3)["status"] == "pending"
    assert live.sim("POST", f"/simulator/prompts/{checkout_id}/pin", json={"pin": "1234"}).ok
    assert poll(live, checkout_id)["status"] == "completed"


def test_nobody_answers_so_the_payment_times_out(live_server_factory, simulator):
    live = live_server_factory(
        TRANSACTION_TTL="1",
        STATUS_FIRST_QUERY_AFTER="0.2",
        STATUS_QUERY_INTERVAL="0.2",
        ADMIN_TOKEN="admin-secret-0123456789",
    )
    checkout_id = started(live)
    answer = poll(live, checkout_id, timeout=5)
    assert answer["status"] == "failed" and answer["reason"] == "timeout"
    assert "timed out" in answer["message"]
    tx = admin(live, checkout_id)
    assert tx["settled_by"] == "timeout" and events(tx)[-1] == "timed_out"


def test_a_real_result_after_our_timeout_still_counts(live_server_factory, simulator):
    live = live_server_factory(TRANSACTION_TTL="1", ADMIN_TOKEN="admin-secret-0123456789")
    requests.patch(simulator.url + "/simulator/config", json={"query_min_interval": 0}, timeout=5)
    checkout_id = started(live)
    time.sleep(1.1)
    assert poll(live, checkout_id)["reason"] == "timeout"
    live.sim("POST", f"/simulator/prompts/{checkout_id}/pin", json={"pin": "1234"})
    answer = poll(live, checkout_id, until=lambda a: a["status"] == "completed", timeout=5)
    assert answer["status"] == "completed"
    assert "late_result" in admin(live, checkout_id)["flags"]


# Callbacks and query.


def test_lost_callback_is_settled_by_query(live_server_factory, simulator):
    live = live_server_factory(
        STATUS_FIRST_QUERY_AFTER="0.3", STATUS_QUERY_INTERVAL="0.3", ADMIN_TOKEN="admin-secret-0123456789"
    )
    sim_rule(live, phone=WAITING, resultCode=0, delay=0.1, callback="drop")
    checkout_id = started(live)
    answer = poll(live, checkout_id)
    assert answer["status"] == "completed"
    tx = admin(live, checkout_id)
    assert tx["settled_by"] == "query" and tx["callback"] is None
    assert "queried" in events(tx) or "query_received" in events(tx)


def test_late_callback_adds_the_receipt_to_a_query_settled_payment(live_server_factory, simulator):
    live = live_server_factory(
        STATUS_FIRST_QUERY_AFTER="0.2", STATUS_QUERY_INTERVAL="0.2", ADMIN_TOKEN="admin-secret-0123456789"
    )
    sim_rule(live, phone=WAITING, resultCode=0, delay=0.1, callbackDelay=1.5)
    checkout_id = started(live)
    assert poll(live, checkout_id)["status"] == "completed"
    answer = poll(live, checkout_id, until=lambda a: a.get("MpesaReceiptNumber"), timeout=5)
    assert answer["MpesaReceiptNumber"]
    assert "receipt_added" in events(admin(live, checkout_id))


def test_status_queries_daraja_at_most_once_per_interval(live_server_factory, simulator):
    live = live_server_factory(STATUS_FIRST_QUERY_AFTER="0", STATUS_QUERY_INTERVAL="5")
    checkout_id = started(live)
    before = live.sim("GET", "/simulator/stats").json()["queries"]
    for _ in range(20):
        assert poll(live, checkout_id, timeout=0)["status"] == "pending"
    assert live.sim("GET", "/simulator/stats").json()["queries"] - before == 1


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_workers_sharing_a_store_query_once_per_interval_and_again_after_it(
    live_server_factory, request, tmp_path, store
):
    # Each worker remembers until when an interval it found taken lasts; the next interval's
    # query must still go out, from whichever worker polls first.
    url = f"sqlite:///{tmp_path / 'shared.db'}" if store == "sqlite" else request.getfixturevalue("clean_redis_url")
    settings = {"STORE_URL": url, "STATUS_FIRST_QUERY_AFTER": "0", "STATUS_QUERY_INTERVAL": "1"}
    settings["ADMIN_TOKEN"] = "admin-secret-0123456789"
    workers = [live_server_factory(**settings) for _ in range(2)]
    checkout_id = started(workers[0])

    def query_times() -> list[float]:
        return [entry["at"] for entry in admin(workers[0], checkout_id)["history"] if entry["event"] == "queried"]

    def queried_twice() -> bool:
        for worker in workers:
            assert poll(worker, checkout_id, timeout=0)["status"] == "pending"  # the prompt lasts 5 s
        return len(query_times()) >= 2

    wait_until(queried_twice, timeout=10)
    first, second = query_times()[:2]
    assert second - first >= 1


def test_duplicate_callbacks_change_nothing(live):
    sim_rule(live, phone=WAITING, resultCode=0, delay=0.1, callback="duplicate")
    checkout_id = started(live)
    first = poll(live, checkout_id)
    deadline = time.monotonic() + 5
    while "duplicate_ignored" not in events(admin(live, checkout_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "duplicate_ignored" in events(admin(live, checkout_id))
    assert poll(live, checkout_id) == first


def test_contradicting_late_callback_is_ignored(live):
    sim_rule(live, phone=WAITING, resultCode=1032, delay=0.1, callback="contradict")
    checkout_id = started(live)
    assert poll(live, checkout_id)["reason"] == "cancelled"
    deadline = time.monotonic() + 5
    while "contradiction_ignored" not in events(admin(live, checkout_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "contradiction_ignored" in events(admin(live, checkout_id))
    assert poll(live, checkout_id)["reason"] == "cancelled"


def test_spoofed_callback_is_refused_and_changes_nothing(live):
    checkout_id = started(live)
    response = live.post(hook(live, "guessed-token-guessed-token"), json=callback_body(checkout_id))
    assert response.status_code == 403 and response.json()["success"] is False
    assert poll(live, checkout_id, timeout=0)["status"] == "pending"


def test_amount_mismatch_is_not_completed(live):
    checkout_id = started(live, amount=100)
    response = live.post(hook(live), json=callback_body(checkout_id, amount=1.0))
    assert response.json() == {"ResultCode": 0, "ResultDesc": "Accepted"}
    answer = poll(live, checkout_id, timeout=0)
    assert answer["status"] == "failed" and answer["success"] is False
    assert "does not match" in answer["message"]
    assert "amount_mismatch" in admin(live, checkout_id)["flags"]


def test_callback_for_unknown_id_is_acknowledged(live):
    response = live.post(hook(live), json=callback_body("ws_CO_unknown"))
    assert response.status_code == 200
    assert response.json() == {"ResultCode": 0, "ResultDesc": "Accepted"}


def test_malformed_callback_is_a_400(live):
    for body in ({"Body": {}}, {"hello": "world"}):
        response = live.post(hook(live), json=body)
        assert response.status_code == 400
    assert live.post(hook(live), data="not json", headers={"Content-Type": "text/plain"}).status_code == 400


def test_callback_result_is_visible_to_the_next_poll(live):
    checkout_id = started(live)
    live.post(hook(live), json=callback_body(checkout_id, code=1032))
    assert poll(live, checkout_id, timeout=0)["reason"] == "cancelled"


# Idempotency.


def test_retry_with_the_same_key_sends_no_second_prompt(live):
    headers = {"Idempotency-Key": "order-42-attempt-1"}
    body = {"phone": WAITING, "amount": 100}
    first = live.post("/stkpush", json=body, headers=headers)
    second = live.post("/stkpush", json=body, headers=headers)
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert second.headers["Idempotent-Replayed"] == "true"
    prompts = live.sim("GET", "/simulator/prompts", params={"phone": WAITING}).json()["prompts"]
    assert len(prompts) == 1


def test_same_key_with_another_body_is_a_conflict(live):
    headers = {"Idempotency-Key": "order-43"}
    assert live.post("/stkpush", json={"phone": WAITING, "amount": 100}, headers=headers).ok
    other = live.post("/stkpush", json={"phone": WAITING, "amount": 200}, headers=headers)
    assert other.status_code == 409
    assert other.json()["success"] is False and other.json()["field"] == "Idempotency-Key"


def test_a_key_whose_request_was_refused_can_be_used_again(live):
    headers = {"Idempotency-Key": "order-44"}
    assert live.post("/stkpush", json={"phone": "123", "amount": 100}, headers=headers).status_code == 400
    assert live.post("/stkpush", json={"phone": "123", "amount": 100}, headers=headers).status_code == 400


# Daraja trouble.


def test_daraja_unreachable_is_503_and_the_payment_failed_without_a_prompt(live_server_factory):
    live = live_server_factory(MPESA_BASE_URL="http://127.0.0.1:9")
    response = push(live)
    assert response.status_code == 503
    body = response.json()
    assert body == {
        "success": False,
        "message": "M-Pesa cannot be reached right now; try again shortly",
        "paymentId": body["paymentId"],
        "orderId": body["orderId"],
        "status": "failed",  # nothing was sent: no prompt can come
    }
    answer = live.post("/stkpush/status", json={"paymentId": body["paymentId"]}).json()
    assert (answer["status"], answer["reason"], answer["checkoutRequestId"]) == ("failed", "error", None)


def test_daraja_too_slow_is_504(live_server_factory, simulator):
    live = live_server_factory(DARAJA_TIMEOUT="0.5")
    live.get("/health?deep=1")
    live.sim("POST", "/simulator/faults", json={"endpoint": "stkpush", "mode": "slow", "delay": 1.5})
    response = push(live)
    assert response.status_code == 504
    assert "may still reach the phone" in response.json()["message"]


def test_daraja_refusing_is_502_with_its_reason(live):
    started(live, WAITING)
    response = push(live, WAITING)
    assert response.status_code == 502
    body = response.json()
    assert body["success"] is False and body["errorCode"] == "500.001.1001"
    assert "Unable to lock subscriber" in body["message"]


@pytest.mark.parametrize("mode, status", [("http500", 503), ("garbage", 502), ("http503_html", 503)])
def test_daraja_errors_never_leak_as_500(live, mode, status):
    live.get("/health?deep=1")
    live.sim("POST", "/simulator/faults", json={"endpoint": "stkpush", "mode": mode})
    response = push(live)
    assert response.status_code == status
    assert response.json()["success"] is False
    assert "<html" not in response.text.lower() and "Traceback" not in response.text


# Validation.


@pytest.mark.parametrize(
    "body, field, message",
    [
        ({"amount": 100}, "phone", "Phone number is required"),
        ({"phone": "12345", "amount": 100}, "phone", "Invalid phone number format"),
        ({"phone": "0812345678", "amount": 100}, "phone", "Invalid phone number format"),
        ({"phone": ["0712345678"], "amount": 100}, "phone", "Invalid phone number format"),
        ({"phone": WAITING}, "amount", "Amount is required"),
        ({"phone": WAITING, "amount": 0}, "amount", "at least 1"),
        ({"phone": WAITING, "amount": -10}, "amount", "at least 1"),
        ({"phone": WAITING, "amount": 150001}, "amount", "150,000"),
        ({"phone": WAITING, "amount": 10.5}, "amount", "whole number"),
        ({"phone": WAITING, "amount": "10.5"}, "amount", "whole number"),
        ({"phone": WAITING, "amount": True}, "amount", "whole number"),
        ({"phone": WAITING, "amount": {"value": 1}}, "amount", "whole number"),
        ({"phone": WAITING, "amount": 1, "description": 5}, "description", "must be text"),
        ({"phone": WAITING, "amount": 1, "accountReference": "x" * 101}, "accountReference", "at most"),
    ],
)
def test_every_bad_field_gets_its_own_400(live, simulator, body, field, message):
    response = live.post("/stkpush", json=body)
    assert response.status_code == 400
    answer = response.json()
    assert answer["success"] is False and answer["field"] == field
    assert message in answer["message"]
    assert live.sim("GET", "/simulator/stats").json()["pushes_accepted"] == 0


@pytest.mark.parametrize(
    "data, content_type",
    [
        ("not json", "application/json"),
        ('["a list"]', "application/json"),
        ("phone=0712", "text/plain"),
    ],
)
def test_body_that_is_not_a_json_object_is_a_400(live, data, content_type):
    response = live.post("/stkpush", data=data, headers={"Content-Type": content_type})
    assert response.status_code == 400 and response.json()["success"] is False


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_json_with_a_byte_order_mark_is_read_like_plain_utf8(live, encoding):
    # Windows tools (PowerShell's Out-File, Notepad) write a BOM; RFC 8259 lets parsers accept it.
    data = json.dumps({"phone": WAITING, "amount": 3}).encode(encoding)
    response = live.post("/stkpush", data=data, headers={"Content-Type": "application/json"})
    assert response.status_code == 200 and response.json()["amount"] == 3


def test_oversized_body_is_a_413_in_json(live):
    response = live.post("/stkpush", json={"phone": WAITING, "amount": 1, "description": "x" * 70_000})
    assert response.status_code == 413
    assert response.json()["success"] is False and "too large" in response.json()["message"]


@pytest.fixture
def procfile_server(simulator, tmp_path):
    """The server under the Procfile's command, uWSGI (one worker, memory store)."""
    port = free_port()
    env = {**SERVER_DEFAULTS, "MPESA_BASE_URL": simulator.url, "PORT": str(port), "STORE_URL": "memory://"}
    command = PROCFILE_COMMAND
    server = ServerProcess(command, env, port, tmp_path / "server.log")
    yield server
    server.kill(signal.SIGTERM)


@pytest.mark.parametrize("server", ["live", "procfile_server"])
def test_a_body_over_the_limit_is_a_413_and_one_sent_in_chunks_a_411(request, server):
    url = request.getfixturevalue(server).url

    def chunks(data: bytes):  # requests sends a generator with Transfer-Encoding: chunked
        yield from (data[start : start + 8192] for start in range(0, len(data), 8192))

    headers = {"Content-Type": "application/json"}
    big = json.dumps({"phone": WAITING, "amount": 1, "description": "x" * 70_000}).encode()
    response = requests.post(url + "/stkpush", data=big, headers=headers, timeout=30)
    assert response.status_code == 413 and response.json()["message"] == "Request body too large (limit 64 KB)"
    small = json.dumps({"phone": "254712345601", "amount": 1, "description": "x" * 100}).encode()
    for body in (chunks(big), chunks(small)):
        response = requests.post(url + "/stkpush", data=body, headers=headers, timeout=30)
        assert response.status_code == 411 and response.json() == {
            "success": False,
            "message": "Content-Length is required: a body sent in chunks is not accepted",
        }
    response = requests.post(url + "/stkpush", data=small, headers=headers, timeout=30)
    assert response.status_code == 200 and response.json()["status"] == "pending"
    polled = requests.post(url + "/stkpush/status", json={"checkoutRequestId": response.json()["checkoutRequestId"]})
    assert polled.status_code == 200 and polled.json()["status"] == "pending"
    prompts = requests.get(request.getfixturevalue("simulator").url + "/simulator/prompts", timeout=10).json()
    assert [p["phone"] for p in prompts["prompts"]].count("254712345601") == 1  # the refused bodies prompted nobody


def test_amount_as_digit_string_is_accepted(live):
    assert push(live, WAITING, "250").status_code == 200


def test_max_amount_is_configurable(live_server_factory):
    live = live_server_factory(MAX_AMOUNT="1000")
    assert push(live, WAITING, 1001).json()["message"] == "Amount must not exceed 1,000 KES"


# Status.


def test_unknown_transaction_is_404(live):
    response = live.post("/stkpush/status", json={"checkoutRequestId": "ws_CO_nope"})
    assert response.status_code == 404
    assert response.json() == {"success": False, "status": "not_found", "message": "Transaction not found"}


def test_status_needs_an_id(live):
    for body in ({}, {"checkoutRequestId": ""}, {"checkoutRequestId": 5}, {"checkoutRequestId": "a b"}):
        response = live.post("/stkpush/status", json=body)
        assert response.status_code == 400 and response.json()["field"] == "checkoutRequestId"


def test_status_by_get_matches_post(live):
    checkout_id = started(live)
    by_get = live.get(f"/stkpush/status/{checkout_id}").json()
    assert by_get["status"] == "pending"
    assert by_get["message"] == "Waiting for user to complete payment"
    assert by_get == poll(live, checkout_id, timeout=0)


def test_a_settled_payment_answers_every_poll_with_the_same_bytes(live):
    checkout_id = started(live, PAID)
    settled = poll(live, checkout_id)
    assert settled["status"] == "completed"
    answers = [live.post("/stkpush/status", json={"checkoutRequestId": checkout_id}) for _ in range(3)] + [
        live.get(f"/stkpush/status/{checkout_id}")
    ]
    assert {a.content for a in answers} == {answers[0].content}
    assert all(a.status_code == 200 and a.headers["Content-Type"] == "application/json" for a in answers)
    assert json.loads(answers[0].content) == settled
    assert live.app.extensions["final_answers"].get(checkout_id) == answers[0].content


def settled_tx(status="completed", settled_by="callback", receipt="SIM0000001", completed_at=1000.0):
    return Transaction(
        "ws_CO_1",
        "254712345678",
        100,
        checkout_request_id="ws_CO_1",
        merchant_request_id="m-1",
        status=status,
        settled_by=settled_by,
        mpesa_receipt_number=receipt if status == "completed" else None,
        completed_at=completed_at,
    )


@pytest.mark.parametrize(
    "tx, for_good",
    [
        (Transaction("ws_CO_1", "254712345678", 100, checkout_request_id="ws_CO_1"), False),
        (settled_tx(), True),
        (settled_tx("failed", "callback"), True),
        (settled_tx("failed", "query"), True),
        (settled_tx(settled_by="query"), True),
        (settled_tx(settled_by="query", receipt=None), False),  # the callback may still bring it
        (settled_tx("failed", "timeout"), False),  # a late result may still come
    ],
)
def test_only_answers_nothing_can_change_are_kept(tx, for_good):
    assert settled_for_good(tx) is for_good


def test_kept_answers_go_when_the_store_may_forget_the_payment():
    clock = FakeClock(1000.0)
    answers = FinalAnswers(retention=60, clock=clock)
    answers.keep(settled_tx(completed_at=1000.0), b"paid")
    clock.now = 1059.9
    assert answers.get("ws_CO_1") == b"paid"
    clock.now = 1060.0
    assert answers.get("ws_CO_1") is None
    answers.keep(settled_tx(completed_at=990.0), b"paid")  # already past its retention
    assert answers.get("ws_CO_1") is None


def test_kept_answers_are_bounded_oldest_first():
    answers = FinalAnswers(retention=60, clock=FakeClock(1000.0), size=2)
    for n in range(3):
        answers.keep(replace(settled_tx(), payment_id=f"pay_{n}", checkout_request_id=f"ws_CO_{n}"), b"%d" % n)
    assert [answers.get(f"ws_CO_{n}") for n in range(3)] == [None, b"1", b"2"]
    assert [answers.get(f"pay_{n}") for n in range(3)] == [None, b"1", b"2"]


# Health.


def test_health_names_mode_and_store(live):
    body = live.get("/health").json()
    assert body["status"] == "ok" and body["mode"] == "simulator" and body["store"] == "memory"
    assert body["service"] == "M-Pesa Payment Server" and body["timestamp"].endswith("Z")


def test_deep_health_fetches_a_token(live, live_server_factory):
    assert live.get("/health?deep=1").json()["daraja"] == "ok"
    broken = live_server_factory(MPESA_BASE_URL="http://127.0.0.1:9")
    response = broken.get("/health?deep=1")
    assert response.status_code == 503 and response.json()["status"] == "error"


# Admin API.


def test_transactions_api_is_off_without_a_token(live_server_factory):
    assert live_server_factory().get("/transactions").status_code == 404


def test_transactions_api_needs_the_token(live):
    assert live.get("/transactions").status_code == 401
    wrong = live.get("/transactions", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["success"] is False


def test_transactions_are_listed_newest_first_with_filters(live):
    ids = [started(live, f"07110000{i:02d}", amount=10 + i) for i in range(5)]
    live.post(hook(live), json=callback_body(ids[0], code=1032))
    auth = {"Authorization": "Bearer admin-secret-0123456789"}
    everything = live.get("/transactions", headers=auth).json()
    assert everything["total"] == 5
    assert [t["checkout_request_id"] for t in everything["transactions"]] == ids[::-1]
    page = live.get("/transactions?limit=2&page=2", headers=auth).json()
    assert [t["checkout_request_id"] for t in page["transactions"]] == ids[::-1][2:4]
    failed = live.get("/transactions?status=failed", headers=auth).json()
    assert failed["total"] == 1 and failed["transactions"][0]["checkout_request_id"] == ids[0]
    by_phone = live.get("/transactions?phone=0711000003", headers=auth).json()
    assert [t["checkout_request_id"] for t in by_phone["transactions"]] == [ids[3]]
    assert live.get("/transactions?status=weird", headers=auth).status_code == 400
    assert live.get("/transactions?limit=0", headers=auth).status_code == 400


@pytest.mark.parametrize(
    "query, field",
    [
        ("limit=garbage", "limit"),
        ("limit=1.5", "limit"),
        ("limit=-1", "limit"),
        ("limit=101", "limit"),
        ("limit=%EF%BC%95", "limit"),  # a full-width 5
        ("page=0", "page"),
        ("page=two", "page"),
        ("page=1e3", "page"),
        ("status=paid", "status"),
        ("phone=12345", "phone"),
    ],
)
def test_malformed_list_parameters_are_a_400_naming_the_field(live, query, field):
    response = live.get(f"/transactions?{query}", headers={"Authorization": "Bearer admin-secret-0123456789"})
    assert response.status_code == 400
    assert response.json()["success"] is False and response.json()["field"] == field


def test_unknown_transaction_detail_is_404(live):
    response = live.get("/transactions/ws_CO_nope", headers={"Authorization": "Bearer admin-secret-0123456789"})
    assert response.status_code == 404


# Errors and logs.


def test_unknown_paths_and_methods_answer_json(live):
    assert live.get("/nope").json()["success"] is False
    response = live.get("/stkpush")
    assert response.status_code == 405 and response.json()["success"] is False


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("GET", "/stkpush", {"POST"}),
        ("DELETE", "/transactions", {"GET"}),
        ("PUT", "/stkpush/status/ws_CO_1", {"GET"}),
        ("POST", "/pay.html", {"GET"}),
        ("DELETE", "/admin/login", {"GET", "POST"}),
    ],
)
def test_a_method_not_allowed_says_which_are(live, method, path, allowed):
    response = requests.request(method, live.url + path, timeout=10)
    assert response.status_code == 405 and response.json()["success"] is False
    assert {m.strip() for m in response.headers["Allow"].split(",")} >= allowed


def test_logs_never_show_full_phones_or_the_callback_token(live, caplog):
    caplog.set_level(logging.INFO)
    checkout_id = started(live, PAID)
    poll(live, checkout_id)
    live.post(hook(live), json=callback_body(checkout_id))
    # Our own loggers; werkzeug's development access log is off in `python server.py`
    # and uWSGI's request log is off in serve.py.
    ours = ("server", "payments", "mpesa", "store", "simulator", "pages")
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.split(".")[0] in ours)
    assert "2547******00" in text
    for secret in ("254700000000", "0700000000", "test-callback-token-0123456789", "700000000"):
        assert secret not in text


def test_pages_get_security_headers(live):
    page = live.get("/pay.html")
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["Referrer-Policy"] == "same-origin"


def test_json_answers_get_the_api_security_headers_and_are_never_cached(live):
    for answer in (live.get("/health"), live.post("/stkpush/status", json={"checkoutRequestId": "x"})):
        assert answer.headers["Content-Type"] == "application/json"
        assert answer.headers["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Cache-Control"] == "no-store"
        # frame-ancestors does X-Frame-Options' work; a JSON answer has no links for a Referrer-Policy.
        assert "X-Frame-Options" not in answer.headers and "Referrer-Policy" not in answer.headers


@pytest.mark.parametrize("command", [[sys.executable, "server.py"], PROCFILE_COMMAND], ids=["server.py", "procfile"])
def test_a_taken_simulator_port_stops_start_up_with_one_line(command):
    port, simulator_port = free_port(), free_port()
    with socket.create_server(("127.0.0.1", simulator_port)):  # something else listens there
        started = subprocess.run(
            command,
            cwd=ROOT,
            env={**os.environ, "PORT": str(port), "SIMULATOR_PORT": str(simulator_port), "LOG_FORMAT": "text"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert started.returncode != 0
    assert f"SIMULATOR_PORT={simulator_port}" in started.stderr and "is the port taken?" in started.stderr
    assert "Traceback" not in started.stderr + started.stdout
