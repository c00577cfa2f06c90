"""The SQLite backend: the durable ledger, one file in WAL mode shared by one machine's processes.

Does not guarantee anything across machines: the file must sit on a local disk (WAL needs
shared memory, so no NFS), and writes are serialised, which is plenty for payments but not
for thousands of writes a second.

One module past the usual size: the schema, its upgrades and the queries that use them change
together, and the writer queue's reasoning holds for all of them.
"""

from __future__ import annotations

import builtins
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from store.dashboard import Overview, Search, assemble, overview_plan, tallied, tally_rows
from store.record import (
    ORDER_KEY_PREFIX,
    Allowance,
    Clock,
    DuplicateTransaction,
    Page,
    R,
    Transaction,
    apply,
    check_allowance,
    check_hold,
    check_page,
    check_ttl,
    decode,
    encode,
    stock_key,
)

log = logging.getLogger(__name__)

# A ledger made before payment ids (user_version 1) has checkout_request_id where payment_id
# is: _upgrade_sqlite renames that column before anything else reads it.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS transactions (
    payment_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    phone TEXT NOT NULL,
    initiated_at REAL NOT NULL,
    record TEXT NOT NULL            -- the whole Transaction as JSON
);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS kv_by_expiry ON kv (expires_at);
CREATE TABLE IF NOT EXISTS counters (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS stock_holds (
    owner TEXT NOT NULL,            -- the payment holding the units
    item TEXT NOT NULL,
    units INTEGER NOT NULL,         -- counted in counters' stock:<item> while held
    PRIMARY KEY (owner, item)
) WITHOUT ROWID;
"""
_USER_VERSION = 2  # 1: keyed by checkout_request_id; 2: by payment_id


# Searched fields, computed by SQLite from the JSON record (virtual: nothing is stored twice,
# and a ledger made before them gets them, indexed, by ALTER TABLE when it is opened).
_SEARCH_COLUMNS = (
    ("checkout_request_id", "json_extract(record, '$.checkout_request_id')"),
    ("order_id", "json_extract(record, '$.order_id')"),
    ("reason", "json_extract(record, '$.reason')"),
    ("receipt_key", "upper(coalesce(json_extract(record, '$.mpesa_receipt_number'), ''))"),
    ("reference_key", "lower(coalesce(json_extract(record, '$.account_reference'), ''))"),
    # The phone reversed, so that its last digits are a prefix an index can find.
    ("phone_reversed", " || ".join(f"substr(phone, -{n}, 1)" for n in range(1, 16))),
)
_SEARCH_INDEXES = (
    "CREATE INDEX IF NOT EXISTS transactions_by_time ON transactions (initiated_at, payment_id)",
    "CREATE INDEX IF NOT EXISTS transactions_by_status ON transactions (status, initiated_at, payment_id)",
    "CREATE INDEX IF NOT EXISTS transactions_by_phone ON transactions (phone, initiated_at, payment_id)",
    # Unique: a CheckoutRequestID belongs to one record (NULLs, pushes not yet answered, are many).
    "CREATE UNIQUE INDEX IF NOT EXISTS transactions_by_checkout ON transactions (checkout_request_id)",
    "CREATE INDEX IF NOT EXISTS transactions_by_order ON transactions (order_id)",
    "CREATE INDEX IF NOT EXISTS transactions_by_reason ON transactions (reason, status, initiated_at, payment_id)",
    "CREATE INDEX IF NOT EXISTS transactions_by_receipt ON transactions (receipt_key)",
    "CREATE INDEX IF NOT EXISTS transactions_by_reference ON transactions (reference_key)",
    "CREATE INDEX IF NOT EXISTS transactions_by_phone_end ON transactions (phone_reversed)",
)
_TALLIES = """CREATE TABLE tallies (
    step INTEGER NOT NULL,      -- seconds per bucket: one of TALLY_STEPS
    bucket INTEGER NOT NULL,    -- (initiated_at + TALLY_UTC_OFFSET) // step
    name TEXT NOT NULL,         -- a counter of tally()
    value INTEGER NOT NULL,
    PRIMARY KEY (step, bucket, name)
) WITHOUT ROWID"""
_COUNT = (
    "INSERT INTO tallies (step, bucket, name, value) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (step, bucket, name) DO UPDATE SET value = value + excluded.value"
)


def _upgrade_sqlite(db: sqlite3.Connection) -> None:
    """Bring a ledger to _USER_VERSION: each step once, all in one transaction.

    Keyed by payment id: the key column of a ledger keyed by CheckoutRequestID is renamed
    (its records, read back, take their CheckoutRequestID as payment id, so every key stays
    valid), and checkout_request_id comes back as a column computed from the record, so
    `find` finds old and new records alike. Search columns and counters (counted from the
    records) are added where missing.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_xinfo(transactions)")}
        if "payment_id" not in columns:
            db.execute("ALTER TABLE transactions RENAME COLUMN checkout_request_id TO payment_id")
            columns = {row[1] for row in db.execute("PRAGMA table_xinfo(transactions)")}
        for name, expression in _SEARCH_COLUMNS:
            if name not in columns:
                db.execute(f"ALTER TABLE transactions ADD COLUMN {name} GENERATED ALWAYS AS ({expression}) VIRTUAL")
        for statement in _SEARCH_INDEXES:
            db.execute(statement)
        if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'tallies'").fetchone() is None:
            db.execute(_TALLIES)
            totals: dict[tuple[int, int, str], int] = {}
            for (data,) in db.execute("SELECT record FROM transactions"):
                for step, index, name, value in tally_rows(None, tallied(decode(data))):
                    totals[(step, index, name)] = totals.get((step, index, name), 0) + value
            db.executemany(_COUNT, [(*key, value) for key, value in totals.items()])
        db.execute(f"PRAGMA user_version = {_USER_VERSION}")
        db.commit()
    except BaseException:
        if db.in_transaction:
            db.rollback()
        raise


@contextmanager
def _duplicates_refused(tx: Transaction) -> Iterator[None]:
    """Turn a write refused for a payment id or CheckoutRequestID already stored into DuplicateTransaction."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        if exc.sqlite_errorname in ("SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"):
            raise DuplicateTransaction(tx.payment_id) from None
        raise


class _Connection:
    """One thread's connection and its handle on the writers' lock file, tagged with the
    process that opened them."""

    __slots__ = ("db", "writer_lock", "pid", "_close_writer_lock", "__weakref__")

    def __init__(self, db: sqlite3.Connection, writer_lock: int):
        self.db = db
        self.writer_lock = writer_lock
        self.pid = os.getpid()
        # A thread that ends drops its holder unclosed: the connection then closes itself,
        # a bare file descriptor would not. Not at exit, though (finalize's default): the
        # process closes its descriptors as it ends, and until then a daemon thread may
        # still be writing (a webhook attempt that the exit waits for).
        self._close_writer_lock = weakref.finalize(self, os.close, writer_lock)
        self._close_writer_lock.atexit = False

    def close(self) -> None:
        self.db.close()
        self._close_writer_lock()


class SQLiteStore:
    """The durable ledger: one SQLite file in WAL mode, shared by the processes of one machine.

    Records are kept until someone deletes them (the retention setting does not apply
    here); key/values expire after their ttl and are purged now and then. Each record is a
    JSON text column plus real status, phone and initiated_at columns, indexed for listing:
    `SELECT json_extract(record, '$.mpesa_receipt_number') FROM transactions` works.
    Generated columns (reason, receipt_key, reference_key, phone_reversed) are indexed for
    `search`, and every write adjusts the per-bucket counters in `tallies` for `overview`,
    in the same transaction.

    Several worker processes may share the file: every thread of every process gets its own
    connection (reopened after a fork), and writes run under BEGIN IMMEDIATE. Writers first
    queue for an flock on `<path>-lock`, so that the kernel hands the write lock on: left to
    SQLite's busy handler, waiting writers sleep and retry, up to 100 ms at a time, and
    under load most get in at once while a few wait for seconds. The queue has no timeout;
    busy_timeout still bounds the wait for writers that do not queue (the sqlite3 shell).

    Does not guarantee anything across machines: the file must sit on a local disk (WAL
    needs shared memory, so NFS and similar network file systems are out), and writes are
    serialised, which is plenty for payments but not for thousands of writes a second.
    """

    kind = "sqlite"

    def __init__(
        self, path: str, *, clock: Clock = time.time, busy_timeout: float = 10.0, purge_interval: float = 60.0
    ):
        self.path = path
        self._lock_path = f"{path}-lock"
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._purge_interval = purge_interval
        self._next_purge = 0.0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._open: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._inherited: list[_Connection] = []
        # The set-up connection is closed at once, so a parent that forks workers
        # (a server that builds the app before forking) holds no connection for them to inherit.
        try:
            db = self._connect()
            writer_lock = self._open_writer_lock()
        except (sqlite3.Error, OSError) as exc:
            raise ValueError(f"STORE_URL: cannot open SQLite database {path!r}: {exc}") from exc
        try:
            # In the writers' queue, so that processes opening an older ledger at once
            # upgrade it one after the other (the second finds nothing left to do).
            fcntl.flock(writer_lock, fcntl.LOCK_EX)
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warning("SQLite store %s is in %s mode, not WAL: readers will wait for writers", path, mode)
            db.executescript(_SCHEMA)
            _upgrade_sqlite(db)
        finally:
            db.close()
            os.close(writer_lock)  # closing the descriptor releases its flock

    def create(self, tx: Transaction) -> None:
        data = encode(tx)
        with _duplicates_refused(tx), self._write() as db:
            db.execute(
                "INSERT INTO transactions (payment_id, status, phone, initiated_at, record) VALUES (?, ?, ?, ?, ?)",
                (tx.payment_id, tx.status, tx.phone, tx.initiated_at, data),
            )
            db.executemany(_COUNT, tally_rows(None, tallied(tx)))

    def get(self, payment_id: str) -> Transaction | None:
        row = self._db().execute("SELECT record FROM transactions WHERE payment_id = ?", (payment_id,)).fetchone()
        return decode(row[0]) if row else None

    def find(self, checkout_request_id: str) -> Transaction | None:
        row = (
            self._db()
            .execute("SELECT record FROM transactions WHERE checkout_request_id = ?", (checkout_request_id,))
            .fetchone()
        )
        return decode(row[0]) if row else None

    def get_with_order(
        self, payment_id: str | None = None, *, checkout_request_id: str | None = None
    ) -> tuple[Transaction | None, dict | None]:
        by, identifier = (
            ("payment_id", payment_id) if payment_id is not None else ("checkout_request_id", checkout_request_id)
        )
        row = (
            self._db()
            .execute(
                "SELECT t.record, kv.value FROM transactions AS t"
                " LEFT JOIN kv ON kv.key = ? || t.order_id AND kv.expires_at > ?"
                f" WHERE t.{by} = ?",
                (ORDER_KEY_PREFIX, self._clock(), identifier),
            )
            .fetchone()
        )
        if row is None:
            return None, None
        return decode(row[0]), json.loads(row[1]) if row[1] is not None else None

    def update(self, payment_id: str, mutate: Callable[[Transaction], R]) -> tuple[Transaction | None, R | None]:
        with self._write() as db:
            row = db.execute("SELECT record FROM transactions WHERE payment_id = ?", (payment_id,)).fetchone()
            if row is None:
                return None, None
            tx = decode(row[0])
            before = tallied(tx)
            result = apply(tx, mutate)
            with _duplicates_refused(tx):
                db.execute(
                    "UPDATE transactions SET status = ?, phone = ?, initiated_at = ?, record = ? WHERE payment_id = ?",
                    (tx.status, tx.phone, tx.initiated_at, encode(tx), payment_id),
                )
            db.executemany(_COUNT, tally_rows(before, tallied(tx)))
        return tx, result

    def list(self, status: str | None = None, phone: str | None = None, limit: int = 20, offset: int = 0) -> Page:
        check_page(limit, offset)
        conditions, params = [], []
        if status is not None:
            conditions.append("status = ?")
            params.append(status)
        if phone is not None:
            conditions.append("phone = ?")
            params.append(phone)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        with self._read() as db:  # one snapshot, so the page agrees with the total
            total = db.execute(f"SELECT count(*) FROM transactions {where}", params).fetchone()[0]
            rows = db.execute(
                f"SELECT record FROM transactions {where} ORDER BY initiated_at DESC, payment_id DESC LIMIT ? OFFSET ?",
                [*params, limit, offset],
            ).fetchall()
        return [decode(data) for (data,) in rows], total

    def search(
        self,
        text: str | None = None,
        *,
        status: str | None = None,
        reason: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> Page:
        check_page(limit, offset)
        criteria = Search.of(text, status, reason, since, until)
        if criteria.impossible:
            return [], 0
        conditions: list[str] = []
        params: list[str | float] = []
        if criteria.reason is not None:  # implies failed; and then its index is the one to use
            conditions.append("reason = ? AND status = 'failed'")
            params.append(criteria.reason)
        elif criteria.status is not None:
            conditions.append("status = ?")
            params.append(criteria.status)
        if criteria.since is not None:
            conditions.append("initiated_at >= ?")
            params.append(criteria.since)
        if criteria.until is not None:
            conditions.append("initiated_at < ?")
            params.append(criteria.until)
        if criteria.text is not None:
            either = ["payment_id = ?", "checkout_request_id = ?", "order_id = ?"]
            either += ["receipt_key = ?", "reference_key = ?"]
            params += [criteria.text, criteria.text, criteria.text, criteria.receipt, criteria.reference]
            if criteria.digits is not None:
                either.append("(phone_reversed >= ? AND phone_reversed < ?)")
                params += [criteria.digits[::-1], criteria.digits[::-1] + ":"]  # ":" follows "9"
            conditions.append(f"({' OR '.join(either)})")
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        with self._read() as db:  # one snapshot, so the page agrees with the total
            total = db.execute(f"SELECT count(*) FROM transactions {where}", params).fetchone()[0]
            rows = db.execute(
                f"SELECT record FROM transactions {where} ORDER BY initiated_at DESC, payment_id DESC LIMIT ? OFFSET ?",
                [*params, limit, offset],
            ).fetchall()
        return [decode(data) for (data,) in rows], total

    def overview(self, since: float, until: float, step: float) -> Overview:
        resolution, plan = overview_plan(since, until, step)
        rows = (
            self._db()
            .execute(
                "SELECT bucket, name, value FROM tallies WHERE step = ? AND bucket BETWEEN ? AND ?",
                (resolution, plan[0][1][0], plan[-1][1][-1]),
            )
            .fetchall()
        )
        found: dict[int, dict[str, int]] = {}
        for bucket, name, value in rows:
            found.setdefault(bucket, {})[name] = value
        return assemble(since, until, step, plan, found)

    def pending_before(self, cutoff: float) -> builtins.list[Transaction]:
        rows = (
            self._db()
            .execute(
                "SELECT record FROM transactions WHERE status = 'pending' AND initiated_at < ?"
                " ORDER BY initiated_at, payment_id",
                (cutoff,),
            )
            .fetchall()
        )
        return [decode(data) for (data,) in rows]

    def add(self, key: str, value: dict, ttl: float) -> bool:
        check_ttl(ttl)
        now = self._clock()
        with self._write() as db:
            self._purge(db, now)
            added = db.execute(
                "INSERT INTO kv (key, value, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                " expires_at = excluded.expires_at WHERE kv.expires_at <= ?",
                (key, json.dumps(value), now + ttl, now),
            ).rowcount
        return added == 1

    def get_value(self, key: str) -> dict | None:
        row = (
            self._db().execute("SELECT value FROM kv WHERE key = ? AND expires_at > ?", (key, self._clock())).fetchone()
        )
        return json.loads(row[0]) if row else None

    def set_value(self, key: str, value: dict, ttl: float) -> None:
        check_ttl(ttl)
        now = self._clock()
        with self._write() as db:
            self._purge(db, now)
            db.execute(
                "INSERT OR REPLACE INTO kv (key, value, expires_at) VALUES (?, ?, ?)",
                (key, json.dumps(value), now + ttl),
            )

    def delete(self, key: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM kv WHERE key = ?", (key,))

    def take_allowance(self, key: str, cost: int, limit: int, window: float) -> Allowance:
        check_allowance(cost, limit, window)
        key = f"allowance:{key}"
        now = self._clock()
        with self._write() as db:
            self._purge(db, now)
            row = db.execute("SELECT value, expires_at FROM kv WHERE key = ? AND expires_at > ?", (key, now)).fetchone()
            used, ends = (json.loads(row[0]), row[1]) if row else (0, now + window)
            taken = used + cost <= limit
            if taken and cost:
                used += cost
                db.execute(
                    "INSERT INTO kv (key, value, expires_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
                    (key, json.dumps(used), ends),
                )
        return Allowance(taken, limit - used, ends)

    def adjust_counter(self, key: str, delta: int, maximum: int | None = None) -> int | None:
        with self._write() as db:
            row = db.execute("SELECT value FROM counters WHERE key = ?", (key,)).fetchone()
            value = (row[0] if row else 0) + delta
            if value < 0 or (maximum is not None and value > maximum):
                return None
            db.execute(
                "INSERT INTO counters (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
        return value

    def get_counter(self, key: str) -> int:
        row = self._db().execute("SELECT value FROM counters WHERE key = ?", (key,)).fetchone()
        return row[0] if row else 0

    def hold_stock(self, owner: str, units: dict[str, int], capacity: dict[str, int]) -> str | None:
        check_hold(owner, units, capacity)
        if not units:
            return None
        with self._write() as db:
            if db.execute("SELECT 1 FROM stock_holds WHERE owner = ? LIMIT 1", (owner,)).fetchone():
                raise ValueError(f"{owner} already holds stock")
            for item, count in units.items():
                row = db.execute("SELECT value FROM counters WHERE key = ?", (stock_key(item),)).fetchone()
                if (row[0] if row else 0) + count > capacity[item]:
                    return item
            db.executemany(
                "INSERT INTO counters (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
                [(stock_key(item), count) for item, count in units.items()],
            )
            db.executemany(
                "INSERT INTO stock_holds (owner, item, units) VALUES (?, ?, ?)",
                [(owner, item, count) for item, count in units.items()],
            )
        return None

    def release_stock(self, owner: str) -> dict[str, int]:
        with self._write() as db:
            held = self._end_hold(db, owner)
            db.executemany(
                "UPDATE counters SET value = max(0, value - ?) WHERE key = ?",
                [(count, stock_key(item)) for item, count in held.items()],
            )
        return held

    def keep_stock(self, owner: str) -> dict[str, int]:
        with self._write() as db:
            return self._end_hold(db, owner)

    def stock_holders(self) -> builtins.list[str]:
        rows = self._db().execute("SELECT DISTINCT owner FROM stock_holds ORDER BY owner").fetchall()
        return [owner for (owner,) in rows]

    def close(self) -> None:
        """Close this process's connections; a later call opens new ones."""
        pid = os.getpid()
        with self._lock:
            holders = [holder for holder in self._open if holder.pid == pid]
            self._open = weakref.WeakSet()
            self._local = threading.local()
        for holder in holders:
            holder.close()

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions, only the BEGINs written here.
        # check_same_thread=False only so that close() can reach every thread's connection.
        db = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        db.execute("PRAGMA synchronous = FULL")  # a committed payment survives a power cut
        return db

    def _open_writer_lock(self) -> int:
        return os.open(self._lock_path, os.O_RDONLY | os.O_CREAT, 0o666)

    def _db(self) -> sqlite3.Connection:
        return self._holder().db

    def _holder(self) -> _Connection:
        holder = getattr(self._local, "connection", None)
        if holder is not None and holder.pid != os.getpid():
            # Opened before a fork: SQLite forbids using it here, and closing it could
            # disturb the parent's locks, so it is kept aside, untouched.
            self._inherited.append(holder)
            holder = None
        if holder is None:
            db = self._connect()
            try:
                holder = _Connection(db, self._open_writer_lock())
            except BaseException:
                db.close()
                raise
            self._local.connection = holder
            with self._lock:
                self._open.add(holder)
        return holder

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A transaction holding the write lock from its first statement, after its turn in
        the writers' queue."""
        holder = self._holder()
        fcntl.flock(holder.writer_lock, fcntl.LOCK_EX)
        try:
            with self._transaction("BEGIN IMMEDIATE") as db:
                yield db
        finally:
            fcntl.flock(holder.writer_lock, fcntl.LOCK_UN)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._transaction("BEGIN") as db:
            yield db

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute(begin)
        try:
            yield db
            db.commit()
        except BaseException:
            if db.in_transaction:
                db.rollback()
            raise

    @staticmethod
    def _end_hold(db: sqlite3.Connection, owner: str) -> dict[str, int]:
        """Forget owner's hold inside a write transaction and return its units."""
        held = dict(db.execute("SELECT item, units FROM stock_holds WHERE owner = ? ORDER BY item", (owner,)))
        db.execute("DELETE FROM stock_holds WHERE owner = ?", (owner,))
        return held

    def _purge(self, db: sqlite3.Connection, now: float) -> None:
        """Delete expired key/values, at most once per purge_interval per store object."""
        if now >= self._next_purge:
            self._next_purge = now + self._purge_interval
            db.execute("DELETE FROM kv WHERE expires_at <= ?", (now,))
