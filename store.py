"""Transaction records and where they are kept: memory, SQLite or Redis, chosen by one URL.

    store = open_store("sqlite:///payments.db")
    store.create(Transaction("ws_CO_1", "29115-1", "254712345678", 100, initiated_at=time.time()))
    tx, changed = store.update("ws_CO_1", settle)   # load, settle(tx), save: atomically

Every backend offers the same small interface, `Store`: records keyed by Daraja's
CheckoutRequestID with an atomic read-modify-write (`update`), newest-first listing, and a
small key/value space with TTLs and an atomic set-if-absent (`add`) for idempotency keys,
query throttles and locks.

    URL                      keeps records                          shared by
    memory://                `retention` s after their last write   one process's threads
    sqlite:///relative.db    until deleted by hand (the ledger)     one machine's processes
    sqlite:////absolute.db
    redis://host:port/db     `retention` s after their last write   all who reach the server
      (?prefix=name: ; default "mpesa:")

Key/values expire after their own ttl in every backend (a ttl must be positive). Records
travel as JSON in every backend, so a stored record is never aliased by the caller's
object, and a value JSON cannot hold, or a status outside STATUSES, fails the same way
everywhere: with an exception, before anything is saved.
"""
from __future__ import annotations

import copy
import heapq
import json
import logging
import math
import os
import sqlite3
import threading
import time
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Iterator, NamedTuple, Protocol, TypeVar, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis

log = logging.getLogger(__name__)

R = TypeVar("R")
Clock = Callable[[], float]

STATUSES = ("pending", "completed", "failed")
DEFAULT_RETENTION = 86400.0


@dataclass
class Transaction:
    """One STK push and what became of it; snake_case here, camelCase only at the API edge."""

    checkout_request_id: str
    merchant_request_id: str
    phone: str                              # normalised 2547XXXXXXXX / 2541XXXXXXXX
    amount: int                             # whole KES
    account_reference: str = ""
    description: str = ""
    currency: str = "KES"
    status: str = "pending"                 # pending | completed | failed
    reason: str | None = None               # failed: cancelled|timeout|insufficient_funds|...
    result_code: int | str | None = None
    result_desc: str | None = None
    mpesa_receipt_number: str | None = None
    transaction_date: str | None = None     # ISO 8601
    callback: dict | None = None            # raw body of the first final callback
    initiated_at: float = 0.0               # epoch seconds
    completed_at: float | None = None
    settled_by: str | None = None           # callback | query | timeout
    flags: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)   # [{"at": epoch, "event": "...", ...}]
    extra: dict = field(default_factory=dict)           # room for later features

    @property
    def is_final(self) -> bool:
        """True once the payment is completed or failed."""
        return self.status != "pending"

    def to_dict(self) -> dict:
        """Return a JSON-safe deep copy of the record."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Transaction:
        """Build a record from to_dict() output; keys this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: copy.deepcopy(v) for k, v in data.items() if k in known})


class DuplicateTransaction(Exception):
    """A record with this CheckoutRequestID is already stored."""


@runtime_checkable
class Store(Protocol):
    """Where transactions and short-lived key/values live; see the module docstring."""

    kind: str   # "memory" | "sqlite" | "redis"

    def create(self, tx: Transaction) -> None:
        """Save a new record; raise DuplicateTransaction if its id is already stored."""

    def get(self, checkout_request_id: str) -> Transaction | None:
        """Return a copy of the record, or None."""

    def update(self, checkout_request_id: str,
               mutate: Callable[[Transaction], R]) -> tuple[Transaction | None, R | None]:
        """Atomically load, mutate(tx) in place, save; return (tx, mutate's result).

        Returns (None, None) when the id is unknown. No update is lost between threads or
        (SQLite, Redis) processes. mutate may run more than once, so it must only touch tx;
        if it raises, nothing is saved and the exception propagates.
        """

    def list(self, status: str | None = None, phone: str | None = None,
             limit: int = 20, offset: int = 0) -> tuple[list[Transaction], int]:
        """Return one page of records, newest initiated_at first, and how many match."""

    def pending_before(self, cutoff: float) -> list[Transaction]:
        """Return pending records initiated before cutoff, oldest first."""

    def add(self, key: str, value: dict, ttl: float) -> bool:
        """Store value under key for ttl seconds unless a live value is there; True if stored."""

    def get_value(self, key: str) -> dict | None:
        """Return the live value under key, or None."""

    def set_value(self, key: str, value: dict, ttl: float) -> None:
        """Store value under key for ttl seconds, replacing any value."""

    def delete(self, key: str) -> None:
        """Remove the value under key, if any."""

    def close(self) -> None:
        """Release connections."""


def open_store(url: str = "memory://", *, retention: float = DEFAULT_RETENTION,
               clock: Clock = time.time) -> Store:
    """Open the store a STORE_URL names: memory://, sqlite:///path.db or redis://host:port/db."""
    if not retention > 0:
        raise ValueError(f"retention must be a positive number of seconds, not {retention!r}")
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        return MemoryStore(retention=retention, clock=clock)
    if scheme == "sqlite":
        return SQLiteStore(_sqlite_path(url), clock=clock)
    if scheme in ("redis", "rediss"):
        return RedisStore.from_url(url, retention=retention, clock=clock)
    raise ValueError(f"STORE_URL: unsupported scheme '{scheme}' "
                     "(use memory://, sqlite:///path.db or redis://host:port/db)")


def _sqlite_path(url: str) -> str:
    prefix = "sqlite:///"
    path = url[len(prefix):] if url.lower().startswith(prefix) else ""
    if not path or path == ":memory:" or "?" in path:
        raise ValueError("STORE_URL: a SQLite store needs a file, as sqlite:///relative.db or "
                         "sqlite:////absolute.db (use memory:// for a store in memory)")
    return path


def _encode(tx: Transaction) -> str:
    if tx.status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {tx.status!r}")
    return json.dumps(tx.to_dict(), ensure_ascii=False, separators=(",", ":"))


def _decode(text: str | bytes) -> Transaction:
    return Transaction.from_dict(json.loads(text))


def _apply(tx: Transaction, mutate: Callable[[Transaction], R]) -> R:
    original = tx.checkout_request_id
    result = mutate(tx)
    if tx.checkout_request_id != original:
        raise ValueError("mutate must not change checkout_request_id")
    return result


def _check_ttl(ttl: float) -> None:
    if not ttl > 0:
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")


def _check_page(limit: int, offset: int) -> None:
    if limit < 0 or offset < 0:
        raise ValueError("limit and offset must not be negative")


class _Record(NamedTuple):
    expires_at: float
    status: str
    phone: str
    initiated_at: float
    data: str


class MemoryStore:
    """Records and values in this process's memory, behind one lock.

    Does not guarantee anything beyond one process: each gunicorn worker would have its
    own store (a callback landing on another worker is never seen) and a restart forgets
    everything. For development, tests and single-process demos.

    Records expire `retention` seconds after their last write, pending ones too. Expiry is
    lazy and costs O(1) amortised per operation: every write moves its record to the back of
    an OrderedDict, and with a constant retention the front is always the next to expire.
    Values carry their own ttl, so their expiry times sit in a heap. `list` and
    `pending_before` look at every live record, which suits the sizes a single process holds.
    """

    kind = "memory"

    def __init__(self, *, retention: float = DEFAULT_RETENTION, clock: Clock = time.time):
        self._retention = retention
        self._clock = clock
        # Reentrant so that a mutate which (against advice) reads the store does not hang.
        self._lock = threading.RLock()
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._values: dict[str, tuple[float, str]] = {}
        self._expiries: list[tuple[float, str]] = []   # heap; stale entries are skipped

    def create(self, tx: Transaction) -> None:
        data = _encode(tx)
        with self._lock:
            now = self._expire()
            if self._live(tx.checkout_request_id, now) is not None:
                raise DuplicateTransaction(tx.checkout_request_id)
            self._put(tx, data, now)

    def get(self, checkout_request_id: str) -> Transaction | None:
        with self._lock:
            record = self._live(checkout_request_id, self._expire())
        return _decode(record.data) if record else None

    def update(self, checkout_request_id: str,
               mutate: Callable[[Transaction], R]) -> tuple[Transaction | None, R | None]:
        with self._lock:
            now = self._expire()
            record = self._live(checkout_request_id, now)
            if record is None:
                return None, None
            tx = _decode(record.data)
            result = _apply(tx, mutate)
            self._put(tx, _encode(tx), now)
        return tx, result

    def list(self, status: str | None = None, phone: str | None = None,
             limit: int = 20, offset: int = 0) -> tuple[list[Transaction], int]:
        _check_page(limit, offset)
        with self._lock:
            now = self._expire()
            matches = [(r.initiated_at, key, r.data) for key, r in self._records.items()
                       if r.expires_at > now
                       and (status is None or r.status == status)
                       and (phone is None or r.phone == phone)]
        matches.sort(reverse=True)
        return [_decode(data) for _, _, data in matches[offset:offset + limit]], len(matches)

    def pending_before(self, cutoff: float) -> list[Transaction]:
        with self._lock:
            now = self._expire()
            matches = [(r.initiated_at, key, r.data) for key, r in self._records.items()
                       if r.expires_at > now and r.status == "pending" and r.initiated_at < cutoff]
        matches.sort()
        return [_decode(data) for _, _, data in matches]

    def add(self, key: str, value: dict, ttl: float) -> bool:
        _check_ttl(ttl)
        data = json.dumps(value)
        with self._lock:
            now = self._expire()
            current = self._values.get(key)
            if current is not None and current[0] > now:
                return False
            self._set(key, data, now + ttl)
            return True

    def get_value(self, key: str) -> dict | None:
        with self._lock:
            now = self._expire()
            current = self._values.get(key)
            if current is None or current[0] <= now:
                return None
            data = current[1]
        return json.loads(data)

    def set_value(self, key: str, value: dict, ttl: float) -> None:
        _check_ttl(ttl)
        data = json.dumps(value)
        with self._lock:
            self._set(key, data, self._expire() + ttl)

    def delete(self, key: str) -> None:
        with self._lock:
            self._expire()
            self._values.pop(key, None)

    def close(self) -> None:
        """Nothing to release: the data lives as long as the object."""

    def _expire(self) -> float:
        """Drop what has expired, looking only at entries that have; return the time."""
        now = self._clock()
        records = self._records
        while records:
            oldest = next(iter(records))
            if records[oldest].expires_at > now:
                break
            del records[oldest]
        heap = self._expiries
        while heap and heap[0][0] <= now:
            expires_at, key = heapq.heappop(heap)
            current = self._values.get(key)
            if current is not None and current[0] == expires_at:
                del self._values[key]
        return now

    def _live(self, checkout_request_id: str, now: float) -> _Record | None:
        record = self._records.get(checkout_request_id)
        if record is not None and record.expires_at <= now:
            # Only reachable if the clock stepped back and broke the front-first order.
            del self._records[checkout_request_id]
            return None
        return record

    def _put(self, tx: Transaction, data: str, now: float) -> None:
        key = tx.checkout_request_id
        self._records[key] = _Record(now + self._retention, tx.status, tx.phone,
                                     tx.initiated_at, data)
        self._records.move_to_end(key)

    def _set(self, key: str, data: str, expires_at: float) -> None:
        self._values[key] = (expires_at, data)
        heapq.heappush(self._expiries, (expires_at, key))
        # Overwrites and deletes leave stale heap entries behind; rebuilding once they
        # outnumber the live ones keeps the heap small at O(1) amortised cost.
        if len(self._expiries) > 2 * len(self._values) + 64:
            self._expiries = [(expires_at, key) for key, (expires_at, _) in self._values.items()]
            heapq.heapify(self._expiries)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS transactions (
    checkout_request_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    phone TEXT NOT NULL,
    initiated_at REAL NOT NULL,
    record TEXT NOT NULL            -- the whole Transaction as JSON
);
CREATE INDEX IF NOT EXISTS transactions_by_time
    ON transactions (initiated_at, checkout_request_id);
CREATE INDEX IF NOT EXISTS transactions_by_status
    ON transactions (status, initiated_at, checkout_request_id);
CREATE INDEX IF NOT EXISTS transactions_by_phone
    ON transactions (phone, initiated_at, checkout_request_id);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS kv_by_expiry ON kv (expires_at);
PRAGMA user_version = 1;
"""


class _Connection:
    """One thread's connection, tagged with the process that opened it."""

    __slots__ = ("db", "pid", "__weakref__")

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.pid = os.getpid()


class SQLiteStore:
    """The durable ledger: one SQLite file in WAL mode, shared by the processes of one machine.

    Records are kept until someone deletes them (the retention setting does not apply
    here); key/values expire after their ttl and are purged now and then. Each record is a
    JSON text column plus real status, phone and initiated_at columns, indexed for listing:
    `SELECT json_extract(record, '$.mpesa_receipt_number') FROM transactions` works.

    Several gunicorn workers may share the file: every thread of every process gets its own
    connection (reopened after a fork), writes that read first run under BEGIN IMMEDIATE,
    and busy_timeout makes writers queue rather than fail.

    Does not guarantee anything across machines: the file must sit on a local disk (WAL
    needs shared memory, so NFS and similar network file systems are out), and writes are
    serialised, which is plenty for payments but not for thousands of writes a second.
    """

    kind = "sqlite"

    def __init__(self, path: str, *, clock: Clock = time.time, busy_timeout: float = 10.0,
                 purge_interval: float = 60.0):
        self.path = path
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._purge_interval = purge_interval
        self._next_purge = 0.0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._open: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._inherited: list[_Connection] = []
        # The set-up connection is closed at once, so a parent that forks workers
        # (gunicorn --preload) holds no connection for them to inherit.
        try:
            db = self._connect()
        except sqlite3.Error as exc:
            raise ValueError(f"STORE_URL: cannot open SQLite database {path!r}: {exc}") from exc
        try:
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warning("SQLite store %s is in %s mode, not WAL: readers will wait for writers",
                            path, mode)
            db.executescript(_SCHEMA)
        finally:
            db.close()

    def create(self, tx: Transaction) -> None:
        data = _encode(tx)
        try:
            self._db().execute(
                "INSERT INTO transactions"
                " (checkout_request_id, status, phone, initiated_at, record)"
                " VALUES (?, ?, ?, ?, ?)",
                (tx.checkout_request_id, tx.status, tx.phone, tx.initiated_at, data))
        except sqlite3.IntegrityError as exc:
            if exc.sqlite_errorname == "SQLITE_CONSTRAINT_PRIMARYKEY":
                raise DuplicateTransaction(tx.checkout_request_id) from None
            raise

    def get(self, checkout_request_id: str) -> Transaction | None:
        row = self._db().execute("SELECT record FROM transactions WHERE checkout_request_id = ?",
                                 (checkout_request_id,)).fetchone()
        return _decode(row[0]) if row else None

    def update(self, checkout_request_id: str,
               mutate: Callable[[Transaction], R]) -> tuple[Transaction | None, R | None]:
        with self._write() as db:
            row = db.execute("SELECT record FROM transactions WHERE checkout_request_id = ?",
                             (checkout_request_id,)).fetchone()
            if row is None:
                return None, None
            tx = _decode(row[0])
            result = _apply(tx, mutate)
            db.execute("UPDATE transactions SET status = ?, phone = ?, initiated_at = ?, record = ?"
                       " WHERE checkout_request_id = ?",
                       (tx.status, tx.phone, tx.initiated_at, _encode(tx), checkout_request_id))
        return tx, result

    def list(self, status: str | None = None, phone: str | None = None,
             limit: int = 20, offset: int = 0) -> tuple[list[Transaction], int]:
        _check_page(limit, offset)
        conditions, params = [], []
        if status is not None:
            conditions.append("status = ?")
            params.append(status)
        if phone is not None:
            conditions.append("phone = ?")
            params.append(phone)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        with self._read() as db:   # one snapshot, so the page agrees with the total
            total = db.execute(f"SELECT count(*) FROM transactions {where}", params).fetchone()[0]
            rows = db.execute(f"SELECT record FROM transactions {where}"
                              " ORDER BY initiated_at DESC, checkout_request_id DESC"
                              " LIMIT ? OFFSET ?", [*params, limit, offset]).fetchall()
        return [_decode(data) for data, in rows], total

    def pending_before(self, cutoff: float) -> list[Transaction]:
        rows = self._db().execute(
            "SELECT record FROM transactions WHERE status = 'pending' AND initiated_at < ?"
            " ORDER BY initiated_at, checkout_request_id", (cutoff,)).fetchall()
        return [_decode(data) for data, in rows]

    def add(self, key: str, value: dict, ttl: float) -> bool:
        _check_ttl(ttl)
        now = self._clock()
        with self._write() as db:
            self._purge(db, now)
            added = db.execute(
                "INSERT INTO kv (key, value, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                " expires_at = excluded.expires_at WHERE kv.expires_at <= ?",
                (key, json.dumps(value), now + ttl, now)).rowcount
        return added == 1

    def get_value(self, key: str) -> dict | None:
        row = self._db().execute("SELECT value FROM kv WHERE key = ? AND expires_at > ?",
                                 (key, self._clock())).fetchone()
        return json.loads(row[0]) if row else None

    def set_value(self, key: str, value: dict, ttl: float) -> None:
        _check_ttl(ttl)
        now = self._clock()
        with self._write() as db:
            self._purge(db, now)
            db.execute("INSERT OR REPLACE INTO kv (key, value, expires_at) VALUES (?, ?, ?)",
                       (key, json.dumps(value), now + ttl))

    def delete(self, key: str) -> None:
        self._db().execute("DELETE FROM kv WHERE key = ?", (key,))

    def close(self) -> None:
        """Close this process's connections; a later call opens new ones."""
        pid = os.getpid()
        with self._lock:
            holders = [holder for holder in self._open if holder.pid == pid]
            self._open = weakref.WeakSet()
            self._local = threading.local()
        for holder in holders:
            holder.db.close()

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions, only the BEGINs written here.
        # check_same_thread=False only so that close() can reach every thread's connection.
        db = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None,
                             check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        db.execute("PRAGMA synchronous = FULL")   # a committed payment survives a power cut
        return db

    def _db(self) -> sqlite3.Connection:
        holder = getattr(self._local, "connection", None)
        if holder is not None and holder.pid != os.getpid():
            # Opened before a fork: SQLite forbids using it here, and closing it could
            # disturb the parent's locks, so it is kept aside, untouched.
            self._inherited.append(holder)
            holder = None
        if holder is None:
            holder = _Connection(self._connect())
            self._local.connection = holder
            with self._lock:
                self._open.add(holder)
        return holder.db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A transaction holding the write lock from its first statement."""
        with self._transaction("BEGIN IMMEDIATE") as db:
            yield db

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

    def _purge(self, db: sqlite3.Connection, now: float) -> None:
        """Delete expired key/values, at most once per purge_interval per store object."""
        if now >= self._next_purge:
            self._next_purge = now + self._purge_interval
            db.execute("DELETE FROM kv WHERE expires_at <= ?", (now,))


# Records initiated within the last (retention - slack) seconds are certainly alive, as
# long as the application's and Redis's clocks agree within the slack.
_CLOCK_SLACK = 60.0
_SWEEP_BATCH = 20


class RedisStore:
    """Records and values in Redis, shared by every worker, dyno and machine that reaches it.

    Keys (all under the prefix, "mpesa:" by default)::

        tx:<id>               the record as JSON, expiring `retention` s after its last write
        idx:all               sorted sets of ids scored by initiated_at, for newest-first
        idx:status:<status>   listing; a record and its index entries change in one MULTI
        idx:phone:<phone>
        kv:<key>              key/values, SET NX PX for add

    `update` is optimistic (WATCH/MULTI, retried when another writer got there first), so
    mutate may run more than once. Index entries whose record has expired are removed
    lazily: each create sweeps a few of the oldest, and listing removes those it meets.
    Every index set also expires `retention` s after its last write, so an idle store
    empties itself completely.

    Guarantees only what the Redis configuration does: without AOF persistence a restart
    loses records, and an eviction policy other than noeviction may drop records, indexes
    or idempotency keys early. Use a persistent, noeviction Redis for payments, and the
    SQLite store where a permanent ledger is needed.
    """

    kind = "redis"

    def __init__(self, client: redis.Redis, *, prefix: str = "mpesa:",
                 retention: float = DEFAULT_RETENTION, clock: Clock = time.time):
        self._redis = client
        self._prefix = prefix
        self._retention = retention
        self._retention_ms = _milliseconds(retention)
        self._clock = clock
        self._all = f"{prefix}idx:all"

    @classmethod
    def from_url(cls, url: str, *, retention: float = DEFAULT_RETENTION,
                 clock: Clock = time.time) -> RedisStore:
        """Connect (lazily, through one pool) to redis://host:port/db[?prefix=name:]."""
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefix = next((value for name, value in query if name == "prefix"), "mpesa:")
        rest = urlencode([(name, value) for name, value in query if name != "prefix"])
        # Timeouts given in the URL win over these defaults.
        client = redis.Redis.from_url(urlunsplit(parts._replace(query=rest)),
                                      decode_responses=True,
                                      socket_timeout=5, socket_connect_timeout=5)
        return cls(client, prefix=prefix, retention=retention, clock=clock)

    def create(self, tx: Transaction) -> None:
        key = self._tx_key(tx.checkout_request_id)
        data = _encode(tx)
        with self._redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    if pipe.exists(key):
                        raise DuplicateTransaction(tx.checkout_request_id)
                    pipe.multi()
                    pipe.set(key, data, px=self._retention_ms)
                    self._index(pipe, tx)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        try:
            self._sweep(tx.phone)
        except redis.RedisError as exc:   # housekeeping must not fail a saved payment
            log.warning("redis store: index sweep failed: %s", exc)

    def get(self, checkout_request_id: str) -> Transaction | None:
        data = self._redis.get(self._tx_key(checkout_request_id))
        return _decode(data) if data is not None else None

    def update(self, checkout_request_id: str,
               mutate: Callable[[Transaction], R]) -> tuple[Transaction | None, R | None]:
        key = self._tx_key(checkout_request_id)
        with self._redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    data = pipe.get(key)
                    if data is None:
                        return None, None
                    tx = _decode(data)
                    before = (tx.status, tx.phone)
                    result = _apply(tx, mutate)
                    encoded = _encode(tx)
                    pipe.multi()
                    pipe.set(key, encoded, px=self._retention_ms)
                    self._index(pipe, tx, before)
                    pipe.execute()
                    return tx, result
                except redis.WatchError:
                    continue

    def list(self, status: str | None = None, phone: str | None = None,
             limit: int = 20, offset: int = 0) -> tuple[list[Transaction], int]:
        _check_page(limit, offset)
        if phone is not None and status is not None:
            # One phone's records are few: read them all and filter by status here.
            ids = self._redis.zrevrange(self._phone_key(phone), 0, -1)
            matches = [tx for tx in self._load(ids, phone) if tx.status == status]
            return matches[offset:offset + limit], len(matches)
        if phone is not None:
            index = self._phone_key(phone)
        elif status is not None:
            index = self._status_key(status)
        else:
            index = self._all
        self._forget_expired(self._redis.zrangebyscore(index, "-inf", self._maybe_expired()),
                             phone)
        if not limit:
            return [], self._redis.zcard(index)
        with self._redis.pipeline() as pipe:   # MULTI: the page agrees with the total
            pipe.zcard(index)
            pipe.zrevrange(index, offset, offset + limit - 1)
            total, ids = pipe.execute()
        return self._load(ids, phone), total

    def pending_before(self, cutoff: float) -> list[Transaction]:
        return self._load(self._redis.zrangebyscore(
            self._status_key("pending"), "-inf", f"({cutoff!r}"))

    def add(self, key: str, value: dict, ttl: float) -> bool:
        _check_ttl(ttl)
        return bool(self._redis.set(self._kv_key(key), json.dumps(value),
                                    nx=True, px=_milliseconds(ttl)))

    def get_value(self, key: str) -> dict | None:
        data = self._redis.get(self._kv_key(key))
        return json.loads(data) if data is not None else None

    def set_value(self, key: str, value: dict, ttl: float) -> None:
        _check_ttl(ttl)
        self._redis.set(self._kv_key(key), json.dumps(value), px=_milliseconds(ttl))

    def delete(self, key: str) -> None:
        self._redis.delete(self._kv_key(key))

    def close(self) -> None:
        self._redis.close()

    def _tx_key(self, checkout_request_id: str) -> str:
        return f"{self._prefix}tx:{checkout_request_id}"

    def _status_key(self, status: str) -> str:
        return f"{self._prefix}idx:status:{status}"

    def _phone_key(self, phone: str) -> str:
        return f"{self._prefix}idx:phone:{phone}"

    def _kv_key(self, key: str) -> str:
        return f"{self._prefix}kv:{key}"

    def _index(self, pipe, tx: Transaction, before: tuple[str, str] | None = None) -> None:
        """Queue the index writes for tx (moving it out of its old status and phone sets)."""
        member = tx.checkout_request_id
        if before is not None:
            old_status, old_phone = before
            if old_status != tx.status:
                pipe.zrem(self._status_key(old_status), member)
            if old_phone != tx.phone:
                pipe.zrem(self._phone_key(old_phone), member)
        # Each set outlives every record it holds: it is refreshed by each of their writes.
        for index in (self._all, self._status_key(tx.status), self._phone_key(tx.phone)):
            pipe.zadd(index, {member: tx.initiated_at})
            pipe.pexpire(index, self._retention_ms)

    def _maybe_expired(self) -> float:
        """The initiated_at at or before which a record may have expired."""
        return self._clock() - self._retention + _CLOCK_SLACK

    def _sweep(self, phone: str) -> None:
        """Forget a few of the oldest expired ids, so indexes stay bounded without listing."""
        cutoff = self._maybe_expired()
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(self._all, "-inf", cutoff, start=0, num=_SWEEP_BATCH)
            pipe.zrangebyscore(self._phone_key(phone), "-inf", cutoff, start=0, num=_SWEEP_BATCH)
            oldest, oldest_for_phone = pipe.execute()
        self._forget_expired(list(dict.fromkeys(oldest + oldest_for_phone)), phone)

    def _forget_expired(self, ids: list[str], phone: str | None = None) -> None:
        """Remove from the indexes those of ids whose record no longer exists."""
        if not ids:
            return
        with self._redis.pipeline(transaction=False) as pipe:
            for member in ids:
                pipe.exists(self._tx_key(member))
            alive = pipe.execute()
        self._unindex([member for member, exists in zip(ids, alive) if not exists], phone)

    def _unindex(self, ids: list[str], phone: str | None = None) -> None:
        if not ids:
            return
        # The phone of an expired record is gone with it; phone sets left holding such ids
        # are cleaned when that phone is listed or swept, or expire with their last record.
        indexes = [self._all, *(self._status_key(s) for s in STATUSES)]
        if phone is not None:
            indexes.append(self._phone_key(phone))
        with self._redis.pipeline(transaction=False) as pipe:
            for index in indexes:
                pipe.zrem(index, *ids)
            pipe.execute()

    def _load(self, ids: list[str], phone: str | None = None) -> list[Transaction]:
        """Fetch records in the order of ids, dropping (and unindexing) expired ones."""
        if not ids:
            return []
        found = self._redis.mget([self._tx_key(member) for member in ids])
        self._unindex([member for member, data in zip(ids, found) if data is None], phone)
        return [_decode(data) for data in found if data is not None]


def _milliseconds(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))
