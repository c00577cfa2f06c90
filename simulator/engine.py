"""The simulated Daraja's state and behaviour: tokens, pushes and queries, the prompt life cycle,
scenario rules and faults, callbacks and counters.

A push starts a prompt whose end is decided at once (a scenario rule, a test number) or left to
the handset; the end is timed on the Scheduler, and its callbacks are POSTed by a small worker
pool. One lock guards all the state; nothing here sleeps or does I/O under it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
import secrets
import string
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import requests
from werkzeug.exceptions import BadRequest, Conflict, NotFound

from mpesa import NAIROBI, mask_checkout_id, mask_phone, stk_password
from simulator.controls import AWAIT, Fault, Rule, SimulatorConfig, checked_phone, config_changes
from simulator.prompt import Prompt, iso
from simulator.scheduler import Scheduler
from simulator.wire import RESULT_DESCS, DarajaRefusal, credentials, invalid, new_request_id, push_fields, result_desc

log = logging.getLogger(__name__)

SANDBOX_TEST_PHONE = "254708374149"
STATUSES = ("pending", "completed", "failed")
STAT_NAMES = ("tokens_issued", "pushes_accepted", "pushes_rejected", "queries", "callbacks_sent", "callbacks_failed")
MAX_PROMPTS = 10_000  # finished prompts beyond this are forgotten, oldest first
MAX_CALLBACK_LOG = 1_000

_BUILTIN_NUMBER = re.compile(r"25470000([0-9]{4})")
_RECEIPT_CHARS = string.ascii_uppercase + string.digits


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
        self.held: dict[int, dict] = {}  # answers the slow fault is holding back, by handle
        self._hold_handles = itertools.count(1)
        self._closed = False
        self.scheduler = Scheduler()
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="simulator-callback")

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

    def _authenticate_merchant(self, shortcode: str, timestamp: str, password: str) -> None:
        passkey = self.config.shortcodes.get(shortcode)
        if passkey is None:
            raise DarajaRefusal("500.001.1001", "Merchant does not exist")
        if password != stk_password(shortcode, passkey, timestamp):
            raise DarajaRefusal("500.001.1001", "Wrong credentials")

    def push(self, body: dict) -> dict:
        """Accept an STK Push request and start its prompt; returns Daraja's acknowledgement."""
        fields = push_fields(body, self.config.timestamp_skew)
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
                merchant_id=new_request_id(),
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
        shortcode, timestamp, password = credentials(body, self.config.timestamp_skew)
        checkout_id = body.get("CheckoutRequestID")
        with self.lock:
            prompt = self.prompts.get(checkout_id) if isinstance(checkout_id, str) else None
            if prompt is None:
                raise invalid("CheckoutRequestID")
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

    def list_prompts(self, phone: str | None = None, status: str | None = None) -> list[dict]:
        """Prompts newest first, optionally for one phone (any format) and/or one status."""
        phone = checked_phone(phone) if phone else None
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
        with suppress(NotFound, Conflict):  # answered or forgotten already: nothing left to end
            self.finish(checkout_id, code)

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
                    {"url": url, "body": body, "status": status, "error": error, "at": iso(datetime.now(UTC))}
                )
                self.stats["callbacks_sent" if ok else "callbacks_failed"] += 1

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

    @contextmanager
    def holding(self, endpoint: str, caller: dict, checkout_id: str | None, seconds: float) -> Iterator[None]:
        """List an answer as held (GET /simulator/held) while the block holds it back from its caller."""
        since = datetime.now(UTC)
        entry = {
            "endpoint": endpoint,
            "checkoutRequestId": checkout_id,
            "caller": caller,
            "since": iso(since),
            "until": iso(since + timedelta(seconds=seconds)),
        }
        with self.lock:
            handle = next(self._hold_handles)
            self.held[handle] = entry
        try:
            yield
        finally:
            with self.lock:
                del self.held[handle]

    def list_held(self) -> list[dict]:
        """The answers being held back right now, oldest first."""
        with self.lock:
            return [{**entry, "caller": dict(entry["caller"])} for entry in self.held.values()]

    def public_config(self) -> dict:
        with self.lock:
            return self.config.public()

    def update_config(self, data: dict) -> dict:
        """Change tunable settings; all are checked before any is applied."""
        changes = config_changes(data)
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
