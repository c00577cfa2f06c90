"""One behavioural suite over every store backend, then what only one backend promises."""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import gc
import json
import math
import multiprocessing
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import tracemalloc
from contextlib import closing

import psycopg
import pytest
import redis

from store import (
    DURATION_BOUNDS,
    DuplicateTransaction,
    MemoryStore,
    RedisStore,
    SQLiteStore,
    Store,
    Tally,
    Transaction,
    open_store,
    order_key,
    tally,
)
from store.record import decode
from tests.helpers import ROOT, Backend, FakeClock

PHONE = "254712345678"
OTHER_PHONE = "254798765432"


def make_tx(
    checkout_request_id: str = "ws_CO_1", *, phone: str = PHONE, initiated_at: float = 1_700_000_000.0, **fields
) -> Transaction:
    return Transaction(
        payment_id=checkout_request_id,
        checkout_request_id=checkout_request_id,
        merchant_request_id=f"m-{checkout_request_id}",
        phone=phone,
        amount=100,
        initiated_at=initiated_at,
        **fields,
    )


def settled_tx(checkout_request_id: str = "ws_CO_1", status: str = "completed") -> Transaction:
    """A record as payments.py leaves it: Daraja's raw callback on it and in its history."""
    callback = {
        "Body": {
            "stkCallback": {
                "CheckoutRequestID": checkout_request_id,
                "ResultCode": 0,
                "ResultDesc": "Imekamilika ✓",
                "CallbackMetadata": {
                    "Item": [
                        {"Name": "Amount", "Value": 100.0},
                        {"Name": "MpesaReceiptNumber", "Value": "LHH31TV4QV"},
                        {"Name": "Balance"},
                    ]
                },
            }
        }
    }
    return make_tx(
        checkout_request_id,
        status=status,
        result_code=0,
        result_desc="Imekamilika ✓",
        mpesa_receipt_number="LHH31TV4QV",
        account_reference="Café №7",
        callback=callback,
        flags=["amount_checked"],
        extra={"cart": {"items": [1, 2]}},
        history=[
            {"at": 1_700_000_000.0, "event": "initiated", "amount": 100},
            {"at": 1_700_000_025.0, "event": "callback_received", "raw": callback},
        ],
    )


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


def test_no_record_handed_out_shares_nested_values_with_the_store(store):
    tx = settled_tx()
    store.create(tx)
    store.create(settled_tx("ws_CO_2", status="pending"))
    kept = {"ws_CO_1": copy.deepcopy(tx), "ws_CO_2": store.get("ws_CO_2")}
    handed_out = [
        tx,
        store.get("ws_CO_1"),
        store.update("ws_CO_1", lambda tx: None)[0],
        store.list()[0][0],
        store.list(status="completed", phone=PHONE)[0][0],
        store.search("LHH31TV4QV")[0][0],
        store.search(status="completed")[0][0],
        store.pending_before(2e9)[0],
    ]
    for record in handed_out:
        record.callback["Body"]["stkCallback"]["ResultCode"] = 1032
        record.history[1]["raw"]["Body"].clear()
        record.history.append({"at": 1.0, "event": "tampered"})
        record.flags.append("tampered")
        record.extra["cart"]["items"].append(3)
    assert {key: store.get(key) for key in kept} == kept


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
    assert store.update("ws_CO_1", increment)[1] == 1  # and the store still works


def test_update_may_not_change_the_id(store):
    store.create(make_tx())

    def rename(tx: Transaction) -> None:
        tx.checkout_request_id = "ws_CO_2"

    with pytest.raises(ValueError):
        store.update("ws_CO_1", rename)
    assert store.get("ws_CO_2") is None and store.get("ws_CO_1") is not None


def attempt(payment_id: str = "pay_1", *, initiated_at: float = 1_700_000_000.0, **fields) -> Transaction:
    """A record as the server now creates it: its own id, Daraja's ids not known yet."""
    return Transaction(payment_id, PHONE, 100, initiated_at=initiated_at, **fields)


def give_checkout_id(checkout_id: str):
    def mutate(tx: Transaction) -> None:
        tx.checkout_request_id = checkout_id
        tx.merchant_request_id = f"m-{checkout_id}"

    return mutate


def test_a_record_is_found_by_its_checkout_id_once_daraja_gave_it(store):
    store.create(attempt(order_id="ord_1"))
    assert store.get("pay_1").checkout_request_id is None
    assert store.find("ws_CO_9") is None
    updated, _ = store.update("pay_1", give_checkout_id("ws_CO_9"))
    assert updated.checkout_request_id == "ws_CO_9"
    assert store.find("ws_CO_9") == store.get("pay_1") == updated
    assert store.get("ws_CO_9") is None  # the key stays the payment id


def test_the_checkout_id_is_set_once_and_never_changed(store):
    store.create(attempt())
    store.update("pay_1", give_checkout_id("ws_CO_9"))
    store.update("pay_1", give_checkout_id("ws_CO_9"))  # the same again changes nothing
    with pytest.raises(ValueError):
        store.update("pay_1", give_checkout_id("ws_CO_8"))

    def forget(tx: Transaction) -> None:
        tx.checkout_request_id = None

    with pytest.raises(ValueError):
        store.update("pay_1", forget)

    def rename(tx: Transaction) -> None:
        tx.payment_id = "pay_2"

    with pytest.raises(ValueError):
        store.update("pay_1", rename)
    assert store.find("ws_CO_9").payment_id == "pay_1"
    assert store.find("ws_CO_8") is None and store.get("pay_2") is None


def test_a_checkout_id_belongs_to_one_record(store):
    store.create(attempt("pay_1", checkout_request_id="ws_CO_9"))
    with pytest.raises(DuplicateTransaction):
        store.create(attempt("pay_2", checkout_request_id="ws_CO_9"))
    store.create(attempt("pay_3"))
    with pytest.raises(DuplicateTransaction):
        store.update("pay_3", give_checkout_id("ws_CO_9"))
    assert store.get("pay_2") is None
    assert store.get("pay_3").checkout_request_id is None
    assert store.find("ws_CO_9").payment_id == "pay_1"
    store.create(make_tx("ws_CO_7"))  # a record from before payment ids: its checkout id is its key
    with pytest.raises(DuplicateTransaction):
        store.update("pay_3", give_checkout_id("ws_CO_7"))
    assert store.find("ws_CO_7").payment_id == "ws_CO_7"


def test_many_records_wait_for_their_checkout_id_at_once(store):
    for n in range(3):
        store.create(attempt(f"pay_{n}"))
    store.update("pay_1", give_checkout_id("ws_CO_1"))
    assert [store.find(f"ws_CO_{n}") for n in range(3)] == [None, store.get("pay_1"), None]
    assert store.list(status="pending")[1] == 3


def test_search_finds_a_record_by_its_payment_checkout_or_order_id(store):
    store.create(attempt("pay_1", order_id="ord_7"))
    store.create(attempt("pay_2", order_id="ord_7", checkout_request_id="ws_CO_2", initiated_at=1_700_000_001.0))
    store.create(attempt("pay_3", order_id="ord_8"))
    assert ids_of(store.search("pay_1")) == ["pay_1"]
    assert ids_of(store.search("ws_CO_2")) == ["pay_2"]
    assert ids_of(store.search("ord_7")) == ["pay_2", "pay_1"]
    assert ids_of(store.search("ord_7", status="failed")) == []
    assert ids_of(store.search("ord_")) == []  # ids match whole


def ids_of(page) -> list[str]:
    return [tx.payment_id for tx in page[0]]


def test_a_checkout_id_is_forgotten_with_its_record_except_in_the_ledgers(backend):
    store = backend.open(retention=0.6)
    store.create(attempt(initiated_at=backend.clock()))
    store.update("pay_1", give_checkout_id("ws_CO_9"))
    backend.elapse(0.8)
    if backend.ledger:
        assert store.find("ws_CO_9").payment_id == "pay_1"
    else:
        assert store.find("ws_CO_9") is None
        store.create(attempt("pay_2", checkout_request_id="ws_CO_9"))  # the id is free again
        assert store.find("ws_CO_9").payment_id == "pay_2"


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
    assert sorted(results) == list(range(1, 101))  # each increment saw the one before


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


@pytest.mark.parametrize(
    "filters, expected",
    [
        ({"status": "completed"}, ["D", "B"]),
        ({"status": "pending"}, ["A"]),
        ({"phone": PHONE}, ["D", "C", "A"]),
        ({"phone": OTHER_PHONE}, ["B"]),
        ({"status": "completed", "phone": PHONE}, ["D"]),
        ({"status": "failed", "phone": OTHER_PHONE}, []),
        ({"phone": "254700000000"}, []),
    ],
)
def test_list_filters_by_status_and_phone(store, four, filters, expected):
    page, total = store.list(**filters)
    assert (ids(page), total) == (expected, len(expected))


@pytest.mark.parametrize(
    "limit, offset, expected",
    [
        (2, 0, ["D", "C"]),
        (2, 1, ["C", "B"]),
        (2, 3, ["A"]),
        (2, 4, []),
        (0, 0, []),
    ],
)
def test_list_paginates_and_always_counts_every_match(store, four, limit, offset, expected):
    page, total = store.list(limit=limit, offset=offset)
    assert (ids(page), total) == (expected, 4)
    page, total = store.list(phone=PHONE, limit=limit, offset=offset)
    assert ids(page) == ["D", "C", "A"][offset : offset + limit] and total == 3


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
    assert ids(store.pending_before(now - 400)) == []  # strictly before
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
    store.set_value("k", {"v": 3}, ttl=30)  # a rewrite also replaces the ttl
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


def test_records_expire_after_retention_except_in_the_ledgers(backend):
    store = backend.open(retention=0.6)
    store.create(make_tx(initiated_at=backend.clock()))
    backend.elapse(0.3)
    store.update("ws_CO_1", increment)  # a write restarts the retention period
    backend.elapse(0.3)
    assert store.get("ws_CO_1") is not None
    backend.elapse(0.4)
    if backend.ledger:  # the ledger keeps everything
        assert store.get("ws_CO_1").extra == {"n": 1}
        assert store.list()[1] == 1
    else:
        assert store.get("ws_CO_1") is None
        assert store.update("ws_CO_1", increment) == (None, None)
        assert store.list() == ([], 0)
        assert store.list(phone=PHONE, status="pending") == ([], 0)
        assert store.pending_before(backend.clock() + 1) == []
        store.create(make_tx())  # the id is free again


def test_find_follows_a_checkout_id_to_the_record_that_holds_it_now(backend):
    store = backend.open(retention=0.6)
    store.create(dataclasses.replace(make_tx("ws_CO_9", initiated_at=backend.clock()), payment_id="pay_first"))
    assert store.find("ws_CO_9").payment_id == "pay_first"
    backend.elapse(1.0)
    second = dataclasses.replace(make_tx("ws_CO_9", initiated_at=backend.clock()), payment_id="pay_second")
    if backend.ledger:  # the ledger keeps every record: its CheckoutRequestID is never free again
        assert store.find("ws_CO_9").payment_id == "pay_first"
        with pytest.raises(DuplicateTransaction):
            store.create(second)
        return
    assert store.find("ws_CO_9") is None
    store.create(second)
    assert store.find("ws_CO_9").payment_id == "pay_second"


def test_a_poll_reads_the_record_with_its_orders_paid_marker(store, backend):
    """get_with_order: the record by either id, and the live value under its order's key."""
    tx = dataclasses.replace(make_tx("ws_CO_7", initiated_at=backend.clock()), payment_id="pay_7", order_id="ord_7")
    store.create(tx)
    store.create(dataclasses.replace(make_tx("ws_CO_8", initiated_at=backend.clock()), payment_id="pay_8"))
    for _ in range(2):  # a second poll may read differently (the Redis store remembers the ids)
        assert store.get_with_order("pay_7") == (tx, None)
        assert store.get_with_order(checkout_request_id="ws_CO_7") == (tx, None)
    store.add(order_key("ord_7"), {"paymentId": "pay_other", "amount": 100}, ttl=0.3)
    store.add(order_key("ord_8"), {"paymentId": "pay_x", "amount": 1}, ttl=30)  # another order's
    for _ in range(2):
        assert store.get_with_order("pay_7") == (tx, {"paymentId": "pay_other", "amount": 100})
        assert store.get_with_order(checkout_request_id="ws_CO_7")[1] == {"paymentId": "pay_other", "amount": 100}
        assert store.get_with_order("pay_8")[1] is None  # no order: no marker
    backend.elapse(0.4)
    assert store.get_with_order("pay_7") == (tx, None)  # the marker expired
    assert store.get_with_order("pay_unknown") == (None, None)
    assert store.get_with_order(checkout_request_id="ws_CO_unknown") == (None, None)
    assert store.get_with_order(checkout_request_id="pay_7") == (None, None)  # a payment id is not a checkout id


def test_a_poll_follows_a_checkout_id_to_the_record_that_holds_it_now(backend):
    store = backend.open(retention=0.6)
    first = dataclasses.replace(make_tx("ws_CO_9", initiated_at=backend.clock()), payment_id="pay_first")
    store.create(dataclasses.replace(first, order_id="ord_first"))
    assert store.get_with_order(checkout_request_id="ws_CO_9")[0].payment_id == "pay_first"
    backend.elapse(1.0)
    second = dataclasses.replace(make_tx("ws_CO_9", initiated_at=backend.clock()), payment_id="pay_second")
    if backend.ledger:  # the ledger keeps every record: its CheckoutRequestID is never free again
        assert store.get_with_order(checkout_request_id="ws_CO_9")[0].payment_id == "pay_first"
        return
    assert store.get_with_order(checkout_request_id="ws_CO_9") == (None, None)
    store.create(dataclasses.replace(second, order_id="ord_second"))
    store.add(order_key("ord_second"), {"paymentId": "pay_second", "amount": 100}, ttl=30)
    tx, paid = store.get_with_order(checkout_request_id="ws_CO_9")
    assert (tx.payment_id, paid) == ("pay_second", {"paymentId": "pay_second", "amount": 100})


@pytest.mark.parametrize("result_code", [0, 1032, "SFC_IC0003", None])
def test_records_round_trip_through_dicts_json_and_the_store(store, result_code):
    tx = make_tx(
        status="completed" if result_code == 0 else "failed",
        result_code=result_code,
        result_desc="Malipo yamekamilika — ✓",
        mpesa_receipt_number="LHH31TV4QV",
        transaction_date="2024-03-15T14:31:05+03:00",
        account_reference="Café №7",
        description="Tiketi 🎟",
        callback={
            "Body": {
                "stkCallback": {
                    "ResultCode": result_code,
                    "CallbackMetadata": {
                        "Item": [
                            {"Name": "Amount", "Value": 100},
                            {"Name": "PhoneNumber", "Value": 254712345678},
                            {"Name": "Note", "Value": "日本語"},
                        ]
                    },
                }
            }
        },
        completed_at=1_700_000_030.5,
        settled_by="callback",
        flags=["amount_checked"],
        history=[
            {"at": 1_700_000_000.0, "event": "initiated"},
            {"at": 1_700_000_030.5, "event": "callback", "result_code": result_code},
        ],
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


def test_a_record_stored_before_payment_ids_reads_back_keyed_by_its_checkout_id():
    older = {k: v for k, v in make_tx("ws_CO_5").to_dict().items() if k not in ("payment_id", "order_id")}
    assert Transaction.from_dict(older).payment_id == "ws_CO_5"
    assert decode(json.dumps(older)) == Transaction.from_dict(older)
    assert decode(json.dumps(older)).order_id is None


def test_from_dict_ignores_keys_it_does_not_know_and_fills_defaults():
    data = {
        "checkout_request_id": "ws_CO_1",
        "merchant_request_id": "m",
        "phone": PHONE,
        "amount": 5,
        "added_by_a_later_version": 1,
    }
    tx = Transaction.from_dict(data)
    assert (tx.currency, tx.status, tx.history) == ("KES", "pending", [])


def stored_text(backend: Backend, checkout_request_id: str) -> str:
    """The record as the backend keeps it: the ledgers' record column, Redis's tx:<id> key."""
    if backend.kind == "sqlite":
        with closing(sqlite3.connect(sqlite_file(backend.url))) as db:
            query = "SELECT record FROM transactions WHERE payment_id = ?"
            return db.execute(query, (checkout_request_id,)).fetchone()[0]
    if backend.kind == "postgres":
        with psycopg.connect(backend.url) as db:
            query = "SELECT record FROM transactions WHERE payment_id = %s"
            return db.execute(query, (checkout_request_id,)).fetchone()[0]
    with closing(redis.Redis.from_url(backend.url, decode_responses=True)) as client:
        return client.get(f"mpesa:tx:{checkout_request_id}")


def keep_text(backend: Backend, checkout_request_id: str, text: str) -> None:
    """Put text where the backend keeps the record, as another version of the server would."""
    if backend.kind == "sqlite":
        with closing(sqlite3.connect(sqlite_file(backend.url))) as db, db:
            query = "UPDATE transactions SET record = ? WHERE payment_id = ?"
            db.execute(query, (text, checkout_request_id))
        return
    if backend.kind == "postgres":
        with psycopg.connect(backend.url) as db:  # commits on leaving
            db.execute("UPDATE transactions SET record = %s WHERE payment_id = %s", (text, checkout_request_id))
        return
    with closing(redis.Redis.from_url(backend.url, decode_responses=True)) as client:
        client.set(f"mpesa:tx:{checkout_request_id}", text, keepttl=True)


def sqlite_file(url: str) -> str:
    return url.removeprefix("sqlite:///")


@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgres"], indirect=True)
def test_a_record_is_kept_as_its_json_and_other_versions_of_it_read_back(backend):
    store = backend.open()
    tx = settled_tx()
    store.create(tx)
    text = stored_text(backend, "ws_CO_1")
    assert text == json.dumps(dataclasses.asdict(tx), ensure_ascii=False, separators=(",", ":"))
    assert store.get("ws_CO_1") == tx == Transaction.from_dict(json.loads(text))
    later = json.dumps({**json.loads(text), "added_by_a_later_version": 1, "flags": None})
    keep_text(backend, "ws_CO_1", later)
    assert store.get("ws_CO_1") == dataclasses.replace(tx, flags=None)
    older = json.dumps({k: v for k, v in json.loads(text).items() if k not in ("flags", "extra")})
    keep_text(backend, "ws_CO_1", older)
    assert (store.get("ws_CO_1").flags, store.get("ws_CO_1").extra) == ([], {})


def test_to_dict_and_from_dict_copy_nested_values():
    tx = make_tx(extra={"a": {"b": 1}})
    data = tx.to_dict()
    data["extra"]["a"]["b"] = 2
    assert tx.extra == {"a": {"b": 1}}
    again = Transaction.from_dict(data)
    data["extra"]["a"]["b"] = 3
    assert again.extra == {"a": {"b": 2}}


@pytest.mark.parametrize("url", ["mysql://db/x", "memcached://h", "payments.db", ""])
def test_open_store_refuses_unknown_schemes_naming_the_choices(url):
    scheme = url.partition("://")[0] if "://" in url else ""
    with pytest.raises(ValueError) as error:
        open_store(url)
    assert str(error.value) == (
        f"STORE_URL: unsupported scheme '{scheme}' (use memory://, sqlite:///path.db, "
        "redis://host:port/db or postgresql://user:password@host:port/db)"
    )


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:"])
def test_open_store_wants_a_file_for_sqlite(url):
    with pytest.raises(ValueError, match="sqlite:///relative.db"):
        open_store(url)


def test_open_store_names_a_sqlite_folder_that_does_not_exist(tmp_path):
    with pytest.raises(ValueError, match="STORE_URL: the folder .* for the SQLite file does not exist"):
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


# Memory only.


def traced_memory() -> int:
    """Bytes this process holds that it allocated since tracemalloc started."""
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


@pytest.fixture
def tracing():
    tracemalloc.start()
    yield
    tracemalloc.stop()


def test_memory_expired_records_are_dropped_at_once_and_give_their_memory_back(tracing):
    def spread_tx(n: int) -> Transaction:
        """Records started five minutes apart, so that each has counters of its own."""
        return dataclasses.replace(scattered_tx(n), initiated_at=MIDNIGHT + n * 300)

    clock = FakeClock()
    store = MemoryStore(retention=100, clock=clock)
    empty = traced_memory()
    for n in range(3000):
        store.create(spread_tx(n))
    clock.advance(50)
    for n in range(3000, 3100):
        store.create(spread_tx(n))
    full = traced_memory() - empty

    clock.advance(60)  # the 3000 old records are now past retention, the 100 new ones are not
    assert store.list(limit=0) == ([], 100)
    assert traced_memory() - empty < 0.25 * full
    clock.advance(50)
    assert store.get("ws_CO_3000") is None
    assert store.search() == ([], 0) and store.overview(MIDNIGHT, MIDNIGHT + 11 * DAY, DAY).total.counts == {}
    assert traced_memory() - empty < 0.2 * full  # the search indexes and counters forgot them too


def test_memory_a_rewritten_record_does_not_hold_back_the_expiry_of_others():
    clock = FakeClock()
    store = MemoryStore(retention=100, clock=clock)
    store.create(make_tx("A"))
    store.create(make_tx("B"))
    clock.advance(60)
    store.update("A", increment)  # A now expires 60 s after B
    clock.advance(50)
    assert store.search() == ([store.get("A")], 1)
    assert store.get("B") is None


def test_memory_values_expire_and_overwrites_hold_no_memory(tracing):
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    store.set_value("throttle", {"n": 0}, ttl=3600)
    one = traced_memory()
    for n in range(10_000):
        store.set_value("throttle", {"n": n}, ttl=3600)
    assert store.get_value("throttle") == {"n": 9999}
    assert traced_memory() - one < 100_000  # each overwrite keeping its old expiry would hold ~80 bytes

    for n in range(1000):
        store.set_value(f"k{n}", {"pad": "x" * 1000}, ttl=1 + n % 7)
    full = traced_memory() - one
    clock.advance(8)
    assert [store.get_value(f"k{n}") for n in range(1000)] == [None] * 1000
    assert traced_memory() - one < 0.1 * full


def scattered_tx(n: int) -> Transaction:
    """Record n of a varied set: every status and reason, initiated out of write order."""
    status, reason = [("completed", None), ("failed", "cancelled"), ("failed", "timeout"), ("pending", None)][n % 4]
    return make_tx(
        f"ws_CO_{n:04d}",
        phone=f"2547{n:08d}",
        status=status,
        reason=reason,
        initiated_at=1_700_000_000.0 + (n * 7919) % 1000,
        mpesa_receipt_number=f"R{n:04d}" if status == "completed" else None,
        account_reference=f"ref-{n % 7}",
    )


def test_memory_expiry_leaves_the_indexes_as_if_only_the_survivors_were_written():
    clock = FakeClock()
    store = MemoryStore(retention=100, clock=clock)
    for n in range(1000):
        store.create(scattered_tx(n))
    clock.advance(50)
    survivors = [scattered_tx(n) for n in range(1000, 1040)]
    for tx in survivors:  # one a second
        store.create(tx)
        clock.advance(1)

    def only(transactions: list[Transaction]) -> MemoryStore:
        reference = MemoryStore(retention=100, clock=clock)
        for tx in transactions:
            reference.create(tx)
        return reference

    # 1000 expire at once: filtered out of "all" and "status:failed", deleted from the others.
    clock.advance(20)
    # Then the 3 oldest survivors: deleted one by one.
    for reference in (only(survivors), only(survivors[3:])):
        store.get("anything")
        for query in [
            {},
            {"status": "failed"},
            {"reason": "timeout"},
            {"text": "R1004"},
            {"text": "ref-3"},
            {"text": "0001012"},
            {"since": 1_700_000_500.0},
        ]:
            assert store.search(**query, limit=100) == reference.search(**query, limit=100)
        assert store.list(limit=100) == reference.list(limit=100)
        clock.advance(42.5)
    assert store.search("R0004") == ([], 0)


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
    assert store.get("ws_CO_1") is not None  # this thread now holds a connection
    script = (
        "import sys; from store import Transaction, open_store\n"
        "s = open_store(sys.argv[1])\n"
        "s.create(Transaction('ws_CO_2', '254712345678', 5, checkout_request_id='ws_CO_2', initiated_at=2e9))\n"
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
    store.create(make_tx())  # the parent holds an open connection when it forks
    fork = multiprocessing.get_context("fork")
    if share == "url":
        workers = [fork.Process(target=_increment_in_new_store, args=(url, 25)) for _ in range(4)]
    else:
        workers = [fork.Process(target=_increment_in_inherited_store, args=(store, 25)) for _ in range(4)]
    for worker in workers:
        worker.start()
    store.update("ws_CO_1", increment)  # the parent writes too
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
    with closing(sqlite3.connect(tmp_path / "ledger.db")) as db:
        assert db.execute("SELECT key FROM kv").fetchall() == [("idem:new",)]
    store.close()


def test_sqlite_has_real_indexed_columns_and_wal(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'ledger.db'}")
    assert isinstance(store, SQLiteStore)
    store.create(make_tx(status="completed"))
    db = sqlite3.connect(tmp_path / "ledger.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT status, phone, json_extract(record, '$.amount') FROM transactions").fetchone() == (
        "completed",
        PHONE,
        100,
    )
    plan = " ".join(
        row[-1]
        for row in db.execute(
            "EXPLAIN QUERY PLAN SELECT record FROM transactions WHERE phone = ? ORDER BY initiated_at DESC", (PHONE,)
        )
    )
    assert "transactions_by_phone" in plan
    db.close()
    store.close()


def test_sqlite_writers_wait_their_turn_on_the_lock_file_and_readers_do_not(tmp_path):
    path = tmp_path / "ledger.db"
    store = open_store(f"sqlite:///{path}")
    store.create(make_tx())
    updated = threading.Event()
    writer = threading.Thread(target=lambda: (store.update("ws_CO_1", increment), updated.set()))
    with open(f"{path}-lock") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # another writer's turn
        writer.start()
        assert not updated.wait(0.3)
        assert store.get("ws_CO_1").extra == {}
        fcntl.flock(lock_file, fcntl.LOCK_UN)
        assert updated.wait(10)
    writer.join()
    assert store.get("ws_CO_1").extra == {"n": 1}
    store.close()


def test_sqlite_lock_file_is_closed_by_close_and_when_a_thread_ends(tmp_path):
    path = tmp_path / "ledger.db"

    def lock_files_open() -> int:
        return sum(
            os.readlink(f"/proc/self/fd/{fd}") == f"{path}-lock"
            for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")
        )

    store = open_store(f"sqlite:///{path}")
    store.create(make_tx())
    for _ in range(5):
        thread = threading.Thread(target=store.update, args=("ws_CO_1", increment))
        thread.start()
        thread.join()
    gc.collect()
    assert lock_files_open() == 1  # this thread's
    store.close()
    assert lock_files_open() == 0


# Redis only.


@pytest.fixture
def redis_backend(clean_redis_url):
    backend = Backend("redis", clean_redis_url, time.time)
    yield backend
    backend.close()


def test_redis_records_from_before_payment_ids_are_found_by_their_checkout_id(redis_backend):
    store = redis_backend.open()
    store.create(settled_tx("ws_CO_old"))
    with closing(redis.Redis.from_url(redis_backend.url, decode_responses=True)) as client:
        client.delete("mpesa:co:ws_CO_old")  # what an older version wrote: the record alone
        client.set("mpesa:tx:ws_CO_old", without_payment_ids(settled_tx("ws_CO_old")), keepttl=True)
    assert store.get("ws_CO_old") == store.find("ws_CO_old") == settled_tx("ws_CO_old")
    assert ids(store.search("ws_CO_old")[0]) == ["ws_CO_old"]
    store.update("ws_CO_old", increment)
    assert store.find("ws_CO_old").extra["n"] == 1
    with pytest.raises(DuplicateTransaction):
        store.create(attempt("pay_new", checkout_request_id="ws_CO_old"))
    store.create(attempt("pay_other"))
    assert store.find("pay_other") is None  # a payment id is not a checkout id


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

    threads = [threading.Thread(target=worker, args=(store,)) for store in (first, second) * 5]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert first.get("ws_CO_1").extra["n"] == 100
    assert second.list() == ([first.get("ws_CO_1")], 1)


def test_redis_url_names_the_database_and_the_prefix(clean_redis_url):
    store = open_store(f"{clean_redis_url}?prefix=shop1:&socket_timeout=2")
    assert isinstance(store, RedisStore)
    store.create(make_tx())
    assert store.get("ws_CO_1") == make_tx()
    # The session's database is 15, not Redis's default 0: the record is found only if the URL's was used.
    with closing(redis.Redis.from_url(clean_redis_url, decode_responses=True)) as client:
        assert client.get("shop1:tx:ws_CO_1") is not None
        assert {key.split(":")[0] for key in client.keys()} == {"shop1"}
    store.close()


def test_a_timeout_in_the_redis_url_bounds_each_call():
    with socket.socket() as silent:  # accepts connections and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        store = open_store(f"redis://127.0.0.1:{silent.getsockname()[1]}/3?socket_timeout=0.3")
        began = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            store.get("ws_CO_1")
        assert time.monotonic() - began < 2.5  # without it, the store's default of 5 s
        store.close()


def test_redis_prefixes_keep_stores_apart(clean_redis_url):
    shop = open_store(f"{clean_redis_url}?prefix=shop:")
    default = open_store(clean_redis_url)
    shop.create(make_tx())
    shop.set_value("k", {}, ttl=30)
    assert default.get("ws_CO_1") is None and default.get_value("k") is None
    assert default.list() == ([], 0)
    default.create(make_tx())  # no collision
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
    store.create(make_tx("C", initiated_at=now))  # these keep the index sets alive
    store.create(make_tx("E", initiated_at=now, phone=OTHER_PHONE))
    time.sleep(0.5)  # A and B have expired, C and E have not
    store.create(make_tx("D", initiated_at=now))  # creating sweeps the oldest entries
    assert client.zrange("mpesa:idx:all", 0, -1) == ["C", "D", "E"]
    assert client.zrange("mpesa:idx:status:pending", 0, -1) == ["C", "D", "E"]
    assert client.zrange(f"mpesa:idx:phone:{PHONE}", 0, -1) == ["C", "D"]
    assert client.zrange(f"mpesa:idx:phone:{OTHER_PHONE}", 0, -1) == ["B", "E"]
    assert ids(store.list(phone=OTHER_PHONE)[0]) == ["E"]  # listing forgets B
    assert client.zrange(f"mpesa:idx:phone:{OTHER_PHONE}", 0, -1) == ["E"]
    time.sleep(0.9)
    assert client.keys("mpesa:*") == []  # an idle store empties itself
    client.close()


# The dashboard's reads, over every backend: search() and overview() against a data set
# counted by hand. MIDNIGHT is a Nairobi midnight (21:00 UTC), so days and hours align.

MIDNIGHT = 1_699_995_600.0  # 2023-11-15 00:00 EAT
HOUR, DAY = 3600, 86400


def payment(
    checkout_request_id: str,
    minutes: float,
    *,
    phone: str = PHONE,
    amount: int = 100,
    status: str = "pending",
    after: float | None = None,
    events: tuple = (),
    **fields,
) -> Transaction:
    """A record started `minutes` after MIDNIGHT and settled `after` seconds later."""
    started = MIDNIGHT + minutes * 60
    history = [{"at": started, "event": "initiated"}, {"at": started, "event": "push_accepted"}]
    history += [{"at": started + 1, **event} for event in events]
    return Transaction(
        checkout_request_id,
        phone,
        amount,
        checkout_request_id=checkout_request_id,
        merchant_request_id=f"m-{checkout_request_id}",
        status=status,
        initiated_at=started,
        completed_at=None if after is None else started + after,
        history=history,
        **fields,
    )


CALLBACK = {"event": "callback_received"}
DATA_SET = [
    # hour 0
    payment(
        "P1",
        5,
        amount=100,
        status="completed",
        after=8,
        settled_by="callback",
        mpesa_receipt_number="QAB1C2D3E4",
        account_reference="CART-1",
        events=(CALLBACK, {"event": "completed"}),
    ),
    payment(
        "P2",
        10,
        phone=OTHER_PHONE,
        amount=250,
        status="completed",
        after=25,
        settled_by="query",
        mpesa_receipt_number="QXY9Z8W7V6",
        account_reference="Cart-2",
        events=({"event": "queried", "result": "pending"}, {"event": "query_received"}, {"event": "completed"}),
    ),
    payment(
        "P3",
        20,
        phone="254711111678",
        status="failed",
        reason="cancelled",
        after=12,
        settled_by="callback",
        account_reference="cart-1",
        events=(CALLBACK, {"event": "failed"}),
    ),
    # hour 1
    payment(
        "P4",
        60,
        phone="254722222222",
        status="failed",
        reason="timeout",
        after=120,
        settled_by="timeout",
        events=(
            {"event": "queried", "result": "error"},
            {"event": "queried", "result": "error"},
            {"event": "timed_out"},
        ),
    ),
    payment("P5", 90, phone="254733333333", amount=50),
    # hour 3
    payment(
        "P6",
        195,
        status="failed",
        reason="wrong_pin",
        after=30,
        settled_by="callback",
        events=(CALLBACK, {"event": "failed"}, CALLBACK, {"event": "duplicate_ignored"}),
    ),
    payment(
        "P7",
        196,
        phone=OTHER_PHONE,
        amount=1000,
        status="completed",
        after=40,
        settled_by="callback",
        mpesa_receipt_number="QLM5N6P7Q8",
        flags=["late_result"],
        events=(CALLBACK, {"event": "completed"}),
    ),
    # the next day, 02:00
    payment(
        "P8",
        24 * 60 + 120,
        phone="254744444444",
        amount=500,
        status="completed",
        after=5,
        settled_by="callback",
        mpesa_receipt_number="QRS1T2U3V4",
        events=(CALLBACK, {"event": "completed"}),
    ),
]


@pytest.fixture
def ledger(store):
    for tx in DATA_SET:
        store.create(tx)
    return store


def test_tally_names_what_one_record_adds():
    p4 = next(tx for tx in DATA_SET if tx.checkout_request_id == "P4")
    assert tally(p4) == {
        "started": 1,
        "status:failed": 1,
        "reason:timeout": 1,
        "settled:timeout": 1,
        "time:120": 1,
        "event:initiated": 1,
        "event:push_accepted": 1,
        "event:queried": 2,
        "event:queried:error": 2,
        "event:timed_out": 1,
    }
    assert tally(make_tx()) == {"started": 1, "status:pending": 1}


def test_time_to_final_is_the_bound_of_the_bucket_holding_that_share():
    durations = Tally({"time:10": 1, "time:15": 1, "time:30": 2, "time:45": 1, "time:120": 1})
    assert durations.time_to_final(0.5) == 30  # 3rd of 6
    assert durations.time_to_final(0.95) == 120  # 6th of 6
    assert durations.time_to_final(0.01) == 10
    assert Tally({"time:inf": 1}).time_to_final(0.5) == float("inf")
    assert Tally().time_to_final(0.5) is None and Tally().conversion is None
    assert DURATION_BOUNDS == tuple(sorted(DURATION_BOUNDS))


def test_overview_of_a_day_adds_up_the_hand_counted_data_set(ledger):
    day = ledger.overview(MIDNIGHT, MIDNIGHT + DAY, HOUR)
    total = day.total
    assert (total.started, total.completed, total.failed, total.pending) == (7, 3, 3, 1)
    assert total.received == 100 + 250 + 1000
    assert total.conversion == 3 / 7
    assert total.group("reason") == {"cancelled": 1, "timeout": 1, "wrong_pin": 1}
    assert total.group("settled") == {"callback": 4, "query": 1, "timeout": 1}
    # final after 8, 25, 12, 120, 30, 40 s: buckets 10, 30, 15, 120, 30, 45
    assert (total.time_to_final(0.5), total.time_to_final(0.95)) == (30, 120)
    assert total["event:queried"] == 3 and total["event:queried:error"] == 2
    assert total["event:callback_received"] == 5 and total["event:duplicate_ignored"] == 1
    assert total["flag:late_result"] == 1
    assert len(day.buckets) == 24
    assert [start for start, _ in day.buckets[:2]] == [MIDNIGHT, MIDNIGHT + HOUR]
    started = {round((start - MIDNIGHT) / HOUR): b.started for start, b in day.buckets if b.started}
    assert started == {0: 3, 1: 2, 3: 2}
    hour0, hour1 = day.buckets[0][1], day.buckets[1][1]
    assert (hour0.completed, hour0.failed, hour0.received) == (2, 1, 350)
    assert (hour1.failed, hour1.pending, hour1.received) == (1, 1, 0)


def test_overview_by_day_and_by_five_minutes(ledger):
    days = ledger.overview(MIDNIGHT, MIDNIGHT + 2 * DAY, DAY)
    assert [(b.started, b.completed, b.received) for _, b in days.buckets] == [(7, 3, 1350), (1, 1, 500)]
    assert days.total.started == 8 and days.total.received == 1850
    hour = ledger.overview(MIDNIGHT, MIDNIGHT + HOUR, 300)
    assert [b.started for _, b in hour.buckets] == [0, 1, 1, 0, 1] + [0] * 7
    week = ledger.overview(MIDNIGHT - 5 * DAY, MIDNIGHT + 2 * DAY, DAY)
    assert week.total.started == 8 and len(week.buckets) == 7
    assert ledger.overview(MIDNIGHT + 2 * DAY, MIDNIGHT + 3 * DAY, HOUR).total.counts == {}


def test_overview_follows_updates(ledger):
    def complete(tx: Transaction) -> None:
        tx.status, tx.settled_by = "completed", "callback"
        tx.completed_at = tx.initiated_at + 3
        tx.history.append({"at": tx.completed_at, "event": "completed"})

    ledger.update("P5", complete)
    total = ledger.overview(MIDNIGHT, MIDNIGHT + DAY, HOUR).total
    assert (total.completed, total.pending, total.received) == (4, 0, 1400)
    assert total.group("settled")["callback"] == 5 and total["time:3"] == 1


@pytest.mark.parametrize(
    "since, until, step",
    [
        (MIDNIGHT + 7, MIDNIGHT + HOUR + 7, 300),  # not on a 5-minute boundary
        (MIDNIGHT, MIDNIGHT + HOUR, 7 * 60),  # nor is the step
        (MIDNIGHT, MIDNIGHT + 1000, 300),  # not a whole number of steps
        (MIDNIGHT, MIDNIGHT, 300),
    ],
)
def test_overview_refuses_bounds_off_the_buckets(store, since, until, step):
    with pytest.raises(ValueError):
        store.overview(since, until, step)


def test_overview_forgets_with_the_records_except_in_the_ledgers(backend):
    store = backend.open(retention=0.6)
    store.create(payment("P1", 5, status="completed", after=3))
    backend.elapse(0.8)
    started = store.overview(MIDNIGHT, MIDNIGHT + DAY, HOUR).total.started
    assert started == (1 if backend.ledger else 0)


@pytest.mark.parametrize(
    "query, expected",
    [
        ({}, ["P8", "P7", "P6", "P5", "P4", "P3", "P2", "P1"]),
        ({"text": "QAB1C2D3E4"}, ["P1"]),
        ({"text": " qab1c2d3e4 "}, ["P1"]),  # receipts: any case, trimmed
        ({"text": "CART-1"}, ["P3", "P1"]),  # references: any case
        ({"text": "cart-2"}, ["P2"]),
        ({"text": "678"}, ["P6", "P3", "P1"]),  # a phone's last digits
        ({"text": "45678"}, ["P6", "P1"]),
        ({"text": PHONE}, ["P6", "P1"]),
        ({"text": "78"}, []),  # too few digits to mean a phone
        ({"text": "P4"}, ["P4"]),  # a CheckoutRequestID, exactly
        ({"text": "p4"}, []),
        ({"text": "nothing"}, []),
        ({"status": "failed"}, ["P6", "P4", "P3"]),
        ({"status": "pending"}, ["P5"]),
        ({"reason": "cancelled"}, ["P3"]),
        ({"reason": "timeout", "status": "failed"}, ["P4"]),
        ({"reason": "timeout", "status": "completed"}, []),
        ({"since": MIDNIGHT + HOUR, "until": MIDNIGHT + 196 * 60}, ["P6", "P5", "P4"]),
        ({"since": MIDNIGHT + DAY}, ["P8"]),
        ({"until": MIDNIGHT + 10 * 60}, ["P1"]),  # until is excluded
        ({"text": "cart-1", "status": "completed"}, ["P1"]),
        ({"text": OTHER_PHONE, "since": MIDNIGHT + HOUR}, ["P7"]),
        ({"status": "failed", "since": MIDNIGHT + HOUR, "until": MIDNIGHT + 2 * HOUR}, ["P4"]),
    ],
)
def test_search_finds_by_every_field_and_filter(ledger, query, expected):
    page, total = ledger.search(**query)
    assert (ids(page), total) == (expected, len(expected))


@pytest.mark.parametrize(
    "limit, offset, expected",
    [
        (2, 0, ["P8", "P7"]),
        (2, 1, ["P7", "P6"]),
        (3, 6, ["P2", "P1"]),
        (2, 8, []),
        (0, 0, []),
    ],
)
def test_search_paginates_and_counts_every_match(ledger, limit, offset, expected):
    assert ledger.search(limit=limit, offset=offset) == ([ledger.get(i) for i in expected], 8)
    page, total = ledger.search("cart-1", limit=1, offset=1)
    assert (ids(page), total) == (["P1"], 2)


def test_search_follows_updates(ledger):
    def complete(tx: Transaction) -> None:
        tx.status, tx.mpesa_receipt_number, tx.account_reference = "completed", "QNEW123456", "X"

    def unfail(tx: Transaction) -> None:
        tx.status, tx.reason = "completed", None

    ledger.update("P5", complete)
    ledger.update("P3", unfail)
    assert ledger.search(status="pending") == ([], 0)
    assert ids(ledger.search("qnew123456")[0]) == ["P5"]
    assert ids(ledger.search(reason="cancelled")[0]) == []
    assert ids(ledger.search("cart-1")[0]) == ["P3", "P1"]
    assert ids(ledger.search(status="completed", limit=3)[0]) == ["P8", "P7", "P5"]


def test_search_refuses_an_unknown_status(store):
    with pytest.raises(ValueError):
        store.search(status="paid")


def test_search_forgets_expired_records_except_in_the_ledgers(backend):
    store = backend.open(retention=0.6)
    store.create(payment("P1", 5, status="completed", mpesa_receipt_number="QAB1C2D3E4", account_reference="CART-1"))
    backend.elapse(0.8)
    found = [store.search(text)[1] for text in ("QAB1C2D3E4", "cart-1", "678", "P1")]
    found += [store.search(status="completed")[1], store.search()[1]]
    assert found == [1] * 6 if backend.ledger else [0] * 6


def test_sqlite_search_uses_its_indexes(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'ledger.db'}")
    db = sqlite3.connect(tmp_path / "ledger.db")

    def plan(sql: str, *params) -> str:
        return " ".join(row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params))

    text = plan(
        "SELECT record FROM transactions WHERE payment_id = ? OR checkout_request_id = ? OR order_id = ?"
        " OR receipt_key = ? OR reference_key = ? OR (phone_reversed >= ? AND phone_reversed < ?)",
        "x",
        "x",
        "x",
        "X",
        "x",
        "876",
        "876:",
    )
    indexes = ("by_checkout", "by_order", "by_receipt", "by_reference", "by_phone_end", "sqlite_autoindex")
    assert all(index in text for index in indexes), text
    assert "transactions_by_reason" in plan(
        "SELECT record FROM transactions WHERE status = 'failed' AND reason = ? ORDER BY initiated_at DESC", "cancelled"
    )
    assert "SCAN" not in plan("SELECT bucket, name, value FROM tallies WHERE step = 3600 AND bucket BETWEEN 1 AND 24")
    db.close()
    store.close()


def test_sqlite_ledger_made_before_the_dashboard_is_upgraded_and_counted(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE transactions (checkout_request_id TEXT PRIMARY KEY, status TEXT NOT NULL,
            phone TEXT NOT NULL, initiated_at REAL NOT NULL, record TEXT NOT NULL);
        CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires_at REAL NOT NULL);
    """)
    for tx in DATA_SET:
        db.execute(
            "INSERT INTO transactions VALUES (?, ?, ?, ?, ?)",
            (tx.checkout_request_id, tx.status, tx.phone, tx.initiated_at, json.dumps(tx.to_dict())),
        )
    db.commit()
    db.close()
    for _ in range(2):  # the second opening finds everything in place and counts nothing twice
        store = open_store(f"sqlite:///{path}")
        assert store.overview(MIDNIGHT, MIDNIGHT + 2 * DAY, DAY).total.started == 8
        assert ids(store.search("qab1c2d3e4")[0]) == ["P1"]
        assert ids(store.search("678")[0]) == ["P6", "P3", "P1"]
        store.close()


def test_memory_search_finds_by_its_indexes_and_forgets_with_the_records():
    clock = FakeClock()
    store = MemoryStore(retention=100, clock=clock)
    for tx in DATA_SET:
        store.create(tx)
    assert ids(store.search("qab1c2d3e4")[0]) == ["P1"]
    assert ids(store.search("678", status="failed")[0]) == ["P6", "P3"]
    assert store.search(reason="cancelled")[1] == 1
    assert ids(store.search(limit=2, offset=1)[0]) == ["P7", "P6"]
    clock.advance(101)
    assert store.get("P1") is None
    for query in ({"text": "qab1c2d3e4"}, {"text": "678"}, {"status": "failed"}, {"reason": "cancelled"}, {}):
        assert store.search(**query) == ([], 0)
    assert store.overview(MIDNIGHT, MIDNIGHT + 2 * DAY, DAY).total.counts == {}


# What version 1 of the SQLite store made: a ledger keyed by CheckoutRequestID, with the
# dashboard's search columns and indexes (its tallies are left out: they are counted again
# from the records when missing, as another test shows).
LEDGER_KEYED_BY_CHECKOUT_ID = """
CREATE TABLE transactions (
    checkout_request_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    phone TEXT NOT NULL,
    initiated_at REAL NOT NULL,
    record TEXT NOT NULL,
    reason GENERATED ALWAYS AS (json_extract(record, '$.reason')) VIRTUAL,
    receipt_key GENERATED ALWAYS AS (upper(coalesce(json_extract(record, '$.mpesa_receipt_number'), ''))) VIRTUAL,
    reference_key GENERATED ALWAYS AS (lower(coalesce(json_extract(record, '$.account_reference'), ''))) VIRTUAL
);
CREATE INDEX transactions_by_time ON transactions (initiated_at, checkout_request_id);
CREATE INDEX transactions_by_status ON transactions (status, initiated_at, checkout_request_id);
CREATE INDEX transactions_by_phone ON transactions (phone, initiated_at, checkout_request_id);
CREATE INDEX transactions_by_reason ON transactions (reason, status, initiated_at, checkout_request_id);
CREATE INDEX transactions_by_receipt ON transactions (receipt_key);
CREATE INDEX transactions_by_reference ON transactions (reference_key);
CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX kv_by_expiry ON kv (expires_at);
CREATE TABLE counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
PRAGMA user_version = 1;
"""


def without_payment_ids(tx: Transaction) -> str:
    """The record as a version before payment ids wrote it."""
    return json.dumps({k: v for k, v in tx.to_dict().items() if k not in ("payment_id", "order_id")})


def test_sqlite_ledger_keyed_by_checkout_id_is_rekeyed_once_and_every_record_still_found(tmp_path):
    path = tmp_path / "v1.db"
    with closing(sqlite3.connect(path)) as db, db:
        db.executescript(LEDGER_KEYED_BY_CHECKOUT_ID)
        for tx in DATA_SET:
            db.execute(
                "INSERT INTO transactions (checkout_request_id, status, phone, initiated_at, record)"
                " VALUES (?, ?, ?, ?, ?)",
                (tx.checkout_request_id, tx.status, tx.phone, tx.initiated_at, without_payment_ids(tx)),
            )
        db.execute("INSERT INTO counters VALUES ('stock:tee', 3)")
    url = f"sqlite:///{path}"
    for _ in range(2):  # the second opening finds nothing left to do
        store = open_store(url)
        for tx in DATA_SET:
            assert store.get(tx.checkout_request_id) == store.find(tx.checkout_request_id) == tx
        assert ids(store.search("P4")[0]) == ["P4"]
        assert ids(store.search("qab1c2d3e4")[0]) == ["P1"]
        assert ids(store.search(reason="cancelled")[0]) == ["P3"]
        assert ids(store.pending_before(math.inf)) == ["P5"]
        assert ids(store.list(phone=OTHER_PHONE)[0]) == ["P7", "P2"]
        assert store.get_counter("stock:tee") == 3
        store.close()
    store = open_store(url)
    settled, _ = store.update("P5", lambda tx: setattr(tx, "status", "failed"))
    assert settled.payment_id == "P5" and store.find("P5").status == "failed"
    with pytest.raises(DuplicateTransaction):
        store.create(attempt("pay_new", checkout_request_id="P1"))
    store.create(attempt("pay_new"))
    store.update("pay_new", give_checkout_id("ws_CO_new"))
    assert store.find("ws_CO_new").payment_id == "pay_new"
    store.close()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        key = [row[1] for row in db.execute("PRAGMA table_info(transactions)") if row[5]]
        assert key == ["payment_id"]
