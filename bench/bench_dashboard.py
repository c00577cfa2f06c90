"""The dashboard's reads over 100,000 payments on each store: overview() and search().

    python -m bench.bench_dashboard [--quick]     (or through bench/run.py)

100,000 records (10,000 with --quick) spread over the last 30 days, with the mix a shop
sees (mostly completed, some cancelled, a few timeouts and errors), go into a memory, a
SQLite, (when a redis-server can be started) a Redis and (when a PostgreSQL answers on
127.0.0.1:5432 as user postgres) a PostgreSQL store, in a database made for the run and
dropped after it. Then the overview of each
dashboard window and a set of searches are timed, in this process, without HTTP: what the
store costs a page view. Memory and Redis run with a 40-day retention so that the 30-day
window holds every record.

Loading: memory and Redis through create(); the SQLite file is written as a ledger from
before the dashboard (one bulk transaction) and opened with open_store(), which adds the
search columns and counts the counters once: that one-time upgrade is timed too. PostgreSQL
gets the rows and counters its create() would write, by COPY, then VACUUM ANALYZE (what
autovacuum does to a table that grew by itself): one create() at a time would take minutes. The
cost of one create() on the loaded store, counters included, is measured separately.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import sqlite3
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from functools import partial
from urllib.parse import urlsplit, urlunsplit

import psycopg

from bench.harness import Context, fmt, median, start_redis, table
from store import TALLY_UTC_OFFSET, Transaction, open_store
from store.dashboard import tallied, tally_rows
from store.postgres import RECORD_COLUMNS, record_row

DAY = 86400
RETENTION = 40 * DAY
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REPEATS = 7
OUTCOMES = (  # (weight, status, reason, settled_by)
    (70, "completed", None, "callback"),
    (4, "completed", None, "query"),
    (12, "failed", "cancelled", "callback"),
    (4, "failed", "insufficient_funds", "callback"),
    (3, "failed", "wrong_pin", "callback"),
    (3, "failed", "timeout", "timeout"),
    (2, "failed", "error", "query"),
    (2, "pending", None, None),
)
GOAL_MS = 50


def make_records(count: int, now: float, seed: int = 7) -> list[Transaction]:
    rng = random.Random(seed)
    weights = [weight for weight, *_ in OUTCOMES]
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"
    records = []
    for n in range(count):
        _, status, reason, settled_by = rng.choices(OUTCOMES, weights)[0]
        at = now - rng.random() * 30 * DAY
        after = rng.uniform(3, 40) if settled_by != "timeout" else 120.0
        final = status != "pending"
        history = [
            {"at": at, "event": "initiated", "amount": 100},
            {"at": at, "event": "push_accepted", "merchantRequestId": f"m-{n}"},
        ]
        if final:
            history += [
                {"at": at + after, "event": f"{settled_by}_received" if settled_by != "timeout" else "timed_out"},
                {"at": at + after, "event": status},
            ]
        records.append(
            Transaction(
                f"pay_{n:024x}",
                f"2547{rng.randrange(10**8):08d}",
                rng.choice((50, 100, 250, 500, 1000, 1500)),
                checkout_request_id=f"ws_CO_bench{n:07d}",
                merchant_request_id=f"m-{n}",
                account_reference=f"ORDER-{n}",
                status=status,
                reason=reason,
                settled_by=settled_by,
                initiated_at=at,
                completed_at=at + after if final else None,
                history=history,
                mpesa_receipt_number=(
                    "Q" + "".join(rng.choice(letters) for _ in range(9)) if status == "completed" else None
                ),
            )
        )
    return records


def windows(now: float) -> list[tuple[str, float, float, int]]:
    """The dashboard's four windows, as admin.window_bounds draws them."""
    out = []
    for name, length, step in (
        ("hour", 3600, 300),
        ("24 hours", DAY, 3600),
        ("7 days", 7 * DAY, DAY),
        ("30 days", 30 * DAY, DAY),
    ):
        until = ((now + TALLY_UTC_OFFSET) // step + 1) * step - TALLY_UTC_OFFSET
        out.append((name, until - length, until, step))
    return out


def searches(records: list[Transaction], now: float) -> list[tuple[str, dict]]:
    paid = [tx for tx in records if tx.mpesa_receipt_number]
    return [
        ("newest 25, no filter", {}),
        ("failed, cancelled, last 7 days", {"status": "failed", "reason": "cancelled", "since": now - 7 * DAY}),
        ("completed, one day", {"status": "completed", "since": now - 3 * DAY, "until": now - 2 * DAY}),
        ("by receipt", {"text": paid[len(paid) // 2].mpesa_receipt_number.lower()}),
        ("by phone, last 4 digits", {"text": records[777].phone[-4:]}),
        ("by whole phone", {"text": records[778].phone}),
        ("by account reference", {"text": records[4242 % len(records)].account_reference}),
        ("page 200 of everything", {"offset": 199 * 25}),
    ]


def timed(call, repeats: int = REPEATS) -> tuple[float, object]:
    """Median milliseconds of `repeats` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        result = call()
        times.append((time.perf_counter() - began) * 1000)
    return median(times), result


def load_memory(records):
    store = open_store("memory://", retention=RETENTION)
    for tx in records:
        store.create(tx)
    return store, "create(), one by one"


def _create_all(url: str, records: list[Transaction]) -> None:
    store = open_store(url, retention=RETENTION)
    try:
        for tx in records:
            store.create(tx)
    finally:
        store.close()


def load_redis(url: str):
    def load(records):
        # redis-py spends its time packing commands under the GIL: processes, not threads.
        workers = max(1, min(4, os.cpu_count() or 1))
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_create_all, [url] * workers, [records[n::workers] for n in range(workers)]))
        return open_store(url, retention=RETENTION), f"create() from {workers} processes"

    return load


def load_sqlite(path):
    def load(records):
        db = sqlite3.connect(path)
        db.executescript("""
            CREATE TABLE transactions (checkout_request_id TEXT PRIMARY KEY, status TEXT NOT NULL,
                phone TEXT NOT NULL, initiated_at REAL NOT NULL, record TEXT NOT NULL);
            CREATE INDEX transactions_by_time ON transactions (initiated_at, checkout_request_id);
            CREATE INDEX transactions_by_status ON transactions (status, initiated_at, checkout_request_id);
            CREATE INDEX transactions_by_phone ON transactions (phone, initiated_at, checkout_request_id);
        """)
        with db:
            db.executemany(
                "INSERT INTO transactions VALUES (?, ?, ?, ?, ?)",
                [
                    (
                        tx.payment_id,
                        tx.status,
                        tx.phone,
                        tx.initiated_at,
                        json.dumps(tx.to_dict(), separators=(",", ":")),
                    )
                    for tx in records
                ],
            )
        db.close()
        began = time.perf_counter()
        store = open_store(f"sqlite:///{path}")
        upgrade = time.perf_counter() - began
        return store, f"bulk insert, then open_store() upgrades it in {upgrade:.1f} s"

    return load


@contextmanager
def postgres_database() -> Iterator[tuple[str | None, str]]:
    """A database made for this run on the PostgreSQL at 127.0.0.1:5432, dropped after it:
    (url, "") or (None, why not)."""
    name = f"bench_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f"CREATE DATABASE {name}")
    except psycopg.Error as error:
        yield None, f"no PostgreSQL answers at 127.0.0.1:5432 as user postgres ({str(error).strip()[:200]})"
        return
    try:
        yield urlunsplit(urlsplit(POSTGRES_ADMIN_URL)._replace(path=f"/{name}")), ""
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def load_postgres(url: str):
    def load(records):
        store = open_store(url)  # makes the schema
        counters: dict[tuple[int, int, str], int] = {}
        for tx in records:
            for step, index, name, value in tally_rows(None, tallied(tx)):
                counters[(step, index, name)] = counters.get((step, index, name), 0) + value
        with psycopg.connect(url, autocommit=True) as db:
            with db.transaction(), db.cursor() as cursor:
                with cursor.copy(f"COPY transactions ({RECORD_COLUMNS}) FROM STDIN") as copy:
                    for tx in records:
                        copy.write_row(record_row(tx))
                with cursor.copy("COPY tallies (step, bucket, name, value) FROM STDIN") as copy:
                    for key, value in counters.items():
                        copy.write_row((*key, value))
            db.execute("VACUUM ANALYZE")
        return store, "COPY of its rows and counters, then VACUUM ANALYZE"

    return load


def measure(name: str, load, records, now: float, extra: int, ctx: Context) -> dict:
    ctx.log(f"dashboard: loading {len(records):,} records into {name}")
    began = time.perf_counter()
    store, how = load(records)
    loaded = time.perf_counter() - began
    result = {"store": name, "how": how, "rate": len(records) / loaded, "overview": {}, "search": {}}
    try:
        for label, since, until, step in windows(now):
            ms, found = timed(partial(store.overview, since, until, step))
            result["overview"][label] = (ms, found.total.started)
        for label, query in searches(records, now):
            query = {"limit": 25, **query}
            ms, (page, total) = timed(partial(store.search, **query))
            result["search"][label] = (ms, total)
        fresh = make_records(extra, now, seed=99)
        for n, tx in enumerate(fresh):
            tx.payment_id, tx.checkout_request_id = f"pay_extra{n:019x}", f"ws_CO_extra{n:07d}"
        began = time.perf_counter()
        for tx in fresh:
            store.create(tx)
        result["create_ms"] = (time.perf_counter() - began) * 1000 / len(fresh)
    finally:
        store.close()
    return result


def run(ctx: Context) -> str:
    count = 10_000 if ctx.quick else 100_000
    extra = 200 if ctx.quick else 1000
    now = time.time()
    records = make_records(count, now)
    stores = [("memory", load_memory), ("SQLite", load_sqlite(ctx.scratch("dashboard") / "ledger.db"))]
    redis_url, redis_how = start_redis(ctx)
    if redis_url:
        stores.append(("Redis", load_redis(redis_url)))
    else:
        ctx.log(f"!!! REDIS DASHBOARD BENCH NOT RUN: {redis_how} !!!")
    with postgres_database() as (postgres_url, postgres_how):
        if postgres_url:
            stores.append(("PostgreSQL", load_postgres(postgres_url)))
        else:
            ctx.log(f"!!! POSTGRESQL DASHBOARD BENCH NOT RUN: {postgres_how} !!!")
        results = [measure(name, load, records, now, extra, ctx) for name, load in stores]

    window_names = [name for name, *_ in windows(now)]
    overview_rows = [
        [
            r["store"],
            *(fmt(r["overview"][w][0], 2) for w in window_names),
            fmt(r["create_ms"], 2),
            fmt(r["rate"]),
            r["how"],
        ]
        for r in results
    ]
    search_names = [label for label, _ in searches(records, now)]
    search_rows = [
        [label, fmt(results[0]["search"][label][1]), *(fmt(r["search"][label][0], 2) for r in results)]
        for label in search_names
    ]
    counted = results[0]["overview"]["30 days"][1]
    worst = max(max(ms for ms, _ in r["overview"].values()) for r in results)
    worst_search = max(max(ms for ms, _ in r["search"].values()) for r in results)
    ctx.summary.append(
        [
            "dashboard",
            f"overview and search under {GOAL_MS} ms at {count:,} records",
            f"overview ≤ {worst:.1f} ms, search ≤ {worst_search:.1f} ms",
            "yes" if max(worst, worst_search) < GOAL_MS else "no",
        ]
    )
    parts = [
        "## dashboard",
        "",
        f"What one dashboard page costs the store, with {count:,} payments over 30 days "
        f"(median of {REPEATS} calls, in this process, no HTTP). The overview adds up "
        "per-time-bucket counters kept by every write, so its cost follows the number of "
        "buckets (12, 24, 7 and 30), not the number of payments; searches use SQLite's and "
        "PostgreSQL's indexes and Redis's sorted sets, while the memory store looks at every "
        "record it holds."
        + ("" if redis_url else f" **Redis not measured:** {redis_how}.")
        + ("" if postgres_url else f" **PostgreSQL not measured:** {postgres_how}."),
        "",
        f"Every store counted {counted:,} payments in the 30-day window.",
        "",
        table(
            [
                "store",
                *(f"overview, {w} (ms)" for w in window_names),
                "one create() (ms)",
                "loading (records/s)",
                "loaded by",
            ],
            overview_rows,
        ),
        "",
        table(["search (first 25)", "matches", *(f"{r['store']} (ms)" for r in results)], search_rows),
        "",
        "One create() includes its counters (and, in SQLite and PostgreSQL, a synchronous commit "
        "to disk); "
        "the other benchmarks measure the payment path as a whole.",
    ]
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 records instead of 100,000")
    args = parser.parse_args()
    with Context(quick=args.quick) as ctx:
        print(run(ctx))
        for row in ctx.summary:
            print(f"\n{' | '.join(row)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
