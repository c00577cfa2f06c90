"""One behavioural suite over every store backend, then what only one backend promises."""
from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import redis

from store import (DuplicateTransaction, MemoryStore, RedisStore, SQLiteStore, Store,
                   Transaction, open_store)

ROOT = Path(__file__).resolve().parent.parent
PHONE = "254712345678"
OTHER_PHONE = "254798765432"


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Backend:
    """Opens stores of one kind and lets time pass for them.

    Memory and SQLite run on a fake clock; Redis keeps its own time, so for it time passes
    by sleeping, and the durations in the suite are kept short.
    """

    def __init__(self, kind: str, url: str, clock):
        self.kind = kind
        self.url = url
        self.clock = clock
        self._opened: list[Store] = []

    def open(self, retention: float = 3600) -> Store:
        store = open_store(self.url, retention=retention, clock=self.clock)
        self._opened.append(store)
        return store

    def elapse(self, seconds: float) -> None:
        if isinstance(self.clock, FakeClock):
            self.clock.advance(seconds)
        else:
            time.sleep(seconds)

    def close(self) -> None:
        for store in self._opened:
            store.close()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def backend(request, tmp_path):
    if request.param == "redis":
        backend = Backend("redis", request.getfixturevalue("clean_redis_url"), time.time)
    elif request.param == "sqlite":
        backend = Backend("sqlite", f"sqlite:///{tmp_path / 'store.db'}", FakeClock())
    else:
        backend = Backend("memory", "memory://", FakeClock())
    yield backend
    backend.close()


@pytest.fixture
def store(backend):
    return backend.open()


def make_tx(checkout_request_id: str = "ws_CO_1", *, phone: str = PHONE,
            initiated_at: float = 1_700_000_000.0, **fields) -> Transaction:
    return Transaction(checkout_request_id=checkout_request_id,
                       merchant_request_id=f"m-{checkout_request_id}",
                       phone=phone, amount=100, initiated_at=initiated_at, **fields)


def increment(tx: Transaction) -> int:
    tx.extra["n"] = tx.extra.get("n", 0) + 1
    return tx.extra["n"]


def ids(transactions: list[Transaction]) -> list[str]:
    return [tx.checkout_request_id for tx in transactions]


# The behavioural suite: every test runs against memory, SQLite and Redis.

def test_backend_says_what_it_is(store, backend):
    assert store.kind == backend.kind
    assert isinstance(store, Store)


def test_create_then_get_returns_an_equal_record(store):
    tx = make_tx(account_reference="CART_12345", description="DJ Kraph Checkout")
    store.create(tx)
    assert store.get("ws_CO_1") == tx


def test_get_of_unknown_id_is_none(store):
    assert store.get("ws_CO_missing") is None


def test_create_of_existing_id_raises_duplicate_and_keeps_the_first(store):
    store.create(make_tx())
    with pytest.raises(DuplicateTransaction):
        store.create(make_tx(phone=OTHER_PHONE))
    assert store.get("ws_CO_1").phone == PHONE


def test_unknown_status_is_refused(store):
    with pytest.raises(ValueError):
        store.create(make_tx(status="paid"))
    assert store.get("ws_CO_1") is None


def test_records_are_copies_not_shared_with_the_store(store):
    tx = make_tx(extra={"cart": {"items": 1}})
    store.create(tx)
    tx.status = "failed"
    tx.extra["cart"]["items"] = 99
    fetched = store.get("ws_CO_1")
    assert (fetched.status, fetched.extra) == ("pending", {"cart": {"items": 1}})
    fetched.history.append({"at": 1.0, "event": "tampered"})
    updated, _ = store.update("ws_CO_1", increment)
    updated.flags.append("tampered")
    again = store.get("ws_CO_1")
    assert again.history == [] and again.flags == [] and again.extra["n"] == 1


def test_update_saves_the_mutation_and_returns_its_result(store):
    store.create(make_tx())

    def settle(tx: Transaction) -> str:
        tx.status = "completed"
        tx.mpesa_receipt_number = "LHH31TV4QV"
        tx.history.append({"at": 1_700_000_010.0, "event": "completed"})
        return "settled"

    tx, result = store.update("ws_CO_1", settle)
    assert result == "settled"
    assert tx.is_final and tx.mpesa_receipt_number == "LHH31TV4QV"
    assert store.get("ws_CO_1") == tx


def test_update_of_unknown_id_returns_none_without_calling_mutate(store):
    calls = []
    assert store.update("ws_CO_missing", calls.append) == (None, None)
    assert calls == []


def test_update_whose_mutate_raises_saves_nothing(store):
    store.create(make_tx())

    def fail_halfway(tx: Transaction) -> None:
        tx.status = "completed"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.update("ws_CO_1", fail_halfway)
    assert store.get("ws_CO_1").status == "pending"
    assert store.update("ws_CO_1", increment)[1] == 1   # and the store still works


def test_update_may_not_change_the_id(store):
    store.create(make_tx())

    def rename(tx: Transaction) -> None:
        tx.checkout_request_id = "ws_CO_2"

    with pytest.raises(ValueError):
        store.update("ws_CO_1", rename)
    assert store.get("ws_CO_2") is None and store.get("ws_CO_1") is not None


def test_concurrent_updates_from_twenty_threads_lose_nothing(store):
    store.create(make_tx())
    start = threading.Barrier(20)
    results: list[int] = []

    def worker():
        start.wait()
        for _ in range(5):
            results.append(store.update("ws_CO_1", increment)[1])

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.get("ws_CO_1").extra["n"] == 100
    assert sorted(results) == list(range(1, 101))   # each increment saw the one before


@pytest.fixture
def four(store, backend):
    """A, B, C, D initiated 30, 20, 10 and 0 s ago, with mixed phones and statuses."""
    now = backend.clock()
    store.create(make_tx("A", initiated_at=now - 30))
    store.create(make_tx("B", initiated_at=now - 20, phone=OTHER_PHONE, status="completed"))
    store.create(make_tx("C", initiated_at=now - 10, status="failed", reason="cancelled"))
    store.create(make_tx("D", initiated_at=now, status="completed"))
    return now


def test_list_is_newest_first_with_the_total(store, four):
    page, total = store.list()
    assert (ids(page), total) == (["D", "C", "B", "A"], 4)


@pytest.mark.parametrize("filters, expected", [
    ({"status": "completed"}, ["D", "B"]),
    ({"status": "pending"}, ["A"]),
    ({"phone": PHONE}, ["D", "C", "A"]),
    ({"phone": OTHER_PHONE}, ["B"]),
    ({"status": "completed", "phone": PHONE}, ["D"]),
    ({"status": "failed", "phone": OTHER_PHONE}, []),
    ({"phone": "254700000000"}, []),
])
def test_list_filters_by_status_and_phone(store, four, filters, expected):
    page, total = store.list(**filters)
    assert (ids(page), total) == (expected, len(expected))


@pytest.mark.parametrize("limit, offset, expected", [
    (2, 0, ["D", "C"]),
    (2, 1, ["C", "B"]),
    (2, 3, ["A"]),
    (2, 4, []),
    (0, 0, []),
])
def test_list_paginates_and_always_counts_every_match(store, four, limit, offset, expected):
    page, total = store.list(limit=limit, offset=offset)
    assert (ids(page), total) == (expected, 4)
    page, total = store.list(phone=PHONE, limit=limit, offset=offset)
    assert ids(page) == ["D", "C", "A"][offset:offset + limit] and total == 3


def test_list_follows_status_changes(store, four):
    def complete(tx: Transaction) -> None:
        tx.status = "completed"

    store.update("A", complete)
    assert store.list(status="pending") == ([], 0)
    assert ids(store.list(status="completed")[0]) == ["D", "B", "A"]
    assert ids(store.list(status="completed", phone=PHONE)[0]) == ["D", "A"]


def test_pending_before_returns_old_pending_records_oldest_first(store, backend):
    now = backend.clock()
    store.create(make_tx("old", initiated_at=now - 300))
    store.create(make_tx("older", initiated_at=now - 400))
    store.create(make_tx("done", initiated_at=now - 500, status="failed"))
    store.create(make_tx("fresh", initiated_at=now - 5))
    assert ids(store.pending_before(now - 120)) == ["older", "old"]
    assert ids(store.pending_before(now - 400)) == []   # strictly before
    assert ids(store.pending_before(now)) == ["older", "old", "fresh"]


def test_add_sets_only_if_absent_until_the_ttl_passes(store, backend):
    assert store.add("idem:abc", {"first": True}, ttl=0.3) is True
    assert store.add("idem:abc", {"first": False}, ttl=0.3) is False
    assert store.get_value("idem:abc") == {"first": True}
    backend.elapse(0.4)
    assert store.get_value("idem:abc") is None
    assert store.add("idem:abc", {"second": True}, ttl=30) is True
    assert store.get_value("idem:abc") == {"second": True}


def test_add_from_many_threads_lets_exactly_one_win(store):
    start = threading.Barrier(10)
    wins: list[bool] = []

    def worker(n: int) -> None:
        start.wait()
        wins.append(store.add("lock:ws_CO_1", {"worker": n}, ttl=30))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wins.count(True) == 1


def test_values_can_be_set_read_replaced_and_deleted(store, backend):
    assert store.get_value("k") is None
    store.set_value("k", {"v": 1, "text": "ṁpesa ✓"}, ttl=30)
    assert store.get_value("k") == {"v": 1, "text": "ṁpesa ✓"}
    store.set_value("k", {"v": 2}, ttl=0.3)
    assert store.get_value("k") == {"v": 2}
    backend.elapse(0.4)
    assert store.get_value("k") is None
    store.set_value("k", {"v": 3}, ttl=0.3)
    store.set_value("k", {"v": 3}, ttl=30)   # a rewrite also replaces the ttl
    backend.elapse(0.4)
    assert store.get_value("k") == {"v": 3}
    store.delete("k")
    store.delete("never-set")
    assert store.get_value("k") is None
    assert store.add("k", {"v": 4}, ttl=30) is True


@pytest.mark.parametrize("ttl", [0, -1])
def test_values_need_a_positive_ttl(store, ttl):
    with pytest.raises(ValueError):
        store.set_value("k", {}, ttl=ttl)
    with pytest.raises(ValueError):
        store.add("k", {}, ttl=ttl)


def test_records_expire_after_retention_except_in_sqlite(backend):
    store = backend.open(retention=0.6)
    store.create(make_tx(initiated_at=backend.clock()))
    backend.elapse(0.3)
    store.update("ws_CO_1", increment)   # a write restarts the retention period
    backend.elapse(0.3)
    assert store.get("ws_CO_1") is not None
    backend.elapse(0.4)
    if backend.kind == "sqlite":   # the ledger keeps everything
        assert store.get("ws_CO_1").extra == {"n": 1}
        assert store.list()[1] == 1
    else:
        assert store.get("ws_CO_1") is None
        assert store.update("ws_CO_1", increment) == (None, None)
        assert store.list() == ([], 0)
        assert store.list(phone=PHONE, status="pending") == ([], 0)
        assert store.pending_before(backend.clock() + 1) == []
        store.create(make_tx())   # the id is free again


@pytest.mark.parametrize("result_code", [0, 1032, "SFC_IC0003", None])
def test_records_round_trip_through_dicts_json_and_the_store(store, result_code):
    tx = make_tx(
        status="completed" if result_code == 0 else "failed",
        result_code=result_code, result_desc="Malipo yamekamilika — ✓",
        mpesa_receipt_number="LHH31TV4QV", transaction_date="2024-03-15T14:31:05+03:00",
        account_reference="Café №7", description="Tiketi 🎟",
        callback={"Body": {"stkCallback": {
            "ResultCode": result_code, "CallbackMetadata": {"Item": [
                {"Name": "Amount", "Value": 100}, {"Name": "PhoneNumber", "Value": 254712345678},
                {"Name": "Note", "Value": "日本語"}]}}}},
        completed_at=1_700_000_030.5, settled_by="callback", flags=["amount_checked"],
        history=[{"at": 1_700_000_000.0, "event": "initiated"},
                 {"at": 1_700_000_030.5, "event": "callback", "result_code": result_code}],
        extra={"nested": {"list": [1, "two", None, {"three": 3.5}]}},
    )
    assert Transaction.from_dict(json.loads(json.dumps(tx.to_dict()))) == tx
    store.create(tx)
    fetched = store.get("ws_CO_1")
    assert fetched == tx
    assert type(fetched.result_code) is type(result_code)


# Transaction and open_store on their own.

def test_transaction_is_final_once_not_pending():
    assert not make_tx().is_final
    assert make_tx(status="completed").is_final and make_tx(status="failed").is_final


def test_from_dict_ignores_keys_it_does_not_know_and_fills_defaults():
    data = {"checkout_request_id": "ws_CO_1", "merchant_request_id": "m", "phone": PHONE,
            "amount": 5, "added_by_a_later_version": 1}
    tx = Transaction.from_dict(data)
    assert (tx.currency, tx.status, tx.history) == ("KES", "pending", [])


def test_to_dict_and_from_dict_copy_nested_values():
    tx = make_tx(extra={"a": {"b": 1}})
    data = tx.to_dict()
    data["extra"]["a"]["b"] = 2
    assert tx.extra == {"a": {"b": 1}}
    again = Transaction.from_dict(data)
    data["extra"]["a"]["b"] = 3
    assert again.extra == {"a": {"b": 2}}


@pytest.mark.parametrize("url", ["postgres://db/x", "memcached://h", "payments.db", ""])
def test_open_store_refuses_unknown_schemes_naming_the_choices(url):
    scheme = url.partition("://")[0] if "://" in url else ""
    with pytest.raises(ValueError) as error:
        open_store(url)
    assert str(error.value) == (
        f"STORE_URL: unsupported scheme '{scheme}' "
        "(use memory://, sqlite:///path.db or redis://host:port/db)")


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:"])
def test_open_store_wants_a_file_for_sqlite(url):
    with pytest.raises(ValueError, match="sqlite:///relative.db"):
        open_store(url)


def test_open_store_names_a_sqlite_file_it_cannot_open(tmp_path):
    with pytest.raises(ValueError, match="STORE_URL: cannot open SQLite database"):
        open_store(f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}")


def test_open_store_reads_relative_and_absolute_sqlite_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///relative.db")
    relative.create(make_tx())
    relative.close()
    assert (tmp_path / "relative.db").exists()
    absolute = open_store(f"sqlite:///{tmp_path / 'relative.db'}")
    assert absolute.path.startswith("/") and absolute.get("ws_CO_1") is not None
    absolute.close()


def test_open_store_gives_memory_by_default_and_refuses_a_useless_retention():
    assert isinstance(open_store(), MemoryStore)
    with pytest.raises(ValueError):
        open_store("memory://", retention=0)


def test_open_store_reads_the_redis_prefix_from_the_url():
    store = open_store("redis://127.0.0.1:6390/3?prefix=shop1:&socket_timeout=2")
    assert isinstance(store, RedisStore) and store._prefix == "shop1:"
    kwargs = store._redis.connection_pool.connection_kwargs
    assert (kwargs["port"], kwargs["db"], kwargs["socket_timeout"]) == (6390, 3, 2.0)
    assert "prefix" not in kwargs
    store.close()
    default = open_store("redis://127.0.0.1:6390/3")
    assert default._prefix == "mpesa:"
    default.close()


# Memory only.

class CountingOrderedDict(OrderedDict):
    """Counts every entry any iteration over it looks at."""

    def __init__(self, *args):
        super().__init__(*args)
        self.visited = 0

    def _count(self, entries):
        for entry in entries:
            self.visited += 1
            yield entry

    def __iter__(self):
        return self._count(super().__iter__())

    def keys(self):
        return self._count(super().keys())

    def values(self):
        return self._count(super().values())

    def items(self):
        return self._count(super().items())


def test_memory_expiry_looks_only_at_expired_records():
    clock = FakeClock()
    store = MemoryStore(retention=100, clock=clock)
    for n in range(3000):
        store.create(make_tx(f"old{n}"))
    clock.advance(50)
    for n in range(3000):
        store.create(make_tx(f"new{n}"))
    store._records = records = CountingOrderedDict(store._records)

    for n in range(200):   # 1000 operations, none of which finds anything expired
        store.get(f"old{n}")
        store.update(f"new{n}", increment)
        store.add(f"k{n}", {}, ttl=10)
        store.get_value(f"k{n}")
        store.set_value(f"j{n}", {}, ttl=10 + n)
    assert records.visited <= 1000   # one peek at the oldest record per operation

    clock.advance(60)   # the 3000 old records are now past retention, the new ones are not
    records.visited = 0
    assert store.get("new0") is not None
    assert records.visited == 3001 and len(store._records) == 3000
    records.visited = 0
    store.get("new1")
    assert records.visited == 1


def test_memory_a_rewritten_record_does_not_hold_back_the_expiry_of_others():
    clock = FakeClock()
    store = MemoryStore(retention=100, clock=clock)
    store.create(make_tx("A"))
    store.create(make_tx("B"))
    clock.advance(60)
    store.update("A", increment)   # A now expires 60 s after B
    clock.advance(50)
    store.get("A")
    assert list(store._records) == ["A"]


def test_memory_values_expire_and_overwrites_do_not_grow_the_heap():
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    for n in range(1000):
        store.set_value(f"k{n}", {}, ttl=1 + n % 7)
    clock.advance(8)
    store.get_value("anything")
    assert store._values == {} and store._expiries == []
    for n in range(10_000):
        store.set_value("throttle", {"n": n}, ttl=3600)
    assert len(store._expiries) < 100 and store.get_value("throttle") == {"n": 9999}


# SQLite only.

def test_sqlite_keeps_records_across_close_and_reopen(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    first = open_store(url)
    first.create(make_tx())
    first.update("ws_CO_1", increment)
    first.set_value("k", {"v": 1}, ttl=3600)
    first.close()
    second = open_store(url)
    assert second.get("ws_CO_1").extra == {"n": 1}
    assert second.get_value("k") == {"v": 1}
    assert second.list() == ([second.get("ws_CO_1")], 1)
    second.close()


def test_sqlite_sees_what_another_process_writes(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    store = open_store(url)
    store.create(make_tx())
    assert store.get("ws_CO_1") is not None   # this thread now holds a connection
    script = (
        "import sys; from store import Transaction, open_store\n"
        "s = open_store(sys.argv[1])\n"
        "s.create(Transaction('ws_CO_2', 'm', '254712345678', 5, initiated_at=2e9))\n"
        "def done(tx): tx.status = 'completed'\n"
        "s.update('ws_CO_1', done)\n"
        "assert s.add('lock', {}, ttl=60)\n"
    )
    subprocess.run([sys.executable, "-c", script, url], cwd=ROOT, check=True, timeout=30)
    assert store.get("ws_CO_1").status == "completed"
    assert ids(store.list()[0]) == ["ws_CO_2", "ws_CO_1"]
    assert store.add("lock", {}, ttl=60) is False
    store.close()


def _increment_in_new_store(url: str, times: int) -> None:
    store = open_store(url)
    for _ in range(times):
        store.update("ws_CO_1", increment)
    store.close()


def _increment_in_inherited_store(store: Store, times: int) -> None:
    for _ in range(times):
        store.update("ws_CO_1", increment)


@pytest.mark.parametrize("share", ["url", "forked store object"])
def test_sqlite_updates_from_several_processes_lose_nothing(tmp_path, share):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    store = open_store(url)
    store.create(make_tx())   # the parent holds an open connection when it forks
    fork = multiprocessing.get_context("fork")
    if share == "url":
        workers = [fork.Process(target=_increment_in_new_store, args=(url, 25)) for _ in range(4)]
    else:
        workers = [fork.Process(target=_increment_in_inherited_store, args=(store, 25))
                   for _ in range(4)]
    for worker in workers:
        worker.start()
    store.update("ws_CO_1", increment)   # the parent writes too
    for worker in workers:
        worker.join(timeout=30)
    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]
    assert store.get("ws_CO_1").extra["n"] == 101
    store.close()


def test_sqlite_purges_expired_values_from_the_file(tmp_path):
    clock = FakeClock()
    store = open_store(f"sqlite:///{tmp_path / 'ledger.db'}", clock=clock)
    for n in range(50):
        store.set_value(f"throttle:{n}", {}, ttl=5)
    clock.advance(120)
    store.add("idem:new", {}, ttl=5)
    assert store._db().execute("SELECT key FROM kv").fetchall() == [("idem:new",)]
    store.close()


def test_sqlite_has_real_indexed_columns_and_wal(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'ledger.db'}")
    assert isinstance(store, SQLiteStore)
    store.create(make_tx(status="completed"))
    db = store._db()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT status, phone, json_extract(record, '$.amount')"
                      " FROM transactions").fetchone() == ("completed", PHONE, 100)
    plan = " ".join(row[-1] for row in db.execute(
        "EXPLAIN QUERY PLAN SELECT record FROM transactions WHERE phone = ?"
        " ORDER BY initiated_at DESC", (PHONE,)))
    assert "transactions_by_phone" in plan
    store.close()


# Redis only.

@pytest.fixture
def redis_backend(clean_redis_url):
    backend = Backend("redis", clean_redis_url, time.time)
    yield backend
    backend.close()


def test_redis_store_objects_on_one_url_share_everything(redis_backend):
    first, second = redis_backend.open(), redis_backend.open()
    first.create(make_tx())
    assert second.get("ws_CO_1") == first.get("ws_CO_1")
    with pytest.raises(DuplicateTransaction):
        second.create(make_tx())
    assert first.add("lock", {"by": "first"}, ttl=30)
    assert not second.add("lock", {"by": "second"}, ttl=30)
    assert second.get_value("lock") == {"by": "first"}

    def worker(store: Store) -> None:
        for _ in range(10):
            store.update("ws_CO_1", increment)

    threads = [threading.Thread(target=worker, args=(store,))
               for store in (first, second) * 5]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert first.get("ws_CO_1").extra["n"] == 100
    assert second.list() == ([first.get("ws_CO_1")], 1)


def test_redis_prefixes_keep_stores_apart(clean_redis_url):
    shop = open_store(f"{clean_redis_url}?prefix=shop:")
    default = open_store(clean_redis_url)
    shop.create(make_tx())
    shop.set_value("k", {}, ttl=30)
    assert default.get("ws_CO_1") is None and default.get_value("k") is None
    assert default.list() == ([], 0)
    default.create(make_tx())   # no collision
    client = redis.Redis.from_url(clean_redis_url, decode_responses=True)
    assert {key.split(":")[0] for key in client.keys()} == {"shop", "mpesa"}
    for store in (shop, default):
        store.close()
    client.close()


def test_redis_forgets_index_entries_of_expired_records(redis_backend):
    store = redis_backend.open(retention=0.8)
    client = redis.Redis.from_url(redis_backend.url, decode_responses=True)
    now = time.time()
    store.create(make_tx("A", initiated_at=now - 2))
    store.create(make_tx("B", initiated_at=now - 2, phone=OTHER_PHONE))
    time.sleep(0.5)
    store.create(make_tx("C", initiated_at=now))   # these keep the index sets alive
    store.create(make_tx("E", initiated_at=now, phone=OTHER_PHONE))
    time.sleep(0.5)                                # A and B have expired, C and E have not
    store.create(make_tx("D", initiated_at=now))   # creating sweeps the oldest entries
    assert client.zrange("mpesa:idx:all", 0, -1) == ["C", "D", "E"]
    assert client.zrange("mpesa:idx:status:pending", 0, -1) == ["C", "D", "E"]
    assert client.zrange(f"mpesa:idx:phone:{PHONE}", 0, -1) == ["C", "D"]
    assert client.zrange(f"mpesa:idx:phone:{OTHER_PHONE}", 0, -1) == ["B", "E"]
    assert ids(store.list(phone=OTHER_PHONE)[0]) == ["E"]   # listing forgets B
    assert client.zrange(f"mpesa:idx:phone:{OTHER_PHONE}", 0, -1) == ["E"]
    time.sleep(0.9)
    assert client.keys("mpesa:*") == []   # an idle store empties itself
    client.close()
