"""Who may use the dashboard: the session, its cookie, CSRF, login/logout.

Signing in takes ADMIN_TOKEN in a form and sets Flask's session cookie (HttpOnly,
SameSite=Strict, Secure over HTTPS, path /admin); the session is also kept in the store,
so signing out ends it everywhere and a new ADMIN_TOKEN ends every session. The session key
is SECRET_KEY when set, else an HMAC of ADMIN_TOKEN, so every worker agrees. Every POST
carries a CSRF token from the session. Wrong tokens count toward one lockout per client
address, shared with the bearer API (lockout.py): after ADMIN_LOGIN_FREE_TRIES of them each
further try must wait, even with the right token.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import secrets
import time
from datetime import timedelta
from urllib.parse import urlsplit

from flask import current_app, redirect, render_template, request, session, url_for
from flask.sessions import SecureCookieSessionInterface

import lockout

# Every dashboard line is logged as "admin", whichever module writes it, as before the split.
log = logging.getLogger("admin")

SESSION_SECONDS = 12 * 3600


def init_app(app, settings) -> None:
    """Set the session key and the session cookie's flags."""
    secret = getattr(settings, "secret_key", None)
    if secret:
        app.secret_key = secret
    elif settings.admin_token:
        app.secret_key = hmac.new(settings.admin_token.encode(), b"mpesa-admin-session-key", hashlib.sha256).hexdigest()
    # Only the dashboard uses Flask's session: its cookie is scoped to /admin.
    app.config.update(
        SESSION_COOKIE_NAME="mpesa_admin",
        SESSION_COOKIE_PATH="/admin",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=timedelta(seconds=SESSION_SECONDS),
    )
    app.session_interface = SessionInterface()


class SessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie session, marked Secure whenever the request came over HTTPS, and
    opened only on the dashboard's path, the only one its cookie is sent to.

    Flask opens the session of every request while a secret key is set: building the cookie's
    signer cost each status poll about a third of its in-process time with the dashboard on.
    Elsewhere the session is Flask's null session, which refuses to be written.
    """

    def open_session(self, app, request):
        path = self.get_cookie_path(app).rstrip("/")
        if request.path != path and not request.path.startswith(path + "/"):
            return self.make_null_session(app)
        return super().open_session(app, request)

    def get_cookie_secure(self, app) -> bool:
        return bool(app.config["SESSION_COOKIE_SECURE"] or request.is_secure)


def _store():
    return current_app.extensions["store"]


def admin_token() -> str | None:
    """ADMIN_TOKEN: the dashboard is off while it is unset."""
    return current_app.extensions["settings"].admin_token


def _binding() -> str:
    """Ties a session to the current ADMIN_TOKEN: a new token ends every session."""
    return hmac.new(admin_token().encode(), b"session", hashlib.sha256).hexdigest()[:32]


def _session_slot(sid: str) -> str:
    return "admin-session:" + hashlib.sha256(sid.encode()).hexdigest()


def signed_in() -> bool:
    """Whether this browser holds a live session bound to the current ADMIN_TOKEN."""
    sid = session.get("sid")
    if not sid or not hmac.compare_digest(str(session.get("bound", "")).encode(), _binding().encode()):
        return False
    return _store().get_value(_session_slot(sid)) is not None


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def _csrf_ok() -> bool:
    given = request.form.get("csrf_token", "")
    expected = session.get("csrf")
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        return False
    origin = request.headers.get("Origin")
    if origin and origin != "null":
        here = urlsplit(request.host_url)
        there = urlsplit(origin)
        return (there.scheme, there.netloc) == (here.scheme, here.netloc)
    return True


def _refuse_csrf():
    log.warning("admin: %s %s refused: missing or wrong CSRF token", request.method, request.path)
    return render_template(
        "admin_message.html",
        title="Form expired",
        heading="This form has expired",
        message="The page was open too long or came from elsewhere. Go back, reload the page and try again.",
    ), 403


def login_required(view):
    """Send a visitor who is not signed in to the sign-in page; refuse a POST without its CSRF token."""

    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        if not signed_in():
            if request.method == "GET":
                return redirect(url_for("admin.login", next=request.full_path.rstrip("?")))
            return redirect(url_for("admin.login"), code=303)
        if request.method == "POST" and not _csrf_ok():
            return _refuse_csrf()
        return view(*args, **kwargs)

    return wrapped


def _safe_next(target: str | None) -> str:
    if target and target.startswith("/admin") and "//" not in target and "\\" not in target:
        return target
    return url_for("admin.overview")


def login():
    """Show the sign-in form, or check the token sent and start a session."""
    target = _safe_next(request.values.get("next"))
    if request.method == "GET":
        if signed_in():
            return redirect(target)
        return _login_page(target)
    if not _csrf_ok():
        return _login_page(target, "The sign-in form expired. Enter the token again.", 400)
    verdict = lockout.try_token(request.form.get("token", ""))
    if verdict.outcome == "locked":
        log.warning(
            "admin: sign-in from %s refused: %d failed tries, wait %.0f s",
            request.remote_addr,
            verdict.failures,
            verdict.wait,
        )
        return _login_page(
            target,
            f"Too many wrong tokens. Wait {verdict.wait_seconds} seconds before trying again.",
            429,
            {"Retry-After": str(verdict.wait_seconds)},
        )
    if verdict.outcome == "wrong":
        log.warning("admin: wrong token from %s (%d in a row)", request.remote_addr, verdict.failures)
        message = "That token is not right."
        if verdict.wait > 0:
            message += f" Wait {verdict.wait_seconds} seconds before trying again."
        return _login_page(target, message, 401)
    now = time.time()
    store = _store()
    sid = secrets.token_urlsafe(32)
    store.set_value(_session_slot(sid), {"at": now}, SESSION_SECONDS)
    session.clear()  # a new session and CSRF token: nothing carried over from before
    session.permanent = True
    session.update(sid=sid, bound=_binding(), csrf=secrets.token_urlsafe(32))
    log.info("admin: signed in from %s", request.remote_addr)
    return redirect(target, code=303)


def _login_page(target: str, error: str | None = None, status: int = 200, headers=None):
    html = render_template("admin_login.html", next=target, error=error, title="Sign in")
    return html, status, headers or {}


def logout():
    """End the session here and in the store."""
    if signed_in() and not _csrf_ok():
        return _refuse_csrf()
    sid = session.get("sid")
    if sid:
        _store().delete(_session_slot(sid))
    session.clear()
    return redirect(url_for("admin.login"), code=303)
