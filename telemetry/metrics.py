"""Monitoring: Prometheus metrics and the /stats summary.

The metrics (every label takes a few fixed values: never a phone number or an id)::

    mpesa_payments_total{status,reason,settled_by}    each payment's first final verdict
    mpesa_payments_late_results_total{status,reason}  real results that replaced our own timeout
    mpesa_stk_push_duration_seconds{result}           histogram of Daraja STK push calls (ok|error)
    mpesa_stk_query_duration_seconds{result}          histogram of Daraja STK query calls (ok|error)
    mpesa_daraja_errors_total{call,error,code}        failed Daraja calls by exception class and errorCode
    mpesa_callbacks_total{outcome}                    Daraja callbacks by what became of them
    mpesa_webhook_deliveries_total{result}            merchant webhook attempts: delivered|retry|given_up
    mpesa_http_request_duration_seconds{method,route,status}  histogram of every request served

Several processes (uWSGI's workers) add up their numbers through prometheus-client's
multiprocess mode: it is on when PROMETHEUS_MULTIPROC_DIR is in the environment before
prometheus_client is first imported, so the command that starts the server sets it (Procfile,
Dockerfile), and config.py checks it (settings.metrics_dir). Each process writes its own files
there; render() and stats(), given that directory, add them up, and serve.py empties it
with clear() before uWSGI starts. Without it each process counts in memory, alone. Either way
the numbers start at zero with the server.

A callback that matches no payment (an old or foreign id) counts as unmatched: it is kept
as a record of its own, flagged "unmatched", for an operator to look at.

Knows nothing of Flask: the server calls these hooks and serves render() and stats().
"""

from __future__ import annotations

import glob
import os
import re
import time
from collections import Counter as Tally
from contextlib import contextmanager

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, multiprocess
from prometheus_client.exposition import choose_encoder

import mpesa
from telemetry.logs import log_time

# This module's first import: under uWSGI the master's (serve.py imports it before forking),
# so every worker reports the server's start, not its own.
STARTED_AT = time.time()

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
    "amount_missing",
    "unmatched",
    "bad_token",
    "not_allowed",
    "malformed",
)
WEBHOOK_RESULTS = ("delivered", "retry", "given_up")
_SETTLED = {"completed": "settled", "failed": "settled", "amount_mismatch": "settled"}
_DURATIONS = {"stk_push": STK_PUSH_SECONDS, "stk_query": STK_QUERY_SECONDS}
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,32}")


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


def request_served(method: str, route: str | None, status: int, seconds: float) -> None:
    """Observe one request served; route is the matched URL rule
    (/stkpush/status/<payment_or_checkout_id>), never the path, and None when none matched."""
    HTTP_SECONDS.labels(method if method in _METHODS else "other", route or "unmatched", str(status)).observe(seconds)


def _error_code(code) -> str:
    text = str(code or "")
    if not text:
        return "none"
    return text if _ERROR_CODE.fullmatch(text) else "other"


def render(accept: str | None = None, directory: str | None = None) -> tuple[bytes, str]:
    """The exposition for a scrape, in the format its Accept header asks for; (body, content type).

    directory: prometheus-client's multiprocess directory (settings.metrics_dir), whose files
    every process adds to; None when this process counts alone, in memory.
    """
    encoder, content_type = choose_encoder(accept or "")
    if directory:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        return encoder(registry), content_type
    return encoder(REGISTRY), content_type


def stats(directory: str | None = None) -> dict:
    """Payments by final status and by failure reason since the server started, and the success rate
    (directory as for render())."""
    by_status, by_reason, settled_by, callbacks, pushes = Tally(), Tally(), Tally(), Tally(), Tally()
    late = 0
    collectors = (
        [multiprocess.MultiProcessCollector(None, path=directory)]
        if directory
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


def clear(directory: str) -> None:
    """Remove a previous run's numbers from the multiprocess directory (serve.py, before uWSGI starts)."""
    for path in glob.glob(os.path.join(directory, "*.db")):
        os.remove(path)
