"""gunicorn's settings for the payment server (the Procfile's `gunicorn -c gunicorn.conf.py server:app`).

Every value comes from config.load_settings(), which reads and checks the environment: the
workers (WEB_CONCURRENCY: one for a memory store, which cannot be shared), their threads
(GUNICORN_THREADS), PORT, and LOG_FORMAT (JSON lines use the app's formatter for gunicorn's
own lines too, through logging's StreamHandler; no access log, the app logs each request,
unless --access-logfile asks for gunicorn's). Every handler masks phone numbers (AppLogger).
The hooks are gunicorn's documented server hooks:

on_starting       empties the metrics directory (PROMETHEUS_MULTIPROC_DIR, which the command
                  starting gunicorn sets) and starts the Daraja simulator that every worker
                  talks to when the settings name one (SIMULATOR_PORT)
when_ready        says where the pay page is, and warns when several workers count alone
child_exit        a dead worker's live gauges leave /metrics
on_exit           stops the simulator
"""

import logging
import sys

from dotenv import load_dotenv
from gunicorn import glogging

import simulator
from config import ConfigError, load_settings
from telemetry.logs import mask_phones_on

# prometheus-client picks its mode when first imported: telemetry.metrics is imported in the
# hooks below, after .env has had its say about PROMETHEUS_MULTIPROC_DIR.
load_dotenv()
try:
    settings = load_settings()
except ConfigError as error:
    sys.exit(f"Configuration error: {error}")

bind = f"0.0.0.0:{settings.port}"
workers = settings.workers
worker_class = "gthread"
threads = settings.threads
timeout = 60  # a push may wait up to DARAJA_TIMEOUT for Daraja
graceful_timeout = 20
keepalive = 5
accesslog = None  # the app logs one line per request itself
if settings.log_format == "json":
    logconfig_dict = {  # one root handler for gunicorn's lines and the app's
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "telemetry.logs.JsonFormatter"}},
        "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}},
        "root": {"level": "INFO", "handlers": ["stdout"]},
        # gunicorn.access is left to gunicorn: silent unless --access-logfile is given.
        "loggers": {"gunicorn.error": {"handlers": [], "propagate": True}},
    }


class AppLogger(glogging.Logger):
    """gunicorn's logger, minus the access log's work when there is no access log, and with
    phone numbers masked in every line its handlers write.

    logconfig_dict makes gunicorn build every request's access-log fields and hand them to a
    logger with no handler; the app writes its own line per request instead. An
    --access-logfile still gets gunicorn's lines.
    """

    @property
    def access_log_enabled(self):
        return bool(self.cfg.accesslog)

    def setup(self, cfg):
        """gunicorn's handlers as configured (logconfig_dict's too), each given a PhoneMaskFilter:
        an access log's query strings and a worker's traceback may carry a phone number."""
        super().setup(cfg)
        for logger in (logging.getLogger(), self.error_log, self.access_log):
            for handler in logger.handlers:
                mask_phones_on(handler)


logger_class = AppLogger
_simulator = None


def on_starting(server):
    """Empty the metrics directory; start the simulator the workers share, if the settings name one."""
    global _simulator
    from telemetry import metrics  # here, in the master: every worker forked from it reports its start

    if settings.metrics_dir:
        metrics.clear(settings.metrics_dir)
    if settings.simulator_port:
        try:
            _simulator = simulator.start_process(port=settings.simulator_port)
        except RuntimeError as error:
            sys.exit(f"Configuration error: SIMULATOR_PORT={settings.simulator_port}: {error} (is the port taken?)")
        server.log.info("Daraja simulator running at %s", _simulator.url)


def when_ready(server):
    """Say where the pay page is; warn when several workers count their metrics alone."""
    server.log.info(
        "Pay page: http://127.0.0.1:%s/pay.html (mode %s, store %s (%s), rate limits and Daraja token in %s, "
        "%s worker(s))",
        settings.port,
        settings.mpesa_env,
        settings.store_kind,
        settings.store_origin,
        settings.limits_kind,
        workers,
    )
    if workers > 1 and not settings.metrics_dir:
        server.log.warning(
            "PROMETHEUS_MULTIPROC_DIR is not set: each of the %s workers counts alone, "
            "so /metrics and /stats show whichever worker answers",
            workers,
        )


def child_exit(server, worker):
    """A dead worker's live gauges leave /metrics; its counters stay in the totals."""
    if settings.metrics_dir:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid, settings.metrics_dir)


def on_exit(server):
    """Stop the simulator on_starting started."""
    if _simulator is not None:
        _simulator.stop()
