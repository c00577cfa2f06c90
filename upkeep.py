"""Upkeep: the work no request asks for, done in the background of every serving process.

Some work has no request to start it: payments left pending past TRANSACTION_TTL after an
outage, webhook events whose process died before their next attempt. The serving processes
(server.app_from_environment: each uWSGI worker after the fork, `python server.py`) each
run one daemon thread that, every UPKEEP_SECONDS, tries to take a lease in the shared store

    store.add("upkeep:lease", {...}, ttl=UPKEEP_SECONDS)

and runs a round only when it gets it. So a round runs about once per interval across every
worker and machine sharing the store, and a worker that dies holds nothing for long: its
lease expires with the interval. A round runs its tasks in order; a task that raises is
logged with its name and the round goes on to the next one.

The lease keeps the work from being done once per worker; it is not what makes it safe.
Rounds may still overlap (a round that outlasts its lease, the `flask reconcile` command
run by hand), so each task guards itself: Payments.reconcile takes a lock per payment
before its last query, and WebhookSender.redeliver_pending leaves alone the events that
are being sent or not yet due.

Not started by create_app (tests build many apps) nor for `flask` commands, which do this
work themselves.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

LEASE_KEY = "upkeep:lease"

Task = tuple[str, Callable[[], object]]  # (name for the logs, what to call)


class Upkeep:
    """Runs `tasks` every `interval` seconds on a daemon thread, in one process at a time."""

    def __init__(self, store, tasks: Sequence[Task], interval: float, *, clock: Callable[[], float] = time.time):
        if not interval > 0:
            raise ValueError("the upkeep interval must be a positive number of seconds")
        self.store = store
        self.tasks = list(tasks)
        self.interval = interval
        self.clock = clock
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run a round now, then one every interval, until stop()."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="upkeep", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the task under way, if any; wait at most timeout seconds for it."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_round(self) -> bool:
        """Run every task if this process takes the lease; False when another process holds it."""
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "at": self.clock()}
        try:
            if not self.store.add(LEASE_KEY, holder, self.interval):
                return False
        except Exception:
            log.exception("upkeep: the lease could not be taken; trying again in %gs", self.interval)
            return False
        for name, task in self.tasks:
            if self._stopping.is_set():
                break
            try:
                task()
            except Exception:
                log.exception("upkeep: %s failed; the round goes on", name)
        return True

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.run_round()
            self._stopping.wait(self.interval)
