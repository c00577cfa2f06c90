"""The Daraja simulator, seen the way an integrator sees Daraja: over real HTTP."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import requests

import simulator as sim
from mpesa import NAIROBI, SANDBOX_PASSKEY, SANDBOX_SHORTCODE, daraja_timestamp, stk_password
from tests.helpers import ROOT, FakeClock, free_port, wait_until

MISSING = object()
AWAITING_PHONE = "254712345678"  # not a test number: waits for the handset
PAID_PHONE = "254700000000"


def credentials(
    timestamp: str | None = None, shortcode: str = SANDBOX_SHORTCODE, passkey: str = SANDBOX_PASSKEY
) -> dict:
    timestamp = timestamp or daraja_timestamp()
    return {
        "BusinessShortCode": shortcode,
        "Password": stk_password(shortcode, passkey, timestamp),
        "Timestamp": timestamp,
    }


class Daraja:
    """A minimal Daraja client for the tests, bound to one simulator and one receiver."""

    def __init__(self, url: str, callback_url: str):
        self.url = url
        self.callback_url = callback_url
        self.http = requests.Session()  # keep-alive, like a real client's pooled session
        self._token = None

    def get_token(self, auth=(sim.SIM_CONSUMER_KEY, sim.SIM_CONSUMER_SECRET), grant="client_credentials"):
        params = {"grant_type": grant} if grant is not None else {}
        return self.http.get(f"{self.url}/oauth/v1/generate", params=params, auth=auth, timeout=5)

    @property
    def token(self) -> str:
        if self._token is None:
            self._token = self.get_token().json()["access_token"]
        return self._token

    def body(self, phone: str = PAID_PHONE, amount=10, **overrides) -> dict:
        body = {
            **credentials(),
            "TransactionType": "CustomerPayBillOnline",
            "Amount": amount,
            "PartyA": phone,
            "PartyB": SANDBOX_SHORTCODE,
            "PhoneNumber": phone,
            "CallBackURL": self.callback_url,
            "AccountReference": "INV42",
            "TransactionDesc": "Order 42",
        }
        body.update(overrides)
        return {key: value for key, value in body.items() if value is not MISSING}

    def push(self, phone: str = PAID_PHONE, amount=10, *, token: str | None = None, **overrides):
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return self.http.post(
            f"{self.url}/mpesa/stkpush/v1/processrequest",
            json=self.body(phone, amount, **overrides),
            headers=headers,
            timeout=5,
        )

    def pushed(self, phone: str = PAID_PHONE, amount=10, **overrides) -> dict:
        response = self.push(phone, amount, **overrides)
        assert response.status_code == 200, response.text
        return response.json()

    def query(self, checkout_id: str, **overrides):
        body = {**credentials(), "CheckoutRequestID": checkout_id, **overrides}
        return self.http.post(
            f"{self.url}/mpesa/stkpushquery/v1/query",
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=5,
        )

    def control(self, method: str, path: str, **kwargs):
        return self.http.request(method, f"{self.url}/simulator/{path}", timeout=5, **kwargs)

    def prompt(self, checkout_id: str) -> dict:
        return self.control("GET", f"prompts/{checkout_id}").json()

    def configure(self, **settings) -> None:
        self.control("PATCH", "config", json=settings).raise_for_status()


@pytest.fixture
def daraja(simulator, callback_receiver):
    client = Daraja(simulator.url, callback_receiver.url)
    yield client
    client.http.close()


def assert_error(response, status: int, code: str, message: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"requestId", "errorCode", "errorMessage"}
    assert (body["errorCode"], body["errorMessage"]) == (code, message)
    assert isinstance(body["requestId"], str) and body["requestId"]


# OAuth.


def test_oauth_issues_a_28_character_token_with_expires_in_as_a_string(daraja):
    response = daraja.get_token()
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access_token", "expires_in"}
    assert re.fullmatch(r"[A-Za-z0-9]{28}", body["access_token"])
    assert body["expires_in"] == "3599"


@pytest.mark.parametrize(
    "auth",
    [
        (sim.SIM_CONSUMER_KEY, "wrong-secret"),
        ("wrong-key", sim.SIM_CONSUMER_SECRET),
        None,
    ],
)
def test_oauth_refuses_bad_credentials(daraja, auth):
    assert_error(daraja.get_token(auth=auth), 400, "400.008.01", "Invalid Authentication passed")


def test_oauth_refuses_a_bearer_header(daraja):
    response = requests.get(
        f"{daraja.url}/oauth/v1/generate",
        params={"grant_type": "client_credentials"},
        headers={"Authorization": "Bearer something"},
        timeout=5,
    )
    assert_error(response, 400, "400.008.01", "Invalid Authentication passed")


@pytest.mark.parametrize("grant", [None, "password", "client_credentials "])
def test_oauth_refuses_a_missing_or_wrong_grant_type(daraja, grant):
    assert_error(daraja.get_token(grant=grant), 400, "400.008.02", "Invalid grant type passed")


def test_tokens_expire_after_their_ttl():
    clock = FakeClock()
    with sim.start(config=sim.SimulatorConfig(token_ttl=60), clock=clock) as running:
        client = Daraja(running.url, "https://shop.example.com/hooks/stk/x")
        client.http.close()
        issued = client.get_token().json()
        assert issued["expires_in"] == "60"
        clock.advance(59)
        still_valid = client.push(amount=0, token=issued["access_token"])
        assert still_valid.json()["errorMessage"] == "Bad Request - Invalid Amount"
        clock.advance(1)
        assert_error(client.push(token=issued["access_token"]), 404, "404.001.03", "Invalid Access Token")


def test_revoked_tokens_are_refused_and_new_ones_work(daraja):
    old = daraja.token
    assert daraja.control("POST", "tokens/revoke").json()["revoked"] >= 1
    assert_error(daraja.push(token=old), 404, "404.001.03", "Invalid Access Token")
    fresh = daraja.get_token().json()["access_token"]
    assert daraja.push(token=fresh).status_code == 200


def test_a_new_token_revokes_older_ones_when_configured(daraja):
    daraja.configure(invalidate_previous_tokens=True)
    first = daraja.get_token().json()["access_token"]
    second = daraja.get_token().json()["access_token"]
    assert_error(daraja.push(token=first), 404, "404.001.03", "Invalid Access Token")
    assert daraja.push(token=second).status_code == 200


def test_concurrent_tokens_stay_valid_by_default(daraja):
    first = daraja.get_token().json()["access_token"]
    daraja.get_token()
    assert daraja.push(token=first).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic abc"}])
def test_push_without_a_valid_bearer_token_is_refused(daraja, headers):
    response = requests.post(
        f"{daraja.url}/mpesa/stkpush/v1/processrequest", json=daraja.body(), headers=headers, timeout=5
    )
    assert_error(response, 404, "404.001.03", "Invalid Access Token")


# STK Push.


def test_push_is_acknowledged_in_darajas_shape(daraja):
    before = datetime.now(NAIROBI)
    response = daraja.push(phone="254708374149")
    assert response.status_code == 200
    ack = response.json()
    assert set(ack) == {
        "MerchantRequestID",
        "CheckoutRequestID",
        "ResponseCode",
        "ResponseDescription",
        "CustomerMessage",
    }
    assert re.fullmatch(r"[0-9]{5}-[0-9]{8}-1", ack["MerchantRequestID"])
    match = re.fullmatch(r"ws_CO_([0-9]{14})([0-9]{3})708374149", ack["CheckoutRequestID"])
    assert match
    stamped = datetime.strptime(match.group(1), "%d%m%Y%H%M%S").replace(tzinfo=NAIROBI)
    assert abs((stamped - before).total_seconds()) < 5
    assert ack["ResponseCode"] == "0"
    assert ack["ResponseDescription"] == ack["CustomerMessage"] == "Success. Request accepted for processing"


@pytest.mark.parametrize(
    "overrides",
    [
        {"BusinessShortCode": int(SANDBOX_SHORTCODE), "PartyB": int(SANDBOX_SHORTCODE)},
        {"Amount": "1"},
        {"Amount": 250_000},
        {"PartyA": int(PAID_PHONE), "PhoneNumber": int(PAID_PHONE)},
        {"PartyA": "254110000001"},
        {"AccountReference": "ABCDEFGHIJKL", "TransactionDesc": "ABCDEFGHIJKLM"},
        {"TransactionDesc": MISSING},
        {"TransactionType": "CustomerBuyGoodsOnline"},
        {"CallBackURL": "http://127.0.0.1:9/hooks/stk/token?x=1"},
    ],
)
def test_push_accepts_what_daraja_accepts(daraja, overrides):
    assert daraja.push(**overrides).status_code == 200


@pytest.mark.parametrize(
    "name, value",
    [
        ("BusinessShortCode", "1234"),
        ("BusinessShortCode", "12345678"),
        ("BusinessShortCode", "17437a"),
        ("BusinessShortCode", MISSING),
        ("Timestamp", "2024031514302"),
        ("Timestamp", "20241301120000"),
        ("Timestamp", MISSING),
        ("Password", ""),
        ("Password", MISSING),
        ("TransactionType", "CustomerPayMerchant"),
        ("TransactionType", MISSING),
        ("Amount", 0),
        ("Amount", 250_001),
        ("Amount", 10.5),
        ("Amount", "10.5"),
        ("Amount", 10.0),
        ("Amount", -5),
        ("Amount", True),
        ("Amount", "ten"),
        ("Amount", MISSING),
        ("PartyA", "0712345678"),
        ("PartyA", "255712345678"),
        ("PartyB", "12"),
        ("PartyB", MISSING),
        ("PhoneNumber", "254812345678"),
        ("PhoneNumber", "+254712345678"),
        ("PhoneNumber", MISSING),
        ("CallBackURL", "ftp://shop.example.com/cb"),
        ("CallBackURL", "/hooks/stk/token"),
        ("CallBackURL", "https://shop.example.com/hooks/stk/a b"),
        ("CallBackURL", "https://shop.example.com/cb "),
        ("CallBackURL", MISSING),
        ("AccountReference", ""),
        ("AccountReference", "ABCDEFGHIJKLM"),
        ("AccountReference", MISSING),
        ("TransactionDesc", "ABCDEFGHIJKLMN"),
    ],
)
def test_push_names_the_invalid_field(daraja, name, value):
    response = daraja.push(**{name: value})
    assert_error(response, 400, "400.002.02", f"Bad Request - Invalid {name}")


def test_form_encoded_push_reads_as_invalid_business_shortcode(daraja):
    response = requests.post(
        f"{daraja.url}/mpesa/stkpush/v1/processrequest",
        data=daraja.body(),
        headers={"Authorization": f"Bearer {daraja.token}"},
        timeout=5,
    )
    assert_error(response, 400, "400.002.02", "Bad Request - Invalid BusinessShortCode")


@pytest.mark.parametrize("payload", ["{not json", "[1, 2]", "null"])
def test_unparseable_json_is_an_invalid_request_payload(daraja, payload):
    response = requests.post(
        f"{daraja.url}/mpesa/stkpush/v1/processrequest",
        data=payload,
        headers={"Authorization": f"Bearer {daraja.token}", "Content-Type": "application/json"},
        timeout=5,
    )
    assert_error(response, 400, "400.002.05", "Invalid Request Payload")


def test_a_naive_utc_timestamp_is_refused(daraja):
    utc = datetime.now(UTC).strftime("%Y%m%d%H%M%S")  # what datetime.now() gives on a UTC host
    response = daraja.push(**credentials(utc))
    assert_error(response, 400, "400.002.02", "Bad Request - Invalid Timestamp")


def test_a_nairobi_timestamp_a_few_minutes_old_is_accepted(daraja):
    assert daraja.push(**credentials(daraja_timestamp(datetime.now(NAIROBI) - timedelta(minutes=5)))).ok


@pytest.mark.parametrize(
    "password",
    [
        stk_password(SANDBOX_SHORTCODE, SANDBOX_PASSKEY, "20200101000000"),  # another timestamp
        stk_password(SANDBOX_SHORTCODE, "not-the-passkey", "20200101000000"),
        "b'MTc0Mzc5'",  # str() of the bytes
    ],
)
def test_a_password_that_does_not_match_is_wrong_credentials(daraja, password):
    assert_error(daraja.push(Password=password), 500, "500.001.1001", "Wrong credentials")


def test_an_unknown_shortcode_is_merchant_does_not_exist(daraja):
    response = daraja.push(**credentials(shortcode="600000"))
    assert_error(response, 500, "500.001.1001", "Merchant does not exist")


def test_a_second_push_to_a_phone_with_an_open_prompt_is_locked(daraja):
    first = daraja.pushed(AWAITING_PHONE)
    assert_error(
        daraja.push(AWAITING_PHONE),
        500,
        "500.001.1001",
        "Unable to lock subscriber, a transaction is already in process for the current subscriber",
    )
    assert daraja.push("254712345679").status_code == 200  # other phones are free
    daraja.control("POST", f"prompts/{first['CheckoutRequestID']}/cancel").raise_for_status()
    assert daraja.push(AWAITING_PHONE).status_code == 200


def test_checkout_request_ids_are_unique(daraja):
    ids = set()
    for _ in range(5):
        ack = daraja.pushed(AWAITING_PHONE)
        ids.add(ack["CheckoutRequestID"])
        daraja.control("POST", f"prompts/{ack['CheckoutRequestID']}/cancel").raise_for_status()
    assert len(ids) == 5


def test_concurrent_pushes_to_one_phone_lock_all_but_one(daraja):
    daraja.token  # noqa: B018
    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(lambda _: daraja.push(AWAITING_PHONE).status_code, range(10)))
    assert sorted(answers) == [200] + [500] * 9


def test_concurrent_pushes_get_unique_ids_and_one_callback_each(daraja, callback_receiver):
    daraja.control("POST", "scenarios", json={"resultCode": 0})
    phones = [f"2547123450{n:02d}" for n in range(20)]
    with ThreadPoolExecutor(max_workers=10) as pool:
        acks = list(pool.map(lambda phone: daraja.pushed(phone), phones))
    ids = {ack["CheckoutRequestID"] for ack in acks}
    assert len(ids) == 20
    bodies = callback_receiver.wait(20)
    assert {body["Body"]["stkCallback"]["CheckoutRequestID"] for body in bodies} == ids
    receipts = {body["Body"]["stkCallback"]["CallbackMetadata"]["Item"][1]["Value"] for body in bodies}
    assert len(receipts) == 20
    assert wait_until(lambda: daraja.control("GET", "stats").json()["callbacks_sent"] == 20)


def test_unknown_paths_and_methods_answer_like_daraja(daraja):
    assert_error(requests.get(f"{daraja.url}/mpesa/nothing", timeout=5), 404, "404.001.01", "Resource not found")
    assert_error(
        requests.get(f"{daraja.url}/mpesa/stkpush/v1/processrequest", timeout=5), 405, "405.001", "Method Not Allowed"
    )


# STK Query.


def test_query_says_pending_then_gives_the_result_code_as_a_string(daraja):
    daraja.configure(query_min_interval=0)
    checkout_id = daraja.pushed(AWAITING_PHONE)["CheckoutRequestID"]
    pending = daraja.query(checkout_id)
    assert_error(pending, 500, "500.001.1001", "The transaction is being processed")
    assert pending.json()["requestId"] == checkout_id
    daraja.control("POST", f"prompts/{checkout_id}/cancel").raise_for_status()
    final = daraja.query(checkout_id)
    assert final.status_code == 200
    assert final.json() == {
        "ResponseCode": "0",
        "ResponseDescription": "The service request has been accepted successsfully",
        "MerchantRequestID": daraja.prompt(checkout_id)["merchantRequestId"],
        "CheckoutRequestID": checkout_id,
        "ResultCode": "1032",
        "ResultDesc": "Request cancelled by user",
    }


def test_query_of_a_paid_push_gives_result_code_0(daraja, callback_receiver):
    checkout_id = daraja.pushed(PAID_PHONE)["CheckoutRequestID"]
    callback_receiver.wait(1)
    final = daraja.query(checkout_id).json()
    assert (final["ResultCode"], final["ResultDesc"]) == ("0", "The service request is processed successfully.")


def test_query_of_an_unknown_checkout_request_id_is_refused(daraja):
    assert_error(
        daraja.query("ws_CO_01012024000000000712345678"), 400, "400.002.02", "Bad Request - Invalid CheckoutRequestID"
    )


def test_query_checks_the_password_like_the_push(daraja):
    checkout_id = daraja.pushed(AWAITING_PHONE)["CheckoutRequestID"]
    assert_error(daraja.query(checkout_id, Password="b'MTc0'"), 500, "500.001.1001", "Wrong credentials")
    utc = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    assert_error(daraja.query(checkout_id, **credentials(utc)), 400, "400.002.02", "Bad Request - Invalid Timestamp")


def test_querying_the_same_push_too_often_is_a_spike_arrest(daraja):
    daraja.configure(query_min_interval=30)
    first = daraja.pushed(AWAITING_PHONE)["CheckoutRequestID"]
    other = daraja.pushed("254712345679")["CheckoutRequestID"]
    assert daraja.query(first).json()["errorMessage"] == "The transaction is being processed"
    assert_error(daraja.query(first), 500, "500.003.02", "Error Occurred: Spike Arrest Violation")
    assert daraja.query(other).json()["errorMessage"] == "The transaction is being processed"


# Callbacks.


def assert_failure_callback(body: dict, ack: dict, code, desc: str) -> None:
    assert body == {
        "Body": {
            "stkCallback": {
                "MerchantRequestID": ack["MerchantRequestID"],
                "CheckoutRequestID": ack["CheckoutRequestID"],
                "ResultCode": code,
                "ResultDesc": desc,
            }
        }
    }
    assert type(body["Body"]["stkCallback"]["ResultCode"]) is type(code)


def assert_success_callback(body: dict, ack: dict, amount: int, phone: str) -> str:
    """Check a paid callback's exact shape; return its receipt number."""
    result = body["Body"]["stkCallback"]
    assert list(result) == ["MerchantRequestID", "CheckoutRequestID", "ResultCode", "ResultDesc", "CallbackMetadata"]
    assert result["MerchantRequestID"] == ack["MerchantRequestID"]
    assert result["CheckoutRequestID"] == ack["CheckoutRequestID"]
    assert result["ResultCode"] == 0 and type(result["ResultCode"]) is int
    assert result["ResultDesc"] == "The service request is processed successfully."
    amount_item, receipt_item, balance, date_item, phone_item = result["CallbackMetadata"]["Item"]
    assert amount_item == {"Name": "Amount", "Value": float(amount)}
    assert type(amount_item["Value"]) is float
    assert receipt_item["Name"] == "MpesaReceiptNumber"
    assert re.fullmatch(r"[A-Z0-9]{10}", receipt_item["Value"])
    assert balance == {"Name": "Balance"}
    assert date_item["Name"] == "TransactionDate" and type(date_item["Value"]) is int
    paid_at = datetime.strptime(str(date_item["Value"]), "%Y%m%d%H%M%S").replace(tzinfo=NAIROBI)
    assert abs((datetime.now(NAIROBI) - paid_at).total_seconds()) < 60
    assert phone_item == {"Name": "PhoneNumber", "Value": int(phone)}
    return receipt_item["Value"]


@pytest.mark.parametrize("phone", ["254700000000", "254708374149"])
def test_paying_test_numbers_send_a_success_callback(daraja, callback_receiver, phone):
    ack = daraja.pushed(phone, 100)
    (body,) = callback_receiver.wait(1)
    assert callback_receiver.calls[0]["headers"]["Content-Type"] == "application/json"
    assert callback_receiver.calls[0]["path"] == "/hooks/stk/test-token"
    receipt = assert_success_callback(body, ack, 100, phone)
    prompt = daraja.prompt(ack["CheckoutRequestID"])
    assert (prompt["status"], prompt["resultCode"], prompt["receipt"]) == ("completed", 0, receipt)


@pytest.mark.parametrize(
    "phone, code, desc",
    [
        ("254700001032", 1032, "Request cancelled by user"),
        ("254700002001", 2001, "The initiator information is invalid."),
        ("254700000001", 1, "The balance is insufficient for the transaction."),
        ("254700001037", 1037, "DS timeout user cannot be reached"),
        ("254700000017", 17, "Rule limited."),
        ("254700009999", 9999, "Simulated result 9999"),
    ],
)
def test_failing_test_numbers_send_a_failure_callback(daraja, callback_receiver, phone, code, desc):
    ack = daraja.pushed(phone)
    (body,) = callback_receiver.wait(1)
    assert_failure_callback(body, ack, code, desc)
    assert daraja.prompt(ack["CheckoutRequestID"])["status"] == "failed"


def test_receipts_are_unique(daraja, callback_receiver):
    for _ in range(3):
        daraja.pushed(PAID_PHONE)
        callback_receiver.wait(len(callback_receiver.calls) + 1)
    receipts = {
        body["Body"]["stkCallback"]["CallbackMetadata"]["Item"][1]["Value"] for body in callback_receiver.bodies
    }
    assert len(receipts) == 3


def test_an_unreachable_callback_url_is_recorded_not_fatal(daraja):
    dead_url = f"http://127.0.0.1:{free_port()}/hooks/stk/x"
    daraja.pushed(PAID_PHONE, CallBackURL=dead_url)
    (entry,) = wait_until(lambda: daraja.control("GET", "callbacks").json()["callbacks"])
    assert (entry["url"], entry["status"]) == (dead_url, None)
    assert entry["error"]
    assert daraja.control("GET", "stats").json()["callbacks_failed"] == 1
    assert daraja.control("GET", "health").json() == {"status": "ok"}


def test_a_receiver_answering_500_is_counted_as_a_failed_callback(daraja, callback_receiver):
    callback_receiver.status = 500
    daraja.pushed(PAID_PHONE)
    (entry,) = wait_until(lambda: daraja.control("GET", "callbacks").json()["callbacks"])
    assert (entry["status"], entry["error"]) == (500, None)
    assert daraja.control("GET", "stats").json()["callbacks_failed"] == 1


# The handset.


@pytest.mark.parametrize(
    "action, payload, code, status",
    [
        ("pin", {"pin": sim.SIM_PIN}, 0, "completed"),
        ("pin", {"pin": "0000"}, 2001, "failed"),
        ("cancel", None, 1032, "failed"),
        ("timeout", None, 1037, "failed"),
        ("resolve", {"resultCode": 1}, 1, "failed"),
        ("resolve", {"resultCode": "SFC_IC0003"}, "SFC_IC0003", "failed"),
    ],
)
def test_handset_actions_end_the_prompt_and_send_the_callback(daraja, callback_receiver, action, payload, code, status):
    ack = daraja.pushed(AWAITING_PHONE, 250)
    prompt = daraja.control("POST", f"prompts/{ack['CheckoutRequestID']}/{action}", json=payload)
    assert prompt.status_code == 200, prompt.text
    prompt = prompt.json()
    assert (prompt["status"], prompt["resultCode"]) == (status, code)
    assert prompt["resultDesc"] == sim.result_desc(code)
    (body,) = callback_receiver.wait(1)
    if code == 0:
        assert assert_success_callback(body, ack, 250, AWAITING_PHONE) == prompt["receipt"]
    else:
        assert prompt["receipt"] is None
        assert_failure_callback(body, ack, code, sim.result_desc(code))


def test_acting_on_a_finished_prompt_is_a_conflict(daraja):
    checkout_id = daraja.pushed(AWAITING_PHONE)["CheckoutRequestID"]
    daraja.control("POST", f"prompts/{checkout_id}/cancel").raise_for_status()
    again = daraja.control("POST", f"prompts/{checkout_id}/pin", json={"pin": sim.SIM_PIN})
    assert again.status_code == 409
    assert "already failed" in again.json()["error"]


def test_unknown_prompts_and_bad_result_codes_are_refused(daraja):
    assert daraja.control("GET", "prompts/ws_CO_nothing").status_code == 404
    assert daraja.control("POST", "prompts/ws_CO_nothing/cancel").status_code == 404
    checkout_id = daraja.pushed(AWAITING_PHONE)["CheckoutRequestID"]
    bad = daraja.control("POST", f"prompts/{checkout_id}/resolve", json={"resultCode": "soon"})
    assert bad.status_code == 400 and "resultCode" in bad.json()["error"]
    assert daraja.control("POST", f"prompts/{checkout_id}/pin", json={}).status_code == 400


def test_the_handset_pin_can_be_changed(daraja):
    daraja.configure(pin="9876")
    checkout_id = daraja.pushed(AWAITING_PHONE)["CheckoutRequestID"]
    prompt = daraja.control("POST", f"prompts/{checkout_id}/pin", json={"pin": 9876}).json()
    assert prompt["resultCode"] == 0


def test_an_unanswered_prompt_ends_with_1037_after_prompt_timeout(daraja, callback_receiver):
    daraja.configure(prompt_timeout=0.2)
    ack = daraja.pushed(AWAITING_PHONE)
    prompt = daraja.prompt(ack["CheckoutRequestID"])
    assert prompt["status"] == "pending"
    created = datetime.fromisoformat(prompt["createdAt"])
    assert datetime.fromisoformat(prompt["expiresAt"]) - created == timedelta(seconds=0.2)
    (body,) = callback_receiver.wait(1)
    assert_failure_callback(body, ack, 1037, "DS timeout user cannot be reached")


def test_prompts_are_listed_newest_first_and_filtered(daraja):
    first = daraja.pushed(AWAITING_PHONE, 5)["CheckoutRequestID"]
    second = daraja.pushed("254112345678", 6)["CheckoutRequestID"]
    daraja.control("POST", f"prompts/{first}/cancel").raise_for_status()
    prompts = daraja.control("GET", "prompts").json()["prompts"]
    assert [p["checkoutRequestId"] for p in prompts] == [second, first]
    assert set(prompts[0]) == {
        "checkoutRequestId",
        "merchantRequestId",
        "phone",
        "amount",
        "accountReference",
        "transactionDesc",
        "businessShortCode",
        "status",
        "resultCode",
        "resultDesc",
        "receipt",
        "createdAt",
        "expiresAt",
    }
    assert prompts[0]["createdAt"].endswith("Z")
    assert (
        prompts[0]["phone"],
        prompts[0]["amount"],
        prompts[0]["accountReference"],
        prompts[0]["transactionDesc"],
        prompts[0]["businessShortCode"],
    ) == ("254112345678", 6, "INV42", "Order 42", SANDBOX_SHORTCODE)
    by_phone = daraja.control("GET", "prompts", params={"phone": "0712 345 678"}).json()["prompts"]
    assert [p["checkoutRequestId"] for p in by_phone] == [first]
    pending = daraja.control("GET", "prompts", params={"status": "pending"}).json()["prompts"]
    assert [p["checkoutRequestId"] for p in pending] == [second]
    assert daraja.control("GET", "prompts", params={"status": "paid"}).status_code == 400
    assert daraja.control("GET", "prompts", params={"phone": "12"}).status_code == 400


# Scenarios.


def test_a_rule_on_amount_decides_the_result(daraja, callback_receiver):
    rule = daraja.control("POST", "scenarios", json={"amount": 77, "resultCode": 1})
    assert rule.status_code == 201
    assert rule.json()["id"]
    ack = daraja.pushed(AWAITING_PHONE, 77)
    daraja.pushed("254712345679", 78)  # no rule: waits for the handset
    (body,) = callback_receiver.wait(1)
    assert_failure_callback(body, ack, 1, "The balance is insufficient for the transaction.")
    time.sleep(0.2)
    assert len(callback_receiver.calls) == 1


def test_a_rule_on_phone_accepts_any_phone_format_and_the_first_match_wins(daraja, callback_receiver):
    daraja.control("POST", "scenarios", json={"phone": "0712345678", "resultCode": "0"})
    daraja.control("POST", "scenarios", json={"phone": AWAITING_PHONE, "resultCode": 1032})
    ack = daraja.pushed(AWAITING_PHONE, 20)
    assert_success_callback(callback_receiver.wait(1)[0], ack, 20, AWAITING_PHONE)


def test_an_await_rule_makes_a_test_number_wait_for_the_handset(daraja, callback_receiver):
    daraja.control("POST", "scenarios", json={"phone": PAID_PHONE, "resultCode": "await"})
    checkout_id = daraja.pushed(PAID_PHONE)["CheckoutRequestID"]
    time.sleep(0.3)
    assert callback_receiver.calls == []
    assert daraja.prompt(checkout_id)["status"] == "pending"


def test_a_dropped_callback_never_arrives_but_the_query_knows(daraja, callback_receiver):
    daraja.control("POST", "scenarios", json={"phone": PAID_PHONE, "callback": "drop"})
    checkout_id = daraja.pushed(PAID_PHONE)["CheckoutRequestID"]
    wait_until(lambda: daraja.prompt(checkout_id)["status"] == "completed")
    time.sleep(0.2)
    assert callback_receiver.calls == []
    assert daraja.query(checkout_id).json()["ResultCode"] == "0"
    assert daraja.control("GET", "stats").json()["callbacks_sent"] == 0


def test_a_duplicate_callback_arrives_twice(daraja, callback_receiver):
    daraja.control("POST", "scenarios", json={"phone": PAID_PHONE, "callback": "duplicate"})
    ack = daraja.pushed(PAID_PHONE)
    first, second = callback_receiver.wait(2)
    assert first == second
    assert_success_callback(first, ack, 10, PAID_PHONE)


def test_a_contradicting_callback_follows_the_real_one(daraja, callback_receiver):
    daraja.control("POST", "scenarios", json={"phone": "254700001032", "callback": "contradict"})
    ack = daraja.pushed("254700001032", 30)
    real, contradiction = callback_receiver.wait(2)
    assert_failure_callback(real, ack, 1032, "Request cancelled by user")
    assert_success_callback(contradiction, ack, 30, "254700001032")
    assert daraja.query(ack["CheckoutRequestID"]).json()["ResultCode"] == "1032"


def test_a_rule_with_times_applies_to_that_many_pushes(daraja, callback_receiver):
    daraja.control("POST", "scenarios", json={"phone": PAID_PHONE, "resultCode": 1, "times": 1})
    first = daraja.pushed(PAID_PHONE)
    callback_receiver.wait(1)
    second = daraja.pushed(PAID_PHONE)
    body_one, body_two = callback_receiver.wait(2)
    assert_failure_callback(body_one, first, 1, "The balance is insufficient for the transaction.")
    assert_success_callback(body_two, second, 10, PAID_PHONE)
    (rule,) = daraja.control("GET", "scenarios").json()["scenarios"]
    assert (rule["times"], rule["used"]) == (1, 1)


def test_rule_delays_hold_the_result_and_then_the_callback(daraja, callback_receiver):
    daraja.control("POST", "scenarios", json={"resultCode": 0, "delay": 0.2, "callbackDelay": 0.6})
    started = time.monotonic()
    checkout_id = daraja.pushed(AWAITING_PHONE)["CheckoutRequestID"]
    assert daraja.prompt(checkout_id)["status"] == "pending"
    wait_until(lambda: daraja.prompt(checkout_id)["status"] == "completed")
    assert callback_receiver.calls == []
    callback_receiver.wait(1)
    assert time.monotonic() - started >= 0.8


@pytest.mark.parametrize(
    "rule",
    [
        {"resultCode": "soon"},
        {"callback": "sometimes"},
        {"times": 0},
        {"delay": -1},
        {"phone": "12"},
        {"amount": 1.5},
        {"colour": "red"},
    ],
)
def test_invalid_rules_are_refused(daraja, rule):
    response = daraja.control("POST", "scenarios", json=rule)
    assert response.status_code == 400
    assert response.json()["error"]


def test_rules_are_listed_and_cleared(daraja):
    daraja.control("POST", "scenarios", json={"amount": 5, "resultCode": 1})
    daraja.control("POST", "scenarios", json={"phone": "0712345678", "resultCode": "await"})
    rules = daraja.control("GET", "scenarios").json()["scenarios"]
    assert [(r["amount"], r["phone"], r["resultCode"]) for r in rules] == [
        (5, None, 1),
        (None, AWAITING_PHONE, "await"),
    ]
    assert daraja.control("DELETE", "scenarios").json() == {"cleared": 2}
    assert daraja.control("GET", "scenarios").json() == {"scenarios": []}


# Faults.


def oauth_answer(daraja):
    return daraja.get_token()


def push_answer(daraja):
    return daraja.push("254712345679")


def query_answer(daraja):
    checkout_id = daraja.control("GET", "prompts").json()["prompts"][0]["checkoutRequestId"]
    return daraja.query(checkout_id)


def check_http500(response):
    assert_error(response, 500, "500.003.1001", "Internal Server Error")


def check_http503_html(response):
    assert response.status_code == 503
    assert response.headers["Content-Type"].startswith("text/html")
    assert response.text.startswith("<html")


def check_garbage(response):
    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()


def check_rate_limit(response):
    assert_error(response, 500, "500.003.02", "Error Occurred: Spike Arrest Violation")


def check_quota(response):
    assert_error(response, 500, "500.003.03", "Quota Violation")


def check_http429(response):
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "1"
    assert response.json()["fault"]["detail"]["errorcode"] == "policies.ratelimit.SpikeArrestViolation"


def check_invalid_token(response):
    assert_error(response, 404, "404.001.03", "Invalid Access Token")


FAULT_CHECKS = {
    "http500": check_http500,
    "http503_html": check_http503_html,
    "garbage": check_garbage,
    "rate_limit": check_rate_limit,
    "quota": check_quota,
    "http429": check_http429,
    "invalid_token": check_invalid_token,
}


@pytest.mark.parametrize("mode", FAULT_CHECKS)
@pytest.mark.parametrize("endpoint, call", [("oauth", oauth_answer), ("stkpush", push_answer), ("query", query_answer)])
def test_a_fault_breaks_the_next_request_only(daraja, endpoint, call, mode):
    daraja.configure(query_min_interval=0)
    daraja.token  # noqa: B018 - fetch the token before the fault is armed
    daraja.pushed(AWAITING_PHONE)
    fault = daraja.control("POST", "faults", json={"endpoint": endpoint, "mode": mode})
    assert fault.status_code == 201
    FAULT_CHECKS[mode](call(daraja))
    recovered = call(daraja)
    if endpoint == "query":
        assert recovered.json()["errorMessage"] == "The transaction is being processed"
    else:
        assert recovered.status_code == 200, recovered.text


def test_a_fault_on_one_endpoint_spares_the_others(daraja):
    daraja.token  # noqa: B018
    daraja.control("POST", "faults", json={"endpoint": "stkpush", "mode": "http500", "count": 2})
    assert daraja.get_token().status_code == 200
    check_http500(daraja.push())
    check_http500(daraja.push())
    assert daraja.push().status_code == 200
    assert daraja.control("GET", "prompts").json()["prompts"][0]["phone"] == PAID_PHONE
    assert len(daraja.control("GET", "prompts").json()["prompts"]) == 1


def test_an_any_fault_hits_whichever_endpoint_comes_next(daraja):
    daraja.control("POST", "faults", json={"endpoint": "any", "mode": "quota"})
    check_quota(daraja.get_token())
    assert daraja.get_token().status_code == 200


def test_a_slow_fault_delays_a_normal_answer(daraja):
    daraja.control("POST", "faults", json={"endpoint": "oauth", "mode": "slow", "delay": 0.3})
    started = time.monotonic()
    response = daraja.get_token()
    assert time.monotonic() - started >= 0.3
    assert response.status_code == 200 and response.json()["expires_in"] == "3599"


def test_a_slow_push_prompts_the_phone_while_its_answer_is_held(daraja, simulator):
    daraja.token  # noqa: B018
    daraja.control("POST", "faults", json={"endpoint": "stkpush", "mode": "slow", "delay": 1.0})
    connection = http.client.HTTPConnection("127.0.0.1", simulator.port, timeout=10)
    connection.connect()
    caller_port = connection.sock.getsockname()[1]

    def push():
        connection.request(
            "POST",
            "/mpesa/stkpush/v1/processrequest",
            body=json.dumps(daraja.body(AWAITING_PHONE)),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {daraja.token}"},
        )
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())

    with ThreadPoolExecutor(1) as pool:
        answered = pool.submit(push)
        held = wait_until(lambda: daraja.control("GET", "held").json()["held"])
        assert not answered.done()
        assert len(held) == 1
        entry = held[0]
        assert (entry["endpoint"], entry["caller"]) == ("stkpush", {"address": "127.0.0.1", "port": caller_port})
        since, until = (datetime.fromisoformat(entry[key]) for key in ("since", "until"))
        assert until - since == timedelta(seconds=1)
        # The customer is prompted while the caller still waits for Daraja's answer.
        assert daraja.prompt(entry["checkoutRequestId"])["status"] == "pending"
        status, body = answered.result(timeout=10)
    connection.close()
    assert status == 200 and body["CheckoutRequestID"] == entry["checkoutRequestId"]
    assert daraja.control("GET", "held").json() == {"held": []}


def test_faults_are_listed_and_cleared(daraja):
    daraja.control("POST", "faults", json={"endpoint": "query", "mode": "http500", "count": 3})
    assert daraja.control("GET", "faults").json()["faults"][0]["count"] == 3
    assert daraja.control("DELETE", "faults").json() == {"cleared": 1}
    assert daraja.get_token().status_code == 200


@pytest.mark.parametrize(
    "fault",
    [
        {"mode": "explode"},
        {"endpoint": "b2c", "mode": "http500"},
        {"mode": "http500", "count": 0},
        {"mode": "slow", "delay": "long"},
    ],
)
def test_invalid_faults_are_refused(daraja, fault):
    assert daraja.control("POST", "faults", json=fault).status_code == 400


# Configuration and stats.


def test_config_hides_secrets_and_changes_at_run_time(daraja):
    config = daraja.control("GET", "config").json()
    assert "consumer_secret" not in config
    assert config["shortcodes"] == [SANDBOX_SHORTCODE]
    assert sim.SIM_CONSUMER_SECRET not in str(config) and SANDBOX_PASSKEY not in str(config)
    changed = daraja.control("PATCH", "config", json={"token_ttl": 120, "auto_delay": 0}).json()
    assert (changed["token_ttl"], changed["auto_delay"]) == (120, 0)
    assert daraja.get_token().json()["expires_in"] == "120"


@pytest.mark.parametrize(
    "change",
    [
        {"consumer_secret": "x"},
        {"token_ttl": 0},
        {"auto_delay": "fast"},
        {"prompt_timeout": 0},
        {"invalidate_previous_tokens": "yes"},
        {"pin": "12ab"},
    ],
)
def test_invalid_config_changes_are_refused_whole(daraja, change):
    before = daraja.control("GET", "config").json()
    assert daraja.control("PATCH", "config", json={"auto_delay": 9, **change}).status_code == 400
    assert daraja.control("GET", "config").json() == before


def test_stats_count_calls_and_reset_clears_everything_but_tokens(daraja, callback_receiver):
    daraja.pushed(PAID_PHONE)
    daraja.push(AWAITING_PHONE, amount=0)
    checkout_id = daraja.pushed(AWAITING_PHONE)["CheckoutRequestID"]
    daraja.query(checkout_id)
    daraja.control("POST", "scenarios", json={"amount": 5, "resultCode": 1})
    daraja.control("POST", "faults", json={"endpoint": "query", "mode": "quota"})
    callback_receiver.wait(1)
    stats = wait_until(lambda: (s := daraja.control("GET", "stats").json())["callbacks_sent"] and s)
    assert stats == {
        "tokens_issued": 1,
        "pushes_accepted": 2,
        "pushes_rejected": 1,
        "queries": 1,
        "callbacks_sent": 1,
        "callbacks_failed": 0,
    }
    (entry,) = daraja.control("GET", "callbacks").json()["callbacks"]
    assert (entry["url"], entry["status"], entry["error"]) == (callback_receiver.url, 200, None)
    assert entry["body"] == callback_receiver.bodies[0]

    assert daraja.control("POST", "reset").status_code == 200
    assert set(daraja.control("GET", "stats").json().values()) == {0}
    for path, key in [
        ("prompts", "prompts"),
        ("scenarios", "scenarios"),
        ("faults", "faults"),
        ("callbacks", "callbacks"),
    ]:
        assert daraja.control("GET", path).json()[key] == []
    assert daraja.push(AWAITING_PHONE).status_code == 200  # token still valid, lock released
    time.sleep(0.1)
    assert len(callback_receiver.calls) == 1  # the reset prompt's timer was cancelled


def test_health(daraja):
    assert daraja.control("GET", "health").json() == {"status": "ok"}


def test_start_process_serves_from_a_child_until_stopped():
    child = sim.start_process(timeout=20)
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:[0-9]+", child.url)
        assert requests.get(f"{child.url}/simulator/health", timeout=5).json() == {"status": "ok"}
        assert child.process.poll() is None
    finally:
        child.stop()
    assert child.process.poll() is not None
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{child.url}/simulator/health", timeout=5)


def test_start_process_says_so_when_the_child_exits_before_answering():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(RuntimeError, match="exited with status"):
            sim.start_process(port=taken.getsockname()[1], timeout=20)


def test_the_command_line_serves_until_interrupted():
    process = subprocess.Popen(
        [sys.executable, "-m", "simulator", "--port", "0", "--auto-delay", "0.1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = process.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:[0-9]+", line).group(0)
        assert requests.get(f"{url}/simulator/health", timeout=5).json() == {"status": "ok"}
        assert requests.get(f"{url}/simulator/config", timeout=5).json()["auto_delay"] == 0.1
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=5) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
