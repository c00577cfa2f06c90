"""What every benchmark needs: processes on free loopback ports that always stop, and load.

    with Context(quick=True) as ctx:
        sim = start_simulator(ctx)
        server = start_server(ctx, server_env(sim.url, "memory://"))
        result = load(server.url + "/stkpush/status", {"checkoutRequestId": "..."}, seconds=2)

Processes run in their own session and are stopped as a group (SIGTERM, then SIGKILL)
when the context closes, whatever happened: a failure, Ctrl-C or SIGTERM to the runner.
Nothing listens beyond 127.0.0.1 and every request loop here is bounded in count and time.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BENCH_VENV = ROOT / ".bench-venv"
PEERS_REQUIREMENTS = ROOT / "bench" / "peers-requirements.txt"

SIM_KEY, SIM_SECRET = "simulator-consumer-key", "simulator-consumer-secret"
CALLBACK_TOKEN = "bench-callback-token-0123456789"
LOCAL = "127.0.0.1"


class BenchError(Exception):
    """A benchmark could not run; the message says why (it goes into BENCHMARKS.md)."""


class Process:
    """A child process in its own session, its output in a log file."""

    def __init__(self, name: str, command: list[str], env: dict, log_path: Path, cwd: Path = ROOT):
        self.name = name
        self.command = command
        self.log_path = log_path
        self.url: str | None = None
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def wait_ready(self, url: str, timeout: float = 30.0) -> None:
        """Wait until GET url answers; raise BenchError with the log tail if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise BenchError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
            with suppress(requests.RequestException):  # not listening yet
                if requests.get(url, timeout=1).status_code < 500:
                    return
            time.sleep(0.05)
        raise BenchError(f"{self.name} did not answer {url} within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers."""
        if self.alive():
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.popen.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.popen.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:
            # The leader is gone; its group (uWSGI's workers) may not be.
            with suppress(ProcessLookupError, PermissionError):  # the group is gone too
                os.killpg(self.popen.pid, signal.SIGKILL)
        self._log.close()


@dataclass
class Context:
    """What a benchmark module gets: settings, a scratch folder and a process registry."""

    quick: bool = False
    baseline: str | None = None  # a git revision whose server the polling benchmark counts too
    workdir: Path | None = None
    processes: list[Process] = field(default_factory=list)
    summary: list = field(default_factory=list)  # [benchmark, goal, result, met?] for the top table
    cleanups: list = field(default_factory=list)  # called after the processes stop, last first
    _own_workdir: bool = False

    def __enter__(self) -> Context:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="mpesa-bench-"))
            self._own_workdir = True
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()
        while self.cleanups:
            self.cleanups.pop()()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def runs(self, full: int, quick: int = 1) -> int:
        return quick if self.quick else full

    def scratch(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def start(
        self,
        name: str,
        command: list[str],
        env: dict | None = None,
        ready_url: str | None = None,
        timeout: float = 30.0,
        cwd: Path = ROOT,
    ) -> Process:
        """Start a process that is stopped when the context (or stop_all) ends."""
        log_path = self.workdir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{len(self.processes)}.log"
        process = Process(name, command, env if env is not None else base_env(), log_path, cwd)
        self.processes.append(process)
        if ready_url:
            process.wait_ready(ready_url, timeout)
        return process

    def stop(self, *processes: Process) -> None:
        """Stop these processes, all at once (a server takes seconds to shut down gracefully)."""
        with ThreadPoolExecutor(max(1, len(processes))) as pool:
            list(pool.map(Process.stop, processes))
        for process in processes:
            if process in self.processes:
                self.processes.remove(process)

    def stop_all(self) -> None:
        while self.processes:
            self.processes.pop().stop()


def revision_hash(revision: str) -> str | None:
    """The short commit hash a git revision names in this repository, None if it names none."""
    try:
        found = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", "--short", f"{revision}^{{commit}}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return found.stdout.strip() if found.returncode == 0 else None


@contextmanager
def checkout(ctx: Context, revision: str) -> Iterator[Path]:
    """The tree at a git revision, in a scratch worktree removed afterwards (even on Ctrl-C)."""
    tree = ctx.scratch("checkouts") / re.sub(r"[^A-Za-z0-9_.-]", "_", revision)

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "worktree", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)

    added = git("add", "--detach", str(tree), revision)
    if added.returncode != 0:
        raise BenchError(f"git could not check out {revision}: {added.stderr.strip()[-500:]}")
    try:
        yield tree
    finally:
        git("remove", "--force", str(tree))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCAL, 0))
        return sock.getsockname()[1]


# The server reads these (and .env fills in whatever is unset): pin every one of them.
_SERVER_SETTINGS = (
    "MPESA_ENV",
    "MPESA_BASE_URL",
    "MPESA_CONSUMER_KEY",
    "MPESA_CONSUMER_SECRET",
    "MPESA_BUSINESS_SHORTCODE",
    "MPESA_SHORTCODE",
    "MPESA_PASSKEY",
    "MPESA_TRANSACTION_TYPE",
    "MPESA_PARTY_B",
    "MPESA_TILL_NUMBER",
    "CALLBACK_URL",
    "MPESA_CALLBACK_URL",
    "CALLBACK_TOKEN",
    "MAX_AMOUNT",
    "STORE_URL",
    "TRANSACTION_TTL",
    "STATUS_FIRST_QUERY_AFTER",
    "STATUS_QUERY_INTERVAL",
    "RETENTION_SECONDS",
    "DARAJA_TIMEOUT",
    "FRONTEND_URL",
    "ADMIN_TOKEN",
    "USD_TO_KES_RATE",
    "PORT",
    "TRUSTED_PROXIES",
    "CALLBACK_ALLOWED_IPS",
    "RATE_LIMIT_PUSH_PER_PHONE",
    "RATE_LIMIT_PUSH_PER_IP",
    "RATE_LIMIT_STATUS_PER_IP",
    "RATELIMIT_ENABLED",
    "MERCHANT_WEBHOOK_URL",
    "WEBHOOK_SECRET",
)


def base_env() -> dict:
    """This environment with every server setting blanked (an empty value counts as unset)."""
    env = dict(os.environ)
    for name in (
        "DYNO",
        "WEB_CONCURRENCY",
        "WEB_THREADS",
        "GUNICORN_THREADS",
        "PROMETHEUS_MULTIPROC_DIR",
        "METRICS_STARTED_AT",
    ):
        env.pop(name, None)
    env.update(dict.fromkeys(_SERVER_SETTINGS, ""))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def server_env(simulator_url: str, store_url: str, port: int, **settings) -> dict:
    """The environment of a payment server talking to simulator_url, rate limits off."""
    env = base_env()
    env.update(
        {
            "MPESA_ENV": "simulator",
            "MPESA_BASE_URL": simulator_url,
            "MPESA_CONSUMER_KEY": SIM_KEY,
            "MPESA_CONSUMER_SECRET": SIM_SECRET,
            "STORE_URL": store_url,
            "PORT": str(port),
            "CALLBACK_URL": f"http://{LOCAL}:{port}",
            "CALLBACK_TOKEN": CALLBACK_TOKEN,
            "RATELIMIT_ENABLED": "false",
        }
    )
    env.update({name: str(value) for name, value in settings.items()})
    return env


def start_simulator(
    ctx: Context, *, auto_delay: float = 0.1, prompt_timeout: float = 3600, query_min_interval: float = 1.0
) -> Process:
    """`python -m simulator --port N` in its own process; prompts wait an hour by default."""
    port = free_port()
    command = [
        PYTHON,
        "-m",
        "simulator",
        "--host",
        LOCAL,
        "--port",
        str(port),
        "--auto-delay",
        str(auto_delay),
        "--prompt-timeout",
        str(prompt_timeout),
        "--query-min-interval",
        str(query_min_interval),
    ]
    process = ctx.start("simulator", command, ready_url=f"http://{LOCAL}:{port}/simulator/health")
    process.url = f"http://{LOCAL}:{port}"
    return process


def procfile_web(root: Path = ROOT) -> tuple[dict[str, str], list[str]]:
    """The Procfile's web command: the settings it assigns before the command, and serve.py's
    arguments, e.g. ({"PROMETHEUS_MULTIPROC_DIR": "$(mktemp -d)"}, [])."""
    lines = [line for line in (root / "Procfile").read_text().splitlines() if line.startswith("web:")]
    if not lines:
        raise BenchError("the Procfile has no web: line")
    words = shlex.split(lines[0].removeprefix("web:"))
    settings = {}
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        settings[name] = value
    if words[:2] != ["python", "serve.py"]:
        raise BenchError(f"the Procfile's web command is not `python serve.py ...`: {lines[0]}")
    return settings, words[2:]


def procfile_command(ctx: Context, env: dict, app: str | None = None, root: Path = ROOT) -> tuple[list[str], dict]:
    """The Procfile's web command and environment, serving app (None: the server itself) with the
    same options: serve.py from this Python, the Procfile's settings as it makes them (`$(mktemp -d)`:
    a fresh folder)."""
    settings, arguments = procfile_web(root)
    env = dict(env)
    for name, value in settings.items():
        if value == "$(mktemp -d)":
            env[name] = str(ctx.scratch(f"{name.lower()}-{secrets.token_hex(4)}"))
        elif "$" in value or "`" in value:
            raise BenchError(f"the Procfile sets {name}={value}, which the benchmark cannot make")
        else:
            env[name] = value
    return [PYTHON, "serve.py", *(["--app", app] if app else []), *arguments], env


def start_server(ctx: Context, env: dict, app: str | None = None, name: str = "server") -> Process:
    """The Procfile's web command (procfile_command) serving app, on port env["PORT"];
    returns once every worker the settings ask for is up."""
    from config import load_settings

    command, env = procfile_command(ctx, env, app)
    port = int(env["PORT"])
    process = ctx.start(name, command, env, ready_url=f"http://{LOCAL}:{port}/health", timeout=60)
    process.url = f"http://{LOCAL}:{port}"
    workers = load_settings(env).workers
    wait_until(lambda: len(server_workers(process)) >= workers, timeout=60)
    return process


def server_workers(process: Process) -> list[int]:
    """The pids of a uWSGI master's workers (the benchmark's servers attach no simulator to it)."""
    try:
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(process.pid)], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(pid) for pid in out.split()]


def cpu_seconds(pids: list[int]) -> float | None:
    """CPU time (user + system) the processes have used so far, from /proc; None where unreadable."""
    total = 0
    try:
        for pid in pids:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, ValueError, IndexError):
        return None
    return total / os.sysconf("SC_CLK_TCK") if pids else None


def start_redis(ctx: Context) -> tuple[str | None, str]:
    """A Redis for the Redis store: (url, how) or (None, why not)."""
    binary = shutil.which("redis-server")
    if binary:
        port = free_port()
        directory = ctx.scratch(f"redis-{port}")
        process = ctx.start(
            "redis",
            [binary, "--port", str(port), "--bind", LOCAL, "--save", "", "--appendonly", "no", "--dir", str(directory)],
        )
        url = f"redis://{LOCAL}:{port}/0"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process.alive():
            if redis_answers(url):
                return url, "throwaway redis-server, persistence off"
            time.sleep(0.05)
        ctx.stop(process)
        problem = f"redis-server did not start: {process.log_tail(300)}"
    else:
        problem = "redis-server is not installed"
    fallback = f"redis://{LOCAL}:6379/14"
    if redis_answers(fallback):
        import redis

        client = redis.Redis.from_url(fallback)
        try:
            client.flushdb()
        finally:
            client.close()
        return fallback, "the Redis on port 6379, database 14 (flushed)"
    return None, f"{problem} and nothing answers at {fallback}"


def store_urls(ctx: Context, label: str) -> tuple[list[tuple[str, str]], str | None]:
    """(name, STORE_URL) pairs to run: memory, SQLite in a scratch folder, and Redis when one
    can be had; a quick run keeps memory only. Also why Redis is missing (None when it is not)."""
    stores = [("memory", "memory://"), ("SQLite", f"sqlite:///{ctx.scratch(label) / 'payments.db'}")]
    redis_url, redis_how = start_redis(ctx)
    if redis_url:
        stores.append(("Redis", redis_url))
    else:
        ctx.log(f"!!! REDIS {label.upper()} RUN SKIPPED: {redis_how} !!!")
    return (stores[:1] if ctx.quick else stores), (None if redis_url else redis_how)


def redis_answers(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def simulator_stats(simulator_url: str) -> dict:
    return requests.get(simulator_url + "/simulator/stats", timeout=10).json()


def closes_connections(url: str) -> bool:
    """True when the server at url answers `Connection: close` (no keep-alive to reuse)."""
    return requests.get(url, timeout=10).headers.get("Connection", "").lower() == "close"


def simulator_reset(simulator_url: str) -> None:
    requests.post(simulator_url + "/simulator/reset", timeout=10).raise_for_status()


def wait_until(check, timeout: float = 15.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise BenchError(f"condition not met within {timeout:.0f}s")


def pushed(server_url: str, phone: str, reference: str) -> str:
    """Push 100 KES to phone under the account reference; its CheckoutRequestID."""
    answer = requests.post(
        server_url + "/stkpush",
        json={"phone": phone, "amount": 100, "accountReference": reference, "description": "Benchmark"},
        timeout=30,
    )
    if answer.status_code != 200:
        raise BenchError(f"push {reference} failed: {answer.status_code} {answer.text[:300]}")
    return answer.json()["checkoutRequestId"]


def status_of(server_url: str, checkout_id: str) -> requests.Response:
    return requests.post(server_url + "/stkpush/status", json={"checkoutRequestId": checkout_id}, timeout=10)


def completed_payment(server_url: str, phone: str = "254700000000") -> str:
    """Push to a simulator test number that pays, wait for the callback; return its id."""
    checkout_id = pushed(server_url, phone, "BENCH-1")
    wait_until(lambda: status_of(server_url, checkout_id).json().get("status") == "completed", timeout=20)
    return checkout_id


def pending_payment(server_url: str, phone: str) -> str:
    """Push to a number that waits for the simulated handset (which nobody answers); return its id."""
    checkout_id = pushed(server_url, phone, "BENCH-2")
    polled = status_of(server_url, checkout_id)
    if polled.status_code != 200 or polled.json().get("status") != "pending":
        raise BenchError(f"the new payment is not pending: {polled.status_code} {polled.text[:300]}")
    return checkout_id


EXPRESS_DIR = ROOT / "bench" / "express"


def express_ready(ctx: Context) -> str | None:
    """Install bench/express/'s pinned packages (`npm ci`) unless they are there; None when the
    Express server can run, else why not."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        return "node and npm are not installed (`scripts/ensure-packages.sh npm` installs them)"
    installed = EXPRESS_DIR / "node_modules" / ".package-lock.json"  # written by npm ci
    lock = EXPRESS_DIR / "package-lock.json"
    if installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime:
        return None
    ctx.log("installing bench/express/'s packages (npm ci)")
    try:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=EXPRESS_DIR, capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        return "npm ci did not finish within 300 s"
    return None if done.returncode == 0 else f"npm ci failed: {(done.stderr or done.stdout).strip()[-500:]}"


def start_express(ctx: Context, answers: dict[str, dict], name: str = "express") -> Process:
    """bench/express/server.js (one Node process) answering each poll body's checkoutRequestId
    with the answer given for it."""
    problem = express_ready(ctx)
    if problem:
        raise BenchError(problem)
    port = free_port()
    seed = ctx.workdir / f"express-{port}.json"
    seed.write_text(json.dumps(answers))
    command = [shutil.which("node") or "node", "server.js", str(port), str(seed)]
    process = ctx.start(name, command, ready_url=f"http://{LOCAL}:{port}/health", cwd=EXPRESS_DIR)
    process.url = f"http://{LOCAL}:{port}"
    return process


POSTGRES_ADMIN_URL = f"postgresql://postgres@{LOCAL}:5432/postgres"


def postgres_database(ctx: Context) -> tuple[str | None, str]:
    """A throwaway database on the PostgreSQL at 127.0.0.1:5432, dropped when the context closes:
    (url, how) or (None, why not)."""
    import store

    try:
        store.check_url("postgresql://localhost/x")
    except ValueError as error:
        return None, f"this code has no PostgreSQL store ({error})"
    try:
        import psycopg
    except ImportError:
        return None, "psycopg is not installed"
    name = f"bench_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f"CREATE DATABASE {name}")
    except psycopg.Error as error:
        return None, f"no PostgreSQL answers at {LOCAL}:5432 as user postgres ({str(error).strip()[:200]})"

    def drop() -> None:
        with (
            suppress(psycopg.Error),  # the server went away: nothing left to drop
            psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3) as admin,
        ):
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    ctx.cleanups.append(drop)
    return f"postgresql://postgres@{LOCAL}:5432/{name}", "throwaway database on the PostgreSQL at port 5432"


@dataclass
class LoadResult:
    """One load run: requests/s counting only 2xx answers, and what went wrong."""

    tool: str
    seconds: float
    requests: int
    ok: int
    errors: int
    rps: float
    p50_ms: float | None = None
    p99_ms: float | None = None


def wrk_path() -> str | None:
    """wrk, unless BENCH_NO_WRK is set (to try the Python generator)."""
    return None if os.environ.get("BENCH_NO_WRK") else shutil.which("wrk")


def wrk_version() -> str:
    path = wrk_path()
    if not path:
        return "not installed"
    out = subprocess.run([path, "-v"], capture_output=True, text=True).stdout
    match = re.search(r"wrk\s+(\S+)", out)
    return match.group(1) if match else "unknown"


_WRK_SCRIPT = """wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
"""


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _milliseconds(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(url: str, body: dict, seconds: float, connections: int, workdir: Path, threads: int = 1) -> LoadResult:
    """POST body to url for `seconds` with wrk (time-bounded by wrk itself)."""
    script = workdir / "post.lua"
    script.write_text(_WRK_SCRIPT.format(body=_lua_string(json.dumps(body))))
    command = [
        wrk_path(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "5s",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30).stdout
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if not total:
        raise BenchError(f"wrk printed no result:\n{out[-800:]}")
    count = int(total.group(1))
    elapsed = float(total.group(2)) * {"s": 1.0, "ms": 0.001, "m": 60.0}.get(total.group(3), 1.0)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    bad = int(non_2xx.group(1)) if non_2xx else 0
    errors = bad + (sum(int(n) for n in socket_errors.groups()) if socket_errors else 0)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    ok = count - bad
    return LoadResult(
        "wrk",
        elapsed,
        count,
        ok,
        errors,
        ok / elapsed,
        _milliseconds(p50.group(1)) if p50 else None,
        _milliseconds(p99.group(1)) if p99 else None,
    )


def run_python_load(
    url: str, body: dict, seconds: float, connections: int, max_requests: int = 2_000_000
) -> LoadResult:
    """The fallback load generator: `connections` threads, each with its own pooled session."""
    deadline = time.monotonic() + seconds
    budget = [max_requests]
    lock = threading.Lock()
    samples: list[float] = []
    counts = {"requests": 0, "ok": 0, "errors": 0}
    payload = json.dumps(body)
    headers = {"Content-Type": "application/json"}

    def worker():
        session = requests.Session()
        mine = {"requests": 0, "ok": 0, "errors": 0}
        latencies = []
        try:
            while time.monotonic() < deadline:
                with lock:
                    if budget[0] <= 0:
                        break
                    budget[0] -= 1
                started = time.perf_counter()
                try:
                    response = session.post(url, data=payload, headers=headers, timeout=5)
                    ok = 200 <= response.status_code < 300
                except requests.RequestException:
                    ok = False
                latencies.append((time.perf_counter() - started) * 1000)
                mine["requests"] += 1
                mine["ok" if ok else "errors"] += 1
        finally:
            session.close()
        with lock:
            for key, value in mine.items():
                counts[key] += value
            samples.extend(latencies)

    started = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 30)
    elapsed = time.monotonic() - started
    return LoadResult(
        "python",
        elapsed,
        counts["requests"],
        counts["ok"],
        counts["errors"],
        counts["ok"] / elapsed,
        percentile(samples, 50),
        percentile(samples, 99),
    )


def load(url: str, body: dict, seconds: float, connections: int, workdir: Path, threads: int = 1) -> LoadResult:
    """wrk (with `threads` threads) when installed, else the Python generator."""
    if wrk_path():
        return run_wrk(url, body, seconds, connections, workdir, threads)
    return run_python_load(url, body, seconds, connections)


@dataclass
class Batch:
    """A bounded batch of requests sent from a thread pool: wall time and each latency."""

    wall: float
    latencies_ms: list[float]
    statuses: dict[int | str, int]
    failures: list[str]

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if isinstance(status, int) and 200 <= status < 300)

    @property
    def rate(self) -> float:
        return self.ok / self.wall if self.wall else 0.0


def post_batch(
    jobs: list[tuple[str, dict, dict]], threads: int, timeout: float = 30.0, deadline_seconds: float = 120.0
) -> Batch:
    """POST each (url, json, headers) once from `threads` threads with pooled sessions."""
    local = threading.local()
    sessions: list[requests.Session] = []
    lock = threading.Lock()
    deadline = time.monotonic() + deadline_seconds

    def session() -> requests.Session:
        if not hasattr(local, "session"):
            local.session = requests.Session()
            with lock:
                sessions.append(local.session)
        return local.session

    def send(job):
        url, body, headers = job
        if time.monotonic() > deadline:
            return "skipped", 0.0, "past the deadline"
        started = time.perf_counter()
        try:
            response = session().post(url, json=body, headers=headers, timeout=timeout)
        except requests.RequestException as error:
            return type(error).__name__, (time.perf_counter() - started) * 1000, str(error)[:200]
        elapsed = (time.perf_counter() - started) * 1000
        detail = None if response.ok else response.text[:200]
        return response.status_code, elapsed, detail

    started = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        results = list(pool.map(send, jobs))
    except BaseException:  # Ctrl-C: drop what has not started; the rest ends within `timeout`
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    wall = time.perf_counter() - started
    for item in sessions:
        item.close()
    statuses: dict = {}
    failures = []
    latencies = []
    for status, elapsed, detail in results:
        statuses[status] = statuses.get(status, 0) + 1
        if detail:
            failures.append(f"{status}: {detail}")
        elif status != "skipped":
            latencies.append(elapsed)
    return Batch(wall, latencies, statuses, failures)


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        text = f"{value:,.{digits}f}"
    else:
        text = f"{value:,}"
    return f"{text}{unit}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def bench_venv_python(ctx: Context) -> Path:
    """The throwaway venv for peers and profilers (.bench-venv/), made or refreshed as needed."""
    python = BENCH_VENV / "bin" / "python"
    stamp = BENCH_VENV / ".requirements"
    wanted = PEERS_REQUIREMENTS.read_text()
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    ctx.log("setting up .bench-venv/ (peer clients and profilers from PyPI)")
    if not python.exists():
        made = subprocess.run([PYTHON, "-m", "venv", str(BENCH_VENV)], capture_output=True, text=True)
        if made.returncode != 0:
            raise BenchError(f"could not create .bench-venv: {made.stderr[-500:]}")
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", str(PEERS_REQUIREMENTS)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if installed.returncode != 0:
        raise BenchError(f"pip could not install bench/peers-requirements.txt: {installed.stderr[-800:]}")
    stamp.write_text(wanted)
    return python


def callgrind_tools() -> tuple[str, str] | None:
    """valgrind and callgrind_control, when both are installed."""
    valgrind, control = shutil.which("valgrind"), shutil.which("callgrind_control")
    return (valgrind, control) if valgrind and control else None


def instructions_per_request(
    ctx: Context,
    env: dict,
    app: str | None,
    path: str,
    prepare,
    requests_counted: int,
    warm_up: int = 100,
    connections: int = 4,
    cwd: Path = ROOT,
) -> dict[str, float]:
    """Machine instructions the server command executes per POST, counted by valgrind's callgrind.

    The server (the Procfile's web command serving app, every process under callgrind,
    counting off until the load starts) is started, prepare(url) returns the bodies to count
    ({label: body}), and each body in turn gets `warm_up` requests, then `requests_counted`
    more from `connections` keep-alive connections while the processes count. The server
    starts in `cwd`, so the Procfile, serve.py and the app are that tree's (another
    revision's checkout, say). User-space instructions only: the kernel's work (system calls,
    scheduling) is not counted. The count does not depend on what else the machine is doing,
    and repeats to within about one percent over a few hundred requests.
    """
    import http.client

    tools = callgrind_tools()
    if tools is None:
        raise BenchError("valgrind is not installed")
    valgrind, control = tools
    port = int(env["PORT"])
    out = ctx.scratch(f"callgrind-{port}")
    command, env = procfile_command(ctx, env, app, root=cwd)
    command = [
        valgrind,
        "--tool=callgrind",
        "--trace-children=yes",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}/callgrind.%p",
        *command,
    ]
    server = ctx.start(
        f"callgrind-{app or 'server'}", command, env, ready_url=f"http://{LOCAL}:{port}/health", timeout=300, cwd=cwd
    )
    try:
        bodies = prepare(f"http://{LOCAL}:{port}")
        processes = [server.pid] + server_workers(server)

        def tell(*args: str) -> None:
            for pid in processes:
                subprocess.run([control, *args, str(pid)], capture_output=True, timeout=60)

        counts = {}
        for label, body in bodies.items():
            payload = json.dumps(body)

            def post(count: int, payload: str = payload) -> None:
                connection = http.client.HTTPConnection(LOCAL, port, timeout=120)
                try:
                    for _ in range(count):
                        connection.request("POST", path, payload, {"Content-Type": "application/json"})
                        answer = connection.getresponse()
                        answer.read()
                        if answer.status != 200:
                            raise BenchError(f"{app} answered {answer.status} under callgrind")
                finally:
                    connection.close()

            def load_from_all(total: int) -> None:
                with ThreadPoolExecutor(connections) as pool:
                    list(pool.map(post, [total // connections] * connections))

            load_from_all(warm_up)
            seen = set(out.glob("callgrind.*.*"))
            tell("--instr=on")
            tell("--zero")
            load_from_all(requests_counted)
            tell("--dump")
            tell("--instr=off")  # the next body's warm-up runs uninstrumented, several times faster
            # One new dump per process, named callgrind.<pid>.<n>; the totals line is written last.
            totals: dict[str, int] = {}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(totals) < len(processes):
                for dump in set(out.glob("callgrind.*.*")) - seen:
                    found = re.findall(r"^(?:totals|summary): (\d+)", dump.read_text(errors="replace"), re.M)
                    if found:
                        totals[dump.name] = int(found[-1])
                time.sleep(0.2)
            if len(totals) < len(processes):
                raise BenchError(f"callgrind wrote {len(totals)} of {len(processes)} counts for {app}")
            counts[label] = sum(totals.values()) / (requests_counted // connections * connections)
        return counts
    finally:
        ctx.stop(server)
