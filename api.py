"""The JSON API (API.md, static/openapi.json) as a Flask blueprint, registered by init_app().

    POST /stkpush                      start a payment; an Idempotency-Key makes a retry safe
    POST /stkpush/status               poll one payment: {"paymentId": ...} or {"checkoutRequestId": ...}
    GET  /stkpush/status/<id>          the same poll as a GET, by either id ("pay_…" is a payment id)
    POST /hooks/stk/<token>/<paymentId>  Daraja's callback (CALLBACK_TOKEN, CALLBACK_ALLOWED_IPS);
    POST /hooks/stk/<token>            without the id (pushes sent before payment ids): by CheckoutRequestID
    GET  /health                       liveness; ?deep=1 also fetches a Daraja token
    GET  /metrics, GET /stats          monitoring (metrics.py); admin token, /stats open in simulator mode
    GET  /catalog                      the shop's items and what is left of each
    GET  /tickets/<number>/qr.svg      a ticket's QR code
    POST /tickets/<number>/check-in    admin: let a ticket in once
    GET  /openapi.json                 the contract itself
    GET  /transactions[/<id>]          admin: list and read payments, phones unmasked

Rate limits (ratelimits.py, per client address unless said): a push counts against its
address and its phone only once a prompt was sent (a 200 that is not a replay), and a retry
of a finished Idempotency-Key is never limited; polls, the catalogue and QR codes share the
looser status limit, each route its own bucket; callbacks, health, monitoring, the contract
and the admin routes have none. init_app puts the limits on the views when
RATELIMIT_ENABLED is on (each decorator given the app's RateLimits); off, the views are left
bare. The phone's limit is keyed by a keyed hash of the number (phone_key), so no phone
reaches the logs or the counters' keys.

The admin routes (require_admin) take the ADMIN_TOKEN as a bearer token; wrong ones count
toward the same lockout as the dashboard's sign-in (lockout.py).

A view refuses with ApiError (HTTP status, JSON body, headers); server.py's error handler
writes it, like the 400 of mpesa.InvalidInput. A Daraja failure becomes 502, 503 or 504
(daraja_error) with a message safe to show a customer.

Idempotency-Key works as Stripe's: the first request with a key claims it in the store
(`add`, atomic), its answer is kept for a day and replayed to a retry with the same body,
marked Idempotent-Replayed; the same key with another body is a 409. A push whose prompt
may be on its way (a 504...) keeps its answer too. The claim names the payment id and holds
a lease: a retry after the lease gets the payment's current state when the first request
died (see idempotent). A poll of a payment settled for good is answered from FinalAnswers,
per process, without reading the store.

One module of some 630 lines because it is one room: the routes, their limits and the
answers they write are read together, and what lies under them already has its own module
(payments: the life cycle, store: the records, mpesa: Daraja, metrics: the counters).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import math
import re
import secrets
import threading
import time
from datetime import UTC, datetime
from typing import NoReturn

import segno
from flask import Blueprint, Flask, current_app, jsonify, request
from flask.typing import ResponseReturnValue

import lockout
import mpesa
import ratelimits
from config import Settings
from payments import PAYMENT_ID_PREFIX, Payments, PushFailed, SoldOut, new_payment_id, settled_for_good
from store import DuplicateTransaction, Store, Transaction
from telemetry import metrics
from telemetry.requestlog import loggable_path

# These lines have always been the server's: log filters and dashboards look for that name.
log = logging.getLogger("server")

SERVICE_NAME = "M-Pesa Payment Server"
IDEMPOTENCY_TTL = 24 * 3600
PHONE_KEY_SLOT = "ratelimit-phone-key"
PHONE_KEY_TTL = 10 * 365 * 24 * 3600  # for good: a new key only starts the phones' counts again
# Beyond Daraja's read timeout, what a first request may still take (a token fetch, the
# store): past it, a request that has not finished has died.
IDEMPOTENCY_LEASE_MARGIN = 30.0


class ApiError(Exception):
    """An answer other than success, with its HTTP status and JSON body."""

    def __init__(self, http_status: int, message: str, headers: dict | None = None, **fields):
        super().__init__(message)
        self.status = http_status
        self.body = {"success": False, "message": message, **fields}
        self.headers = headers or {}


def get_payments() -> Payments:
    return current_app.extensions["payments"]


def get_store() -> Store:
    return current_app.extensions["store"]


def get_settings() -> Settings:
    return current_app.extensions["settings"]


def init_app(app: Flask, settings: Settings, counters: Store) -> None:
    """Register the API on app, each route with its rate limits (when on, counted in counters), and its
    store of final answers."""
    payments = app.extensions["payments"]
    app.extensions["final_answers"] = FinalAnswers(settings.retention_seconds, clock=payments.clock)
    metrics.preset_labels()
    push_limits, poll_limits = (), ()
    if settings.ratelimit_enabled:
        limits = ratelimits.RateLimits(
            counters,
            {
                "push-ip": settings.rate_limit_push_per_ip,
                "push-phone": settings.rate_limit_push_per_phone,
                "status": settings.rate_limit_status_per_ip,
            },
            clock=payments.clock,
        )
        push_limits = (functools.partial(push_limited, limits=limits),)
        poll_limits = (functools.partial(poll_limited, limits=limits),)
    routes = (
        ("POST", "/stkpush", stkpush, push_limits),
        ("POST", "/stkpush/status", status_post, poll_limits),
        ("GET", "/stkpush/status/<payment_or_checkout_id>", status_get, poll_limits),
        ("POST", "/hooks/stk/<token>", daraja_callback, ()),
        ("POST", "/hooks/stk/<token>/<payment_id>", daraja_callback, ()),
        ("GET", "/metrics", prometheus_metrics, ()),
        ("GET", "/stats", stats, ()),
        ("GET", "/health", health, ()),
        ("GET", "/catalog", catalog, poll_limits),
        ("GET", "/tickets/<number>/qr.svg", ticket_qr, poll_limits),
        ("POST", "/tickets/<number>/check-in", ticket_check_in, ()),
        ("GET", "/openapi.json", openapi, ()),
        ("GET", "/transactions", transactions, ()),
        ("GET", "/transactions/<payment_or_checkout_id>", transaction, ()),
    )
    bp = Blueprint("api", __name__)
    for method, rule, view, limits in routes:
        for limit in limits:
            view = limit(view)
        bp.add_url_rule(rule, view_func=view, methods=[method])
    app.register_blueprint(bp)


def push_limited(view, limits: ratelimits.RateLimits):
    """RATE_LIMIT_PUSH_PER_IP and _PER_PHONE on a push view: looked at before, counted after a prompt."""

    @functools.wraps(view)
    def limited(*args, **kwargs) -> ResponseReturnValue:
        if is_replay():
            return view(*args, **kwargs)
        clients = (("push-ip", request.remote_addr or "-"), ("push-phone", phone_key()))
        verdict = ratelimits.tightest([limits.look(rule, key) for rule, key in clients])
        if not verdict.allowed:
            refuse(verdict, limits.clock())
        response = current_app.make_response(view(*args, **kwargs))
        if counts_as_prompt(response):
            verdict = ratelimits.tightest([limits.count(rule, key) for rule, key in clients])
        response.headers.update(verdict.headers(limits.clock()))
        return response

    return limited


def poll_limited(view, limits: ratelimits.RateLimits):
    """RATE_LIMIT_STATUS_PER_IP on a view, a window per route and client address, counted from
    shares. Only a refusal carries the X-RateLimit headers: a worker's count is an estimate."""

    @functools.wraps(view)
    def limited(*args, **kwargs) -> ResponseReturnValue:
        verdict = limits.poll("status", f"{view.__name__}:{request.remote_addr or '-'}")
        if not verdict.allowed:
            refuse(verdict, limits.clock())
        return view(*args, **kwargs)

    return limited


def refuse(verdict: ratelimits.Verdict, now: float) -> NoReturn:
    """Answer 429 for a spent window, saying when it ends."""
    log.info("rate limit of %s per window reached on %s", verdict.limit, request.endpoint)
    raise ApiError(429, "Too many requests; slow down", headers=verdict.headers(now))


def phone_key() -> str:
    """The per-phone limit's key: a keyed hash of the push's normalised phone, never the number,
    which would otherwise be written into the counters' keys in the store."""
    body = read_json()
    try:
        phone = mpesa.normalize_phone((body or {}).get("phone"))
    except (mpesa.InvalidInput, AttributeError):
        return "phone:invalid"
    return "phone:" + hmac.new(phone_key_secret(), phone.encode(), hashlib.sha256).hexdigest()[:32]


def phone_key_secret() -> bytes:
    """The key of phone_key's hash: random, made once and kept in the store, so that every
    worker (and every restart, on a durable store) hashes a phone alike."""
    secret = current_app.extensions.get("phone_key_secret")
    if secret is None:
        store = get_store()
        made = {"key": secrets.token_hex(32)}
        store.add(PHONE_KEY_SLOT, made, PHONE_KEY_TTL)
        secret = bytes.fromhex((store.get_value(PHONE_KEY_SLOT) or made)["key"])
        current_app.extensions["phone_key_secret"] = secret
    return secret


def counts_as_prompt(response) -> bool:
    """A push counts against its limits only when it sent a prompt."""
    return response.status_code == 200 and not response.headers.get("Idempotent-Replayed")


def is_replay() -> bool:
    """A retry of a finished Idempotency-Key sends no prompt: it is never limited."""
    key = request.headers.get("Idempotency-Key", "").strip()
    first = get_store().get_value(idempotency_slot(key)) if key else None
    return bool(first) and first.get("state") == "done"


def stkpush():
    """Start a payment: validate, price, push, record."""
    body = read_json()
    if body is None:
        raise ApiError(400, "Request body must be JSON", field="body")
    key = request.headers.get("Idempotency-Key")
    if key is None:
        answer, status = start_payment(body)
        return jsonify(answer), status
    return idempotent(key.strip(), body)


def status_post():
    """Poll one payment by the payment id, or the checkout request id, in the body."""
    body = read_json() or {}
    if isinstance(body, dict) and "paymentId" in body:
        return status_for(body["paymentId"], "paymentId")
    checkout_id = None
    if isinstance(body, dict):
        checkout_id = next(
            (body[k] for k in ("checkoutRequestId", "checkoutRequestID", "CheckoutRequestID") if k in body), None
        )
    return status_for(checkout_id, "checkoutRequestId")


def status_get(payment_or_checkout_id):
    """Poll one payment by either id in the path: a payment id starts with "pay_"."""
    return status_for(payment_or_checkout_id, id_field(payment_or_checkout_id))


def id_field(identifier: str) -> str:
    """Which id a bare id in a path is: "paymentId" (pay_…) or "checkoutRequestId"."""
    return "paymentId" if identifier.startswith(PAYMENT_ID_PREFIX) else "checkoutRequestId"


def daraja_callback(token, payment_id=None):
    """Take Daraja's result for a payment, from Daraja only."""
    settings = get_settings()
    if not hmac.compare_digest(token.encode(), settings.callback_token.encode()):
        log.warning("callback with a wrong token from %s refused", request.remote_addr)
        metrics.callback("bad_token")
        raise ApiError(403, "Forbidden")
    if settings.callback_allowed_ips and not address_allowed(request.remote_addr, settings.callback_allowed_ips):
        log.warning("callback from %s refused: not in CALLBACK_ALLOWED_IPS", request.remote_addr)
        metrics.callback("not_allowed")
        raise ApiError(403, "Forbidden")
    body = read_json()
    if payment_id is not None and not mpesa.ID_PATTERN.match(payment_id):
        payment_id = None  # not one of ours: the CheckoutRequestID will have to do
    try:
        get_payments().handle_callback(body, payment_id)
    except mpesa.MalformedCallback as error:
        log.warning("malformed callback refused: %s", error)
        metrics.callback("malformed")
        return jsonify({"ResultCode": 1, "ResultDesc": f"Rejected: {error}"}), 400
    return jsonify({"ResultCode": 0, "ResultDesc": "Accepted"})


def prometheus_metrics():
    """The metrics in Prometheus' (or OpenMetrics') text format, for the admin token."""
    require_admin()
    body, content_type = metrics.render(request.headers.get("Accept"), current_app.extensions["settings"].metrics_dir)
    return current_app.response_class(body, content_type=content_type)


def stats():
    """The counters as JSON: open in simulator mode, for the admin token otherwise."""
    if not get_settings().simulator:
        require_admin()
    return jsonify({"success": True, **metrics.stats(current_app.extensions["settings"].metrics_dir)})


def health():
    """Liveness, and with ?deep=1 whether Daraja gives this server a token."""
    answer = {
        "status": "ok",
        "timestamp": iso_utc(time.time()),
        "service": SERVICE_NAME,
        "mode": get_settings().mpesa_env,
        "store": get_store().kind,
    }
    if request.args.get("deep") not in (None, "", "0", "false"):
        try:
            metrics.timed("token", get_payments().daraja.access_token)()
            answer["daraja"] = "ok"
        except mpesa.DarajaError as error:
            answer.update(status="error", daraja="error", message=daraja_error(error).body["message"])
            return jsonify(answer), 503
    return jsonify(answer)


def catalog():
    """The shop's items, each with what is left to sell."""
    payments = get_payments()
    if payments.catalog is None:
        raise ApiError(404, "This shop has no catalogue")
    items = [
        {
            "id": item.id,
            "name": item.name,
            "price": item.price,
            "description": item.description,
            "kind": item.kind,
            "capacity": item.capacity,
            "available": payments.available(item),
        }
        for item in payments.catalog.items.values()
    ]
    return jsonify({"success": True, "currency": "KES", "items": items})


def ticket_qr(number):
    """A sold ticket's number as a QR code (SVG)."""
    if get_payments().ticket(number) is None:
        raise ApiError(404, "Ticket not found")
    svg = io.BytesIO()
    segno.make_qr(number, error="m").save(svg, kind="svg", scale=6, border=2, title=f"Ticket {number}")
    return current_app.response_class(
        svg.getvalue(), mimetype="image/svg+xml", headers={"Cache-Control": "private, max-age=86400"}
    )


def ticket_check_in(number):
    """Let a ticket in once; a second time is a 409 that says when it was used."""
    require_admin()
    ticket, first = get_payments().check_in(number)
    if ticket is None:
        raise ApiError(404, "Ticket not found")
    if first is not None:
        raise ApiError(
            409,
            f"Ticket already used at {nairobi_time(first['at'])}",
            ticket=ticket,
            checkedInAt=iso_utc(first["at"]),
        )
    return jsonify({"success": True, "message": "Ticket checked in", "ticket": ticket})


def openapi():
    """The OpenAPI document of this API."""
    return current_app.send_static_file("openapi.json")


def transactions():
    """Payments, newest first, filtered by status and phone, a page at a time."""
    require_admin()
    status = request.args.get("status") or None
    if status not in (None, "pending", "completed", "failed"):
        raise ApiError(400, "status must be pending, completed or failed", field="status")
    phone = request.args.get("phone") or None
    if phone:
        phone = mpesa.normalize_phone(phone)
    limit = _positive_int("limit", 20, maximum=100)
    page = _positive_int("page", 1, maximum=100_000)
    items, total = get_store().list(status=status, phone=phone, limit=limit, offset=(page - 1) * limit)
    return jsonify(
        {
            "success": True,
            "total": total,
            "page": page,
            "limit": limit,
            "transactions": [admin_view(tx) for tx in items],
        }
    )


def transaction(payment_or_checkout_id):
    """One payment's whole record, by either id."""
    require_admin()
    tx = get_store().get(payment_or_checkout_id) or get_store().find(payment_or_checkout_id)
    if tx is None:
        raise ApiError(404, "Transaction not found", status="not_found")
    return jsonify({"success": True, "transaction": admin_view(tx)})


def nairobi_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, mpesa.NAIROBI).strftime("%Y-%m-%d %H:%M:%S EAT")


def iso_utc(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def order_fields(tx: Transaction) -> dict:
    """The order number, lines and (once paid) tickets of a payment made for items."""
    order = tx.extra.get("order")
    if not order:
        return {}
    fields = {"orderNumber": order["number"], "items": order["items"]}
    if tx.status == "completed":
        fields["tickets"] = [
            {**ticket, "qr": f"/tickets/{ticket['number']}/qr.svg"} for ticket in tx.extra.get("tickets", [])
        ]
    return fields


def status_answer(tx: Transaction, order_status: str | None = None) -> dict:
    """The poll answer for one payment (phone masked: anyone with the id may poll).

    order_status is Payments.order_status(tx): "completed" once any attempt of the order was.
    """
    base = {
        "paymentId": tx.payment_id,
        "checkoutRequestId": tx.checkout_request_id,
        "orderId": tx.order_id,
        "status": tx.status,
        "orderStatus": order_status or tx.status,
        "amount": tx.amount,
        "currency": tx.currency,
        "phone": mpesa.mask_phone(tx.phone),
        "accountReference": tx.account_reference,
        **order_fields(tx),
    }
    if "unmatched" in tx.flags:
        base["unmatched"] = True
    if tx.status == "completed":
        return {
            "success": True,
            **base,
            "transaction_id": tx.mpesa_receipt_number,
            "MpesaReceiptNumber": tx.mpesa_receipt_number,
            # False when Daraja's callback carried no amount and only an STK Query confirmed the payment.
            "amountConfirmed": "amount_unconfirmed" not in tx.flags,
            "description": tx.description,
            "completedAt": iso_utc(tx.completed_at),
            "transactionDate": tx.transaction_date,
            "message": "Payment received, not matched to an order: contact the shop"
            if "unmatched" in tx.flags
            else "Payment completed",
        }
    if tx.status == "failed":
        if "amount_mismatch" in tx.flags:
            message = "The amount paid does not match the amount asked; contact the shop"
        elif tx.reason == "timeout" and tx.settled_by == "timeout":
            message = "The payment timed out: no answer from the phone"
        elif tx.reason == "unknown":
            message = "M-Pesa never said whether the prompt reached the phone; no payment was seen"
        elif tx.settled_by == "push":
            message = f"The payment request was refused: {_printable(tx.result_desc or 'no reason given')}"
        else:
            message = mpesa.result_reason(tx.result_code)[1]
        return {"success": False, **base, "reason": tx.reason, "resultCode": tx.result_code, "message": message}
    return {"success": True, **base, "message": "Waiting for user to complete payment"}


def admin_view(tx: Transaction) -> dict:
    data = tx.to_dict()
    data["paymentId"], data["orderId"] = tx.payment_id, tx.order_id
    data["initiatedAt"] = iso_utc(tx.initiated_at)
    data["completedAtIso"] = iso_utc(tx.completed_at)
    return data


DARAJA_ANSWERS = {
    mpesa.DarajaTimeout: (
        504,
        "M-Pesa did not answer in time. The prompt may still reach the phone: wait a minute before trying again",
    ),
    mpesa.DarajaRateLimited: (503, "M-Pesa is busy; try again in a minute"),
    mpesa.DarajaUnavailable: (503, "M-Pesa cannot be reached right now; try again shortly"),
    mpesa.DarajaBadResponse: (502, "M-Pesa sent an unexpected answer; try again shortly"),
    mpesa.DarajaAuthError: (502, "M-Pesa refused this server's credentials or configuration"),
    mpesa.DarajaRequestError: (502, "M-Pesa refused the request"),
}


def daraja_error(error: mpesa.DarajaError) -> ApiError:
    """Map a Daraja failure to 502/503/504 with a message safe to show a customer."""
    # A DarajaError of no listed kind is answered as a refused request.
    status, message = next(
        (answer for kind, answer in DARAJA_ANSWERS.items() if isinstance(error, kind)),
        DARAJA_ANSWERS[mpesa.DarajaRequestError],
    )
    if isinstance(error, mpesa.DarajaRequestError) and error.message:
        message = f"{message}: {_printable(error.message)}"
    headers = {}
    if isinstance(error, mpesa.DarajaRateLimited):
        headers["Retry-After"] = str(int(error.retry_after or 30))
    fields = {"errorCode": error.error_code} if error.error_code else {}
    return ApiError(status, message, headers=headers, **fields)


def _printable(text: str) -> str:
    return re.sub(r"[^\w .,:;'()\-/]", "", text)[:160]


def payment_ids(tx: Transaction | None) -> dict:
    """The ids an answer about a payment carries."""
    return {"paymentId": tx.payment_id, "orderId": tx.order_id} if tx is not None else {}


def start_payment(body, payment_id: str | None = None) -> tuple[dict, int]:
    """Validate, price, record, push; return the JSON answer and its status (errors raise)."""
    payments = get_payments()
    payment = payments.prepare(body)
    try:
        tx, accepted = payments.start(payment, payment_id)
    except SoldOut as sold_out:
        raise ApiError(
            409, str(sold_out), field="items", itemId=sold_out.item.id, **payment_ids(sold_out.payment)
        ) from None
    except PushFailed as failed:
        error = daraja_error(failed.error)
        # status says whether the prompt may still come (pending) or certainly will not (failed).
        error.body.update(payment_ids(failed.payment), status=failed.payment.status)
        raise error from None
    answer = {
        "success": True,
        **payment_ids(tx),
        "checkoutRequestId": tx.checkout_request_id,
        "merchantRequestId": tx.merchant_request_id,
        "status": tx.status,
        "message": "STK push sent successfully",
        "customerMessage": accepted.customer_message,
        "amount": tx.amount,
    }
    return {**answer, **order_fields(tx)}, 200


def idempotency_slot(key: str) -> str:
    return "idem:" + hashlib.sha256(key.encode()).hexdigest()


def idempotent(key: str, body) -> tuple:
    """Stripe-style Idempotency-Key: a retry gets the first answer and sends no second prompt.

    The slot names the payment id before the record exists, and holds a lease for as long
    as the first request can take (Daraja's read timeout and a margin). A retry answers the
    payment's current state as soon as Daraja (or a callback) has named the push or the
    payment is settled; while its push may still be in flight and the lease runs, it is a 409
    whose retryAfter says when the lease ends. Once the lease has passed, the first request
    died: the retry answers the payment's current state, or, when the record was never created (so nothing was sent),
    makes the push itself under the same payment id (should the first request come back to
    life, its record can no longer be created, and it answers the current state too).
    """
    if not key or len(key) > 255:
        raise ApiError(400, "Idempotency-Key must be 1 to 255 characters", field="Idempotency-Key")
    store, payments = get_store(), get_payments()
    slot = idempotency_slot(key)
    fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    lease = get_settings().daraja_timeout + IDEMPOTENCY_LEASE_MARGIN
    claim = {
        "fingerprint": fingerprint,
        "state": "started",
        "lease_until": payments.clock() + lease,
        "paymentId": new_payment_id(),
    }
    if not store.add(slot, claim, IDEMPOTENCY_TTL):
        first = store.get_value(slot) or {}
        if first.get("fingerprint") != fingerprint:
            raise ApiError(
                409, "This Idempotency-Key was already used with a different request", field="Idempotency-Key"
            )
        if first.get("state") == "done":
            return replayed(first["answer"], first["status"])
        current = payments.status(first["paymentId"]) if first.get("paymentId") else None
        # Daraja answered the push (or a callback did), or the payment is settled: whatever became of
        # the first request, the payment's state is the true answer. Else its push may be in flight.
        if current is not None and (current.checkout_request_id is not None or current.is_final):
            return replayed(status_answer(current, payments.order_status(current)), 200)
        left = first.get("lease_until", math.inf) - payments.clock()
        if not first.get("paymentId") or left > 0:
            raise ApiError(
                409,
                "A request with this Idempotency-Key is still in progress",
                field="Idempotency-Key",
                retryAfter=math.ceil(left) if math.isfinite(left) else 1,  # seconds until its lease ends
            )
        if current is not None:
            return replayed(status_answer(current, payments.order_status(current)), 200)
        claim = {**first, "lease_until": payments.clock() + lease}
        store.set_value(slot, claim, IDEMPOTENCY_TTL)
    payment_id = claim["paymentId"]
    try:
        answer, status = start_payment(body, payment_id)
    except DuplicateTransaction:
        current = payments.status(payment_id)
        if current is None:
            raise
        return replayed(status_answer(current, payments.order_status(current)), 200)
    except ApiError as error:
        if nothing_sent(payment_id):
            store.delete(slot)  # no prompt can come: the same key may try again
        else:  # the prompt may be on its way (a 504...): a retry must not send a second one
            store.set_value(
                slot, {**claim, "state": "done", "status": error.status, "answer": error.body}, IDEMPOTENCY_TTL
            )
        raise
    except Exception:
        if nothing_sent(payment_id):
            store.delete(slot)
        raise  # else the lease runs out and a retry answers the payment's state
    store.set_value(slot, {**claim, "state": "done", "status": status, "answer": answer}, IDEMPOTENCY_TTL)
    return jsonify(answer), status


def replayed(answer: dict, status: int):
    response = jsonify(answer)
    response.status_code = status
    response.headers["Idempotent-Replayed"] = "true"
    return response


def nothing_sent(payment_id: str) -> bool:
    """True when no prompt can have gone out for the payment: no record, or a refused push."""
    tx = get_store().get(payment_id)
    return tx is None or (tx.status == "failed" and tx.settled_by == "push")


def status_for(identifier, field: str):
    """The poll answer for a payment id or checkout request id (`field` says which): kept
    bytes once it can no longer change, else from the store."""
    if not isinstance(identifier, str) or not mpesa.ID_PATTERN.match(identifier.strip()):
        if field == "paymentId":
            raise ApiError(400, "paymentId must be a payment id", field="paymentId")
        raise ApiError(400, "paymentId or checkoutRequestId is required", field="checkoutRequestId")
    identifier = identifier.strip()
    answers: FinalAnswers = current_app.extensions["final_answers"]
    body = answers.get(identifier)
    if body is not None:
        return current_app.response_class(body, mimetype="application/json")
    payments = get_payments()
    if field == "paymentId" or id_field(identifier) == "paymentId":
        tx, order_status = payments.poll(identifier)
    else:
        tx, order_status = payments.poll(checkout_request_id=identifier)
    if tx is None or order_status is None:
        raise ApiError(404, "Transaction not found", status="not_found")
    response = jsonify(status_answer(tx, order_status))
    # A failed attempt's order may still be paid by another attempt: its answer may change.
    if settled_for_good(tx) and (order_status == "completed" or tx.order_id is None):
        answers.keep(tx, response.get_data())
    return response


class FinalAnswers:
    """The encoded poll answers of payments settled for good, kept by each process.

    Most polls ask about a payment that is already settled: a page or a shop's back end
    polls until it sees the verdict. Once payments.settled_for_good(tx) nothing changes that
    answer until the store forgets the record, `retention` seconds after its last write, so
    never before completed_at + retention: an answer is kept until then, and the oldest go
    first past `size` answers. The poll skips the store read and the encoding.
    """

    def __init__(self, retention: float, clock=time.time, size: int = 10_000):
        self._retention = retention
        self._clock = clock
        self._size = size
        # payment id -> (answer, kept until, checkout request id); polls may name either id
        self._answers: dict[str, tuple[bytes, float, str | None]] = {}
        self._by_checkout_id: dict[str, str] = {}
        self._lock = threading.Lock()

    def get(self, identifier: str) -> bytes | None:
        """The answer kept for a payment id or a checkout request id, if any."""
        payment_id = self._by_checkout_id.get(identifier, identifier)
        kept = self._answers.get(payment_id)
        if kept is None:
            return None
        body, until, _ = kept
        if self._clock() >= until:
            with self._lock:
                self._forget(payment_id)
            return None
        return body

    def keep(self, tx: Transaction, body: bytes) -> None:
        if tx.completed_at is None:
            return
        until = tx.completed_at + self._retention
        if self._clock() >= until:
            return
        with self._lock:
            self._answers[tx.payment_id] = (body, until, tx.checkout_request_id)
            if tx.checkout_request_id is not None:
                self._by_checkout_id[tx.checkout_request_id] = tx.payment_id
            while len(self._answers) > self._size:
                self._forget(next(iter(self._answers)))

    def _forget(self, payment_id: str) -> None:
        _, _, checkout_id = self._answers.pop(payment_id, (b"", 0.0, None))
        if checkout_id is not None:
            self._by_checkout_id.pop(checkout_id, None)


def address_allowed(address: str | None, networks) -> bool:
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    return any(ip in network for network in networks)


def require_admin() -> None:
    """Let the request through with `Authorization: Bearer <ADMIN_TOKEN>` only. A wrong token
    counts toward the lockout the dashboard's sign-in uses too (lockout.py), and a locked-out
    address is refused even the right one."""
    if not get_settings().admin_token:
        raise ApiError(404, "Not found")
    given = request.headers.get("Authorization")
    if given is None:
        raise ApiError(401, "Admin token required", headers={"WWW-Authenticate": "Bearer"})
    scheme, _, token = given.partition(" ")
    verdict = lockout.try_token(token if scheme.lower() == "bearer" else None)
    if verdict.outcome == "right":
        return
    path = loggable_path(request.path)
    wait = f" Wait {verdict.wait_seconds} seconds before trying again." if verdict.wait > 0 else ""
    if verdict.outcome == "locked":
        log.warning(
            "admin API: %s from %s refused: %d wrong tokens, wait %.0f s",
            path,
            request.remote_addr,
            verdict.failures,
            verdict.wait,
        )
        raise ApiError(429, "Too many wrong tokens." + wait, headers={"Retry-After": str(verdict.wait_seconds)})
    log.warning("admin API: wrong token on %s from %s (%d in a row)", path, request.remote_addr, verdict.failures)
    raise ApiError(401, "Wrong admin token." + wait, headers={"WWW-Authenticate": "Bearer"})


def _refuse_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text):
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


_STRICT_JSON = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def read_json():
    """The JSON body, or None when it is not JSON (strict: no NaN/Infinity, bounded nesting)."""
    if not request.is_json:
        return None
    try:
        data = request.get_data()
        # What json.loads does with bytes, with one decoder made once instead of per call.
        return _STRICT_JSON.decode(data.decode(json.detect_encoding(data), "surrogatepass"))
    except (ValueError, RecursionError):
        return None


def _positive_int(name: str, default: int, maximum: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    if not re.fullmatch(r"[0-9]{1,9}", raw) or not 1 <= int(raw) <= maximum:
        raise ApiError(400, f"{name} must be a whole number from 1 to {maximum}", field=name)
    return int(raw)
