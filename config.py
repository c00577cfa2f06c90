"""Settings: read once from the environment (and .env) into one immutable object.

The only module that reads the environment. Names follow API.md; spellings common in other M-Pesa
guides are accepted as aliases. A missing or malformed setting raises ConfigError with one line naming
it, so start-up stops with that line instead of a stack trace at the first payment.

WEB_CONCURRENCY, the worker count, keeps the name Heroku's Python buildpack gives it.
PROMETHEUS_MULTIPROC_DIR is read by prometheus-client as well, which switches its multiprocess
mode on only if it is in the environment before prometheus_client is imported. So the command
that starts the server sets it (Procfile, Dockerfile), never the code, and this module checks it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

import mpesa
import ratelimits
import store

MODES = ("simulator", "sandbox", "production")
LOG_FORMATS = ("text", "json")
EXAMPLE_CATALOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "catalog.example.json")
# Addresses Daraja's callbacks are reported to come from (daraja-reference §4.5: the
# union of the two lists in circulation). Used only when CALLBACK_ALLOWED_IPS asks.
SAFARICOM_CALLBACK_IPS = (
    "196.201.214.200",
    "196.201.214.206",
    "196.201.213.114",
    "196.201.214.207",
    "196.201.214.208",
    "196.201.213.44",
    "196.201.212.127",
    "196.201.212.138",
    "196.201.212.129",
    "196.201.212.136",
    "196.201.212.74",
    "196.201.212.69",
    "196.201.212.128",
    "196.201.212.132",
)
SECRET_MIN_LENGTH = 16
MAKE_A_SECRET = " (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
# WEB_CONCURRENCY on a Heroku dyno when unset: what Heroku's Python buildpack picks for the 512 MB
# dynos (Eco, Basic, Standard-1X). A dyno reports the host's CPUs, not its own share of them.
HEROKU_WORKERS = 2
# Daraja is reported to refuse callback URLs containing these (daraja-reference §7.5).
REFUSED_CALLBACK_WORDS = ("m-pesa", "mpesa", "safaricom", "exec", "exe", "cmd", "sql", "query")


class ConfigError(ValueError):
    """A setting is missing or malformed; the message is one line naming it."""


@dataclass(frozen=True)
class Settings:
    mpesa_env: str = "simulator"
    base_url: str | None = None
    consumer_key: str = ""
    consumer_secret: str = field(default="", repr=False)
    shortcode: str = mpesa.SANDBOX_SHORTCODE
    passkey: str = field(default=mpesa.SANDBOX_PASSKEY, repr=False)
    transaction_type: str = mpesa.PAYBILL
    party_b: str | None = None
    callback_url: str | None = None
    # Unset in simulator mode: create_app makes one up and keeps it in the store for every worker.
    callback_token: str | None = field(default=None, repr=False)
    max_amount: int = 150_000
    store_url: str = field(default="memory://", repr=False)  # may hold a password
    store_origin: str = "default"  # the setting store_url came from: STORE_URL, DATABASE_URL or REDIS_URL
    # The Redis every process shares rate-limit counters and the Daraja token in; None: each process its own.
    redis_url: str | None = field(default=None, repr=False)
    transaction_ttl: int = 120
    retention_seconds: int = 86_400
    frontend_urls: tuple[str, ...] = ()
    admin_token: str | None = field(default=None, repr=False)
    admin_token_made_up: bool = False  # python server.py's demo made one up for this run
    secret_key: str | None = field(default=None, repr=False)  # signs /admin sessions
    merchant_webhook_url: str | None = None
    webhook_secrets: tuple[str, ...] = field(default=(), repr=False)  # each signs every event (rotation)
    webhook_max_attempts: int = 12
    webhook_base_delay: float = 1.0
    webhook_max_delay: float = 300.0
    upkeep_seconds: float = 15.0  # how often the background round runs (upkeep.py); 0: never
    port: int = 3001
    rate_limit_push_per_phone: str = "3/minute;10/hour"
    rate_limit_push_per_ip: str = "10/minute;100/hour"
    rate_limit_status_per_ip: str = "120/minute"
    ratelimit_enabled: bool = True
    usd_to_kes_rate: float | None = None
    query_interval: float = 5.0
    first_query_after: float = 20.0
    daraja_timeout: float = 15.0
    trusted_proxies: int = 0
    catalog_file: str | None = None
    pricing: str = "open"  # "open": amounts or items; "catalog": items only
    checkout_secret: str | None = field(default=None, repr=False)
    callback_allowed_ips: tuple = ()  # ip_network objects; empty: any source address
    # A Daraja simulator shared by the server's processes, which base_url then points at; the
    # command that starts the server starts it there (serve.py, python server.py).
    simulator_port: int | None = None
    log_format: str = "text"  # text | json
    workers: int = 1  # worker processes (WEB_CONCURRENCY)
    threads: int = 8  # threads per worker (WEB_THREADS; GUNICORN_THREADS, its earlier name, is read too)
    metrics_dir: str | None = None  # prometheus-client's multiprocess directory; None: each process counts alone
    admin_login_free_tries: int = 3  # wrong /admin tokens from one address before each try must wait
    admin_login_delay: float = 1.0  # the first wait, in seconds; it doubles with each wrong token
    admin_login_max_delay: float = 300.0

    @property
    def simulator(self) -> bool:
        return self.mpesa_env == "simulator"

    @property
    def store_kind(self) -> str:
        return self.store_url.split(":", 1)[0]

    @property
    def limits_kind(self) -> str:
        """Where rate-limit counters and the Daraja token are kept: Redis when there is one, else the store."""
        return "redis" if self.redis_url else self.store_kind


def _rate_limit(env, name: str, default: str) -> str:
    """A limit setting such as "10/minute;100/hour", checked here rather than at the first request."""
    text = _get(env, name) or default
    try:
        ratelimits.parse(text)
    except ratelimits.InvalidLimit as error:
        raise ConfigError(f"{name}: {error}") from None
    return text


def _get(env, *names: str) -> str | None:
    for name in names:
        value = env.get(name)
        if value is not None and value.strip() != "":
            return value.strip()
    return None


def _int(env, name: str, default: int, minimum: int = 0) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    if not re.fullmatch(r"\d+", raw) or int(raw) < minimum:
        raise ConfigError(f"{name} must be a whole number of at least {minimum} (got {raw!r})")
    return int(raw)


_Default = TypeVar("_Default", float, None)


def _float(env, name: str, default: _Default, allow_zero: bool = False) -> float | _Default:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number (got {raw!r})") from None
    if not (value >= 0 if allow_zero else value > 0) or value == float("inf"):
        raise ConfigError(f"{name} must be a number greater than {'or equal to ' if allow_zero else ''}0 (got {raw!r})")
    return value


def _upkeep_seconds(env) -> float:
    """UPKEEP_SECONDS: 0 turns the background rounds off; more often than each second only loads the store."""
    seconds = _float(env, "UPKEEP_SECONDS", 15.0, allow_zero=True)
    if 0 < seconds < 1:
        raise ConfigError(f"UPKEEP_SECONDS must be 0 (off) or at least 1 (got {_get(env, 'UPKEEP_SECONDS')!r})")
    return seconds


def _secret(env, name: str) -> str | None:
    """A secret the operator chooses: at least SECRET_MIN_LENGTH characters, or start-up stops.
    (Credentials Safaricom issues are taken as they come.)"""
    value = _get(env, name)
    if value is not None and len(value) < SECRET_MIN_LENGTH:
        raise ConfigError(f"{name} must be at least {SECRET_MIN_LENGTH} characters{MAKE_A_SECRET}")
    return value


def _bool(env, name: str, default: bool) -> bool:
    raw = _get(env, name)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false (got {raw!r})")


def parse_allowed_ips(raw: str | None) -> tuple:
    """'safaricom' and/or comma-separated addresses and CIDR ranges -> ip_network objects."""
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for part in (raw or "").split(","):
        part = part.strip()
        if not part:
            continue
        if part.lower() == "safaricom":
            networks.extend(ipaddress.ip_network(ip) for ip in SAFARICOM_CALLBACK_IPS)
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(f"CALLBACK_ALLOWED_IPS: {part!r} is not an address or CIDR range") from None
    return tuple(networks)


def check_callback_url(url: str, mode: str) -> str:
    """The public base URL Daraja will call; HTTPS and no refused words in production."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or " " in url:
        raise ConfigError(f"CALLBACK_URL must be an absolute http(s) URL (got {url!r})")
    if mode == "production" and parts.scheme != "https":
        raise ConfigError("CALLBACK_URL must use https in production")
    lowered = url.lower()
    for word in REFUSED_CALLBACK_WORDS:
        if word in lowered:
            raise ConfigError(f"CALLBACK_URL must not contain {word!r}: Daraja is reported to refuse such URLs")
    return url


def _directory(env, name: str) -> str | None:
    """A directory setting: made when missing, and writable. Set but blank is refused, not taken
    as unset: prometheus-client, which reads PROMETHEUS_MULTIPROC_DIR too, would take it for the
    working directory."""
    path = env.get(name)
    if path is None:
        return None
    if not path.strip():
        raise ConfigError(f"{name} is set but empty: unset it, or name a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{name}: cannot make the directory {path!r} ({error.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{name}: the directory {path!r} is not writable")
    return path


def _webhook_secrets(env) -> tuple[str, ...]:
    """WEBHOOK_SECRET: one secret, or several separated by commas while the shop moves to a new one."""
    secrets_given = tuple(part.strip() for part in (_get(env, "WEBHOOK_SECRET") or "").split(",") if part.strip())
    if any(len(secret) < SECRET_MIN_LENGTH for secret in secrets_given):
        raise ConfigError(f"WEBHOOK_SECRET: each secret must be at least {SECRET_MIN_LENGTH} characters{MAKE_A_SECRET}")
    return secrets_given


def default_log_format() -> str:
    """LOG_FORMAT when unset: text lines for a person at a terminal, JSON lines for whatever collects them."""
    return "text" if sys.stdout is not None and sys.stdout.isatty() else "json"


def default_workers(store_url: str, on_dyno: bool = False) -> int:
    """WEB_CONCURRENCY when unset: one for a memory store, which cannot be shared; HEROKU_WORKERS on
    a Heroku dyno, whose CPU count is the host's; else two per core and one."""
    if store_url.startswith("memory:"):
        return 1
    return HEROKU_WORKERS if on_dyno else (os.cpu_count() or 1) * 2 + 1


def redis_from_env(url: str) -> str:
    """REDIS_URL as the Redis client takes it. Heroku's Key-Value Store speaks TLS (rediss://) with a
    self-signed certificate that no authority vouches for, so its certificate is not checked
    (ssl_cert_reqs=none) unless the URL says otherwise. Only for REDIS_URL: a STORE_URL is taken as given."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "rediss" or "ssl_cert_reqs" in parse_qs(parts.query):
        return url
    return urlunsplit(parts._replace(query="&".join(filter(None, [parts.query, "ssl_cert_reqs=none"]))))


def choose_store(env) -> tuple[str, str]:
    """The store's URL and the setting it came from: STORE_URL when set, else DATABASE_URL (PostgreSQL,
    as Heroku's Postgres add-on sets it), else REDIS_URL (as the Key-Value Store add-on sets it), else
    memory://. Error messages name the scheme, never the URL, which holds a password."""
    url = _get(env, "STORE_URL")
    if url is not None:
        return url, "STORE_URL"
    url = _get(env, "DATABASE_URL")
    if url is not None:
        return _add_on_url("DATABASE_URL", url, ("postgres", "postgresql")), "DATABASE_URL"
    url = _get(env, "REDIS_URL")
    if url is not None:
        return redis_from_env(_add_on_url("REDIS_URL", url, ("redis", "rediss"))), "REDIS_URL"
    return "memory://", "default"


def _add_on_url(name: str, url: str, schemes: tuple[str, ...]) -> str:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in schemes:
        raise ConfigError(
            f"{name} must be a {' or '.join(s + '://' for s in schemes)} URL (got {scheme or 'no'} scheme): "
            "set STORE_URL to choose the store yourself"
        )
    return url


def shared_redis(env, store_url: str) -> str | None:
    """The Redis for rate limits and the Daraja token: the store's when it is Redis, else REDIS_URL's."""
    if urlsplit(store_url).scheme.lower() in ("redis", "rediss"):
        return store_url
    url = _get(env, "REDIS_URL")
    return redis_from_env(_add_on_url("REDIS_URL", url, ("redis", "rediss"))) if url is not None else None


def load_settings(environ: Mapping[str, str] | None = None, **overrides) -> Settings:
    """Read the settings from environ (default os.environ), then apply overrides."""
    env = dict(os.environ if environ is None else environ)
    consumer_key = _get(env, "MPESA_CONSUMER_KEY") or ""
    consumer_secret = _get(env, "MPESA_CONSUMER_SECRET") or ""
    mode = (_get(env, "MPESA_ENV") or ("sandbox" if consumer_key else "simulator")).lower()
    if mode not in MODES:
        raise ConfigError(f"MPESA_ENV must be one of {', '.join(MODES)} (got {mode!r})")

    if mode != "simulator":
        if not consumer_key:
            raise ConfigError(f"MPESA_CONSUMER_KEY is required when MPESA_ENV={mode}")
        if not consumer_secret:
            raise ConfigError(f"MPESA_CONSUMER_SECRET is required when MPESA_ENV={mode}")

    shortcode = _get(env, "MPESA_BUSINESS_SHORTCODE", "MPESA_SHORTCODE") or mpesa.SANDBOX_SHORTCODE
    if not re.fullmatch(r"\d{5,7}", shortcode):
        raise ConfigError(f"MPESA_BUSINESS_SHORTCODE must be 5 to 7 digits (got {shortcode!r})")
    passkey = _get(env, "MPESA_PASSKEY")
    if passkey is None:
        if mode == "production":
            raise ConfigError("MPESA_PASSKEY is required when MPESA_ENV=production")
        passkey = mpesa.SANDBOX_PASSKEY

    transaction_type = _get(env, "MPESA_TRANSACTION_TYPE") or mpesa.PAYBILL
    if transaction_type not in mpesa.TRANSACTION_TYPES:
        raise ConfigError(f"MPESA_TRANSACTION_TYPE must be one of {', '.join(mpesa.TRANSACTION_TYPES)}")
    party_b = _get(env, "MPESA_PARTY_B", "MPESA_TILL_NUMBER")
    if transaction_type == mpesa.BUY_GOODS and not party_b:
        raise ConfigError("MPESA_PARTY_B (the till number) is required for CustomerBuyGoodsOnline")
    if party_b is not None and not re.fullmatch(r"\d{5,7}", party_b):
        raise ConfigError(f"MPESA_PARTY_B must be 5 to 7 digits (got {party_b!r})")

    base_url = _get(env, "MPESA_BASE_URL")
    if base_url is not None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"MPESA_BASE_URL must be an absolute http(s) URL (got {base_url!r})")
        base_url = f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")

    callback_url = _get(env, "CALLBACK_URL", "MPESA_CALLBACK_URL")
    if callback_url is not None:
        callback_url = check_callback_url(callback_url, mode)
    elif mode != "simulator":
        raise ConfigError(f"CALLBACK_URL (the public https address of this server) is required when MPESA_ENV={mode}")

    callback_token = _secret(env, "CALLBACK_TOKEN")
    if callback_token is None and mode != "simulator":
        raise ConfigError(f"CALLBACK_TOKEN is required when MPESA_ENV={mode}{MAKE_A_SECRET}")
    if callback_token is not None and not re.fullmatch(r"[A-Za-z0-9_\-]+", callback_token):
        raise ConfigError("CALLBACK_TOKEN must be letters, digits, '-' or '_' only: it is part of a URL")

    max_amount = _int(env, "MAX_AMOUNT", 150_000, minimum=1)
    if max_amount > mpesa.DARAJA_MAX_AMOUNT:
        raise ConfigError(f"MAX_AMOUNT must not exceed Daraja's limit of {mpesa.DARAJA_MAX_AMOUNT}")

    store_url, store_origin = choose_store(env)
    try:
        store.check_url(store_url)
    except ValueError as error:
        raise ConfigError(str(error) if store_origin == "STORE_URL" else f"{store_origin}: {error}") from None

    workers = _int(env, "WEB_CONCURRENCY", default_workers(store_url, on_dyno="DYNO" in env), minimum=1)
    if workers > 1 and store_url.startswith("memory:"):
        raise ConfigError(
            f"WEB_CONCURRENCY must be 1 with STORE_URL=memory:// (got {workers}): a memory store cannot be "
            "shared by several workers; use sqlite:///, redis:// or postgresql:// for more"
        )
    port = _int(env, "PORT", 3001, minimum=0)
    simulator_port = _int(env, "SIMULATOR_PORT", 0, minimum=1) or None
    if simulator_port is not None and (simulator_port > 65535 or simulator_port == port):
        raise ConfigError(f"SIMULATOR_PORT must be a free port from 1 to 65535 other than PORT (got {simulator_port})")
    if mode != "simulator":
        simulator_port = None  # no simulator outside the demo
    elif base_url is not None:
        if simulator_port is not None:
            raise ConfigError("MPESA_BASE_URL and SIMULATOR_PORT both say where Daraja is: set one of them")
    else:
        if simulator_port is None and workers > 1:
            # One simulator for every worker: a prompt must be answered where it was sent.
            if not 0 < port < 65535:
                raise ConfigError(f"SIMULATOR_PORT is required with WEB_CONCURRENCY={workers} and PORT={port}")
            simulator_port = port + 1
        if simulator_port is not None:
            base_url = f"http://127.0.0.1:{simulator_port}"

    log_format = (_get(env, "LOG_FORMAT") or default_log_format()).lower()
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"LOG_FORMAT must be text or json (got {log_format!r})")

    webhook_url = _get(env, "MERCHANT_WEBHOOK_URL")
    webhook_secrets = _webhook_secrets(env)
    if webhook_url is not None:
        if urlsplit(webhook_url).scheme not in ("http", "https") or not urlsplit(webhook_url).netloc:
            raise ConfigError(f"MERCHANT_WEBHOOK_URL must be an absolute http(s) URL (got {webhook_url!r})")
        if not webhook_secrets:
            raise ConfigError("WEBHOOK_SECRET is required when MERCHANT_WEBHOOK_URL is set")

    catalog_file = _get(env, "CATALOG_FILE")
    if catalog_file is None and mode == "simulator" and os.path.exists(EXAMPLE_CATALOG):
        catalog_file = EXAMPLE_CATALOG  # the demo sells the example shop's items
    pricing = (_get(env, "PRICING") or "open").lower()
    if pricing not in ("open", "catalog"):
        raise ConfigError(f"PRICING must be open or catalog (got {pricing!r})")
    if pricing == "catalog" and catalog_file is None:
        raise ConfigError("PRICING=catalog needs CATALOG_FILE (the items and their prices)")

    settings = Settings(
        mpesa_env=mode,
        base_url=base_url,
        consumer_key=consumer_key,
        consumer_secret=consumer_secret,
        shortcode=shortcode,
        passkey=passkey,
        transaction_type=transaction_type,
        party_b=party_b,
        callback_url=callback_url,
        callback_token=callback_token,
        max_amount=max_amount,
        store_url=store_url,
        store_origin=store_origin,
        redis_url=shared_redis(env, store_url),
        transaction_ttl=_int(env, "TRANSACTION_TTL", 120, minimum=1),
        retention_seconds=_int(env, "RETENTION_SECONDS", 86_400, minimum=60),
        frontend_urls=tuple(u.strip().rstrip("/") for u in (_get(env, "FRONTEND_URL") or "").split(",") if u.strip()),
        admin_token=_secret(env, "ADMIN_TOKEN"),
        secret_key=_secret(env, "SECRET_KEY"),
        merchant_webhook_url=webhook_url,
        webhook_secrets=webhook_secrets,
        webhook_max_attempts=_int(env, "WEBHOOK_MAX_ATTEMPTS", 12, minimum=1),
        webhook_base_delay=_float(env, "WEBHOOK_BASE_DELAY", 1.0),
        webhook_max_delay=_float(env, "WEBHOOK_MAX_DELAY", 300.0),
        upkeep_seconds=_upkeep_seconds(env),
        port=port,
        rate_limit_push_per_phone=_rate_limit(env, "RATE_LIMIT_PUSH_PER_PHONE", "3/minute;10/hour"),
        rate_limit_push_per_ip=_rate_limit(env, "RATE_LIMIT_PUSH_PER_IP", "10/minute;100/hour"),
        rate_limit_status_per_ip=_rate_limit(env, "RATE_LIMIT_STATUS_PER_IP", "120/minute"),
        ratelimit_enabled=_bool(env, "RATELIMIT_ENABLED", True),
        usd_to_kes_rate=_float(env, "USD_TO_KES_RATE", None),
        query_interval=_float(env, "STATUS_QUERY_INTERVAL", 5.0),
        first_query_after=_float(env, "STATUS_FIRST_QUERY_AFTER", 20.0, allow_zero=True),
        daraja_timeout=_float(env, "DARAJA_TIMEOUT", 15.0),
        # Heroku's router is one proxy: trust exactly its X-Forwarded-For / -Proto.
        trusted_proxies=_int(env, "TRUSTED_PROXIES", 1 if "DYNO" in env else 0),
        callback_allowed_ips=parse_allowed_ips(_get(env, "CALLBACK_ALLOWED_IPS")),
        catalog_file=catalog_file,
        pricing=pricing,
        checkout_secret=_secret(env, "CHECKOUT_SECRET"),
        simulator_port=simulator_port,
        log_format=log_format,
        workers=workers,
        threads=_int(env, "WEB_THREADS" if _get(env, "WEB_THREADS") else "GUNICORN_THREADS", 8, minimum=1),
        metrics_dir=_directory(env, "PROMETHEUS_MULTIPROC_DIR"),
        admin_login_free_tries=_int(env, "ADMIN_LOGIN_FREE_TRIES", 3),
        admin_login_delay=_float(env, "ADMIN_LOGIN_DELAY", 1.0),
        admin_login_max_delay=_float(env, "ADMIN_LOGIN_MAX_DELAY", 300.0),
    )
    return replace(settings, **overrides)
