"""Signed merchant webhooks: each final payment status POSTed to the shop, at least once.

    sender = WebhookSender("https://shop.example/mpesa/events", secret, store)
    sender.record(tx, now)       # Payments(on_settling=sender.record): inside the settling update
    sender.notify(tx)            # Payments(on_final=sender.notify): record if need be, then queue
    sender.redeliver_pending()   # the upkeep round (upkeep.py) and reconcile: queue what is due
    sender.close()

One event per final status. Its id comes from the record, evt_<paymentId>_<status> (or
_late for a real result that replaced our own timeout), so a redelivery reuses the id and a
shop dedupes on it. (Records made before payment ids have their CheckoutRequestID as
payment id, so their events keep the ids they always had.) The event is copied into the record when queued
(extra["webhooks"][id]) and every attempt sends that same body, signed Stripe's way:

    Mpesa-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, f"{t}." + body)>

`verify` is the helper a shop copies. Several v1= values are sent when several secrets are
configured (rotation), and `verify` accepts a header if any of them matches.

Delivery runs on a few worker threads (started on first use) that take due jobs from a delay
queue, so the request that settled a payment never waits for the shop. Each attempt:
takes `store.add("webhook-lock:<id>")`, so no two threads or processes send one event at
once; reads the record, so an event delivered or given up is never sent again, nor sent
again under an attempt number another process has already used; POSTs; writes the outcome
into the record and its history. A 2xx delivers. Anything else (a redirect too: none is
followed) or no answer is retried after about base_delay * 2**(attempt - 1) s, capped at
max_delay, with jitter, until max_attempts have been made; then the event is given up.
The time of the next attempt is written into the record too (nextAttemptAt).

The store holds the truth and the queue only memory: the event is written in the same
store update that settles the payment, and `redeliver_pending()` (run by each upkeep
round, upkeep.py, and by `flask reconcile`) queues again the events that are due and that
no process is sending, resuming at the recorded attempt count. So an event whose process
died, or that a live process will retry later, is sent once per attempt, on its schedule.
Not guaranteed: a 2xx that arrives just before the process dies unrecorded is sent again
(at least once: dedupe by id), and the events of one payment may arrive out of order (a
`late` event supersedes the earlier failed one; its `created` is later).

One module past the usual size because signing, the event document and delivery with its
retries are one promise to the shop; splitting them would spread that promise over files.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from mpesa import mask_checkout_id, mask_phone, pooled_session
from store import Transaction
from telemetry import metrics

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Mpesa-Signature"
DEFAULT_TOLERANCE = 300
USER_AGENT = "mpesa-stk-server-webhooks/1"
RECENT_SECONDS = 3 * 86400  # how far back redeliver_pending looks
DEFAULT_TIMEOUT = (3.05, 10)  # an attempt's connect and read timeouts, seconds
_ANSWER_BYTES = 64 * 1024  # read this much of an answer, so the connection can be reused
_PAGE = 100


def sign(secret: str | Iterable[str], timestamp: int, body: bytes) -> str:
    """Return the Mpesa-Signature value for body: t=<timestamp>,v1=<hex hmac> (one v1 per secret)."""
    timestamp = int(timestamp)
    body = body.encode() if isinstance(body, str) else body
    return ",".join([f"t={timestamp}", *(f"v1={_digest(s, timestamp, body)}" for s in _secrets(secret))])


def verify(
    secret: str | Iterable[str],
    header: str | None,
    body: bytes,
    tolerance: float | None = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> bool:
    """True if header signs body with secret (or any of several) within tolerance s of now."""
    secrets = _secrets(secret)
    body = body.encode() if isinstance(body, str) else body
    timestamp, signatures = None, []
    for item in (header or "").split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            timestamp = value
        elif key == "v1":
            signatures.append(value.encode())
    if not (timestamp and timestamp.isascii() and timestamp.isdigit()) or not signatures:
        return False
    now = time.time() if now is None else now
    if tolerance is not None and abs(now - int(timestamp)) > tolerance:
        return False  # a replay of an old (or a far-future) delivery
    expected = [_digest(s, int(timestamp), body).encode() for s in secrets]
    return any(hmac.compare_digest(mine, theirs) for mine in expected for theirs in signatures)


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def _secrets(secret) -> tuple[str, ...]:
    secrets = (secret,) if isinstance(secret, str) else tuple(secret or ())
    if not secrets or not all(isinstance(s, str) and s for s in secrets):
        raise ValueError("a webhook secret must be a non-empty string")
    return secrets


def event_id(tx: Transaction) -> str:
    """evt_<paymentId>_<status>, or _late for a result that replaced our timeout."""
    return f"evt_{tx.payment_id}_{'late' if 'late_result' in tx.flags else tx.status}"


def event_for(tx: Transaction) -> dict:
    """The event announcing tx's final status; built from the record alone, so repeatable."""
    if not tx.is_final:
        raise ValueError("a pending payment has no event yet")
    created = tx.completed_at if tx.completed_at is not None else tx.initiated_at
    return {
        "id": event_id(tx),
        "type": "payment.completed" if tx.status == "completed" else "payment.failed",
        "created": int(created),
        "data": {
            "paymentId": tx.payment_id,
            "orderId": tx.order_id,
            "checkoutRequestId": tx.checkout_request_id,
            "merchantRequestId": tx.merchant_request_id,
            "status": tx.status,
            "reason": tx.reason,
            "resultCode": tx.result_code,
            "resultDesc": tx.result_desc,
            "amount": tx.amount,
            "currency": tx.currency,
            "amountConfirmed": "amount_unconfirmed" not in tx.flags if tx.status == "completed" else None,
            "receipt": tx.mpesa_receipt_number,
            "accountReference": tx.account_reference,
            "description": tx.description,
            "phone": mask_phone(tx.phone),
            "initiatedAt": _iso(tx.initiated_at),
            "completedAt": _iso(tx.completed_at),
            "flags": list(tx.flags),
            **_order(tx),
        },
    }


def _order(tx: Transaction) -> dict:
    """Order number, lines and ticket numbers when the payment was for catalogue items."""
    order = tx.extra.get("order")
    if not order:
        return {}
    return {
        "orderNumber": order["number"],
        "items": order["items"],
        "tickets": list(tx.extra.get("tickets", [])) if tx.status == "completed" else [],
    }


def record_event(tx: Transaction, event: dict, now: float) -> bool:
    """Add event to tx as undelivered unless it is there; True while it still needs sending.

    Touches only tx, so it may run inside any store.update (even the one that settles tx).
    """
    entry = tx.extra.setdefault("webhooks", {}).setdefault(
        event["id"],
        {
            "delivered": False,
            "givenUp": False,
            "attempts": 0,
            "queuedAt": now,
            "lastAttemptAt": None,
            "lastStatus": None,
            "lastError": None,
            "deliveredAt": None,
            "event": event,
        },
    )
    return not (entry["delivered"] or entry["givenUp"])


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _loggable(event: str) -> str:
    """The event id with the payer's number masked, for the ids that are a CheckoutRequestID."""
    head, _, suffix = event.rpartition("_")
    return f"evt_{mask_checkout_id(head.removeprefix('evt_'))}_{suffix}"


def _record_attempt(
    tx: Transaction, event: str, status: int | None, error: str | None, now: float, max_attempts: int, retry_in: float
) -> tuple[str, int]:
    """Write one attempt's outcome into tx; return ("delivered"|"retry"|"given_up"|"gone", n).

    A retry is due retry_in seconds after now: nextAttemptAt in the entry, nextAttemptIn in
    the history (what a person reads on the timeline).
    """
    entry = tx.extra.get("webhooks", {}).get(event)
    if entry is None:
        return "gone", 0
    entry["attempts"] += 1
    attempt = entry["attempts"]
    entry.update(lastAttemptAt=now, lastStatus=status, lastError=error, nextAttemptAt=None)
    tx.history.append(
        {"at": now, "event": "webhook_attempt", "eventId": event, "status": status, "error": error, "attempt": attempt}
    )
    if status is not None and 200 <= status < 300:
        entry.update(delivered=True, deliveredAt=now)
        tx.history.append({"at": now, "event": "webhook_delivered", "eventId": event, "attempt": attempt})
        return "delivered", attempt
    if attempt >= max_attempts:
        entry["givenUp"] = True
        tx.history.append({"at": now, "event": "webhook_given_up", "eventId": event, "attempts": attempt})
        return "given_up", attempt
    entry["nextAttemptAt"] = now + retry_in
    tx.history[-1]["nextAttemptIn"] = round(retry_in, 3)  # the attempt's entry, appended above
    return "retry", attempt


def _due(entry: dict, now: float) -> bool:
    """Whether an event still needs sending and its next attempt has come."""
    if entry.get("delivered") or entry.get("givenUp"):
        return False
    return (entry.get("nextAttemptAt") or 0) <= now


def _lock_key(event: str) -> str:
    return f"webhook-lock:{event}"


def lock_ttl(timeout: float | tuple[float, float] = DEFAULT_TIMEOUT) -> float:
    """How long an attempt's lock lasts: longer than any attempt (connect + read timeouts), so
    a lock is only ever left behind by a process that died mid-attempt, and then not for long."""
    return (sum(timeout) if isinstance(timeout, tuple) else 2 * timeout) + 30


def _recorded(tx: Transaction, event: dict, now: float) -> dict:
    """Record event on tx (unless it is there) and return its entry."""
    record_event(tx, event, now)
    return tx.extra["webhooks"][event["id"]]


def _give_up(tx: Transaction, event: str, now: float) -> None:
    entry = tx.extra.get("webhooks", {}).get(event)
    if entry is not None and not entry["givenUp"]:
        entry["givenUp"] = True
        tx.history.append({"at": now, "event": "webhook_given_up", "eventId": event, "attempts": entry["attempts"]})


def _describe(error: requests.RequestException) -> str:
    """A short cause without the URL, which may carry the shop's own token."""
    if isinstance(error, requests.ConnectTimeout):
        return "connect timeout"
    if isinstance(error, requests.Timeout):
        return "read timeout"
    if isinstance(error, requests.ConnectionError):
        return "connection failed"
    return type(error).__name__


@dataclass
class _Job:
    payment_id: str
    event_id: str
    attempts: int  # attempts recorded when queued or since made here: the job goes on from there
    failures: int = 0  # unexpected errors (store down...), not answers from the shop
    sent: bool = False  # an attempt was made from this job


class WebhookSender:
    """POSTs signed events to one URL from background threads; see the module docstring.

    `sleep`, when given, is called with each backoff delay instead of waiting in the queue
    (tests pass a recorder). `workers` threads send at the same time.
    """

    def __init__(
        self,
        url: str,
        secret: str | Iterable[str],
        store,
        *,
        clock: Callable[[], float] = time.time,
        max_attempts: int = 8,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
        sleep: Callable[[float], None] | None = None,
        workers: int = 2,
    ):
        if urlsplit(url or "").scheme not in ("http", "https"):
            raise ValueError("the webhook URL must be an absolute http(s) URL")
        if max_attempts < 1 or base_delay < 0 or max_delay < base_delay or workers < 1:
            raise ValueError("need max_attempts >= 1, 0 <= base_delay <= max_delay, workers >= 1")
        self.url = url
        self._secrets = _secrets(secret)
        self.store = store
        self.clock = clock
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.timeout = timeout
        self._sleep = sleep
        self._workers = workers
        self._lock_ttl = lock_ttl(timeout)
        self.session = self._new_session()
        self._cond = threading.Condition()
        self._queue: list[tuple[float, int, _Job]] = []  # heap of (due, seq, job)
        self._queued: set[str] = set()  # event ids queued or in flight here
        self._busy = 0
        self._seq = itertools.count()
        self._threads: list[threading.Thread] = []
        self._pid: int | None = None
        self._closed = False

    def __repr__(self) -> str:
        parts = urlsplit(self.url)
        return f"WebhookSender(url='{parts.scheme}://{parts.netloc}/...')"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- public

    @staticmethod
    def record(tx: Transaction, now: float) -> None:
        """Add tx's event, undelivered, to tx itself: for the store update that settles tx
        (Payments' on_settling), so that no crash can leave a settled payment unannounced."""
        record_event(tx, event_for(tx), now)

    def notify(self, tx: Transaction) -> str | None:
        """Record tx's final status as an undelivered event and queue it; return the event id."""
        if not tx.is_final:
            return None
        event = event_for(tx)  # from the record as settled, before anything else changes it
        entry = tx.extra.get("webhooks", {}).get(event["id"])
        if entry is None:  # not recorded while settling: record it now
            now = self.clock()
            stored, entry = self.store.update(tx.payment_id, lambda t: _recorded(t, event, now))
            if stored is None:
                log.warning("webhook %s not sent: record gone", _loggable(event["id"]))
                return None
        if not (entry["delivered"] or entry["givenUp"]):
            self._enqueue(_Job(tx.payment_id, event["id"], entry["attempts"]))
        return event["id"]

    def redeliver_pending(
        self, *, max_age: float = RECENT_SECONDS, limit: int = 1000, wait: float | None = None
    ) -> int:
        """Queue the events of the last max_age s that are due and that nobody is sending.

        Returns how many were queued here. Left alone, and not counted: events delivered or
        given up; events whose next attempt is not due yet (the process that made the last
        attempt keeps them for it); events another thread or process is sending right now
        (their lock is taken: a process that died mid-attempt leaves it until it expires);
        events this process has queued already.

        With wait, waits up to that many seconds for the queue to empty, and returns how many
        of those events this process actually sent (another may have taken one first).
        """
        now = self.clock()
        jobs: list[_Job] = []
        seen: set[str] = set()
        for status in ("completed", "failed"):
            for tx in self._recent(status, now - max_age, limit):
                for event, entry in tx.extra.get("webhooks", {}).items():
                    if event in seen or not _due(entry, now):
                        continue
                    seen.add(event)
                    job = _Job(tx.payment_id, event, entry["attempts"])
                    if self.store.get_value(_lock_key(event)) is None and self._enqueue(job):
                        jobs.append(job)
        if jobs:
            log.info("webhooks: %d undelivered event(s) queued again", len(jobs))
        if wait is None:
            return len(jobs)
        self.flush(wait)
        return sum(job.sent for job in jobs)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or being sent here; False if timeout (or close) came first."""

        def idle() -> bool:
            return not self._queue and not self._busy

        with self._cond:
            self._cond.wait_for(lambda: idle() or self._closed, timeout)
            return idle()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers and close the session; wait up to timeout seconds for the attempts
        under way to finish, so that their outcome is recorded and their lock released.

        At exit (server.start_background_work) a slow attempt must not be cut short: the
        process would close the store under it, and leave the event locked for _lock_ttl
        seconds. Ten seconds is most of a timed-out attempt and fits in the 20 s a stopping
        worker gets (serve.py) beside the upkeep's stop."""
        with self._cond:
            self._closed = True
            left = len(self._queue)
            self._cond.notify_all()
            threads = list(self._threads) if self._pid == os.getpid() else []
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.session.close()
        if left:
            log.info("webhooks: %d event(s) left queued; the next upkeep round or reconcile resumes them", left)

    # -- the queue

    def _new_session(self) -> requests.Session:
        session = pooled_session(self.url, HTTPAdapter(pool_connections=1, pool_maxsize=self._workers, max_retries=0))
        session.headers["User-Agent"] = USER_AGENT
        return session

    def _enqueue(self, job: _Job, delay: float = 0.0) -> bool:
        with self._cond:
            if self._closed:
                log.info("webhook %s left undelivered: sender closed", _loggable(job.event_id))
                return False
            self._start()
            if job.event_id in self._queued:
                return False  # already on its way from this process
            self._queued.add(job.event_id)
            heapq.heappush(self._queue, (time.monotonic() + delay, next(self._seq), job))
            self._cond.notify()
            return True

    def _start(self) -> None:
        """Start the workers on first use, and again in a child forked after they started."""
        if self._pid == os.getpid():
            return
        if self._pid is not None:
            # The parent's threads and sockets do not exist here: begin afresh.
            self._queue.clear()
            self._queued.clear()
            self._busy = 0
            self.session = self._new_session()
        self._pid = os.getpid()
        self._threads = [
            threading.Thread(target=self._work, name=f"webhooks-{n}", daemon=True) for n in range(self._workers)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                job = self._next_due()
                if job is None:
                    return
                self._busy += 1
            delay = None
            try:
                delay = self._deliver(job)
            except Exception:
                job.failures += 1
                log.exception("webhook %s: attempt failed on our side (%d)", _loggable(job.event_id), job.failures)
                if job.failures < self.max_attempts:
                    delay = self._backoff(job.failures)
            if delay is not None and self._sleep is not None:
                self._sleep(delay)
                delay = 0.0
            with self._cond:
                self._busy -= 1
                if delay is not None and not self._closed:
                    heapq.heappush(self._queue, (time.monotonic() + delay, next(self._seq), job))
                else:
                    self._queued.discard(job.event_id)
                self._cond.notify_all()

    def _next_due(self) -> _Job | None:
        """Wait (holding the condition) for the earliest job to fall due; None once closed."""
        while not self._closed:
            wait = None
            if self._queue:
                wait = self._queue[0][0] - time.monotonic()
                if wait <= 0:
                    return heapq.heappop(self._queue)[2]
            self._cond.wait(wait)
        return None

    def _backoff(self, attempt: int) -> float:
        delay = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return delay / 2 + random.uniform(0, delay / 2)

    # -- one attempt

    def _deliver(self, job: _Job) -> float | None:
        """Make one attempt at job; return the delay before the next, or None when done here."""
        lock = _lock_key(job.event_id)
        if not self.store.add(lock, {"pid": os.getpid(), "at": self.clock()}, self._lock_ttl):
            # Another thread or process is sending it right now, and carries on from there.
            log.info("webhook %s is being sent elsewhere", _loggable(job.event_id))
            return None
        try:
            return self._attempt(job)
        finally:
            try:
                self.store.delete(lock)
            except Exception as error:  # it expires by itself
                log.warning("webhook %s: lock not released: %s", _loggable(job.event_id), error)

    def _attempt(self, job: _Job) -> float | None:
        tx = self.store.get(job.payment_id)
        entry = tx.extra.get("webhooks", {}).get(job.event_id) if tx else None
        if entry is None or entry["delivered"] or entry["givenUp"]:
            return None
        name = _loggable(job.event_id)
        if entry["attempts"] != job.attempts:
            # Another process made an attempt since this job was queued, and keeps the next one.
            log.info("webhook %s: attempt %d was made elsewhere", name, entry["attempts"])
            return None
        if entry["attempts"] >= self.max_attempts:  # max_attempts lowered since it was queued
            self.store.update(job.payment_id, lambda t: _give_up(t, job.event_id, self.clock()))
            return None
        body = json.dumps(entry["event"], separators=(",", ":")).encode()
        job.sent = True
        status, error = self._post(body)
        now = self.clock()
        delay = self._backoff(job.attempts + 1)
        _, recorded = self.store.update(
            job.payment_id,
            lambda t: _record_attempt(t, job.event_id, status, error, now, self.max_attempts, delay),
        )
        outcome, attempt = recorded or ("gone", 0)  # None: the record itself has expired
        if outcome == "gone":
            return None
        job.attempts = attempt
        metrics.webhook_delivery(outcome)
        if outcome == "delivered":
            log.info("webhook %s delivered: HTTP %s, attempt %d", name, status, attempt)
            return None
        if outcome == "given_up":
            log.error("webhook %s given up after %d attempts: %s", name, attempt, error)
            return None
        log.warning("webhook %s attempt %d failed: %s; next in %.1fs", name, attempt, error, delay)
        return delay

    def _post(self, body: bytes) -> tuple[int | None, str | None]:
        """POST body once; return (HTTP status or None, error or None)."""
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self._secrets, int(self.clock()), body)}
        try:
            response = self.session.post(
                self.url, data=body, headers=headers, timeout=self.timeout, allow_redirects=False, stream=True
            )
        except requests.RequestException as error:
            return None, _describe(error)
        with response:
            try:
                read = 0
                for chunk in response.iter_content(8192):
                    read += len(chunk)
                    if read >= _ANSWER_BYTES:
                        break
            except requests.RequestException:
                pass  # the status line is the answer; the body is only read to reuse the connection
        status = response.status_code
        return status, None if 200 <= status < 300 else f"HTTP {status}"

    def _recent(self, status: str, cutoff: float, limit: int):
        """Final records with this status initiated after cutoff, newest first, at most limit."""
        offset = 0
        while offset < limit:
            page, _ = self.store.list(status=status, limit=min(_PAGE, limit - offset), offset=offset)
            for tx in page:
                if tx.initiated_at < cutoff:
                    return
                yield tx
            if len(page) < _PAGE:
                return
            offset += len(page)
