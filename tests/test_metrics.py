"""Monitoring over real HTTP: /metrics, /stats, X-Request-ID and the JSON request logs.

In-process servers share one metrics registry (the process's), so those tests compare a
scrape taken before with one taken after. The Procfile test starts from zero and checks
that several workers' numbers add up.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import select
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

import simulator as sim_module
from mpesa import mask_checkout_id
from serve import listen_queue
from telemetry import metrics
from telemetry.logs import JsonFormatter, log_time, mask_phones_on
from telemetry.requestlog import API_SECURITY_HEADERS, SECURITY_HEADERS, RequestLog
from tests.helpers import PROCFILE_COMMAND, ServerProcess, callback_body, free_port, wait_until

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
    """Keeps each record it is given."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_each_request_is_logged_once_with_its_id_and_counted_when_answered(live_server_factory):
    kept, server_log = Kept(), logging.getLogger("server")
    server_log.addHandler(kept)
    level = server_log.level
    server_log.setLevel(logging.INFO)
    try:
        live = live_server_factory(ADMIN_TOKEN=ADMIN)
        before = total(scrape(live.url), "mpesa_http_request_duration_seconds_count", route="/health")
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda n: live.get("/health", headers={"X-Request-ID": f"many-{n}"}), range(40)))
        assert {answer.headers["X-Request-ID"] for answer in answers} == {f"many-{n}" for n in range(40)}
        logged = [record for record in kept.records if getattr(record, "request_id", "").startswith("many-")]
        assert sorted(record.request_id for record in logged) == sorted(f"many-{n}" for n in range(40))
        assert all(record.path == "/health" and record.status == 200 for record in logged)
        assert total(scrape(live.url), "mpesa_http_request_duration_seconds_count", route="/health") == before + 40
    finally:
        server_log.removeHandler(kept)
        server_log.setLevel(level)


def answering(status: str, headers: list[tuple[str, str]]):
    """A WSGI app that answers every request with status and headers."""

    def app(environ, start_response):
        start_response(status, list(headers))
        return [b"{}"]

    return app


@pytest.fixture
def request_lines():
    """What the `server` logger writes while a test runs, as JSON lines with phones masked."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    mask_phones_on(handler)
    server_log = logging.getLogger("server")
    level = server_log.level
    server_log.addHandler(handler)
    server_log.setLevel(logging.INFO)
    yield stream
    server_log.removeHandler(handler)
    server_log.setLevel(level)


def serve(app, method: str, path: str, **environ) -> dict:
    """The headers RequestLog(app) sends for one request."""
    sent = {}
    RequestLog(app)(
        {"REQUEST_METHOD": method, "PATH_INFO": path, "wsgi.url_scheme": "http", **environ},
        lambda status, headers, exc_info=None: sent.update(headers),
    )
    return sent


ODD_PATH = '/pay/"quoted"\\tab\t\u00e9\u4e2d\U0001f600'
HTTPS = {"wsgi.url_scheme": "https"}


@pytest.mark.parametrize(
    "method, path, given_id, address, logged_path, logged_id",
    [
        ("POST", "/stkpush", "trace-0001", "127.0.0.1", "/stkpush", "trace-0001"),
        # What a client can put in a path, and a request with no known address.
        ("GET", ODD_PATH, None, None, ODD_PATH, None),
        ("BREW", "/", "a" * 64, "::1", "/", "a" * 64),
        (
            "GET",
            "/stkpush/status/ws_CO_051220261234567890",
            None,
            "10.0.0.1",
            "/stkpush/status/" + mask_checkout_id("ws_CO_051220261234567890"),
            None,
        ),
        ("POST", "/hooks/stk/secret-token", None, "10.0.0.1", "/hooks/stk/***", None),  # the callback secret
        # A phone polled for as if it were an id, under a request id a client chose.
        ("GET", "/stkpush/status/0712345678", "254712345678", "::1", "/stkpush/status/0712****78", "2547******78"),
    ],
    ids=["plain", "odd-path-no-address", "odd-method", "checkout-id", "callback", "phone"],
)
def test_a_request_line_carries_the_request_fields_with_secrets_masked(
    request_lines, method, path, given_id, address, logged_path, logged_id
):
    environ = {"REMOTE_ADDR": address} if address else {}
    if given_id:
        environ["HTTP_X_REQUEST_ID"] = given_id
    sent = serve(answering("404 NOT FOUND", [("Content-Type", "application/json")]), method, path, **environ)
    (line,) = request_lines.getvalue().splitlines()
    entry = json.loads(line)
    assert list(entry) == [
        "time",
        "level",
        "logger",
        "pid",
        "request_id",
        "message",
        "method",
        "path",
        "status",
        "duration_ms",
        "remote_addr",
    ]
    assert entry["request_id"] == (logged_id or sent["X-Request-ID"])
    assert (entry["method"], entry["path"], entry["status"], entry["remote_addr"]) == (
        method,
        logged_path,
        404,
        address,
    )
    assert isinstance(entry["duration_ms"], float)
    assert entry["message"] == f"{method} {logged_path} 404 {entry['duration_ms']:.1f}ms"
    assert (entry["level"], entry["logger"], entry["pid"]) == ("INFO", "server", os.getpid())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])


def test_json_answers_and_pages_get_their_own_security_headers(request_lines):
    json_answer = serve(answering("200 OK", [("Content-Type", "application/json")]), "POST", "/stkpush/status")
    assert {name: json_answer.get(name) for name, _ in API_SECURITY_HEADERS} == dict(API_SECURITY_HEADERS)
    assert "X-Frame-Options" not in json_answer and "Strict-Transport-Security" not in json_answer
    assert re.fullmatch(r"[0-9a-f]{32}", json_answer["X-Request-ID"])

    page = serve(answering("200 OK", [("Content-Type", "text/html; charset=utf-8")]), "GET", "/pay.html", **HTTPS)
    assert {name: page.get(name) for name, _ in SECURITY_HEADERS} == dict(SECURITY_HEADERS)
    assert page["Strict-Transport-Security"] == "max-age=31536000"

    # A header the app set itself is left as it is.
    cached = serve(answering("200 OK", [("Content-Type", "text/css"), ("X-Frame-Options", "SAMEORIGIN")]), "GET", "/x")
    assert cached["X-Frame-Options"] == "SAMEORIGIN"


def test_requests_no_route_matched_are_counted_under_fixed_labels(request_lines):
    def counted() -> float:
        return sum(
            sample.value
            for family in metrics.HTTP_SECONDS.collect()
            for sample in family.samples
            if sample.name.endswith("_count")
            and sample.labels == {"method": "other", "route": "unmatched", "status": "418"}
        )

    before = counted()
    serve(answering("418 I'M A TEAPOT", [("Content-Type", "text/plain")]), "BREW", "/ws_CO_051220261234567890")
    assert counted() == before + 1


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
    assert not [path for path in paths if path.startswith("/stkpush/status")], "a successful poll writes no line"
    assert "/hooks/stk/***" in paths
    assert len({e["request_id"] for e in requests_logged}) == len(requests_logged)
    assert_private(text, checkout_id)


def test_status_polls_handset_polls_and_pending_queries_keep_the_log_quiet(process_env, tmp_path):
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
        assert requests.get(f"{server.url}/stkpush/status/pay_000000000000000000000000", timeout=5).status_code == 404
        polls_counted = total(
            scrape(server.url),
            "mpesa_http_request_duration_seconds_count",
            route="/stkpush/status/<payment_or_checkout_id>",
        )
    finally:
        server.kill(signal.SIGTERM)
    entries = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.startswith("{")]
    assert any(e.get("path") == "/stkpush" for e in entries)
    # Successful polls are counted, not logged; a poll that fails still gets its line.
    polls_logged = [(e["path"], e["status"]) for e in entries if str(e.get("path", "")).startswith("/stkpush/status")]
    assert polls_logged == [("/stkpush/status/pay_000000000000000000000000", 404)]
    assert polls_counted >= 2
    assert not [e for e in entries if str(e.get("path", "")).startswith("/simulator/prompts")]
    assert not [e for e in entries if e["level"] in ("WARNING", "ERROR")], "a waiting prompt is no warning"


def test_python_server_logs_text_when_asked(process_env, tmp_path):
    server, checkout_id = pay_and_spoof_on_python_server(process_env, tmp_path / "server.log", "text")
    text = server.log_path.read_text()
    assert re.search(rf"\[{server.process.pid}\] INFO server: POST /stkpush 200 [\d.]+ms", text)
    assert "/hooks/stk/*** 403" in text
    assert not any(line.startswith("{") for line in text.splitlines())
    assert_private(text, checkout_id)


# ------------------------------------------------------------ several workers (the Procfile's command)


def serving(log_path) -> set[int]:
    """The pids of the workers that have logged a request so far."""
    return {
        json.loads(line)["pid"]
        for line in log_path.read_text().splitlines()
        if line.startswith('{"') and '"logger":"server"' in line and '"method":' in line
    }


def test_workers_numbers_add_up(process_env, tmp_path, simulator):
    port, env = process_env
    env = {
        **env,
        "STORE_URL": f"sqlite:///{tmp_path / 'payments.db'}",
        "WEB_CONCURRENCY": "3",
        "WEB_THREADS": "4",
        "LOG_FORMAT": "",  # JSON: the output is not a terminal
        # Set by the command that starts the server (the Procfile makes a fresh one), as here.
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    server = ServerProcess(PROCFILE_COMMAND, env, port, tmp_path / "server.log")
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

    lines = server.log_path.read_text().splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    served = [e for e in entries if e["logger"] == "server" and e.get("path", "").startswith("/stkpush")]
    assert len({e["pid"] for e in served if e["path"] == "/stkpush"}) > 1, "every push went to one worker"
    assert {"serve", "payments", "server"} <= {e["logger"] for e in entries}
    # uWSGI's own lines are its text, whatever LOG_FORMAT says (serve.py).
    assert sum(line.startswith("spawned uWSGI worker") for line in lines) == 3
    assert all(e["request_id"] for e in served)
    # Each forked worker draws its own ids: none is handed out twice across workers.
    assert len({e["request_id"] for e in served}) == len(served)


def test_one_worker_counts_and_logs_each_request(process_env, tmp_path):
    port, env = process_env
    env = {**env, "LOG_FORMAT": ""}  # memory store: one worker, counting in memory
    server = ServerProcess(PROCFILE_COMMAND, env, port, tmp_path / "server.log")
    try:
        checkout_id = push(server.url, "0700 000 000").json()["checkoutRequestId"]
        assert settled(server.url, checkout_id)["status"] == "completed"
        samples = scrape(server.url)
        assert total(samples, "mpesa_payments_total", status="completed") == 1
        assert total(samples, "mpesa_http_request_duration_seconds_count", route="/stkpush") == 1
    finally:
        server.kill(signal.SIGTERM)

    lines = [line for line in server.log_path.read_text().splitlines() if line.strip()]
    app_lines = [
        line
        for line in lines
        if '"logger":"server"' in line and '"method":"POST"' in line and '"path":"/stkpush"' in line
    ]
    assert len(app_lines) == 1  # the app's own line for the one push; uWSGI writes none per request
    assert not [line for line in lines if "POST /stkpush" in line and not line.startswith("{")]
    assert lines[-1] == "goodbye to uWSGI."  # SIGTERM: a graceful stop, to the end
    # A burst of new connections waits in a queue longer than uWSGI's default of 100.
    assert f"your server socket listen backlog is limited to {listen_queue()} connections" in lines
    assert listen_queue() > 100


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


# ------------------------------------------------------------------- the log handler


def line_logger(stream) -> logging.Logger:
    """A logger of its own writing JSON lines through logging's StreamHandler to stream."""
    handler = logging.StreamHandler(stream)
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


LINES_FROM_A_WORKER = """
import logging, sys, threading
from telemetry.logs import JsonFormatter
handler = logging.StreamHandler(sys.stdout)
handler.setFormatter(JsonFormatter())
log = logging.getLogger("worker")
log.addHandler(handler)
log.setLevel(logging.INFO)

def log_lines(thread):
    for n in range(150):
        log.info("worker %s thread %s line %s", sys.argv[1], thread, n, extra={"padding": "x" * (n * 23 % 3500)})

threads = [threading.Thread(target=log_lines, args=(t,)) for t in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
"""


@pytest.mark.parametrize("unbuffered", ["", "1"], ids=["buffered", "unbuffered"])
def test_lines_from_many_processes_reach_one_pipe_whole(unbuffered):
    # As the workers share the master's stdout: lines of up to 4,096 bytes, one write each.
    import subprocess

    root = Path(__file__).resolve().parent.parent
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("PROMETHEUS_MULTIPROC_DIR", "PYTHONUNBUFFERED")
    }
    read_end, write_end = os.pipe()
    received, reader = read_in_background(read_end)
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", LINES_FROM_A_WORKER, str(worker)],
            cwd=root,
            stdout=write_end,
            env={**env, "PYTHONUNBUFFERED": unbuffered},
        )
        for worker in range(4)
    ]
    os.close(write_end)
    assert [worker.wait(timeout=60) for worker in workers] == [0] * 4
    reader.join(timeout=10)
    os.close(read_end)

    lines = received.decode().splitlines()
    assert max(len(line) for line in lines) > 3500
    assert {json.loads(line)["message"] for line in lines} == {
        f"worker {w} thread {t} line {n}" for w in range(4) for t in range(4) for n in range(150)
    }
    assert len(lines) == 4 * 4 * 150


def test_a_json_line_carries_its_extras_and_what_a_filter_adds():
    stream = io.StringIO()
    logger = line_logger(stream)
    logger.handlers[0].addFilter(lambda record: setattr(record, "tenant", "shop-7") or True)
    logger.info("paid %s KES", 100, extra={"status": 200})
    entry = json.loads(stream.getvalue())
    assert list(entry)[:5] == ["time", "level", "logger", "pid", "message"]
    assert entry["message"] == "paid 100 KES" and entry["status"] == 200 and entry["tenant"] == "shop-7"
    assert stream.getvalue().endswith("}\n")


def test_a_line_time_is_utc_to_the_millisecond():
    assert log_time(1764926142.5964) == "2025-12-05T09:15:42.596Z"
    assert log_time(1764926142.9999996) == "2025-12-05T09:15:43.000Z"  # rounded to the microsecond first
    assert log_time(1764926143.0) == "2025-12-05T09:15:43.000Z"
