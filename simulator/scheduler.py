"""The simulator's timer: callables run after a delay on one daemon thread.

Automatic answers, prompt expiry and delayed callbacks are all timed here, so no request handler
sleeps waiting for them.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Scheduler:
    """Runs callables after a delay on one daemon thread; cancellable, never blocks callers."""

    def __init__(self, name: str = "simulator-scheduler"):
        self._queue: list[list] = []  # heap of [due, handle, callable or None when cancelled]
        self._entries: dict[int, list] = {}
        self._handles = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_later(self, delay: float, fn: Callable, *args) -> int:
        """Run fn(*args) in `delay` seconds; returns a handle for cancel()."""
        entry = [time.monotonic() + max(delay, 0.0), next(self._handles), functools.partial(fn, *args)]
        with self._cond:
            heapq.heappush(self._queue, entry)
            self._entries[entry[1]] = entry
            self._cond.notify()
        return entry[1]

    def cancel(self, handle: int | None) -> None:
        """Forget a call not yet run; an unknown or spent handle is ignored."""
        with self._cond:
            entry = self._entries.pop(handle, None)
            if entry:
                entry[2] = None

    def clear(self) -> None:
        """Forget every call not yet run."""
        with self._cond:
            self._queue.clear()
            self._entries.clear()

    def close(self) -> None:
        """Forget every call and stop the thread."""
        with self._cond:
            self._closed = True
            self.clear()
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._queue or self._queue[0][0] > time.monotonic()):
                    self._cond.wait(self._queue[0][0] - time.monotonic() if self._queue else None)
                if self._closed:
                    return
                _, handle, fn = heapq.heappop(self._queue)
                self._entries.pop(handle, None)
            if fn is not None:
                try:
                    fn()
                except Exception:
                    log.exception("simulator: scheduled task failed")
