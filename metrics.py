"""Monitoring: Prometheus metrics, the /stats summary, and the JSON log line format.

The metrics (every label takes a few fixed values: never a phone number or an id)::

    mpesa_payments_total{status,reason,settled_by}    each payment's first final verdict
    mpesa_payments_late_results_total{status,reason}  real results that replaced our own timeout
    mpesa_stk_push_duration_seconds{result}           histogram of Daraja STK push calls (ok|error)
    mpesa_stk_query_duration_seconds{result}          histogram of Daraja STK query calls (ok|error)
    mpesa_daraja_errors_total{call,error,code}        failed Daraja calls by exception class and errorCode
    mpesa_callbacks_total{outcome}                    Daraja callbacks by what became of them
    mpesa_webhook_deliveries_total{result}            merchant webhook attempts: delivered|retry|given_up
    mpesa_http_request_duration_seconds{method,route,status}  histogram of every request served

Several processes (gunicorn workers) use prometheus-client's multiprocess mode: it is on when
PROMETHEUS_MULTIPROC_DIR is set before prometheus_client is first imported (gunicorn.conf.py
does that), each process writes its own files there, and render()/stats() add them up. Without
it one process counts in memory. Either way the numbers start at zero with the server.

A callback that arrives before its push is recorded counts as unknown_id, and once more
(settled) when the push is recorded and it is matched.

Knows nothing of Flask: the server calls these hooks, serves render() and stats(), and uses
JsonFormatter for its logs (gunicorn.conf.py too, for gunicorn's own lines).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import select
import threading
import time
from bisect import bisect_left
from collections import Counter as Tally
from contextlib import contextmanager

if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # Set but blank (an empty config var) would still mean multiprocess mode, in the current directory.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, multiprocess, values  # noqa: E402
from prometheus_client.exposition import choose_encoder  # noqa: E402

import mpesa  # noqa: E402

MULTIPROCESS = bool(getattr(values.ValueClass, "_multiprocess", False))
# gunicorn.conf.py sets it in the master, so every worker reports the same start.
STARTED_AT = float(os.environ.get("METRICS_STARTED_AT") or time.time())

DARAJA_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 12, 20, 30)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

PAYMENTS = Counter("mpesa_payments", "Payments by their first final verdict", ["status", "reason", "settled_by"])
LATE_RESULTS = Counter(
    "mpesa_payments_late_results",
    "Real results from Daraja that replaced our own timeout verdict",
    ["status", "reason"],
)
STK_PUSH_SECONDS = Histogram(
    "mpesa_stk_push_duration_seconds", "Daraja STK push calls", ["result"], buckets=DARAJA_BUCKETS
)
STK_QUERY_SECONDS = Histogram(
    "mpesa_stk_query_duration_seconds", "Daraja STK query calls", ["result"], buckets=DARAJA_BUCKETS
)
DARAJA_ERRORS = Counter(
    "mpesa_daraja_errors", "Failed Daraja calls by exception class and errorCode", ["call", "error", "code"]
)
CALLBACKS = Counter("mpesa_callbacks", "Daraja result callbacks by what became of them", ["outcome"])
WEBHOOK_DELIVERIES = Counter("mpesa_webhook_deliveries", "Merchant webhook delivery attempts", ["result"])
HTTP_SECONDS = Histogram(
    "mpesa_http_request_duration_seconds", "Requests served", ["method", "route", "status"], buckets=HTTP_BUCKETS
)

CALLBACK_OUTCOMES = (
    "settled",
    "duplicate",
    "contradiction",
    "receipt_added",
    "unknown_id",
    "bad_token",
    "not_allowed",
    "malformed",
)
WEBHOOK_RESULTS = ("delivered", "retry", "given_up")
_SETTLED = {"completed": "settled", "failed": "settled", "amount_mismatch": "settled"}
_DURATIONS = {"stk_push": STK_PUSH_SECONDS, "stk_query": STK_QUERY_SECONDS}
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,32}")


# --------------------------------------------------------------------- hooks


def preset_labels() -> None:
    """Show the callback and webhook series at 0 before anything happens (for rate())."""
    for outcome in CALLBACK_OUTCOMES:
        CALLBACKS.labels(outcome)
    for result in WEBHOOK_RESULTS:
        WEBHOOK_DELIVERIES.labels(result)


def payment_settled(tx) -> None:
    """Count a payment's final verdict; a real result replacing our timeout counts as late."""
    reason = tx.reason or "none"
    if "late_result" in tx.flags:
        LATE_RESULTS.labels(tx.status, reason).inc()
    else:
        PAYMENTS.labels(tx.status, reason, tx.settled_by or "unknown").inc()


def callback(outcome: str) -> None:
    """Count one Daraja callback by its outcome (a settlement outcome or one of CALLBACK_OUTCOMES)."""
    outcome = _SETTLED.get(outcome, outcome)
    CALLBACKS.labels(outcome if outcome in CALLBACK_OUTCOMES else "other").inc()


def webhook_delivery(result: str) -> None:
    """Count one merchant webhook attempt: delivered, retry or given_up."""
    WEBHOOK_DELIVERIES.labels(result if result in WEBHOOK_RESULTS else "other").inc()


@contextmanager
def daraja_call(call: str):
    """Time a Daraja call (stk_push, stk_query, token) and count it when it fails."""
    started = time.perf_counter()
    result = "error"
    try:
        yield
        result = "ok"
    except mpesa.DarajaError as error:
        DARAJA_ERRORS.labels(call, type(error).__name__, _error_code(error.error_code)).inc()
        raise
    finally:
        histogram = _DURATIONS.get(call)
        if histogram is not None:
            histogram.labels(result).observe(time.perf_counter() - started)


def timed(call: str, function):
    """function wrapped in daraja_call(call): metrics.timed("stk_push", daraja.stk_push)(...)."""

    def wrapper(*args, **kwargs):
        with daraja_call(call):
            return function(*args, **kwargs)

    return wrapper


def requests_served(served) -> None:
    """Observe requests served, each (method, route, status, seconds); route is the URL rule
    (/stkpush/status/<checkout_id>), never the path.

    The same numbers as observing each request on HTTP_SECONDS, written once per label set and
    bucket instead of twice per request: with several workers every write goes to
    prometheus-client's multiprocess file under its lock, most of an observation's cost.
    """
    batch: dict = {}  # labels -> [sum of seconds, count per bucket]
    for method, route, status, seconds in served:
        labels = (method if method in _METHODS else "other", route or "unmatched", status)
        totals = batch.get(labels)
        if totals is None:
            totals = batch[labels] = [0.0, [0] * len(_HTTP_UPPER_BOUNDS)]
        totals[0] += seconds
        totals[1][bisect_left(_HTTP_UPPER_BOUNDS, seconds)] += 1  # the first bound >= seconds, as observe()
    for labels, (seconds, counts) in batch.items():
        child = _HTTP_CHILDREN.get(labels)
        if child is None:  # labels() validates and locks each time
            child = _HTTP_CHILDREN[labels] = HTTP_SECONDS.labels(*labels[:2], str(labels[2]))
        # Histogram.observe() as it is in prometheus-client 0.26, for many observations at once;
        # tests/test_metrics.py checks the two give the same exposition.
        child._sum.inc(seconds)
        for bucket, count in zip(child._buckets, counts):
            if count:
                bucket.inc(count)


_HTTP_CHILDREN: dict = {}  # (method, route, status) -> HTTP_SECONDS's child: few, routes are the app's
_HTTP_UPPER_BOUNDS = (*HTTP_BUCKETS, math.inf)  # as Histogram keeps them


def _error_code(code) -> str:
    text = str(code or "")
    if not text:
        return "none"
    return text if _ERROR_CODE.fullmatch(text) else "other"


# ------------------------------------------------------------------- reading


def render(accept: str | None = None) -> tuple[bytes, str]:
    """The exposition for a scrape, in the format its Accept header asks for; (body, content type)."""
    encoder, content_type = choose_encoder(accept or "")
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return encoder(registry), content_type
    return encoder(REGISTRY), content_type


def stats() -> dict:
    """Payments by final status and by failure reason since the server started, and the success rate."""
    by_status, by_reason, settled_by, callbacks, pushes = Tally(), Tally(), Tally(), Tally(), Tally()
    late = 0
    collectors = (
        [multiprocess.MultiProcessCollector(None)]
        if MULTIPROCESS
        else [PAYMENTS, LATE_RESULTS, CALLBACKS, STK_PUSH_SECONDS]
    )
    for collector in collectors:
        for family in collector.collect():
            for sample in family.samples:
                count, labels = int(sample.value), sample.labels
                if sample.name == "mpesa_payments_total":
                    by_status[labels["status"]] += count
                    settled_by[labels["settled_by"]] += count
                    if labels["status"] == "failed":
                        by_reason[labels["reason"]] += count
                elif sample.name == "mpesa_payments_late_results_total":
                    late += count
                elif sample.name == "mpesa_callbacks_total":
                    callbacks[labels["outcome"]] += count
                elif sample.name == "mpesa_stk_push_duration_seconds_count":
                    pushes[labels["result"]] += count
    total = sum(by_status.values())
    return {
        "since": log_time(STARTED_AT),
        "payments": total,
        "byStatus": {"completed": by_status["completed"], "failed": by_status["failed"]},
        "byReason": dict(by_reason.most_common()),
        "successRate": round(by_status["completed"] / total, 4) if total else None,
        "settledBy": dict(settled_by.most_common()),
        "lateResults": late,
        "pushes": {"accepted": pushes["ok"], "failed": pushes["error"]},
        "callbacks": {name: n for name, n in callbacks.most_common() if n},
    }


# ---------------------------------------------------------------------- logs

_LOG_ENCODER = json.JSONEncoder(default=str, separators=(",", ":"))  # one, not one per line
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    "request_id",
}


_second = (None, "")  # (a whole epoch second, its UTC text): log lines come many a second


def log_time(epoch: float) -> str:
    """A log line's time, 2026-11-23T09:35:42.596Z: UTC to the millisecond, the date and second
    part made once a second."""
    global _second
    fraction, whole = math.modf(epoch)
    micro = round(fraction * 1_000_000)  # as datetime.fromtimestamp rounds
    if micro == 1_000_000:
        whole, micro = whole + 1, 0
    cached, text = _second
    if whole != cached:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second = (whole, text)
    return f"{text}.{micro // 1000:03d}Z"


class LineHandler(logging.StreamHandler):
    """A StreamHandler that writes whole lines straight to the stream's file, lock-free.

    logging.StreamHandler holds its lock across the write and flush, system calls that let go
    of the GIL: under gunicorn's threads the others then queue on that lock at every request.
    POSIX makes one write of up to PIPE_BUF bytes to a pipe atomic, so such lines from threads
    and workers never mix without a lock. A longer line (a traceback) is written under the lock,
    as is any line when the stream has no file descriptor (a test's StringIO).

    gather(seconds) (gunicorn.conf.py turns it on in each worker) goes further: lines at INFO
    and below wait up to `seconds` in a list (the logging thread takes only the list's lock for
    as long as an append), and a writer thread writes them together, under the lock, in
    writes of whole lines of up to PIPE_BUF bytes. One write(2) then serves many requests
    instead of one each, and each write(2) under gunicorn's threads hands the GIL around. Lines
    are formatted when logged, since a record's arguments may change. A WARNING or worse is
    written at once, after the lines gathered before it, and flush() (which logging.shutdown
    calls at exit) writes whatever waits. The writer sleeps while nothing does.
    """

    _gathering = False
    _gathered: list | tuple = ()  # encoded lines waiting for the writer thread

    def gather(self, seconds: float) -> None:
        """Write lines at INFO and below at most `seconds` after they come, from a thread started here."""
        if self._gathering or self._fd() is None:
            return
        self._gathered, self._gathered_lock = [], threading.Lock()
        self._waiting = threading.Event()  # set when the first line of a batch is gathered
        self._stopped = threading.Event()
        self._gathering = True
        threading.Thread(target=self._write_gathered_every, args=(seconds,), name="log-writer", daemon=True).start()

    @property
    def gathering(self) -> bool:
        """Whether lines at INFO and below wait for the writer thread (gather())."""
        return self._gathering

    def gather_lines(self, lines: list[str]) -> None:
        """INFO lines made without records (requestlog's request lines), taken as emit() takes theirs."""
        encoding = getattr(self.stream, "encoding", None) or "utf-8"
        encoded = [(line + self.terminator).encode(encoding, "backslashreplace") for line in lines]
        if not encoded:
            return
        with self._gathered_lock:
            if self._gathering:  # else closed meanwhile: written at once below
                waiting = bool(self._gathered)
                self._gathered.extend(encoded)
                if not waiting:
                    self._waiting.set()
                return
        with self.lock:
            for data in encoded:
                self._write_chunk(data)

    def handle(self, record: logging.LogRecord):
        kept = self.filter(record)
        if isinstance(kept, logging.LogRecord):  # Python 3.12+: a filter may swap the record
            record = kept
        if kept:
            self.emit(record)
        return kept

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._gathering and record.levelno <= logging.INFO:
                line = self._encode(record)
                with self._gathered_lock:
                    if self._gathering:  # else closed meanwhile: written at once below
                        self._gathered.append(line)
                        if len(self._gathered) == 1:
                            self._waiting.set()
                        return
            fd = self._fd()
            if fd is None:
                with self.lock:
                    self.stream.write(self.format(record) + self.terminator)
                    self.flush()
                return
            data = self._encode(record)
            if self._gathering or len(data) > select.PIPE_BUF:
                with self.lock:
                    self._write_gathered()  # what was logged before this line goes first
                    _write_all(fd, data)
            else:
                _write_all(fd, data)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        self._write_gathered()
        super().flush()

    def close(self) -> None:
        """Write what waits and stop the writer thread; later lines are written at once."""
        if self._gathering:
            with self._gathered_lock:
                self._gathering = False
            self._write_gathered()
            self._stopped.set()
            self._waiting.set()
        super().close()

    def _fd(self) -> int | None:
        try:
            return self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            return None

    def _encode(self, record: logging.LogRecord) -> bytes:
        line = self.format(record) + self.terminator
        return line.encode(getattr(self.stream, "encoding", None) or "utf-8", "backslashreplace")

    def _write_gathered_every(self, seconds: float) -> None:
        # An idle worker's writer sleeps until a line comes, instead of waking every `seconds`.
        while self._waiting.wait() and not self._stopped.wait(seconds):
            self._waiting.clear()  # before taking the lines: one gathered later sets it again
            self._write_gathered()

    def _write_gathered(self) -> None:
        if not self._gathered:
            return
        with self.lock:
            with self._gathered_lock:
                lines, self._gathered = self._gathered, []
            chunk = b""
            for line in lines:
                if len(chunk) + len(line) > select.PIPE_BUF:
                    self._write_chunk(chunk)
                    chunk = b""
                chunk += line
            self._write_chunk(chunk)

    def _write_chunk(self, chunk: bytes) -> None:
        try:
            _write_all(self.stream.fileno(), chunk)
        except (OSError, ValueError):  # the stream is gone: report it with the lines that were lost
            self.handleError(logging.makeLogRecord({"msg": chunk.decode(errors="replace")}))


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, request_id, message, then extras.

    Extras are the record's own fields (`log.info(..., extra={"status": 200})`); a traceback
    comes as "exception". The message is formatted as for text, so it carries nothing more.
    A record with a json_line() method may write the same line itself, more cheaply.
    """

    def format(self, record: logging.LogRecord) -> str:
        own_line = getattr(record, "json_line", None)  # requestlog.RequestRecord: one per request
        line = own_line() if own_line is not None else None
        if line is not None:
            return line
        entry = {
            "time": log_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        entry["message"] = record.getMessage()
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in entry:
                entry[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _LOG_ENCODER.encode(entry)
