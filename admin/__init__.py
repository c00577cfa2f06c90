"""The operator's dashboard under /admin: the money, a payment's story, a CSV for reconciling.

    GET  /admin/                       overview of a window (?window=hour|day|week|month)
    GET  /admin/transactions           search and filters (?q=&status=&reason=&from=&to=&page=)
    GET  /admin/transactions.csv       the same list as CSV (&full_phones=1 to unmask)
    GET  /admin/transactions/<id>      one payment and its whole history as a timeline
    POST /admin/reconcile              settle stale pending payments now (Payments.reconcile)
    GET|POST /admin/login, POST /admin/logout

Off (404) while ADMIN_TOKEN is unset, like the transactions API. Signing in takes the token
in a form and sets Flask's session cookie, scoped to /admin and also kept in the store, so
that signing out or a new ADMIN_TOKEN ends a session on every worker; every POST carries a
CSRF token; wrong tokens from one address lock it out for a while, on the bearer API as
here (lockout.py says how).

Numbers come from `store.overview` (per-time-bucket counters) and lists from `store.search`
(indexed), never from reading every record. Charts are SVG drawn here, each with a text
equivalent. Times are shown in Nairobi time (EAT).

One job per module, imports flowing one way (this package's __init__ on top):

    auth.py        who may look: the session and its cookie, CSRF, login/logout
    views.py       the pages: overview, transactions, CSV export, one payment, reconcile
    charts.py      the overview's numbers and its SVG charts' geometry (no Flask)
    formatting.py  how times, money, shares and names are written (no Flask)

The URL table is here, with what every page shares: the dashboard off without a token, no
caching or indexing, and the frame each template is drawn in (mode, sign-in state, CSRF).
"""

from __future__ import annotations

from flask import Blueprint, current_app, render_template, url_for

from admin import auth, views
from admin.auth import SessionInterface, admin_token, csrf_token, login_required, signed_in
from admin.charts import window_bounds

__all__ = ["bp", "init_app", "SessionInterface", "csrf_token", "login_required", "signed_in", "window_bounds"]

# The templates stay with the app's, one folder up from this package.
bp = Blueprint("admin", __name__, url_prefix="/admin", template_folder="../templates")


def init_app(app, settings) -> None:
    """Register the dashboard and the session settings it needs."""
    auth.init_app(app, settings)
    app.register_blueprint(bp)


def _dashboard_is_on():
    if not admin_token() or not current_app.secret_key:
        return render_template("admin_off.html", title="Dashboard off"), 404
    return None


def _private(response):
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Robots-Tag"] = "noindex"
    return response


def _frame() -> dict:
    """What every dashboard template is drawn with, besides its own values."""
    settings = current_app.extensions["settings"]
    mode = current_app.extensions["settings"].mpesa_env
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
    }


bp.before_request(_dashboard_is_on)
bp.after_request(_private)
bp.context_processor(_frame)
bp.add_url_rule("/login", view_func=auth.login, methods=["GET", "POST"])
bp.add_url_rule("/logout", view_func=auth.logout, methods=["POST"])
bp.add_url_rule("/", view_func=views.overview, methods=["GET"])
bp.add_url_rule("/transactions", view_func=views.transactions, methods=["GET"])
bp.add_url_rule("/transactions.csv", view_func=views.export, methods=["GET"])
bp.add_url_rule("/transactions/<payment_id>", view_func=views.transaction, methods=["GET"])
bp.add_url_rule("/reconcile", view_func=views.reconcile, methods=["POST"])
