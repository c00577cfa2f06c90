"""Nothing is lost: SQLite across restarts and kill -9, and several gunicorn workers."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.server_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent
PAID, WAITING = "254700000000", "254712345678"
TOKEN = "test-callback-token-0123456789"


def wait_until(check, timeout=15.0, every=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError("condition not met in time")


def status(base: str, checkout_id: str) -> dict:
    return requests.post(base + "/stkpush/status", json={"checkoutRequestId": checkout_id},
                         timeout=10).json()


def push(base: str, phone: str, amount: int = 100) -> str:
    response = requests.post(base + "/stkpush", json={"phone": phone, "amount": amount}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["checkoutRequestId"]


class ServerProcess:
    """The server as an operator runs it, in its own process."""

    def __init__(self, command: list[str], env: dict, port: int, log_path: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env},
                                        stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        wait_until(self._ready, timeout=30)

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"server exited: {self.log_path.read_text()[-2000:]}")
        try:
            return requests.get(self.url + "/health", timeout=1).ok
        except (requests.ConnectionError, requests.Timeout):
            return False

    def kill(self, sig=signal.SIGKILL) -> None:
        os.killpg(self.process.pid, sig)
        self.process.wait(timeout=20)
        self._log.close()


@pytest.fixture
def server_env(simulator, tmp_path):
    port = free_port()
    requests.patch(simulator.url + "/simulator/config", json={"auto_delay": 0.2}, timeout=5)
    return port, {
        "MPESA_ENV": "simulator", "MPESA_BASE_URL": simulator.url, "PORT": str(port),
        "CALLBACK_URL": f"http://127.0.0.1:{port}", "CALLBACK_TOKEN": TOKEN,
        "STORE_URL": f"sqlite:///{tmp_path / 'payments.db'}", "RATELIMIT_ENABLED": "false",
        "STATUS_FIRST_QUERY_AFTER": "0.5", "STATUS_QUERY_INTERVAL": "0.5",
    }


def test_sqlite_keeps_payments_across_a_restart(live_server_factory, simulator, tmp_path):
    store_url = f"sqlite:///{tmp_path / 'restart.db'}"
    requests.patch(simulator.url + "/simulator/config", json={"auto_delay": 0.2}, timeout=5)
    first = live_server_factory(STORE_URL=store_url, STATUS_FIRST_QUERY_AFTER="0.3",
                                STATUS_QUERY_INTERVAL="0.3")
    paid = push(first.url, PAID)
    wait_until(lambda: status(first.url, paid)["status"] == "completed")
    waiting = push(first.url, WAITING)
    receipt = status(first.url, paid)["MpesaReceiptNumber"]
    first.stop()

    second = live_server_factory(STORE_URL=store_url, STATUS_FIRST_QUERY_AFTER="0.3",
                                 STATUS_QUERY_INTERVAL="0.3")
    assert status(second.url, paid)["MpesaReceiptNumber"] == receipt
    assert status(second.url, waiting)["status"] == "pending"
    # The customer pays while the server is "down": its callback goes to the old
    # address and is lost, so the status query settles it.
    requests.post(f"{simulator.url}/simulator/prompts/{waiting}/pin", json={"pin": "1234"}, timeout=5)
    assert wait_until(lambda: status(second.url, waiting)["status"] == "completed")


def test_kill_9_loses_nothing(server_env, tmp_path, simulator):
    port, env = server_env
    command = [sys.executable, "server.py"]
    server = ServerProcess(command, env, port, tmp_path / "server.log")
    paid = push(server.url, PAID)
    wait_until(lambda: status(server.url, paid)["status"] == "completed")
    waiting = push(server.url, WAITING)
    server.kill(signal.SIGKILL)

    restarted = ServerProcess(command, env, port, tmp_path / "server.log")
    try:
        assert status(restarted.url, paid)["status"] == "completed"
        assert status(restarted.url, waiting)["status"] == "pending"
        requests.post(f"{simulator.url}/simulator/prompts/{waiting}/pin", json={"pin": "1234"}, timeout=5)
        assert wait_until(lambda: status(restarted.url, waiting)["status"] == "completed")
    finally:
        restarted.kill(signal.SIGTERM)


def test_gunicorn_workers_share_payments_through_sqlite(server_env, tmp_path):
    port, env = server_env
    env = {**env, "WEB_CONCURRENCY": "3", "GUNICORN_THREADS": "4"}
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "server:app"]
    server = ServerProcess(command, env, port, tmp_path / "gunicorn.log")
    try:
        phones = [f"0711{n:06d}" for n in range(24)]
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda phone: push(server.url, phone), phones))
            answers = list(pool.map(lambda checkout_id: status(server.url, checkout_id), ids))
        assert all(answer["status"] == "pending" for answer in answers), answers
        log = server.log_path.read_text()
        pids = {(m.group(1), m.group(2)) for m in re.finditer(r"\[(\d+)\] INFO server: POST (/stkpush\S*) 200", log)}
        push_pids = {pid for pid, path in pids if path == "/stkpush"}
        poll_pids = {pid for pid, path in pids if path == "/stkpush/status"}
        assert len(push_pids | poll_pids) > 1, "every request went to one worker"
    finally:
        server.kill(signal.SIGTERM)
