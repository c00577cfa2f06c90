"""The Daraja client and payment rules, against the simulator over loopback HTTP."""

from __future__ import annotations

import base64
import logging
import threading
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import requests

import mpesa
import simulator as sim
from tests.helpers import FakeClock

PHONE = "254712345678"
CALLBACK = "http://127.0.0.1:9/hooks/stk/token"


def client_for(url: str, **kwargs) -> mpesa.Daraja:
    options = dict(
        base_url=url,
        consumer_key=sim.SIM_CONSUMER_KEY,
        consumer_secret=sim.SIM_CONSUMER_SECRET,
        sleep=lambda seconds: None,
    )
    options.update(kwargs)
    return mpesa.Daraja(**options)


@pytest.fixture
def daraja(simulator):
    with client_for(simulator.url) as client:
        yield client


def control(simulator, method: str, path: str, **kwargs):
    response = requests.request(method, simulator.url + path, timeout=10, **kwargs)
    assert response.status_code < 400, response.text
    return response.json()


def stats(simulator) -> dict:
    return control(simulator, "GET", "/simulator/stats")


def fault(simulator, endpoint: str, mode: str, count: int = 1, delay: float = 0):
    control(
        simulator,
        "POST",
        "/simulator/faults",
        json={"endpoint": endpoint, "mode": mode, "count": count, "delay": delay},
    )


# Rules.


@pytest.mark.parametrize(
    "raw",
    [
        "0712345678",
        "712345678",
        "254712345678",
        "+254712345678",
        "+254 712 345 678",
        "0712-345-678",
        "(0712) 345678",
        254712345678,
        712345678,
    ],
)
def test_phone_formats_normalise_to_2547(raw):
    assert mpesa.normalize_phone(raw) == "254712345678"


@pytest.mark.parametrize("raw", ["0112345678", "112345678", "254112345678", "+254 112 345678"])
def test_01_numbers_normalise_to_2541(raw):
    assert mpesa.normalize_phone(raw) == "254112345678"


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "123456789",
        "0812345678",
        "07123456789",
        "071234567",
        "255712345678",
        "+1 415 555 0100",
        "07l2345678",
        None,
        True,
        7.12e8,
        ["0712345678"],
    ],
)
def test_bad_phone_numbers_are_refused_with_a_message(raw):
    with pytest.raises(mpesa.InvalidInput) as caught:
        mpesa.normalize_phone(raw)
    assert caught.value.field == "phone"
    assert caught.value.message == "Invalid phone number format"


@pytest.mark.parametrize("raw, expected", [(1, 1), (150000, 150000), ("100", 100), (" 42 ", 42)])
def test_whole_shilling_amounts_are_accepted(raw, expected):
    assert mpesa.validate_amount(raw, 150_000) == expected


@pytest.mark.parametrize(
    "raw, message",
    [
        (0, "at least 1"),
        (-5, "at least 1"),
        (150001, "not exceed 150,000"),
        (10.5, "whole number"),
        (10.0, "whole number"),
        ("10.5", "whole number"),
        (True, "whole number"),
        ("ten", "whole number"),
        (None, "required"),
        ("", "required"),
        ([10], "whole number"),
        ("-3", "whole number"),
    ],
)
def test_bad_amounts_are_refused_naming_the_rule(raw, message):
    with pytest.raises(mpesa.InvalidInput) as caught:
        mpesa.validate_amount(raw, 150_000)
    assert caught.value.field == "amount"
    assert message in caught.value.message


def test_reference_and_description_are_cut_to_daraja_limits_and_cleaned():
    assert mpesa.clean_text("CART_12345 & more #1", 12) == "CART-12345 m"
    assert mpesa.clean_text("DJ Kraph Checkout!", 13) == "DJ Kraph Chec"
    assert mpesa.clean_text(None, 12) == ""


def test_phone_mask_keeps_prefix_and_last_two_digits():
    assert mpesa.mask_phone("254708374149") == "2547******49"


def test_checkout_ids_hide_the_payers_number():
    masked = mpesa.mask_checkout_id("ws_CO_23112026103000123708374149")
    assert "708374149" not in masked and masked.endswith("49")


def test_timestamp_is_nairobi_time_whatever_the_server_zone():
    utc_noon = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
    assert mpesa.daraja_timestamp(utc_noon) == "20261123150000"


def test_password_is_base64_of_shortcode_passkey_timestamp_as_text():
    password = mpesa.stk_password("174379", "key", "20261123150000")
    assert isinstance(password, str) and not password.startswith("b'")
    assert base64.b64decode(password).decode() == "174379key20261123150000"


@pytest.mark.parametrize(
    "code, reason",
    [
        (1032, "cancelled"),
        (1037, "timeout"),
        (1019, "timeout"),
        (1, "insufficient_funds"),
        (2001, "wrong_pin"),
        (17, "rejected"),
        (2028, "rejected"),
        ("SFC_IC0003", "rejected"),
        (1025, "error"),
        (9999, "error"),
        (4242, "error"),
    ],
)
def test_result_codes_map_to_reasons(code, reason):
    assert mpesa.result_reason(code)[0] == reason


# Callback parsing.

SUCCESS = {
    "Body": {
        "stkCallback": {
            "MerchantRequestID": "29115-34620561-1",
            "CheckoutRequestID": "ws_CO_191220191020363925",
            "ResultCode": 0,
            "ResultDesc": "The service request is processed successfully.",
            "CallbackMetadata": {
                "Item": [
                    {"Name": "Amount", "Value": 1.0},
                    {"Name": "MpesaReceiptNumber", "Value": "NLJ7RT61SV"},
                    {"Name": "Balance"},
                    {"Name": "TransactionDate", "Value": 20191219102115},
                    {"Name": "PhoneNumber", "Value": 254708374149},
                ]
            },
        }
    }
}


def test_success_callback_is_parsed_by_item_name():
    result = mpesa.parse_callback(SUCCESS)
    assert result.paid and result.result_code == 0
    assert result.amount == Decimal("1.0") and result.amount == 1
    assert result.receipt == "NLJ7RT61SV"
    assert result.phone == "254708374149"
    assert result.transaction_date.isoformat() == "2019-12-19T10:21:15+03:00"
    assert result.items["Balance"] is None


@pytest.mark.parametrize(
    "metadata, receipt",
    [
        (None, None),
        ({"Item": [{"Name": "MpesaReceiptNumber", "Value": "NLJ7RT61SV"}, {"Name": "Balance"}]}, "NLJ7RT61SV"),
        ({"Item": [{"Name": "Amount"}, {"Name": "MpesaReceiptNumber", "Value": "NLJ7RT61SV"}]}, "NLJ7RT61SV"),
        ({"Item": [{"Name": "Amount", "Value": None}]}, None),
        ({"Item": []}, None),
    ],
    ids=["no metadata", "no Amount item", "Amount without a value", "Amount null", "no items"],
)
def test_a_success_without_its_amount_says_so(metadata, receipt):
    callback = {key: value for key, value in SUCCESS["Body"]["stkCallback"].items() if key != "CallbackMetadata"}
    if metadata is not None:
        callback["CallbackMetadata"] = metadata
    result = mpesa.parse_callback({"Body": {"stkCallback": callback}})
    assert result.paid and result.amount is None and result.amount_missing
    assert result.receipt == receipt


def test_a_failure_or_a_success_with_its_amount_misses_nothing():
    assert not mpesa.parse_callback(SUCCESS).amount_missing
    failure = {"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": 1032, "ResultDesc": "Cancelled"}}}
    assert not mpesa.parse_callback(failure).amount_missing


def test_failure_callback_has_no_metadata():
    body = {
        "Body": {
            "stkCallback": {
                "MerchantRequestID": "1",
                "CheckoutRequestID": "ws_CO_1",
                "ResultCode": 1032,
                "ResultDesc": "Request cancelled by user",
            }
        }
    }
    result = mpesa.parse_callback(body)
    assert not result.paid and result.result_code == 1032 and result.receipt is None


def test_callback_codes_and_values_are_coerced():
    body = {
        "Body": {
            "stkCallback": {
                "CheckoutRequestID": "ws_CO_2",
                "ResultCode": "SFC_IC0003",
                "ResultDesc": "The operator does not exist.",
            }
        }
    }
    assert mpesa.parse_callback(body).result_code == "SFC_IC0003"
    items = [
        {"Name": "PhoneNumber", "Value": "254708374149"},
        {"Name": "Amount", "Value": "10"},
        {"Name": "TransactionDate", "Value": "20240315143105"},
    ]
    body = {
        "Body": {
            "stkCallback": {
                "CheckoutRequestID": "ws_CO_3",
                "ResultCode": "0",
                "ResultDesc": "ok",
                "CallbackMetadata": {"Item": items},
            }
        }
    }
    result = mpesa.parse_callback(body)
    assert result.paid and result.amount == 10 and result.transaction_date.year == 2024


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "text",
        {},
        {"Body": {}},
        {"Body": {"stkCallback": "x"}},
        {"Body": {"stkCallback": {"ResultCode": 0}}},
        {"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1"}}},
        {"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": True}}},
        {
            "Body": {
                "stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": 0, "CallbackMetadata": {"Item": "nope"}}
            }
        },
        {
            "Body": {
                "stkCallback": {
                    "CheckoutRequestID": "ws_CO_1",
                    "ResultCode": 0,
                    "CallbackMetadata": {"Item": [{"Name": "Amount", "Value": "ten"}]},
                }
            }
        },
    ],
)
def test_malformed_callbacks_raise_a_clear_error(body):
    with pytest.raises(mpesa.MalformedCallback):
        mpesa.parse_callback(body)


# Token.


def test_token_is_fetched_once_and_reused(simulator, daraja):
    daraja.stk_push("254700000000", 10, callback_url=CALLBACK)
    daraja.stk_query(daraja.stk_push("254700000001", 10, callback_url=CALLBACK).checkout_request_id)
    assert stats(simulator)["tokens_issued"] == 1


def test_a_hundred_threads_at_cold_start_fetch_one_token(simulator, daraja):
    barrier = threading.Barrier(100)
    tokens, errors = [], []

    def worker():
        barrier.wait()
        try:
            tokens.append(daraja.access_token())
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(set(tokens)) == 1
    assert stats(simulator)["tokens_issued"] == 1


def test_token_is_refreshed_a_minute_before_it_expires(simulator):
    clock = FakeClock()
    with client_for(simulator.url, token_cache=mpesa.TokenCache(clock=clock)) as client:
        first = client.access_token()
        clock.advance(3599 - 61)
        assert client.access_token() == first
        clock.advance(2)
        assert client.access_token() != first
    assert stats(simulator)["tokens_issued"] == 2


def test_revoked_token_is_refreshed_and_the_call_retried_once(simulator, daraja):
    daraja.access_token()
    control(simulator, "POST", "/simulator/tokens/revoke")
    accepted = daraja.stk_push("254700000000", 5, callback_url=CALLBACK)
    assert accepted.checkout_request_id.startswith("ws_CO_")
    assert stats(simulator)["tokens_issued"] == 2


def test_a_token_refused_twice_is_an_auth_error(simulator, daraja):
    fault(simulator, "stkpush", "invalid_token", count=2)
    with pytest.raises(mpesa.InvalidAccessToken):
        daraja.stk_push(PHONE, 5, callback_url=CALLBACK)
    assert stats(simulator)["pushes_accepted"] == 0


def test_wrong_credentials_are_an_auth_error(simulator):
    with client_for(simulator.url, consumer_secret="wrong") as client:
        with pytest.raises(mpesa.DarajaAuthError) as caught:
            client.access_token()
    assert caught.value.error_code == "400.008.01"


# STK push.


def test_push_is_accepted_with_a_checkout_id(simulator, daraja):
    accepted = daraja.stk_push(
        "0712345678", 100, callback_url=CALLBACK, account_reference="CART_12345", description="DJ Kraph Checkout"
    )
    assert accepted.response_code == "0"
    assert accepted.checkout_request_id.startswith("ws_CO_")
    assert accepted.checkout_request_id.endswith("712345678")
    assert accepted.customer_message == "Success. Request accepted for processing"
    prompt = control(simulator, "GET", f"/simulator/prompts/{accepted.checkout_request_id}")
    assert prompt["amount"] == 100
    assert prompt["phone"] == PHONE
    assert prompt["accountReference"] == "CART-12345"
    assert prompt["transactionDesc"] == "DJ Kraph Chec"


def test_buy_goods_sends_the_till_as_party_b(simulator):
    with client_for(simulator.url, transaction_type=mpesa.BUY_GOODS, party_b="600100") as client:
        accepted = client.stk_push(PHONE, 20, callback_url=CALLBACK)
    assert accepted.response_code == "0"


def test_wrong_passkey_is_an_auth_error(simulator):
    with client_for(simulator.url, passkey="not-the-passkey") as client:
        with pytest.raises(mpesa.DarajaAuthError) as caught:
            client.stk_push(PHONE, 5, callback_url=CALLBACK)
    assert "Wrong credentials" in caught.value.message


def test_a_field_daraja_refuses_is_a_request_error_naming_it(daraja):
    with pytest.raises(mpesa.DarajaRequestError) as caught:
        daraja.stk_push(PHONE, 5, callback_url="not a url")
    assert caught.value.error_code == "400.002.02"
    assert caught.value.field == "CallBackURL"


def test_second_push_to_a_phone_with_an_open_prompt_is_refused(daraja):
    daraja.stk_push(PHONE, 5, callback_url=CALLBACK)
    with pytest.raises(mpesa.DarajaRequestError) as caught:
        daraja.stk_push(PHONE, 6, callback_url=CALLBACK)
    assert "Unable to lock subscriber" in caught.value.message


def test_client_refuses_bad_input_before_calling_daraja(simulator, daraja):
    with pytest.raises(mpesa.InvalidInput):
        daraja.stk_push("12345", 5, callback_url=CALLBACK)
    with pytest.raises(mpesa.InvalidInput):
        daraja.stk_push(PHONE, 250_001, callback_url=CALLBACK)
    assert stats(simulator)["pushes_accepted"] + stats(simulator)["pushes_rejected"] == 0


def test_push_that_times_out_is_not_sent_again(simulator):
    fault(simulator, "stkpush", "slow", delay=1.5)
    with client_for(simulator.url, timeout=(2, 0.5)) as client:
        client.access_token()
        with pytest.raises(mpesa.DarajaTimeout):
            client.stk_push(PHONE, 5, callback_url=CALLBACK)
    # The slow request still reached Daraja: exactly one prompt, never a second.
    deadline = datetime.now().timestamp() + 5
    while stats(simulator)["pushes_accepted"] < 1 and datetime.now().timestamp() < deadline:
        threading.Event().wait(0.1)
    assert stats(simulator)["pushes_accepted"] == 1


def test_unreachable_daraja_is_unavailable():
    with client_for("http://127.0.0.1:9") as client:
        with pytest.raises(mpesa.DarajaUnavailable):
            client.stk_push(PHONE, 5, callback_url=CALLBACK)


def test_the_proxy_set_when_the_client_is_built_is_used(simulator, monkeypatch):
    # An unreachable proxy: calls through it fail, calls around it reach the simulator.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "")
    with client_for(simulator.url) as through_proxy:
        monkeypatch.delenv("HTTP_PROXY")  # read when the client was built, not per call
        with pytest.raises(mpesa.DarajaUnavailable):
            through_proxy.access_token()
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with client_for(simulator.url) as bypassing:
        assert bypassing.access_token()


def test_a_ca_bundle_from_the_environment_is_used_for_https(monkeypatch, tmp_path):
    bundle = tmp_path / "corporate-ca.pem"
    bundle.write_text("")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    with client_for("https://127.0.0.1:9") as client:
        assert client.session.verify == str(bundle)


@pytest.mark.parametrize(
    "mode, error",
    [
        ("http500", mpesa.DarajaUnavailable),
        ("http503_html", mpesa.DarajaUnavailable),
        ("garbage", mpesa.DarajaBadResponse),
    ],
)
def test_daraja_trouble_maps_to_typed_errors(simulator, daraja, mode, error):
    daraja.access_token()
    fault(simulator, "stkpush", mode)
    with pytest.raises(error):
        daraja.stk_push(PHONE, 5, callback_url=CALLBACK)


@pytest.mark.parametrize("mode", ["rate_limit", "quota", "http429"])
def test_rate_limits_back_off_then_succeed(simulator, mode):
    waits = []
    with client_for(simulator.url, sleep=waits.append) as client:
        client.access_token()
        fault(simulator, "stkpush", mode, count=1)
        assert client.stk_push(PHONE, 5, callback_url=CALLBACK).response_code == "0"
    assert len(waits) == 1 and waits[0] > 0


def test_persistent_rate_limit_is_reported(simulator, daraja):
    daraja.access_token()
    fault(simulator, "stkpush", "rate_limit", count=5)
    with pytest.raises(mpesa.DarajaRateLimited) as caught:
        daraja.stk_push(PHONE, 5, callback_url=CALLBACK)
    assert caught.value.error_code == "500.003.02"


# STK query.


def test_query_reports_pending_then_the_final_code(simulator, daraja):
    control(simulator, "PATCH", "/simulator/config", json={"query_min_interval": 0})
    checkout_id = daraja.stk_push(PHONE, 5, callback_url=CALLBACK).checkout_request_id
    pending = daraja.stk_query(checkout_id)
    assert pending.pending and pending.result_code is None
    control(simulator, "POST", f"/simulator/prompts/{checkout_id}/cancel")
    final = daraja.stk_query(checkout_id)
    assert not final.pending and final.result_code == 1032 and not final.paid
    assert final.result_desc == "Request cancelled by user"


def test_query_of_a_paid_prompt_is_paid(simulator, daraja):
    checkout_id = daraja.stk_push(PHONE, 5, callback_url=CALLBACK).checkout_request_id
    control(simulator, "POST", f"/simulator/prompts/{checkout_id}/pin", json={"pin": sim.SIM_PIN})
    assert daraja.stk_query(checkout_id).paid


def test_querying_too_fast_is_rate_limited(simulator):
    control(simulator, "PATCH", "/simulator/config", json={"query_min_interval": 30})
    with client_for(simulator.url, rate_limit_retries=0) as client:
        checkout_id = client.stk_push(PHONE, 5, callback_url=CALLBACK).checkout_request_id
        client.stk_query(checkout_id)
        with pytest.raises(mpesa.DarajaRateLimited):
            client.stk_query(checkout_id)


# Logs.


def test_logs_carry_no_secret_token_or_full_phone(simulator, daraja, caplog):
    caplog.set_level(logging.DEBUG)
    token = daraja.access_token()
    checkout_id = daraja.stk_push(PHONE, 5, callback_url=CALLBACK).checkout_request_id
    daraja.stk_query(checkout_id)
    text = caplog.text
    for secret in (sim.SIM_CONSUMER_SECRET, mpesa.SANDBOX_PASSKEY, token, PHONE):
        assert secret not in text
    assert "2547******78" in text


@pytest.mark.parametrize(
    "phone, safaricom",
    [
        ("254712345678", True),
        ("254798765432", True),
        ("254745123456", True),
        ("254110123456", True),
        ("254733123456", False),  # Airtel
        ("254756123456", False),  # Airtel
        ("254771123456", False),  # Telkom
        ("254100123456", False),  # Airtel
    ],
)
def test_safaricom_ranges_are_told_from_other_networks(phone, safaricom):
    assert mpesa.looks_like_safaricom(phone) is safaricom
