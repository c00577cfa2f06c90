"""Nothing is lost: SQLite across restarts and kill -9, and several workers under the Procfile's command."""

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

from tests.helpers import CALLBACK_TOKEN as TOKEN
from tests.helpers import (
    PAID,
    PROCFILE_COMMAND,
    ROOT,
    WAITING,
    ServerProcess,
    free_port,
    requests_by_worker,
    stats_options,
    wait_until,
)


def status(base: str, checkout_id: str) -> dict:
    return requests.post(base + "/stkpush/status", json={"checkoutRequestId": checkout_id}, timeout=10).json()


def push(base: str, phone: str, amount: int = 100) -> str:
    """Start a payment; its CheckoutRequestID."""
    return pushed(base, phone, amount)["checkoutRequestId"]


def pushed(base: str, phone: str, amount: int = 100) -> dict:
    """Start a payment; the server's answer."""
    response = requests.post(base + "/stkpush", json={"phone": phone, "amount": amount}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def server_env(simulator, tmp_path):
    port = free_port()
    requests.patch(simulator.url + "/simulator/config", json={"auto_delay": 0.2}, timeout=5)
    return port, {
        "MPESA_ENV": "simulator",
        "MPESA_BASE_URL": simulator.url,
        "PORT": str(port),
        "CALLBACK_URL": f"http://127.0.0.1:{port}",
        "CALLBACK_TOKEN": TOKEN,
        "STORE_URL": f"sqlite:///{tmp_path / 'payments.db'}",
        "RATELIMIT_ENABLED": "false",
        "STATUS_FIRST_QUERY_AFTER": "0.5",
        "STATUS_QUERY_INTERVAL": "0.5",
    }


def test_sqlite_keeps_payments_across_a_restart(live_server_factory, simulator, tmp_path):
    store_url = f"sqlite:///{tmp_path / 'restart.db'}"
    requests.patch(simulator.url + "/simulator/config", json={"auto_delay": 0.2}, timeout=5)
    first = live_server_factory(STORE_URL=store_url, STATUS_FIRST_QUERY_AFTER="0.3", STATUS_QUERY_INTERVAL="0.3")
    paid = push(first.url, PAID)
    wait_until(lambda: status(first.url, paid)["status"] == "completed")
    waiting = push(first.url, WAITING)
    receipt = status(first.url, paid)["MpesaReceiptNumber"]
    first.stop()

    second = live_server_factory(STORE_URL=store_url, STATUS_FIRST_QUERY_AFTER="0.3", STATUS_QUERY_INTERVAL="0.3")
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


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def shared_store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return request.getfixturevalue(f"clean_{request.param}_url")


def procfile_server(
    env: dict, port: int, log_path: Path, workers: int = 4, options: tuple[str, ...] = ()
) -> ServerProcess:
    env = {**env, "WEB_CONCURRENCY": str(workers), "WEB_THREADS": "4"}
    return ServerProcess([*PROCFILE_COMMAND, *options], env, port, log_path)


def pids_by_path(log_text: str) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {}
    for match in re.finditer(
        r'"logger":"server","pid":(\d+),.*"method":"POST","path":"(/stkpush[^"]*)","status":200,', log_text
    ):
        seen.setdefault(match.group(2), set()).add(match.group(1))
    return seen


def test_workers_share_payments_and_one_token(server_env, shared_store_url, tmp_path, simulator):
    port, env = server_env
    stats_port = free_port()
    server = procfile_server(
        {**env, "STORE_URL": shared_store_url}, port, tmp_path / "server.log", options=stats_options(stats_port)
    )
    try:
        phones = [f"0711{n:06d}" for n in range(40)]
        with ThreadPoolExecutor(16) as pool:
            ids = list(pool.map(lambda phone: push(server.url, phone), phones))
            # The kernel may hand a burst of connections to one worker: poll until another
            # worker has answered too, so that the payments are seen across workers.
            before = requests_by_worker(stats_port)
            for _ in range(20):
                answers = list(pool.map(lambda checkout_id: status(server.url, checkout_id), ids * 3))
                assert all(answer["status"] == "pending" for answer in answers), answers
                after = requests_by_worker(stats_port)
                workers = {pid for pid, count in after.items() if count > before.get(pid, 0)}
                if len(workers) > 1:
                    break
        assert len(workers) > 1, "every poll went to one worker"
        sim_stats = requests.get(simulator.url + "/simulator/stats", timeout=5).json()
        assert sim_stats["tokens_issued"] == 1
        assert sim_stats["pushes_accepted"] == 40
    finally:
        server.kill(signal.SIGTERM)


def test_killing_a_worker_under_load_loses_nothing(server_env, shared_store_url, tmp_path, simulator):
    port, env = server_env
    server = procfile_server({**env, "STORE_URL": shared_store_url}, port, tmp_path / "server.log", workers=2)
    try:
        phones = [f"0111{n:06d}" for n in range(30)]
        ids: list[str] = []

        def pay(phone):
            try:
                checkout_id = push(server.url, phone)
            except (AssertionError, requests.RequestException):
                return None  # the request the killed worker was serving: never acknowledged
            ids.append(checkout_id)
            return checkout_id

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(pay, phone) for phone in phones]
            time.sleep(0.3)
            worker = max(pids_by_path(server.log_path.read_text()).get("/stkpush", {"0"}))
            if worker != "0":
                os.kill(int(worker), signal.SIGKILL)
            for future in futures:
                future.result()
        assert len(ids) >= 20
        for checkout_id in ids:
            requests.post(f"{simulator.url}/simulator/prompts/{checkout_id}/pin", json={"pin": "1234"}, timeout=5)
        for checkout_id in ids:
            # Completed by callback, or by query first and then given its receipt by the callback.
            wait_until(lambda checkout_id=checkout_id: status(server.url, checkout_id).get("MpesaReceiptNumber"))
        receipts = [status(server.url, checkout_id)["MpesaReceiptNumber"] for checkout_id in ids]
        assert len(set(receipts)) == len(ids)
        callbacks = requests.get(simulator.url + "/simulator/callbacks", timeout=5).json()["callbacks"]
        paid_once = {c["body"]["Body"]["stkCallback"]["CheckoutRequestID"] for c in callbacks}
        assert set(ids) <= paid_once
    finally:
        server.kill(signal.SIGTERM)


def test_reconcile_command_settles_payments_left_pending(live_server_factory, simulator, tmp_path, callback_receiver):
    store_url = f"sqlite:///{tmp_path / 'reconcile.db'}"
    live = live_server_factory(STORE_URL=store_url)
    requests.post(
        simulator.url + "/simulator/scenarios",
        timeout=5,
        json={"phone": "0711000500", "resultCode": 0, "delay": 0.1, "callback": "drop"},
    )
    first, second = pushed(live.url, "0711000500"), pushed(live.url, "0711000501")
    paid_quietly, paid_quietly_id = first["checkoutRequestId"], first["paymentId"]
    never_answered, never_answered_id = second["checkoutRequestId"], second["paymentId"]
    wait_until(
        lambda: (
            requests.get(f"{simulator.url}/simulator/prompts/{paid_quietly}", timeout=5).json()["status"] == "completed"
        )
    )
    live.stop()  # an outage: the server is down, the callback was lost

    env = {
        **os.environ,
        "MPESA_ENV": "simulator",
        "MPESA_BASE_URL": simulator.url,
        "STORE_URL": store_url,
        "TRANSACTION_TTL": "1",
        "CALLBACK_TOKEN": TOKEN,
        "MERCHANT_WEBHOOK_URL": callback_receiver.url,
        "WEBHOOK_SECRET": "shop-secret-0123456789",
    }
    time.sleep(1.1)
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "server", "reconcile"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"{paid_quietly_id} completed" in result.stdout
    assert f"{never_answered_id} failed timeout" in result.stdout
    assert paid_quietly not in result.stdout and never_answered not in result.stdout  # they embed the phone
    assert "2 payment(s) settled" in result.stdout
    # The shop hears of both before the command exits.
    events = {body["data"]["checkoutRequestId"]: body["type"] for body in callback_receiver.wait(2)}
    assert events == {paid_quietly: "payment.completed", never_answered: "payment.failed"}
