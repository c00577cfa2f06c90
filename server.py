"""The M-Pesa payment server: create_app() builds the Flask application.

It wires the rooms together: the JSON API (api.py, API.md), the pages (pages.py), the
operator's dashboard (admin/), one error handler per kind of error, and the reconcile
command. `python server.py` runs the development server; the Procfile runs uWSGI through
serve.py. Both build the app with app_from_environment(), which also starts
the process's background upkeep (upkeep.py).
"""

from __future__ import annotations

import atexit
import logging
import secrets
import socket
import sys
from contextlib import suppress
from dataclasses import replace

import click
from flask import Flask, current_app, jsonify, request
from flask_cors import CORS
from werkzeug.exceptions import HTTPException, LengthRequired, RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.serving import make_server
from werkzeug.wsgi import get_content_length

import api
import checkout
import mpesa
import pages
import simulator
import upkeep
from api import SERVICE_NAME, ApiError, get_payments
from config import ConfigError, Settings, load_settings
from payments import Payments
from store import Store, open_store
from telemetry import requestlog
from telemetry.logs import configure_logging

log = logging.getLogger("server")

MAX_BODY_BYTES = 64 * 1024


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
            411: "Content-Length is required: a body sent in chunks is not accepted",
            413: f"Request body too large (limit {MAX_BODY_BYTES // 1024} KB)",
            429: "Too many requests; slow down",
        }
        body = {"success": False, "message": messages.get(error.code, error.name)}
        # The exception's own headers (a 405's Allow, a 429's Retry-After), not its HTML type.
        headers = {name: value for name, value in error.get_headers() if name.lower() != "content-type"}
        return jsonify(body), error.code, headers

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        log.exception("unexpected error on %s %s", request.method, requestlog.loggable_path(request.path))
        return jsonify({"success": False, "message": "Internal error; the payment state is unchanged"}), 500


def limit_body() -> None:
    """Refuse a body over MAX_BODY_BYTES with a 413, and a body sent in chunks with a 411.

    The declared length is checked without reading: werkzeug's own limit (MAX_CONTENT_LENGTH)
    would read every body through a counting wrapper, which costs a status poll twice what this
    check does (docs/design.md). A body sent in chunks declares no length, and uWSGI hands the
    app none of it (WSGI has no way to say how long it is), so it is refused under every server
    alike: answering it as an empty body would be wrong.
    """
    environ = request.environ
    if "HTTP_TRANSFER_ENCODING" in environ:
        raise LengthRequired()
    length = get_content_length(environ)
    if length is not None and length > MAX_BODY_BYTES:
        raise RequestEntityTooLarge()


# --------------------------------------------------------------- the factory


def create_app(
    settings: Settings | None = None, *, daraja: mpesa.Daraja | None = None, store: Store | None = None
) -> Flask:
    """Build the application; ready-made parts may be passed in (tests do)."""
    settings = settings or load_settings()
    app = Flask(__name__)
    app.config.update(JSON_SORT_KEYS=False)
    app.json.sort_keys = False
    app.before_request(limit_body)
    app.wsgi_app = requestlog.RequestLog(app.wsgi_app)
    if settings.trusted_proxies:  # outside RequestLog: it logs the corrected address and scheme
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies)

    if settings.callback_url is None:
        settings = replace(settings, callback_url=f"http://127.0.0.1:{settings.port}")
    store = store or open_store(settings.store_url, retention=settings.retention_seconds)
    if settings.callback_token is None:  # simulator mode: one made-up token, shared by every worker
        settings = replace(settings, callback_token=shared_secret(store, "callback-token"))
    counters = counter_store(settings, store)
    if daraja is None:
        tokens = mpesa.SharedTokenCache(counters) if counters.kind != "memory" else mpesa.TokenCache()
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
            settings.webhook_secrets,
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

    if settings.frontend_urls:  # otherwise same origin only, and no CORS work per request
        CORS(
            app,
            origins=list(settings.frontend_urls),
            resources={r"/stkpush*": {}, r"/health": {}, r"/catalog": {}, r"/static/js/*": {}},
            allow_headers=["Content-Type", "Idempotency-Key", "X-Request-ID"],
            expose_headers=["Retry-After", "Idempotent-Replayed", "X-Request-ID"],
        )
    api.init_app(app, settings, counters)
    register_handlers(app)
    app.register_blueprint(pages.bp)
    import admin  # the operator's dashboard at /admin (off while ADMIN_TOKEN is unset)

    admin.init_app(app, settings)

    @app.cli.command("reconcile")
    def reconcile_command():
        """Query every payment still pending past its TTL and settle it."""
        settled = get_payments().reconcile()
        for tx in settled:
            # Printed output ends up in logs (Heroku Scheduler): the opaque payment id, never
            # the CheckoutRequestID, which ends with the payer's number (and is the payment
            # id of records made before payment ids: masked, then).
            print(f"{mpesa.mask_checkout_id(tx.payment_id)} {tx.status} {tx.reason or ''}".rstrip())
        print(f"{len(settled)} payment(s) settled")
        notifier = current_app.extensions.get("webhooks")
        if notifier is not None:
            # Events a crashed or restarted process left unsent, and those queued just now.
            resent = notifier.redeliver_pending(wait=30)
            finished = notifier.flush(0)
            notifier.close()
            print(f"{resent} webhook event(s) re-sent" + ("" if finished else "; some still pending"))

    return app


def counter_store(settings: Settings, store: Store) -> Store:
    """Where rate-limit counters and the Daraja token live: the shared Redis when there is one
    (the store's own, else REDIS_URL's), else the store itself."""
    if settings.redis_url is not None and store.kind != "redis":
        return open_store(settings.redis_url, retention=settings.retention_seconds)
    return store


SHARED_SECRET_SECONDS = 30 * 86400


def shared_secret(store: Store, name: str) -> str:
    """A secret made up once and kept in the store, so that every worker and restart agree on it."""
    key, made = f"secret:{name}", {"value": secrets.token_urlsafe(24)}
    if not store.add(key, made, SHARED_SECRET_SECONDS):
        kept = store.get_value(key)
        if kept:
            return kept["value"]
        store.set_value(key, made, SHARED_SECRET_SECONDS)  # it expired just now
    return made["value"]


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
        f"  Store:      {app.extensions['store'].kind}" + store_origin(settings),
        f"  Limits:     {limits_description(settings)}",
    ]
    if settings.simulator:
        lines.append(f"  Phone:      {base}/handset.html  (the simulated handset; PIN {simulator.SIM_PIN})")
    if settings.admin_token_made_up:
        lines.append(f"  Dashboard:  {base}/admin/  (token for this run: {settings.admin_token})")
    elif settings.admin_token:
        lines.append(f"  Dashboard:  {base}/admin/  (sign in with ADMIN_TOKEN)")
    else:
        lines.append("  Dashboard:  off; set ADMIN_TOKEN (16+ characters) to open it at /admin/")
    lines.append("Press Ctrl+C to stop.")
    return "\n".join(lines)


def store_origin(settings: Settings) -> str:
    """' (from DATABASE_URL)' when the store came from a platform's setting, not STORE_URL or the default."""
    return f" (from {settings.store_origin})" if settings.store_origin in ("DATABASE_URL", "REDIS_URL") else ""


def limits_description(settings: Settings) -> str:
    """Where rate-limit counters and the Daraja token are kept, for the start-up lines."""
    if settings.redis_url is None and settings.store_kind == "memory":
        return "rate limits and the Daraja token in this process's memory"
    return f"rate limits and the Daraja token in {settings.limits_kind}, shared by every worker"


def start_background_work(app: Flask) -> upkeep.Upkeep | None:
    """Start the upkeep rounds of a serving process (unless UPKEEP_SECONDS is 0); stop at exit.

    At exit the upkeep stops first, then the webhook sender, which lets an attempt under way
    finish, so that a server stopped in the ordinary way leaves no delivery lock behind.
    """
    settings: Settings = app.extensions["settings"]
    sender = app.extensions.get("webhooks")
    if sender is not None:
        atexit.register(sender.close)
    if not settings.upkeep_seconds:
        return None
    tasks: list[upkeep.Task] = [("reconcile payments", app.extensions["payments"].reconcile)]
    if sender is not None:
        tasks.append(("redeliver webhooks", sender.redeliver_pending))
    running = upkeep.Upkeep(app.extensions["store"], tasks, settings.upkeep_seconds)
    running.start()
    atexit.register(running.stop)  # atexit runs the last registered first
    app.extensions["upkeep"] = running
    return running


def app_from_environment(*, demo: bool = False) -> Flask:
    """Load .env, read the settings, build the app and start its upkeep; a bad setting exits with one line.

    demo (python server.py): in simulator mode without ADMIN_TOKEN, make one up for this run so
    that the dashboard opens; the banner shows it, when the banner is printed as text.
    """
    from dotenv import load_dotenv

    load_dotenv()
    try:
        settings = load_settings()
        if demo and settings.simulator and settings.admin_token is None and settings.log_format == "text":
            settings = replace(settings, admin_token=secrets.token_urlsafe(18), admin_token_made_up=True)
        configure_logging(settings.log_format)
        app = create_app(settings)
    except ConfigError as error:
        sys.exit(f"Configuration error: {error}")
    # `flask --app server reconcile` builds the app here too: a command does that work itself.
    if click.get_current_context(silent=True) is None:
        start_background_work(app)
    return app


_app = None


def __getattr__(name):
    # `server:app` (flask --app server) builds the application on first use, not at import,
    # so that importing this module (tests, tools) starts nothing.
    global _app
    if name == "app":
        if _app is None:
            _app = app_from_environment()
        return _app
    raise AttributeError(name)


def serve(application: Flask) -> None:
    """Run the development server (`python server.py`): bind first, then say where it listens."""
    settings: Settings = application.extensions["settings"]
    host = "0.0.0.0" if settings.mpesa_env != "simulator" else "127.0.0.1"
    try:
        listener = socket.create_server((host, settings.port))
    except OSError as error:
        sys.exit(
            f"Cannot listen on port {settings.port} ({error.strerror}): another server may be using it. "
            f"Stop it, or choose another port: PORT={settings.port + 1} make run"
        )
    server = make_server(host, settings.port, application, threaded=True, fd=listener.fileno())
    listener.close()  # the server holds its own copy of the socket
    # A simulator shared with other processes (SIMULATOR_PORT) is started by whoever starts the server.
    shared = None
    if settings.simulator_port:
        try:
            shared = simulator.start_process(port=settings.simulator_port)
        except RuntimeError as error:
            server.server_close()
            sys.exit(f"Configuration error: SIMULATOR_PORT={settings.simulator_port}: {error} (is the port taken?)")
    if settings.log_format == "json":
        log.info(banner(application))
    else:
        print(banner(application), flush=True)
    try:
        with suppress(KeyboardInterrupt):  # Ctrl+C: the way to stop it
            server.serve_forever()
    finally:
        server.server_close()
        if shared is not None:
            shared.stop()


if __name__ == "__main__":
    serve(app_from_environment(demo=True))
