"""Daraja (M-Pesa Express / STK Push) client, its errors, and the payment rules.

Everything Safaricom-specific lives here and nothing here knows about Flask or the
store: phone and amount rules, the password/timestamp pair, the OAuth token cache,
STK Push, STK Query, callback parsing and the mapping of ResultCodes to reasons.

Exceptions (failed calls; a failed *payment* is a result, never an exception)::

    InvalidInput                 our own validation refused a value (has .field)
    DarajaError                  a call to Daraja did not succeed
    ├── DarajaRequestError       Daraja refused the request (400.002.02 …); do not retry
    ├── DarajaAuthError          credentials, product or configuration problem
    ├── DarajaRateLimited        spike arrest / quota / HTTP 429; back off
    ├── DarajaUnavailable        could not connect, 5xx, or an answer that is not Daraja's
    └── DarajaTimeout            no answer in time; a push may or may not have reached the phone
    MalformedCallback            a callback document that is not Daraja's shape
"""
from __future__ import annotations

import base64
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

import requests
from requests.adapters import HTTPAdapter

log = logging.getLogger(__name__)

NAIROBI = ZoneInfo("Africa/Nairobi")
SANDBOX_SHORTCODE = "174379"
SANDBOX_PASSKEY = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"
BASE_URLS = {
    "sandbox": "https://sandbox.safaricom.co.ke",
    "production": "https://api.safaricom.co.ke",
}
PAYBILL = "CustomerPayBillOnline"
BUY_GOODS = "CustomerBuyGoodsOnline"
TRANSACTION_TYPES = (PAYBILL, BUY_GOODS)
DARAJA_MAX_AMOUNT = 250_000
ACCOUNT_REFERENCE_LIMIT = 12
TRANSACTION_DESC_LIMIT = 13


# --------------------------------------------------------------------------- rules

class InvalidInput(ValueError):
    """A value a customer or shop sent that we refuse before calling Daraja."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


_PHONE_SEPARATORS = re.compile(r"[\s\-().]")
_PHONE_SHAPES = (
    re.compile(r"^\+?254([71]\d{8})$"),
    re.compile(r"^0([71]\d{8})$"),
    re.compile(r"^([71]\d{8})$"),
)


def normalize_phone(raw) -> str:
    """Return the number as 2547XXXXXXXX / 2541XXXXXXXX, or raise InvalidInput."""
    if not isinstance(raw, (str, int)) or isinstance(raw, bool):
        raise InvalidInput("phone", "Invalid phone number format")
    text = _PHONE_SEPARATORS.sub("", str(raw).strip())
    for shape in _PHONE_SHAPES:
        match = shape.match(text)
        if match:
            return "254" + match.group(1)
    raise InvalidInput("phone", "Invalid phone number format")


def validate_amount(raw, maximum: int = 150_000) -> int:
    """Return a whole number of shillings from 1 to maximum, or raise InvalidInput.

    A JSON integer or a string of digits; fractions, booleans, negatives, floats
    (even 10.0: the customer may have meant cents) and anything else are refused.
    """
    if isinstance(raw, bool):
        raise InvalidInput("amount", "Amount must be a whole number of shillings")
    if isinstance(raw, int):
        amount = raw
    elif isinstance(raw, str) and re.fullmatch(r"\s*\d{1,12}\s*", raw):
        amount = int(raw)
    elif raw is None or raw == "":
        raise InvalidInput("amount", "Amount is required")
    else:
        raise InvalidInput("amount", "Amount must be a whole number of shillings")
    if amount < 1:
        raise InvalidInput("amount", "Amount must be at least 1 KES")
    if amount > maximum:
        raise InvalidInput("amount", f"Amount must not exceed {maximum:,} KES")
    return amount


_DARAJA_TEXT = re.compile(r"[^A-Za-z0-9 \-]")


def clean_text(text, limit: int) -> str:
    """Keep the characters Daraja accepts ([A-Za-z0-9 -]) and cut to its length limit."""
    cleaned = _DARAJA_TEXT.sub("", str(text or "").replace("_", "-"))
    return " ".join(cleaned.split())[:limit].strip()


def mask_phone(phone) -> str:
    """2547******49: enough to recognise a number, too little to call it."""
    text = str(phone or "")
    if len(text) < 6:
        return "*" * len(text)
    return text[:4] + "*" * (len(text) - 6) + text[-2:]


def daraja_timestamp(now: datetime | None = None) -> str:
    """The YYYYMMDDHHmmss timestamp in Nairobi time, whatever the server's zone."""
    moment = now.astimezone(NAIROBI) if now else datetime.now(NAIROBI)
    return moment.strftime("%Y%m%d%H%M%S")


def stk_password(shortcode: str, passkey: str, timestamp: str) -> str:
    """base64(shortcode + passkey + timestamp), as a str (never "b'…'")."""
    return base64.b64encode(f"{shortcode}{passkey}{timestamp}".encode()).decode("ascii")


# ----------------------------------------------------------------- result codes

# ResultCode -> (reason, message a customer understands)
RESULT_REASONS: dict[int | str, tuple[str, str]] = {
    1032: ("cancelled", "User cancelled transaction"),
    1037: ("timeout", "The phone could not be reached or did not answer in time"),
    1019: ("timeout", "The payment request expired before it was completed"),
    1: ("insufficient_funds", "Insufficient M-Pesa balance"),
    2001: ("wrong_pin", "Wrong M-Pesa PIN entered"),
    2: ("rejected", "Amount is below the minimum allowed"),
    3: ("rejected", "Amount is above the maximum allowed per transaction"),
    4: ("rejected", "This payment would exceed the daily M-Pesa limit"),
    8: ("rejected", "The receiving account cannot accept this amount"),
    17: ("rejected", "The same amount was requested less than 2 minutes ago; wait and retry"),
    1001: ("rejected", "Another M-Pesa transaction is in progress on this phone"),
    2028: ("rejected", "This shortcode is not allowed to receive this payment"),
    8006: ("rejected", "The M-Pesa PIN is locked"),
    "SFC_IC0003": ("rejected", "The receiving till or paybill does not exist"),
}


def result_reason(code) -> tuple[str, str]:
    """Map a non-zero ResultCode to (reason, message); unknown codes are 'error'."""
    return RESULT_REASONS.get(code, ("error", "The payment could not be completed"))


def normalize_result_code(value) -> int | str:
    """Daraja sends 0 in callbacks and "0" in queries; keep 'SFC_IC0003'-style codes as text."""
    text = str(value).strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if not text:
        raise ValueError("empty ResultCode")
    return text
