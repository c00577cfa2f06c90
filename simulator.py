"""A local Daraja: OAuth, M-Pesa Express (STK Push), STK Query and result callbacks.

The simulator is a small Flask app that answers on Daraja's own paths in Daraja's wire
format (see the Daraja reference), so a client pointed at its URL cannot tell it from the
sandbox, except that it always answers and that its "handset" is an HTTP API. The demo
mode of the payment server runs against it, and the tests use it instead of patching
`requests`.

Credentials: consumer key/secret SIM_CONSUMER_KEY / SIM_CONSUMER_SECRET, the sandbox
shortcode 174379 with the public sandbox passkey, handset PIN SIM_PIN.

How a prompt ends (the first that applies):

1. a scenario rule added through the control API (match on phone and/or amount);
2. the built-in test numbers: 25470000XXXX answers after auto_delay with ResultCode
   int(XXXX) (254700000000 pays, 254700001032 is cancelled, ...), and Safaricom's
   sandbox test number 254708374149 pays after auto_delay;
3. any other number waits for a person on the simulated handset (PIN, cancel, timeout);
   with no answer within prompt_timeout it ends with 1037.

Once the outcome is known the Daraja callback is POSTed to the push's CallBackURL.

The control API under /simulator/ is unauthenticated: this is a local test double and
must never be reachable from outside the machine or the test network.

Threads: werkzeug serves each request on its own thread and one lock guards all the
simulator's state. Timed events (automatic answers, prompt expiry, delayed callbacks)
run on one scheduler thread and callbacks are POSTed by a small worker pool, so no
request handler ever sleeps, except under the "slow" fault, whose point is to.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import heapq
import itertools
import logging
import math
import os
import re
import secrets
import socket
import string
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import requests
from flask import Blueprint, Flask, current_app, g, jsonify, request
from werkzeug.exceptions import BadRequest, Conflict, HTTPException, NotFound
from werkzeug.serving import WSGIRequestHandler, make_server

from mpesa import (
    DARAJA_MAX_AMOUNT,
    NAIROBI,
    SANDBOX_PASSKEY,
    SANDBOX_SHORTCODE,
    TRANSACTION_TYPES,
    InvalidInput,
    daraja_timestamp,
    mask_checkout_id,
    mask_phone,
    normalize_phone,
    stk_password,
)

log = logging.getLogger(__name__)

SIM_CONSUMER_KEY = "simulator-consumer-key"
SIM_CONSUMER_SECRET = "simulator-consumer-secret"
SIM_PIN = "1234"
SANDBOX_TEST_PHONE = "254708374149"

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
AWAIT = "await"  # a scenario outcome: leave the prompt to the handset
CALLBACK_MODES = ("send", "drop", "duplicate", "contradict")
FAULT_ENDPOINTS = ("oauth", "stkpush", "query", "any")
FAULT_MODES = ("http500", "http503_html", "garbage", "slow", "rate_limit", "quota", "http429", "invalid_token")
STATUSES = ("pending", "completed", "failed")
STAT_NAMES = ("tokens_issued", "pushes_accepted", "pushes_rejected", "queries", "callbacks_sent", "callbacks_failed")
MAX_PROMPTS = 10_000  # finished prompts beyond this are forgotten, oldest first
MAX_CALLBACK_LOG = 1_000

_BUILTIN_NUMBER = re.compile(r"25470000([0-9]{4})")
_SHORTCODE = re.compile(r"[0-9]{5,7}")
_MSISDN = re.compile(r"254[71][0-9]{8}")
_TIMESTAMP = re.compile(r"[0-9]{14}")
_WHOLE = re.compile(r"[0-9]{1,9}")  # bounded: int() of huge digit strings is refused
_RECEIPT_CHARS = string.ascii_uppercase + string.digits


def result_desc(code: int | str) -> str:
    """The ResultDesc Daraja gives for a ResultCode."""
    return RESULT_DESCS.get(code, f"Simulated result {code}")


@dataclass
class SimulatorConfig:
    """How the simulated Daraja behaves; PATCH /simulator/config changes the tunable part."""

    consumer_key: str = SIM_CONSUMER_KEY
    consumer_secret: str = field(default=SIM_CONSUMER_SECRET, repr=False)
    shortcodes: dict[str, str] = field(  # shortcode -> passkey
        default_factory=lambda: {SANDBOX_SHORTCODE: SANDBOX_PASSKEY}, repr=False
    )
    pin: str = SIM_PIN
    token_ttl: int = 3599
    auto_delay: float = 3.0
    prompt_timeout: float = 60.0
    query_min_interval: float = 1.0
    timestamp_skew: float = 600
    callback_timeout: float = 10.0
    invalidate_previous_tokens: bool = False

    def public(self) -> dict:
        """The settings without secrets (no consumer secret, no passkeys)."""
        settings = dataclasses.asdict(self)
        del settings["consumer_secret"]
        settings["shortcodes"] = sorted(self.shortcodes)
        return settings


class DarajaRefusal(Exception):
    """An answer in Daraja's error envelope; the HTTP status is the code's first group."""

    def __init__(self, code: str, message: str, request_id: str | None = None):
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message
        self.request_id = request_id or _request_id()
        self.status = int(code.split(".")[0])

    def response(self):
        body = {"requestId": self.request_id, "errorCode": self.code, "errorMessage": self.message}
        return jsonify(body), self.status


def _invalid(name: str) -> DarajaRefusal:
    return DarajaRefusal("400.002.02", f"Bad Request - Invalid {name}")


def _request_id() -> str:
    """An id shaped like Daraja's older MerchantRequestIDs: 12345-12345678-1."""
    return f"{secrets.randbelow(90_000) + 10_000}-{secrets.randbelow(90_000_000) + 10_000_000}-1"


def _text(value) -> str | None:
    """A JSON string or integer as text (Daraja takes either for its numeric fields)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    return str(value)


def _matching(body: dict, name: str, pattern: re.Pattern) -> str:
    text = _text(body.get(name))
    if text is None or not pattern.fullmatch(text):
        raise _invalid(name)
    return text


def _timestamp(body: dict, skew: float) -> str:
    """A real YYYYMMDDHHmmss moment in Nairobi time, within skew seconds of now."""
    text = _matching(body, "Timestamp", _TIMESTAMP)
    try:
        moment = datetime.strptime(text, "%Y%m%d%H%M%S").replace(tzinfo=NAIROBI)
    except ValueError:
        raise _invalid("Timestamp") from None
    if abs((moment - datetime.now(NAIROBI)).total_seconds()) > skew:
        raise _invalid("Timestamp")
    return text


def _credentials(body: dict, skew: float) -> tuple[str, str, str]:
    """BusinessShortCode, Timestamp and Password, checked for form only."""
    shortcode = _matching(body, "BusinessShortCode", _SHORTCODE)
    timestamp = _timestamp(body, skew)
    password = body.get("Password")
    if not isinstance(password, str) or not password:
        raise _invalid("Password")
    return shortcode, timestamp, password


def _amount(body: dict) -> int:
    """Whole shillings, 1 to DARAJA_MAX_AMOUNT; decimals (10.5, "10.5", even 10.0) are refused."""
    text = _text(body.get("Amount"))
    if text is None or not _WHOLE.fullmatch(text) or not 1 <= int(text) <= DARAJA_MAX_AMOUNT:
        raise _invalid("Amount")
    return int(text)


def _callback_url(body: dict) -> str:
    url = body.get("CallBackURL")
    if not isinstance(url, str) or re.search(r"\s", url):
        raise _invalid("CallBackURL")
    try:
        parts = urlsplit(url)
        absolute = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        absolute = False
    if not absolute:
        raise _invalid("CallBackURL")
    return url


def _limited_text(body: dict, name: str, limit: int, required: bool) -> str:
    value = body.get(name)
    if value is None and not required:
        return ""
    text = _text(value)
    if text is None or len(text) > limit or (required and not text.strip()):
        raise _invalid(name)
    return text


def _push_fields(body: dict, skew: float) -> dict:
    """Every STK Push field checked for form, in Daraja's order; raises DarajaRefusal."""
    shortcode, timestamp, password = _credentials(body, skew)
    if body.get("TransactionType") not in TRANSACTION_TYPES:
        raise _invalid("TransactionType")
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


def _number(data: dict, key: str, default=None, *, positive: bool = False):
    value = data.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{key} must be a number")
    if value < 0 or (positive and value == 0):
        raise BadRequest(f"{key} must be {'positive' if positive else 'zero or more'}")
    return value


def _count(data: dict, key: str, default=None) -> int | None:
    value = data.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"{key} must be a whole number of at least 1")
    return value


def _choice(data: dict, key: str, options: tuple, default=None) -> str:
    value = data.get(key, default)
    if value not in options:
        raise BadRequest(f"{key} must be one of {', '.join(options)}")
    return value


def parse_result_code(value) -> int | str:
    """A ResultCode given to the control API: an integer, digits, or a known text code."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,9}", value.strip()):
        return int(value)
    if isinstance(value, str) and value in RESULT_DESCS:
        return value
    raise BadRequest("resultCode must be an integer or a known code such as SFC_IC0003")


def _phone(value) -> str:
    try:
        return normalize_phone(value)
    except InvalidInput as exc:
        raise BadRequest(f"phone: {exc.message}") from None


def _only_keys(data: dict, allowed: tuple) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")


@dataclass
class Rule:
    """A scenario rule: which pushes it matches and how they end."""

    id: int
    phone: str | None = None
    amount: int | None = None
    result: int | str | None = None  # None: the number's usual outcome; AWAIT: the handset
    delay: float | None = None  # None: auto_delay
    callback: str = "send"
    callback_delay: float = 0.0
    times: int | None = None  # None: every matching push
    used: int = 0

    KEYS = ("phone", "amount", "resultCode", "delay", "callback", "callbackDelay", "times")

    @classmethod
    def from_json(cls, rule_id: int, data: dict) -> Rule:
        _only_keys(data, cls.KEYS)
        result = data.get("resultCode")
        if result is not None and result != AWAIT:
            result = parse_result_code(result)
        amount = data.get("amount")
        if amount is not None:
            text = _text(amount)
            if text is None or not _WHOLE.fullmatch(text) or int(text) < 1:
                raise BadRequest("amount must be a whole number of at least 1")
            amount = int(text)
        return cls(
            id=rule_id,
            phone=_phone(data["phone"]) if data.get("phone") is not None else None,
            amount=amount,
            result=result,
            delay=_number(data, "delay"),
            callback=_choice(data, "callback", CALLBACK_MODES, "send"),
            callback_delay=_number(data, "callbackDelay", 0),
            times=_count(data, "times"),
        )

    def matches(self, phone: str, amount: int) -> bool:
        return (
            (self.times is None or self.used < self.times)
            and self.phone in (None, phone)
            and self.amount in (None, amount)
        )

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "phone": self.phone,
            "amount": self.amount,
            "resultCode": self.result,
            "delay": self.delay,
            "callback": self.callback,
            "callbackDelay": self.callback_delay,
            "times": self.times,
            "used": self.used,
        }


@dataclass
class Fault:
    """The next `remaining` requests to `endpoint` fail in `mode`."""

    id: int
    endpoint: str
    mode: str
    remaining: int
    delay: float

    KEYS = ("endpoint", "mode", "count", "delay")

    @classmethod
    def from_json(cls, fault_id: int, data: dict) -> Fault:
        _only_keys(data, cls.KEYS)
        return cls(
            id=fault_id,
            endpoint=_choice(data, "endpoint", FAULT_ENDPOINTS, "any"),
            mode=_choice(data, "mode", FAULT_MODES),
            remaining=_count(data, "count", 1),
            delay=_number(data, "delay", 0),
        )

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "endpoint": self.endpoint,
            "mode": self.mode,
            "count": self.remaining,
            "delay": self.delay,
        }


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Prompt:
    """One STK prompt on the simulated handset."""

    checkout_id: str
    merchant_id: str
    phone: str
    amount: int
    account_reference: str
    transaction_desc: str
    shortcode: str
    callback_url: str
    created_at: datetime
    expires_at: datetime
    callback: str = "send"
    callback_delay: float = 0.0
    status: str = "pending"
    result_code: int | str | None = None
    result_desc: str | None = None
    receipt: str | None = None
    timer: int | None = None
    queried_at: float | None = None

    def to_json(self) -> dict:
        return {
            "checkoutRequestId": self.checkout_id,
            "merchantRequestId": self.merchant_id,
            "phone": self.phone,
            "amount": self.amount,
            "accountReference": self.account_reference,
            "transactionDesc": self.transaction_desc,
            "businessShortCode": self.shortcode,
            "status": self.status,
            "resultCode": self.result_code,
            "resultDesc": self.result_desc,
            "receipt": self.receipt,
            "createdAt": _iso(self.created_at),
            "expiresAt": _iso(self.expires_at),
        }

    def callback_body(self, code: int | str, receipt: str | None = None) -> dict:
        """Daraja's callback document for this prompt ending with `code`."""
        result = {
            "MerchantRequestID": self.merchant_id,
            "CheckoutRequestID": self.checkout_id,
            "ResultCode": code,
            "ResultDesc": result_desc(code),
        }
        if code == 0:
            result["CallbackMetadata"] = {
                "Item": [
                    {"Name": "Amount", "Value": float(self.amount)},
                    {"Name": "MpesaReceiptNumber", "Value": receipt},
                    {"Name": "Balance"},
                    {"Name": "TransactionDate", "Value": int(daraja_timestamp())},
                    {"Name": "PhoneNumber", "Value": int(self.phone)},
                ]
            }
        return {"Body": {"stkCallback": result}}


class Scheduler:
    """Runs callables after a delay on one daemon thread; cancellable, never blocks callers."""

    def __init__(self, name: str = "simulator-scheduler"):
        self._queue: list[list] = []  # heap of [due, handle, callable or None when cancelled]
        self._entries: dict[int, list] = {}
        self._handles = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_later(self, delay: float, fn: Callable, *args) -> int:
        entry = [time.monotonic() + max(delay, 0.0), next(self._handles), functools.partial(fn, *args)]
        with self._cond:
            heapq.heappush(self._queue, entry)
            self._entries[entry[1]] = entry
            self._cond.notify()
        return entry[1]

    def cancel(self, handle: int | None) -> None:
        with self._cond:
            entry = self._entries.pop(handle, None)
            if entry:
                entry[2] = None

    def clear(self) -> None:
        with self._cond:
            self._queue.clear()
            self._entries.clear()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self.clear()
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._queue or self._queue[0][0] > time.monotonic()):
                    self._cond.wait(self._queue[0][0] - time.monotonic() if self._queue else None)
                if self._closed:
                    return
                _, handle, fn = heapq.heappop(self._queue)
                self._entries.pop(handle, None)
            if fn is not None:
                try:
                    fn()
                except Exception:
                    log.exception("simulator: scheduled task failed")


class Simulator:
    """The simulated Daraja's state and behaviour; the Flask views are thin wrappers.

    Methods raise DarajaRefusal for Daraja's error answers and werkzeug HTTP
    exceptions (400/404/409) for the control API, so in-process callers (the demo
    handset page) get the same answers as HTTP clients.
    """

    def __init__(self, config: SimulatorConfig | None = None, clock: Callable[[], float] = time.monotonic):
        config = config or SimulatorConfig()
        self.config = dataclasses.replace(config, shortcodes=dict(config.shortcodes))
        self.clock = clock  # for token expiry and spike arrest; tests may pass a manual one
        self.lock = threading.Lock()
        self.tokens: dict[str, float] = {}  # token -> expiry on self.clock
        self.prompts: dict[str, Prompt] = {}  # insertion order = creation order
        self.busy: dict[str, str] = {}  # phone -> checkout id of its pending prompt
        self.rules: list[Rule] = []
        self.faults: list[Fault] = []
        self.callbacks: deque[dict] = deque(maxlen=MAX_CALLBACK_LOG)
        self.stats = dict.fromkeys(STAT_NAMES, 0)
        self.generation = 0  # bumped by reset(), so late callbacks are not logged
        self._issued_ids: set[str] = set()  # CheckoutRequestIDs and receipts stay unique across resets
        self._receipts: set[str] = set()
        self._ids = itertools.count(1)
        self._closed = False
        self.scheduler = Scheduler()
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="simulator-callback")

    # -- OAuth and tokens

    def issue_token(self, auth) -> tuple[str, int]:
        """Check HTTP Basic credentials and return (token, ttl)."""
        with self.lock:
            cfg = self.config
            if (
                auth is None
                or auth.type != "basic"
                or auth.username != cfg.consumer_key
                or auth.password != cfg.consumer_secret
            ):
                raise DarajaRefusal("400.008.01", "Invalid Authentication passed")
            now = self.clock()
            if cfg.invalidate_previous_tokens:
                self.tokens.clear()
            else:
                self.tokens = {token: expiry for token, expiry in self.tokens.items() if expiry > now}
            token = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(28))
            self.tokens[token] = now + cfg.token_ttl
            self.stats["tokens_issued"] += 1
        log.info("simulator: token issued, expires in %ss", cfg.token_ttl)
        return token, cfg.token_ttl

    def check_token(self, header: str | None) -> None:
        """Refuse a request whose `Authorization: Bearer` token is missing, unknown or expired."""
        scheme, _, token = (header or "").strip().partition(" ")
        with self.lock:
            expiry = self.tokens.get(token.strip())
            if scheme.lower() != "bearer" or expiry is None or expiry <= self.clock():
                raise DarajaRefusal("404.001.03", "Invalid Access Token")

    def revoke_tokens(self) -> int:
        with self.lock:
            count = len(self.tokens)
            self.tokens.clear()
        log.info("simulator: %d token(s) revoked", count)
        return count

    # -- STK Push and Query

    def _authenticate_merchant(self, shortcode: str, timestamp: str, password: str) -> None:
        passkey = self.config.shortcodes.get(shortcode)
        if passkey is None:
            raise DarajaRefusal("500.001.1001", "Merchant does not exist")
        if password != stk_password(shortcode, passkey, timestamp):
            raise DarajaRefusal("500.001.1001", "Wrong credentials")

    def push(self, body: dict) -> dict:
        """Accept an STK Push request and start its prompt; returns Daraja's acknowledgement."""
        fields = _push_fields(body, self.config.timestamp_skew)
        phone, amount = fields["phone"], fields["amount"]
        with self.lock:
            self._authenticate_merchant(fields["shortcode"], fields["timestamp"], fields["password"])
            if phone in self.busy:
                raise DarajaRefusal("500.001.1001", RESULT_DESCS[1001])
            cfg = self.config
            rule = next((rule for rule in self.rules if rule.matches(phone, amount)), None)
            if rule:
                rule.used += 1
            outcome = rule.result if rule and rule.result is not None else _usual_outcome(phone)
            delay = rule.delay if rule and rule.delay is not None else cfg.auto_delay
            created = datetime.now(UTC)
            prompt = Prompt(
                checkout_id=self._checkout_id(phone),
                merchant_id=_request_id(),
                phone=phone,
                amount=amount,
                account_reference=fields["account_reference"],
                transaction_desc=fields["transaction_desc"],
                shortcode=fields["shortcode"],
                callback_url=fields["callback_url"],
                created_at=created,
                expires_at=created + timedelta(seconds=cfg.prompt_timeout),
                callback=rule.callback if rule else "send",
                callback_delay=rule.callback_delay if rule else 0.0,
            )
            if outcome == AWAIT:
                prompt.timer = self.scheduler.call_later(cfg.prompt_timeout, self._settle, prompt.checkout_id, 1037)
            else:
                prompt.timer = self.scheduler.call_later(delay, self._settle, prompt.checkout_id, outcome)
            self.prompts[prompt.checkout_id] = prompt
            self.busy[phone] = prompt.checkout_id
            self.stats["pushes_accepted"] += 1
            self._forget_old_prompts()
        decided_by = f"rule {rule.id}" if rule else "handset" if outcome == AWAIT else "test number"
        log.info(
            "simulator: push %s accepted for %s, KES %d (%s)",
            mask_checkout_id(prompt.checkout_id),
            mask_phone(phone),
            amount,
            decided_by,
        )
        return {
            "MerchantRequestID": prompt.merchant_id,
            "CheckoutRequestID": prompt.checkout_id,
            "ResponseCode": "0",
            "ResponseDescription": "Success. Request accepted for processing",
            "CustomerMessage": "Success. Request accepted for processing",
        }

    def query(self, body: dict) -> dict:
        """Answer an STK Query: pending is a 500.001.1001 refusal, final a string ResultCode."""
        shortcode, timestamp, password = _credentials(body, self.config.timestamp_skew)
        checkout_id = body.get("CheckoutRequestID")
        with self.lock:
            prompt = self.prompts.get(checkout_id) if isinstance(checkout_id, str) else None
            if prompt is None:
                raise _invalid("CheckoutRequestID")
            self._authenticate_merchant(shortcode, timestamp, password)
            now = self.clock()
            if prompt.queried_at is not None and now - prompt.queried_at < self.config.query_min_interval:
                raise DarajaRefusal("500.003.02", "Error Occurred: Spike Arrest Violation")
            prompt.queried_at = now
            if prompt.status == "pending":
                raise DarajaRefusal("500.001.1001", "The transaction is being processed", request_id=checkout_id)
            log.info("simulator: query %s answered ResultCode %s", mask_checkout_id(checkout_id), prompt.result_code)
            return {
                "ResponseCode": "0",
                "ResponseDescription": "The service request has been accepted successsfully",
                "MerchantRequestID": prompt.merchant_id,
                "CheckoutRequestID": prompt.checkout_id,
                "ResultCode": str(prompt.result_code),
                "ResultDesc": prompt.result_desc,
            }

    def _checkout_id(self, phone: str) -> str:
        """ws_CO_ + DDMMYYYYHHMMSS + milliseconds + national number, one millisecond later if taken."""
        moment = datetime.now(NAIROBI)
        while True:
            checkout_id = f"ws_CO_{moment:%d%m%Y%H%M%S}{moment.microsecond // 1000:03d}{phone[3:]}"
            if checkout_id not in self._issued_ids:
                self._issued_ids.add(checkout_id)
                return checkout_id
            moment += timedelta(milliseconds=1)

    def _receipt(self) -> str:
        while True:
            receipt = secrets.choice(string.ascii_uppercase) + "".join(secrets.choice(_RECEIPT_CHARS) for _ in range(9))
            if receipt not in self._receipts:
                self._receipts.add(receipt)
                return receipt

    def _forget_old_prompts(self) -> None:
        for checkout_id in list(self.prompts):
            if len(self.prompts) <= MAX_PROMPTS:
                return
            if self.prompts[checkout_id].status != "pending":
                del self.prompts[checkout_id]

    # -- the handset and outcomes

    def list_prompts(self, phone: str | None = None, status: str | None = None) -> list[dict]:
        """Prompts newest first, optionally for one phone (any format) and/or one status."""
        phone = _phone(phone) if phone else None
        if status and status not in STATUSES:
            raise BadRequest(f"status must be one of {', '.join(STATUSES)}")
        with self.lock:
            return [
                p.to_json()
                for p in reversed(self.prompts.values())
                if (phone is None or p.phone == phone) and (not status or p.status == status)
            ]

    def get_prompt(self, checkout_id: str) -> dict:
        with self.lock:
            return self._prompt(checkout_id).to_json()

    def _prompt(self, checkout_id: str) -> Prompt:
        prompt = self.prompts.get(checkout_id)
        if prompt is None:
            raise NotFound(f"no prompt {checkout_id}")
        return prompt

    def enter_pin(self, checkout_id: str, pin) -> dict:
        """The customer types a PIN: the right one pays, a wrong one ends with 2001."""
        with self.lock:
            right = str(pin) == self.config.pin
        return self.finish(checkout_id, 0 if right else 2001)

    def finish(self, checkout_id: str, code: int | str) -> dict:
        """End a pending prompt with `code`, schedule its callback and return the prompt."""
        with self.lock:
            prompt = self._prompt(checkout_id)
            if prompt.status != "pending":
                raise Conflict(f"prompt {checkout_id} is already {prompt.status}")
            self.scheduler.cancel(prompt.timer)
            prompt.timer = None
            prompt.status = "completed" if code == 0 else "failed"
            prompt.result_code = code
            prompt.result_desc = result_desc(code)
            prompt.receipt = self._receipt() if code == 0 else None
            if self.busy.get(prompt.phone) == checkout_id:
                del self.busy[prompt.phone]
            body = prompt.callback_body(code, prompt.receipt)
            bodies = {
                "send": [body],
                "drop": [],
                "duplicate": [body, body],
                "contradict": [body, self._contradiction(prompt, code)],
            }[prompt.callback]
            if bodies:
                self.scheduler.call_later(
                    prompt.callback_delay, self._submit, prompt.callback_url, bodies, self.generation
                )
            answer = prompt.to_json()
        log.info(
            "simulator: prompt %s for %s ended with ResultCode %s (callback: %s)",
            mask_checkout_id(checkout_id),
            mask_phone(prompt.phone),
            code,
            prompt.callback,
        )
        return answer

    def _contradiction(self, prompt: Prompt, code: int | str) -> dict:
        """A second callback claiming the opposite: paid if it failed, cancelled if it paid."""
        if code == 0:
            return prompt.callback_body(1032)
        return prompt.callback_body(0, self._receipt())

    def _settle(self, checkout_id: str, code: int | str) -> None:
        """Scheduled end of a prompt; a person may have answered first, or a reset forgotten it."""
        try:
            self.finish(checkout_id, code)
        except (NotFound, Conflict):
            pass

    # -- callbacks

    def _submit(self, url: str, bodies: list[dict], generation: int) -> None:
        with self.lock:
            if self._closed or generation != self.generation:
                return
            self.executor.submit(self._deliver, url, bodies, generation)

    def _deliver(self, url: str, bodies: list[dict], generation: int) -> None:
        """POST each body in turn; failures are logged and recorded, never raised."""
        where = "{0.scheme}://{0.netloc}".format(urlsplit(url))  # the path may hold a secret
        for body in bodies:
            status, error, kind = None, None, None
            try:
                status = requests.post(url, json=body, timeout=self.config.callback_timeout).status_code
            except requests.RequestException as exc:
                kind = type(exc).__name__
                error = f"{kind}: {exc}"  # for the control API only: the text repeats the URL
            ok = status is not None and 200 <= status < 300
            checkout_id = mask_checkout_id(body["Body"]["stkCallback"]["CheckoutRequestID"])
            if ok:
                log.info("simulator: callback for %s to %s answered %s", checkout_id, where, status)
            else:
                log.warning("simulator: callback for %s to %s failed: %s", checkout_id, where, kind or status)
            with self.lock:
                if generation != self.generation:
                    return
                self.callbacks.append(
                    {"url": url, "body": body, "status": status, "error": error, "at": _iso(datetime.now(UTC))}
                )
                self.stats["callbacks_sent" if ok else "callbacks_failed"] += 1

    # -- scenarios, faults, configuration, counters

    def add_rule(self, data: dict) -> dict:
        with self.lock:
            rule = Rule.from_json(next(self._ids), data)
            self.rules.append(rule)
            return rule.to_json()

    def list_rules(self) -> list[dict]:
        with self.lock:
            return [rule.to_json() for rule in self.rules]

    def clear_rules(self) -> int:
        with self.lock:
            count = len(self.rules)
            self.rules.clear()
            return count

    def add_fault(self, data: dict) -> dict:
        with self.lock:
            fault = Fault.from_json(next(self._ids), data)
            self.faults.append(fault)
            return fault.to_json()

    def list_faults(self) -> list[dict]:
        with self.lock:
            return [fault.to_json() for fault in self.faults]

    def clear_faults(self) -> int:
        with self.lock:
            count = len(self.faults)
            self.faults.clear()
            return count

    def take_fault(self, endpoint: str) -> Fault | None:
        """The first fault armed for `endpoint` (or "any"), used up by this request."""
        with self.lock:
            for fault in self.faults:
                if fault.endpoint in (endpoint, "any"):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self.faults.remove(fault)
                    return dataclasses.replace(fault)
        return None

    def public_config(self) -> dict:
        with self.lock:
            return self.config.public()

    def update_config(self, data: dict) -> dict:
        """Change tunable settings; all are checked before any is applied."""
        _only_keys(data, TUNABLE)
        changes = {key: _setting(data, key) for key in data}
        with self.lock:
            self.config = dataclasses.replace(self.config, **changes)
            settings = self.config.public()
        log.info("simulator: settings changed: %s", ", ".join(sorted(changes)))
        return settings

    def get_stats(self) -> dict:
        with self.lock:
            return dict(self.stats)

    def count(self, name: str) -> None:
        with self.lock:
            self.stats[name] += 1

    def list_callbacks(self) -> list[dict]:
        with self.lock:
            return list(self.callbacks)

    def reset(self) -> None:
        """Forget prompts, rules, faults, logs and counters; issued tokens stay valid."""
        with self.lock:
            self.generation += 1
            self.scheduler.clear()
            self.prompts.clear()
            self.busy.clear()
            self.rules.clear()
            self.faults.clear()
            self.callbacks.clear()
            self.stats = dict.fromkeys(STAT_NAMES, 0)
        log.info("simulator: reset")

    def close(self) -> None:
        """Stop the scheduler and the callback workers."""
        with self.lock:
            self._closed = True
        self.scheduler.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


def _usual_outcome(phone: str) -> int | str:
    """What a number does without a scenario rule: test numbers answer, others await a person."""
    match = _BUILTIN_NUMBER.fullmatch(phone)
    if match:
        return int(match.group(1))
    return 0 if phone == SANDBOX_TEST_PHONE else AWAIT


TUNABLE = (
    "pin",
    "auto_delay",
    "prompt_timeout",
    "query_min_interval",
    "token_ttl",
    "timestamp_skew",
    "invalidate_previous_tokens",
)


def _setting(data: dict, key: str):
    """One tunable setting from a PATCH body, checked."""
    value = data[key]
    if key == "pin":
        text = _text(value)
        if text is None or not _WHOLE.fullmatch(text):
            raise BadRequest("pin must be digits")
        return text
    if key == "invalidate_previous_tokens":
        if not isinstance(value, bool):
            raise BadRequest(f"{key} must be true or false")
        return value
    checked = _count(data, key) if key == "token_ttl" else _number(data, key, positive=key == "prompt_timeout")
    if checked is None:
        raise BadRequest(f"{key} cannot be null")
    return checked


daraja = Blueprint("daraja", __name__)
control = Blueprint("control", __name__, url_prefix="/simulator")
_FAULTABLE = {"daraja.oauth": "oauth", "daraja.stkpush": "stkpush", "daraja.query": "query"}
_APIGEE_SPIKE_ARREST = {
    "fault": {
        "faultstring": "Spike arrest violation. Allowed rate : MessageRate{messagesPerPeriod=5, "
        "periodInMicroseconds=1000000, maxBurstMessageCount=1.0}",
        "detail": {"errorcode": "policies.ratelimit.SpikeArrestViolation"},
    }
}
_HTML_503 = (
    "<html><head><title>503 Service Unavailable</title></head><body>"
    "<h1>Service Unavailable</h1><p>The server is temporarily unable to service your request."
    "</p></body></html>"
)


def get_simulator() -> Simulator:
    return current_app.extensions["simulator"]


def _json_body() -> dict:
    """The JSON object a Daraja call carries; Daraja reads anything else as a bad request."""
    if request.mimetype != "application/json":
        # A form-encoded body reads as one without fields, and the first one checked is missing.
        raise _invalid("BusinessShortCode")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise DarajaRefusal("400.002.05", "Invalid Request Payload")
    return body


def _control_body() -> dict:
    body = request.get_json(silent=True)
    if body is None and not request.get_data():
        return {}
    if not isinstance(body, dict):
        raise BadRequest("send a JSON object")
    return body


def _fault_response(mode: str):
    if mode == "http500":
        return DarajaRefusal("500.003.1001", "Internal Server Error").response()
    if mode == "http503_html":
        return _HTML_503, 503, {"Content-Type": "text/html; charset=utf-8"}
    if mode == "garbage":
        return '{"ResponseCode": "0", "Respon', 200, {"Content-Type": "application/json"}
    if mode == "rate_limit":
        return DarajaRefusal("500.003.02", "Error Occurred: Spike Arrest Violation").response()
    if mode == "quota":
        return DarajaRefusal("500.003.03", "Quota Violation").response()
    if mode == "http429":
        return jsonify(_APIGEE_SPIKE_ARREST), 429, {"Retry-After": "1"}
    return DarajaRefusal("404.001.03", "Invalid Access Token").response()


@daraja.before_request
def inject_fault():
    endpoint = _FAULTABLE.get(request.endpoint)
    fault = get_simulator().take_fault(endpoint) if endpoint else None
    if fault is None:
        return None
    log.info("simulator: injecting fault %s on %s", fault.mode, endpoint)
    if fault.mode == "slow":
        time.sleep(fault.delay)  # the point of this fault: the answer comes late
        return None
    return _fault_response(fault.mode)


@daraja.after_request
def count_calls(response):
    if request.endpoint == "daraja.stkpush" and not g.get("push_accepted"):
        get_simulator().count("pushes_rejected")
    elif request.endpoint == "daraja.query":
        get_simulator().count("queries")
    return response


@daraja.get("/oauth/v1/generate")
def oauth():
    if request.args.get("grant_type") != "client_credentials":
        raise DarajaRefusal("400.008.02", "Invalid grant type passed")
    token, ttl = get_simulator().issue_token(request.authorization)
    return jsonify(access_token=token, expires_in=str(ttl))


@daraja.post("/mpesa/stkpush/v1/processrequest")
def stkpush():
    simulator = get_simulator()
    simulator.check_token(request.headers.get("Authorization"))
    ack = simulator.push(_json_body())
    g.push_accepted = True
    return jsonify(ack)


@daraja.post("/mpesa/stkpushquery/v1/query")
def query():
    simulator = get_simulator()
    simulator.check_token(request.headers.get("Authorization"))
    return jsonify(simulator.query(_json_body()))


@control.get("/health")
def health():
    return {"status": "ok"}


@control.get("/prompts")
def list_prompts():
    prompts = get_simulator().list_prompts(request.args.get("phone"), request.args.get("status"))
    return {"prompts": prompts}


@control.get("/prompts/<checkout_id>")
def get_prompt(checkout_id):
    return get_simulator().get_prompt(checkout_id)


@control.post("/prompts/<checkout_id>/pin")
def enter_pin(checkout_id):
    pin = _control_body().get("pin")
    if pin is None:
        raise BadRequest("pin is required")
    return get_simulator().enter_pin(checkout_id, pin)


@control.post("/prompts/<checkout_id>/cancel")
def cancel_prompt(checkout_id):
    return get_simulator().finish(checkout_id, 1032)


@control.post("/prompts/<checkout_id>/timeout")
def time_out_prompt(checkout_id):
    return get_simulator().finish(checkout_id, 1037)


@control.post("/prompts/<checkout_id>/resolve")
def resolve_prompt(checkout_id):
    body = _control_body()
    if "resultCode" not in body:
        raise BadRequest("resultCode is required")
    return get_simulator().finish(checkout_id, parse_result_code(body["resultCode"]))


@control.post("/scenarios")
def add_scenario():
    return get_simulator().add_rule(_control_body()), 201


@control.get("/scenarios")
def list_scenarios():
    return {"scenarios": get_simulator().list_rules()}


@control.delete("/scenarios")
def clear_scenarios():
    return {"cleared": get_simulator().clear_rules()}


@control.post("/faults")
def add_fault():
    return get_simulator().add_fault(_control_body()), 201


@control.get("/faults")
def list_faults():
    return {"faults": get_simulator().list_faults()}


@control.delete("/faults")
def clear_faults():
    return {"cleared": get_simulator().clear_faults()}


@control.post("/tokens/revoke")
def revoke_tokens():
    return {"revoked": get_simulator().revoke_tokens()}


@control.get("/config")
def show_config():
    return get_simulator().public_config()


@control.patch("/config")
def change_config():
    return get_simulator().update_config(_control_body())


@control.get("/stats")
def stats():
    return get_simulator().get_stats()


@control.get("/callbacks")
def callbacks():
    return {"callbacks": get_simulator().list_callbacks()}


@control.post("/reset")
def reset():
    get_simulator().reset()
    return {"status": "reset"}


def _daraja_refusal(error: DarajaRefusal):
    log.info("simulator: %s %s refused: %s %s", request.method, request.path, error.code, error.message)
    return error.response()


def _http_error(error: HTTPException):
    """Control API errors as {"error": ...}; unknown Daraja paths and methods as Daraja answers them."""
    if request.path.startswith("/simulator/"):
        return jsonify(error=error.description), error.code
    if error.code == 404:
        return DarajaRefusal("404.001.01", "Resource not found").response()
    if error.code == 405:
        return DarajaRefusal("405.001", "Method Not Allowed").response()
    return error


def create_app(config: SimulatorConfig | None = None, *, clock: Callable[[], float] = time.monotonic) -> Flask:
    """The simulator's WSGI app; its state is app.extensions["simulator"]."""
    app = Flask(__name__)
    app.json.sort_keys = False  # keep Daraja's field order
    app.extensions["simulator"] = Simulator(config, clock)
    app.register_blueprint(daraja)
    app.register_blueprint(control)
    app.register_error_handler(DarajaRefusal, _daraja_refusal)
    app.register_error_handler(HTTPException, _http_error)
    return app


class _QuietRequestHandler(WSGIRequestHandler):
    """No access log: paths and queries carry phone numbers; our own log lines mask them."""

    def log_request(self, *args) -> None:
        pass


class RunningSimulator:
    """A simulator serving HTTP on a daemon thread; stop() shuts it down."""

    def __init__(self, server, thread: threading.Thread, app: Flask, host: str):
        self._server = server
        self._thread = thread
        self.app = app
        self.port: int = server.server_port
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def state(self) -> Simulator:
        return self.app.extensions["simulator"]

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C interrupts the wait)."""
        self._thread.join()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self.state.close()

    def __enter__(self) -> RunningSimulator:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(
    host: str = "127.0.0.1",
    port: int = 0,
    config: SimulatorConfig | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> RunningSimulator:
    """Serve a new simulator on host:port (0 = a free port) from a daemon thread."""
    app = create_app(config, clock=clock)
    server = make_server(host, port, app, threaded=True, request_handler=_QuietRequestHandler)
    # A short poll interval makes stop() return quickly; idle polling costs next to nothing.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="simulator-http", daemon=True
    )
    thread.start()
    return RunningSimulator(server, thread, app, host)


def main(argv: list[str] | None = None) -> None:
    """python -m simulator: serve a simulator until Ctrl-C."""
    defaults = SimulatorConfig()
    parser = argparse.ArgumentParser(
        prog="python -m simulator", description="A local Daraja (M-Pesa Express) simulator."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=8089, help="port, 0 for any free one (default %(default)s)")
    parser.add_argument("--pin", default=defaults.pin, help="the handset PIN that pays (default %(default)s)")
    parser.add_argument(
        "--auto-delay",
        type=float,
        default=defaults.auto_delay,
        help="seconds before test numbers answer (default %(default)s)",
    )
    parser.add_argument(
        "--prompt-timeout",
        type=float,
        default=defaults.prompt_timeout,
        help="seconds an unanswered prompt waits before 1037 (default %(default)s)",
    )
    parser.add_argument(
        "--token-ttl",
        type=int,
        default=defaults.token_ttl,
        help="access token lifetime in seconds (default %(default)s)",
    )
    parser.add_argument(
        "--query-min-interval",
        type=float,
        default=defaults.query_min_interval,
        help="seconds between queries of one CheckoutRequestID (default %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = SimulatorConfig(
        pin=args.pin,
        auto_delay=args.auto_delay,
        prompt_timeout=args.prompt_timeout,
        token_ttl=args.token_ttl,
        query_min_interval=args.query_min_interval,
    )
    running = start(args.host, args.port, config)  # werkzeug explains a failed bind itself and exits 1
    print(
        f"Daraja simulator on {running.url} (consumer key {config.consumer_key}, "
        f"shortcode {SANDBOX_SHORTCODE}, PIN {config.pin}); Ctrl-C stops it",
        flush=True,
    )
    try:
        running.wait()
    except KeyboardInterrupt:
        running.stop()


class SimulatorProcess:
    """A simulator serving from a process of its own (`python -m simulator`); stop() ends it."""

    def __init__(self, process: subprocess.Popen, url: str):
        self.process = process
        self.url = url

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_process(host: str = "127.0.0.1", port: int = 0, timeout: float = 10.0) -> SimulatorProcess:
    """Serve a new simulator on host:port (0 = a free port) from a child process, once it answers."""
    if port == 0:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "simulator", "--host", host, "--port", str(port)],
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the simulator exited (code {process.returncode}) before answering on {url}")
        try:
            requests.get(url + "/simulator/health", timeout=0.5)
            return SimulatorProcess(process, url)
        except requests.RequestException:
            if time.monotonic() >= deadline:
                process.kill()
                process.wait()
                raise RuntimeError(f"the simulator did not answer on {url} within {timeout:g} s") from None
            time.sleep(0.1)


if __name__ == "__main__":
    main()
