"""The dashboard's reads, shared by every backend: counters per time bucket, and search.

Every write adjusts counters (`tally`) in the buckets of the time its record was initiated
(5 minutes, hours, Nairobi days: TALLY_STEPS), so `overview` adds up a window's buckets
without reading a record: `tally_rows` turns a record's before and after into counter
changes, `overview_plan` checks a window and names the buckets to read, `assemble` adds
what was read into an `Overview` of `Tally`s. `Search` checks a search's filters once and
holds its text in each form a backend compares it in (`receipt_key`, `reference_key`).
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from typing import NamedTuple

from store.record import STATUSES, Transaction

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
        for bound, count in zip(bounds, counts, strict=True):
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


def tallied(tx: Transaction) -> tuple[float, dict[str, int]]:
    """Return when the record was initiated and its counters: what tally_rows compares."""
    return tx.initiated_at, tally(tx)


def _tally_buckets(at: float) -> list[tuple[int, int]]:
    """The (step, index) of each counter bucket a record initiated at `at` counts in."""
    return [(step, int((at + TALLY_UTC_OFFSET) // step)) for step in TALLY_STEPS]


def tally_rows(before: tuple[float, dict] | None, after: tuple[float, dict]) -> list[tuple[int, int, str, int]]:
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


def overview_plan(since: float, until: float, step: float) -> tuple[int, list[tuple[float, range]]]:
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


def assemble(
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


def record_ids(tx: Transaction) -> tuple[str | None, ...]:
    """The ids a search text matches exactly: payment id, CheckoutRequestID, order id."""
    return (tx.payment_id, tx.checkout_request_id, tx.order_id)


def receipt_key(tx: Transaction) -> str:
    """Return the receipt number as searched: ASCII upper case, "" when there is none."""
    return str(tx.mpesa_receipt_number or "").translate(_ASCII_UPPER)


def reference_key(tx: Transaction) -> str:
    """Return the account reference as searched: ASCII lower case."""
    return str(tx.account_reference or "").translate(_ASCII_LOWER)


class Search(NamedTuple):
    """A search's filters, checked, with the text in each form it is compared in."""

    text: str | None
    receipt: str  # the text as receipt_key and reference_key fold theirs ("" without text)
    reference: str
    digits: str | None  # the text, when it can be a phone's last digits
    status: str | None
    reason: str | None
    since: float | None
    until: float | None

    @classmethod
    def of(
        cls, text: str | None, status: str | None, reason: str | None, since: float | None, until: float | None
    ) -> Search:
        """Check a search's arguments and return its criteria; raise ValueError for an unknown status."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
        text = str(text).strip() if text is not None else ""
        if not text:
            return cls(
                None,
                "",
                "",
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
        """True when no record can match: a reason asked of records that are not failed."""
        return self.reason is not None and self.status not in (None, "failed")

    def admits(
        self,
        ids: tuple[str | None, ...],
        status: str,
        reason: str | None,
        phone: str,
        receipt: str,
        reference: str,
        initiated_at: float,
    ) -> bool:
        """True when a record with these fields matches every filter and, if any, the text.

        ids are the record's payment id, CheckoutRequestID and order id (each may be None).
        """
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
            self.text in ids
            or (bool(receipt) and receipt == self.receipt)
            or (bool(reference) and reference == self.reference)
            or (self.digits is not None and phone.endswith(self.digits))
        )

    def admits_tx(self, tx: Transaction) -> bool:
        """True when the record matches every filter and, if any, the text."""
        return self.admits(
            record_ids(tx),
            tx.status,
            tx.reason,
            tx.phone,
            receipt_key(tx),
            reference_key(tx),
            tx.initiated_at,
        )
