"""The memory backend: records and values in one process's memory, behind one lock.

Does not guarantee anything beyond one process: each worker process would have its own
store, and a restart forgets everything. For development, tests and single-process demos.
"""

from __future__ import annotations

import bisect
import builtins
import heapq
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from store.dashboard import (
    PHONE_SUFFIX_MIN,
    Overview,
    Search,
    assemble,
    overview_plan,
    receipt_key,
    reference_key,
    tallied,
    tally_rows,
)
from store.record import (
    DEFAULT_RETENTION,
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
    order_key,
    stock_key,
)


class _Record(NamedTuple):
    expires_at: float
    status: str
    phone: str
    initiated_at: float
    data: str
    reason: str | None = None  # the searched fields (see Search.admits)
    receipt: str = ""
    reference: str = ""
    checkout: str | None = None
    order: str | None = None


def _words(record: _Record) -> list[str]:
    """What a text search can find a memory record by (see Search.admits)."""
    words = [f"t:{record.phone[-PHONE_SUFFIX_MIN:]}"]
    if record.receipt:
        words.append(f"r:{record.receipt}")
    if record.reference:
        words.append(f"f:{record.reference}")
    if record.order:
        words.append(f"o:{record.order}")
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

    Does not guarantee anything beyond one process: each worker process would have its
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
        self._words: dict[str, set[str]] = {}  # receipt, reference, order id, phone tail -> ids
        self._checkouts: dict[str, str] = {}  # CheckoutRequestID -> payment id
        # "all", "status:<status>", "reason:<reason>" -> sorted [(initiated_at, id)]
        self._sorted: dict[str, list[tuple[float, str]]] = {}
        self._counters: dict[str, int] = {}
        self._holds: dict[str, dict[str, int]] = {}  # owner -> {item: units}

    def create(self, tx: Transaction) -> None:
        data = encode(tx)
        with self._lock:
            now = self._expire()
            if self._live(tx.payment_id, now) is not None:
                raise DuplicateTransaction(tx.payment_id)
            self._check_checkout_free(tx, now)
            self._put(tx, data, now)
            self._count(tally_rows(None, tallied(tx)), now)

    def get(self, payment_id: str) -> Transaction | None:
        with self._lock:
            record = self._live(payment_id, self._expire())
        return decode(record.data) if record else None

    def find(self, checkout_request_id: str) -> Transaction | None:
        with self._lock:
            now = self._expire()
            payment_id = self._checkouts.get(checkout_request_id)
            record = self._live(payment_id, now) if payment_id is not None else None
        return decode(record.data) if record else None

    def get_with_order(
        self, payment_id: str | None = None, *, checkout_request_id: str | None = None
    ) -> tuple[Transaction | None, dict | None]:
        with self._lock:
            now = self._expire()
            if payment_id is None and checkout_request_id is not None:
                payment_id = self._checkouts.get(checkout_request_id)
            record = self._live(payment_id, now) if payment_id is not None else None
            if record is None:
                return None, None
            tx = decode(record.data)
            paid = self._values.get(order_key(tx.order_id)) if tx.order_id is not None else None
        return tx, json.loads(paid[1]) if paid is not None and paid[0] > now else None

    def update(self, payment_id: str, mutate: Callable[[Transaction], R]) -> tuple[Transaction | None, R | None]:
        with self._lock:
            now = self._expire()
            record = self._live(payment_id, now)
            if record is None:
                return None, None
            tx = decode(record.data)
            before = tallied(tx)
            result = apply(tx, mutate)
            if record.checkout is None:
                self._check_checkout_free(tx, now)
            self._put(tx, encode(tx), now)
            self._count(tally_rows(before, tallied(tx)), now)
        return tx, result

    def list(self, status: str | None = None, phone: str | None = None, limit: int = 20, offset: int = 0) -> Page:
        check_page(limit, offset)
        with self._lock:
            now = self._expire()
            matches = [
                (r.initiated_at, key, r.data)
                for key, r in self._records.items()
                if r.expires_at > now and (status is None or r.status == status) and (phone is None or r.phone == phone)
            ]
        matches.sort(reverse=True)
        return [decode(data) for _, _, data in matches[offset : offset + limit]], len(matches)

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
        if criteria.text is None:
            return self._search_sorted(criteria, limit, offset)
        with self._lock:
            now = self._expire()
            words, records = self._words, self._records
            named = set(words.get(f"r:{criteria.receipt}", ()))  # only what the text can name
            named |= words.get(f"f:{criteria.reference}", set())
            if criteria.digits is not None:
                named |= words.get(f"t:{criteria.digits[-PHONE_SUFFIX_MIN:]}", set())
            named |= words.get(f"o:{criteria.text}", set())
            if criteria.text in records:
                named.add(criteria.text)
            if criteria.text in self._checkouts:
                named.add(self._checkouts[criteria.text])
            matches = [
                (r.initiated_at, key, r.data)
                for key, r in ((key, records[key]) for key in named)
                if r.expires_at > now
                and criteria.admits(
                    (key, r.checkout, r.order), r.status, r.reason, r.phone, r.receipt, r.reference, r.initiated_at
                )
            ]
        matches.sort(reverse=True)
        return [decode(data) for _, _, data in matches[offset : offset + limit]], len(matches)

    def _search_sorted(self, criteria: Search, limit: int, offset: int) -> Page:
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
        return [decode(data) for data in found], max(0, high - low)

    def overview(self, since: float, until: float, step: float) -> Overview:
        resolution, plan = overview_plan(since, until, step)
        found = {}
        with self._lock:
            now = self._expire()
            for _, indexes in plan:
                for index in indexes:
                    entry = self._tallies.get((resolution, index))
                    if entry is not None and entry[0] > now:
                        found[index] = dict(entry[1])
        return assemble(since, until, step, plan, found)

    def pending_before(self, cutoff: float) -> builtins.list[Transaction]:
        with self._lock:
            now = self._expire()
            matches = [
                (r.initiated_at, key, r.data)
                for key, r in self._records.items()
                if r.expires_at > now and r.status == "pending" and r.initiated_at < cutoff
            ]
        matches.sort()
        return [decode(data) for _, _, data in matches]

    def add(self, key: str, value: dict, ttl: float) -> bool:
        check_ttl(ttl)
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
        check_ttl(ttl)
        data = json.dumps(value)
        with self._lock:
            self._set(key, data, self._expire() + ttl)

    def delete(self, key: str) -> None:
        with self._lock:
            self._expire()
            self._values.pop(key, None)

    def take_allowance(self, key: str, cost: int, limit: int, window: float) -> Allowance:
        check_allowance(cost, limit, window)
        key = f"allowance:{key}"
        with self._lock:
            now = self._expire()
            current = self._values.get(key)
            used, ends = (
                (int(current[1]), current[0]) if current is not None and current[0] > now else (0, now + window)
            )
            taken = used + cost <= limit
            if taken and cost:
                used += cost
                self._set(key, str(used), ends)
        return Allowance(taken, limit - used, ends)

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

    def hold_stock(self, owner: str, units: dict[str, int], capacity: dict[str, int]) -> str | None:
        check_hold(owner, units, capacity)
        if not units:
            return None
        with self._lock:
            if owner in self._holds:
                raise ValueError(f"{owner} already holds stock")
            for item, count in units.items():
                if self._counters.get(stock_key(item), 0) + count > capacity[item]:
                    return item
            for item, count in units.items():
                self._counters[stock_key(item)] = self._counters.get(stock_key(item), 0) + count
            self._holds[owner] = dict(units)
        return None

    def release_stock(self, owner: str) -> dict[str, int]:
        with self._lock:
            held = self._holds.pop(owner, {})
            for item, count in held.items():
                self._counters[stock_key(item)] = max(0, self._counters.get(stock_key(item), 0) - count)
        return held

    def keep_stock(self, owner: str) -> dict[str, int]:
        with self._lock:
            return self._holds.pop(owner, {})

    def stock_holders(self) -> builtins.list[str]:
        with self._lock:
            return sorted(self._holds)

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

    def _take_expired_records(self, now: float) -> builtins.list[tuple[str, _Record]]:
        """Remove the expired records from the front of the expiry order and return them."""
        records, expired = self._records, []
        while records and next(iter(records.values())).expires_at <= now:
            expired.append(records.popitem(last=False))
        return expired

    def _live(self, payment_id: str, now: float) -> _Record | None:
        record = self._records.get(payment_id)
        if record is not None and record.expires_at <= now:
            # Only reachable if the clock stepped back and broke the front-first order.
            del self._records[payment_id]
            self._forget([(payment_id, record)])
            return None
        return record

    def _check_checkout_free(self, tx: Transaction, now: float) -> None:
        """Raise DuplicateTransaction if another live record has tx's CheckoutRequestID."""
        checkout_id = tx.checkout_request_id
        holder = self._checkouts.get(checkout_id) if checkout_id is not None else None
        if holder is not None and holder != tx.payment_id and self._live(holder, now) is not None:
            raise DuplicateTransaction(checkout_id)

    def _put(self, tx: Transaction, data: str, now: float) -> None:
        key = tx.payment_id
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
            receipt_key(tx),
            reference_key(tx),
            tx.checkout_request_id,
            tx.order_id,
        )
        self._records[key] = record
        if record.checkout is not None:
            self._checkouts[record.checkout] = key
        self._records.move_to_end(key)
        for word in _words(record):
            self._words.setdefault(word, set()).add(key)
        for name in _sorted_lists(record):
            bisect.insort(self._sorted.setdefault(name, []), (record.initiated_at, key))

    def _forget(self, records: builtins.list[tuple[str, _Record]]) -> None:
        """Take records out of the search indexes, changing each sorted list once."""
        leaving: dict[str, list[tuple[float, str]]] = {}
        for key, record in records:
            if record.checkout is not None and self._checkouts.get(record.checkout) == key:
                del self._checkouts[record.checkout]
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

    def _count(self, rows: builtins.list[tuple[int, int, str, int]], now: float) -> None:
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
