"""The operator's dashboard under /admin: the money, a payment's story, a CSV for reconciling.

    GET  /admin/                       overview of a window (?window=hour|day|week|month)
    GET  /admin/transactions           search and filters (?q=&status=&reason=&from=&to=&page=)
    GET  /admin/transactions.csv       the same list as CSV (&full_phones=1 to unmask)
    GET  /admin/transactions/<id>      one payment and its whole history as a timeline
    POST /admin/reconcile              settle stale pending payments now (Payments.reconcile)
    GET|POST /admin/login, POST /admin/logout

Off (404) while ADMIN_TOKEN is unset, like the transactions API. Signing in takes the token
in a form and sets Flask's session cookie (HttpOnly, SameSite=Strict, Secure over HTTPS,
path /admin); the session is also kept in the store, so signing out ends it everywhere and a
new ADMIN_TOKEN ends every session. The session key is SECRET_KEY when set, else an HMAC of
ADMIN_TOKEN, so every worker agrees. Every POST carries a CSRF token from the session.
After ADMIN_LOGIN_FREE_TRIES wrong tokens from one address, each further try must wait
ADMIN_LOGIN_DELAY s, doubling up to ADMIN_LOGIN_MAX_DELAY: the count lives in the store, so
every worker sees it.

Numbers come from `store.overview` (per-time-bucket counters) and lists from `store.search`
(indexed), never from reading every record. Charts are SVG drawn here, each with a text
equivalent. Times are shown in Nairobi time (EAT).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import hmac
import io
import json
import logging
import math
import re
import secrets
import time
from datetime import date, datetime, timedelta
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    redirect,
    render_template,
    request,
    session,
    stream_with_context,
    url_for,
)
from flask.sessions import SecureCookieSessionInterface

import mpesa
from store import STATUSES, TALLY_UTC_OFFSET, Overview, Tally, Transaction

log = logging.getLogger(__name__)

bp = Blueprint("admin", __name__, url_prefix="/admin", template_folder="templates")

PAGE_SIZE = 25
EXPORT_CHUNK = 1000
MAX_EXPORT_ROWS = 100_000
SESSION_SECONDS = 12 * 3600
LOGIN_MEMORY = 15 * 60  # failed sign-ins are forgotten after this long without another
REASONS = {
    "cancelled": "Cancelled by the customer",
    "timeout": "Timed out",
    "insufficient_funds": "Not enough money",
    "wrong_pin": "Wrong PIN",
    "rejected": "Refused by M-Pesa (limits or set-up)",
    "error": "Other error",
}
SETTLED_BY = {"callback": "Callback from Daraja", "query": "Status query", "timeout": "Timed out (our verdict)"}
WINDOWS = {  # name: (label, length, step)
    "hour": ("Last hour", 3600, 300),
    "day": ("Last 24 hours", 86400, 3600),
    "week": ("Last 7 days", 7 * 86400, 86400),
    "month": ("Last 30 days", 30 * 86400, 86400),
}
DEFAULT_WINDOW = "day"
EVENT_LABELS = {
    "initiated": "Payment started",
    "push_accepted": "STK push accepted by Daraja",
    "query_received": "Status query answered by Daraja",
    "callback_received": "Callback received from Daraja",
    "completed": "Payment completed",
    "failed": "Payment failed",
    "timed_out": "Timed out: no answer from M-Pesa",
    "duplicate_ignored": "Repeated result ignored",
    "contradiction_ignored": "Contradicting result ignored",
    "receipt_added": "Receipt added by a late callback",
    "amount_mismatch": "Amount paid differs from the amount asked",
    "webhook_attempt": "Webhook sent to the shop",
    "webhook_delivered": "Webhook delivered",
    "webhook_given_up": "Webhook given up",
}
EVENT_TONES = {
    "completed": "good",
    "webhook_delivered": "good",
    "failed": "bad",
    "timed_out": "bad",
    "amount_mismatch": "bad",
    "webhook_given_up": "bad",
    "contradiction_ignored": "warn",
    "duplicate_ignored": "warn",
}
CSV_COLUMNS = (
    "Receipt",
    "Completed (EAT)",
    "Phone",
    "Amount (KES)",
    "Reference",
    "Status",
    "Reason",
    "Checkout request ID",
    "Started (EAT)",
    "Description",
)


# ------------------------------------------------------------------ set-up


def init_app(app, settings) -> None:
    """Register the dashboard and the session settings it needs."""
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
    app.register_blueprint(bp)


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


def _token() -> str | None:
    return current_app.extensions["settings"].admin_token


@bp.before_request
def _dashboard_is_on():
    if not _token() or not current_app.secret_key:
        abort(404)


@bp.after_request
def _private(response):
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Robots-Tag"] = "noindex"
    return response


# ------------------------------------------------------------- signing in


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _binding() -> str:
    """Ties a session to the current ADMIN_TOKEN: a new token ends every session."""
    return hmac.new(_token().encode(), b"session", hashlib.sha256).hexdigest()[:32]


def _session_slot(sid: str) -> str:
    return "admin-session:" + hashlib.sha256(sid.encode()).hexdigest()


def signed_in() -> bool:
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
        **_context(
            title="Form expired",
            heading="This form has expired",
            message="The page was open too long or came from elsewhere. Go back, reload the page and try again.",
        ),
    ), 403


def login_required(view):
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


def _throttle_slot() -> str:
    address = request.remote_addr or "unknown"
    return "admin-login:" + hashlib.sha256(address.encode()).hexdigest()[:32]


def _wait_left(state: dict | None, now: float) -> float:
    return max(0.0, (state or {}).get("until", 0.0) - now)


def _record_failure(state: dict | None, now: float) -> dict:
    failures = (state or {}).get("failures", 0) + 1
    settings = current_app.extensions["settings"]
    over = failures - settings.admin_login_free_tries
    until = 0.0
    if over >= 0:
        until = now + min(settings.admin_login_delay * 2**over, settings.admin_login_max_delay)
    state = {"failures": failures, "until": until}
    _store().set_value(_throttle_slot(), state, LOGIN_MEMORY + max(0.0, until - now))
    return state


def _safe_next(target: str | None) -> str:
    if target and target.startswith("/admin") and "//" not in target and "\\" not in target:
        return target
    return url_for("admin.overview")


@bp.route("/login", methods=["GET", "POST"])
def login():
    target = _safe_next(request.values.get("next"))
    if request.method == "GET":
        if signed_in():
            return redirect(target)
        return _login_page(target)
    if not _csrf_ok():
        return _login_page(target, "The sign-in form expired. Enter the token again.", 400)
    now = time.time()
    store = _store()
    state = store.get_value(_throttle_slot())
    wait = _wait_left(state, now)
    if wait > 0:
        log.warning(
            "admin: sign-in from %s refused: %d failed tries, wait %.0f s", request.remote_addr, state["failures"], wait
        )
        return _login_page(
            target,
            f"Too many wrong tokens. Wait {math.ceil(wait)} seconds before trying again.",
            429,
            {"Retry-After": str(math.ceil(wait))},
        )
    given = request.form.get("token", "")
    if not hmac.compare_digest(_digest(given), _digest(_token())):
        state = _record_failure(state, now)
        log.warning("admin: wrong token from %s (%d in a row)", request.remote_addr, state["failures"])
        wait = _wait_left(state, now)
        message = "That token is not right."
        if wait > 0:
            message += f" Wait {math.ceil(wait)} seconds before trying again."
        return _login_page(target, message, 401)
    store.delete(_throttle_slot())
    sid = secrets.token_urlsafe(32)
    store.set_value(_session_slot(sid), {"at": now}, SESSION_SECONDS)
    session.clear()  # a new session and CSRF token: nothing carried over from before
    session.permanent = True
    session.update(sid=sid, bound=_binding(), csrf=secrets.token_urlsafe(32))
    log.info("admin: signed in from %s", request.remote_addr)
    return redirect(target, code=303)


def _login_page(target: str, error: str | None = None, status: int = 200, headers=None):
    html = render_template("admin_login.html", **_context(next=target, error=error, title="Sign in"))
    return html, status, headers or {}


@bp.post("/logout")
def logout():
    if signed_in() and not _csrf_ok():
        return _refuse_csrf()
    sid = session.get("sid")
    if sid:
        _store().delete(_session_slot(sid))
    session.clear()
    return redirect(url_for("admin.login"), code=303)


# ------------------------------------------------------------------ views


@bp.get("/")
@login_required
def overview():
    name = request.args.get("window", DEFAULT_WINDOW)
    if name not in WINDOWS:
        name = DEFAULT_WINDOW
    label, length, step = WINDOWS[name]
    since, until = window_bounds(time.time(), length, step)
    found = _store().overview(since, until, step)
    return render_template(
        "admin_overview.html",
        **_context(
            title="Overview",
            window=name,
            windows=WINDOWS,
            window_label=label,
            view=overview_view(found),
            charts=charts(found),
            retention_note=_retention_note(length),
        ),
    )


@bp.get("/transactions")
@login_required
def transactions():
    search, form, problems = read_filters(request.args)
    page = _page_number(request.args.get("page"))
    found, total = _store().search(**search, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    pages = max(1, math.ceil(total / PAGE_SIZE))
    if page > pages:  # past the end (the list shrank, or a hand-made link): the last page
        page = pages
        found, total = _store().search(**search, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    links = {}
    filters = {k: v for k, v in form.items() if v}
    if page > 1:
        links["newer"] = url_for("admin.transactions", **filters, page=page - 1)
    if page < pages:
        links["older"] = url_for("admin.transactions", **filters, page=page + 1)
    return render_template(
        "admin_transactions.html",
        **_context(
            title="Transactions",
            form=form,
            problems=problems,
            rows=[row_view(tx) for tx in found],
            total=total,
            page=page,
            pages=pages,
            links=links,
            reasons=REASONS,
            statuses=STATUSES,
            export_limit=MAX_EXPORT_ROWS,
            filtered=bool(filters),
        ),
    )


@bp.get("/transactions.csv")
@login_required
def export():
    search, form, problems = read_filters(request.args)
    full_phones = request.args.get("full_phones") in ("1", "on", "true")
    # Payments started from now on are left out, so paging cannot shift under the export.
    search["until"] = min(search["until"] or math.inf, time.time())
    store = _store()
    log.info("admin: CSV export from %s (%s phones)", request.remote_addr, "full" if full_phones else "masked")

    def rows():
        yield "\ufeff" + _csv_line(CSV_COLUMNS)  # the BOM tells spreadsheets it is UTF-8
        offset = 0
        while offset < MAX_EXPORT_ROWS:
            found, _ = store.search(**search, limit=min(EXPORT_CHUNK, MAX_EXPORT_ROWS - offset), offset=offset)
            for tx in found:
                yield _csv_line(csv_row(tx, full_phones))
            if len(found) < EXPORT_CHUNK:
                break
            offset += len(found)

    stamp = datetime.now(mpesa.NAIROBI).strftime("%Y%m%d-%H%M")
    return Response(
        stream_with_context(rows()),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="mpesa-payments-{stamp}.csv"'},
    )


@bp.get("/transactions/<checkout_id>")
@login_required
def transaction(checkout_id):
    tx = _store().get(checkout_id)
    if tx is None:
        return render_template(
            "admin_message.html",
            **_context(
                title="Not found",
                heading="No such payment",
                message=f"No payment has the checkout request ID {checkout_id!r}; it may have expired from the store.",
            ),
        ), 404
    return render_template(
        "admin_transaction.html",
        **_context(
            title=f"Payment {tx.mpesa_receipt_number or tx.checkout_request_id}",
            tx=tx,
            row=row_view(tx),
            timeline=timeline(tx),
            callback=_pretty(tx.callback) if tx.callback else None,
            extra=_pretty(tx.extra) if tx.extra else None,
        ),
    )


@bp.post("/reconcile")
@login_required
def reconcile():
    payments = current_app.extensions["payments"]
    settled = payments.reconcile()
    log.info("admin: reconcile from %s settled %d payment(s)", request.remote_addr, len(settled))
    return render_template(
        "admin_reconcile.html",
        **_context(
            title="Stale payments settled", rows=[row_view(tx) for tx in settled], ttl=payments.settings.transaction_ttl
        ),
    )


# ----------------------------------------------------------- the overview


def window_bounds(now: float, length: int, step: int) -> tuple[float, float]:
    """[since, until) of `length` s ending with the step now falls in (Nairobi-aligned)."""
    until = (math.floor((now + TALLY_UTC_OFFSET) / step) + 1) * step - TALLY_UTC_OFFSET
    return float(until - length), float(until)


def overview_view(found: Overview) -> dict:
    """The numbers on the overview, each ready to show."""
    total = found.total
    final = total.completed + total.failed
    settled = total.group("settled")
    queries = total["event:queried"] + total["event:query_received"]
    query_errors = total["event:queried:error"]
    calls = total["event:push_accepted"] + queries
    reasons = [
        {
            "reason": reason,
            "label": REASONS.get(reason, _humane(reason)),
            "count": count,
            "share": _percent(count, total.failed),
        }
        for reason, count in sorted(total.group("reason").items(), key=lambda item: (-item[1], item[0]))
    ]
    return {
        "started": total.started,
        "completed": total.completed,
        "failed": total.failed,
        "pending": total.pending,
        "received": kes(total.received),
        "conversion": _percent(total.completed, total.started),
        "median": _duration(total.time_to_final(0.5)),
        "p95": _duration(total.time_to_final(0.95)),
        "final": final,
        "settled": [
            {"by": by, "label": label, "count": settled.get(by, 0), "share": _percent(settled.get(by, 0), final)}
            for by, label in SETTLED_BY.items()
        ],
        "reasons": reasons,
        "queries": queries,
        "query_errors": query_errors,
        "query_error_rate": _percent(query_errors, queries),
        "daraja_calls": calls,
        "daraja_error_rate": _percent(query_errors, calls),
        "system_failures": total["reason:error"] + total["reason:rejected"],
        "mismatches": total["flag:amount_mismatch"],
        "late_results": total["flag:late_result"],
        "ignored_callbacks": total["event:duplicate_ignored"] + total["event:contradiction_ignored"],
        "callbacks": total["event:callback_received"],
        "since": nairobi(found.since, "%d %b %Y %H:%M"),
        "until": nairobi(found.until, "%d %b %Y %H:%M"),
    }


def _retention_note(length: int) -> str | None:
    store = _store()
    retention = current_app.extensions["settings"].retention_seconds
    if store.kind == "sqlite" or length <= retention:
        return None
    return (
        f"The {store.kind} store keeps payments for {_duration(retention, rough=True)} "
        "(RETENTION_SECONDS): older ones are not counted here. Use the SQLite store, or "
        "a longer retention, to see further back."
    )


def _bucket_label(start: float, step: float, count: int) -> str:
    if step >= 86400:
        return nairobi(start, "%a %d" if count <= 7 else "%d %b")
    return nairobi(start, "%H:%M")


def charts(found: Overview) -> dict:
    """Geometry and text equivalents of the three SVG charts."""
    rows = []
    for start, counts in found.buckets:
        rows.append(
            {
                "label": _bucket_label(start, found.step, len(found.buckets)),
                "long": nairobi(start, "%d %b %Y %H:%M"),
                "started": counts.started,
                "completed": counts.completed,
                "failed": counts.failed,
                "received": counts.received,
                "rate": counts.conversion,
            }
        )
    return {
        "rows": rows,
        "per": _per(found.step),
        "volume": volume_chart(rows, found.step),
        "success": success_chart(rows, found.step),
        "reasons": reasons_chart(found.total),
    }


WIDTH, HEIGHT = 480, 220
PLOT = {"left": 54, "right": 8, "top": 14, "bottom": 32}


def _nice_ceiling(value: float) -> int:
    if value <= 1:
        return 1
    power = 10 ** math.floor(math.log10(value))
    return int(next(step * power for step in (1, 2, 4, 6, 8, 10) if step * power >= value))


def _x_labels(rows: list[dict], x_of) -> list[dict]:
    """About six labels; every other one is "minor", left out on narrow screens."""
    every = max(1, math.ceil(len(rows) / 6))
    shown = [n for n in range(len(rows)) if n % every == 0]
    return [{"x": round(x_of(n), 1), "text": rows[n]["label"], "minor": k % 2 == 1} for k, n in enumerate(shown)]


def volume_chart(rows: list[dict], step: float) -> dict:
    """Bars of payments started per step, completed ones drawn over them."""
    plot_w = WIDTH - PLOT["left"] - PLOT["right"]
    plot_h = HEIGHT - PLOT["top"] - PLOT["bottom"]
    top = _nice_ceiling(max([row["started"] for row in rows] + [1]))
    slot = plot_w / max(1, len(rows))
    bar_w = max(1.0, slot * 0.7)
    base = PLOT["top"] + plot_h

    def x_of(n):
        return PLOT["left"] + slot * n + slot / 2

    def height(value):
        return plot_h * value / top

    bars = []
    for n, row in enumerate(rows):
        x = round(x_of(n) - bar_w / 2, 1)
        bars.append(
            {
                "x": x,
                "w": round(bar_w, 1),
                "started_y": round(base - height(row["started"]), 1),
                "started_h": round(height(row["started"]), 1),
                "completed_y": round(base - height(row["completed"]), 1),
                "completed_h": round(height(row["completed"]), 1),
                "tip": f"{row['long']}: {row['started']} started, {row['completed']} completed",
            }
        )
    busiest = max(rows, key=lambda row: row["started"]) if rows else None
    started = sum(row["started"] for row in rows)
    completed = sum(row["completed"] for row in rows)
    summary = f"{started} payments started and {completed} completed, {_per(step)}."
    if busiest and busiest["started"]:
        summary += f" Busiest: {busiest['long']} with {busiest['started']} started."
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "bars": bars,
        "base": base,
        "left": PLOT["left"],
        "right": WIDTH - PLOT["right"],
        "grid": _grid(top, plot_h, base, str),
        "labels": _x_labels(rows, x_of),
        "label_y": base + 18,
        "summary": summary,
    }


def success_chart(rows: list[dict], step: float) -> dict:
    """Completed / started per step as a line; steps without payments leave a gap."""
    plot_w = WIDTH - PLOT["left"] - PLOT["right"]
    plot_h = HEIGHT - PLOT["top"] - PLOT["bottom"]
    slot = plot_w / max(1, len(rows))
    base = PLOT["top"] + plot_h

    def x_of(n):
        return PLOT["left"] + slot * n + slot / 2

    lines, current, points = [], [], []
    for n, row in enumerate(rows):
        if row["rate"] is None:
            if current:
                lines.append(current)
            current = []
            continue
        point = (round(x_of(n), 1), round(base - plot_h * row["rate"], 1))
        current.append(point)
        points.append(
            {"x": point[0], "y": point[1], "tip": f"{row['long']}: {_percent(row['completed'], row['started'])}"}
        )
    if current:
        lines.append(current)
    rates = [row for row in rows if row["rate"] is not None]
    if rates:
        low = min(rates, key=lambda row: row["rate"])
        summary = (
            f"Share of payments completed, {_per(step)}, from "
            f"{_percent(low['completed'], low['started'])} at {low['long']} to "
            f"{max(_percent_value(row) for row in rates):.0f}%."
        )
    else:
        summary = "No payments in this window, so no success rate."
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "lines": [" ".join(f"{x},{y}" for x, y in line) for line in lines],
        "points": points,
        "base": base,
        "left": PLOT["left"],
        "right": WIDTH - PLOT["right"],
        "grid": _grid(100, plot_h, base, lambda value: f"{value}%"),
        "labels": _x_labels(rows, x_of),
        "label_y": base + 18,
        "summary": summary,
    }


def _percent_value(row: dict) -> float:
    return 100 * row["rate"]


def reasons_chart(total: Tally) -> dict:
    """Horizontal bars, each under its label: failed payments by reason, most common first."""
    reasons = sorted(total.group("reason").items(), key=lambda item: (-item[1], item[0]))
    label_h, bar_h, gap, right = 24, 18, 14, 60
    row_h = label_h + bar_h + gap
    height = max(1, len(reasons)) * row_h + gap
    top = max([count for _, count in reasons] + [1])
    span = WIDTH - right
    bars = []
    for n, (reason, count) in enumerate(reasons):
        y = gap + n * row_h
        w = max(round(span * count / top, 1), 1.0)
        bars.append(
            {
                "bar_y": y + label_h,
                "w": w,
                "label": REASONS.get(reason, _humane(reason)),
                "count": count,
                "label_y": y + label_h - 7,
                "count_y": y + label_h + bar_h - 3,
                "count_x": w + 8,
            }
        )
    parts = [f"{REASONS.get(reason, _humane(reason)).lower()} {count}" for reason, count in reasons]
    summary = "Failed payments by reason: " + ", ".join(parts) + "." if parts else "No failed payments in this window."
    return {"width": WIDTH, "height": height, "bars": bars, "bar_h": bar_h, "summary": summary}


def _grid(top: int, plot_h: float, base: float, label) -> list[dict]:
    """Lines at 0, half and the top of the scale; half only when it is a whole number."""
    shares = (0, 0.5, 1) if top % 2 == 0 else (0, 1)
    return [{"y": round(base - plot_h * share, 1), "text": label(round(top * share))} for share in shares]


def _per(step: float) -> str:
    return {300: "per 5 minutes", 3600: "per hour", 86400: "per day"}.get(int(step), "per step")


# ------------------------------------------------------------- the lists


def read_filters(args) -> tuple[dict, dict, list[str]]:
    """store.search() arguments, the form's values, and what was wrong with them."""
    problems = []
    form = {name: (args.get(name) or "").strip()[:100] for name in ("q", "status", "reason", "from", "to")}
    text = form["q"] or None
    if text:
        try:
            text = mpesa.normalize_phone(text)  # 0712 345 678 finds 254712345678
        except mpesa.InvalidInput:
            pass
    status = form["status"] or None
    if status not in (None, *STATUSES):
        problems.append(f"Unknown status {status!r}: showing every status.")
        status = form["status"] = None
    reason = form["reason"] or None
    if reason not in (None, *REASONS):
        problems.append(f"Unknown reason {reason!r}: showing every reason.")
        reason = form["reason"] = None
    since = _day_start(form, "from", problems)
    until = _day_start(form, "to", problems)
    if until is not None:
        until += 86400  # the whole "to" day
    if since is not None and until is not None and since >= until:
        problems.append("The first date is after the last: no dates applied.")
        since = until = None
    return (
        {"text": text, "status": status, "reason": reason, "since": since, "until": until},
        {k: v or "" for k, v in form.items()},
        problems,
    )


def _day_start(form: dict, name: str, problems: list[str]) -> float | None:
    value = form[name]
    if not value:
        return None
    try:
        day = date.fromisoformat(value)
    except ValueError:
        problems.append(f"{value!r} is not a date (YYYY-MM-DD): ignored.")
        form[name] = ""
        return None
    return datetime(day.year, day.month, day.day, tzinfo=mpesa.NAIROBI).timestamp()


def _page_number(raw: str | None) -> int:
    ok = raw is not None and raw.isascii() and raw.isdigit()  # not "²": int() refuses it
    return int(raw) if ok and 0 < int(raw) <= 100_000 else 1


def row_view(tx: Transaction) -> dict:
    return {
        "id": tx.checkout_request_id,
        "url": url_for("admin.transaction", checkout_id=tx.checkout_request_id),
        "started": nairobi(tx.initiated_at),
        "started_iso": _iso(tx.initiated_at),
        "finished": nairobi(tx.completed_at) if tx.completed_at else "",
        "phone": mpesa.mask_phone(tx.phone),
        "full_phone": tx.phone,
        "amount": kes(tx.amount),
        "reference": tx.account_reference,
        "description": tx.description,
        "status": tx.status,
        "reason": tx.reason or "",
        "reason_label": REASONS.get(tx.reason, _humane(tx.reason or "")),
        "receipt": tx.mpesa_receipt_number or "",
        "settled_by": SETTLED_BY.get(tx.settled_by, tx.settled_by or ""),
        "result": f"{tx.result_code}: {tx.result_desc}" if tx.result_code is not None else "",
        "flags": [_humane(flag) for flag in tx.flags],
    }


def csv_row(tx: Transaction, full_phone: bool) -> list:
    finished = tx.completed_at
    if tx.status == "completed" and tx.transaction_date:
        try:  # M-Pesa's own completion time: what its statement shows
            finished = datetime.fromisoformat(tx.transaction_date).timestamp()
        except ValueError:
            pass
    return [
        tx.mpesa_receipt_number or "",
        nairobi(finished, "%Y-%m-%d %H:%M:%S") if finished else "",
        tx.phone if full_phone else mpesa.mask_phone(tx.phone),
        tx.amount,
        tx.account_reference,
        tx.status,
        tx.reason or "",
        tx.checkout_request_id,
        nairobi(tx.initiated_at, "%Y-%m-%d %H:%M:%S"),
        tx.description,
    ]


def _csv_line(values) -> str:
    out = io.StringIO()
    csv.writer(out).writerow([guard_cell(value) for value in values])
    return out.getvalue()


def guard_cell(value):
    """Text a spreadsheet would run as a formula (= + - @, tab, CR first) gets a ' in front."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


# ------------------------------------------------------------ the timeline


def timeline(tx: Transaction) -> list[dict]:
    """Every history entry, oldest first, with a label; unknown events shown as they are."""
    entries = []
    for entry in sorted(tx.history, key=lambda item: item.get("at") or 0):
        name = str(entry.get("event") or "event")
        at = entry.get("at")
        details = [
            {"name": _humane(key), "value": _plain(value)}
            for key, value in entry.items()
            if key not in ("at", "event", "raw")
        ]
        entries.append(
            {
                "event": name,
                "label": _event_label(name, entry),
                "tone": (
                    "bad" if name == "queried" and entry.get("result") == "error" else EVENT_TONES.get(name, "info")
                ),
                "at": nairobi(at, "%d %b %Y %H:%M:%S") if isinstance(at, (int, float)) else "",
                "iso": _iso(at) if isinstance(at, (int, float)) else "",
                "offset": (
                    f"+{at - tx.initiated_at:.1f} s" if isinstance(at, (int, float)) and tx.initiated_at else ""
                ),
                "details": details,
                "raw": _pretty(entry["raw"]) if entry.get("raw") is not None else None,
            }
        )
    return entries


def _event_label(name: str, entry: dict) -> str:
    if name == "queried":
        return {"pending": "Status query: still being processed", "error": "Status query failed"}.get(
            entry.get("result"), "Status query sent"
        )
    return EVENT_LABELS.get(name, _humane(name))


def _humane(name: str) -> str:
    """resultCode, result_code -> Result code."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", str(name)).replace("_", " ").strip()
    return words[:1].upper() + words[1:].lower() if words else ""


def _plain(value) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return "" if value is None else str(value)


def _pretty(value) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)


# ------------------------------------------------------------ formatting


def nairobi(epoch: float | None, pattern: str = "%d %b %Y %H:%M:%S") -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, mpesa.NAIROBI).strftime(pattern)


def _iso(epoch: float | None) -> str:
    return datetime.fromtimestamp(epoch, mpesa.NAIROBI).isoformat() if epoch else ""


def kes(amount) -> str:
    return f"KES {amount:,}"


def _percent(part: int, whole: int) -> str:
    if not whole:
        return "–"
    return f"{100 * part / whole:.1f}%"


def _duration(seconds: float | None, rough: bool = False) -> str:
    if seconds is None:
        return "–"
    if seconds == math.inf:
        return "over an hour"
    if rough or seconds >= 3600:
        for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
            if seconds >= size:
                count = round(seconds / size)
                return f"{count} {unit}{'s' if count != 1 else ''}"
    if seconds >= 120:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def _context(**values) -> dict:
    settings = current_app.extensions["settings"]
    mode = settings.mpesa_env
    return {
        "mode": mode,
        "simulator_mode": mode == "simulator",
        "signed_in": signed_in(),
        "csrf_token": csrf_token,
        "page_config": {
            "shortcode": settings.shortcode,
            "mode": mode,
            "urls": {"overview": url_for("admin.overview"), "transactions": url_for("admin.transactions")},
        },
        **values,
    }
