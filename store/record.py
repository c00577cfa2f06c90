"""The record, the interface every backend offers, and the codec they share.

A Transaction travels as JSON text in every backend (`encode`, `decode`), so a stored
record is never aliased by the caller's object, and a value JSON cannot hold, or a status
outside STATUSES, fails the same way everywhere: before anything is saved. `apply` runs an
update's mutate and refuses a change of id; `check_ttl` and `check_page` are the argument
checks every backend makes first.

A record is keyed by its payment id, the server's own, made before the push is sent. Daraja's
CheckoutRequestID arrives with its answer to the push (or with the callback, when that answer
was lost), is set once and is indexed for `find`. Records written before payment ids existed
read back with their CheckoutRequestID as payment id, so they keep their key.
"""

from __future__ import annotations

import builtins
import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, NamedTuple, Protocol, TypeAlias, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from store.dashboard import Overview

R = TypeVar("R")
Clock = Callable[[], float]

STATUSES = ("pending", "completed", "failed")
DEFAULT_RETENTION = 86400.0
ORDER_KEY_PREFIX = "order:"  # order_key(): the backends' queries join a record to its order's marker by it


@dataclass
class Transaction:
    """One STK push and what became of it; snake_case here, camelCase only at the API edge."""

    payment_id: str  # ours, the record's key: "pay_" + 24 hex digits (older records: their checkout id)
    # Daraja's ids: unknown until it accepts the push; set once, never changed after.
    checkout_request_id: str | None = field(default=None, kw_only=True)
    merchant_request_id: str | None = field(default=None, kw_only=True)
    order_id: str | None = field(default=None, kw_only=True)  # the order this attempt pays
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
    settled_by: str | None = None  # callback | query | timeout | push
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
        values = {k: copy.deepcopy(v) for k, v in data.items() if k in known}
        values.setdefault("payment_id", values.get("checkout_request_id"))
        return cls(**values)


# One page of records, and how many match in all.
Page: TypeAlias = tuple[list[Transaction], int]


class Allowance(NamedTuple):
    """What take_allowance did: whether the units were taken, how many are left in the
    window after it, and when the window ends (epoch seconds, the store's clock)."""

    taken: bool
    left: int
    resets_at: float


class DuplicateTransaction(Exception):
    """A record with this payment id, or another record with this CheckoutRequestID, is stored."""


@runtime_checkable
class Store(Protocol):
    """Where transactions and short-lived key/values live; see the store package's docstring."""

    kind: str  # "memory" | "sqlite" | "redis" | "postgres"

    def create(self, tx: Transaction) -> None:
        """Save a new record; raise DuplicateTransaction if its payment id, or its
        CheckoutRequestID, is already stored."""

    def get(self, payment_id: str) -> Transaction | None:
        """Return a copy of the record, or None."""

    def find(self, checkout_request_id: str) -> Transaction | None:
        """Return a copy of the record with this CheckoutRequestID, or None."""

    def get_with_order(
        self, payment_id: str | None = None, *, checkout_request_id: str | None = None
    ) -> tuple[Transaction | None, dict | None]:
        """Return a copy of the record with this payment id (else this CheckoutRequestID) and
        the live value under order_key(its order_id), its order's paid marker: (None, None)
        when there is no such record. What a status poll reads, in one query or one Redis
        round trip."""

    def update(self, payment_id: str, mutate: Callable[[Transaction], R]) -> tuple[Transaction | None, R | None]:
        """Atomically load, mutate(tx) in place, save; return (tx, mutate's result).

        Returns (None, None) when the id is unknown. No update is lost between threads or
        (SQLite, Redis, PostgreSQL) processes. mutate may run more than once, so it must only touch tx;
        if it raises, nothing is saved and the exception propagates. It may set the
        CheckoutRequestID once (DuplicateTransaction if another record has it), never
        change it or the payment id (ValueError).
        """

    def list(self, status: str | None = None, phone: str | None = None, limit: int = 20, offset: int = 0) -> Page:
        """Return one page of records, newest initiated_at first, and how many match."""

    def pending_before(self, cutoff: float) -> builtins.list[Transaction]:
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
    ) -> Page:
        """Return one page of the records matching every filter, newest first, and the count.

        text matches a payment id, CheckoutRequestID or order id exactly, a receipt number
        or an account reference ignoring ASCII case, or, 3 digits or more, the end of the
        phone number. reason matches failed records only. since and until bound
        initiated_at: [since, until).
        """

    def overview(self, since: float, until: float, step: float) -> Overview:
        """Add up the counters of the payments initiated in [since, until), per step and in all.

        since and step fall on 5-minute boundaries (hours and days: Nairobi's) and
        until - since is a multiple of step. Memory and Redis forget a bucket `retention`
        s after its last write, as they forget records; SQLite and PostgreSQL keep every bucket.
        """

    def add(self, key: str, value: dict, ttl: float) -> bool:
        """Store value under key for ttl seconds unless a live value is there; True if stored."""

    def get_value(self, key: str) -> dict | None:
        """Return the live value under key, or None."""

    def set_value(self, key: str, value: dict, ttl: float) -> None:
        """Store value under key for ttl seconds, replacing any value."""

    def delete(self, key: str) -> None:
        """Remove the value under key, if any."""

    def take_allowance(self, key: str, cost: int, limit: int, window: float) -> Allowance:
        """Take cost units of key's allowance of limit units per window seconds, all or none, atomically.

        A window starts with the first take after the previous one ended (a fixed window,
        as rate limits count). Fewer than cost units left: nothing is taken. A cost of 0
        takes nothing and reports what is left. Allowance keys are a space of their own.
        """

    def adjust_counter(self, key: str, delta: int, maximum: int | None = None) -> int | None:
        """Atomically add delta to a durable integer counter (missing counts as 0).

        Returns the new value, or None (and changes nothing) when it would fall below 0
        or rise above maximum. Counters never expire (stock held and sold).
        """

    def get_counter(self, key: str) -> int:
        """Return the counter's value (0 when it was never set)."""

    def hold_stock(self, owner: str, units: dict[str, int], capacity: dict[str, int]) -> str | None:
        """Hold units of items for owner (a payment), all or nothing, in one atomic step.

        Raises the counter `stock:<item>` by units[item] for every item, and records the
        hold under owner, unless one of them would pass capacity[item]: then returns the
        first such item (in units' order) and changes nothing. Returns None once held.
        Holding nothing records nothing. An owner holds once: a second hold while the first
        lasts raises ValueError. Holds never expire; they end by release_stock or keep_stock.
        """

    def release_stock(self, owner: str) -> dict[str, int]:
        """End owner's hold giving its units back: lower the counters, forget the hold.

        Exactly once, whoever races: returns the units released, {} when owner held nothing
        (never held, or already released or kept). A counter never falls below 0.
        """

    def keep_stock(self, owner: str) -> dict[str, int]:
        """End owner's hold keeping its units (sold): forget the hold, leave the counters.

        Exactly once, whoever races: returns the units kept, {} when owner held nothing.
        """

    def stock_holders(self) -> builtins.list[str]:
        """Return the owners that hold stock, sorted."""

    def close(self) -> None:
        """Release connections."""


_FIELDS = tuple(f.name for f in fields(Transaction))


def encode(tx: Transaction) -> str:
    """The record as stored: the text json.dumps(tx.to_dict()) gives, without its deep copy."""
    if tx.status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {tx.status!r}")
    return json.dumps({name: getattr(tx, name) for name in _FIELDS}, ensure_ascii=False, separators=(",", ":"))


def decode(text: str | bytes) -> Transaction:
    """A stored record; unlike from_dict it copies nothing, as json.loads made it all afresh.

    A record stored before payment ids existed gets its CheckoutRequestID as payment id.
    """
    data = json.loads(text)
    values = {name: data[name] for name in _FIELDS if name in data}
    values.setdefault("payment_id", data.get("checkout_request_id"))
    return Transaction(**values)


def apply(tx: Transaction, mutate: Callable[[Transaction], R]) -> R:
    """Run mutate(tx) and return its result; raise ValueError if it changed an id it must not.

    The payment id never changes; the CheckoutRequestID may be set once, then never changed.
    """
    payment_id, checkout_id = tx.payment_id, tx.checkout_request_id
    result = mutate(tx)
    if tx.payment_id != payment_id:
        raise ValueError("mutate must not change payment_id")
    if checkout_id is not None and tx.checkout_request_id != checkout_id:
        raise ValueError("mutate must not change a checkout_request_id once set")
    return result


def check_ttl(ttl: float) -> None:
    """Raise ValueError unless ttl is a positive number of seconds."""
    if not ttl > 0:
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")


def check_allowance(cost: int, limit: int, window: float) -> None:
    """Raise ValueError unless cost and limit are whole numbers (cost >= 0, limit >= 1) and window > 0."""
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
        raise ValueError(f"cost must be a whole number, not {cost!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive whole number, not {limit!r}")
    check_ttl(window)


def check_hold(owner: str, units: dict[str, int], capacity: dict[str, int]) -> None:
    """Raise ValueError unless owner is named, units are positive and each has a capacity."""
    if not isinstance(owner, str) or not owner:
        raise ValueError("a stock hold needs an owner")
    for item, count in units.items():
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            raise ValueError(f"units of {item!r} must be a positive whole number, not {count!r}")
        limit = capacity.get(item)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"capacity of {item!r} must be a whole number, not {limit!r}")


def order_key(order_id: str) -> str:
    """The key of an order's paid marker, added when one of the order's attempts completes."""
    return ORDER_KEY_PREFIX + order_id


def stock_key(item: str) -> str:
    """The durable counter of an item's units held or sold."""
    return f"stock:{item}"


def check_page(limit: int, offset: int) -> None:
    """Raise ValueError if a page's limit or offset is negative."""
    if limit < 0 or offset < 0:
        raise ValueError("limit and offset must not be negative")
