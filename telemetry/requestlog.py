"""What every answer gets, whoever gave it: a request id, security headers, metrics, one log line.

RequestLog wraps the Flask app as WSGI middleware, so it sees every answer: the routes', the
error handlers', the rate limiter's refusals and the static pages'. It adds its headers to the
list the app hands to start_response. Flask's before/after_request hooks did the same through
werkzeug's Headers and Flask's hook machinery: moving it here raised status-poll throughput by
about a tenth (docs/design.md).

The request's metrics and log line are made from a few facts the request leaves behind. Under
gunicorn (defer(), from gunicorn.conf.py) a thread of the worker's own makes them, in batches:
the same work costs a gunicorn request thread several times what it costs a thread doing
nothing else (docs/design.md).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import re
import threading
import time
from collections import deque

from mpesa import mask_phones
from telemetry import logs, metrics
from telemetry.logs import ENVIRON_KEY, PhoneMaskFilter, RequestIdFilter

log = logging.getLogger("server")

# Routes a page polls every second (the simulated handset): counted in the metrics, but a
# successful poll writes no log line, so the log shows what happened rather than the polling.
QUIET_ROUTES = frozenset({"/simulator/prompts"})
REQUEST_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}")  # an incoming X-Request-ID we reuse
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
    "base-uri 'self'; form-action 'self'"
)
# Pages, scripts, styles and images: a strict policy for the documents, no framing, no referrer abroad.
SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
)
# JSON answers, as OWASP's REST Security Cheat Sheet has them: nothing to load or frame, and no
# cache keeps them. The policy's frame-ancestors does X-Frame-Options' work (the CSP specification
# tells browsers to ignore X-Frame-Options when it is there), and a Referrer-Policy has nothing to
# act on in a JSON answer: one header less on every status poll (docs/production.md).
API_CONTENT_SECURITY_POLICY = "default-src 'none'; frame-ancestors 'none'"
API_SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Content-Security-Policy", API_CONTENT_SECURITY_POLICY),
    ("Cache-Control", "no-store"),
)
HSTS = ("Strict-Transport-Security", "max-age=31536000")
_SECURITY_HEADERS = tuple((name.lower(), (name, value)) for name, value in SECURITY_HEADERS)
_API_SECURITY_HEADERS = tuple((name.lower(), (name, value)) for name, value in API_SECURITY_HEADERS)
_FLASK_JSON = ("Content-Type", "application/json")  # with Content-Length, all a JSON answer has
_WAIT_STATUSES = ("429", "503")  # the answers where Retry-After means something

# Request ids need to be unique, not secret: a generator of our own (reseeded in each forked
# worker) spares every request a system call for OS randomness, and leaves random's shared one alone.
_REQUEST_IDS = random.Random()
_pid = os.getpid()  # for the log line: LogRecord asks the system at every line


def _forked() -> None:
    global _pid
    _pid = os.getpid()
    _REQUEST_IDS.seed()


os.register_at_fork(after_in_child=_forked)


def _logging_started() -> float:
    probe = logging.LogRecord("", logging.INFO, "", 0, "", (), None)
    return probe.created - probe.relativeCreated / 1000


_LOGGING_STARTED = _logging_started()  # what LogRecord.relativeCreated counts from


class RequestLog:
    """WSGI middleware: X-Request-ID (the caller's if sane, else a new one), security headers
    (API_SECURITY_HEADERS on JSON, SECURITY_HEADERS on the rest), Retry-After only on 429 and
    503, the request's metrics and its JSON log line.

    The id is in the WSGI environ under ENVIRON_KEY while the app runs, for the log lines made
    on the way (RequestIdFilter). Put it inside ProxyFix, which corrects REMOTE_ADDR and
    the scheme first. Flask calls start_response before it returns the body, inside the request
    context: the status and matched URL rule are known when the request's facts are taken, and
    the duration does not include sending the body.
    """

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        given = environ.get("HTTP_X_REQUEST_ID")
        request_id = given if given and REQUEST_ID.fullmatch(given) else f"{_REQUEST_IDS.getrandbits(128):032x}"
        environ[ENVIRON_KEY] = request_id
        answered = []  # (status, Flask's request): Flask drops environ's request once done

        def start(status, headers, exc_info=None):
            if len(headers) == 2 and headers[0] == _FLASK_JSON and headers[1][0] == "Content-Length":
                headers += API_SECURITY_HEADERS  # Flask's JSON answer, most answers: none of ours there
                hsts = True
            else:
                present = {name.lower(): value for name, value in headers}
                if "retry-after" in present and status[:3] not in _WAIT_STATUSES:
                    # Flask-Limiter's headers put Retry-After on every answer; only a refusal means wait.
                    headers = [header for header in headers if header[0].lower() != "retry-after"]
                ours = (
                    _API_SECURITY_HEADERS
                    if present.get("content-type", "").startswith("application/json")
                    else _SECURITY_HEADERS
                )
                headers.extend(header for name, header in ours if name not in present)
                hsts = "strict-transport-security" not in present
            if hsts and environ.get("wsgi.url_scheme") == "https":
                headers.append(HSTS)
            headers.append(("X-Request-ID", request_id))
            answered.append((status, environ.get("werkzeug.request")))
            return start_response(status, headers, exc_info)

        body = self.app(environ, start)
        elapsed = time.perf_counter() - started
        status, served = answered[-1]
        rule = getattr(served, "url_rule", None)
        facts = (
            time.time(),
            environ.get("REQUEST_METHOD", ""),
            served.path if served is not None else environ.get("PATH_INFO", ""),
            rule.rule if rule else None,
            int(status[:3]),
            elapsed,
            environ.get("REMOTE_ADDR"),
            request_id,
        )
        if _served is None:
            record_requests([facts])
        else:
            _served.append(facts)
            if not _waiting.is_set():
                _waiting.set()
        return body


def record_requests(batch: list[tuple]) -> None:
    """The metrics and log lines of requests served, each given by the facts RequestLog takes:
    (created, method, path, route, status, seconds, remote_addr, request_id), route being the
    matched URL rule, None if none."""
    metrics.requests_served([(method, route, status, seconds) for _, method, _, route, status, seconds, _, _ in batch])
    if not log.isEnabledFor(logging.INFO):
        return
    batch = [facts for facts in batch if not (facts[3] in QUIET_ROUTES and facts[4] < 400)]
    handler = _sole_json_handler()
    if handler is None:
        for created, method, path, route, status, seconds, address, request_id in batch:
            log.handle(
                RequestRecord(
                    method, _loggable(path, route), status, round(seconds * 1000, 1), address, request_id, created
                )
            )
        return
    # The lines the records would become, made without them (docs/monitoring.md, Logs). Method and path are
    # encoded once for their fields and the message, and the duration printed once: with one
    # decimal, as repr() prints the rounded float a record holds.
    head = _line_head(_LEVEL, _LOGGER, _pid)
    lines = []
    for created, method, path, route, status, seconds, address, request_id in batch:
        method, path, duration = _json_text(method), _json_text(_loggable(path, route)), f"{seconds * 1000:.1f}"
        message = f'{method[:-1]} {path[1:-1]} {status} {duration}ms"'  # one JSON string, as _MESSAGE makes it
        lines.append(
            _json_line(created, head, _json_text(request_id), message, method, path, status, duration, address)
        )
    handler.gather_lines(lines)


def _loggable(path: str, route: str | None) -> str:
    # A path that is its route's rule (no <parameter>) holds nothing to mask.
    return path if path == route else loggable_path(path)


def _sole_json_handler() -> logs.LineHandler | None:
    """The handler request lines go to, when they go to it alone and nothing on the way can
    change or drop them: then record_requests makes the lines JsonFormatter would make of
    their records, without the records (gather_lines masks them as PhoneMaskFilter would).
    None otherwise (a filter or another handler added, text lines, lines written at once),
    and each line goes through logging in full."""
    if log.filters or log.handlers or not log.propagate or log.parent is not logging.root:
        return None
    if len(logging.root.handlers) != 1:
        return None
    handler = logging.root.handlers[0]
    if (
        type(handler) is not logs.LineHandler
        or not handler.gathering
        or handler.level > logging.INFO
        or type(handler.formatter) is not logs.JsonFormatter
        or any(type(kept) not in (RequestIdFilter, PhoneMaskFilter) for kept in handler.filters)
    ):
        return None
    return handler


_served: deque | None = None  # facts of requests waiting for the request-log thread, once deferred
_waiting = threading.Event()  # set when the first request of a batch is served


def defer(seconds: float) -> None:
    """From now on, record each request at most `seconds` after it is served, on a thread started here.

    Requests still waiting at exit are recorded then (atexit runs this before logging's
    shutdown, registered first), so only SIGKILL or the OOM killer loses up to `seconds` of them.
    """
    global _served
    if _served is not None:
        return
    _served = deque()
    threading.Thread(target=_record_every, args=(seconds,), name="request-log", daemon=True).start()
    atexit.register(_record_waiting)


def _record_every(seconds: float) -> None:
    # Sleeps while no request is served, instead of waking every `seconds`.
    while _waiting.wait():
        time.sleep(seconds)
        _waiting.clear()  # before taking the facts: a request served later sets it again
        _record_waiting()


def _record_waiting() -> None:
    batch = []
    while _served:
        try:
            batch.append(_served.popleft())
        except IndexError:  # taken meanwhile by the other caller (the exit's)
            break
    if not batch:
        return
    try:
        record_requests(batch)
    except Exception:  # the thread must go on: what waits would pile up
        log.exception("Could not record the metrics and log lines of %d request(s)", len(batch))


def loggable_path(path: str) -> str:
    """A request path with the callback secret and payers' numbers masked (a CheckoutRequestID's
    among them, or a phone number polled for as if it were an id)."""
    if path.startswith("/hooks/stk/"):
        return "/hooks/stk/***"
    return mask_phones(path)


class RequestRecord(logging.LogRecord):
    """The request's log line: a LogRecord made without LogRecord.__init__'s work.

    What is the same on every line (where it was logged; thread and process names, which the
    server does not collect) is copied in at once; LogRecord.__init__ works it out for every
    line, a large part of the line's cost.
    """

    def __init__(
        self,
        method: str,
        path: str,
        status: int,
        duration_ms: float,
        remote_addr: str | None,
        request_id: str,
        created: float | None = None,
    ):
        self.__dict__.update(_REQUEST_RECORD)  # %-style formats read the record's own fields only
        self.created = created = time.time() if created is None else created
        self.msecs = (created - int(created)) * 1000
        self.relativeCreated = (created - _LOGGING_STARTED) * 1000
        self.process = _pid
        self.args = (method, path, status, duration_ms)
        self.method, self.path, self.status, self.duration_ms = method, path, status, duration_ms
        self.remote_addr, self.request_id = remote_addr, request_id

    def json_line(self) -> str | None:
        """The line logs.JsonFormatter makes of this record, made directly at a third of the cost.

        None once a filter has added a field: the formatter then writes the record out in full.
        """
        if len(self.__dict__) != _REQUEST_RECORD_FIELDS:
            return None
        return _json_line(
            self.created,
            _line_head(self.levelname, self.name, self.process),
            _json_text(self.request_id),
            _json_text(self.getMessage()),
            _json_text(self.method),
            _json_text(self.path),
            self.status,
            repr(self.duration_ms),
            self.remote_addr,
        )


def _line_head(level: str, logger: str, pid: int) -> str:
    return f'","level":{_json_text(level)},"logger":{_json_text(logger)},"pid":{pid},"request_id":'


def _json_line(
    created: float,
    head: str,
    request_id: str,
    message: str,
    method: str,
    path: str,
    status: int,
    duration_ms: str,
    remote_addr: str | None,
) -> str:
    """A request's line as logs.JsonFormatter writes a RequestRecord: the same fields, in order.
    head is _line_head()'s; request_id, message, method and path come JSON-encoded, and
    duration_ms as the number's text."""
    return (
        f'{{"time":"{logs.log_time(created)}{head}{request_id},"message":{message},'
        f'"method":{method},"path":{path},"status":{status},"duration_ms":{duration_ms},'
        f'"remote_addr":{"null" if remote_addr is None else _json_text(remote_addr)}}}'
    )


_MESSAGE = "%s %s %s %.1fms"
_LEVEL = logging.getLevelName(logging.INFO)
_LOGGER = log.name
_REQUEST_RECORD = {
    "name": _LOGGER,
    "msg": _MESSAGE,
    "levelno": logging.INFO,
    "levelname": _LEVEL,
    "pathname": __file__,
    "filename": os.path.basename(__file__),
    "module": os.path.splitext(os.path.basename(__file__))[0],  # as LogRecord derives it
    "funcName": "RequestLog",
    "lineno": 0,
    "exc_info": None,
    "exc_text": None,
    "stack_info": None,
    "thread": None,
    "threadName": None,
    "processName": None,
    "taskName": None,
}
_REQUEST_RECORD_FIELDS = len(vars(RequestRecord("GET", "/", 200, 0.0, None, "-", 0.0)))
_json_text = json.encoder.encode_basestring_ascii  # a str as JSON, as the formatter's encoder writes it
