"""A success callback without its amount completes nothing by itself (settlement.md).

End to end: the simulator ends the prompt (or leaves it waiting) without sending its own
callback, and the test posts Daraja's callback in one of the two amount-less shapes seen:
metadata without an Amount item, or no CallbackMetadata at all.
"""

from __future__ import annotations

import re

import pytest
import requests

from tests.helpers import WAITING, callback_body, hook, poll, started, wait_until

ADMIN_TOKEN = "admin-token-0123456789"
RECEIPT = "TKL7RT61SV"


def without_amount(checkout_id: str, shape: str) -> dict:
    """Daraja's success callback for checkout_id, its Amount item or its whole metadata left out."""
    body = callback_body(checkout_id, receipt=RECEIPT)
    callback = body["Body"]["stkCallback"]
    if shape == "no metadata":
        del callback["CallbackMetadata"]
    else:
        items = callback["CallbackMetadata"]["Item"]
        callback["CallbackMetadata"]["Item"] = [item for item in items if item["Name"] != "Amount"]
    return body


def record(live, checkout_id: str) -> dict:
    response = live.get(f"/transactions/{checkout_id}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200, response.text
    return response.json()["transaction"]


def events(tx: dict) -> list[str]:
    return [entry["event"] for entry in tx["history"]]


def sim_rule(live, **rule) -> None:
    response = live.sim("POST", "/simulator/scenarios", json={"phone": WAITING, **rule})
    assert response.status_code == 201, response.text


def prompt_status(live, checkout_id: str) -> str:
    return live.sim("GET", f"/simulator/prompts/{checkout_id}").json()["status"]


def send(live, body: dict) -> None:
    answer = live.post(hook(live), json=body)
    assert answer.status_code == 200 and answer.json() == {"ResultCode": 0, "ResultDesc": "Accepted"}


def dashboard_page(live, checkout_id: str) -> str:
    session = requests.Session()
    form = session.get(live.url + "/admin/login", timeout=10).text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
    session.post(live.url + "/admin/login", data={"csrf_token": csrf, "token": ADMIN_TOKEN}, timeout=10)
    page = session.get(f"{live.url}/admin/transactions/{checkout_id}", timeout=10)
    assert page.status_code == 200
    return page.text


@pytest.mark.parametrize("shape, receipt", [("no Amount item", RECEIPT), ("no metadata", None)])
def test_paid_says_the_query_so_it_completes_with_the_amount_unconfirmed(
    shape, receipt, live_server_factory, callback_receiver
):
    live = live_server_factory(
        ADMIN_TOKEN=ADMIN_TOKEN, MERCHANT_WEBHOOK_URL=callback_receiver.url, WEBHOOK_SECRET="shop-secret-0123456789"
    )
    sim_rule(live, resultCode=0, delay=0.05, callback="drop")  # M-Pesa took the money; its callback is ours
    checkout_id = started(live, amount=150)
    wait_until(lambda: prompt_status(live, checkout_id) == "completed")

    send(live, without_amount(checkout_id, shape))
    answer = poll(live, checkout_id, timeout=0)
    assert answer["status"] == "completed" and answer["amountConfirmed"] is False
    assert answer["amount"] == 150 and answer["MpesaReceiptNumber"] == receipt

    tx = record(live, checkout_id)
    unconfirmed = ["amount_unconfirmed"] + ([] if receipt else ["receipt_unconfirmed"])
    assert tx["flags"] == unconfirmed and tx["settled_by"] == "query"
    said = events(tx)
    assert said.index("callback_without_amount") < said.index("query_received") < said.index("completed")

    event = callback_receiver.wait(1)[0]
    assert event["type"] == "payment.completed" and event["data"]["amountConfirmed"] is False
    assert event["data"]["flags"] == unconfirmed and event["data"]["receipt"] == receipt

    page = dashboard_page(live, checkout_id)
    assert 'id="detail-amount-unconfirmed"' in page and "Check the M-Pesa statement" in page
    assert ("and no receipt" in page) is (receipt is None)


@pytest.mark.parametrize("shape", ["no Amount item", "no metadata"])
def test_a_failure_the_query_reports_fails_the_payment_as_usual(shape, live_server_factory):
    live = live_server_factory(ADMIN_TOKEN=ADMIN_TOKEN)
    sim_rule(live, resultCode=1032, delay=0.05, callback="drop")
    checkout_id = started(live)
    wait_until(lambda: prompt_status(live, checkout_id) == "failed")

    send(live, without_amount(checkout_id, shape))
    answer = poll(live, checkout_id, timeout=0)
    assert answer["status"] == "failed" and answer["reason"] == "cancelled" and answer["resultCode"] == 1032
    tx = record(live, checkout_id)
    assert tx["flags"] == [] and tx["mpesa_receipt_number"] is None
    assert "amountlessCallback" not in tx["extra"]


def test_still_pending_says_the_query_so_the_usual_queries_settle_it_later(live_server_factory):
    live = live_server_factory(ADMIN_TOKEN=ADMIN_TOKEN, STATUS_FIRST_QUERY_AFTER="0", STATUS_QUERY_INTERVAL="0.2")
    sim_rule(live, resultCode="await", callback="drop")  # the handset decides; no callback from the simulator
    checkout_id = started(live)

    send(live, without_amount(checkout_id, "no Amount item"))
    assert poll(live, checkout_id, timeout=0)["status"] == "pending"
    tx = record(live, checkout_id)
    assert tx["status"] == "pending" and tx["mpesa_receipt_number"] is None
    assert {"event": "queried", "result": "pending"}.items() <= tx["history"][-1].items()

    live.sim("POST", f"/simulator/prompts/{checkout_id}/pin", json={"pin": "1234"})
    answer = poll(live, checkout_id)
    assert answer["status"] == "completed" and answer["amountConfirmed"] is False
    assert answer["MpesaReceiptNumber"] == RECEIPT  # the one the amount-less callback brought
    assert record(live, checkout_id)["flags"] == ["amount_unconfirmed"]


def test_a_later_callback_with_the_amount_is_checked_as_usual(live_server_factory):
    live = live_server_factory(ADMIN_TOKEN=ADMIN_TOKEN)
    sim_rule(live, resultCode="await")  # the handset decides, then the simulator sends its full callback
    checkout_id = started(live, amount=120)

    send(live, without_amount(checkout_id, "no metadata"))
    assert poll(live, checkout_id, timeout=0)["status"] == "pending"
    live.sim("POST", f"/simulator/prompts/{checkout_id}/pin", json={"pin": "1234"})
    answer = poll(live, checkout_id)
    assert answer["status"] == "completed" and answer["amountConfirmed"] is True
    tx = record(live, checkout_id)
    assert tx["flags"] == [] and tx["settled_by"] == "callback" and tx["mpesa_receipt_number"]
