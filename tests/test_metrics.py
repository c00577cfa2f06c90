"""Monitoring over real HTTP: /metrics, /stats, X-Request-ID and the JSON request logs.

In-process servers share one metrics registry (the process's), so those tests compare a
scrape taken before with one taken after. The gunicorn test starts from zero and checks
that several workers' numbers add up.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import select
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

import simulator as sim_module
from mpesa import mask_checkout_id, mask_phones
from telemetry import requestlog
from telemetry.logs import TEXT_LOG_FORMAT, JsonFormatter, LineHandler, mask_phones_on
from telemetry.requestlog import RequestRecord
from tests.helpers import ServerProcess, callback_body, free_port, wait_until

ADMIN = "admin-secret-0123456789"
TOKEN = "test-callback-token-0123456789"
PAID, CANCELLED, UNREACHABLE = "254700000000", "254700001032", "254700001037"
WAITING = "254712345678"  # waits for the simulated handset
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def scrape(base: str) -> dict:
    """{(sample name, sorted labels): value} from one /metrics answer."""
    response = requests.get(base + "/metrics", headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def total(samples: dict, name: str, **labels) -> float:
    """The sum of the samples called name whose labels include labels."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


def push(base: str, phone: str, headers: dict | None = None) -> requests.Response:
    return requests.post(base + "/stkpush", json={"phone": phone, "amount": 100}, headers=headers, timeout=10)


def status(base: str, checkout_id: str) -> dict:
    return requests.get(f"{base}/stkpush/status/{checkout_id}", timeout=10).json()


def settled(base: str, checkout_id: str, until=lambda answer: answer["status"] != "pending") -> dict:
    return wait_until(
        lambda: (lambda answer: answer if until(answer) else None)(status(base, checkout_id)), timeout=10, every=0.05
    )


@pytest.fixture
def live(live_server_factory):
    return live_server_factory(ADMIN_TOKEN=ADMIN, TRANSACTION_TTL="2")


# ------------------------------------------------------------- /metrics and /stats


def test_metrics_count_outcomes_callbacks_and_latencies(live):
    before, stats_before = scrape(live.url), live.get("/stats").json()

    paid = push(live.url, PAID).json()["checkoutRequestId"]
    cancelled = push(live.url, CANCELLED).json()["checkoutRequestId"]
    unreachable = push(live.url, UNREACHABLE).json()["checkoutRequestId"]
    waiting = push(live.url, WAITING).json()["checkoutRequestId"]
    assert push(live.url, WAITING).status_code == 502  # the phone already has a prompt
    assert settled(live.url, paid)["status"] == "completed"
    assert settled(live.url, cancelled)["reason"] == "cancelled"
    assert settled(live.url, unreachable)["reason"] == "timeout"
    assert settled(live.url, waiting)["reason"] == "timeout"  # our own verdict, after 2 s

    # The customer pays after all: a late result. Then a spoofed, a repeated, an unknown
    # and a malformed callback.
    live.sim("POST", f"/simulator/prompts/{waiting}/pin", json={"pin": sim_module.SIM_PIN})
    settled(live.url, waiting, until=lambda answer: answer["status"] == "completed")
    assert live.post("/hooks/stk/guessed-token-guessed-token", json=callback_body(paid)).status_code == 403
    assert live.post(f"/hooks/stk/{TOKEN}", json=callback_body(paid)).status_code == 200
    assert live.post(f"/hooks/stk/{TOKEN}", json=callback_body("ws_CO_unknown")).status_code == 200
    assert live.post(f"/hooks/stk/{TOKEN}", json={"Body": {}}).status_code == 400

    after = scrape(live.url)

    def grew(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert grew("mpesa_payments_total") == 5
    assert grew("mpesa_payments_total", status="failed", reason="rejected", settled_by="push") == 1
    assert grew("mpesa_payments_total", status="completed", reason="none", settled_by="callback") == 1
    assert grew("mpesa_payments_total", status="failed", reason="cancelled", settled_by="callback") == 1
    assert grew("mpesa_payments_total", status="failed", reason="timeout", settled_by="callback") == 1
    assert grew("mpesa_payments_total", status="failed", reason="timeout", settled_by="timeout") == 1
    assert grew("mpesa_payments_late_results_total", status="completed", reason="none") == 1

    assert grew("mpesa_callbacks_total", outcome="settled") == 4
    assert grew("mpesa_callbacks_total", outcome="duplicate") == 1
    assert grew("mpesa_callbacks_total", outcome="unmatched") == 1
    assert grew("mpesa_callbacks_total", outcome="bad_token") == 1
    assert grew("mpesa_callbacks_total", outcome="malformed") == 1
    assert grew("mpesa_callbacks_total", outcome="not_allowed") == 0

    assert grew("mpesa_stk_push_duration_seconds_count", result="ok") == 4
    assert grew("mpesa_stk_push_duration_seconds_bucket", result="ok", le="+Inf") == 4
    assert grew("mpesa_stk_push_duration_seconds_bucket", result="ok", le="30.0") == 4
    assert grew("mpesa_stk_push_duration_seconds_sum", result="ok") > 0
    assert grew("mpesa_stk_push_duration_seconds_count", result="error") == 1
    assert grew("mpesa_daraja_errors_total", call="stk_push", error="DarajaRequestError", code="500.001.1001") == 1
    assert grew("mpesa_stk_query_duration_seconds_count", result="ok") >= 1  # the last query

    assert grew("mpesa_http_request_duration_seconds_count", method="POST", route="/stkpush", status="200") == 4
    assert (
        grew("mpesa_http_request_duration_seconds_count", method="POST", route="/hooks/stk/<token>", status="403") == 1
    )
    assert grew("mpesa_http_request_duration_seconds_count", route="/stkpush/status/<payment_or_checkout_id>") >= 4

    # Labels never carry a phone number, an id or the callback token.
    for _, labels in after:
        for _, label in labels:
            assert not re.search(r"\d{9}", label) and "ws_CO" not in label and TOKEN not in label

    stats = live.get("/stats").json()
    assert stats["success"] is True
    assert stats["payments"] - stats_before["payments"] == 5  # the refused push is a failed payment too
    assert stats["byStatus"]["completed"] - stats_before["byStatus"]["completed"] == 1
    assert stats["byStatus"]["failed"] - stats_before["byStatus"]["failed"] == 4
    assert stats["byReason"]["rejected"] - stats_before["byReason"].get("rejected", 0) == 1
    assert stats["byReason"]["cancelled"] - stats_before["byReason"].get("cancelled", 0) == 1
    assert stats["byReason"]["timeout"] - stats_before["byReason"].get("timeout", 0) == 2
    assert stats["lateResults"] - stats_before["lateResults"] == 1
    assert stats["successRate"] == round(stats["byStatus"]["completed"] / stats["payments"], 4)
    assert stats["since"].endswith("Z")


def test_metrics_need_the_admin_token_and_are_off_without_one(live_server_factory):
    guarded = live_server_factory(ADMIN_TOKEN=ADMIN)
    refused = guarded.get("/metrics")
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
    assert guarded.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert guarded.get("/metrics", headers={"Authorization": ADMIN}).status_code == 401
    answer = guarded.get("/metrics", headers=AUTH)
    assert answer.status_code == 200 and "# TYPE mpesa_payments_total counter" in answer.text

    off = live_server_factory()
    assert off.get("/metrics").status_code == 404
    assert off.get("/metrics", headers=AUTH).status_code == 404
    assert off.get("/stats").status_code == 200  # simulator mode: the test page shows it


def test_stats_need_the_admin_token_outside_simulator_mode(live_server_factory):
    sandbox = {
        "MPESA_ENV": "sandbox",
        "MPESA_CONSUMER_KEY": sim_module.SIM_CONSUMER_KEY,
        "MPESA_CONSUMER_SECRET": sim_module.SIM_CONSUMER_SECRET,
    }
    guarded = live_server_factory(ADMIN_TOKEN=ADMIN, **sandbox)
    assert guarded.get("/stats").status_code == 401
    assert guarded.get("/stats", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert guarded.get("/stats", headers=AUTH).json()["success"] is True
    assert live_server_factory(**sandbox).get("/stats", headers=AUTH).status_code == 404


# -------------------------------------------------------------------- X-Request-ID


@pytest.mark.parametrize(
    "given, kept",
    [
        (None, False),
        ("req-42_a.B", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("has space", False),
        ("semi;colon", False),
        ("", False),
    ],
)
def test_request_id_is_reused_when_sane_and_generated_otherwise(live_server_factory, given, kept):
    live = live_server_factory()
    headers = {} if given is None else {"X-Request-ID": given}
    echoed = live.get("/health", headers=headers).headers["X-Request-ID"]
    if kept:
        assert echoed == given
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", echoed)
        assert echoed != live.get("/health", headers=headers).headers["X-Request-ID"]


def test_errors_and_refused_callbacks_carry_a_request_id_too(live_server_factory):
    live = live_server_factory()
    assert live.get("/nope").headers["X-Request-ID"]
    refused = live.post("/hooks/stk/wrong-token-wrong-token", json={}, headers={"X-Request-ID": "cb-1"})
    assert refused.status_code == 403 and refused.headers["X-Request-ID"] == "cb-1"


class Kept(logging.Handler):
    """Keeps each record it is given, with the name of the thread that logged it."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[logging.LogRecord, str]] = []

    def emit(self, record):
        self.records.append((record, threading.current_thread().name))


def test_deferred_requests_are_recorded_by_the_request_log_thread(live_server_factory, monkeypatch):
    # As in a gunicorn worker (gunicorn.conf.py's post_worker_init).
    monkeypatch.setattr(requestlog, "_served", None)
    monkeypatch.setattr(requestlog, "_waiting", threading.Event())
    kept, server_log = Kept(), logging.getLogger("server")
    server_log.addHandler(kept)
    level = server_log.level
    server_log.setLevel(logging.INFO)
    try:
        live = live_server_factory(ADMIN_TOKEN=ADMIN)
        before = total(scrape(live.url), "mpesa_http_request_duration_seconds_count", route="/health")
        requestlog.defer(0.05)
        with ThreadPoolExecutor(8) as pool:
            ids = {
                answer.headers["X-Request-ID"]
                for answer in pool.map(
                    lambda n: live.get("/health", headers={"X-Request-ID": f"deferred-{n}"}), range(40)
                )
            }
        assert ids == {f"deferred-{n}" for n in range(40)}

        def recorded():
            return [
                (record, thread)
                for record, thread in kept.records
                if getattr(record, "request_id", "").startswith("deferred-")
            ]

        wait_until(lambda: len(recorded()) == 40, timeout=5, every=0.05)
        assert {record.request_id for record, _ in recorded()} == ids
        assert {thread for _, thread in recorded()} == {"request-log"}
        assert all(record.path == "/health" and record.status == 200 for record, _ in recorded())
        # The line's time is when the request was served, not when it was recorded.
        assert all(record.created <= time.time() for record, _ in recorded())
        wait_until(
            lambda: (
                total(scrape(live.url), "mpesa_http_request_duration_seconds_count", route="/health") >= before + 40
            ),
            timeout=5,
            every=0.05,
        )
    finally:
        server_log.removeHandler(kept)
        server_log.setLevel(level)


DEFERRED_AT_EXIT = """
import logging, sys
from telemetry import logs, requestlog
handler = logs.LineHandler(sys.stdout)
handler.setFormatter(logs.JsonFormatter())
logging.basicConfig(level=logging.INFO, handlers=[handler])
requestlog.defer(3600)   # the thread sleeps past the exit: the exit records what waits

def app(environ, start_response):
    start_response("201 Created", [("Content-Type", "text/plain")])
    return [b"made"]

served = requestlog.RequestLog(app)
for n in range(3):
    served({"REQUEST_METHOD": "POST", "PATH_INFO": f"/made/{n}", "REMOTE_ADDR": "127.0.0.1",
            "HTTP_X_REQUEST_ID": f"exit-{n}"}, lambda status, headers, exc_info=None: None)
print("served", flush=True)
"""


def test_requests_still_waiting_are_recorded_at_exit():
    import subprocess

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", DEFERRED_AT_EXIT],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=30,
        env={name: value for name, value in os.environ.items() if name != "PROMETHEUS_MULTIPROC_DIR"},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "served"  # nothing was recorded while the program ran
    entries = [json.loads(line) for line in lines[1:]]
    assert [(e["request_id"], e["path"], e["status"]) for e in entries] == [
        (f"exit-{n}", f"/made/{n}", 201) for n in range(3)
    ]


# ------------------------------------------------------------------- request logs


@pytest.fixture
def process_env(simulator, tmp_path):
    """Environment for a server in its own process, using the test simulator."""
    requests.patch(simulator.url + "/simulator/config", json={"auto_delay": 0.1}, timeout=5)
    port = free_port()
    return port, {
        "MPESA_ENV": "simulator",
        "MPESA_BASE_URL": simulator.url,
        "PORT": str(port),
        "CALLBACK_URL": f"http://127.0.0.1:{port}",
        "CALLBACK_TOKEN": TOKEN,
        "RATELIMIT_ENABLED": "false",
        "ADMIN_TOKEN": ADMIN,
        "PYTHONUNBUFFERED": "1",
        "STORE_URL": "memory://",
    }


def pay_and_spoof(base: str) -> str:
    """One paid payment (with X-Request-ID trace-0001), polled by id, and a spoofed callback."""
    response = push(base, "0700 000 000", headers={"X-Request-ID": "trace-0001"})
    assert response.status_code == 200 and response.headers["X-Request-ID"] == "trace-0001"
    checkout_id = response.json()["checkoutRequestId"]
    assert settled(base, checkout_id)["status"] == "completed"
    requests.post(base + "/hooks/stk/guessed-token-guessed-token", json={}, timeout=10)
    return checkout_id


def assert_private(text: str, checkout_id: str) -> None:
    for secret in (PAID, "0700000000", "700000000", TOKEN, "guessed-token", checkout_id, ADMIN):
        assert secret not in text, secret


def pay_and_spoof_on_python_server(process_env, log_path, log_format: str) -> tuple[ServerProcess, str]:
    """`python server.py` with LOG_FORMAT=log_format: pay once, spoof a callback, stop."""
    port, env = process_env
    server = ServerProcess([sys.executable, "server.py"], {**env, "LOG_FORMAT": log_format}, port, log_path)
    try:
        return server, pay_and_spoof(server.url)
    finally:
        server.kill(signal.SIGTERM)


def test_json_request_logs_carry_the_request_fields_and_no_secrets(process_env, tmp_path):
    started = datetime.now(UTC).replace(microsecond=0)
    server, checkout_id = pay_and_spoof_on_python_server(process_env, tmp_path / "server.log", "json")
    ended = datetime.now(UTC)
    text = server.log_path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    # Flask's own two start-up lines (" * Serving Flask app", " * Debug mode") are not logs.
    entries = [json.loads(line) for line in lines if not line.startswith(" * ")]
    assert len(entries) == len([line for line in lines if not line.startswith(" * ")]) > 5

    requests_logged = [e for e in entries if e["logger"] == "server" and "method" in e]
    push_line = next(e for e in requests_logged if e["path"] == "/stkpush")
    assert push_line["request_id"] == "trace-0001" and push_line["method"] == "POST"
    assert push_line["status"] == 200 and push_line["remote_addr"] == "127.0.0.1"
    assert push_line["pid"] == server.process.pid and push_line["level"] == "INFO"
    assert isinstance(push_line["duration_ms"], float)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", push_line["time"])
    assert started <= datetime.fromisoformat(push_line["time"].replace("Z", "+00:00")) <= ended
    assert push_line["message"].startswith("POST /stkpush 200 ")
    # Every line made while serving the push carries its id: the Daraja call, the payment.
    traced = {e["logger"] for e in entries if e.get("request_id") == "trace-0001"}
    assert {"mpesa", "payments", "server"} <= traced

    paths = {e["path"] for e in requests_logged}
    assert f"/stkpush/status/{mask_checkout_id(checkout_id)}" in paths
    assert "/hooks/stk/***" in paths
    assert len({e["request_id"] for e in requests_logged}) == len(requests_logged)
    assert_private(text, checkout_id)


def test_handset_polls_and_pending_queries_keep_the_log_quiet(process_env, tmp_path):
    port, env = process_env
    env = {**env, "LOG_FORMAT": "json", "STATUS_FIRST_QUERY_AFTER": "0", "STATUS_QUERY_INTERVAL": "1"}
    server = ServerProcess([sys.executable, "server.py"], env, port, tmp_path / "server.log")
    try:
        pushed = requests.post(server.url + "/stkpush", json={"phone": WAITING, "amount": 10}, timeout=10).json()
        for _ in range(5):  # the simulated handset asks for its prompts every second
            assert requests.get(server.url + "/simulator/prompts", params={"phone": WAITING}, timeout=5).ok

        def asked_daraja() -> bool:
            requests.get(f"{server.url}/stkpush/status/{pushed['checkoutRequestId']}", timeout=5)
            return "still being processed" in server.log_path.read_text()

        wait_until(asked_daraja, timeout=20)
    finally:
        server.kill(signal.SIGTERM)
    entries = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.startswith("{")]
    assert any(e.get("path") == "/stkpush" for e in entries)
    assert not [e for e in entries if str(e.get("path", "")).startswith("/simulator/prompts")]
    assert not [e for e in entries if e["level"] in ("WARNING", "ERROR")], "a waiting prompt is no warning"


def test_python_server_logs_text_when_asked(process_env, tmp_path):
    server, checkout_id = pay_and_spoof_on_python_server(process_env, tmp_path / "server.log", "text")
    text = server.log_path.read_text()
    assert re.search(rf"\[{server.process.pid}\] INFO server: POST /stkpush 200 [\d.]+ms", text)
    assert "/hooks/stk/*** 403" in text
    assert not any(line.startswith("{") for line in text.splitlines())
    assert_private(text, checkout_id)


# ------------------------------------------------------------ several gunicorn workers


def serving(log_path) -> set[int]:
    """The pids of the workers that have logged a request so far."""
    return {
        json.loads(line)["pid"]
        for line in log_path.read_text().splitlines()
        if line.startswith('{"') and '"logger":"server"' in line and '"method":' in line
    }


def test_gunicorn_workers_numbers_add_up(process_env, tmp_path, simulator):
    port, env = process_env
    env = {
        **env,
        "STORE_URL": f"sqlite:///{tmp_path / 'payments.db'}",
        "WEB_CONCURRENCY": "3",
        "GUNICORN_THREADS": "4",
        "LOG_FORMAT": "",  # JSON: the output is not a terminal
        # Set by the command that starts gunicorn (the Procfile makes a fresh one), as here.
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    server = ServerProcess(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "server:app"], env, port, tmp_path / "gunicorn.log"
    )
    try:
        with ThreadPoolExecutor(12) as pool:
            # Until every worker has loaded the app, the first one takes every request.
            wait_until(
                lambda: (
                    list(pool.map(lambda _: requests.get(server.url + "/health", timeout=5), range(12)))
                    and len(serving(server.log_path)) == 3
                ),
                timeout=30,
                every=0.2,
            )
            phones = [f"0711{n:06d}" for n in range(12)]
            ids = [r.json()["checkoutRequestId"] for r in pool.map(lambda p: push(server.url, p), phones)]
            for checkout_id in ids:
                requests.post(
                    f"{simulator.url}/simulator/prompts/{checkout_id}/pin", json={"pin": sim_module.SIM_PIN}, timeout=5
                )
            answers = list(pool.map(lambda checkout_id: settled(server.url, checkout_id), ids))
        assert all(answer["status"] == "completed" for answer in answers)

        # Each worker records its requests at most 0.1 s after serving them (requestlog.defer).
        wait_until(
            lambda: total(scrape(server.url), "mpesa_http_request_duration_seconds_count", route="/stkpush") == 12,
            timeout=5,
            every=0.05,
        )
        for _ in range(3):  # whichever worker answers, it adds up every worker's numbers
            samples = scrape(server.url)
            assert total(samples, "mpesa_payments_total", status="completed") == 12
            assert total(samples, "mpesa_payments_total") == 12
            assert total(samples, "mpesa_callbacks_total", outcome="settled") == 12
            assert total(samples, "mpesa_stk_push_duration_seconds_count", result="ok") == 12
            assert total(samples, "mpesa_stk_push_duration_seconds_bucket", le="+Inf") == 12
            assert total(samples, "mpesa_http_request_duration_seconds_count", route="/stkpush") == 12
        stats = requests.get(server.url + "/stats", timeout=5).json()
        assert stats["payments"] == 12 and stats["successRate"] == 1.0
        assert stats["pushes"] == {"accepted": 12, "failed": 0}
    finally:
        server.kill(signal.SIGTERM)

    entries = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.strip()]
    served = [e for e in entries if e["logger"] == "server" and e.get("path", "").startswith("/stkpush")]
    assert len({e["pid"] for e in served if e["path"] == "/stkpush"}) > 1, "every push went to one worker"
    assert {"gunicorn.error"} <= {e["logger"] for e in entries}  # gunicorn's own lines are JSON too
    assert all(e["request_id"] for e in served)
    # Each forked worker draws its own ids: none is handed out twice across workers.
    assert len({e["request_id"] for e in served}) == len(served)


@pytest.mark.parametrize("access_log", [False, True])
def test_gunicorn_with_one_worker_counts_and_logs_each_request(process_env, tmp_path, access_log):
    port, env = process_env
    env = {**env, "LOG_FORMAT": ""}  # memory store: one worker, counting in memory
    extra = ["--access-logfile", "-"] if access_log else []
    server = ServerProcess(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *extra, "server:app"],
        env,
        port,
        tmp_path / "gunicorn.log",
    )
    try:
        checkout_id = push(server.url, "0700 000 000").json()["checkoutRequestId"]
        assert settled(server.url, checkout_id)["status"] == "completed"
        assert total(scrape(server.url), "mpesa_payments_total", status="completed") == 1
        wait_until(
            lambda: total(scrape(server.url), "mpesa_http_request_duration_seconds_count", route="/stkpush") == 1,
            timeout=5,
            every=0.05,
        )
    finally:
        server.kill(signal.SIGTERM)

    lines = [line for line in server.log_path.read_text().splitlines() if line.strip()]
    app_lines = [
        line
        for line in lines
        if '"logger":"server"' in line and '"method":"POST"' in line and '"path":"/stkpush"' in line
    ]
    assert len(app_lines) == 1  # the app's own line for the one push
    gunicorn_access = [line for line in lines if '"POST /stkpush HTTP/1.1" 200' in line]
    assert len(gunicorn_access) == (1 if access_log else 0)
    # The worker's last INFO line, logged as it exits, is written before it is gone.
    assert any('"message":"Worker exiting' in line for line in lines)


def test_a_blank_metrics_directory_setting_stops_start_up(process_env):
    # prometheus-client would take an empty PROMETHEUS_MULTIPROC_DIR for the working directory.
    import subprocess

    _, env = process_env
    root = Path(__file__).resolve().parent.parent
    before = set(root.glob("*.db"))
    out = subprocess.run(
        [sys.executable, "server.py"],
        cwd=root,
        env={**os.environ, **env, "PROMETHEUS_MULTIPROC_DIR": ""},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "Configuration error: PROMETHEUS_MULTIPROC_DIR is set but empty: unset it, or name a directory"
    ]
    assert set(root.glob("*.db")) == before, "metrics files written to the working directory"


# ------------------------------------------------------------------- the log handler


def line_logger(stream) -> logging.Logger:
    """A logger of its own writing JSON lines through LineHandler to stream."""
    handler = LineHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"test-lines-{id(stream)}")
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    return logger


def read_in_background(read_end: int) -> tuple[bytearray, threading.Thread]:
    """What a thread started here reads from read_end until the other end is closed."""
    received = bytearray()
    reader = threading.Thread(
        target=lambda: [received.extend(chunk) for chunk in iter(lambda: os.read(read_end, 65536), b"")]
    )
    reader.start()
    return received, reader


def test_lines_from_many_threads_reach_a_pipe_whole_and_in_full():
    read_end, write_end = os.pipe()
    received, reader = read_in_background(read_end)
    with os.fdopen(write_end, "w") as stream:
        logger = line_logger(stream)

        def log_lines(thread):
            for n in range(200):
                logger.info("thread %s line %s", thread, n, extra={"padding": "x" * (n % 300)})

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(log_lines, range(8)))
        try:
            raise ValueError("a traceback longer than one atomic pipe write " + "y" * 5000)
        except ValueError:
            logger.exception("failed")
    reader.join(timeout=10)
    os.close(read_end)

    entries = [json.loads(line) for line in received.decode().splitlines()]
    assert len(entries) == 8 * 200 + 1
    assert {(e["message"]) for e in entries[:-1]} == {f"thread {t} line {n}" for t in range(8) for n in range(200)}
    assert entries[-1]["message"] == "failed" and "y" * 5000 in entries[-1]["exception"]
    assert len(received.decode().splitlines()[-1]) > select.PIPE_BUF


def test_the_line_handler_writes_to_a_stream_without_a_file_too():
    stream = io.StringIO()
    line_logger(stream).info("paid %s KES", 100, extra={"status": 200})
    entry = json.loads(stream.getvalue())
    assert entry["message"] == "paid 100 KES" and entry["status"] == 200
    assert stream.getvalue().endswith("}\n")


def waiting_in(pipe_end: int) -> list[str]:
    """The lines written to a non-blocking pipe so far (none: nothing was written)."""
    data = b""
    while True:
        try:
            chunk = os.read(pipe_end, 65536)
        except BlockingIOError:
            return data.decode().splitlines()
        data += chunk


def test_gathered_lines_wait_and_go_out_in_order_before_a_warning_or_at_flush():
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    with os.fdopen(write_end, "w") as stream:
        logger = line_logger(stream)
        handler = logger.handlers[0]
        handler.gather(3600)  # its writer thread does not wake during this test
        for n in range(3):
            logger.info("paid %s", n)
        assert waiting_in(read_end) == []
        logger.warning("Daraja slow")  # at once, after the lines logged before it
        assert [json.loads(line)["message"] for line in waiting_in(read_end)] == [
            "paid 0",
            "paid 1",
            "paid 2",
            "Daraja slow",
        ]
        logger.info("paid 3")
        handler.flush()
        assert [json.loads(line)["message"] for line in waiting_in(read_end)] == ["paid 3"]
        logger.info("paid 4")
        handler.close()  # logging.shutdown at exit: what waits goes out, and later lines at once
        logger.info("paid 5")
        assert [json.loads(line)["message"] for line in waiting_in(read_end)] == ["paid 4", "paid 5"]
    os.close(read_end)


def test_the_writer_thread_writes_gathered_lines_whole_from_many_threads():
    read_end, write_end = os.pipe()
    received, reader = read_in_background(read_end)
    with os.fdopen(write_end, "w") as stream:
        logger = line_logger(stream)
        logger.handlers[0].gather(0.05)

        def log_lines(thread):
            for n in range(200):
                if n % 2:
                    logger.info("thread %s line %s", thread, n, extra={"padding": "x" * (n % 300)})
                else:
                    logger.handle(RequestRecord("POST", f"/t{thread}/{n}", 200, 1.5, "127.0.0.1", f"id-{n}"))

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(log_lines, range(8)))
        # No flush: the writer thread alone writes them, within a few of its rounds.
        wait_until(lambda: received.count(b"\n") == 8 * 200, timeout=10, every=0.05)
        time.sleep(0.3)  # idle: the writer sleeps until the next line comes
        logger.info("after a pause")
        wait_until(lambda: received.count(b"\n") == 8 * 200 + 1, timeout=10, every=0.05)
        logger.handlers[0].close()
    reader.join(timeout=10)
    os.close(read_end)

    entries = [json.loads(line) for line in received.decode().splitlines()]
    assert len(entries) == 8 * 200 + 1 and entries.pop()["message"] == "after a pause"
    assert {e["message"] for e in entries if "padding" in e} == {
        f"thread {t} line {n}" for t in range(8) for n in range(1, 200, 2)
    }
    requests_logged = [e for e in entries if "path" in e]
    assert {e["path"] for e in requests_logged} == {f"/t{t}/{n}" for t in range(8) for n in range(0, 200, 2)}
    assert all(
        e["message"] == f"POST {e['path']} 200 1.5ms"
        and e["status"] == 200
        and e["request_id"] == "id-" + e["path"].rsplit("/", 1)[1]
        for e in requests_logged
    )


@pytest.mark.parametrize(
    "formatter",
    [
        JsonFormatter(),
        logging.Formatter(
            TEXT_LOG_FORMAT + " %(filename)s %(module)s %(funcName)s %(lineno)d "
            "%(msecs)03d %(relativeCreated)d %(levelno)s %(exc_text)s %(remote_addr)s"
        ),
    ],
    ids=["json", "text"],
)
@pytest.mark.parametrize(
    "fields",
    [
        ("POST", "/stkpush", 200, 34.9, "127.0.0.1", "trace-0001"),
        # What a client can put in a path, and a request with no known address.
        ("GET", '/pay/"quoted"\\tab\t\u00e9\u4e2d\U0001f600', 404, 0.0, None, "x"),
        ("BREW", "/", 418, 12345.6, "::1", "a" * 64),
    ],
    ids=["plain", "odd-path-no-address", "odd-method"],
)
def test_the_request_record_formats_as_a_standard_record_would(formatter, fields):
    method, path, status, duration_ms, remote_addr, request_id = fields
    made = RequestRecord(*fields)
    standard = logging.getLogger("server").makeRecord(
        "server",
        logging.INFO,
        requestlog.__file__,
        0,
        "%s %s %s %.1fms",
        (method, path, status, duration_ms),
        None,
        "RequestLog",
        {
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": duration_ms,
            "remote_addr": remote_addr,
            "request_id": request_id,
        },
    )
    standard.created, standard.msecs = made.created, made.msecs
    assert abs(standard.relativeCreated - made.relativeCreated) < 1000 * (time.time() - made.created) + 1
    standard.relativeCreated = made.relativeCreated
    assert formatter.format(made) == formatter.format(standard)
    assert made.process == os.getpid()
    if isinstance(formatter, JsonFormatter):
        assert made.json_line() is not None  # the line came from the record's own json_line()
        assert json.loads(formatter.format(made))["path"] == path


def test_a_request_record_a_filter_has_added_to_is_written_out_in_full():
    made = RequestRecord("POST", "/stkpush", 200, 1.5, "127.0.0.1", "trace-0002")
    made.tenant = "shop-7"  # as a logging.Filter on the handler may do
    entry = json.loads(JsonFormatter().format(made))
    assert made.json_line() is None
    assert entry["tenant"] == "shop-7" and entry["path"] == "/stkpush" and entry["request_id"] == "trace-0002"


# ------------------------------------------------------------------- a batch of requests recorded

BATCH = [  # RequestLog's facts: (created, method, path, route, status, seconds, remote_addr, request_id)
    (1764926142.5964, "POST", "/stkpush/status", "/stkpush/status", 200, 0.0012, "127.0.0.1", "f" * 32),
    (
        1764926142.9999996,
        "GET",
        "/stkpush/status/ws_CO_051220261234567890",
        "/stkpush/status/<checkout_id>",
        404,
        0.25,
        None,
        "trace-1",
    ),
    (1764926143.0, "BREW", '/pay/"q"\\\t\u00e9\U0001f600', None, 418, 31.0, "::1", "x"),
    (1764926143.25, "GET", "/hooks/stk/secret-token", "/hooks/stk/<token>", 403, 0.005, "10.0.0.1", "y"),
    # A phone polled for as if it were an id, under a request id a client chose.
    (
        1764926143.5,
        "GET",
        "/stkpush/status/0712345678",
        "/stkpush/status/<checkout_id>",
        404,
        0.001,
        "::1",
        "254712345678",
    ),
]


@pytest.fixture
def sole_json_handler(monkeypatch):
    """A handler as gunicorn.conf.py and configure_logging leave the root logger's in a worker:
    gathering, JSON lines, the request-id and phone filters. Its lines go to the pipe returned."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    stream = os.fdopen(write_end, "w")
    handler = LineHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(requestlog.RequestIdFilter())
    mask_phones_on(handler)
    handler.gather(3600)  # written when flushed
    server_log = logging.getLogger("server")
    monkeypatch.setattr(server_log, "handlers", [])
    monkeypatch.setattr(server_log, "filters", [])
    monkeypatch.setattr(server_log, "propagate", True)
    monkeypatch.setattr(server_log, "disabled", False)
    level = server_log.level
    server_log.setLevel(logging.INFO)
    yield handler, read_end
    server_log.setLevel(level)
    handler.close()
    stream.close()
    os.close(read_end)


@contextmanager
def root_handlers(*handlers):
    """The root logger with these handlers alone (pytest adds its own for each test)."""
    kept = logging.root.handlers[:]
    logging.root.handlers[:] = handlers
    try:
        yield
    finally:
        logging.root.handlers[:] = kept


def recorded_lines(handler: LineHandler, read_end: int) -> list[str]:
    handler.flush()
    return waiting_in(read_end)


def test_request_lines_made_without_records_are_the_lines_logging_makes(sole_json_handler):
    handler, read_end = sole_json_handler
    with root_handlers(handler):
        assert requestlog._sole_json_handler() is handler
        requestlog.record_requests(BATCH)
        made_directly = recorded_lines(handler, read_end)

        server_log = logging.getLogger("server")
        server_log.addFilter(lambda record: True)  # a filter could change a record: each goes through logging
        assert requestlog._sole_json_handler() is None
        requestlog.record_requests(BATCH)
        through_logging = recorded_lines(handler, read_end)

    assert made_directly == through_logging and len(made_directly) == len(BATCH)
    entries = [json.loads(line) for line in made_directly]
    assert [(e["method"], e["status"], e["request_id"], e["remote_addr"]) for e in entries] == [
        (method, status, mask_phones(request_id), address) for _, method, _, _, status, _, address, request_id in BATCH
    ]
    assert entries[0]["message"] == "POST /stkpush/status 200 1.2ms" and entries[0]["duration_ms"] == 1.2
    assert entries[1]["path"] == "/stkpush/status/" + mask_checkout_id("ws_CO_051220261234567890")
    assert entries[2]["path"] == BATCH[2][2]
    assert entries[3]["path"] == "/hooks/stk/***"  # the callback secret never reaches a log
    assert entries[4]["path"] == "/stkpush/status/0712****78" and entries[4]["request_id"] == "2547******78"
    assert entries[0]["time"] == "2025-12-05T09:15:42.596Z" and entries[1]["time"] == "2025-12-05T09:15:43.000Z"
    assert all(e["pid"] == os.getpid() and e["level"] == "INFO" and e["logger"] == "server" for e in entries)


def test_request_lines_made_without_records_round_each_duration_as_the_record_does(sole_json_handler):
    # The direct lines print the duration once with one decimal; a record holds it rounded.
    handler, read_end = sole_json_handler
    edges = [0.0, 1e-9, 0.00005, 0.00015, 0.00025, 0.00035, 0.0000499999, 0.00095, 0.0999999, 29.99995]
    rng = random.Random(6)
    seconds = edges + [rng.uniform(0, 0.05) for _ in range(60)] + [rng.uniform(0, 60) for _ in range(20)]
    batch = [
        (1764926142.5 + n, "POST", "/stkpush/status", "/stkpush/status", 200, value, "127.0.0.1", f"id-{n}")
        for n, value in enumerate(seconds)
    ]
    with root_handlers(handler):
        requestlog.record_requests(batch)
        made_directly = recorded_lines(handler, read_end)
        logging.getLogger("server").addFilter(lambda record: True)
        requestlog.record_requests(batch)
        through_logging = recorded_lines(handler, read_end)
    assert len(made_directly) == len(batch) and made_directly == through_logging
    assert [json.loads(line)["duration_ms"] for line in made_directly] == [round(s * 1000, 1) for s in seconds]


def add_handler_filter(handler):
    handler.addFilter(lambda record: True)


def add_logger_handler(handler):
    logging.getLogger("server").addHandler(logging.NullHandler())


def add_root_handler(handler):
    logging.root.handlers.append(logging.NullHandler())


def text_lines(handler):
    handler.setFormatter(logging.Formatter(TEXT_LOG_FORMAT))


def warnings_only(handler):
    handler.setLevel(logging.WARNING)


def not_propagated(handler):
    logging.getLogger("server").propagate = False


@pytest.mark.parametrize(
    "change", [add_handler_filter, add_logger_handler, add_root_handler, text_lines, warnings_only, not_propagated]
)
def test_request_lines_go_through_logging_whenever_logging_is_set_up_otherwise(sole_json_handler, change):
    handler, read_end = sole_json_handler
    with root_handlers(handler):
        change(handler)
        assert requestlog._sole_json_handler() is None
        requestlog.record_requests(BATCH[:1])
        lines = recorded_lines(handler, read_end)
    if change in (warnings_only, not_propagated):
        assert lines == []  # as logging would have it
    elif change is text_lines:
        assert lines == [
            logging.Formatter(TEXT_LOG_FORMAT).format(
                RequestRecord("POST", "/stkpush/status", 200, 1.2, "127.0.0.1", "f" * 32, BATCH[0][0])
            )
        ]
    else:
        assert [json.loads(line)["request_id"] for line in lines] == ["f" * 32]


def test_a_handler_that_is_not_gathering_gets_each_line_through_logging(monkeypatch):
    stream = io.StringIO()
    handler = LineHandler(stream)  # gather() not called: lines are written at once
    handler.setFormatter(JsonFormatter())
    server_log = logging.getLogger("server")
    monkeypatch.setattr(server_log, "handlers", [])
    monkeypatch.setattr(server_log, "filters", [])
    level = server_log.level
    server_log.setLevel(logging.INFO)
    try:
        with root_handlers(handler):
            assert requestlog._sole_json_handler() is None
            requestlog.record_requests(BATCH[:2])
    finally:
        server_log.setLevel(level)
    assert [json.loads(line)["request_id"] for line in stream.getvalue().splitlines()] == ["f" * 32, "trace-1"]


def test_a_batch_of_requests_is_observed_as_each_request_would_be():
    from prometheus_client import CollectorRegistry, Histogram

    from telemetry import metrics

    route = f"/batch-{os.getpid()}-{time.monotonic_ns()}"
    # On the bounds, between them, past the last, and nothing at all.
    durations = [0.0, 0.005, 0.0051, 0.01, 0.3, 0.3, 10.0, 30.0, 31.0, 120.0]
    one_by_one = Histogram(
        "one_by_one_seconds",
        "each observed",
        ["method", "route", "status"],
        buckets=metrics.HTTP_BUCKETS,
        registry=CollectorRegistry(),
    )
    for seconds in durations:
        one_by_one.labels("POST", route, "200").observe(seconds)
    metrics.requests_served([("POST", route, 200, seconds) for seconds in durations] + [("BREW", None, 418, 0.02)])

    def samples(collector, name):
        return {
            (sample.name.replace(name, ""), sample.labels.get("le")): sample.value
            for family in collector.collect()
            for sample in family.samples
            if sample.labels.get("route") == route and not sample.name.endswith("_created")
        }

    batched = samples(metrics.HTTP_SECONDS, "mpesa_http_request_duration_seconds")
    assert batched == pytest.approx(samples(one_by_one, "one_by_one_seconds"))
    assert batched[("_count", None)] == len(durations) and batched[("_bucket", "0.005")] == 2
    unmatched = [
        sample
        for family in metrics.HTTP_SECONDS.collect()
        for sample in family.samples
        if sample.labels.get("route") == "unmatched"
        and sample.labels.get("method") == "other"
        and sample.labels.get("status") == "418"
        and sample.name.endswith("_count")
    ]
    assert unmatched and unmatched[0].value >= 1


def test_lines_handed_over_after_the_handler_closed_are_written_at_once():
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    with os.fdopen(write_end, "w") as stream:
        handler = LineHandler(stream)
        handler.gather(3600)
        handler.gather_lines(['{"message":"waiting"}'])
        assert waiting_in(read_end) == []
        handler.close()  # what waits goes out; later lines are written at once
        handler.gather_lines(['{"message":"late 1"}', '{"message":"late 2"}'])
        assert [json.loads(line)["message"] for line in waiting_in(read_end)] == ["waiting", "late 1", "late 2"]
    os.close(read_end)
