"""Daraja's wire format as the simulator speaks it: the error envelope, result descriptions,
and the checks on STK Push and Query bodies.

A body is checked field by field in Daraja's own order and the first bad field is refused with
400.002.02 "Bad Request - Invalid <field>", as the sandbox does; the checks are for form only
(the passkey behind a Password is the engine's business).
"""

from __future__ import annotations

import re
import secrets
from datetime import datetime
from urllib.parse import urlsplit

from flask import jsonify

from mpesa import DARAJA_MAX_AMOUNT, NAIROBI, TRANSACTION_TYPES

RESULT_DESCS: dict[int | str, str] = {
    0: "The service request is processed successfully.",
    1: "The balance is insufficient for the transaction.",
    2: "Declined due to limit rule",
    3: "Declined due to limit rule: greater than the maximum transaction amount",
    4: "Declined due to limit rule: would exceed daily transfer limit",
    8: "Declined due to limit rule: would exceed the maximum balance",
    17: "Rule limited.",
    1001: "Unable to lock subscriber, a transaction is already in process for the current subscriber",
    1019: "Transaction has expired.",
    1025: "An error occurred while sending a push request.",
    1032: "Request cancelled by user",
    1037: "DS timeout user cannot be reached",
    2001: "The initiator information is invalid.",
    2028: "The request is not permitted according to product assignment",
    8006: "The security credential is locked.",
    "SFC_IC0003": "The operator does not exist.",
}

_SHORTCODE = re.compile(r"[0-9]{5,7}")
_MSISDN = re.compile(r"254[71][0-9]{8}")
_TIMESTAMP = re.compile(r"[0-9]{14}")
WHOLE = re.compile(r"[0-9]{1,9}")  # bounded: int() of huge digit strings is refused


def result_desc(code: int | str) -> str:
    """The ResultDesc Daraja gives for a ResultCode."""
    return RESULT_DESCS.get(code, f"Simulated result {code}")


class DarajaRefusal(Exception):
    """An answer in Daraja's error envelope; the HTTP status is the code's first group."""

    def __init__(self, code: str, message: str, request_id: str | None = None):
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message
        self.request_id = request_id or new_request_id()
        self.status = int(code.split(".")[0])

    def response(self):
        """The refusal as Daraja sends it: the JSON envelope and its HTTP status."""
        body = {"requestId": self.request_id, "errorCode": self.code, "errorMessage": self.message}
        return jsonify(body), self.status


def invalid(name: str) -> DarajaRefusal:
    """The refusal of a missing or malformed field."""
    return DarajaRefusal("400.002.02", f"Bad Request - Invalid {name}")


def new_request_id() -> str:
    """An id shaped like Daraja's older MerchantRequestIDs: 12345-12345678-1."""
    return f"{secrets.randbelow(90_000) + 10_000}-{secrets.randbelow(90_000_000) + 10_000_000}-1"


def as_text(value) -> str | None:
    """A JSON string or integer as text (Daraja takes either for its numeric fields)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    return str(value)


def _matching(body: dict, name: str, pattern: re.Pattern) -> str:
    text = as_text(body.get(name))
    if text is None or not pattern.fullmatch(text):
        raise invalid(name)
    return text


def _timestamp(body: dict, skew: float) -> str:
    """A real YYYYMMDDHHmmss moment in Nairobi time, within skew seconds of now."""
    text = _matching(body, "Timestamp", _TIMESTAMP)
    try:
        moment = datetime.strptime(text, "%Y%m%d%H%M%S").replace(tzinfo=NAIROBI)
    except ValueError:
        raise invalid("Timestamp") from None
    if abs((moment - datetime.now(NAIROBI)).total_seconds()) > skew:
        raise invalid("Timestamp")
    return text


def credentials(body: dict, skew: float) -> tuple[str, str, str]:
    """BusinessShortCode, Timestamp and Password (a push's and a query's), checked for form only."""
    shortcode = _matching(body, "BusinessShortCode", _SHORTCODE)
    timestamp = _timestamp(body, skew)
    password = body.get("Password")
    if not isinstance(password, str) or not password:
        raise invalid("Password")
    return shortcode, timestamp, password


def _amount(body: dict) -> int:
    """Whole shillings, 1 to DARAJA_MAX_AMOUNT; decimals (10.5, "10.5", even 10.0) are refused."""
    text = as_text(body.get("Amount"))
    if text is None or not WHOLE.fullmatch(text) or not 1 <= int(text) <= DARAJA_MAX_AMOUNT:
        raise invalid("Amount")
    return int(text)


def _callback_url(body: dict) -> str:
    url = body.get("CallBackURL")
    if not isinstance(url, str) or re.search(r"\s", url):
        raise invalid("CallBackURL")
    try:
        parts = urlsplit(url)
        absolute = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        absolute = False
    if not absolute:
        raise invalid("CallBackURL")
    return url


def _limited_text(body: dict, name: str, limit: int, required: bool) -> str:
    value = body.get(name)
    if value is None and not required:
        return ""
    text = as_text(value)
    if text is None or len(text) > limit or (required and not text.strip()):
        raise invalid(name)
    return text


def push_fields(body: dict, skew: float) -> dict:
    """Every STK Push field checked for form, in Daraja's order; raises DarajaRefusal."""
    shortcode, timestamp, password = credentials(body, skew)
    if body.get("TransactionType") not in TRANSACTION_TYPES:
        raise invalid("TransactionType")
    return {
        "shortcode": shortcode,
        "timestamp": timestamp,
        "password": password,
        "amount": _amount(body),
        "party_a": _matching(body, "PartyA", _MSISDN),
        "party_b": _matching(body, "PartyB", _SHORTCODE),
        "phone": _matching(body, "PhoneNumber", _MSISDN),
        "callback_url": _callback_url(body),
        "account_reference": _limited_text(body, "AccountReference", 12, required=True),
        "transaction_desc": _limited_text(body, "TransactionDesc", 13, required=False),
    }
