"""The M-Pesa payment server: create_app() builds the Flask application.

Routes (API.md): POST /stkpush, POST /stkpush/status, GET /stkpush/status/<id>,
GET /health, POST /hooks/stk/<token> (Daraja's callback), GET /transactions[/<id>]
(admin), GET /metrics and /stats (monitoring, see telemetry/metrics.py), and the pages from
pages.py. `python server.py` runs the development server; the Procfile runs gunicorn
with gunicorn.conf.py.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import ipaddress
import json
import logging
import re
import sys
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime

import segno
from flask import Flask, current_app, jsonify, request
from flask_cors import CORS
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

import checkout
import mpesa
import pages
import simulator
from config import ConfigError, Settings, load_settings
from payments import Payments, SoldOut, settled_for_good
from store import Store, Transaction, open_store
from telemetry import metrics, requestlog
from telemetry.logs import configure_logging

log = logging.getLogger("server")

SERVICE_NAME = "M-Pesa Payment Server"
MAX_BODY_BYTES = 64 * 1024
IDEMPOTENCY_TTL = 24 * 3600
CHECKOUT_ID = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


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


def nairobi_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, mpesa.NAIROBI).strftime("%Y-%m-%d %H:%M:%S EAT")


def iso_utc(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ------------------------------------------------------------------ answers


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


def status_answer(tx: Transaction) -> dict:
    """The poll answer for one payment (phone masked: anyone with the id may poll)."""
    base = {
        "checkoutRequestId": tx.checkout_request_id,
        "status": tx.status,
        "amount": tx.amount,
        "currency": tx.currency,
        "phone": mpesa.mask_phone(tx.phone),
        "accountReference": tx.account_reference,
        **order_fields(tx),
    }
    if tx.status == "completed":
        return {
            "success": True,
            **base,
            "transaction_id": tx.mpesa_receipt_number,
            "MpesaReceiptNumber": tx.mpesa_receipt_number,
            "description": tx.description,
            "completedAt": iso_utc(tx.completed_at),
            "transactionDate": tx.transaction_date,
            "message": "Payment completed",
        }
    if tx.status == "failed":
        if "amount_mismatch" in tx.flags:
            message = "The amount paid does not match the amount asked; contact the shop"
        elif tx.reason == "timeout" and tx.settled_by == "timeout":
            message = "The payment timed out: no answer from the phone"
        else:
            message = mpesa.result_reason(tx.result_code)[1]
        return {"success": False, **base, "reason": tx.reason, "resultCode": tx.result_code, "message": message}
    return {"success": True, **base, "message": "Waiting for user to complete payment"}


def admin_view(tx: Transaction) -> dict:
    data = tx.to_dict()
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
    status, message = next(
        (answer for kind, answer in DARAJA_ANSWERS.items() if isinstance(error, kind)),
        DARAJA_ANSWERS[mpesa.DarajaRequestError],  # any other DarajaError: a refused request
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


# ------------------------------------------------------------------- routes


def register_api(app: Flask, limiter: Limiter | NoRateLimits, settings: Settings) -> None:

    def phone_key() -> str:
        body = read_json()
        try:
            return "phone:" + mpesa.normalize_phone((body or {}).get("phone"))
        except (mpesa.InvalidInput, AttributeError):
            return "phone:invalid"

    def counts_as_prompt(response) -> bool:
        return response.status_code == 200 and not response.headers.get("Idempotent-Replayed")

    def is_replay() -> bool:
        # A retry of a finished Idempotency-Key sends no prompt: it is never limited.
        key = request.headers.get("Idempotency-Key", "").strip()
        first = get_store().get_value(idempotency_slot(key)) if key else None
        return bool(first) and first.get("state") == "done"

    @app.post("/stkpush")
    @limiter.limit(settings.rate_limit_push_per_ip, deduct_when=counts_as_prompt, exempt_when=is_replay)
    @limiter.limit(
        settings.rate_limit_push_per_phone, key_func=phone_key, deduct_when=counts_as_prompt, exempt_when=is_replay
    )
    def stkpush():
        body = read_json()
        if body is None:
            raise ApiError(400, "Request body must be JSON", field="body")
        key = request.headers.get("Idempotency-Key")
        if key is None:
            answer, status = start_payment(body)
            return jsonify(answer), status
        return idempotent(key.strip(), body)

    @app.post("/stkpush/status")
    @limiter.limit(settings.rate_limit_status_per_ip)
    def status_post():
        body = read_json() or {}
        checkout_id = None
        if isinstance(body, dict):
            checkout_id = next(
                (body[k] for k in ("checkoutRequestId", "checkoutRequestID", "CheckoutRequestID") if k in body), None
            )
        return status_for(checkout_id)

    @app.get("/stkpush/status/<checkout_id>")
    @limiter.limit(settings.rate_limit_status_per_ip)
    def status_get(checkout_id):
        return status_for(checkout_id)

    @app.post("/hooks/stk/<token>")
    @limiter.exempt
    def daraja_callback(token):
        if not hmac.compare_digest(token.encode(), settings.callback_token.encode()):
            log.warning("callback with a wrong token from %s refused", request.remote_addr)
            metrics.callback("bad_token")
            raise ApiError(403, "Forbidden")
        if settings.callback_allowed_ips and not address_allowed(request.remote_addr, settings.callback_allowed_ips):
            log.warning("callback from %s refused: not in CALLBACK_ALLOWED_IPS", request.remote_addr)
            metrics.callback("not_allowed")
            raise ApiError(403, "Forbidden")
        body = read_json()
        try:
            get_payments().handle_callback(body)
        except mpesa.MalformedCallback as error:
            log.warning("malformed callback refused: %s", error)
            metrics.callback("malformed")
            return jsonify({"ResultCode": 1, "ResultDesc": f"Rejected: {error}"}), 400
        return jsonify({"ResultCode": 0, "ResultDesc": "Accepted"})

    metrics.preset_labels()

    @app.get("/metrics")
    @limiter.exempt
    def prometheus_metrics():
        require_admin()
        body, content_type = metrics.render(request.headers.get("Accept"), settings.metrics_dir)
        return current_app.response_class(body, content_type=content_type)

    @app.get("/stats")
    @limiter.exempt
    def stats():
        if not settings.simulator:
            require_admin()
        return jsonify({"success": True, **metrics.stats(settings.metrics_dir)})

    @app.get("/health")
    @limiter.exempt
    def health():
        answer = {
            "status": "ok",
            "timestamp": iso_utc(time.time()),
            "service": SERVICE_NAME,
            "mode": settings.mpesa_env,
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

    @app.get("/catalog")
    @limiter.limit(settings.rate_limit_status_per_ip)
    def catalog():
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

    @app.get("/tickets/<number>/qr.svg")
    @limiter.limit(settings.rate_limit_status_per_ip)
    def ticket_qr(number):
        if get_payments().ticket(number) is None:
            raise ApiError(404, "Ticket not found")
        svg = io.BytesIO()
        segno.make_qr(number, error="m").save(svg, kind="svg", scale=6, border=2, title=f"Ticket {number}")
        return current_app.response_class(
            svg.getvalue(), mimetype="image/svg+xml", headers={"Cache-Control": "private, max-age=86400"}
        )

    @app.post("/tickets/<number>/check-in")
    def ticket_check_in(number):
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

    @app.get("/openapi.json")
    @limiter.exempt
    def openapi():
        return current_app.send_static_file("openapi.json")

    @app.get("/transactions")
    def transactions():
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

    @app.get("/transactions/<checkout_id>")
    def transaction(checkout_id):
        require_admin()
        tx = get_store().get(checkout_id)
        if tx is None:
            raise ApiError(404, "Transaction not found", status="not_found")
        return jsonify({"success": True, "transaction": admin_view(tx)})


def start_payment(body) -> tuple[dict, int]:
    """Validate, price, push, record; return the JSON answer and its status (errors raise)."""
    payments = get_payments()
    payment = payments.prepare(body)
    try:
        tx, accepted = payments.start(payment)
    except SoldOut as sold_out:
        raise ApiError(409, str(sold_out), field="items", itemId=sold_out.item.id) from None
    except mpesa.DarajaError as error:
        raise daraja_error(error) from None
    answer = {
        "success": True,
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
    """Stripe-style Idempotency-Key: a retry gets the first answer and sends no prompt."""
    if not key or len(key) > 255:
        raise ApiError(400, "Idempotency-Key must be 1 to 255 characters", field="Idempotency-Key")
    store = get_store()
    slot = idempotency_slot(key)
    fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    if not store.add(slot, {"fingerprint": fingerprint, "state": "started"}, IDEMPOTENCY_TTL):
        first = store.get_value(slot) or {}
        if first.get("fingerprint") != fingerprint:
            raise ApiError(
                409, "This Idempotency-Key was already used with a different request", field="Idempotency-Key"
            )
        if first.get("state") != "done":
            raise ApiError(409, "A request with this Idempotency-Key is still in progress", field="Idempotency-Key")
        response = jsonify(first["answer"])
        response.status_code = first["status"]
        response.headers["Idempotent-Replayed"] = "true"
        return response
    try:
        answer, status = start_payment(body)
    except ApiError as error:
        if error.status == 504:
            # The prompt may be on its way: a retry must not send a second one.
            store.set_value(
                slot,
                {"fingerprint": fingerprint, "state": "done", "status": error.status, "answer": error.body},
                IDEMPOTENCY_TTL,
            )
        else:
            store.delete(slot)  # nothing reached the phone; the same key may try again
        raise
    except Exception:
        store.delete(slot)
        raise
    store.set_value(
        slot, {"fingerprint": fingerprint, "state": "done", "status": status, "answer": answer}, IDEMPOTENCY_TTL
    )
    return jsonify(answer), status


def status_for(checkout_id):
    if not isinstance(checkout_id, str) or not CHECKOUT_ID.match(checkout_id.strip()):
        raise ApiError(400, "checkoutRequestId is required", field="checkoutRequestId")
    checkout_id = checkout_id.strip()
    answers: FinalAnswers = current_app.extensions["final_answers"]
    body = answers.get(checkout_id)
    if body is not None:
        return current_app.response_class(body, mimetype="application/json")
    tx = get_payments().status(checkout_id)
    if tx is None:
        raise ApiError(404, "Transaction not found", status="not_found")
    response = jsonify(status_answer(tx))
    if settled_for_good(tx):
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
        self._answers: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    def get(self, checkout_id: str) -> bytes | None:
        kept = self._answers.get(checkout_id)
        if kept is None:
            return None
        body, until = kept
        if self._clock() >= until:
            self._answers.pop(checkout_id, None)
            return None
        return body

    def keep(self, tx: Transaction, body: bytes) -> None:
        if tx.completed_at is None:
            return
        until = tx.completed_at + self._retention
        if self._clock() >= until:
            return
        with self._lock:
            self._answers[tx.checkout_request_id] = (body, until)
            while len(self._answers) > self._size:
                del self._answers[next(iter(self._answers))]


def address_allowed(address: str | None, networks) -> bool:
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    return any(ip in network for network in networks)


def require_admin() -> None:
    token = current_app.extensions["settings"].admin_token
    if not token:
        raise ApiError(404, "Not found")
    given = request.headers.get("Authorization", "")
    expected = f"Bearer {token}"
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, "Admin token required", headers={"WWW-Authenticate": "Bearer"})


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


# ---------------------------------------------------------- errors and logs


def register_handlers(app: Flask) -> None:

    @app.errorhandler(ApiError)
    def api_error(error: ApiError):
        return jsonify(error.body), error.status, error.headers

    @app.errorhandler(mpesa.InvalidInput)
    def invalid_input(error: mpesa.InvalidInput):
        return jsonify({"success": False, "message": error.message, "field": error.field}), 400

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        messages = {
            404: "Not found",
            405: "Method not allowed",
            413: f"Request body too large (limit {MAX_BODY_BYTES // 1024} KB)",
            429: "Too many requests; slow down",
        }
        body = {"success": False, "message": messages.get(error.code, error.name)}
        headers = dict(error.get_headers()) if error.code == 429 else {}
        headers.pop("Content-Type", None)
        return jsonify(body), error.code, headers

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        log.exception("unexpected error on %s %s", request.method, requestlog.loggable_path(request.path))
        return jsonify({"success": False, "message": "Internal error; the payment state is unchanged"}), 500


# --------------------------------------------------------------- the factory


def create_app(
    settings: Settings | None = None, *, daraja: mpesa.Daraja | None = None, store: Store | None = None
) -> Flask:
    """Build the application; ready-made parts may be passed in (tests do)."""
    settings = settings or load_settings()
    app = Flask(__name__)
    app.config.update(
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        JSON_SORT_KEYS=False,
        RATELIMIT_ENABLED=settings.ratelimit_enabled,
        RATELIMIT_HEADERS_ENABLED=True,
        RATELIMIT_STORAGE_URI=limiter_storage(settings.store_url),
        RATELIMIT_KEY_PREFIX="limits",
    )
    app.json.sort_keys = False
    app.wsgi_app = requestlog.RequestLog(app.wsgi_app)
    if settings.trusted_proxies:  # outside RequestLog: it logs the corrected address and scheme
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies)

    if settings.callback_url is None:
        settings = replace(settings, callback_url=f"http://127.0.0.1:{settings.port}")
    store = store or open_store(settings.store_url, retention=settings.retention_seconds)
    if daraja is None:
        # Several processes share a SQLite or Redis store: they share one token too.
        tokens = mpesa.SharedTokenCache(store) if store.kind != "memory" else mpesa.TokenCache()
        daraja, sim = build_daraja(settings, tokens)
        if sim is not None:
            app.extensions["simulator"] = sim
    if settings.simulator:  # the simulator in use, for the handset page and the banner
        settings = replace(settings, base_url=daraja.base_url)

    app.extensions["settings"] = settings
    app.extensions["store"] = store
    notifier = None
    if settings.merchant_webhook_url:
        import webhooks

        notifier = webhooks.WebhookSender(
            settings.merchant_webhook_url,
            settings.webhook_secret,
            store,
            max_attempts=settings.webhook_max_attempts,
            base_delay=settings.webhook_base_delay,
            max_delay=settings.webhook_max_delay,
        )
        app.extensions["webhooks"] = notifier
    catalog = None
    if settings.catalog_file:
        try:
            catalog = checkout.Catalog.load(settings.catalog_file)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    app.extensions["payments"] = Payments(
        store,
        daraja,
        settings,
        catalog=catalog,
        on_final=notifier.notify if notifier else None,
        on_settling=notifier.record if notifier else None,
    )
    app.extensions["final_answers"] = FinalAnswers(settings.retention_seconds, clock=app.extensions["payments"].clock)

    if settings.frontend_urls:  # otherwise same origin only, and no CORS work per request
        CORS(
            app,
            origins=list(settings.frontend_urls),
            resources={r"/stkpush*": {}, r"/health": {}, r"/catalog": {}, r"/static/js/*": {}},
            allow_headers=["Content-Type", "Idempotency-Key", "X-Request-ID"],
            expose_headers=["Retry-After", "Idempotent-Replayed", "X-Request-ID"],
        )
    if settings.ratelimit_enabled:
        limiter = Limiter(get_remote_address, app=app)
        app.extensions["rate_limiter"] = limiter  # Flask-Limiter holds itself only weakly
    else:
        limiter = NoRateLimits()
    register_api(app, limiter, settings)
    register_handlers(app)
    app.register_blueprint(pages.bp)
    import admin  # the operator's dashboard at /admin (off while ADMIN_TOKEN is unset)

    admin.init_app(app, settings)

    @app.cli.command("reconcile")
    def reconcile_command():
        """Query every payment still pending past its TTL and settle it."""
        settled = get_payments().reconcile()
        for tx in settled:
            # Printed output ends up in logs (Heroku Scheduler): ids masked like everywhere.
            print(f"{mpesa.mask_checkout_id(tx.checkout_request_id)} {tx.status} {tx.reason or ''}".rstrip())
        print(f"{len(settled)} payment(s) settled")
        notifier = current_app.extensions.get("webhooks")
        if notifier is not None:
            # Events a crashed or restarted process left unsent, and those queued just now.
            resent = notifier.redeliver_pending()
            delivered = notifier.flush(30)
            notifier.close()
            print(f"{resent} webhook event(s) re-sent" + ("" if delivered else "; some still pending"))

    return app


class NoRateLimits:
    """Stands in for Flask-Limiter under RATELIMIT_ENABLED=false: its decorators change nothing.

    (A disabled Flask-Limiter still inspects every decorated request.)
    """

    def limit(self, *args, **kwargs):
        return lambda view: view

    def exempt(self, view):
        return view


def limiter_storage(store_url: str) -> str:
    """Rate-limit counters live where the transactions live (memory for SQLite: one machine)."""
    return store_url if store_url.startswith(("redis://", "rediss://")) else "memory://"


def build_daraja(settings: Settings, token_cache=None) -> tuple[mpesa.Daraja, simulator.RunningSimulator | None]:
    """The Daraja client for the configured mode; starts the simulator when it is needed."""
    sim = None
    base_url = settings.base_url
    key, secret = settings.consumer_key, settings.consumer_secret
    if settings.simulator:
        key = key or simulator.SIM_CONSUMER_KEY
        secret = secret or simulator.SIM_CONSUMER_SECRET
        if base_url is None:
            sim = simulator.start(config=simulator.SimulatorConfig(shortcodes={settings.shortcode: settings.passkey}))
            base_url = sim.url
    elif base_url is None:
        base_url = mpesa.BASE_URLS[settings.mpesa_env]
    client = mpesa.Daraja(
        base_url=base_url,
        consumer_key=key,
        consumer_secret=secret,
        shortcode=settings.shortcode,
        passkey=settings.passkey,
        transaction_type=settings.transaction_type,
        party_b=settings.party_b,
        timeout=(3.05, settings.daraja_timeout),
        token_cache=token_cache,
    )
    return client, sim


def banner(app: Flask) -> str:
    settings: Settings = app.extensions["settings"]
    base = f"http://127.0.0.1:{settings.port}"
    lines = [
        f"{SERVICE_NAME} running",
        f"  Server:     {base}",
        f"  Pay page:   {base}/pay.html",
        f"  Test page:  {base}/test.html",
        f"  Shortcode:  {settings.shortcode} ({settings.transaction_type})",
        f"  Mode:       {settings.mpesa_env}"
        + (f" (Daraja simulator at {settings.base_url})" if settings.simulator else ""),
        f"  Store:      {app.extensions['store'].kind}",
    ]
    if settings.simulator:
        lines.append(f"  Phone:      {base}/handset.html  (the simulated handset; PIN {simulator.SIM_PIN})")
    return "\n".join(lines)


def app_from_environment() -> Flask:
    """Load .env, read the settings, build the app; a bad setting exits with one line."""
    from dotenv import load_dotenv

    load_dotenv()
    try:
        settings = load_settings()
        configure_logging(settings.log_format)
        return create_app(settings)
    except ConfigError as error:
        sys.exit(f"Configuration error: {error}")


_app = None


def __getattr__(name):
    # `gunicorn server:app` builds the application on first use, not at import,
    # so that importing this module (tests, tools) starts nothing.
    global _app
    if name == "app":
        if _app is None:
            _app = app_from_environment()
        return _app
    raise AttributeError(name)


if __name__ == "__main__":
    application = app_from_environment()
    settings = application.extensions["settings"]
    # A simulator shared with other processes (SIMULATOR_PORT) is started by whoever starts the server.
    shared = simulator.start_process(port=settings.simulator_port) if settings.simulator_port else None
    if settings.log_format == "json":
        log.info(banner(application))
    else:
        print(banner(application), flush=True)
    try:
        application.run(
            host="0.0.0.0" if settings.mpesa_env != "simulator" else "127.0.0.1",
            port=settings.port,
            threaded=True,
            use_reloader=False,
        )
    finally:
        if shared is not None:
            shared.stop()
