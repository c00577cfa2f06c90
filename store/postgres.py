"""The PostgreSQL backend: the durable ledger in a database server, shared by every worker and dyno.

Guarantees what the database does: a committed write survives a crash of the server process
and, with the server's default `fsync` and `synchronous_commit`, of its machine. Does not
guarantee more connections than the server allows: each process keeps a pool of up to
`pool_max` connections (docs/storage.md gives the arithmetic against a plan's limit).

One module past the usual size, as SQLite's: the schema, its migrations and the queries that
use them change together.
"""

from __future__ import annotations

import builtins
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg_pool import ConnectionPool

from store.dashboard import Overview, Search, assemble, overview_plan, receipt_key, reference_key, tallied, tally_rows
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

DEFAULT_POOL_MAX = 4  # connections per process, at most; ?pool_max= on the URL changes it
CONNECT_TIMEOUT = 10  # seconds; ?connect_timeout= on the URL changes it
POOL_TIMEOUT = 30.0  # seconds a request waits for a free connection before it fails
# Held, for the migrating transaction only, by whichever process migrates: the others wait,
# then find nothing left to do. Any number, as long as nothing else in the database uses it.
_MIGRATION_LOCK = 0x6D70_6573_6173_7470  # "mpesastp"

# Each migration is a list of statements, run once, in order, in the transaction that records
# its number in schema_version. Keys compare as bytes (COLLATE "C"), as in the other stores
# and in Python: listing breaks ties by payment id, stock_holders sorts owners, the phone's
# reversed digits are searched as a range, and writers lock counters in sorted order.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE transactions (
            payment_id text COLLATE "C" PRIMARY KEY,
            checkout_request_id text COLLATE "C" UNIQUE,  -- Daraja's: set once; NULL until then
            order_id text COLLATE "C",
            status text NOT NULL,
            reason text,
            phone text COLLATE "C" NOT NULL,
            phone_reversed text COLLATE "C" NOT NULL,     -- its last digits are a prefix
            receipt_key text NOT NULL,                    -- dashboard.receipt_key(): "" when none
            reference_key text NOT NULL,                  -- dashboard.reference_key()
            initiated_at double precision NOT NULL,
            record text NOT NULL                          -- the whole Transaction as JSON
        )""",
        "CREATE INDEX transactions_by_time ON transactions (initiated_at, payment_id)",
        "CREATE INDEX transactions_by_status ON transactions (status, initiated_at, payment_id)",
        "CREATE INDEX transactions_by_phone ON transactions (phone, initiated_at, payment_id)",
        "CREATE INDEX transactions_by_order ON transactions (order_id)",
        "CREATE INDEX transactions_by_reason ON transactions (reason, status, initiated_at, payment_id)",
        "CREATE INDEX transactions_by_receipt ON transactions (receipt_key)",
        "CREATE INDEX transactions_by_reference ON transactions (reference_key)",
        "CREATE INDEX transactions_by_phone_end ON transactions (phone_reversed)",
        """CREATE TABLE tallies (
            step integer NOT NULL,     -- seconds per bucket: one of TALLY_STEPS
            bucket bigint NOT NULL,    -- (initiated_at + TALLY_UTC_OFFSET) // step
            name text NOT NULL,        -- a counter of tally()
            value bigint NOT NULL,
            PRIMARY KEY (step, bucket, name)
        )""",
        """CREATE TABLE kv (
            key text COLLATE "C" PRIMARY KEY,
            value text NOT NULL,               -- JSON
            expires_at double precision NOT NULL
        )""",
        "CREATE INDEX kv_by_expiry ON kv (expires_at)",
        """CREATE TABLE counters (
            key text COLLATE "C" PRIMARY KEY,  -- stock:<item>: units held or sold
            value bigint NOT NULL
        )""",
        """CREATE TABLE stock_holds (
            owner text COLLATE "C" NOT NULL,  -- the payment holding the units
            item text COLLATE "C" NOT NULL,
            units integer NOT NULL,           -- counted in counters' stock:<item> while held
            PRIMARY KEY (owner, item)
        )""",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

# The columns a record is written to, and their values (record_row): also what a bulk load
# with COPY writes (bench/bench_dashboard.py).
RECORD_COLUMNS = (
    "payment_id, checkout_request_id, order_id, status, reason, phone, phone_reversed,"
    " receipt_key, reference_key, initiated_at, record"
)
_RECORD_VALUES = ", ".join("%s" for _ in RECORD_COLUMNS.split(","))
_COUNT = (
    "INSERT INTO tallies AS t (step, bucket, name, value) VALUES (%s, %s, %s, %s)"
    " ON CONFLICT (step, bucket, name) DO UPDATE SET value = t.value + excluded.value"
)
_NEWEST_FIRST = "ORDER BY initiated_at DESC, payment_id DESC"


def check_postgres_url(url: str) -> int:
    """Return the pool size a postgresql:// or postgres:// URL asks for; raise ValueError naming STORE_URL."""
    query = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    text = next((value for name, value in query if name == "pool_max"), None)
    if text is None:
        return DEFAULT_POOL_MAX
    if not (text.isascii() and text.isdigit() and int(text) >= 1):
        raise ValueError(f"STORE_URL: pool_max must be a whole number of connections, 1 or more (got {text!r})")
    return int(text)


def _conninfo(url: str) -> str:
    """The URL as libpq reads it: without pool_max, with a connect timeout unless it names one."""
    parts = urlsplit(url)
    query = [(name, value) for name, value in parse_qsl(parts.query, keep_blank_values=True) if name != "pool_max"]
    if not any(name == "connect_timeout" for name, _ in query):
        query.append(("connect_timeout", str(CONNECT_TIMEOUT)))
    return urlunsplit(parts._replace(query=urlencode(query)))


def _where_to(url: str) -> str:
    """Host and database of a URL, for messages: never its password."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'the local socket'}{parts.path or ''}"


def _migrate(conn: psycopg.Connection) -> None:
    """Bring the database to SCHEMA_VERSION, under the migration lock, in one transaction."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version"
            " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
        current = row[0] if row else 0
        if current > SCHEMA_VERSION:
            raise ValueError(
                f"STORE_URL: the database is at schema version {current}, made by a newer version of "
                f"this server (this one knows up to {SCHEMA_VERSION})"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))


def record_row(tx: Transaction) -> tuple:
    """The values of RECORD_COLUMNS for tx (encode() refuses a bad record first)."""
    data = encode(tx)
    return (
        tx.payment_id,
        tx.checkout_request_id,
        tx.order_id,
        tx.status,
        tx.reason,
        tx.phone,
        tx.phone[::-1],
        receipt_key(tx),
        reference_key(tx),
        tx.initiated_at,
        data,
    )


@contextmanager
def _duplicates_refused(tx: Transaction) -> Iterator[None]:
    """Turn a write refused for a payment id or CheckoutRequestID already stored into DuplicateTransaction."""
    try:
        yield
    except psycopg.errors.UniqueViolation:
        raise DuplicateTransaction(tx.payment_id) from None


class PostgresStore:
    """The durable ledger in PostgreSQL, shared by every process that reaches the database.

    Records are kept until someone deletes them (the retention setting does not apply
    here); key/values expire after their ttl and are purged now and then. Each record is a
    JSON text column plus the columns it is listed and searched by, written with it and
    indexed: `SELECT record::jsonb ->> 'mpesa_receipt_number' FROM transactions` works.
    Every write adjusts the per-bucket counters in `tallies` for `overview`, in the same
    transaction.

    Each process has its own pool of up to `pool_max` connections, opened at its first call
    (a parent that forks workers leaves them none to inherit); its threads share it. Every
    write is one transaction: `update` locks the record's row (SELECT ... FOR UPDATE), so
    mutate runs once; counters and holds change in single statements or under row locks
    taken in one order (sorted keys), so that two writers never wait for each other in a
    circle. The schema is created or migrated when a store is opened, under an advisory lock.
    """

    kind = "postgres"

    def __init__(
        self,
        url: str,
        *,
        clock: Clock = time.time,
        pool_max: int = DEFAULT_POOL_MAX,
        purge_interval: float = 60.0,
    ):
        self._conninfo = _conninfo(url)
        self._clock = clock
        self._pool_max = pool_max
        self._purge_interval = purge_interval
        self._next_purge = 0.0
        self._lock = threading.Lock()
        self._pool: ConnectionPool | None = None
        self._pool_pid = 0
        self._inherited: list[ConnectionPool] = []
        try:
            with psycopg.connect(self._conninfo, autocommit=True) as conn:
                _migrate(conn)
        except psycopg.Error as exc:
            raise ValueError(f"STORE_URL: cannot open PostgreSQL database {_where_to(url)}: {exc}") from exc

    @classmethod
    def from_url(cls, url: str, *, clock: Clock = time.time) -> PostgresStore:
        """Open postgresql://user:password@host:port/db[?pool_max=N&libpq options]."""
        return cls(url, clock=clock, pool_max=check_postgres_url(url))

    def create(self, tx: Transaction) -> None:
        row = record_row(tx)
        with _duplicates_refused(tx), self._transaction() as conn:
            conn.execute(f"INSERT INTO transactions ({RECORD_COLUMNS}) VALUES ({_RECORD_VALUES})", row)
            self._count(conn, tally_rows(None, tallied(tx)))

    def get(self, payment_id: str) -> Transaction | None:
        row = self._one("SELECT record FROM transactions WHERE payment_id = %s", (payment_id,))
        return decode(row[0]) if row else None

    def find(self, checkout_request_id: str) -> Transaction | None:
        row = self._one("SELECT record FROM transactions WHERE checkout_request_id = %s", (checkout_request_id,))
        return decode(row[0]) if row else None

    def get_with_order(
        self, payment_id: str | None = None, *, checkout_request_id: str | None = None
    ) -> tuple[Transaction | None, dict | None]:
        by, identifier = (
            ("payment_id", payment_id) if payment_id is not None else ("checkout_request_id", checkout_request_id)
        )
        row = self._one(
            "SELECT t.record, kv.value FROM transactions AS t"
            " LEFT JOIN kv ON kv.key = %s || t.order_id AND kv.expires_at > %s"
            f" WHERE t.{by} = %s",
            (ORDER_KEY_PREFIX, self._clock(), identifier),
        )
        if row is None:
            return None, None
        return decode(row[0]), json.loads(row[1]) if row[1] is not None else None

    def update(self, payment_id: str, mutate: Callable[[Transaction], R]) -> tuple[Transaction | None, R | None]:
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT record FROM transactions WHERE payment_id = %s FOR UPDATE", (payment_id,)
            ).fetchone()
            if row is None:
                return None, None
            tx = decode(row[0])
            before = tallied(tx)
            result = apply(tx, mutate)
            values = record_row(tx)
            with _duplicates_refused(tx):
                conn.execute(
                    f"UPDATE transactions SET ({RECORD_COLUMNS}) = ({_RECORD_VALUES}) WHERE payment_id = %s",
                    (*values, payment_id),
                )
            self._count(conn, tally_rows(before, tallied(tx)))
        return tx, result

    def list(self, status: str | None = None, phone: str | None = None, limit: int = 20, offset: int = 0) -> Page:
        check_page(limit, offset)
        conditions: builtins.list[str] = []
        params: dict[str, object] = {}
        if status is not None:
            conditions.append("status = %(status)s")
            params["status"] = status
        if phone is not None:
            conditions.append("phone = %(phone)s")
            params["phone"] = phone
        return self._page(conditions, params, limit, offset)

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
        params: dict[str, object] = {}
        if criteria.reason is not None:  # implies failed; and then its index is the one to use
            conditions.append("reason = %(reason)s AND status = 'failed'")
            params["reason"] = criteria.reason
        elif criteria.status is not None:
            conditions.append("status = %(status)s")
            params["status"] = criteria.status
        if criteria.since is not None:
            conditions.append("initiated_at >= %(since)s")
            params["since"] = criteria.since
        if criteria.until is not None:
            conditions.append("initiated_at < %(until)s")
            params["until"] = criteria.until
        if criteria.text is not None:
            either = ["payment_id = %(text)s", "checkout_request_id = %(text)s", "order_id = %(text)s"]
            either += ["receipt_key = %(receipt)s", "reference_key = %(reference)s"]
            params.update(text=criteria.text, receipt=criteria.receipt, reference=criteria.reference)
            if criteria.digits is not None:
                either.append("(phone_reversed >= %(low)s AND phone_reversed < %(high)s)")
                params.update(low=criteria.digits[::-1], high=criteria.digits[::-1] + ":")  # ":" follows "9"
            conditions.append(f"({' OR '.join(either)})")
        return self._page(conditions, params, limit, offset)

    def overview(self, since: float, until: float, step: float) -> Overview:
        resolution, plan = overview_plan(since, until, step)
        rows = self._all(
            "SELECT bucket, name, value FROM tallies WHERE step = %s AND bucket BETWEEN %s AND %s",
            (resolution, plan[0][1][0], plan[-1][1][-1]),
        )
        found: dict[int, dict[str, int]] = {}
        for bucket, name, value in rows:
            found.setdefault(bucket, {})[name] = value
        return assemble(since, until, step, plan, found)

    def pending_before(self, cutoff: float) -> builtins.list[Transaction]:
        rows = self._all(
            "SELECT record FROM transactions WHERE status = 'pending' AND initiated_at < %s"
            " ORDER BY initiated_at, payment_id",
            (cutoff,),
        )
        return [decode(data) for (data,) in rows]

    def add(self, key: str, value: dict, ttl: float) -> bool:
        check_ttl(ttl)
        now = self._clock()
        with self._pool_now().connection() as conn:
            self._purge(conn, now)
            added = conn.execute(
                "INSERT INTO kv AS kv (key, value, expires_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at"
                " WHERE kv.expires_at <= %s",
                (key, json.dumps(value), now + ttl, now),
            ).rowcount
        return added == 1

    def get_value(self, key: str) -> dict | None:
        row = self._one("SELECT value FROM kv WHERE key = %s AND expires_at > %s", (key, self._clock()))
        return json.loads(row[0]) if row else None

    def set_value(self, key: str, value: dict, ttl: float) -> None:
        check_ttl(ttl)
        now = self._clock()
        with self._pool_now().connection() as conn:
            self._purge(conn, now)
            conn.execute(
                "INSERT INTO kv (key, value, expires_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
                (key, json.dumps(value), now + ttl),
            )

    def delete(self, key: str) -> None:
        with self._pool_now().connection() as conn:
            conn.execute("DELETE FROM kv WHERE key = %s", (key,))

    def take_allowance(self, key: str, cost: int, limit: int, window: float) -> Allowance:
        check_allowance(cost, limit, window)
        key = f"allowance:{key}"
        now = self._clock()
        with self._transaction() as conn:
            # Upserted so that it is locked and read in one statement (a new one as an ended window).
            value, expires_at = conn.execute(
                "INSERT INTO kv AS kv (key, value, expires_at) VALUES (%s, '0', 0)"
                " ON CONFLICT (key) DO UPDATE SET value = kv.value RETURNING value, expires_at",
                (key,),
            ).fetchone() or ("0", 0)
            used, ends = (json.loads(value), expires_at) if expires_at > now else (0, now + window)
            taken = used + cost <= limit
            if taken and cost:
                used += cost
                conn.execute("UPDATE kv SET value = %s, expires_at = %s WHERE key = %s", (json.dumps(used), ends, key))
        return Allowance(taken, limit - used, ends)

    def adjust_counter(self, key: str, delta: int, maximum: int | None = None) -> int | None:
        with self._pool_now().connection() as conn:
            # A missing counter counts as 0, so a row at 0 changes nothing; with the row there,
            # one UPDATE checks and changes it (a racing UPDATE rechecks against the new value).
            conn.execute("INSERT INTO counters (key, value) VALUES (%s, 0) ON CONFLICT (key) DO NOTHING", (key,))
            row = conn.execute(
                "UPDATE counters SET value = value + %(delta)s WHERE key = %(key)s"
                " AND value + %(delta)s >= 0 AND (%(maximum)s::bigint IS NULL OR value + %(delta)s <= %(maximum)s)"
                " RETURNING value",
                {"key": key, "delta": int(delta), "maximum": None if maximum is None else int(maximum)},
            ).fetchone()
        return row[0] if row else None

    def get_counter(self, key: str) -> int:
        row = self._one("SELECT value FROM counters WHERE key = %s", (key,))
        return row[0] if row else 0

    def hold_stock(self, owner: str, units: dict[str, int], capacity: dict[str, int]) -> str | None:
        check_hold(owner, units, capacity)
        if not units:
            return None
        keys = sorted(stock_key(item) for item in units)
        with self._pool_now().connection() as conn:
            # Rows at 0 for counters never set, so that each can be locked below.
            conn.execute(
                "INSERT INTO counters (key, value) SELECT unnest(%s::text[]), 0 ON CONFLICT (key) DO NOTHING", (keys,)
            )
            try:
                with conn.transaction():
                    if conn.execute("SELECT 1 FROM stock_holds WHERE owner = %s LIMIT 1", (owner,)).fetchone():
                        raise ValueError(f"{owner} already holds stock")
                    held: dict[str, int] = dict(
                        conn.execute(
                            "SELECT key, value FROM counters WHERE key = ANY(%s) ORDER BY key FOR UPDATE", (keys,)
                        ).fetchall()
                    )
                    for item, count in units.items():
                        if held[stock_key(item)] + count > capacity[item]:
                            return item
                    raised = sorted((stock_key(item), count) for item, count in units.items())
                    conn.cursor().executemany(
                        "UPDATE counters SET value = value + %s WHERE key = %s", [(n, key) for key, n in raised]
                    )
                    conn.cursor().executemany(
                        "INSERT INTO stock_holds (owner, item, units) VALUES (%s, %s, %s)",
                        [(owner, item, count) for item, count in units.items()],
                    )
            except psycopg.errors.UniqueViolation:  # the same owner, holding at the same moment
                raise ValueError(f"{owner} already holds stock") from None
        return None

    def release_stock(self, owner: str) -> dict[str, int]:
        with self._transaction() as conn:
            held = self._end_hold(conn, owner)
            lowered = sorted((stock_key(item), count) for item, count in held.items())
            conn.cursor().executemany(
                "UPDATE counters SET value = greatest(0, value - %s) WHERE key = %s", [(n, key) for key, n in lowered]
            )
        return held

    def keep_stock(self, owner: str) -> dict[str, int]:
        with self._transaction() as conn:
            return self._end_hold(conn, owner)

    def stock_holders(self) -> builtins.list[str]:
        return [owner for (owner,) in self._all("SELECT DISTINCT owner FROM stock_holds ORDER BY owner")]

    def close(self) -> None:
        """Close this process's connections; a later call opens new ones."""
        with self._lock:
            pool, self._pool = (self._pool, None) if self._pool_pid == os.getpid() else (None, self._pool)
        if pool is not None:
            pool.close()

    def _pool_now(self) -> ConnectionPool:
        """This process's pool, opened at its first call."""
        with self._lock:
            if self._pool is not None and self._pool_pid != os.getpid():
                # Opened before a fork: its connections are the parent's, and closing them here
                # would end the parent's sessions, so it is kept aside, untouched.
                self._inherited.append(self._pool)
                self._pool = None
            if self._pool is None:
                self._pool = ConnectionPool(
                    self._conninfo,
                    kwargs={"autocommit": True},
                    min_size=1,
                    max_size=self._pool_max,
                    timeout=POOL_TIMEOUT,
                    # A connection the server dropped (a restart, a failover) is replaced
                    # before a request gets it, instead of failing that request.
                    check=ConnectionPool.check_connection,
                    open=True,
                )
                self._pool_pid = os.getpid()
            return self._pool

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection]:
        """One transaction on a pooled connection: committed at the end, rolled back on an exception."""
        with self._pool_now().connection() as conn, conn.transaction():
            yield conn

    def _one(self, query: str, params: tuple | dict) -> tuple | None:
        with self._pool_now().connection() as conn:
            return conn.execute(query, params).fetchone()

    def _all(self, query: str, params: tuple = ()) -> builtins.list[tuple]:
        with self._pool_now().connection() as conn:
            return conn.execute(query, params).fetchall()

    def _page(self, conditions: builtins.list[str], params: dict, limit: int, offset: int) -> Page:
        """One page of the records matching every condition, newest first, and how many match.

        One statement, so one snapshot: the page agrees with the total.
        """
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        # The page's keys first, from an index that holds them (every listing index ends with
        # initiated_at, payment_id), then only those records: an offset skips keys, not records.
        row = self._one(
            f"SELECT (SELECT count(*) FROM transactions {where}),"
            " ARRAY(SELECT t.record FROM"
            f" (SELECT payment_id, initiated_at FROM transactions {where} {_NEWEST_FIRST}"
            "  LIMIT %(limit)s OFFSET %(offset)s) AS page"
            f" JOIN transactions AS t USING (payment_id) ORDER BY page.initiated_at DESC, page.payment_id DESC)",
            {**params, "limit": limit, "offset": offset},
        )
        assert row is not None  # an aggregate always answers one row
        total, records = row
        return [decode(data) for data in records], total

    @staticmethod
    def _count(conn: psycopg.Connection, rows: builtins.list[tuple[int, int, str, int]]) -> None:
        """Adjust the counters, in their keys' order: writers lock shared rows in one order."""
        if rows:
            conn.cursor().executemany(_COUNT, sorted(rows))

    @staticmethod
    def _end_hold(conn: psycopg.Connection, owner: str) -> dict[str, int]:
        """Forget owner's hold inside a transaction and return its units (the DELETE decides who)."""
        rows = conn.execute("DELETE FROM stock_holds WHERE owner = %s RETURNING item, units", (owner,)).fetchall()
        return dict(sorted(rows))

    def _purge(self, conn: psycopg.Connection, now: float) -> None:
        """Delete expired key/values, at most once per purge_interval per store object."""
        if now >= self._next_purge:
            self._next_purge = now + self._purge_interval
            conn.execute("DELETE FROM kv WHERE expires_at <= %s", (now,))
