"""upkeep.py: rounds of background work, one process at a time, every UPKEEP_SECONDS."""

from __future__ import annotations

import logging
import threading

import pytest

import server
import upkeep
from config import load_settings
from store import open_store
from tests.helpers import SERVER_DEFAULTS, wait_until


def recorder(ran: list[str], name: str):
    return name, lambda: ran.append(name)


def test_one_process_runs_a_round_per_interval_and_a_dead_ones_lease_expires(backend):
    ran: list[str] = []
    # Two workers sharing the store: SQLite and Redis through two connections, as two processes
    # have; a memory store can only be shared within its process.
    store = backend.open()
    other = store if backend.kind == "memory" else backend.open()
    first = upkeep.Upkeep(store, [recorder(ran, "first")], interval=1)
    second = upkeep.Upkeep(other, [recorder(ran, "second")], interval=1)
    assert first.run_round() is True
    assert second.run_round() is False
    assert first.run_round() is False  # not twice within the interval either
    backend.elapse(1.01)  # the first worker died, or simply has not come round again
    assert second.run_round() is True
    assert first.run_round() is False
    assert ran == ["first", "second"]


def test_a_failing_task_is_logged_by_name_and_the_round_goes_on(caplog):
    ran: list[str] = []

    def broken():
        raise RuntimeError("store unreachable")

    rounds = upkeep.Upkeep(
        open_store("memory://"), [("reconcile payments", broken), recorder(ran, "redeliver")], interval=15
    )
    with caplog.at_level(logging.ERROR, logger="upkeep"):
        assert rounds.run_round() is True
    assert ran == ["redeliver"]
    assert "upkeep: reconcile payments failed; the round goes on" in caplog.text
    assert "store unreachable" in caplog.text


def test_rounds_come_every_interval_until_stopped():
    counted = threading.Semaphore(0)
    rounds = upkeep.Upkeep(open_store("memory://"), [("count", counted.release)], interval=0.05)
    rounds.start()
    for _ in range(3):
        assert counted.acquire(timeout=5)
    rounds.stop()
    assert not any(thread.name == "upkeep" for thread in threading.enumerate())


def test_an_interval_must_be_positive():
    with pytest.raises(ValueError):
        upkeep.Upkeep(open_store("memory://"), [], interval=0)


def serving_app(**env):
    return server.create_app(load_settings({**SERVER_DEFAULTS, "MPESA_BASE_URL": "http://127.0.0.1:9", **env}))


def test_a_serving_process_runs_the_reconcile_and_webhook_rounds():
    app = serving_app(UPKEEP_SECONDS="30", MERCHANT_WEBHOOK_URL="http://127.0.0.1:9/hooks", WEBHOOK_SECRET="s" * 16)
    running = server.start_background_work(app)
    try:
        assert running is not None and running.interval == 30
        assert [name for name, _ in running.tasks] == ["reconcile payments", "redeliver webhooks"]
        assert app.extensions["upkeep"] is running
        # The first round runs at once: its lease is in the store.
        assert wait_until(lambda: app.extensions["store"].get_value(upkeep.LEASE_KEY))
    finally:
        running.stop()
        app.extensions["webhooks"].close()


def test_upkeep_seconds_0_turns_the_rounds_off():
    app = serving_app(UPKEEP_SECONDS="0")
    assert server.start_background_work(app) is None
    assert "upkeep" not in app.extensions


def test_apps_built_for_tests_run_no_rounds():
    assert "upkeep" not in serving_app().extensions
