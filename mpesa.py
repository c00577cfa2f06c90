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

It is one module past the usual size on purpose: it is the whole boundary with Safaricom, and
a reader checking what we send or accept against Daraja's documentation finds it in one place.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ProxyError
from urllib3.util.retry import Retry

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
# How long the PIN prompt stays on the customer's phone before it gives up (ResultCode 1037).
PROMPT_SECONDS = 60
# The national number's first digits on Safaricom's lines (after 0 or 254). Other networks'
# numbers (Airtel 073x, 075x, 078x, 010x; Telkom 077x) get no M-Pesa prompt; a number ported
# to Safaricom keeps its old prefix, so this only ever warns.
SAFARICOM_PREFIXES = (
    "70",
    "71",
    "72",
    "740",
    "741",
    "742",
    "743",
    "745",
    "746",
    "748",
    "757",
    "758",
    "759",
    "768",
    "769",
    "79",
    "110",
    "111",
    "112",
    "113",
    "114",
    "115",
)


def looks_like_safaricom(phone: str) -> bool:
    """Whether a normalised 254... number is in one of Safaricom's ranges (ported numbers are not)."""
    return phone[3:].startswith(SAFARICOM_PREFIXES)


ACCOUNT_REFERENCE_LIMIT = 12
TRANSACTION_DESC_LIMIT = 13


class InvalidInput(ValueError):
    """A value a customer or shop sent that we refuse before calling Daraja."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


# Ids taken from outside (a CheckoutRequestID in a URL or a poll, a catalogue item's id) must
# be safe in a URL path, a log line and a store key; Daraja's own ids fit well within this.
ID_PATTERN = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")

_PHONE_SEPARATORS = re.compile(r"[\s\-().]")
# Safaricom numbers are 07XX XXX XXX and, since 2020, 010X/011X XXX XXX; "0123456789"
# (a common example of an invalid number) fits neither.
_NATIONAL = r"(7[0-9]{8}|1[01][0-9]{7})"
_PHONE_SHAPES = (
    re.compile(rf"^\+?254{_NATIONAL}$"),
    re.compile(rf"^0{_NATIONAL}$"),
    re.compile(rf"^{_NATIONAL}$"),
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
    elif isinstance(raw, str) and re.fullmatch(r"\s*[0-9]{1,12}\s*", raw):
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


_CHECKOUT_PHONE = re.compile(r"^(ws_CO_\d{17})(\d{2})\d{5}(\d{2})$")


def mask_checkout_id(checkout_id) -> str:
    """CheckoutRequestIDs end with the payer's national number: mask it as we mask phones."""
    text = str(checkout_id or "")
    match = _CHECKOUT_PHONE.match(text)
    return f"{match.group(1)}{match.group(2)}*****{match.group(3)}" if match else text


# A phone number anywhere in a text (a log line): 2547…/2541…, +254… (%2B254… in a URL),
# 07…/01…, whole or in groups (0712 345 678; 0712+345+678 and %20 in a URL), or the national
# number ending a CheckoutRequestID; never part of a longer run of letters and digits (a hash,
# an id). Each branch starts with a literal, so the search stops only where one begins: a
# lookbehind in front of them all would make it try every position, several times slower.
_GAP = r"(?:[ +-]|%20)?"
_GROUPS = rf"(?:7\d\d|1[01]\d){_GAP}\d{{3}}{_GAP}\d{{3}}(?![A-Za-z0-9])"  # 712 345 678, 110 123 456
PHONE_IN_TEXT = re.compile(
    rf"ws_CO_\d{{17}}{_NATIONAL}(?![A-Za-z0-9])"
    rf"|%2B254{_GAP}{_GROUPS}"
    rf"|254(?<![A-Za-z0-9]254){_GAP}{_GROUPS}"  # a "+" in front stays in front
    rf"|0(?<![A-Za-z0-9]0){_GROUPS}"
)
_GAPS = re.compile(r"%20|[ +-]")


def mask_phones(text: str) -> str:
    """text with every phone number in it masked as mask_phone and mask_checkout_id mask them."""
    return PHONE_IN_TEXT.sub(_masked, text)


def _masked(match: re.Match) -> str:
    found = match.group(0)
    if found.startswith("ws_CO_"):
        return mask_checkout_id(found)
    prefix = "%2B" if found.startswith("%2B") else ""
    return prefix + mask_phone(_GAPS.sub("", found.removeprefix(prefix)))


def daraja_timestamp(now: datetime | None = None) -> str:
    """The YYYYMMDDHHmmss timestamp in Nairobi time, whatever the server's zone."""
    moment = now.astimezone(NAIROBI) if now else datetime.now(NAIROBI)
    return moment.strftime("%Y%m%d%H%M%S")


def stk_password(shortcode: str, passkey: str, timestamp: str) -> str:
    """base64(shortcode + passkey + timestamp), as a str (never "b'…'")."""
    return base64.b64encode(f"{shortcode}{passkey}{timestamp}".encode()).decode("ascii")


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


class DarajaError(Exception):
    """A call to Daraja did not succeed; carries what an operator needs to look it up.

    request_sent is False when the request certainly never left (no connection was made,
    or no token to send it with was had), None when that is not known.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_code: str | None = None,
        request_id: str | None = None,
        request_sent: bool | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_code = error_code
        self.request_id = request_id
        self.request_sent = request_sent

    def __str__(self) -> str:
        code = f" [{self.error_code}]" if self.error_code else ""
        return f"{self.message}{code}"


class DarajaRequestError(DarajaError):
    """Daraja refused the request as sent (400.002.02 Invalid <Field>, locked subscriber…)."""

    @property
    def field(self) -> str | None:
        match = re.search(r"Invalid (\w+)", self.message or "")
        return match.group(1) if match else None


class DarajaAuthError(DarajaError):
    """Credentials, product assignment, shortcode or passkey are wrong: an operator must act."""


class InvalidAccessToken(DarajaAuthError):
    """The token was refused (404.001.03 and kin); refreshing it usually helps once."""


class DarajaRateLimited(DarajaError):
    """Spike arrest, quota or HTTP 429: slow down."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class DarajaUnavailable(DarajaError):
    """Daraja could not be reached, or answered with a server error."""


class DarajaBadResponse(DarajaError):
    """Daraja (or a proxy in front of it) answered with something that is not Daraja's JSON."""


class DarajaTimeout(DarajaError):
    """No answer in time. For a push, the prompt may still reach the phone: never resend blindly."""


class MalformedCallback(ValueError):
    """A callback body that is not Daraja's Body.stkCallback shape."""


_TOKEN_ERRORS = {"404.001.03", "400.003.01", "401.002.01", "401.003.01"}
_AUTH_ERRORS = {
    "400.008.01",
    "400.008.02",
    "403.001.01",
    "404.001.01",
    "404.001.04",
    "404.003.01",
    "405.001",
    "999991",
    "999996",
    "999997",
    "999998",
}
_RATE_LIMIT_ERRORS = {"500.003.02", "500.003.03"}
_PENDING_MESSAGES = ("being processed", "under processing")


def still_processing(error: DarajaError) -> bool:
    """Whether Daraja refused a query only because the customer has not answered the prompt yet."""
    return (
        isinstance(error, DarajaRequestError)
        and error.error_code == "500.001.1001"
        and any(text in error.message.lower() for text in _PENDING_MESSAGES + ("lock subscriber",))
    )


def _error_body(response: requests.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def error_from_response(response: requests.Response) -> DarajaError:
    """Turn a non-success Daraja answer into the matching exception class."""
    body = _error_body(response)
    fault = body.get("fault") if isinstance(body.get("fault"), dict) else None
    code = str(body.get("errorCode") or body.get("resultCode") or "") or None
    message = str(body.get("errorMessage") or body.get("resultDesc") or (fault or {}).get("faultstring") or "").strip()
    facts: dict[str, Any] = {"status": response.status_code, "error_code": code, "request_id": body.get("requestId")}
    lowered = message.lower()

    if response.status_code == 429 or code in _RATE_LIMIT_ERRORS or "spike arrest" in lowered:
        retry_after = response.headers.get("Retry-After", "")
        return DarajaRateLimited(
            message or "Daraja rate limit reached",
            retry_after=float(retry_after) if retry_after.isdigit() else None,
            **facts,
        )
    if code in _TOKEN_ERRORS or "invalid access token" in lowered:
        return InvalidAccessToken(message or "Invalid Access Token", **facts)
    if code in _AUTH_ERRORS or response.status_code in (401, 403):
        return DarajaAuthError(message or "Daraja refused the credentials", **facts)
    if code == "500.001.1001":
        if "credentials" in lowered or "merchant does not exist" in lowered:
            return DarajaAuthError(message, **facts)
        return DarajaRequestError(message or "Daraja refused the request", **facts)
    if code and code.startswith("400."):
        return DarajaRequestError(message or "Bad Request", **facts)
    if not body:
        kind = DarajaUnavailable if response.status_code >= 500 else DarajaBadResponse
        return kind(
            f"Daraja answered HTTP {response.status_code} without a Daraja error body", status=response.status_code
        )
    if response.status_code >= 500:
        return DarajaUnavailable(message or "Daraja server error", **facts)
    return DarajaRequestError(message or f"Daraja answered HTTP {response.status_code}", **facts)


@dataclass(frozen=True)
class PushAccepted:
    """Daraja accepted the push: a prompt is on its way (this is not a payment yet)."""

    merchant_request_id: str
    checkout_request_id: str
    response_code: str
    response_description: str
    customer_message: str


@dataclass(frozen=True)
class QueryResult:
    """What STK Query says: still pending, or final with a ResultCode."""

    checkout_request_id: str
    pending: bool
    result_code: int | str | None = None
    result_desc: str | None = None
    merchant_request_id: str | None = None

    @property
    def paid(self) -> bool:
        return not self.pending and self.result_code == 0


@dataclass(frozen=True)
class CallbackResult:
    """A parsed Body.stkCallback."""

    merchant_request_id: str
    checkout_request_id: str
    result_code: int | str
    result_desc: str
    amount: Decimal | None = None
    receipt: str | None = None
    transaction_date: datetime | None = None
    phone: str | None = None
    items: dict = field(default_factory=dict)

    @property
    def paid(self) -> bool:
        return self.result_code == 0

    @property
    def amount_missing(self) -> bool:
        """Paid, says the callback, but without an Amount item (or any CallbackMetadata)."""
        return self.paid and self.amount is None


def parse_callback(document) -> CallbackResult:
    """Parse Daraja's STK callback; raise MalformedCallback when it is not that shape."""
    try:
        callback = document["Body"]["stkCallback"]
    except (KeyError, TypeError):
        raise MalformedCallback("missing Body.stkCallback") from None
    if not isinstance(callback, dict):
        raise MalformedCallback("Body.stkCallback is not an object")
    checkout_id = callback.get("CheckoutRequestID")
    if not isinstance(checkout_id, str) or not checkout_id.strip():
        raise MalformedCallback("missing CheckoutRequestID")
    if "ResultCode" not in callback or isinstance(callback["ResultCode"], (bool, dict, list)):
        raise MalformedCallback("missing ResultCode")
    try:
        result_code = normalize_result_code(callback["ResultCode"])
    except ValueError:
        raise MalformedCallback("ResultCode is empty") from None

    items: dict = {}
    metadata = callback.get("CallbackMetadata")
    if metadata is not None:
        raw_items = metadata.get("Item") if isinstance(metadata, dict) else None
        if not isinstance(raw_items, list):
            raise MalformedCallback("CallbackMetadata.Item is not a list")
        for item in raw_items:
            if isinstance(item, dict) and isinstance(item.get("Name"), str):
                items[item["Name"]] = item.get("Value")

    return CallbackResult(
        merchant_request_id=str(callback.get("MerchantRequestID") or ""),
        checkout_request_id=checkout_id.strip(),
        result_code=result_code,
        result_desc=str(callback.get("ResultDesc") or ""),
        amount=_decimal_or_none(items.get("Amount")),
        receipt=str(items["MpesaReceiptNumber"]) if items.get("MpesaReceiptNumber") else None,
        transaction_date=_daraja_datetime(items.get("TransactionDate")),
        phone=str(items["PhoneNumber"]) if items.get("PhoneNumber") not in (None, "") else None,
        items=items,
    )


def _decimal_or_none(value) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise MalformedCallback(f"Amount is not a number: {value!r}") from None
    if not amount.is_finite():
        raise MalformedCallback("Amount is not a finite number")
    return amount


def _daraja_datetime(value) -> datetime | None:
    """20240315143105 (a number or a string) in Nairobi time; None when absent or unreadable."""
    if value is None:
        return None
    try:
        return datetime.strptime(str(value).strip()[:14], "%Y%m%d%H%M%S").replace(tzinfo=NAIROBI)
    except ValueError:
        log.warning("callback TransactionDate %r is not YYYYMMDDHHmmss", value)
        return None


class TokenCache:
    """One access token per process, refreshed a minute before it expires.

    A lock makes concurrent callers share a single fetch: a hundred threads pushing
    at a cold start cause one token request. Tokens are never logged.
    """

    def __init__(self, clock=time.monotonic, margin: float = 60.0):
        self._clock = clock
        self._margin = margin
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0

    def get(self, fetch) -> str:
        """Return a valid token, calling fetch() -> (token, expires_in) only when needed."""
        with self._lock:
            if self._token is None or self._clock() >= self._refresh_at:
                token, expires_in = fetch()
                margin = min(self._margin, expires_in / 10)
                self._token, self._refresh_at = token, self._clock() + expires_in - margin
            return self._token

    def invalidate(self, token: str) -> None:
        """Forget token (if it is still the current one) so the next get() fetches anew."""
        with self._lock:
            if self._token == token:
                self._token = None


class SharedTokenCache:
    """One token for every worker and dyno, kept in the shared store.

    Daraja's portal says each new token may invalidate the previous one, so workers
    must not race to mint their own: one of them refreshes under a lock in the store
    while the others wait for its token. `kv` is anything with the store's
    add/get_value/set_value/delete. Each process also keeps the token in memory, so
    the store is read only when the token is about to expire or was refused.
    """

    def __init__(
        self,
        kv,
        key: str = "daraja-token",
        clock=time.time,
        margin: float = 60.0,
        lock_ttl: float = 20.0,
        poll: float = 0.05,
        sleep=time.sleep,
    ):
        self._kv = kv
        self._key = key
        self._clock = clock
        self._margin = margin
        self._lock_ttl = lock_ttl
        self._poll = poll
        self._sleep = sleep
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0

    def _fresh(self, entry) -> bool:
        return bool(entry) and self._clock() < entry.get("refresh_at", 0)

    def _adopt(self, entry: dict) -> str:
        self._token, self._refresh_at = entry["token"], entry["refresh_at"]
        return self._token

    def get(self, fetch) -> str:
        """Return the shared token, fetching it (in one process only) when needed."""
        with self._lock:
            if self._token is not None and self._clock() < self._refresh_at:
                return self._token
            deadline = self._clock() + self._lock_ttl * 1.5
            while True:
                entry = self._kv.get_value(self._key)
                if self._fresh(entry):
                    return self._adopt(entry)
                if self._kv.add(self._key + ":lock", {"at": self._clock()}, self._lock_ttl):
                    try:
                        entry = self._kv.get_value(self._key)
                        if self._fresh(entry):
                            return self._adopt(entry)
                        token, expires_in = fetch()
                        entry = {
                            "token": token,
                            "refresh_at": self._clock() + expires_in - min(self._margin, expires_in / 10),
                        }
                        self._kv.set_value(self._key, entry, expires_in)
                        return self._adopt(entry)
                    finally:
                        self._kv.delete(self._key + ":lock")
                if self._clock() >= deadline:
                    raise DarajaUnavailable("Timed out waiting for another worker's Daraja token")
                self._sleep(self._poll)

    def invalidate(self, token: str) -> None:
        """Drop token here and in the store (unless another worker already replaced it)."""
        with self._lock:
            if self._token == token:
                self._token = None
            entry = self._kv.get_value(self._key)
            if entry and entry.get("token") == token:
                self._kv.delete(self._key)


def pooled_session(url: str, adapter: HTTPAdapter) -> requests.Session:
    """A requests.Session for one service, with the proxy and CA settings read once.

    By default requests re-reads the proxy variables, the CA-bundle variables and ~/.netrc
    from the environment on every call (trust_env); for one fixed service they are resolved
    here instead: HTTPS_PROXY/HTTP_PROXY/NO_PROXY for `url`, and REQUESTS_CA_BUNDLE or
    CURL_CA_BUNDLE when set.
    """
    session = requests.Session()
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    found = session.merge_environment_settings(url, {}, None, None, None)  # requests reads its own variables
    session.proxies.update(found["proxies"])
    session.verify = found["verify"]
    session.trust_env = False
    return session


class Daraja:
    """A Daraja client over one pooled requests.Session.

    Only a connection that was never made is retried (urllib3 connect retries):
    a push whose request went out and timed out may already be on the phone, so it
    is reported as DarajaTimeout and left to STK Query to settle. Rate-limit answers
    are retried after a short backoff, and an invalid-token answer once with a fresh
    token; Daraja processed neither, so neither can prompt a customer twice.
    """

    def __init__(
        self,
        *,
        base_url: str,
        consumer_key: str,
        consumer_secret: str,
        shortcode: str = SANDBOX_SHORTCODE,
        passkey: str = SANDBOX_PASSKEY,
        transaction_type: str = PAYBILL,
        party_b: str | None = None,
        timeout: tuple[float, float] = (3.05, 15.0),
        token_cache: TokenCache | None = None,
        rate_limit_retries: int = 2,
        backoff: float = 0.5,
        sleep=time.sleep,
    ):
        if transaction_type not in TRANSACTION_TYPES:
            raise ValueError(f"transaction_type must be one of {', '.join(TRANSACTION_TYPES)}")
        self.base_url = base_url.rstrip("/")
        self.shortcode = str(shortcode)
        self.transaction_type = transaction_type
        self.party_b = str(party_b or shortcode)
        self.timeout = timeout
        self.token_cache = token_cache or TokenCache()
        self._credentials = (consumer_key, consumer_secret)
        self._passkey = passkey
        self._rate_limit_retries = rate_limit_retries
        self._backoff = backoff
        self._sleep = sleep
        retry = Retry(
            total=2, connect=2, read=0, redirect=0, status=0, other=0, backoff_factor=0.2, raise_on_status=False
        )
        self.session = pooled_session(
            self.base_url, HTTPAdapter(pool_connections=4, pool_maxsize=64, max_retries=retry)
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.session.close()

    def __repr__(self) -> str:
        return f"Daraja(base_url={self.base_url!r}, shortcode={self.shortcode!r})"

    def fetch_token(self) -> tuple[str, int]:
        """Ask Daraja for a new token: (access_token, expires_in seconds)."""
        response = self._send(
            "GET", "/oauth/v1/generate", "oauth", params={"grant_type": "client_credentials"}, auth=self._credentials
        )
        body = _error_body(response)
        token = body.get("access_token")
        try:
            expires_in = int(str(body.get("expires_in", "")).strip())
        except ValueError:
            expires_in = 0
        if not isinstance(token, str) or not token or expires_in <= 0:
            raise DarajaBadResponse("Daraja token answer has no access_token/expires_in", status=response.status_code)
        return token, expires_in

    def access_token(self) -> str:
        """A cached token, fetched when missing or about to expire."""
        return self.token_cache.get(self.fetch_token)

    def stk_push(
        self,
        phone,
        amount: int,
        *,
        callback_url: str,
        account_reference: str = "",
        description: str = "",
        now: datetime | None = None,
    ) -> PushAccepted:
        """Send the PIN prompt to phone; return Daraja's acknowledgement."""
        msisdn = normalize_phone(phone)
        amount = validate_amount(amount, DARAJA_MAX_AMOUNT)
        timestamp = daraja_timestamp(now)
        payload = {
            "BusinessShortCode": self.shortcode,
            "Password": stk_password(self.shortcode, self._passkey, timestamp),
            "Timestamp": timestamp,
            "TransactionType": self.transaction_type,
            "Amount": amount,
            "PartyA": msisdn,
            "PartyB": self.party_b,
            "PhoneNumber": msisdn,
            "CallBackURL": callback_url.strip(),
            "AccountReference": clean_text(account_reference, ACCOUNT_REFERENCE_LIMIT) or "Payment",
            "TransactionDesc": clean_text(description, TRANSACTION_DESC_LIMIT) or "Payment",
        }
        body = self._call("/mpesa/stkpush/v1/processrequest", "stk push", payload, phone=msisdn)
        try:
            accepted = PushAccepted(
                merchant_request_id=str(body["MerchantRequestID"]),
                checkout_request_id=str(body["CheckoutRequestID"]),
                response_code=str(body.get("ResponseCode", "")),
                response_description=str(body.get("ResponseDescription", "")),
                customer_message=str(body.get("CustomerMessage", "")),
            )
        except KeyError as missing:
            raise DarajaBadResponse(f"STK push answer lacks {missing}") from None
        if accepted.response_code != "0":
            raise DarajaRequestError(
                accepted.response_description or "Push not accepted", error_code=accepted.response_code
            )
        return accepted

    def stk_query(self, checkout_request_id: str, now: datetime | None = None) -> QueryResult:
        """Ask Daraja for the outcome; "being processed" comes back as pending."""
        timestamp = daraja_timestamp(now)
        payload = {
            "BusinessShortCode": self.shortcode,
            "Password": stk_password(self.shortcode, self._passkey, timestamp),
            "Timestamp": timestamp,
            "CheckoutRequestID": checkout_request_id,
        }
        try:
            body = self._call("/mpesa/stkpushquery/v1/query", "stk query", payload)
        except DarajaRequestError as error:
            if still_processing(error):
                return QueryResult(checkout_request_id, pending=True)
            raise
        if "ResultCode" not in body:
            raise DarajaBadResponse("STK query answer lacks ResultCode")
        code = normalize_result_code(body["ResultCode"])
        desc = str(body.get("ResultDesc") or "")
        if code == 4999 or "under processing" in desc.lower():
            return QueryResult(checkout_request_id, pending=True)
        return QueryResult(
            checkout_request_id,
            pending=False,
            result_code=code,
            result_desc=desc,
            merchant_request_id=body.get("MerchantRequestID"),
        )

    def _call(self, path: str, what: str, payload: dict, phone: str | None = None) -> dict:
        """POST JSON with a bearer token; refresh the token once, back off on rate limits."""
        refreshed = False
        attempt = 0
        while True:
            try:
                token = self.access_token()
            except DarajaError as error:
                error.request_sent = False  # without a token the request was never sent
                raise
            try:
                response = self._send(
                    "POST", path, what, json=payload, headers={"Authorization": f"Bearer {token}"}, phone=phone
                )
            except InvalidAccessToken:
                self.token_cache.invalidate(token)
                if refreshed:
                    raise
                refreshed = True
                continue
            except DarajaRateLimited as error:
                if attempt >= self._rate_limit_retries:
                    raise
                delay = min(error.retry_after or self._backoff * 2**attempt, 5.0)
                attempt += 1
                log.warning("daraja %s rate limited; retrying in %.1fs", what, delay)
                self._sleep(delay)
                continue
            body = _error_body(response)
            if not body:
                raise DarajaBadResponse(f"Daraja {what} answer is not JSON", status=response.status_code)
            return body

    def _send(self, method: str, path: str, what: str, phone: str | None = None, **kwargs) -> requests.Response:
        """One HTTP exchange; raises the typed error for anything but a 2xx."""
        started = time.monotonic()
        try:
            response = self.session.request(method, self.base_url + path, timeout=self.timeout, **kwargs)
        except requests.ConnectionError as error:
            # ConnectTimeout is a ConnectionError: nothing was sent.
            if isinstance(error, requests.ConnectTimeout) or not _sent(error):
                log.error("daraja %s: cannot connect to %s", what, self.base_url)
                raise DarajaUnavailable(f"Cannot reach Daraja at {self.base_url}", request_sent=False) from None
            log.error("daraja %s: connection lost after sending", what)
            raise DarajaTimeout(f"Daraja {what} connection was lost after the request was sent") from None
        except requests.Timeout:
            log.error("daraja %s: no answer within %ss", what, self.timeout[1])
            raise DarajaTimeout(f"Daraja did not answer the {what} in time") from None
        except requests.RequestException as error:
            log.error("daraja %s failed: %s", what, type(error).__name__)
            raise DarajaUnavailable(f"Daraja {what} failed") from None
        elapsed = (time.monotonic() - started) * 1000
        log.info(
            "daraja %s -> HTTP %s in %.0f ms%s",
            what,
            response.status_code,
            elapsed,
            f" phone={mask_phone(phone)}" if phone else "",
        )
        if 200 <= response.status_code < 300:
            return response
        refusal = error_from_response(response)
        if still_processing(refusal):  # Daraja's usual answer to a query while the prompt is open
            log.info("daraja %s: the payment is still being processed", what)
        else:
            log.warning(
                "daraja %s refused: HTTP %s %s %s",
                what,
                response.status_code,
                refusal.error_code or "-",
                refusal.message,
            )
        raise refusal


def _sent(error: requests.ConnectionError) -> bool:
    """Whether the request may have gone out before the connection failed."""
    reason = error.args[0] if error.args else None
    reason = getattr(reason, "reason", reason)  # urllib3's MaxRetryError wraps the cause
    # urllib3 raises ProxyError only while no connection to the proxy was made.
    return not isinstance(reason, (NewConnectionError, ConnectTimeoutError, ProxyError))
