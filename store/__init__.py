"""Transaction records and where they are kept: memory, SQLite, Redis or PostgreSQL, chosen by one URL.

    store = open_store("sqlite:///payments.db")
    store.create(Transaction("pay_3f9c…", "254712345678", 100, initiated_at=time.time()))
    tx, changed = store.update("pay_3f9c…", settle)   # load, settle(tx), save: atomically
    tx = store.find("ws_CO_1")                         # by Daraja's CheckoutRequestID

The interface. Every backend offers the same small `Store`: records keyed by the server's
own payment id, found as well by Daraja's CheckoutRequestID (set once, when Daraja gives
it), read with its order's paid marker in one go for a status poll (`get_with_order`), with
an atomic read-modify-write (`update`), newest-first listing, and a
small key/value space with TTLs and an atomic set-if-absent (`add`) for idempotency keys,
query throttles and locks, plus durable counters (`adjust_counter`) and stock holds per
payment (`hold_stock`, then `release_stock` or `keep_stock`, exactly once) for stock.

For the operator's dashboard, `search` finds records by what an operator has in hand (a
payment, checkout or order id, a receipt, a reference, a phone's last digits) with filters,
and `overview` adds up counters that every write keeps per time bucket (5 minutes, hours,
Nairobi days): neither reads every record. SQLite and PostgreSQL index the searched fields;
Redis keeps a sorted set per searched value.

    URL                      keeps records                          shared by
    memory://                `retention` s after their last write   one process's threads
    sqlite:///relative.db    until deleted by hand (the ledger)     one machine's processes
    sqlite:////absolute.db
    redis://host:port/db     `retention` s after their last write   all who reach the server
      (?prefix=name: ; default "mpesa:")
    postgresql://u:p@host/db until deleted by hand (the ledger)     all who reach the database
    postgres://u:p@host/db     (?pool_max=N connections per process, default 4; libpq's
                               parameters pass through; schema made and migrated at open)

Key/values expire after their own ttl in every backend (a ttl must be positive). Records
travel as JSON in every backend, so a stored record is never aliased by the caller's
object, and a value JSON cannot hold, or a status outside STATUSES, fails the same way
everywhere: with an exception, before anything is saved.

Which to choose. memory:// for development, tests and one-process demos; sqlite:// for one
machine, several workers included, and wherever a permanent ledger is wanted; postgresql://
for a permanent ledger that several machines or dynos share (Heroku Postgres); redis:// when
they share payments kept for `retention`.

What each does not guarantee:
- memory: anything beyond one process; each worker has its own store, a restart forgets all.
- SQLite: anything across machines; the file must be on a local disk (no NFS), and writes
  are serialised (plenty for payments, not for thousands a second).
- Redis: more than its configuration does; without AOF a restart loses records, and an
  eviction policy other than noeviction may drop records, indexes or idempotency keys.
- PostgreSQL: more than the database server keeps, or more connections than it allows
  (every process opens up to pool_max).

The modules: `record` (Transaction, the Store protocol, the JSON codec), `dashboard`
(counters per time bucket and search criteria, shared by the backends), then one module per
backend: `memory`, `sqlite`, `redis`, `postgres`.
"""

from __future__ import annotations

import os
import time
from urllib.parse import urlsplit

from store.dashboard import (
    DURATION_BOUNDS,
    MAX_OVERVIEW_BUCKETS,
    PHONE_SUFFIX_MIN,
    TALLY_STEPS,
    TALLY_UTC_OFFSET,
    Overview,
    Tally,
    duration_bound,
    tally,
)
from store.memory import MemoryStore
from store.postgres import PostgresStore, check_postgres_url
from store.record import (
    DEFAULT_RETENTION,
    STATUSES,
    Allowance,
    Clock,
    DuplicateTransaction,
    Store,
    Transaction,
    order_key,
)
from store.redis import RedisStore
from store.sqlite import SQLiteStore

POSTGRES_SCHEMES = ("postgresql", "postgres")  # postgres:// is the form Heroku's DATABASE_URL uses

__all__ = [
    "DEFAULT_RETENTION",
    "DURATION_BOUNDS",
    "MAX_OVERVIEW_BUCKETS",
    "PHONE_SUFFIX_MIN",
    "POSTGRES_SCHEMES",
    "STATUSES",
    "TALLY_STEPS",
    "TALLY_UTC_OFFSET",
    "Allowance",
    "Clock",
    "DuplicateTransaction",
    "MemoryStore",
    "Overview",
    "PostgresStore",
    "RedisStore",
    "SQLiteStore",
    "Store",
    "Tally",
    "Transaction",
    "duration_bound",
    "open_store",
    "order_key",
    "tally",
]


def open_store(url: str = "memory://", *, retention: float = DEFAULT_RETENTION, clock: Clock = time.time) -> Store:
    """Open the store a STORE_URL names: memory://, sqlite:///path.db, redis://host:port/db or postgresql://…"""
    if not retention > 0:
        raise ValueError(f"retention must be a positive number of seconds, not {retention!r}")
    scheme = check_url(url)
    if scheme == "memory":
        return MemoryStore(retention=retention, clock=clock)
    if scheme == "sqlite":
        return SQLiteStore(_sqlite_path(url), clock=clock)
    if scheme in POSTGRES_SCHEMES:
        return PostgresStore.from_url(url, clock=clock)
    return RedisStore.from_url(url, retention=retention, clock=clock)


def check_url(url: str) -> str:
    """Return the STORE_URL's scheme; raise ValueError naming STORE_URL if no store could open it."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("memory", "sqlite", "redis", "rediss", *POSTGRES_SCHEMES):
        raise ValueError(
            f"STORE_URL: unsupported scheme '{scheme}' (use memory://, sqlite:///path.db, "
            "redis://host:port/db or postgresql://user:password@host:port/db)"
        )
    if scheme == "sqlite":
        _sqlite_path(url)
    if scheme in POSTGRES_SCHEMES:
        check_postgres_url(url)
    return scheme


def _sqlite_path(url: str) -> str:
    prefix = "sqlite:///"
    path = url[len(prefix) :] if url.lower().startswith(prefix) else ""
    if not path or path == ":memory:" or "?" in path:
        raise ValueError(
            "STORE_URL: a SQLite store needs a file, as sqlite:///relative.db or "
            "sqlite:////absolute.db (use memory:// for a store in memory)"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"STORE_URL: the folder {folder} for the SQLite file does not exist")
    return path
