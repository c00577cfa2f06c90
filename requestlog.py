"""What every answer gets, whoever gave it: a request id, security headers, metrics, one log line.

RequestLog wraps the Flask app as WSGI middleware, so it sees every answer: the routes', the
error handlers', the rate limiter's refusals and the static pages'. It adds its headers to the
list the app hands to start_response. Flask's before/after_request hooks did the same through
werkzeug's Headers and Flask's hook machinery: moving it here raised status-poll throughput by
about a tenth (README, Benchmarks).
"""
from __future__ import annotations

import logging
import os
import random
import re
import time

import metrics
from mpesa import mask_checkout_id

log = logging.getLogger("server")

ENVIRON_KEY = "mpesa.request_id"
REQUEST_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}")  # an incoming X-Request-ID we reuse
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; "
                           "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
                           "base-uri 'self'; form-action 'self'")
SECURITY_HEADERS = (("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
                    ("Referrer-Policy", "same-origin"),
                    ("Content-Security-Policy", CONTENT_SECURITY_POLICY))
HSTS = ("Strict-Transport-Security", "max-age=31536000")
_SECURITY_HEADERS = tuple((name.lower(), (name, value)) for name, value in SECURITY_HEADERS)
_WAIT_STATUSES = ("429", "503")  # the answers where Retry-After means something

# Request ids need to be unique, not secret: a generator of our own (reseeded in each forked
# worker) spares every request a system call for OS randomness, and leaves random's shared one alone.
_REQUEST_IDS = random.Random()
_pid = os.getpid()   # for the log line: LogRecord asks the system at every line


def _forked() -> None:
    global _pid
    _pid = os.getpid()
    _REQUEST_IDS.seed()


os.register_at_fork(after_in_child=_forked)


def _logging_started() -> float:
    probe = logging.LogRecord("", logging.INFO, "", 0, "", (), None)
    return probe.created - probe.relativeCreated / 1000


_LOGGING_STARTED = _logging_started()   # what LogRecord.relativeCreated counts from


class RequestLog:
    """WSGI middleware: X-Request-ID (the caller's if sane, else a new one), security headers,
    Retry-After only on 429 and 503, the request's metrics and its JSON log line.

    The id is in the WSGI environ under ENVIRON_KEY while the app runs, for the log lines made
    on the way (server.RequestIdFilter). Put it inside ProxyFix, which corrects REMOTE_ADDR and
    the scheme first. Flask calls start_response before it returns the body, inside the request
    context: the status and matched URL rule are known when the line is written, and the
    duration does not include sending the body.
    """

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        given = environ.get("HTTP_X_REQUEST_ID", "")
        request_id = given if REQUEST_ID.fullmatch(given) else f"{_REQUEST_IDS.getrandbits(128):032x}"
        environ[ENVIRON_KEY] = request_id
        answered = []   # (status, Flask's request): Flask drops environ's request once done

        def start(status, headers, exc_info=None):
            present = {name.lower() for name, _ in headers}
            if "retry-after" in present and status[:3] not in _WAIT_STATUSES:
                # Flask-Limiter's headers put Retry-After on every answer; only a refusal means wait.
                headers = [header for header in headers if header[0].lower() != "retry-after"]
            headers.extend(header for name, header in _SECURITY_HEADERS if name not in present)
            if environ.get("wsgi.url_scheme") == "https" and "strict-transport-security" not in present:
                headers.append(HSTS)
            headers.append(("X-Request-ID", request_id))
            answered.append((status, environ.get("werkzeug.request")))
            return start_response(status, headers, exc_info)

        body = self.app(environ, start)
        elapsed = time.perf_counter() - started
        status, served = answered[-1]
        status = int(status[:3])
        method = environ.get("REQUEST_METHOD", "")
        rule = getattr(served, "url_rule", None)
        metrics.request_served(method, rule.rule if rule else None, status, elapsed)
        path = loggable_path(served.path if served is not None else environ.get("PATH_INFO", ""))
        if log.isEnabledFor(logging.INFO):
            log.handle(RequestRecord(method, path, status, round(elapsed * 1000, 1),
                                     environ.get("REMOTE_ADDR"), request_id))
        return body


def loggable_path(path: str) -> str:
    """A request path with the callback secret and payers' numbers masked."""
    if path.startswith("/hooks/stk/"):
        return "/hooks/stk/***"
    return "/".join(mask_checkout_id(part) for part in path.split("/"))


class RequestRecord(logging.LogRecord):
    """The request's log line: a LogRecord made without LogRecord.__init__'s work.

    What is the same on every line (where it was logged; thread and process names, which the
    server does not collect) is copied in at once; LogRecord.__init__ works it out for every
    line, a large part of the line's cost. Its fields never change once made, so a handler may
    format it later (`immutable`: metrics.LineHandler does so on its writer thread).
    """

    immutable = True

    def __init__(self, method: str, path: str, status: int, duration_ms: float,
                 remote_addr: str | None, request_id: str):
        self.__dict__.update(_REQUEST_RECORD)   # %-style formats read the record's own fields only
        self.created = created = time.time()
        self.msecs = (created - int(created)) * 1000
        self.relativeCreated = (created - _LOGGING_STARTED) * 1000
        self.process = _pid
        self.args = (method, path, status, duration_ms)
        self.method, self.path, self.status, self.duration_ms = method, path, status, duration_ms
        self.remote_addr, self.request_id = remote_addr, request_id


_REQUEST_RECORD = {
    "name": log.name, "msg": "%s %s %s %.1fms", "levelno": logging.INFO,
    "levelname": logging.getLevelName(logging.INFO), "pathname": __file__,
    "filename": os.path.basename(__file__), "module": __name__, "funcName": "RequestLog", "lineno": 0,
    "exc_info": None, "exc_text": None, "stack_info": None,
    "thread": None, "threadName": None, "processName": None, "taskName": None,
}
