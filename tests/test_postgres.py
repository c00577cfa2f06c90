"""What only the PostgreSQL store promises: its URLs, its pool, its schema, several processes.

The behavioural suite (tests/test_store.py, tests/test_store_counters.py) runs on it with the
other stores; these are the promises the others do not make.
"""

from __future__ import annotations

import json
import multiprocessing
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import psycopg
import pytest
import requests

from store import PostgresStore, Store, Transaction, open_store
from store.postgres import DEFAULT_POOL_MAX, SCHEMA_VERSION
from tests.helpers import CALLBACK_TOKEN, PROCFILE_COMMAND, ROOT, ServerProcess, free_port, wait_until

TABLES = {"schema_version", "transactions", "tallies", "kv", "counters", "stock_holds"}


def payment(payment_id: str = "pay_1") -> Transaction:
    return Transaction(payment_id, "254712345678", 100, initiated_at=1_700_000_000.0)


def increment(tx: Transaction) -> int:
    tx.extra["n"] = tx.extra.get("n", 0) + 1
    return tx.extra["n"]


def connections_named(url: str, name: str) -> int:
    """Sessions open on url's database with this application_name."""
    with psycopg.connect(url) as db:
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s"
        return db.execute(query, (name,)).fetchone()[0]


def test_both_url_forms_open_the_same_database(clean_postgres_url):
    heroku_form = clean_postgres_url.replace("postgresql://", "postgres://", 1)
    first, second = open_store(clean_postgres_url), open_store(heroku_form)
    try:
        assert isinstance(first, PostgresStore) and first.kind == "postgres" and isinstance(first, Store)
        first.create(payment())
        assert second.get("pay_1") == payment()
    finally:
        first.close()
        second.close()


def test_a_process_never_opens_more_connections_than_pool_max(clean_postgres_url):
    store = open_store(f"{clean_postgres_url}?pool_max=2&application_name=pool-test")
    store.create(payment())
    seen: list[int] = []
    inside = threading.Barrier(8)

    def slow_update(tx: Transaction) -> None:
        increment(tx)
        seen.append(connections_named(clean_postgres_url, "pool-test"))

    def worker() -> None:
        inside.wait()
        for _ in range(3):
            store.update("pay_1", slow_update)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.get("pay_1").extra["n"] == 24
    assert 1 <= max(seen) <= 2
    store.close()
    assert wait_until(lambda: connections_named(clean_postgres_url, "pool-test") == 0, timeout=10)


def test_connections_the_database_dropped_are_replaced_before_a_request_gets_them(clean_postgres_url):
    store = open_store(f"{clean_postgres_url}?application_name=dropped-test")
    store.create(payment())
    with psycopg.connect(clean_postgres_url, autocommit=True) as db:  # as a database restart would
        query = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'dropped-test'"
        assert db.execute(query).fetchall()
    assert store.get("pay_1") == payment()
    store.close()


@pytest.mark.parametrize(
    ("query", "problem"),
    [("?pool_max=0", "pool_max"), ("?pool_max=many", "pool_max"), ("?pool_max=", "pool_max")],
)
def test_a_bad_pool_size_is_refused_naming_store_url(clean_postgres_url, query, problem):
    with pytest.raises(ValueError, match=f"^STORE_URL: {problem}"):
        open_store(clean_postgres_url + query)


def test_a_server_that_does_not_answer_is_named_without_the_password():
    port = free_port()  # nobody listens there
    with pytest.raises(ValueError) as error:
        open_store(f"postgresql://shop:s3cret-pass@127.0.0.1:{port}/payments?connect_timeout=2")
    assert str(error.value).startswith("STORE_URL: cannot open PostgreSQL database 127.0.0.1/payments: ")
    assert "s3cret-pass" not in str(error.value)


def test_the_default_pool_size_is_documented():
    text = (ROOT / "docs" / "storage.md").read_text()
    assert f"pool_max` (default {DEFAULT_POOL_MAX})" in text


def test_the_schema_is_recorded_and_a_newer_one_is_refused(empty_postgres_url):
    open_store(empty_postgres_url).close()
    open_store(empty_postgres_url).close()  # a second start finds nothing to do
    with psycopg.connect(empty_postgres_url) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        db.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(ValueError, match=f"schema version {SCHEMA_VERSION + 1}, made by a newer version"):
        open_store(empty_postgres_url)


def schema_of(url: str) -> tuple[set[str], list[tuple]]:
    """The tables of the public schema, and the recorded schema versions."""
    with psycopg.connect(url) as db:
        tables = {name for (name,) in db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        versions = db.execute("SELECT version FROM schema_version").fetchall() if "schema_version" in tables else []
    return tables, versions


OPEN_ON_CUE = """
import sys
from store import open_store
print("ready", flush=True)
sys.stdin.readline()
open_store(sys.argv[1]).close()
"""


def test_five_processes_opening_an_empty_database_at_once_make_the_schema_once(empty_postgres_url):
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_ON_CUE, empty_postgres_url],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(5)
    ]
    try:
        for starter in starters:  # every one has imported everything and waits for its cue
            assert starter.stdout is not None and starter.stdout.readline() == "ready\n"
        for starter in starters:
            assert starter.stdin is not None
            starter.stdin.close()
        problems = [starter.stderr.read() for starter in starters if starter.stderr is not None]
        for starter in starters:
            starter.wait(timeout=60)
    finally:
        for starter in starters:
            starter.kill()
            starter.wait()
    assert [starter.returncode for starter in starters] == [0] * 5, problems
    assert schema_of(empty_postgres_url) == (TABLES, [(SCHEMA_VERSION,)])


def test_five_workers_starting_at_once_on_an_empty_database_make_the_schema_once(
    empty_postgres_url, simulator, tmp_path
):
    assert schema_of(empty_postgres_url) == (set(), [])
    port = free_port()
    env = {
        "MPESA_ENV": "simulator",
        "MPESA_BASE_URL": simulator.url,
        "PORT": str(port),
        "CALLBACK_URL": f"http://127.0.0.1:{port}",
        "CALLBACK_TOKEN": CALLBACK_TOKEN,
        "STORE_URL": empty_postgres_url,
        "WEB_CONCURRENCY": "5",
        "WEB_THREADS": "2",
        "LOG_FORMAT": "json",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),  # as the Procfile makes it
    }
    (tmp_path / "metrics").mkdir()
    command = PROCFILE_COMMAND
    server = ServerProcess(command, env, port, tmp_path / "server.log")
    try:

        def answering_workers() -> set[int]:
            with ThreadPoolExecutor(10) as pool:
                for answer in pool.map(lambda _: requests.get(server.url + "/health", timeout=5), range(20)):
                    assert answer.json()["store"] == "postgres"
            lines = server.log_path.read_text().splitlines()
            records = [json.loads(line) for line in lines if line.startswith("{")]
            return {record["pid"] for record in records if record.get("path") == "/health"}

        assert wait_until(lambda: len(answering_workers()) == 5, timeout=60)
        log = server.log_path.read_text()
        assert "Traceback" not in log and "Worker failed to boot" not in log
    finally:
        server.kill(signal.SIGTERM)
    assert schema_of(empty_postgres_url) == (TABLES, [(SCHEMA_VERSION,)])


def _increment_in_new_store(url: str, times: int) -> None:
    store = open_store(url)
    for _ in range(times):
        store.update("pay_1", increment)
    store.close()


def _increment_in_inherited_store(store: Store, times: int) -> None:
    for _ in range(times):
        store.update("pay_1", increment)


@pytest.mark.parametrize("share", ["url", "forked store object"])
def test_updates_from_several_processes_lose_nothing(clean_postgres_url, share):
    store = open_store(clean_postgres_url)
    store.create(payment())  # the parent holds an open pool when it forks
    fork = multiprocessing.get_context("fork")
    if share == "url":
        workers = [fork.Process(target=_increment_in_new_store, args=(clean_postgres_url, 25)) for _ in range(4)]
    else:
        workers = [fork.Process(target=_increment_in_inherited_store, args=(store, 25)) for _ in range(4)]
    for worker in workers:
        worker.start()
    store.update("pay_1", increment)  # the parent writes too, on its own connections
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]
    assert store.get("pay_1").extra["n"] == 101
    store.close()


HOLD_THE_ROW = """
import sys, threading
from store import open_store
store = open_store(sys.argv[1])
def stuck(tx):
    print("locked", flush=True)
    threading.Event().wait()  # holds the row lock until the process dies
store.update("pay_1", stuck)
"""


def test_a_worker_killed_while_it_holds_a_record_does_not_block_the_others(clean_postgres_url):
    store = open_store(clean_postgres_url)
    store.create(payment())
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_ROW, clean_postgres_url], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        updated = threading.Event()
        waiter = threading.Thread(target=lambda: (store.update("pay_1", increment), updated.set()))
        waiter.start()
        assert not updated.wait(0.5)  # the row is locked by the other process
        holder.send_signal(signal.SIGKILL)
        assert updated.wait(20)  # the server saw the connection go and rolled its transaction back
        waiter.join()
    finally:
        holder.kill()
        holder.wait()
    assert store.get("pay_1").extra == {"n": 1}
    store.close()


def test_records_are_json_text_with_real_columns_beside(clean_postgres_url):
    store = open_store(clean_postgres_url)
    tx = payment()
    tx.status, tx.mpesa_receipt_number, tx.account_reference = "completed", "qhh31tv4qv", "Café №7"
    store.create(tx)
    with closing(psycopg.connect(clean_postgres_url)) as db:
        row = db.execute(
            "SELECT status, phone, receipt_key, reference_key, record::jsonb ->> 'amount' FROM transactions"
        ).fetchone()
    assert row == ("completed", "254712345678", "QHH31TV4QV", "café №7", "100")
    store.close()
