"""The plain helpers test modules share; the fixtures built on them are in conftest.py.

- Time and places: ROOT, free_port, wait_until, FakeClock (the one fake clock: pass it
  wherever the code takes `clock=`).
- The payment server: SERVER_DEFAULTS, CALLBACK_TOKEN, LiveServer and start_live_server (a
  server in a thread), ServerProcess (one in its own process, as an operator runs it).
- A shop's calls to it: started, payment, poll, admin, hook, callback_body; the simulator's test phones
  PAID, CANCELLED, WRONG_PIN, BROKE, UNREACHABLE, and WAITING (which waits for the handset).
- The simulator's side: TEST_SETTINGS, CallbackReceiver (records what is POSTed to it).
- Stores: Backend (opens stores of one kind, lets time pass for them); start_redis,
  redis_answers, stop_process for a throwaway redis-server; postgres_answers,
  start_postgres, create_database, drop_database for throwaway PostgreSQL databases.
- Browsers: chromium_path, CHROMIUM_ARGS, Watched (a page whose console errors are kept),
  shot, visible, WAIT, PAID_AT_ONCE, HANDSET_PHONE.
- Checkout links: CHECKOUT_SECRET, signed_query.
"""

from __future__ import annotations

import glob
import hashlib
import hmac
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

import psycopg
import redis
import requests
from werkzeug.serving import make_server

import simulator as sim
from config import load_settings
from server import create_app
from store import Store, open_store

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout=15.0, every=0.05):
    """Call check until it returns something truthy and return that; fail after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError("condition not met in time")


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


CALLBACK_TOKEN = "test-callback-token-0123456789"
SERVER_DEFAULTS = {
    "MPESA_ENV": "simulator",
    "RATELIMIT_ENABLED": "false",
    "STORE_URL": "memory://",
    "CALLBACK_TOKEN": CALLBACK_TOKEN,
}


@dataclass
class LiveServer:
    """A payment server on a loopback port, talking to a simulator over HTTP."""

    url: str
    simulator_url: str
    app: object
    _server: object = None

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server = None
        if "webhooks" in self.app.extensions:
            self.app.extensions["webhooks"].close()
        self.app.extensions["payments"].daraja.close()
        self.app.extensions["store"].close()

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(self.url + path, timeout=30, **kwargs)

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kwargs)

    def sim(self, method: str, path: str, **kwargs) -> requests.Response:
        """Drive the simulator's control API (the handset, scenarios, faults)."""
        return requests.request(method, self.simulator_url + path, timeout=30, **kwargs)


def start_live_server(simulator_url: str, **env) -> LiveServer:
    """Serve a new server from a thread, its settings given as environment strings."""
    port = free_port()
    environ = {
        **SERVER_DEFAULTS,
        "MPESA_BASE_URL": simulator_url,
        "PORT": str(port),
        "CALLBACK_URL": f"http://127.0.0.1:{port}",
        **env,
    }
    app = create_app(load_settings(environ))
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return LiveServer(f"http://127.0.0.1:{port}", simulator_url, app, server)


# The Procfile's web command (its fresh PROMETHEUS_MULTIPROC_DIR is each test's to set).
PROCFILE_COMMAND = [sys.executable, "serve.py"]


def workers_ready(log_text: str) -> int:
    """How many uWSGI workers have built the app, from uWSGI's lines in a server's log."""
    return log_text.count("WSGI app 0 (mountpoint='') ready")


def stats_options(port: int) -> tuple[str, ...]:
    """uWSGI options for its stats server on port, read by requests_by_worker."""
    return ("--stats", f"127.0.0.1:{port}", "--stats-http")


def requests_by_worker(stats_port: int) -> dict[int, int]:
    """How many requests each uWSGI worker has answered, by pid, from its stats server."""
    workers = requests.get(f"http://127.0.0.1:{stats_port}", timeout=5).json()["workers"]
    return {worker["pid"]: worker["requests"] for worker in workers}


class ServerProcess:
    """The server as an operator runs it, in its own process."""

    def __init__(self, command: list[str], env: dict, port: int, log_path: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(self._ready, timeout=30)

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"server exited: {self.log_path.read_text()[-2000:]}")
        try:
            return requests.get(self.url + "/health", timeout=1).ok
        except (requests.ConnectionError, requests.Timeout):
            return False

    def kill(self, sig=signal.SIGKILL) -> None:
        os.killpg(self.process.pid, sig)
        self.process.wait(timeout=20)
        self._log.close()


PAID, CANCELLED, WRONG_PIN, BROKE, UNREACHABLE = (
    "254700000000",
    "254700001032",
    "254700002001",
    "254700000001",
    "254700001037",
)
WAITING = "254712345678"  # not a test number: waits for the simulated handset


def payment(live, phone=WAITING, amount=100, **extra) -> dict:
    """Start a payment and return the server's answer (paymentId, checkoutRequestId...)."""
    response = live.post("/stkpush", json={"phone": phone, "amount": amount, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def started(live, phone=WAITING, amount=100, **extra) -> str:
    """Start a payment and return its CheckoutRequestID (what the simulator knows it by)."""
    return payment(live, phone, amount, **extra)["checkoutRequestId"]


def poll(live, checkout_id, until=lambda a: a["status"] != "pending", timeout=10.0) -> dict:
    """Ask for the payment's status until `until` holds or `timeout` passes; the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        response = live.post("/stkpush/status", json={"checkoutRequestId": checkout_id})
        answer = response.json()
        if until(answer) or time.monotonic() > deadline:
            return answer
        time.sleep(0.1)


def admin(live, checkout_id) -> dict:
    """The full record of a payment from the admin API (the server's ADMIN_TOKEN is admin-secret-0123456789)."""
    response = live.get(f"/transactions/{checkout_id}", headers={"Authorization": "Bearer admin-secret-0123456789"})
    assert response.status_code == 200, response.text
    return response.json()["transaction"]


def hook(live, token=CALLBACK_TOKEN, payment_id=None):
    """The path Daraja's callbacks reach the server on: with the payment id, as pushes now
    ask, or without it, as pushes sent before payment ids did."""
    return f"/hooks/stk/{token}/{payment_id}" if payment_id else f"/hooks/stk/{token}"


def callback_body(checkout_id, code=0, amount=100.0, receipt="SIM0000001"):
    """Daraja's callback for a payment: paid (code 0, with its metadata) or failed."""
    body = {
        "MerchantRequestID": "1-2-3",
        "CheckoutRequestID": checkout_id,
        "ResultCode": code,
        "ResultDesc": "The service request is processed successfully.",
    }
    if code == 0:
        body["CallbackMetadata"] = {
            "Item": [
                {"Name": "Amount", "Value": amount},
                {"Name": "MpesaReceiptNumber", "Value": receipt},
                {"Name": "Balance"},
                {"Name": "TransactionDate", "Value": 20261123103000},
                {"Name": "PhoneNumber", "Value": 254712345678},
            ]
        }
    return {"Body": {"stkCallback": body}}


# Fast but otherwise Daraja-like: test numbers answer in 50 ms, prompts expire in 5 s.
TEST_SETTINGS = {
    "pin": sim.SIM_PIN,
    "auto_delay": 0.05,
    "prompt_timeout": 5.0,
    "query_min_interval": 0.1,
    "token_ttl": 3599,
    "timestamp_skew": 600,
    "invalidate_previous_tokens": False,
}


class CallbackReceiver:
    """A tiny HTTP server that records every POSTed JSON body and answers `status`."""

    def __init__(self, host: str = "127.0.0.1"):
        self.calls: list[dict] = []  # {"path", "headers", "body"} in arrival order
        self.status = 200
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                with receiver._cond:
                    receiver.calls.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    receiver._cond.notify_all()
                answer = json.dumps({"ResultCode": 0, "ResultDesc": "Accepted"}).encode()
                self.send_response(receiver.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_port}/hooks/stk/test-token"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.005}, daemon=True)
        self._thread.start()

    @property
    def bodies(self) -> list:
        with self._cond:
            return [call["body"] for call in self.calls]

    def wait(self, count: int = 1, timeout: float = 5.0) -> list:
        """Return the first `count` bodies once they have arrived; fail after `timeout`."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.calls) >= count, timeout):
                raise AssertionError(f"expected {count} callback(s) within {timeout}s, got {len(self.calls)}")
            return [call["body"] for call in self.calls[:count]]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Backend:
    """Opens stores of one kind and lets time pass for them.

    Memory, SQLite and PostgreSQL run on a fake clock; Redis keeps its own time, so for it
    time passes by sleeping, and the durations in the suite are kept short.
    """

    def __init__(self, kind: str, url: str, clock):
        self.kind = kind
        self.url = url
        self.clock = clock
        self._opened: list[Store] = []

    def open(self, retention: float = 3600) -> Store:
        store = open_store(self.url, retention=retention, clock=self.clock)
        self._opened.append(store)
        return store

    @property
    def ledger(self) -> bool:
        """True for the stores that keep records until deleted (retention does not apply)."""
        return self.kind in ("sqlite", "postgres")

    def elapse(self, seconds: float) -> None:
        if isinstance(self.clock, FakeClock):
            self.clock.advance(seconds)
        else:
            time.sleep(seconds)

    def close(self) -> None:
        for store in self._opened:
            store.close()


REDIS_START_TIMEOUT = 10.0


def redis_answers(url: str, timeout: float = 0.5) -> bool:
    """Whether a Redis at url answers PING."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def stop_process(process: subprocess.Popen) -> None:
    """Terminate a child process, killing it if it will not go."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_redis(binary: str, directory: Path, db: int = 15) -> tuple[subprocess.Popen, str]:
    """Start redis-server on a free port, persistence off; retry if another process takes the port first."""
    logfile = directory / "redis.log"
    for _ in range(3):
        port = free_port()
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            + ["--dir", str(directory), "--logfile", str(logfile)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/{db}"
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            if redis_answers(url):
                return process, url
            time.sleep(0.02)
        stop_process(process)
    log_tail = logfile.read_text(errors="replace")[-800:] if logfile.exists() else "(no log)"
    raise RuntimeError(f"redis-server did not start:\n{log_tail}")


POSTGRES_START_TIMEOUT = 30.0


def postgres_answers(url: str, timeout: int = 2) -> bool:
    """Whether a PostgreSQL at url accepts a connection."""
    try:
        with psycopg.connect(url, connect_timeout=timeout):
            return True
    except psycopg.Error:
        return False


def _postgres_binary(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, or in Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda path: int(Path(path).parts[4]))
    return versions[-1] if versions else None


def start_postgres() -> tuple[subprocess.Popen, str, Path]:
    """Start a throwaway PostgreSQL (trust auth, user postgres) on a free loopback port.

    initdb refuses to run as root: as root, the cluster belongs to nobody, and initdb and
    postgres run as nobody through setpriv. Returns the server, its admin URL (database
    postgres) and its folder, which the caller removes once the server has stopped.
    """
    initdb, postgres = _postgres_binary("initdb"), _postgres_binary("postgres")
    if initdb is None or postgres is None:
        raise RuntimeError("no initdb and postgres programs (Debian's postgresql package has them)")
    folder = Path(tempfile.mkdtemp(prefix="mpesa-test-postgres-"))
    as_user: list[str] = []
    if os.getuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        as_user = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups", "--"]
    data = folder / "data"
    made = subprocess.run(
        [*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if made.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {(made.stderr or made.stdout)[-800:]}")
    logfile = folder / "postgres.log"
    for _ in range(3):
        port = free_port()
        with open(logfile, "ab") as log:
            process = subprocess.Popen(
                [*as_user, postgres, "-D", str(data), "-p", str(port), "-k", str(folder)]
                + ["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + POSTGRES_START_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            if postgres_answers(url):
                return process, url, folder
            time.sleep(0.1)
        stop_process(process)
    log_tail = logfile.read_text(errors="replace")[-800:] if logfile.exists() else "(no log)"
    shutil.rmtree(folder, ignore_errors=True)
    raise RuntimeError(f"postgres did not start:\n{log_tail}")


def database_url(admin_url: str, name: str) -> str:
    """The admin URL with another database in it."""
    return urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))


def create_database(admin_url: str) -> str:
    """Create an empty database with a random name; return its URL."""
    name = f"mpesa_test_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return database_url(admin_url, name)


def drop_database(admin_url: str, url: str) -> None:
    """Drop the database url names, ending any session still connected to it."""
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def empty_postgres(url: str) -> None:
    """Delete every row of the store's tables, keeping the schema and its version."""
    with psycopg.connect(url, autocommit=True) as db:
        tables = db.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'schema_version'"
        ).fetchall()
        for (table,) in tables:
            db.execute(f'DELETE FROM "{table}"')


SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HANDSET_PHONE = "0712 345 678"  # not a simulator test number: it waits for the handset
PAID_AT_ONCE = "0700 000 000"  # the simulator pays this one by itself
WAIT = 15_000  # ms: a status poll comes every 3 s


def chromium_path() -> str | None:
    """Debian's chromium, or the one CHROMIUM names."""
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


class Watched:
    """A page whose console errors, CSP reports and uncaught exceptions are collected."""

    def __init__(self, page, allow: tuple[str, ...] = ()):
        self.page = page
        self.allow = allow  # console errors the test provokes on purpose
        self.problems: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.problems.append(f"uncaught: {e}"))
        page.set_default_timeout(WAIT)

    def _console(self, message) -> None:
        if message.type != "error":
            return
        where = (message.location or {}).get("url", "")
        # Chromium logs every 4xx fetch; an unknown payment's 404 is an answer the page expects.
        if "/stkpush/status/" in where and "status of 404" in message.text:
            return
        if any(allowed in message.text for allowed in self.allow):
            return
        self.problems.append(f"{message.text} ({where})")


def shot(page, name: str) -> None:
    """Save the whole page under test-artifacts/screenshots/ for a person to look at."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def visible(page, selector: str) -> None:
    """Wait until the element is shown."""
    page.wait_for_selector(selector, state="visible")


CHECKOUT_SECRET = "test-checkout-secret-0123456789"


def signed_query(
    secret=CHECKOUT_SECRET,
    amount="1500",
    reference="CART_12345",
    description="DJ Kraph Checkout",
    expires=None,
    **changes,
) -> str:
    """A pay-link query string signed as API.md says: hex HMAC-SHA256 over the canonical fields."""
    expires = str(int(time.time()) + 3600) if expires is None else str(expires)
    canonical = f"amount={amount}&accountReference={reference}&description={description}&expires={expires}"
    signature = hmac.new(secret.encode(), canonical.encode(), hashlib.sha256).hexdigest()
    fields = {
        "amount": amount,
        "accountReference": reference,
        "description": description,
        "expires": expires,
        "signature": signature,
        **changes,
    }
    return "?" + urlencode(fields)
