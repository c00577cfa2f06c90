"""Log lines: their two formats, the filters every handler gets, and the logging set-up.

LOG_FORMAT (config.py) picks text lines (TEXT_LOG_FORMAT) or JSON lines (JsonFormatter: one
object per line, for log collectors). Either way logging's StreamHandler writes them to stdout,
and every line logged while a request is served carries that request's id (RequestIdFilter; the
id is the one telemetry.requestlog gives the request). configure_logging() sets this up for
`python server.py` and for serve.py, whose uWSGI workers inherit it; uWSGI writes its own few
lines itself, as text.

No line carries a phone number, whoever wrote it: the server's modules mask the numbers they
log, and PhoneMaskFilter, on every handler these set-ups install, masks any other
(mpesa.PHONE_IN_TEXT: a library's line, a traceback, a number a client sent).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from flask import has_request_context, request

from mpesa import mask_phones

TEXT_LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
ENVIRON_KEY = "mpesa.request_id"  # where telemetry.requestlog keeps the request's id in the WSGI environ


def configure_logging(log_format: str) -> None:
    """Log to stdout as text or JSON lines (log_format, settings.log_format), with the request id on each JSON line."""
    root = logging.getLogger()
    if not root.handlers:  # a uWSGI worker has the one serve.py set up, from before the fork
        logging.basicConfig(level=logging.INFO, format=TEXT_LOG_FORMAT, stream=sys.stdout)
    json_lines = log_format == "json"
    for handler in root.handlers:
        if json_lines:
            handler.setFormatter(JsonFormatter())
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())
        mask_phones_on(handler)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # No format here shows the thread or process names: skip collecting them for every line
    # (the logging HOWTO's "Optimization" section).
    logging.logThreads = False
    logging.logMultiprocessing = False


class RequestIdFilter(logging.Filter):
    """Tags each record made while serving a request with that request's id.

    Records made outside a request pass unchanged; requestlog's own line for the request,
    logged once the request is done, carries the id itself.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if has_request_context():
            request_id = request.environ.get(ENVIRON_KEY)
            if request_id:
                record.request_id = request_id
        return True


class PhoneMaskFilter(logging.Filter):
    """Masks every phone number in what a record will print: its message, its traceback, and
    its text fields (a JSON line's extras, a request id a client chose).

    2547******78, as mpesa.mask_phone writes them; the national number in a CheckoutRequestID
    as mpesa.mask_checkout_id does. The record itself is changed, so every handler prints it masked.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: the handler reports it when it formats the record
            return True
        masked = mask_phones(message)
        if masked != message:
            record.msg, record.args = masked, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        for name, value in vars(record).items():
            if isinstance(value, str) and name not in _FIELDS_WITHOUT_PHONES:
                masked = mask_phones(value)
                if masked != value:
                    setattr(record, name, masked)
        return True


def mask_phones_on(handler: logging.Handler) -> None:
    """Make a PhoneMaskFilter the last of handler's filters, so that it also masks what the
    others add (RequestIdFilter: a request id a client chose)."""
    for kept in [f for f in handler.filters if isinstance(f, PhoneMaskFilter)]:
        handler.removeFilter(kept)
    handler.addFilter(PhoneMaskFilter())


_TRACEBACKS = logging.Formatter()  # formats a traceback as every formatter here does
# Where the record was made (logger, file, function...), and msg, masked above once formatted.
_FIELDS_WITHOUT_PHONES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) - {"exc_text", "stack_info"}


_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    "request_id",
}


def log_time(epoch: float) -> str:
    """A log line's time, 2026-11-23T09:35:42.596Z: UTC to the millisecond."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, request_id, message, then extras.

    Extras are the record's own fields (`log.info(..., extra={"status": 200})`); a traceback
    comes as "exception". The message is formatted as for text, so it carries nothing more.
    """

    def format(self, record: logging.LogRecord) -> str:
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
        return json.dumps(entry, default=str, separators=(",", ":"))
