"""Log lines: their two formats, the handler that writes them, and the logging set-up.

LOG_FORMAT (config.py) picks text lines (TEXT_LOG_FORMAT) or JSON lines (JsonFormatter: one
object per line, for log collectors). Either way LineHandler writes them to stdout, and every
line logged while a request is served carries that request's id (RequestIdFilter; the id is
the one telemetry.requestlog gives the request). configure_logging() sets this up for
`python server.py` and each gunicorn worker; gunicorn.conf.py's logconfig_dict uses the same
formatter and handler for gunicorn's own lines.

No line carries a phone number, whoever wrote it: the server's modules mask the numbers they
log, and PhoneMaskFilter, on every handler these set-ups install, masks any other
(mpesa.PHONE_IN_TEXT: a library's line, a traceback, a number a client sent).
"""

from __future__ import annotations

import json
import logging
import math
import os
import select
import sys
import threading
import time

from flask import has_request_context, request

from mpesa import mask_phones

TEXT_LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
ENVIRON_KEY = "mpesa.request_id"  # where telemetry.requestlog keeps the request's id in the WSGI environ


def configure_logging(log_format: str) -> None:
    """Log to stdout as text or JSON lines (log_format, settings.log_format), with the request id on each JSON line."""
    root = logging.getLogger()
    if not root.handlers:  # under gunicorn, gunicorn.conf.py has set up the handler already
        logging.basicConfig(level=logging.INFO, format=TEXT_LOG_FORMAT, handlers=[LineHandler(sys.stdout)])
    json_lines = log_format == "json"
    for handler in root.handlers:
        if json_lines:
            handler.setFormatter(JsonFormatter())
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())
        mask_phones_on(handler)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # No format here shows the caller's file and line or the thread and process names: skip
    # collecting them for every line (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False


class RequestIdFilter(logging.Filter):
    """Tags each record made while serving a request with that request's id.

    Records made elsewhere (the request-log thread's) pass unchanged.
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
        """INFO lines made without records (requestlog's request lines), taken as emit() takes theirs
        and masked as this handler's PhoneMaskFilter masks records."""
        if any(isinstance(kept, PhoneMaskFilter) for kept in self.filters):
            lines = [mask_phones(line) for line in lines]
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
