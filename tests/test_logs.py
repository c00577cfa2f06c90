"""No phone number in any log line, whoever writes it: the masking, the filter on every handler,
and everything a whole server writes while people pay, hit the limits, poll and look things up.

The test finds phone numbers with a pattern of its own (PHONE_FORMS, tried first on lines with
and without numbers) and looks for the very numbers it paid with, in every written form.
"""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import sys

import pytest
import requests

import mpesa
from simulator import SIM_PIN
from telemetry.logs import TEXT_LOG_FORMAT, JsonFormatter, mask_phones_on
from tests.helpers import CALLBACK_TOKEN, PAID, ServerProcess, free_port, wait_until

# A Kenyan mobile number as people and programs write it (2547…, 2541…, +254…, %2B254… in a
# URL, 07…, 01…, in groups or not, 0712+345+678 in a query string), or the national number
# ending a CheckoutRequestID; not a piece of a longer run of letters and digits.
GAP = r"(?:[ +-]|%20)?"  # a space, a dash, or a space in a URL
NUMBER = rf"(?:7[0-9]{{2}}|1[01][0-9]){GAP}[0-9]{{3}}{GAP}[0-9]{{3}}"
PHONE_FORMS = re.compile(
    rf"(?<![0-9A-Za-z])(?:(?:\+|%2B)?254{GAP}|0){NUMBER}(?![0-9A-Za-z])"
    r"|ws_CO_[0-9]{17}(?:7[0-9]{8}|1[01][0-9]{7})(?![0-9])"
)
HANDSET = "254798765432"  # waits for the handset
OTHER = "254110987654"  # a 2541… number, waits too
ADMIN = {"Authorization": "Bearer logs-admin-token-0123456789"}


@pytest.mark.parametrize(
    "line",
    [
        "254712345678",
        "254110123456",
        "+254712345678",
        "phone=%2B254712345678&x=1",
        "0712345678",
        "0110123456",
        "0712 345 678",
        "+254 712 345 678",
        "0712-345-678",
        "GET /simulator/prompts?phone=0712+345+678 HTTP/1.1",
        "?phone=0712%20345%20678",
        "ratelimit 3 per 1 minute (phone:254712345678) exceeded",
        '{"phone":254712345678}',
        "/stkpush/status/ws_CO_15032024143022123708374149 200",
        "evt_ws_CO_15032024143022123708374149_completed",
    ],
)
def test_the_pattern_finds_a_phone_in_every_form(line):
    assert PHONE_FORMS.search(line)


@pytest.mark.parametrize(
    "line",
    [
        "2547******78",
        "+2547******78",
        "0712****78",
        "2541******56",
        "ws_CO_1503202414302212370*****49",
        "2026-11-23T09:35:42.596Z took 20261123103000",
        "created 1700000000",
        "0123456789",  # not a Safaricom number
        "request_id 0f3a9c0712345678bc2e4d",  # inside a hex id
        "ratelimit 3 per 1 minute (phone:0c1f2a9d6e254712345678aa90b1c2d3) exceeded",
        "25471234567",  # a digit short
        "2547123456789",  # a digit long
        "ws_CO_29112017125436847",  # the ids of 2017 held no number
    ],
)
def test_the_pattern_leaves_masked_numbers_and_other_figures_alone(line):
    assert not PHONE_FORMS.search(line)


@pytest.mark.parametrize(
    "text, masked",
    [
        ("phone=254712345678", "phone=2547******78"),
        ("(phone:+254712345678)", "(phone:+2547******78)"),
        ("?phone=%2B254712345678", "?phone=%2B2547******78"),
        ("to 0712 345 678.", "to 0712****78."),
        ("?phone=0712+345+678&x", "?phone=0712****78&x"),
        ("?phone=%2B254%20712%20345%20678", "?phone=%2B2547******78"),
        ("0110123456", "0110****56"),
        ("/status/ws_CO_15032024143022123708374149", "/status/ws_CO_1503202414302212370*****49"),
        ("id 0f3a9c0712345678bc and 2026-11-23T09:35:42Z", "id 0f3a9c0712345678bc and 2026-11-23T09:35:42Z"),
    ],
)
def test_masking_keeps_the_shape_of_mask_phone(text, masked):
    assert mpesa.mask_phones(text) == masked
    assert mpesa.mask_phones(masked) == masked


def test_the_filter_masks_a_library_line_a_traceback_and_extra_fields_on_every_handler():
    as_json, as_text = io.StringIO(), io.StringIO()
    json_handler, text_handler = logging.StreamHandler(as_json), logging.StreamHandler(as_text)
    json_handler.setFormatter(JsonFormatter())
    text_handler.setFormatter(logging.Formatter(TEXT_LOG_FORMAT))
    mask_phones_on(json_handler)  # one filter is enough: it masks the record itself
    library = logging.getLogger("some.library")
    library.propagate, library.level = False, logging.INFO
    library.handlers = [json_handler, text_handler]
    try:
        library.info("ratelimit %s (%s) exceeded", "3 per 1 minute", "phone:254712345678")
        try:
            raise ValueError("no prompt for 0712345678")
        except ValueError:
            library.exception("push to %s failed", "+254 712 345 678")
        library.info("sent", extra={"to": "0110123456", "checkout": "ws_CO_15032024143022123708374149"})
    finally:
        library.handlers = []
    first, second, third = (json.loads(line) for line in as_json.getvalue().splitlines())
    assert first["message"] == "ratelimit 3 per 1 minute (phone:2547******78) exceeded"
    assert second["message"] == "push to +2547******78 failed"
    assert "ValueError: no prompt for 0712****78" in second["exception"]
    assert third["to"] == "0110****56" and third["checkout"] == "ws_CO_1503202414302212370*****49"
    assert "ValueError: no prompt for 0712****78" in as_text.getvalue()
    for written in (as_json.getvalue(), as_text.getvalue()):
        assert not PHONE_FORMS.search(written), written


# A whole server.


def written_forms(phone: str) -> list[str]:
    """The ways a normalised 2547… number may be written, the bare national number among them."""
    national = phone[3:]
    groups = (national[:3], national[3:6], national[6:])
    return [phone, "+" + phone, "0" + national, national, "0" + " ".join(groups), "0" + "+".join(groups)]


def push(base: str, phone: str, amount: int, headers=None) -> requests.Response:
    return requests.post(base + "/stkpush", json={"phone": phone, "amount": amount}, headers=headers or {}, timeout=30)


def settled(base: str, checkout_id: str) -> dict:
    def answer():
        body = requests.get(f"{base}/stkpush/status/{checkout_id}", timeout=10).json()
        return body if body["status"] != "pending" else None

    return wait_until(answer, timeout=20, every=0.25)


def answer_on_the_handset(base: str, phone: str, action: str, pin: str = SIM_PIN) -> str:
    """Find the phone's pending prompt through the server's handset relay, answer it; its id."""
    prompts = wait_until(
        lambda: requests.get(base + "/simulator/prompts", params={"phone": phone}, timeout=10).json()["prompts"]
    )
    checkout_id = prompts[0]["checkoutRequestId"]
    answer = requests.post(f"{base}/simulator/prompts/{checkout_id}/{action}", json={"pin": pin}, timeout=10)
    assert answer.status_code == 200, answer.text
    return checkout_id


def pay_limit_poll_and_look_up(base: str) -> None:
    """What a day brings: prompts answered on the handset, one phone over its limit, a paid test
    number, polls, a callback that is not Daraja's, the admin's lookups."""
    outcomes = {}
    for written, action in (("0798 765 432", "pin"), ("+254798765432", "cancel"), (HANDSET, "timeout")):
        assert push(base, written, 10).status_code == 200
        checkout_id = answer_on_the_handset(base, written, action)
        outcomes[action] = settled(base, checkout_id)["status"]
    assert outcomes == {"pin": "completed", "cancel": "failed", "timeout": "failed"}
    over = push(base, "0798765432", 10)  # the phone's fourth prompt this minute
    assert over.status_code == 429 and over.json()["success"] is False

    # A client's own request id may be a phone number too.
    assert push(base, "0110 987 654", 20, headers={"X-Request-ID": OTHER}).status_code == 200
    wrong_pin = answer_on_the_handset(base, "0110987654", "pin", pin="0000")
    assert settled(base, wrong_pin)["reason"] == "wrong_pin"

    paid = push(base, "0" + PAID[3:], 30).json()["checkoutRequestId"]
    assert requests.post(base + "/stkpush/status", json={"checkoutRequestId": paid}, timeout=10).ok
    assert settled(base, paid)["status"] == "completed"
    assert requests.get(base + "/stkpush/status/0798765432", timeout=10).status_code == 404
    assert requests.get(base + "/confirmation.html", params={"checkoutRequestId": paid}, timeout=10).ok

    hook = f"{base}/hooks/stk/{CALLBACK_TOKEN}"
    not_a_number = {
        "CheckoutRequestID": paid,
        "ResultCode": 0,
        "CallbackMetadata": {"Item": [{"Name": "Amount", "Value": "0798 765 432"}]},
    }
    assert requests.post(hook, json={"Body": {"stkCallback": not_a_number}}, timeout=10).status_code == 400
    stranger = {"CheckoutRequestID": "ws_CO_01012026120000000798765432", "ResultCode": 1032, "ResultDesc": "x"}
    assert requests.post(hook, json={"Body": {"stkCallback": stranger}}, timeout=10).ok

    listed = requests.get(base + "/transactions", params={"phone": "+254798765432"}, headers=ADMIN, timeout=10)
    assert listed.json()["total"] == 3
    assert requests.get(f"{base}/transactions/{paid}", headers=ADMIN, timeout=10).ok
    assert (
        requests.get(base + "/transactions", headers={"Authorization": "Bearer 0798765432"}, timeout=10).status_code
        == 401
    )
    assert requests.get(base + "/metrics", headers=ADMIN, timeout=10).ok


SERVERS = {
    # The Procfile's command (uWSGI), the simulator in a process of its own.
    "procfile-json": (["serve.py"], "json"),
    "procfile-text": (["serve.py"], "text"),
    # The development server, the simulator on a thread of the server's own process.
    "python-text": (["server.py"], "text"),
}


@pytest.mark.parametrize("server", SERVERS)
def test_a_whole_server_writes_no_phone_number_in_any_line(server, tmp_path):
    arguments, log_format = SERVERS[server]
    port = free_port()
    env = {
        "MPESA_ENV": "simulator",
        "PORT": str(port),
        "CALLBACK_TOKEN": CALLBACK_TOKEN,
        "ADMIN_TOKEN": ADMIN["Authorization"].removeprefix("Bearer "),
        "RATELIMIT_ENABLED": "true",  # the limits as shipped: three prompts a minute per phone
        "STORE_URL": "memory://",
        "LOG_FORMAT": log_format,
        "PYTHONUNBUFFERED": "1",
    }
    if server.startswith("procfile"):
        env["SIMULATOR_PORT"] = str(free_port())
    process = ServerProcess([sys.executable, *arguments], env, port, tmp_path / "server.log")
    try:
        pay_limit_poll_and_look_up(process.url)
    finally:
        process.kill(signal.SIGTERM)
    text = process.log_path.read_text()

    leaks = [line for line in text.splitlines() if PHONE_FORMS.search(line)]
    assert not leaks, "\n".join(leaks)
    for phone in (HANDSET, OTHER):
        for form in written_forms(phone):
            assert form not in text, form
    # What was logged, masked: the limit's breach, the handset, the simulator, the payments.
    assert "rate limit of 3 per window reached on api.stkpush" in text
    assert re.search(r"handset pin on ws_CO_\d{17}79\*{5}32: simulator answered 200", text)
    assert re.search(r"simulator: push ws_CO_\d{17}11\*{5}54 accepted for 2541\*{6}54", text)
    assert "phone=2547******32" in text and "malformed callback refused" in text
    if log_format == "json":
        assert '"request_id":"2541******54"' in text
