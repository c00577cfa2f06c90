"""What every answer gets, whoever gave it: a request id, security headers, metrics, a log line.

RequestLog wraps the Flask app as WSGI middleware, so it sees every answer: the routes', the
error handlers', the rate limiter's refusals and the static pages'. It adds its headers to the
list the app hands to start_response, and once the app has answered it observes the request's
duration and logs its line (not for a successful poll: QUIET_ROUTES), in the thread that
served the request.
"""

from __future__ import annotations

import logging
import re
import secrets
import time

from mpesa import mask_phones
from telemetry import metrics
from telemetry.logs import ENVIRON_KEY

log = logging.getLogger("server")

# Routes polled every second or so (a payment's status, the simulated handset's prompts):
# counted in the metrics, but a successful poll writes no line, so the log shows what happened
# (the push, the callback, the queries a poll sends Daraja) rather than the polling.
QUIET_ROUTES = frozenset({"/stkpush/status", "/stkpush/status/<payment_or_checkout_id>", "/simulator/prompts"})
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


class RequestLog:
    """WSGI middleware: X-Request-ID (the caller's if sane, else a new one), security headers
    (API_SECURITY_HEADERS on JSON, SECURITY_HEADERS on the rest, HSTS over HTTPS) where the app
    set none of its own, the request's metrics and its log line (none for a successful poll).

    The id is in the WSGI environ under ENVIRON_KEY while the app runs, for the lines logged on
    the way (logs.RequestIdFilter). Put it inside ProxyFix, which corrects REMOTE_ADDR and the
    scheme first. Flask calls start_response before it returns the body, inside the request
    context: the status and matched URL rule are known when the line is logged, and the
    duration does not include sending the body.
    """

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        given = environ.get("HTTP_X_REQUEST_ID")
        request_id = given if given and REQUEST_ID.fullmatch(given) else secrets.token_hex(16)
        environ[ENVIRON_KEY] = request_id
        answered = {}

        def start(status, headers, exc_info=None):
            present = {name.lower(): value for name, value in headers}
            is_json = present.get("content-type", "").startswith("application/json")
            ours = API_SECURITY_HEADERS if is_json else SECURITY_HEADERS
            if environ.get("wsgi.url_scheme") == "https":
                ours += (HSTS,)
            for name, value in ours:
                if name.lower() not in present:
                    headers.append((name, value))
            headers.append(("X-Request-ID", request_id))
            answered["status"] = int(status[:3])
            answered["request"] = environ.get("werkzeug.request")  # Flask drops it from environ once done
            return start_response(status, headers, exc_info)

        body = self.app(environ, start)
        seconds = time.perf_counter() - started
        status, request = answered["status"], answered["request"]
        method = environ.get("REQUEST_METHOD", "")
        route = request.url_rule.rule if request is not None and request.url_rule else None
        metrics.request_served(method, route, status, seconds)
        if route not in QUIET_ROUTES or status >= 400:
            path = loggable_path(request.path if request is not None else environ.get("PATH_INFO", ""))
            duration_ms = round(seconds * 1000, 1)
            log.info(
                "%s %s %s %.1fms",
                method,
                path,
                status,
                duration_ms,
                extra={
                    "request_id": request_id,
                    "method": method,
                    "path": path,
                    "status": status,
                    "duration_ms": duration_ms,
                    "remote_addr": environ.get("REMOTE_ADDR"),
                },
            )
        return body


def loggable_path(path: str) -> str:
    """A request path with the callback secret and payers' numbers masked (a CheckoutRequestID's
    among them, or a phone number polled for as if it were an id)."""
    if path.startswith("/hooks/stk/"):
        return "/hooks/stk/***"
    return mask_phones(path)
