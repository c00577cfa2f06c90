"""gunicorn settings that fit the configured store (used by the Procfile).

memory://  one process with threads: a memory store cannot be shared between
           processes, so asking for more workers stops start-up.
sqlite/redis  several workers (WEB_CONCURRENCY, default 2 per core + 1), threads each.
In simulator mode the Daraja simulator runs once, as a child process of the gunicorn
master, and every worker talks to it (each worker starting its own would split the
simulated prompts between them).

Logs are JSON lines (LOG_FORMAT=json, the default here; LOG_FORMAT=text for plain lines),
gunicorn's own included (no access log: the app logs each request; --access-logfile adds
gunicorn's). Each worker records its requests (metrics and log line) on a thread of its own
and writes its INFO lines together, each at most LOG_GATHER_SECONDS later; warnings and
errors at once. With several workers /metrics adds up every worker's numbers:
prometheus-client's multiprocess mode, in PROMETHEUS_MULTIPROC_DIR (a fresh temporary
directory unless set; one directory per server), emptied when gunicorn starts. One worker
counts in memory.
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
from gunicorn import glogging

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
    # One root handler for gunicorn's lines and the app's; metrics (its formatter and handler) is
    # imported only after PROMETHEUS_MULTIPROC_DIR is set below (this dict is applied later).
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "metrics.JsonFormatter"}},
        "handlers": {"stdout": {"class": "metrics.LineHandler", "formatter": "json", "stream": "ext://sys.stdout"}},
        "root": {"level": "INFO", "handlers": ["stdout"]},
        # gunicorn.access is left to gunicorn: silent unless --access-logfile is given.
        "loggers": {"gunicorn.error": {"handlers": [], "propagate": True}},
    }

if _settings.store_kind == "memory":
    if int(os.environ.get("WEB_CONCURRENCY") or "1") > 1:
        sys.exit(
            "Configuration error: STORE_URL=memory:// cannot be shared by several workers; "
            "use sqlite:/// or redis:// for WEB_CONCURRENCY > 1"
        )
    workers = 1
else:
    workers = int(os.environ.get("WEB_CONCURRENCY") or multiprocessing.cpu_count() * 2 + 1)

# prometheus-client picks its multiprocess mode when first imported: set the directory first.
# One worker counts in memory: multiprocess mode writes a file under a lock per observation.
# (A blank setting is dropped by metrics.py, which every process imports before prometheus-client.)
_METRICS_PREFIX = "mpesa-metrics-"
if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=_METRICS_PREFIX)
_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _metrics_dir:
    os.makedirs(_metrics_dir, exist_ok=True)
os.environ.setdefault("METRICS_STARTED_AT", str(time.time()))  # /stats "since", for every worker


class AppLogger(glogging.Logger):
    """gunicorn's logger, minus the access log's work when there is no access log.

    logconfig_dict below makes gunicorn build every request's access-log fields and hand
    them to a logger with no handler; the app writes its own line per request instead.
    An --access-logfile still gets gunicorn's lines.
    """

    @property
    def access_log_enabled(self):
        return bool(self.cfg.accesslog)


logger_class = AppLogger
LOG_GATHER_SECONDS = 0.1  # how long a request may wait to be recorded, and an INFO line to be written

_simulator_process = None


def on_starting(server):
    """Empty the metrics directory; start one shared Daraja simulator when no Daraja is configured."""
    global _simulator_process
    for path in glob.glob(os.path.join(_metrics_dir, "*.db")) if _metrics_dir else ():
        os.remove(path)  # a previous run's numbers
    if not _settings.simulator or _settings.base_url:
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _simulator_process = subprocess.Popen(
        [sys.executable, "-m", "simulator", "--host", "127.0.0.1", "--port", str(port)]
    )
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
    server.log.info(
        "Pay page: http://127.0.0.1:%s/pay.html (mode %s, store %s, %s worker(s))",
        _settings.port,
        _settings.mpesa_env,
        _settings.store_kind,
        workers,
    )


def post_worker_init(worker):
    """Each worker records its requests (metrics, log line) on a thread of its own, and writes its
    INFO lines together, each at most LOG_GATHER_SECONDS later (requestlog.defer,
    metrics.LineHandler.gather): started here, after the fork, so the master runs neither thread."""
    import logging

    import metrics
    import requestlog

    requestlog.defer(LOG_GATHER_SECONDS)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, metrics.LineHandler):
            handler.gather(LOG_GATHER_SECONDS)


def child_exit(server, worker):
    """A dead worker's live gauges leave /metrics; its counters stay in the totals."""
    if _metrics_dir:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _simulator_process is not None:
        _simulator_process.terminate()
    if (
        _metrics_dir
        and os.path.dirname(_metrics_dir) == tempfile.gettempdir()
        and os.path.basename(_metrics_dir).startswith(_METRICS_PREFIX)
    ):
        shutil.rmtree(_metrics_dir, ignore_errors=True)  # the one made above
