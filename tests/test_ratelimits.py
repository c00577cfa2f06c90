"""Rate limits counted in the store: exact push windows, and poll windows counted from shares.

The poll limit's promise (docs/configuration.md): a client is never allowed more than the
limit in a window, and with W workers sharing the store it is allowed at least
limit - (W - 1) x share before its first 429, a share being 1/20 of the limit.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

import ratelimits
from tests.helpers import CALLBACK_TOKEN, PROCFILE_COMMAND, ServerProcess, free_port, wait_until, workers_ready


def workers(backend, store, count: int, limit: str = "120/minute") -> list[ratelimits.RateLimits]:
    """What each of `count` worker processes sharing the store would hold."""
    return [ratelimits.RateLimits(store, {"status": limit, "push": limit}, clock=backend.clock) for _ in range(count)]


@pytest.mark.parametrize("count", [1, 3, 5])
def test_polls_across_workers_stay_between_the_bound_and_the_limit(store, backend, count):
    limit, share = 120, 120 // ratelimits.SHARE_OF_LIMIT
    serving = workers(backend, store, count)
    order = random.Random(count)
    allowed = 0
    while serving[order.randrange(count)].poll("status", "client-1").allowed:
        allowed += 1
    assert limit - (count - 1) * share <= allowed <= limit
    # Whatever the workers still hold, the window never lets more through than the limit.
    later = sum(worker.poll("status", "client-1").allowed for worker in serving for _ in range(2 * share))
    assert allowed + later <= limit
    if count == 1:
        assert allowed == limit and later == 0  # one worker counts exactly


def test_a_poll_refused_says_when_to_come_back(store, backend):
    (worker,) = workers(backend, store, 1, "3/minute")
    answers = [worker.poll("status", "client-1") for _ in range(4)]
    assert [answer.allowed for answer in answers] == [True, True, True, False]
    headers = answers[-1].headers(backend.clock())
    assert 0 < int(headers["Retry-After"]) <= 60
    assert headers["X-RateLimit-Limit"] == "3" and headers["X-RateLimit-Remaining"] == "0"
    assert "Retry-After" not in answers[0].headers(backend.clock())


def test_each_client_and_each_rule_has_its_own_window(store, backend):
    (worker,) = workers(backend, store, 1, "2/minute")
    assert all(worker.poll("status", "client-1").allowed for _ in range(2))
    assert not worker.poll("status", "client-1").allowed
    assert worker.poll("status", "client-2").allowed
    assert worker.look("push", "client-1").allowed


def test_pushes_are_looked_at_and_counted_exactly_across_workers(store, backend):
    first, second = workers(backend, store, 2, "3/minute;5/hour")
    for worker in (first, second, first):
        assert worker.look("push", "phone-1").allowed
        worker.count("push", "phone-1")
    assert not first.look("push", "phone-1").allowed
    assert not second.look("push", "phone-1").allowed
    assert second.look("push", "phone-2").allowed


def test_a_look_takes_nothing(store, backend):
    (worker,) = workers(backend, store, 1, "1/minute")
    assert all(worker.look("push", "phone-1").allowed for _ in range(5))
    worker.count("push", "phone-1")
    assert not worker.look("push", "phone-1").allowed


def test_the_tightest_window_answers(store, backend):
    (worker,) = workers(backend, store, 1, "10/minute;2/hour")
    worker.count("push", "phone-1")
    verdict = worker.look("push", "phone-1")
    assert (verdict.limit, verdict.remaining) == (2, 1)


@pytest.mark.parametrize("text", ["", "often", "3/fortnight", "0/minute"])
def test_a_limit_setting_that_cannot_be_read_is_refused(text):
    with pytest.raises(ratelimits.InvalidLimit):
        ratelimits.parse(text)


def test_a_bad_limit_setting_stops_start_up_with_one_line():
    result = subprocess.run(
        [sys.executable, "server.py"],
        env={"MPESA_ENV": "simulator", "RATE_LIMIT_STATUS_PER_IP": "lots", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "RATE_LIMIT_STATUS_PER_IP" in result.stderr and "Traceback" not in result.stderr


def test_workers_share_the_poll_limit(simulator, tmp_path):
    limit, count = 40, 3
    share = limit // ratelimits.SHARE_OF_LIMIT
    port = free_port()
    env = {
        "MPESA_ENV": "simulator",
        "MPESA_BASE_URL": simulator.url,
        "PORT": str(port),
        "CALLBACK_URL": f"http://127.0.0.1:{port}",
        "CALLBACK_TOKEN": CALLBACK_TOKEN,
        "STORE_URL": f"sqlite:///{tmp_path / 'payments.db'}",
        "WEB_CONCURRENCY": str(count),
        "RATELIMIT_ENABLED": "true",
        "RATE_LIMIT_STATUS_PER_IP": f"{limit}/hour",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "LOG_FORMAT": "json",
    }
    server = ServerProcess(PROCFILE_COMMAND, env, port, tmp_path / "server.log")
    try:
        url = server.url + "/stkpush/status/pay_000000000000000000000000"

        def poll(_) -> int:
            # A connection per poll, so that the polls are dealt out among the workers.
            with requests.Session() as session:
                return session.get(url, timeout=10).status_code

        with ThreadPoolExecutor(count) as pool:
            # Until every worker has loaded the app, the first one takes every request: wait for all three.
            wait_until(lambda: workers_ready((tmp_path / "server.log").read_text()) >= count, timeout=30, every=0.2)
            codes: list[int] = []
            while not codes or codes[-1] != 429:
                codes.extend(pool.map(poll, range(count)))
            codes.extend(pool.map(poll, range(3 * count * share)))
        allowed = codes.count(404)  # an unknown payment: a poll let through
        assert limit - (count - 1) * share <= allowed <= limit, codes
        assert set(codes) == {404, 429}
        wait_until(lambda: len(polled_by(tmp_path / "server.log")) > 1, timeout=10)  # dealt out among them
    finally:
        server.kill()


def polled_by(log_path) -> set[int]:
    """The workers that wrote a request line for a poll."""
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    return {line["pid"] for line in lines if line.get("path", "").startswith("/stkpush/status/")}


def test_a_burst_of_threads_on_one_worker_is_refused_only_past_the_limit(store, backend):
    (worker,) = workers(backend, store, 1, "100/minute")  # a share of 5 polls
    start = threading.Barrier(40)
    answers: list[bool] = []

    def client() -> None:
        start.wait()
        answers.extend(worker.poll("status", "busy-client").allowed for _ in range(2))

    threads = [threading.Thread(target=client) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers.count(True) == 80, "threads finding the share used up at once must not each take one"
    assert sum(worker.poll("status", "busy-client").allowed for _ in range(30)) == 20
