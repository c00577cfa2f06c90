"""Transaction records and where they are kept: memory, SQLite or Redis, chosen by one URL.

    store = open_store("sqlite:///payments.db")
    store.create(Transaction("ws_CO_1", "29115-1", "254712345678", 100, initiated_at=time.time()))
    tx, changed = store.update("ws_CO_1", settle)   # load, settle(tx), save: atomically

Every backend offers the same small interface, `Store`: records keyed by Daraja's
CheckoutRequestID with an atomic read-modify-write (`update`), newest-first listing, and a
small key/value space with TTLs and an atomic set-if-absent (`add`) for idempotency keys,
query throttles and locks.

For the operator's dashboard, `search` finds records by what an operator has in hand (an id,
a receipt, a reference, a phone's last digits) with filters, and `overview` adds up counters
that every write keeps per time bucket (5 minutes, hours, Nairobi days): neither reads every
record. SQLite indexes the searched fields; Redis keeps a sorted set per searched value.

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

import bisect
import copy
import fcntl
import heapq
import json
import logging
import math
import os
import sqlite3
import string
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple, Protocol, TypeVar, runtime_checkable
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
    phone: str  # normalised 2547XXXXXXXX / 2541XXXXXXXX
    amount: int  # whole KES
    account_reference: str = ""
    description: str = ""
    currency: str = "KES"
    status: str = "pending"  # pending | completed | failed
    reason: str | None = None  # failed: cancelled|timeout|insufficient_funds|...
    result_code: int | str | None = None
    result_desc: str | None = None
    mpesa_receipt_number: str | None = None
    transaction_date: str | None = None  # ISO 8601
    callback: dict | None = None  # raw body of the first final callback
    initiated_at: float = 0.0  # epoch seconds
    completed_at: float | None = None
    settled_by: str | None = None  # callback | query | timeout
    flags: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)  # [{"at": epoch, "event": "...", ...}]
    extra: dict = field(default_factory=dict)  # room for later features

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

    kind: str  # "memory" | "sqlite" | "redis"

    def create(self, tx: Transaction) -> None:
        """Save a new record; raise DuplicateTransaction if its id is already stored."""

    def get(self, checkout_request_id: str) -> Transaction | None:
        """Return a copy of the record, or None."""

    def update(
        self, checkout_request_id: str, mutate: Callable[[Transaction], R]
    ) -> tuple[Transaction | None, R | None]:
        """Atomically load, mutate(tx) in place, save; return (tx, mutate's result).

        Returns (None, None) when the id is unknown. No update is lost between threads or
        (SQLite, Redis) processes. mutate may run more than once, so it must only touch tx;
        if it raises, nothing is saved and the exception propagates.
        """

    def list(
        self, status: str | None = None, phone: str | None = None, limit: int = 20, offset: int = 0
    ) -> tuple[list[Transaction], int]:
        """Return one page of records, newest initiated_at first, and how many match."""

    def pending_before(self, cutoff: float) -> list[Transaction]:
        """Return pending records initiated before cutoff, oldest first."""

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
    ) -> tuple[list[Transaction], int]:
        """Return one page of the records matching every filter, newest first, and the count.

        text matches a CheckoutRequestID exactly, a receipt number or an account reference
        ignoring ASCII case, or, 3 digits or more, the end of the phone number. reason
        matches failed records only. since and until bound initiated_at: [since, until).
        """

    def overview(self, since: float, until: float, step: float) -> Overview:
        """Add up the counters of the payments initiated in [since, until), per step and in all.

        since and step fall on 5-minute boundaries (hours and days: Nairobi's) and
        until - since is a multiple of step. Memory and Redis forget a bucket `retention`
        s after its last write, as they forget records; SQLite keeps every bucket.
        """

    def add(self, key: str, value: dict, ttl: float) -> bool:
        """Store value under key for ttl seconds unless a live value is there; True if stored."""

    def get_value(self, key: str) -> dict | None:
        """Return the live value under key, or None."""

    def set_value(self, key: str, value: dict, ttl: float) -> None:
        """Store value under key for ttl seconds, replacing any value."""

    def delete(self, key: str) -> None:
        """Remove the value under key, if any."""

    def adjust_counter(self, key: str, delta: int, maximum: int | None = None) -> int | None:
        """Atomically add delta to a durable integer counter (missing counts as 0).

        Returns the new value, or None (and changes nothing) when it would fall below 0
        or rise above maximum. Counters never expire (stock held and sold).
        """

    def get_counter(self, key: str) -> int:
        """Return the counter's value (0 when it was never set)."""

    def close(self) -> None:
        """Release connections."""


def open_store(url: str = "memory://", *, retention: float = DEFAULT_RETENTION, clock: Clock = time.time) -> Store:
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
    raise ValueError(
        f"STORE_URL: unsupported scheme '{scheme}' (use memory://, sqlite:///path.db or redis://host:port/db)"
    )


def _sqlite_path(url: str) -> str:
    prefix = "sqlite:///"
    path = url[len(prefix) :] if url.lower().startswith(prefix) else ""
    if not path or path == ":memory:" or "?" in path:
        raise ValueError(
            "STORE_URL: a SQLite store needs a file, as sqlite:///relative.db or "
            "sqlite:////absolute.db (use memory:// for a store in memory)"
        )
    return path


_FIELDS = tuple(f.name for f in fields(Transaction))


def _encode(tx: Transaction) -> str:
    """The record as stored: the text json.dumps(tx.to_dict()) gives, without its deep copy."""
    if tx.status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {tx.status!r}")
    return json.dumps({name: getattr(tx, name) for name in _FIELDS}, ensure_ascii=False, separators=(",", ":"))


def _decode(text: str | bytes) -> Transaction:
    """A stored record; unlike from_dict it copies nothing, as json.loads made it all afresh."""
    data = json.loads(text)
    return Transaction(**{name: data[name] for name in _FIELDS if name in data})


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


# The dashboard's reads: search() and overview().

TALLY_STEPS = (300, 3600, 86400)  # counter buckets: 5 minutes, an hour, a day
TALLY_UTC_OFFSET = 3 * 3600  # buckets start on Nairobi's hours and midnights (EAT, no DST)
DURATION_BOUNDS = (1, 2, 3, 5, 7, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1800, 3600)
PHONE_SUFFIX_MIN = 3  # fewer trailing digits than this do not search phones
MAX_OVERVIEW_BUCKETS = 10_000
# SQLite's upper() and lower() change ASCII letters only: so do these, so backends agree.
_ASCII_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def tally(tx: Transaction) -> dict[str, int]:
    """What one record adds to the counters of the time bucket it was initiated in.

    started; status:<status>; received (KES, completed only); reason:<reason> (failed);
    settled:<callback|query|timeout> and time:<bound> (final only: seconds from push to
    result, as the first DURATION_BOUNDS at or above them, or "inf"); flag:<flag>;
    event:<name> per history entry, and event:queried:error per failed status query.
    """
    counts: dict[str, int] = {"started": 1, f"status:{tx.status}": 1}
    if tx.status == "completed":
        counts["received"] = int(tx.amount)
    elif tx.status == "failed":
        counts[f"reason:{tx.reason or 'unknown'}"] = 1
    if tx.is_final:
        if tx.settled_by:
            counts[f"settled:{tx.settled_by}"] = 1
        if tx.completed_at is not None:
            counts[f"time:{duration_bound(tx.completed_at - tx.initiated_at)}"] = 1
    for flag in set(tx.flags):
        counts[f"flag:{flag}"] = 1
    for entry in tx.history:
        names = [f"event:{entry.get('event')}"]
        if entry.get("event") == "queried" and entry.get("result") == "error":
            names.append("event:queried:error")
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    return counts


def duration_bound(seconds: float) -> str:
    """The histogram bucket of a push-to-result time: its upper bound in seconds, or "inf"."""
    return next((str(bound) for bound in DURATION_BOUNDS if seconds <= bound), "inf")


@dataclass(frozen=True)
class Tally:
    """Added-up counters (see tally()) of the payments initiated in a bucket or a window."""

    counts: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> int:
        return self.counts.get(name, 0)

    @property
    def started(self) -> int:
        return self["started"]

    @property
    def completed(self) -> int:
        return self["status:completed"]

    @property
    def failed(self) -> int:
        return self["status:failed"]

    @property
    def pending(self) -> int:
        return self["status:pending"]

    @property
    def received(self) -> int:
        """KES received: the amounts of the completed payments."""
        return self["received"]

    @property
    def conversion(self) -> float | None:
        """Completed / started, or None when nothing started."""
        return self.completed / self.started if self.started else None

    def group(self, kind: str) -> dict[str, int]:
        """The non-zero counters named <kind>:<name>, as {name: count}."""
        prefix = f"{kind}:"
        return {
            name[len(prefix) :]: value
            for name, value in sorted(self.counts.items())
            if name.startswith(prefix) and value
        }

    def time_to_final(self, share: float) -> float | None:
        """Seconds within which `share` (0.5: the median) of final payments got their result.

        An upper bound from the DURATION_BOUNDS histogram (math.inf past the last bound);
        None when no payment is final.
        """
        bounds = [*DURATION_BOUNDS, math.inf]
        counts = [self[f"time:{'inf' if bound == math.inf else bound}"] for bound in bounds]
        if not sum(counts):
            return None
        rank, seen = max(1, math.ceil(share * sum(counts))), 0
        for bound, count in zip(bounds, counts):
            seen += count
            if seen >= rank:
                return bound
        return math.inf


@dataclass(frozen=True)
class Overview:
    """What overview() found: the whole window and each step of it, oldest first."""

    since: float
    until: float
    step: float
    total: Tally
    buckets: tuple[tuple[float, Tally], ...]  # (bucket start, its counters)


def _tallied(tx: Transaction) -> tuple[float, dict[str, int]]:
    return tx.initiated_at, tally(tx)


def _tally_buckets(at: float) -> list[tuple[int, int]]:
    """The (step, index) of each counter bucket a record initiated at `at` counts in."""
    return [(step, int((at + TALLY_UTC_OFFSET) // step)) for step in TALLY_STEPS]


def _tally_rows(before: tuple[float, dict] | None, after: tuple[float, dict]) -> list[tuple[int, int, str, int]]:
    """The counter changes (step, index, name, delta) that turn `before` into `after`."""
    changes: dict[tuple[int, int, str], int] = {}
    for sign, side in ((-1, before), (1, after)):
        if side is None:
            continue
        at, counts = side
        for step, index in _tally_buckets(at):
            for name, value in counts.items():
                key = (step, index, name)
                changes[key] = changes.get(key, 0) + sign * value
    return [(*key, value) for key, value in changes.items() if value]


def _overview_plan(since: float, until: float, step: float) -> tuple[int, list[tuple[float, range]]]:
    """Check an overview's bounds; return the counter step to read and each bucket's indexes."""
    since, until, step = float(since), float(until), float(step)
    if not (step > 0 and until > since and (until - since) % step == 0):
        raise ValueError("overview: until - since must be a positive multiple of step")
    resolution = next((r for r in reversed(TALLY_STEPS) if step % r == 0 and (since + TALLY_UTC_OFFSET) % r == 0), None)
    if resolution is None:
        raise ValueError("overview: since and step must fall on 5-minute boundaries")
    per_step, count = int(step // resolution), int((until - since) // step)
    if per_step * count > MAX_OVERVIEW_BUCKETS:
        raise ValueError(f"overview: more than {MAX_OVERVIEW_BUCKETS} buckets to read; use a longer step")
    first = int((since + TALLY_UTC_OFFSET) // resolution)
    return resolution, [
        (since + n * step, range(first + n * per_step, first + (n + 1) * per_step)) for n in range(count)
    ]


def _assemble(
    since: float, until: float, step: float, plan: list[tuple[float, range]], found: dict[int, dict[str, int]]
) -> Overview:
    """Add the counters found per stored bucket into the overview's steps and total."""
    total: dict[str, int] = {}
    buckets = []
    for start, indexes in plan:
        counts: dict[str, int] = {}
        for index in indexes:
            for name, value in found.get(index, {}).items():
                counts[name] = counts.get(name, 0) + int(value)
        for name, value in counts.items():
            total[name] = total.get(name, 0) + value
        buckets.append((start, Tally({n: v for n, v in counts.items() if v})))
    return Overview(
        float(since), float(until), float(step), Tally({n: v for n, v in total.items() if v}), tuple(buckets)
    )


def _receipt_key(tx: Transaction) -> str:
    return str(tx.mpesa_receipt_number or "").translate(_ASCII_UPPER)


def _reference_key(tx: Transaction) -> str:
    return str(tx.account_reference or "").translate(_ASCII_LOWER)


class _Search(NamedTuple):
    """A search's filters, checked, with the text in each form it is compared in."""

    text: str | None
    receipt: str | None
    reference: str | None
    digits: str | None  # the text, when it can be a phone's last digits
    status: str | None
    reason: str | None
    since: float | None
    until: float | None

    @classmethod
    def of(cls, text, status, reason, since, until) -> _Search:
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
        text = str(text).strip() if text is not None else ""
        if not text:
            return cls(
                None,
                None,
                None,
                None,
                status,
                reason or None,
                None if since is None else float(since),
                None if until is None else float(until),
            )
        digits = text if (text.isascii() and text.isdigit() and len(text) >= PHONE_SUFFIX_MIN) else None
        return cls(
            text,
            text.translate(_ASCII_UPPER),
            text.translate(_ASCII_LOWER),
            digits,
            status,
            reason or None,
            None if since is None else float(since),
            None if until is None else float(until),
        )

    @property
    def impossible(self) -> bool:
        return self.reason is not None and self.status not in (None, "failed")

    def admits(
        self,
        checkout_request_id: str,
        status: str,
        reason: str | None,
        phone: str,
        receipt: str,
        reference: str,
        initiated_at: float,
    ) -> bool:
        if self.status is not None and status != self.status:
            return False
        if self.reason is not None and (status != "failed" or reason != self.reason):
            return False
        if self.since is not None and initiated_at < self.since:
            return False
        if self.until is not None and initiated_at >= self.until:
            return False
        if self.text is None:
            return True
        return (
            checkout_request_id == self.text
            or (bool(receipt) and receipt == self.receipt)
            or (bool(reference) and reference == self.reference)
            or (self.digits is not None and phone.endswith(self.digits))
        )

    def admits_tx(self, tx: Transaction) -> bool:
        return self.admits(
            tx.checkout_request_id,
            tx.status,
            tx.reason,
            tx.phone,
            _receipt_key(tx),
            _reference_key(tx),
            tx.initiated_at,
        )


class _Record(NamedTuple):
    expires_at: float
    status: str
    phone: str
    initiated_at: float
    data: str
    reason: str | None = None  # the searched fields (see _Search.admits)
    receipt: str = ""
    reference: str = ""


def _words(record: _Record) -> list[str]:
    """What a text search can find a memory record by (see _Search.admits)."""
    words = [f"t:{record.phone[-PHONE_SUFFIX_MIN:]}"]
    if record.receipt:
        words.append(f"r:{record.receipt}")
    if record.reference:
        words.append(f"f:{record.reference}")
    return words


def _sorted_lists(record: _Record) -> list[str]:
    """The sorted lists a memory record is in, for searches by filters alone."""
    names = ["all", f"status:{record.status}"]
    if record.status == "failed" and record.reason:
        names.append(f"reason:{record.reason}")
    return names


# Beyond this many entries leaving one sorted list, filtering the whole list once is
# cheaper than deleting them one by one (measured: the two cost about the same at a few
# hundred, in lists of 12,500 and of 100,000 entries).
_FEW_LEAVING = 256


def _without(entries: list, leaving: list) -> list:
    """The sorted list entries without those in leaving (absent ones are ignored).

    Each deletion shifts what follows it, so deleting k of n entries one by one costs
    O(k n): a sweep does it for a few only, and filters the list once for more.
    """
    if len(leaving) > _FEW_LEAVING:
        gone = set(leaving)
        return [entry for entry in entries if entry not in gone]
    for entry in leaving:
        at = bisect.bisect_left(entries, entry)
        if at < len(entries) and entries[at] == entry:
            del entries[at]
    return entries


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
    `search` does not: filters alone bisect a sorted list (all, per status, per reason), text
    looks up a small word index, and `overview` reads the per-bucket counters each write
    keeps, which expire like records.
    """

    kind = "memory"

    def __init__(self, *, retention: float = DEFAULT_RETENTION, clock: Clock = time.time):
        self._retention = retention
        self._clock = clock
        # Reentrant so that a mutate which (against advice) reads the store does not hang.
        self._lock = threading.RLock()
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._values: dict[str, tuple[float, str]] = {}
        self._expiries: list[tuple[float, str]] = []  # heap; stale entries are skipped
        # (step, index) -> (expires_at, counters); in expiry order, like the records
        self._tallies: OrderedDict[tuple[int, int], tuple[float, dict]] = OrderedDict()
        self._words: dict[str, set[str]] = {}  # receipt, reference, phone tail -> ids
        # "all", "status:<status>", "reason:<reason>" -> sorted [(initiated_at, id)]
        self._sorted: dict[str, list[tuple[float, str]]] = {}
        self._counters: dict[str, int] = {}

    def create(self, tx: Transaction) -> None:
        data = _encode(tx)
        with self._lock:
            now = self._expire()
            if self._live(tx.checkout_request_id, now) is not None:
                raise DuplicateTransaction(tx.checkout_request_id)
            self._put(tx, data, now)
            self._count(_tally_rows(None, _tallied(tx)), now)

    def get(self, checkout_request_id: str) -> Transaction | None:
        with self._lock:
            record = self._live(checkout_request_id, self._expire())
        return _decode(record.data) if record else None

    def update(
        self, checkout_request_id: str, mutate: Callable[[Transaction], R]
    ) -> tuple[Transaction | None, R | None]:
        with self._lock:
            now = self._expire()
            record = self._live(checkout_request_id, now)
            if record is None:
                return None, None
            tx = _decode(record.data)
            before = _tallied(tx)
            result = _apply(tx, mutate)
            self._put(tx, _encode(tx), now)
            self._count(_tally_rows(before, _tallied(tx)), now)
        return tx, result

    def list(
        self, status: str | None = None, phone: str | None = None, limit: int = 20, offset: int = 0
    ) -> tuple[list[Transaction], int]:
        _check_page(limit, offset)
        with self._lock:
            now = self._expire()
            matches = [
                (r.initiated_at, key, r.data)
                for key, r in self._records.items()
                if r.expires_at > now and (status is None or r.status == status) and (phone is None or r.phone == phone)
            ]
        matches.sort(reverse=True)
        return [_decode(data) for _, _, data in matches[offset : offset + limit]], len(matches)

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
    ) -> tuple[list[Transaction], int]:
        _check_page(limit, offset)
        criteria = _Search.of(text, status, reason, since, until)
        if criteria.impossible:
            return [], 0
        if criteria.text is None:
            return self._search_sorted(criteria, limit, offset)
        with self._lock:
            now = self._expire()
            words, records = self._words, self._records
            named = set(words.get(f"r:{criteria.receipt}", ()))  # only what the text can name
            named |= words.get(f"f:{criteria.reference}", set())
            if criteria.digits is not None:
                named |= words.get(f"t:{criteria.digits[-PHONE_SUFFIX_MIN:]}", set())
            if criteria.text in records:
                named.add(criteria.text)
            matches = [
                (r.initiated_at, key, r.data)
                for key, r in ((key, records[key]) for key in named)
                if r.expires_at > now
                and criteria.admits(key, r.status, r.reason, r.phone, r.receipt, r.reference, r.initiated_at)
            ]
        matches.sort(reverse=True)
        return [_decode(data) for _, _, data in matches[offset : offset + limit]], len(matches)

    def _search_sorted(self, criteria: _Search, limit: int, offset: int) -> tuple[list[Transaction], int]:
        """Filters alone: one sorted list holds exactly the matches, as in Redis."""
        if criteria.reason is not None:
            name = f"reason:{criteria.reason}"
        elif criteria.status is not None:
            name = f"status:{criteria.status}"
        else:
            name = "all"
        with self._lock:
            self._expire()
            entries = self._sorted.get(name, [])
            low = 0 if criteria.since is None else bisect.bisect_left(entries, (criteria.since, ""))
            high = len(entries) if criteria.until is None else bisect.bisect_left(entries, (criteria.until, ""))
            end = high - offset
            page = entries[max(low, end - limit) : end] if limit and end > low else []
            found = [self._records[key].data for _, key in reversed(page)]
        return [_decode(data) for data in found], max(0, high - low)

    def overview(self, since: float, until: float, step: float) -> Overview:
        resolution, plan = _overview_plan(since, until, step)
        found = {}
        with self._lock:
            now = self._expire()
            for _, indexes in plan:
                for index in indexes:
                    entry = self._tallies.get((resolution, index))
                    if entry is not None and entry[0] > now:
                        found[index] = dict(entry[1])
        return _assemble(since, until, step, plan, found)

    def pending_before(self, cutoff: float) -> list[Transaction]:
        with self._lock:
            now = self._expire()
            matches = [
                (r.initiated_at, key, r.data)
                for key, r in self._records.items()
                if r.expires_at > now and r.status == "pending" and r.initiated_at < cutoff
            ]
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

    def adjust_counter(self, key: str, delta: int, maximum: int | None = None) -> int | None:
        with self._lock:
            value = self._counters.get(key, 0) + delta
            if value < 0 or (maximum is not None and value > maximum):
                return None
            self._counters[key] = value
            return value

    def get_counter(self, key: str) -> int:
        with self._lock:
            return self._counters.get(key, 0)

    def close(self) -> None:
        """Nothing to release: the data lives as long as the object."""

    def _expire(self) -> float:
        """Drop what has expired, looking only at entries that have; return the time."""
        now = self._clock()
        self._forget(self._take_expired_records(now))
        heap = self._expiries
        while heap and heap[0][0] <= now:
            expires_at, key = heapq.heappop(heap)
            current = self._values.get(key)
            if current is not None and current[0] == expires_at:
                del self._values[key]
        tallies = self._tallies
        while tallies:
            oldest = next(iter(tallies))
            if tallies[oldest][0] > now:
                break
            del tallies[oldest]
        return now

    def _take_expired_records(self, now: float) -> list[tuple[str, _Record]]:
        """Remove the expired records from the front of the expiry order and return them."""
        records, expired = self._records, []
        while records and next(iter(records.values())).expires_at <= now:
            expired.append(records.popitem(last=False))
        return expired

    def _live(self, checkout_request_id: str, now: float) -> _Record | None:
        record = self._records.get(checkout_request_id)
        if record is not None and record.expires_at <= now:
            # Only reachable if the clock stepped back and broke the front-first order.
            del self._records[checkout_request_id]
            self._forget([(checkout_request_id, record)])
            return None
        return record

    def _put(self, tx: Transaction, data: str, now: float) -> None:
        key = tx.checkout_request_id
        old = self._records.get(key)
        if old is not None:
            self._forget([(key, old)])
        record = _Record(
            now + self._retention,
            tx.status,
            tx.phone,
            tx.initiated_at,
            data,
            tx.reason,
            _receipt_key(tx),
            _reference_key(tx),
        )
        self._records[key] = record
        self._records.move_to_end(key)
        for word in _words(record):
            self._words.setdefault(word, set()).add(key)
        for name in _sorted_lists(record):
            bisect.insort(self._sorted.setdefault(name, []), (record.initiated_at, key))

    def _forget(self, records: list[tuple[str, _Record]]) -> None:
        """Take records out of the search indexes, changing each sorted list once."""
        leaving: dict[str, list[tuple[float, str]]] = {}
        for key, record in records:
            for word in _words(record):
                ids = self._words.get(word)
                if ids is not None:
                    ids.discard(key)
                    if not ids:
                        del self._words[word]
            for name in _sorted_lists(record):
                leaving.setdefault(name, []).append((record.initiated_at, key))
        for name, entries in leaving.items():
            remaining = _without(self._sorted.get(name, []), entries)
            if remaining:
                self._sorted[name] = remaining
            else:
                self._sorted.pop(name, None)

    def _count(self, rows: list[tuple[int, int, str, int]], now: float) -> None:
        """Apply counter changes; a bucket written to expires `retention` s later."""
        changes: dict[tuple[int, int], list[tuple[str, int]]] = {}
        for step, index, name, value in rows:
            changes.setdefault((step, index), []).append((name, value))
        for key, named in changes.items():
            entry = self._tallies.pop(key, None)
            counts = entry[1] if entry is not None and entry[0] > now else {}
            for name, value in named:
                counts[name] = counts.get(name, 0) + value
            self._tallies[key] = (now + self._retention, counts)

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
CREATE TABLE IF NOT EXISTS counters (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
PRAGMA user_version = 1;
"""


# Searched fields, computed by SQLite from the JSON record (virtual: nothing is stored twice,
# and a ledger made before them gets them, indexed, by ALTER TABLE when it is opened).
_SEARCH_COLUMNS = (
    ("reason", "json_extract(record, '$.reason')"),
    ("receipt_key", "upper(coalesce(json_extract(record, '$.mpesa_receipt_number'), ''))"),
    ("reference_key", "lower(coalesce(json_extract(record, '$.account_reference'), ''))"),
    # The phone reversed, so that its last digits are a prefix an index can find.
    ("phone_reversed", " || ".join(f"substr(phone, -{n}, 1)" for n in range(1, 16))),
)
_SEARCH_INDEXES = (
    "CREATE INDEX IF NOT EXISTS transactions_by_reason"
    " ON transactions (reason, status, initiated_at, checkout_request_id)",
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
    """Give a ledger the search columns and counters (once; counted from its records)."""
    db.execute("BEGIN IMMEDIATE")
    try:
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
                for step, index, name, value in _tally_rows(None, _tallied(_decode(data))):
                    totals[(step, index, name)] = totals.get((step, index, name), 0) + value
            db.executemany(_COUNT, [(*key, value) for key, value in totals.items()])
        db.commit()
    except BaseException:
        if db.in_transaction:
            db.rollback()
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
        # a bare file descriptor would not.
        self._close_writer_lock = weakref.finalize(self, os.close, writer_lock)

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

    Several gunicorn workers may share the file: every thread of every process gets its own
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
        # (gunicorn --preload) holds no connection for them to inherit.
        try:
            db = self._connect()
            os.close(self._open_writer_lock())
        except (sqlite3.Error, OSError) as exc:
            raise ValueError(f"STORE_URL: cannot open SQLite database {path!r}: {exc}") from exc
        try:
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warning("SQLite store %s is in %s mode, not WAL: readers will wait for writers", path, mode)
            db.executescript(_SCHEMA)
            _upgrade_sqlite(db)
        finally:
            db.close()

    def create(self, tx: Transaction) -> None:
        data = _encode(tx)
        try:
            with self._write() as db:
                db.execute(
                    "INSERT INTO transactions"
                    " (checkout_request_id, status, phone, initiated_at, record)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (tx.checkout_request_id, tx.status, tx.phone, tx.initiated_at, data),
                )
                db.executemany(_COUNT, _tally_rows(None, _tallied(tx)))
        except sqlite3.IntegrityError as exc:
            if exc.sqlite_errorname == "SQLITE_CONSTRAINT_PRIMARYKEY":
                raise DuplicateTransaction(tx.checkout_request_id) from None
            raise

    def get(self, checkout_request_id: str) -> Transaction | None:
        row = (
            self._db()
            .execute("SELECT record FROM transactions WHERE checkout_request_id = ?", (checkout_request_id,))
            .fetchone()
        )
        return _decode(row[0]) if row else None

    def update(
        self, checkout_request_id: str, mutate: Callable[[Transaction], R]
    ) -> tuple[Transaction | None, R | None]:
        with self._write() as db:
            row = db.execute(
                "SELECT record FROM transactions WHERE checkout_request_id = ?", (checkout_request_id,)
            ).fetchone()
            if row is None:
                return None, None
            tx = _decode(row[0])
            before = _tallied(tx)
            result = _apply(tx, mutate)
            db.execute(
                "UPDATE transactions SET status = ?, phone = ?, initiated_at = ?, record = ?"
                " WHERE checkout_request_id = ?",
                (tx.status, tx.phone, tx.initiated_at, _encode(tx), checkout_request_id),
            )
            db.executemany(_COUNT, _tally_rows(before, _tallied(tx)))
        return tx, result

    def list(
        self, status: str | None = None, phone: str | None = None, limit: int = 20, offset: int = 0
    ) -> tuple[list[Transaction], int]:
        _check_page(limit, offset)
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
                f"SELECT record FROM transactions {where}"
                " ORDER BY initiated_at DESC, checkout_request_id DESC"
                " LIMIT ? OFFSET ?",
                [*params, limit, offset],
            ).fetchall()
        return [_decode(data) for (data,) in rows], total

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
    ) -> tuple[list[Transaction], int]:
        _check_page(limit, offset)
        criteria = _Search.of(text, status, reason, since, until)
        if criteria.impossible:
            return [], 0
        conditions, params = [], []
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
            either = ["checkout_request_id = ?", "receipt_key = ?", "reference_key = ?"]
            params += [criteria.text, criteria.receipt, criteria.reference]
            if criteria.digits is not None:
                either.append("(phone_reversed >= ? AND phone_reversed < ?)")
                params += [criteria.digits[::-1], criteria.digits[::-1] + ":"]  # ":" follows "9"
            conditions.append(f"({' OR '.join(either)})")
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        with self._read() as db:  # one snapshot, so the page agrees with the total
            total = db.execute(f"SELECT count(*) FROM transactions {where}", params).fetchone()[0]
            rows = db.execute(
                f"SELECT record FROM transactions {where}"
                " ORDER BY initiated_at DESC, checkout_request_id DESC"
                " LIMIT ? OFFSET ?",
                [*params, limit, offset],
            ).fetchall()
        return [_decode(data) for (data,) in rows], total

    def overview(self, since: float, until: float, step: float) -> Overview:
        resolution, plan = _overview_plan(since, until, step)
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
        return _assemble(since, until, step, plan, found)

    def pending_before(self, cutoff: float) -> list[Transaction]:
        rows = (
            self._db()
            .execute(
                "SELECT record FROM transactions WHERE status = 'pending' AND initiated_at < ?"
                " ORDER BY initiated_at, checkout_request_id",
                (cutoff,),
            )
            .fetchall()
        )
        return [_decode(data) for (data,) in rows]

    def add(self, key: str, value: dict, ttl: float) -> bool:
        _check_ttl(ttl)
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
        _check_ttl(ttl)
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

    def _purge(self, db: sqlite3.Connection, now: float) -> None:
        """Delete expired key/values, at most once per purge_interval per store object."""
        if now >= self._next_purge:
            self._next_purge = now + self._purge_interval
            db.execute("DELETE FROM kv WHERE expires_at <= ?", (now,))


# Records initiated within the last (retention - slack) seconds are certainly alive, as
# long as the application's and Redis's clocks agree within the slack.
_CLOCK_SLACK = 60.0
_SWEEP_BATCH = 20


# Check and change in one step on the server: the counter never passes its bounds,
# whichever worker or dyno adjusts it.
_ADJUST_COUNTER = """
local value = tonumber(redis.call('GET', KEYS[1]) or '0') + tonumber(ARGV[1])
if value < 0 or (ARGV[2] ~= '' and value > tonumber(ARGV[2])) then return false end
redis.call('SET', KEYS[1], value)
return value
"""


_TAIL = 4  # Redis lists phones by their last 4 digits: a few records per set

# KEYS: counter hashes; ARGV: their ttl in ms, then (key number, counter, change) triples.
_COUNT_SCRIPT = """
for i = 2, #ARGV, 3 do
  redis.call('HINCRBY', KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2])
end
for i = 1, #KEYS do
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
"""


class RedisStore:
    """Records and values in Redis, shared by every worker, dyno and machine that reaches it.

    Keys (all under the prefix, "mpesa:" by default)::

        tx:<id>               the record as JSON, expiring `retention` s after its last write
        idx:all               sorted sets of ids scored by initiated_at, for newest-first
        idx:status:<status>   listing; a record and its index entries change in one MULTI
        idx:phone:<phone>
        idx:tail:<last 4>     sorted sets for search: phones ending so, failed records by
        idx:reason:<reason>   reason (the names in the set idx:reasons), receipts and
        idx:receipt:<RECEIPT> account references (ASCII case folded)
        idx:ref:<reference>
        tally:<step>:<index>  hashes of counters per time bucket, for overview; changed in
                              the MULTI that writes the record
        kv:<key>              key/values, SET NX PX for add

    `update` is optimistic (WATCH/MULTI, retried when another writer got there first), so
    mutate may run more than once. Index entries whose record has expired are removed
    lazily: each create sweeps a few of the oldest, and listing removes those it meets.
    Every index set and counter hash also expires `retention` s after its last write, so
    an idle store empties itself completely.

    Guarantees only what the Redis configuration does: without AOF persistence a restart
    loses records, and an eviction policy other than noeviction may drop records, indexes
    or idempotency keys early. Use a persistent, noeviction Redis for payments, and the
    SQLite store where a permanent ledger is needed.
    """

    kind = "redis"

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "mpesa:",
        retention: float = DEFAULT_RETENTION,
        clock: Clock = time.time,
    ):
        self._redis = client
        self._prefix = prefix
        self._retention = retention
        self._retention_ms = _milliseconds(retention)
        self._clock = clock
        self._all = f"{prefix}idx:all"
        self._reasons = f"{prefix}idx:reasons"

    @classmethod
    def from_url(cls, url: str, *, retention: float = DEFAULT_RETENTION, clock: Clock = time.time) -> RedisStore:
        """Connect (lazily, through one pool) to redis://host:port/db[?prefix=name:]."""
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefix = next((value for name, value in query if name == "prefix"), "mpesa:")
        rest = urlencode([(name, value) for name, value in query if name != "prefix"])
        # Timeouts given in the URL win over these defaults.
        client = redis.Redis.from_url(
            urlunsplit(parts._replace(query=rest)), decode_responses=True, socket_timeout=5, socket_connect_timeout=5
        )
        return cls(client, prefix=prefix, retention=retention, clock=clock)

    def create(self, tx: Transaction) -> None:
        key = self._tx_key(tx.checkout_request_id)
        data = _encode(tx)

        def save_unless_stored(pipe) -> None:
            if pipe.exists(key):
                raise DuplicateTransaction(tx.checkout_request_id)
            self._save(pipe, tx, data)

        # WATCH key, run the function, EXEC; all again if another writer changed key first.
        self._redis.transaction(save_unless_stored, key)
        try:
            self._sweep(tx.phone)
        except redis.RedisError as exc:  # housekeeping must not fail a saved payment
            log.warning("redis store: index sweep failed: %s", exc)

    def get(self, checkout_request_id: str) -> Transaction | None:
        data = self._redis.get(self._tx_key(checkout_request_id))
        return _decode(data) if data is not None else None

    def update(
        self, checkout_request_id: str, mutate: Callable[[Transaction], R]
    ) -> tuple[Transaction | None, R | None]:
        key = self._tx_key(checkout_request_id)

        def load_mutate_save(pipe) -> tuple[Transaction | None, R | None]:
            data = pipe.get(key)
            if data is None:
                return None, None
            tx = _decode(data)
            indexed, counted = self._index_keys(tx), _tallied(tx)
            result = _apply(tx, mutate)
            self._save(pipe, tx, _encode(tx), indexed, counted)
            return tx, result

        return self._redis.transaction(load_mutate_save, key, value_from_callable=True)

    def list(
        self, status: str | None = None, phone: str | None = None, limit: int = 20, offset: int = 0
    ) -> tuple[list[Transaction], int]:
        _check_page(limit, offset)
        if phone is not None and status is not None:
            # One phone's records are few: read them all and filter by status here.
            ids = self._redis.zrevrange(self._phone_key(phone), 0, -1)
            matches = [tx for tx in self._load(ids, phone) if tx.status == status]
            return matches[offset : offset + limit], len(matches)
        if phone is not None:
            index = self._phone_key(phone)
        elif status is not None:
            index = self._status_key(status)
        else:
            index = self._all
        return self._page(index, limit, offset, phone=phone)

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
    ) -> tuple[list[Transaction], int]:
        _check_page(limit, offset)
        criteria = _Search.of(text, status, reason, since, until)
        if criteria.impossible:
            return [], 0
        if criteria.text is not None:
            return self._search_text(criteria, limit, offset)
        # Without text one sorted set holds exactly the matches, scored by initiated_at.
        if criteria.reason is not None:
            index = self._reason_key(criteria.reason)
        elif criteria.status is not None:
            index = self._status_key(criteria.status)
        else:
            index = self._all
        low = "-inf" if criteria.since is None else repr(criteria.since)
        high = "+inf" if criteria.until is None else f"({criteria.until!r}"
        return self._page(index, limit, offset, low, high)

    def _page(
        self, index: str, limit: int, offset: int, low: str = "-inf", high: str = "+inf", phone: str | None = None
    ) -> tuple[list[Transaction], int]:
        """One page of the records a sorted set lists, scored from low to high, newest first."""
        self._forget_expired(self._redis.zrangebyscore(index, "-inf", self._maybe_expired()), phone, extra=[index])
        with self._redis.pipeline() as pipe:  # MULTI: the page agrees with the total
            pipe.zcount(index, low, high)
            if limit:
                pipe.zrevrangebyscore(index, high, low, start=offset, num=limit)
            total, *page = pipe.execute()
        return self._load(page[0] if page else [], phone, extra=[index]), total

    def _search_text(self, criteria: _Search, limit: int, offset: int) -> tuple[list[Transaction], int]:
        """Load the few records the text can name, then filter, sort and page them here."""
        sets = [self._receipt_key(criteria.receipt), self._reference_key(criteria.reference)]
        digits = criteria.digits
        if digits is not None and len(digits) >= 12:  # a whole number: its own set
            sets.append(self._phone_key(digits))
        elif digits is not None and len(digits) >= _TAIL:
            sets.append(self._tail_key(digits))
        elif digits is not None:
            sets += [self._tail_key(f"{n}{digits}") for n in range(10 ** (_TAIL - len(digits)))]
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.exists(self._tx_key(criteria.text))
            for index in sets:
                pipe.zrange(index, 0, -1)
            exists, *members = pipe.execute()
        ids = list(
            dict.fromkeys(([criteria.text] if exists else []) + [member for found in members for member in found])
        )
        matches = sorted(
            (tx for tx in self._load(ids, extra=sets) if criteria.admits_tx(tx)),
            key=lambda tx: (tx.initiated_at, tx.checkout_request_id),
            reverse=True,
        )
        return matches[offset : offset + limit], len(matches)

    def overview(self, since: float, until: float, step: float) -> Overview:
        resolution, plan = _overview_plan(since, until, step)
        indexes = [index for _, group in plan for index in group]
        with self._redis.pipeline(transaction=False) as pipe:
            for index in indexes:
                pipe.hgetall(self._tally_key(resolution, index))
            found = {
                index: {name: int(value) for name, value in counts.items()}
                for index, counts in zip(indexes, pipe.execute())
                if counts
            }
        return _assemble(since, until, step, plan, found)

    def pending_before(self, cutoff: float) -> list[Transaction]:
        return self._load(self._redis.zrangebyscore(self._status_key("pending"), "-inf", f"({cutoff!r}"))

    def add(self, key: str, value: dict, ttl: float) -> bool:
        _check_ttl(ttl)
        return bool(self._redis.set(self._kv_key(key), json.dumps(value), nx=True, px=_milliseconds(ttl)))

    def get_value(self, key: str) -> dict | None:
        data = self._redis.get(self._kv_key(key))
        return json.loads(data) if data is not None else None

    def set_value(self, key: str, value: dict, ttl: float) -> None:
        _check_ttl(ttl)
        self._redis.set(self._kv_key(key), json.dumps(value), px=_milliseconds(ttl))

    def delete(self, key: str) -> None:
        self._redis.delete(self._kv_key(key))

    def adjust_counter(self, key: str, delta: int, maximum: int | None = None) -> int | None:
        value = self._redis.eval(
            _ADJUST_COUNTER, 1, self._counter_key(key), int(delta), "" if maximum is None else int(maximum)
        )
        return None if value is None else int(value)

    def get_counter(self, key: str) -> int:
        return int(self._redis.get(self._counter_key(key)) or 0)

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

    def _counter_key(self, key: str) -> str:
        return f"{self._prefix}counter:{key}"

    def _tail_key(self, digits: str) -> str:
        return f"{self._prefix}idx:tail:{digits[-_TAIL:]}"

    def _reason_key(self, reason: str) -> str:
        return f"{self._prefix}idx:reason:{reason}"

    def _receipt_key(self, receipt: str) -> str:
        return f"{self._prefix}idx:receipt:{receipt}"

    def _reference_key(self, reference: str) -> str:
        return f"{self._prefix}idx:ref:{reference}"

    def _tally_key(self, step: int, index: int) -> str:
        return f"{self._prefix}tally:{step}:{index}"

    def _index_keys(self, tx: Transaction) -> list[str]:
        """The sorted sets that list tx."""
        keys = [self._all, self._status_key(tx.status), self._phone_key(tx.phone)]
        if len(tx.phone) >= _TAIL:
            keys.append(self._tail_key(tx.phone))
        if tx.status == "failed" and tx.reason:
            keys.append(self._reason_key(tx.reason))
        if _receipt_key(tx):
            keys.append(self._receipt_key(_receipt_key(tx)))
        if _reference_key(tx):
            keys.append(self._reference_key(_reference_key(tx)))
        return keys

    def _save(
        self,
        pipe,
        tx: Transaction,
        data: str,
        indexed: list[str] | None = None,
        counted: tuple[float, dict[str, int]] | None = None,
    ) -> None:
        """Start the MULTI and queue the record with its index and counter changes.

        indexed and counted are what the record was listed in and counted as before this
        write (None for a new record).
        """
        pipe.multi()
        pipe.set(self._tx_key(tx.checkout_request_id), data, px=self._retention_ms)
        self._index(pipe, tx, indexed)
        self._count(pipe, _tally_rows(counted, _tallied(tx)))

    def _index(self, pipe, tx: Transaction, before: list[str] | None = None) -> None:
        """Queue the index writes for tx (moving it out of the sets that listed it before)."""
        member = tx.checkout_request_id
        keys = self._index_keys(tx)
        for index in set(before or ()) - set(keys):
            pipe.zrem(index, member)
        # Each set outlives every record it holds: it is refreshed by each of their writes.
        for index in keys:
            pipe.zadd(index, {member: tx.initiated_at})
            pipe.pexpire(index, self._retention_ms)
        if tx.status == "failed" and tx.reason:
            pipe.sadd(self._reasons, tx.reason)
            pipe.pexpire(self._reasons, self._retention_ms)

    def _count(self, pipe, rows: list[tuple[int, int, str, int]]) -> None:
        """Queue counter changes; a bucket's hash expires `retention` s after its last write."""
        if not rows:
            return
        keys: dict[str, int] = {}
        args: list = [self._retention_ms]
        for step, index, name, value in rows:
            position = keys.setdefault(self._tally_key(step, index), len(keys) + 1)
            args += [position, name, value]
        # One command instead of one HINCRBY per counter: a write changes about 25.
        pipe.eval(_COUNT_SCRIPT, len(keys), *keys, *args)

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

    def _forget_expired(self, ids: list[str], phone: str | None = None, extra: list[str] = ()) -> None:
        """Remove from the indexes those of ids whose record no longer exists."""
        if not ids:
            return
        with self._redis.pipeline(transaction=False) as pipe:
            for member in ids:
                pipe.exists(self._tx_key(member))
            alive = pipe.execute()
        self._unindex([member for member, exists in zip(ids, alive) if not exists], phone, extra)

    def _unindex(self, ids: list[str], phone: str | None = None, extra: list[str] = ()) -> None:
        if not ids:
            return
        # The phone of an expired record is gone with it; phone sets left holding such ids
        # are cleaned when that phone is listed or swept, or expire with their last record.
        # So are the search sets (tail, receipt, reference): when searched, or with time.
        indexes = [
            self._all,
            *(self._status_key(s) for s in STATUSES),
            *extra,
            *(self._reason_key(r) for r in self._redis.smembers(self._reasons)),
        ]
        if phone is not None:
            indexes.append(self._phone_key(phone))
        with self._redis.pipeline(transaction=False) as pipe:
            for index in dict.fromkeys(indexes):  # extra may repeat one of the others
                pipe.zrem(index, *ids)
            pipe.execute()

    def _load(self, ids: list[str], phone: str | None = None, extra: list[str] = ()) -> list[Transaction]:
        """Fetch records in the order of ids, dropping (and unindexing) expired ones."""
        if not ids:
            return []
        found = self._redis.mget([self._tx_key(member) for member in ids])
        self._unindex([member for member, data in zip(ids, found) if data is None], phone, extra)
        return [_decode(data) for data in found if data is not None]


def _milliseconds(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))
