"""The fault suite: a rush of payments on the server's workers, workers killed at the worst moment.

On every durable store, the server runs as an operator runs it: the Procfile's command
(`python serve.py`, uWSGI, with its PROMETHEUS_MULTIPROC_DIR), 4 workers, rate
limits on but out of reach, a webhook receiver of the shop's, and a catalogue whose seats are
limited. The test's own simulator holds every push answer HOLD seconds after it has prompted the
customer (its `slow` fault). 200 pushes from 16 threads, each with its own Idempotency-Key; part
way, a worker is killed with SIGKILL while the simulator holds one of its push answers (the
customer prompted, the answer not yet received), twice: once holding a seat order, once a paid
order. The worker is found from the held answer's caller port and the workers' sockets in /proc.

Then every prompt ends (posters are paid, seats cancelled), every push that got no answer is
retried with the same key and body, and once nothing is pending the promises are checked, each
as a subtest so that one broken promise does not hide another:

- no paid payment unknown: every receipt the simulator issued is completed at the server (status
  by CheckoutRequestID or paymentId), in the admin API and in the dashboard's CSV;
- no double completion: a receipt completes one payment, once, and reaches the shop once;
- every retry gets the true state (200, the payment's state and paymentId), never a second prompt;
- the seats are all back once every seat prompt was cancelled, without reconcile;
- after a restart every final payment's webhook arrives, without reconcile: the server is stopped
  while the shop's end answers 503 and started again with it answering 200.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import requests

import webhooks
from tests.helpers import CALLBACK_TOKEN, PROCFILE_COMMAND, ServerProcess, free_port, wait_until

PUSHES = 200
CLIENTS = 16
WORKERS = 4
HOLD = 1.5  # seconds the simulator holds each push answer, the customer already prompted
PROMPT_SECONDS = 2.5  # seconds from the prompt to the customer's answer (after the push answer)
SEAT_PRICE, POSTER_PRICE, SEATS = 1500, 250, 40
CATALOG = {
    "items": [
        {"id": "seat", "name": "Seat", "price": SEAT_PRICE, "kind": "ticket", "capacity": SEATS},
        {"id": "poster", "name": "Tour poster", "price": POSTER_PRICE},
    ]
}
ADMIN_TOKEN = "fault-suite-admin-token-0123"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TRANSACTION_TTL = 10
SETTLE_TIMEOUT = 45.0  # past TRANSACTION_TTL: payments whose push never got out are settled by then
RETRY_LIMIT = 45.0  # a retry told to wait (409 with retryAfter) tries again for this long at most
# After the restart every event goes out in the first upkeep round, except one whose attempt a
# killed worker cut short: its lock holds it for up to webhooks.lock_ttl() (docs/webhooks.md).
WEBHOOK_TIMEOUT = webhooks.lock_ttl() + 10.0


# Every durable store, one entry each: a store added later is one more line.
DURABLE_STORES: dict[str, Callable[[pytest.FixtureRequest, Path], str]] = {
    "sqlite": lambda request, tmp_path: f"sqlite:///{tmp_path / 'payments.db'}",
    "redis": lambda request, tmp_path: request.getfixturevalue("clean_redis_url"),
    "postgres": lambda request, tmp_path: request.getfixturevalue("clean_postgres_url"),
}


@pytest.fixture(params=list(DURABLE_STORES))
def store_url(request, tmp_path) -> str:
    return DURABLE_STORES[request.param](request, tmp_path)


@dataclass
class Push:
    """One shopper's payment: its key and body, and what the server answered (None: no answer)."""

    key: str
    phone: str
    item: str
    status: int | None = None
    answer: dict | None = None
    retry_status: int | None = None
    retry_answer: dict | None = None
    retry_replayed: bool = False  # the retry got the first request's own answer again

    @property
    def body(self) -> dict:
        return {"phone": self.phone, "items": [{"id": self.item, "quantity": 1}], "description": "Fault suite"}

    @property
    def payment_id(self) -> str | None:
        for answer in (self.answer, self.retry_answer):
            if answer and answer.get("paymentId"):
                return answer["paymentId"]
        return None


def shoppers() -> list[Push]:
    """Every fourth shopper orders a seat (and cancels the prompt); the others pay for a poster."""
    return [
        Push(f"fault-{n}-{uuid.uuid4().hex}", f"254711{n:06d}", "seat" if n % 4 == 0 else "poster")
        for n in range(PUSHES)
    ]


def send(url: str, push: Push) -> requests.Response | None:
    """POST the push with its key; None when no answer came (the worker died with the request)."""
    try:
        headers = {"Idempotency-Key": push.key}
        return requests.post(url + "/stkpush", json=push.body, headers=headers, timeout=(3.05, 30))
    except requests.RequestException:
        return None


def json_of(response: requests.Response) -> dict:
    try:
        return response.json()
    except ValueError:
        return {"message": response.text[:200]}


def first_try(url: str, push: Push) -> None:
    response = send(url, push)
    if response is not None:
        push.status, push.answer = response.status_code, json_of(response)


def retry(url: str, push: Push) -> None:
    """Send the push again with its key, as a client does: after a 409 that says its first request
    may still be in flight (retryAfter), again until the server knows what became of it."""

    def answered() -> bool:
        response = send(url, push)
        if response is None:
            return False
        push.retry_status, push.retry_answer = response.status_code, json_of(response)
        push.retry_replayed = response.headers.get("Idempotent-Replayed") == "true"
        return not (response.status_code == 409 and "retryAfter" in push.retry_answer)

    wait_until(answered, timeout=RETRY_LIMIT, every=0.5)


def retry_problem(url: str, push: Push, prompt: dict | None) -> str | None:
    """What is wrong with the answer to a retry, given the prompt the first request made (if any)."""
    answer = push.retry_answer or {}
    said = f"{push.retry_status} {answer.get('status')} ({answer.get('message')})"
    if push.retry_status != 200 or not answer.get("paymentId"):
        return said
    if prompt is None:  # the first request never prompted anyone: nothing can have been paid
        return None if answer["status"] in ("pending", "failed") else said
    truth = "completed" if prompt["status"] == "completed" else "failed"
    if answer["status"] == truth:
        return None
    # The first request finished before its worker died: its own answer comes back, and the
    # payment it names tells the rest.
    if push.retry_replayed and answer["status"] == "pending":
        now = status_of(url, answer["paymentId"]).get("status")
        return None if now == truth else f"{said}, then {now} at /stkpush/status, for {truth}"
    return f"{said} for {truth}"


# The simulator: outcomes by amount, answers held, what it did.


def arm_simulator(sim_url: str) -> None:
    """Seats are cancelled, posters paid, PROMPT_SECONDS after the prompt; push answers held HOLD s."""
    for rule in (
        {"amount": SEAT_PRICE, "resultCode": 1032, "delay": PROMPT_SECONDS},
        {"resultCode": 0, "delay": PROMPT_SECONDS},
    ):
        requests.post(sim_url + "/simulator/scenarios", json=rule, timeout=5).raise_for_status()
    fault = {"endpoint": "stkpush", "mode": "slow", "delay": HOLD, "count": 10 * PUSHES}
    requests.post(sim_url + "/simulator/faults", json=fault, timeout=5).raise_for_status()


def prompts(sim_url: str) -> list[dict]:
    return requests.get(sim_url + "/simulator/prompts", timeout=10).json()["prompts"]


def lost_callbacks(sim_url: str) -> set[str]:
    """The CheckoutRequestIDs whose every callback POST failed (the simulator, like Safaricom, sends once)."""
    answered: dict[str, bool] = {}
    for sent in requests.get(sim_url + "/simulator/callbacks", timeout=10).json()["callbacks"]:
        checkout_id = sent["body"]["Body"]["stkCallback"]["CheckoutRequestID"]
        ok = sent["status"] is not None and 200 <= sent["status"] < 300
        answered[checkout_id] = answered.get(checkout_id, False) or ok
    return {checkout_id for checkout_id, ok in answered.items() if not ok}


def every_prompt_ended(sim_url: str) -> bool:
    """No prompt open, and every ended one's callback POSTed (answered or not)."""
    seen = prompts(sim_url)
    stats = requests.get(sim_url + "/simulator/stats", timeout=5).json()
    posted = stats["callbacks_sent"] + stats["callbacks_failed"]
    return all(p["status"] != "pending" for p in seen) and posted >= len(seen)


# Killing a worker while the simulator holds its push answer.


def children(pid: int) -> list[int]:
    """The processes whose parent is pid (the workers, for uWSGI's master)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def socket_inodes(local_port: int, remote_port: int) -> set[str]:
    """The fd link names of the TCP sockets from local_port to remote_port (/proc/net/tcp*)."""
    names = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if int(local.rsplit(":", 1)[1], 16) == local_port and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                names.add(f"socket:[{inode}]")
    return names


def worker_with_socket(master: int, sockets: set[str]) -> int | None:
    """The worker of master that holds one of these sockets."""
    for pid in children(master):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in sockets:
                    return pid
            except OSError:
                continue
    return None


def dead(pid: int) -> bool:
    """Gone, or a zombie: either way its sockets are closed."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def held_answers(sim_url: str) -> list[dict]:
    return requests.get(sim_url + "/simulator/held", timeout=5).json()["held"]


def seconds_left(entry: dict) -> float:
    return datetime.fromisoformat(entry["until"]).timestamp() - time.time()


@dataclass
class Victim:
    pid: int
    checkout_id: str
    phone: str


def kill_at_worst_moment(server: ServerProcess, simulator, amount: int) -> Victim:
    """SIGKILL the worker whose push answer (for `amount`) the simulator is holding, the customer
    already prompted; checked: the answer was still held when the worker was dead."""

    def target():
        for entry in held_answers(simulator.url):
            if entry["checkoutRequestId"] is None or seconds_left(entry) < HOLD / 2:
                continue
            prompt = requests.get(f"{simulator.url}/simulator/prompts/{entry['checkoutRequestId']}", timeout=5).json()
            if prompt["amount"] != amount or prompt["status"] != "pending":
                continue
            pid = worker_with_socket(server.process.pid, socket_inodes(entry["caller"]["port"], simulator.port))
            if pid is not None:
                return Victim(pid, entry["checkoutRequestId"], prompt["phone"])
        return None

    victim = wait_until(target, timeout=30, every=0.02)
    os.kill(victim.pid, signal.SIGKILL)
    wait_until(lambda: dead(victim.pid), timeout=10, every=0.01)
    still_held = {entry["checkoutRequestId"] for entry in held_answers(simulator.url)}
    assert victim.checkout_id in still_held, "the push answer reached the worker before it died: not the worst moment"
    return victim


# The server as an operator runs it.


def operator_env(store_url: str, sim_url: str, port: int, webhook_url: str, tmp_path: Path) -> dict[str, str]:
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps(CATALOG))
    return {
        "MPESA_ENV": "simulator",
        "MPESA_BASE_URL": sim_url,
        "PORT": str(port),
        "CALLBACK_URL": f"http://127.0.0.1:{port}",
        "CALLBACK_TOKEN": CALLBACK_TOKEN,
        "STORE_URL": store_url,
        "WEB_CONCURRENCY": str(WORKERS),
        "RATELIMIT_ENABLED": "true",
        "RATE_LIMIT_PUSH_PER_IP": "100000/minute",
        "RATE_LIMIT_PUSH_PER_PHONE": "100/minute",
        "RATE_LIMIT_STATUS_PER_IP": "100000/minute",
        "CATALOG_FILE": str(catalog),
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "MERCHANT_WEBHOOK_URL": webhook_url,
        "WEBHOOK_SECRET": "fault-suite-webhook-secret-0123",
        "WEBHOOK_BASE_DELAY": "2",
        "WEBHOOK_MAX_DELAY": "8",
        "WEBHOOK_MAX_ATTEMPTS": "1000",  # still pending, not given up, when the server stops
        "TRANSACTION_TTL": str(TRANSACTION_TTL),
        "STATUS_FIRST_QUERY_AFTER": "2",
        "STATUS_QUERY_INTERVAL": "1",
        "DARAJA_TIMEOUT": "5",
        "UPKEEP_SECONDS": "2",  # the background rounds: pending settled, webhooks resumed
        "LOG_FORMAT": "json",
        # The Procfile makes a fresh multiprocess metrics directory for each start.
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / f"metrics-{uuid.uuid4().hex[:8]}"),
    }


@pytest.fixture
def operator_servers():
    """Start the Procfile's command; whatever is left running is killed afterwards."""
    started: list[ServerProcess] = []

    def start(env: dict[str, str], log_path: Path) -> ServerProcess:
        command = PROCFILE_COMMAND
        started.append(ServerProcess(command, env, int(env["PORT"]), log_path))
        return started[-1]

    yield start
    for server in started:
        if server.process.poll() is None:
            server.kill(signal.SIGKILL)


def all_workers_up(server: ServerProcess) -> bool:
    return len(children(server.process.pid)) == WORKERS


# What the server knows.


def record_ids(record: dict) -> set[str]:
    """A payment's ids as the admin API shows them (its own id and Daraja's)."""
    names = ("payment_id", "paymentId", "checkout_request_id", "checkoutRequestId")
    return {record[name] for name in names if record.get(name)}


def admin_records(url: str, status: str | None = None) -> list[dict]:
    """Every payment in the transactions API, newest first."""
    records: list[dict] = []
    page = 1
    while True:
        params = {"limit": 100, "page": page, **({"status": status} if status else {})}
        answer = requests.get(url + "/transactions", params=params, headers=ADMIN, timeout=30).json()
        records += answer["transactions"]
        if len(records) >= answer["total"] or not answer["transactions"]:
            return records
        page += 1


def status_of(url: str, payment: str) -> dict:
    response = requests.get(f"{url}/stkpush/status/{payment}", timeout=30)
    return {"httpStatus": response.status_code, **response.json()}


def csv_rows(url: str) -> list[dict]:
    """The dashboard's CSV export, as an operator downloads it after signing in."""
    http = requests.Session()
    page = http.get(url + "/admin/login", timeout=10).text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    signed_in = http.post(
        url + "/admin/login", data={"csrf_token": csrf, "token": ADMIN_TOKEN}, allow_redirects=False, timeout=10
    )
    assert signed_in.status_code == 303, signed_in.text
    export = http.get(url + "/admin/transactions.csv", timeout=30)
    assert export.status_code == 200 and export.headers["Content-Type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(export.content.decode("utf-8-sig"))))


def until_settled(url: str, pushes: list[Push], timeout: float) -> list[dict]:
    """Poll, as shops do, every payment still pending, until none is or timeout passes; the
    payments still pending at the end."""
    deadline = time.monotonic() + timeout
    while True:
        pending = admin_records(url, "pending")
        if not pending or time.monotonic() > deadline:
            return pending
        polled = {sorted(record_ids(record))[0] for record in pending if record_ids(record)}
        polled |= {push.payment_id for push in pushes if push.payment_id}
        for payment in polled:
            status_of(url, payment)
        time.sleep(0.5)


def webhook_history(url: str, ids: frozenset) -> dict:
    """What a payment's record says of its status and its webhook attempts, for a failure message."""
    payment = sorted(ids)[0]
    record = requests.get(f"{url}/transactions/{payment}", headers=ADMIN, timeout=10).json()
    record = record.get("transaction", record)
    events = [
        {key: entry.get(key) for key in ("at", "event", "eventId", "status", "attempt", "nextAttemptIn")}
        for entry in record.get("history", [])
        if entry.get("event", "").startswith("webhook") or entry.get("event") in ("completed", "failed", "timed_out")
    ]
    return {"payment": payment, "status": record.get("status"), "flags": record.get("flags"), "history": events[-6:]}


def event_payment(event: dict) -> str:
    data = event.get("data", {})
    return data.get("paymentId") or data.get("checkoutRequestId")


def events_received(receiver, since: int = 0) -> list[dict]:
    return [body for body in receiver.bodies[since:] if isinstance(body, dict) and "type" in body]


# The scenario.


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="finds the worker to kill through /proc (Linux)")
def test_workers_killed_at_the_worst_moment_lose_no_paid_shilling(
    store_url, simulator, callback_receiver, operator_servers, tmp_path, subtests
):
    port = free_port()
    env = operator_env(store_url, simulator.url, port, callback_receiver.url, tmp_path)
    callback_receiver.status = 503  # the shop's end is down: every webhook waits for a retry
    server = operator_servers(env, tmp_path / "server-first.log")
    wait_until(lambda: all_workers_up(server), timeout=30)
    arm_simulator(simulator.url)

    pushes = shoppers()
    with ThreadPoolExecutor(CLIENTS) as pool:
        tries = [pool.submit(first_try, server.url, push) for push in pushes]

        def answered(count: int) -> Callable[[], bool]:
            return lambda: sum(push.status is not None for push in pushes) >= count

        wait_until(answered(PUSHES // 4), timeout=60)
        victims = [kill_at_worst_moment(server, simulator, SEAT_PRICE)]
        wait_until(answered(PUSHES // 2), timeout=60)
        victims.append(kill_at_worst_moment(server, simulator, POSTER_PRICE))
        for attempt in tries:
            attempt.result()
    requests.delete(simulator.url + "/simulator/faults", timeout=5).raise_for_status()
    wait_until(lambda: every_prompt_ended(simulator.url), timeout=30)

    by_phone = {push.phone: push for push in pushes}
    unanswered = [push for push in pushes if push.status is None]
    assert {victim.phone for victim in victims} <= {push.phone for push in unanswered}
    prompted_before_retry = {prompt["phone"]: prompt for prompt in prompts(simulator.url)}
    for push in unanswered:
        retry(server.url, push)
    wait_until(lambda: every_prompt_ended(simulator.url), timeout=30)
    still_pending = until_settled(server.url, pushes, SETTLE_TIMEOUT)

    seen = prompts(simulator.url)
    paid = [prompt for prompt in seen if prompt["status"] == "completed"]
    records = admin_records(server.url)
    print(
        f"{store_url.split(':')[0]}: {PUSHES} pushes, {len(unanswered)} without an answer "
        f"(workers {[victim.pid for victim in victims]} killed holding "
        f"{[victim.checkout_id[-4:] for victim in victims]}); {len(seen)} prompts, {len(paid)} paid; "
        f"{len(records)} payments at the server, {len(still_pending)} still pending after {SETTLE_TIMEOUT:.0f} s"
    )
    assert paid and len(paid) < len(seen), "most prompts paid, the seat prompts cancelled"

    with subtests.test("0 paid payments unknown to the server"):
        # A callback that reached no live worker (one was killed with the connection) is lost, as
        # Safaricom sends it once: the payment is then completed by STK Query, which carries no
        # receipt. For those the shop must know the payment completed, its receipt left empty.
        lost = lost_callbacks(simulator.url)

        def shows(paid_prompt: dict, receipt: str | None, status: str) -> bool:
            if status != "completed":
                return False
            return receipt == paid_prompt["receipt"] or (receipt is None and paid_prompt["checkoutRequestId"] in lost)

        unknown = []
        for prompt in paid:
            push = by_phone[prompt["phone"]]
            answers = [status_of(server.url, prompt["checkoutRequestId"])]
            if push.payment_id:
                answers.append(status_of(server.url, push.payment_id))
            if not any(a["httpStatus"] == 200 and shows(prompt, a["MpesaReceiptNumber"], a["status"]) for a in answers):
                seen_as = [(a.get("status"), a.get("MpesaReceiptNumber")) for a in answers]
                unknown.append(f"{prompt['receipt']}: {seen_as}")
        listed = {r["checkout_request_id"]: r for r in records}
        rows = {row["Checkout request ID"]: row for row in csv_rows(server.url)}
        missing_api = [
            p["receipt"]
            for p in paid
            if not (
                (record := listed.get(p["checkoutRequestId"]))
                and shows(p, record["mpesa_receipt_number"], record["status"])
            )
        ]
        missing_csv = [
            p["receipt"]
            for p in paid
            if not ((row := rows.get(p["checkoutRequestId"])) and shows(p, row["Receipt"] or None, row["Status"]))
        ]
        assert not (unknown or missing_api or missing_csv), (
            f"of {len(paid)} receipts the simulator issued, {len(unknown)} unknown to /stkpush/status "
            f"({unknown}), {len(missing_api)} missing from /transactions, {len(missing_csv)} missing from the CSV "
            f"({len(lost)} callbacks lost with a killed worker)"
        )

    with subtests.test("0 double completions"):
        receipts = Counter(r["mpesa_receipt_number"] for r in records if r["mpesa_receipt_number"])
        twice = [receipt for receipt, count in receipts.items() if count > 1]
        completed_twice = [
            sorted(record_ids(r)) for r in records if sum(e["event"] == "completed" for e in r["history"]) > 1
        ]
        assert not (twice or completed_twice), (
            f"receipts on several payments: {twice}; payments completed twice: {completed_twice}"
        )

    with subtests.test("every Idempotency-Key retry gets the true state"):
        answers = Counter(push.retry_status for push in unanswered)
        wrong = [
            problem
            for push in unanswered
            if (problem := retry_problem(server.url, push, prompted_before_retry.get(push.phone)))
        ]
        prompts_per_phone = Counter(prompt["phone"] for prompt in seen)
        prompted_twice = [phone[-4:] for phone, count in prompts_per_phone.items() if count > 1]
        assert not (wrong or prompted_twice), (
            f"{len(unanswered)} pushes retried with their key, answered {dict(answers)}; "
            f"{len(wrong)} without the true state: {wrong[:5]}; phones prompted twice: {prompted_twice}"
        )

    with subtests.test("every seat back once every seat prompt was cancelled, without reconcile"):
        seat_prompts = [prompt for prompt in seen if prompt["amount"] == SEAT_PRICE]
        assert seat_prompts and all(prompt["status"] == "failed" for prompt in seat_prompts)
        items = requests.get(server.url + "/catalog", timeout=10).json()["items"]
        available = next(item["available"] for item in items if item["id"] == "seat")
        assert available == SEATS, (
            f"{available} of {SEATS} seats available after all {len(seat_prompts)} seat prompts were cancelled: "
            f"{SEATS - available} held for nobody"
        )

    # The shop's end is still down: stop the whole server with its events pending, then start
    # it again with the shop's end up.
    before_restart = events_received(callback_receiver)
    assert before_restart, "the webhook receiver saw no attempt before the restart"
    server.kill(signal.SIGTERM)
    callback_receiver.status = 200
    since_restart = len(callback_receiver.bodies)
    server = operator_servers(env, tmp_path / "server-second.log")
    final = [record for record in admin_records(server.url) if record["status"] != "pending"]
    expected = {
        frozenset(record_ids(record)): f"payment.{'completed' if record['status'] == 'completed' else 'failed'}"
        for record in final
    }

    def arrived() -> set[frozenset]:
        got = {(event_payment(event), event["type"]) for event in events_received(callback_receiver, since_restart)}
        return {ids for ids, kind in expected.items() if any((payment, kind) in got for payment in ids)}

    deadline = time.monotonic() + WEBHOOK_TIMEOUT
    while len(arrived()) < len(expected) and time.monotonic() < deadline:
        time.sleep(0.2)

    with subtests.test("every webhook delivered after a restart, without reconcile"):
        missing = [ids for ids in expected if ids not in arrived()]
        assert not missing, (
            f"{len(missing)} of {len(expected)} final payments' events not delivered {WEBHOOK_TIMEOUT:.0f} s after "
            f"the restart ({len(before_restart)} attempts answered 503 before it); their webhook history: "
            f"{[webhook_history(server.url, ids) for ids in missing[:3]]}"
        )

    with subtests.test("0 double completions reach the shop"):
        completed_events: dict[str, set[str]] = {}
        for event in events_received(callback_receiver):
            if event["type"] == "payment.completed":
                completed_events.setdefault(event_payment(event), set()).add(event["id"])
        doubled = {payment: sorted(ids) for payment, ids in completed_events.items() if len(ids) > 1}
        assert not doubled, f"payments announced completed under several event ids: {doubled}"
