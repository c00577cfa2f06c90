"""Run the payment server under uWSGI, as the Procfile does: `python serve.py`.

Every value comes from config.load_settings(), which reads and checks the environment: the
workers (WEB_CONCURRENCY: one for a memory store, which cannot be shared), their threads
(WEB_THREADS), PORT, SIMULATOR_PORT and LOG_FORMAT. Before uWSGI starts, this empties the
metrics directory (PROMETHEUS_MULTIPROC_DIR, which the command starting the server sets) and
says where the pay page is; then this process becomes uWSGI's master (pyuwsgi.run does not
return). The master forks the workers; each builds the app after the fork
(server.app_from_environment), and the master runs the Daraja simulator every worker shares
when the settings name SIMULATOR_PORT, stopping it when it stops.

SIGTERM, which `docker stop` sends to the master and Heroku to every process of the dyno, stops
the server gracefully (uWSGI's own default would reload it), a worker still building the app
included: no new requests; each worker finishes those it holds and runs Python's exit handlers
(the webhook sender records the attempt under way, the upkeep stops); after WORKER_MERCY
seconds the master kills what is left.

uWSGI writes no line per request: the app logs its own, with phone numbers masked, which
uWSGI's request log would print in full. uWSGI's own lines (workers started and stopped) are
text whatever LOG_FORMAT says: it writes them itself, and its encoders would wrap the app's
JSON lines too, which share its output. Any argument but --app is passed to uWSGI, e.g.
`--stats 127.0.0.1:9191 --stats-http` for its per-worker stats.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys

import pyuwsgi
from dotenv import load_dotenv

from config import ConfigError, Settings, load_settings
from telemetry import metrics
from telemetry.logs import configure_logging

APP = "server:app_from_environment()"  # uWSGI calls the factory in each worker
WORKER_MERCY = 20  # seconds a stopping worker gets; Heroku kills the dyno's processes 30 s after SIGTERM

log = logging.getLogger("serve")


def listen_queue(wanted: int = 1024) -> int:
    """Connections the kernel may queue before a worker thread accepts one: uWSGI's default of
    100 refuses a burst of new connections early, and uWSGI will not start asking for more than
    the system allows (net.core.somaxconn, which the kernel would cap it to silently)."""
    try:
        with open("/proc/sys/net/core/somaxconn") as limit:
            return min(wanted, int(limit.read()))
    except (OSError, ValueError):
        return 100  # uWSGI's own default


def can_listen_on(port: int) -> bool:
    """Whether the simulator could listen on 127.0.0.1:port: uWSGI would only start it again and
    again if it cannot, and every push would fail."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the simulator's own server does
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def uwsgi_options(settings: Settings, app: str = APP) -> list[str]:
    """uWSGI's options for these settings."""
    options = [
        "--strict",  # an unknown option is an error, not a warning
        "--master",
        "--need-app",  # a worker that cannot build the app stops the server
        "--lazy-apps",  # each worker builds its own app, connections and threads after the fork
        "--single-interpreter",
        "--http11-socket",  # uWSGI speaks HTTP/1.1 with keep-alive itself, no router process
        f"0.0.0.0:{settings.port}",
        "--processes",
        str(settings.workers),
        "--threads",
        str(settings.threads),
        "--module",
        app,
        "--buffer-size",
        "32768",  # request line and headers; uWSGI drops a bigger request without an answer
        "--listen",
        str(listen_queue()),
        "--disable-logging",
        # Write errors (a client gone before its answer) would be logged with the path, which may hold a phone number.
        "--ignore-sigpipe",
        "--ignore-write-errors",
        "--disable-write-exception",
        "--hook-master-start",
        "unix_signal:15 gracefully_kill_them_all",
        # In a worker: from the fork (it inherits the master's handlers, which would act as a
        # master), and again once it is ready, where uWSGI makes SIGTERM a reload.
        "--hook-post-fork",
        "unix_signal:15 gracefully_kill",
        "--hook-post-fork",
        "unix_signal:1 gracefully_kill",
        "--hook-accepting",
        "unix_signal:15 gracefully_kill",
        "--worker-reload-mercy",
        str(WORKER_MERCY),
    ]
    if settings.simulator_port:
        simulator = f"{sys.executable} -m simulator --port {settings.simulator_port}"
        options += ["--attach-daemon2", f"cmd={simulator},stopsignal=15"]
    return options


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python serve.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", default=APP, help="the WSGI app, module:callable (default %(default)s)")
    arguments, more_options = parser.parse_known_args(argv)
    load_dotenv()
    try:
        settings = load_settings()
    except ConfigError as error:
        sys.exit(f"Configuration error: {error}")
    if settings.simulator_port and not can_listen_on(settings.simulator_port):
        sys.exit(f"Configuration error: SIMULATOR_PORT={settings.simulator_port}: in use (is the port taken?)")
    configure_logging(settings.log_format)
    if settings.metrics_dir:
        metrics.clear(settings.metrics_dir)
    elif settings.workers > 1:
        log.warning(
            "PROMETHEUS_MULTIPROC_DIR is not set: each of the %s workers counts alone, "
            "so /metrics and /stats show whichever worker answers",
            settings.workers,
        )
    log.info(
        "Pay page: http://127.0.0.1:%s/pay.html (mode %s, store %s (%s), rate limits and Daraja token in %s, "
        "%s worker(s) of %s threads)",
        settings.port,
        settings.mpesa_env,
        settings.store_kind,
        settings.store_origin,
        settings.limits_kind,
        settings.workers,
        settings.threads,
    )
    pyuwsgi.run(*uwsgi_options(settings, arguments.app), *more_options)


if __name__ == "__main__":
    main()
