"""gunicorn settings that fit the configured store (used by the Procfile).

memory://  one process with threads: a memory store cannot be shared between
           processes, so asking for more workers stops start-up.
sqlite/redis  several workers (WEB_CONCURRENCY, default 2 per core + 1), threads each.
In simulator mode the Daraja simulator runs once, as a child process of the gunicorn
master, and every worker talks to it (each worker starting its own would split the
simulated prompts between them).

Logs are JSON lines (LOG_FORMAT=json, the default here; LOG_FORMAT=text for plain lines),
gunicorn's own included. /metrics adds up every worker's numbers: prometheus-client's
multiprocess mode, in PROMETHEUS_MULTIPROC_DIR (a fresh temporary directory unless set;
one directory per server), emptied when gunicorn starts.
"""
import glob
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time

import requests
from dotenv import load_dotenv

from config import ConfigError, load_settings

load_dotenv()
try:
    _settings = load_settings()
except ConfigError as error:
    sys.exit(f"Configuration error: {error}")

bind = f"0.0.0.0:{_settings.port}"
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS") or "8")  # an empty config var means the default
timeout = 60  # a push may wait up to DARAJA_TIMEOUT for Daraja
graceful_timeout = 20
keepalive = 5
accesslog = None  # the app logs one line per request itself

_log_format = (os.environ.get("LOG_FORMAT") or "json").strip().lower()
if _log_format not in ("json", "text"):
    sys.exit(f"Configuration error: LOG_FORMAT must be text or json (got {_log_format!r})")
os.environ["LOG_FORMAT"] = _log_format  # the workers' configure_logging reads it
if _log_format == "json":
    # One root handler for gunicorn's lines and the app's; metrics.JsonFormatter is imported
    # only after PROMETHEUS_MULTIPROC_DIR is set below (this dict is applied later).
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "metrics.JsonFormatter"}},
        "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "json",
                                "stream": "ext://sys.stdout"}},
        "root": {"level": "INFO", "handlers": ["stdout"]},
        "loggers": {"gunicorn.error": {"handlers": [], "propagate": True},
                    "gunicorn.access": {"handlers": [], "propagate": False}},
    }

# prometheus-client picks its multiprocess mode when first imported: set the directory first.
_METRICS_PREFIX = "mpesa-metrics-"
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=_METRICS_PREFIX)
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
os.environ.setdefault("METRICS_STARTED_AT", str(time.time()))  # /stats "since", for every worker

if _settings.store_kind == "memory":
    if int(os.environ.get("WEB_CONCURRENCY") or "1") > 1:
        sys.exit("Configuration error: STORE_URL=memory:// cannot be shared by several workers; "
                 "use sqlite:/// or redis:// for WEB_CONCURRENCY > 1")
    workers = 1
else:
    workers = int(os.environ.get("WEB_CONCURRENCY") or multiprocessing.cpu_count() * 2 + 1)

_simulator_process = None


def on_starting(server):
    """Empty the metrics directory; start one shared Daraja simulator when no Daraja is configured."""
    global _simulator_process
    for path in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
        os.remove(path)  # a previous run's numbers
    if not _settings.simulator or _settings.base_url:
        return
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _simulator_process = subprocess.Popen(
        [sys.executable, "-m", "simulator", "--host", "127.0.0.1", "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            requests.get(url + "/simulator/health", timeout=0.5)
            break
        except requests.ConnectionError:
            time.sleep(0.1)
    os.environ["MPESA_BASE_URL"] = url
    server.log.info("Daraja simulator running at %s", url)


def when_ready(server):
    server.log.info("Pay page: http://127.0.0.1:%s/pay.html (mode %s, store %s, %s worker(s))",
                    _settings.port, _settings.mpesa_env, _settings.store_kind, workers)


def child_exit(server, worker):
    """A dead worker's live gauges leave /metrics; its counters stay in the totals."""
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _simulator_process is not None:
        _simulator_process.terminate()
    metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    if (os.path.dirname(metrics_dir) == tempfile.gettempdir()
            and os.path.basename(metrics_dir).startswith(_METRICS_PREFIX)):
        shutil.rmtree(metrics_dir, ignore_errors=True)  # the one made above
