"""The shop's web pages and, in simulator mode, the simulated handset's line to the simulator.

Pages: the pay page (``/`` and ``/pay.html``), the receipt (``/confirmation.html``), the
operator's test page (``/test.html``) and the simulated phone (``/handset.html``, simulator
mode only). Each page is a template plus one small ES module under ``static/js``; server
values reach the scripts through a ``<script type="application/json" id="page-config">``
block, so the strict Content-Security-Policy needs no inline script or style.

The handset cannot talk to the simulator itself (``connect-src 'self'``), so two routes
relay its calls: ``GET /simulator/prompts?phone=`` and
``POST /simulator/prompts/<checkout_id>/<pin|cancel|timeout>``. A simulator that cannot be
reached answers 503 ``{"success": false, "message": "Simulator unavailable"}``.

Reads only these fields of the settings (``current_app.extensions["settings"]``): ``mpesa_env``,
``base_url`` (the simulator's URL in simulator mode), ``max_amount``, ``usd_to_kes_rate`` and
``shortcode``.
"""

from __future__ import annotations

import logging

import requests
from flask import Blueprint, abort, current_app, jsonify, render_template, request, url_for

import mpesa
from config import Settings

log = logging.getLogger(__name__)

bp = Blueprint("pages", __name__, template_folder="templates")

SIMULATOR_TIMEOUT = (2, 5)  # (connect, read) seconds: the handset polls every second
HANDSET_ACTIONS = ("pin", "cancel", "timeout")
_UNAVAILABLE = {"success": False, "message": "Simulator unavailable"}


def _settings() -> Settings:
    return current_app.extensions["settings"]


def _simulator_mode() -> bool:
    return _settings().simulator


def _max_amount() -> int:
    return _settings().max_amount


def _page_config() -> dict:
    """What every page script needs to know: mode, limits and the URLs it calls."""
    root = request.script_root
    settings = _settings()
    rate = settings.usd_to_kes_rate
    config = {
        "mode": settings.mpesa_env,
        "maxAmount": _max_amount(),
        "usdToKesRate": float(rate) if rate else None,
        "shortcode": settings.shortcode,
        "promptSeconds": mpesa.PROMPT_SECONDS,
        "safaricomPrefixes": mpesa.SAFARICOM_PREFIXES,
        "urls": {
            # The API lives in server.py; its paths are part of the contract (API.md).
            "stkpush": root + "/stkpush",
            "status": root + "/stkpush/status",
            "health": root + "/health",
            "pay": url_for("pages.pay"),
            "confirmation": url_for("pages.confirmation"),
            "test": url_for("pages.test_page"),
        },
    }
    if _simulator_mode():
        config["urls"]["handset"] = url_for("pages.handset")
        config["urls"]["prompts"] = url_for("pages.simulator_prompts")
    return config


def _render(template: str, **context):
    return render_template(
        template,
        simulator_mode=_simulator_mode(),
        mode=_settings().mpesa_env,
        page_config=_page_config(),
        **context,
    )


@bp.get("/")
@bp.get("/pay.html")
def pay():
    """The pay form, prefilled from ?amount=&description=&accountReference=."""
    args = request.args
    amount_text = args.get("amount", "").strip()
    amount, amount_error = None, None
    if amount_text:
        try:
            amount = mpesa.validate_amount(amount_text, _max_amount())
        except mpesa.InvalidInput as exc:
            amount_error = f"The amount in this payment link is not valid: {exc.message}."
    description = args.get("description", "").strip()[:200]
    reference = args.get("accountReference", "").strip()[:100]
    return _render(
        "pay.html",
        amount=amount if amount is not None else amount_text,
        amount_locked=amount is not None,
        amount_error=amount_error,
        description=description,
        account_reference=reference,
    )


@bp.get("/confirmation.html")
def confirmation():
    """The receipt of one payment, read by the script from the status endpoint."""
    return _render("confirmation.html")


@bp.get("/test.html")
def test_page():
    """The operator's test page: connection test, test push, recent results."""
    return _render("test.html")


@bp.get("/handset.html")
def handset():
    """A simulated phone that shows the simulator's pending prompts."""
    if not _simulator_mode():
        abort(404)
    return _render("handset.html")


def _simulator_base() -> str | None:
    if not _simulator_mode():
        abort(404)
    base = _settings().base_url
    return base.rstrip("/") if base else None


def _relay(answer: requests.Response):
    try:
        body = answer.json()
    except ValueError:
        log.warning("simulator answered %s without JSON", answer.status_code)
        return jsonify(success=False, message="Simulator gave an unexpected answer"), 502
    return jsonify(body), answer.status_code


@bp.get("/simulator/prompts")
def simulator_prompts():
    """The pending prompts of one phone, from the simulator."""
    base = _simulator_base()
    try:
        phone = mpesa.normalize_phone(request.args.get("phone", ""))
    except mpesa.InvalidInput as exc:
        return jsonify(success=False, message=exc.message, field="phone"), 400
    if base is None:
        return jsonify(_UNAVAILABLE), 503
    try:
        answer = requests.get(
            f"{base}/simulator/prompts",
            params={"phone": phone, "status": "pending"},
            timeout=SIMULATOR_TIMEOUT,
        )
    except requests.RequestException as exc:
        log.warning("simulator unreachable: %s", type(exc).__name__)
        return jsonify(_UNAVAILABLE), 503
    return _relay(answer)


@bp.post("/simulator/prompts/<checkout_id>/<action>")
def simulator_act(checkout_id: str, action: str):
    """Answer a prompt as the phone's owner would: PIN, cancel, or let it time out."""
    base = _simulator_base()
    if action not in HANDSET_ACTIONS or not mpesa.ID_PATTERN.match(checkout_id):
        abort(404)
    if base is None:
        return jsonify(_UNAVAILABLE), 503
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        body = {}
    try:
        answer = requests.post(
            f"{base}/simulator/prompts/{checkout_id}/{action}",
            json=body,
            timeout=SIMULATOR_TIMEOUT,
        )
    except requests.RequestException as exc:
        log.warning("simulator unreachable: %s", type(exc).__name__)
        return jsonify(_UNAVAILABLE), 503
    log.info("handset %s on %s: simulator answered %s", action, mpesa.mask_checkout_id(checkout_id), answer.status_code)
    return _relay(answer)
