"""gunicorn settings that fit the configured store (used by the Procfile).

memory://  one process with threads: a memory store cannot be shared between
           processes, so asking for more workers stops start-up.
sqlite/redis  several workers (WEB_CONCURRENCY, default 2 per core + 1), threads each.
In simulator mode the Daraja simulator runs once, as a child process of the gunicorn
master, and every worker talks to it (each worker starting its own would split the
simulated prompts between them).
"""
import multiprocessing
import os
import subprocess
import sys
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
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
timeout = 60  # a push may wait up to DARAJA_TIMEOUT for Daraja
graceful_timeout = 20
keepalive = 5
accesslog = None  # the app logs one line per request itself

if _settings.store_kind == "memory":
    if int(os.environ.get("WEB_CONCURRENCY", "1")) > 1:
        sys.exit("Configuration error: STORE_URL=memory:// cannot be shared by several workers; "
                 "use sqlite:/// or redis:// for WEB_CONCURRENCY > 1")
    workers = 1
else:
    workers = int(os.environ.get("WEB_CONCURRENCY", str(multiprocessing.cpu_count() * 2 + 1)))

_simulator_process = None


def on_starting(server):
    """Start one shared Daraja simulator when no Daraja is configured."""
    global _simulator_process
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


def on_exit(server):
    if _simulator_process is not None:
        _simulator_process.terminate()
