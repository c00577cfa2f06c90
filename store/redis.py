"""The Redis backend: records and values shared by every worker, dyno and machine that reaches it.

Guarantees only what the Redis configuration does: without AOF persistence a restart loses
records, and an eviction policy other than noeviction may drop records, indexes or
idempotency keys early. Records expire `retention` seconds after their last write.

One module past the usual size: its keys, the Lua scripts and the WATCHed transactions that
keep them consistent are one design, read together.
"""

from __future__ import annotations

import builtins
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis

from store.dashboard import Overview, Search, assemble, overview_plan, receipt_key, reference_key, tallied, tally_rows
from store.record import (
    DEFAULT_RETENTION,
    STATUSES,
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

log = logging.getLogger(__name__)

# Records initiated within the last (retention - slack) seconds are certainly alive, as
# long as the application's and Redis's clocks agree within the slack.
_CLOCK_SLACK = 60.0
_SWEEP_BATCH = 20
_IDS_REMEMBERED = 10_000  # the ids of polled payments a store keeps, then starts afresh


# Check and change in one step on the server: the counter never passes its bounds,
# whichever worker or dyno adjusts it.
# KEYS[1] the allowance; ARGV cost, limit, window (ms). Returns {taken 0|1, left, ms until the window ends}.
_TAKE_ALLOWANCE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local cost, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local ttl = redis.call('PTTL', KEYS[1])
if ttl <= 0 then used, ttl = 0, tonumber(ARGV[3]) end
if used + cost > limit then return {0, limit - used, ttl} end
if cost > 0 then redis.call('SET', KEYS[1], used + cost, 'PX', ttl) end
return {1, limit - used - cost, ttl}
"""

_ADJUST_COUNTER = """
local value = tonumber(redis.call('GET', KEYS[1]) or '0') + tonumber(ARGV[1])
if value < 0 or (ARGV[2] ~= '' and value > tonumber(ARGV[2])) then return false end
redis.call('SET', KEYS[1], value)
return value
"""

# KEYS: the owner's hold, the set of holders, then the items' counters; ARGV: the owner,
# then (item, units, capacity) per counter. Returns 0 once held, 1 if the owner already
# holds, or the first item that would pass its capacity (nothing changed).
_HOLD_STOCK = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
for i = 3, #KEYS do
  local at = 3 * (i - 3) + 2
  if tonumber(redis.call('GET', KEYS[i]) or '0') + tonumber(ARGV[at + 1]) > tonumber(ARGV[at + 2]) then
    return ARGV[at]
  end
end
for i = 3, #KEYS do
  local at = 3 * (i - 3) + 2
  redis.call('INCRBY', KEYS[i], ARGV[at + 1])
  redis.call('HSET', KEYS[1], ARGV[at], ARGV[at + 1])
end
redis.call('SADD', KEYS[2], ARGV[1])
return 0
"""

# KEYS: counters; ARGV: units to take off each, never going below 0.
_GIVE_BACK = """
for i = 1, #KEYS do
  local value = tonumber(redis.call('GET', KEYS[i]) or '0') - tonumber(ARGV[i])
  redis.call('SET', KEYS[i], math.max(value, 0))
end
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

        tx:<payment id>       the record as JSON, expiring `retention` s after its last write
        co:<checkout id>      the payment id of the record with that CheckoutRequestID, written
                              and expiring with the record (records made before payment ids
                              are keyed by their checkout id and have none: find falls back)
        idx:all               sorted sets of ids scored by initiated_at, for newest-first
        idx:status:<status>   listing; a record and its index entries change in one MULTI
        idx:phone:<phone>
        idx:tail:<last 4>     sorted sets for search: phones ending so, failed records by
        idx:reason:<reason>   reason (the names in the set idx:reasons), receipts and
        idx:receipt:<RECEIPT> account references (ASCII case folded)
        idx:ref:<reference>
        idx:order:<order id>
        tally:<step>:<index>  hashes of counters per time bucket, for overview; changed in
                              the MULTI that writes the record
        kv:<key>              key/values, SET NX PX for add
        counter:<key>         durable counters (stock:<item>: units held or sold)
        hold:<owner>          hash of the units an owner (a payment) holds, per item, and
        holds                 the set of owners; neither expires

    `update` is optimistic (WATCH/MULTI, retried when another writer got there first), so
    mutate may run more than once; so are release_stock and keep_stock, while hold_stock
    is one Lua script. Index entries whose record has expired are removed
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
        # A client that decodes responses, as from_url's does: its replies are str where the
        # client's types say bytes | str, hence the casts.
        self._redis = client
        self._prefix = prefix
        self._retention = retention
        self._retention_ms = _milliseconds(retention)
        self._clock = clock
        self._all = f"{prefix}idx:all"
        self._reasons = f"{prefix}idx:reasons"
        self._holders = f"{prefix}holds"
        self._polled: dict[str, tuple[str, str | None]] = {}  # id polled -> (payment id, order id)

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
        key = self._tx_key(tx.payment_id)
        data = encode(tx)
        watched = [key, *self._checkout_keys(tx)]

        def save_unless_stored(pipe) -> None:
            if pipe.exists(key):
                raise DuplicateTransaction(tx.payment_id)
            self._check_checkout_free(pipe, tx)
            self._save(pipe, tx, data)

        # WATCH the keys, run the function, EXEC; all again if another writer changed one first.
        self._redis.transaction(save_unless_stored, *watched)
        try:
            self._sweep(tx.phone)
        except redis.RedisError as exc:  # housekeeping must not fail a saved payment
            log.warning("redis store: index sweep failed: %s", exc)

    def get(self, payment_id: str) -> Transaction | None:
        data = self._redis.get(self._tx_key(payment_id))
        return decode(data) if data is not None else None

    def find(self, checkout_request_id: str) -> Transaction | None:
        payment_id = cast("str | None", self._redis.get(self._checkout_key(checkout_request_id)))
        tx = self.get(payment_id if payment_id is not None else checkout_request_id)
        return tx if tx is not None and tx.checkout_request_id == checkout_request_id else None

    def get_with_order(
        self, payment_id: str | None = None, *, checkout_request_id: str | None = None
    ) -> tuple[Transaction | None, dict | None]:
        # A record's payment, checkout and order ids are set once, so a poll after a process's
        # first knows both keys and reads the record and the marker in one round trip (MGET).
        named = payment_id if payment_id is not None else checkout_request_id
        known = self._polled.get(named) if named is not None else None
        if known is not None:
            tx, paid = self._record_and_marker(*known)
            if tx is not None and (payment_id is not None or tx.checkout_request_id == checkout_request_id):
                return tx, paid
        if payment_id is not None:
            tx = self.get(payment_id)
        else:
            tx = self.find(checkout_request_id) if checkout_request_id is not None else None
        if tx is None:
            return None, None
        if len(self._polled) >= _IDS_REMEMBERED:
            self._polled.clear()
        self._polled[cast(str, named)] = (tx.payment_id, tx.order_id)
        return tx, self.get_value(order_key(tx.order_id)) if tx.order_id is not None else None

    def _record_and_marker(self, payment_id: str, order_id: str | None) -> tuple[Transaction | None, dict | None]:
        if order_id is None:
            return self.get(payment_id), None
        data, paid = self._redis.mget(self._tx_key(payment_id), self._kv_key(order_key(order_id)))
        return (decode(data) if data is not None else None), (json.loads(paid) if paid is not None else None)

    def update(self, payment_id: str, mutate: Callable[[Transaction], R]) -> tuple[Transaction | None, R | None]:
        key = self._tx_key(payment_id)

        def load_mutate_save(pipe) -> tuple[Transaction | None, R | None]:
            data = pipe.get(key)
            if data is None:
                return None, None
            tx = decode(data)
            indexed, counted = self._index_keys(tx), tallied(tx)
            checkout_id = tx.checkout_request_id
            result = apply(tx, mutate)
            if checkout_id is None and tx.checkout_request_id is not None:
                pipe.watch(*self._checkout_keys(tx))
                self._check_checkout_free(pipe, tx)
            self._save(pipe, tx, encode(tx), indexed, counted)
            return tx, result

        # With value_from_callable, transaction() returns what the function returns, which
        # its types (a function returning None; the EXEC replies back) do not allow for.
        outcome = self._redis.transaction(load_mutate_save, key, value_from_callable=True)  # type: ignore[arg-type]
        return cast("tuple[Transaction | None, R | None]", outcome)

    def list(self, status: str | None = None, phone: str | None = None, limit: int = 20, offset: int = 0) -> Page:
        check_page(limit, offset)
        if phone is not None and status is not None:
            # One phone's records are few: read them all and filter by status here.
            ids = cast("list[str]", self._redis.zrevrange(self._phone_key(phone), 0, -1))
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
    ) -> Page:
        check_page(limit, offset)
        criteria = Search.of(text, status, reason, since, until)
        if criteria.impossible:
            return [], 0
        if criteria.text is not None:
            return self._search_text(criteria.text, criteria, limit, offset)
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
    ) -> Page:
        """One page of the records a sorted set lists, scored from low to high, newest first."""
        maybe_expired = cast("list[str]", self._redis.zrangebyscore(index, "-inf", self._maybe_expired()))
        self._forget_expired(maybe_expired, phone, extra=[index])
        with self._redis.pipeline() as pipe:  # MULTI: the page agrees with the total
            pipe.zcount(index, low, high)
            if limit:
                pipe.zrevrangebyscore(index, high, low, start=offset, num=limit)
            total, *page = pipe.execute()
        return self._load(page[0] if page else [], phone, extra=[index]), total

    def _search_text(self, text: str, criteria: Search, limit: int, offset: int) -> Page:
        """Load the few records the text can name, then filter, sort and page them here."""
        sets = [self._receipt_key(criteria.receipt), self._reference_key(criteria.reference)]
        digits = criteria.digits
        if digits is not None and len(digits) >= 12:  # a whole number: its own set
            sets.append(self._phone_key(digits))
        elif digits is not None and len(digits) >= _TAIL:
            sets.append(self._tail_key(digits))
        elif digits is not None:
            sets += [self._tail_key(f"{n}{digits}") for n in range(10 ** (_TAIL - len(digits)))]
        sets.append(self._order_key(text))
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.exists(self._tx_key(text))
            pipe.get(self._checkout_key(text))
            for index in sets:
                pipe.zrange(index, 0, -1)
            exists, by_checkout, *members = pipe.execute()
        named = ([text] if exists else []) + ([by_checkout] if by_checkout else [])
        ids = list(dict.fromkeys(named + [member for found in members for member in found]))
        matches = sorted(
            (tx for tx in self._load(ids, extra=sets) if criteria.admits_tx(tx)),
            key=lambda tx: (tx.initiated_at, tx.payment_id),
            reverse=True,
        )
        return matches[offset : offset + limit], len(matches)

    def overview(self, since: float, until: float, step: float) -> Overview:
        resolution, plan = overview_plan(since, until, step)
        indexes = [index for _, group in plan for index in group]
        with self._redis.pipeline(transaction=False) as pipe:
            for index in indexes:
                pipe.hgetall(self._tally_key(resolution, index))
            found = {
                index: {name: int(value) for name, value in counts.items()}
                for index, counts in zip(indexes, pipe.execute(), strict=True)
                if counts
            }
        return assemble(since, until, step, plan, found)

    def pending_before(self, cutoff: float) -> builtins.list[Transaction]:
        return self._load(
            cast("list[str]", self._redis.zrangebyscore(self._status_key("pending"), "-inf", f"({cutoff!r}"))
        )

    def add(self, key: str, value: dict, ttl: float) -> bool:
        check_ttl(ttl)
        return bool(self._redis.set(self._kv_key(key), json.dumps(value), nx=True, px=_milliseconds(ttl)))

    def get_value(self, key: str) -> dict | None:
        data = self._redis.get(self._kv_key(key))
        return json.loads(data) if data is not None else None

    def set_value(self, key: str, value: dict, ttl: float) -> None:
        check_ttl(ttl)
        self._redis.set(self._kv_key(key), json.dumps(value), px=_milliseconds(ttl))

    def delete(self, key: str) -> None:
        self._redis.delete(self._kv_key(key))

    def take_allowance(self, key: str, cost: int, limit: int, window: float) -> Allowance:
        check_allowance(cost, limit, window)
        now = self._clock()
        taken, left, ttl = self._redis.eval(
            _TAKE_ALLOWANCE, 1, f"{self._prefix}allowance:{key}", cost, limit, _milliseconds(window)
        )
        return Allowance(bool(taken), int(left), now + int(ttl) / 1000)

    def adjust_counter(self, key: str, delta: int, maximum: int | None = None) -> int | None:
        value = self._redis.eval(
            _ADJUST_COUNTER, 1, self._counter_key(key), int(delta), "" if maximum is None else int(maximum)
        )
        return None if value is None else int(value)

    def get_counter(self, key: str) -> int:
        return int(self._redis.get(self._counter_key(key)) or 0)

    def hold_stock(self, owner: str, units: dict[str, int], capacity: dict[str, int]) -> str | None:
        check_hold(owner, units, capacity)
        if not units:
            return None
        counters = [self._counter_key(stock_key(item)) for item in units]
        args: list = [owner]
        for item, count in units.items():
            args += [item, count, capacity[item]]
        answer = self._redis.eval(
            _HOLD_STOCK, 2 + len(counters), self._hold_key(owner), self._holders, *counters, *args
        )
        if isinstance(answer, str):
            return answer
        if answer == 1:
            raise ValueError(f"{owner} already holds stock")
        return None

    def release_stock(self, owner: str) -> dict[str, int]:
        return self._end_hold(owner, give_back=True)

    def keep_stock(self, owner: str) -> dict[str, int]:
        return self._end_hold(owner, give_back=False)

    def stock_holders(self) -> builtins.list[str]:
        return sorted(cast("set[str]", self._redis.smembers(self._holders)))

    def close(self) -> None:
        self._redis.close()

    def _end_hold(self, owner: str, *, give_back: bool) -> dict[str, int]:
        """Forget owner's hold, lowering the counters if give_back; exactly once (WATCH)."""
        hold = self._hold_key(owner)

        def end(pipe) -> dict[str, int]:
            held = {item: int(units) for item, units in pipe.hgetall(hold).items()}
            pipe.multi()
            if give_back and held:
                counters = [self._counter_key(stock_key(item)) for item in held]
                pipe.eval(_GIVE_BACK, len(counters), *counters, *held.values())
            pipe.delete(hold)
            pipe.srem(self._holders, owner)
            return held

        # WATCH hold: of two that race, the one whose hold changed under it runs again and
        # finds {}. (transaction's types do not allow for value_from_callable; see update.)
        held = self._redis.transaction(end, hold, value_from_callable=True)  # type: ignore[arg-type]
        return cast("dict[str, int]", held)

    def _hold_key(self, owner: str) -> str:
        return f"{self._prefix}hold:{owner}"

    def _tx_key(self, payment_id: str) -> str:
        return f"{self._prefix}tx:{payment_id}"

    def _checkout_key(self, checkout_request_id: str) -> str:
        return f"{self._prefix}co:{checkout_request_id}"

    def _order_key(self, order_id: str) -> str:
        return f"{self._prefix}idx:order:{order_id}"

    def _checkout_keys(self, tx: Transaction) -> builtins.list[str]:
        """The keys that say whether tx's CheckoutRequestID is taken: its index, and the key
        an older record with it as payment id would have."""
        checkout_id = tx.checkout_request_id
        if checkout_id is None:
            return []
        return [self._checkout_key(checkout_id), self._tx_key(checkout_id)]

    def _check_checkout_free(self, pipe, tx: Transaction) -> None:
        """Raise DuplicateTransaction if another record has tx's CheckoutRequestID (_checkout_keys WATCHed)."""
        checkout_id = tx.checkout_request_id
        if checkout_id is None:
            return
        holder = pipe.get(self._checkout_key(checkout_id))
        if holder is None and checkout_id != tx.payment_id and pipe.exists(self._tx_key(checkout_id)):
            holder = checkout_id  # a record from before payment ids, keyed by this checkout id
        if holder is not None and holder != tx.payment_id:
            raise DuplicateTransaction(checkout_id)

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

    def _index_keys(self, tx: Transaction) -> builtins.list[str]:
        """The sorted sets that list tx."""
        keys = [self._all, self._status_key(tx.status), self._phone_key(tx.phone)]
        if len(tx.phone) >= _TAIL:
            keys.append(self._tail_key(tx.phone))
        if tx.status == "failed" and tx.reason:
            keys.append(self._reason_key(tx.reason))
        if receipt_key(tx):
            keys.append(self._receipt_key(receipt_key(tx)))
        if reference_key(tx):
            keys.append(self._reference_key(reference_key(tx)))
        if tx.order_id:
            keys.append(self._order_key(tx.order_id))
        return keys

    def _save(
        self,
        pipe,
        tx: Transaction,
        data: str,
        indexed: builtins.list[str] | None = None,
        counted: tuple[float, dict[str, int]] | None = None,
    ) -> None:
        """Start the MULTI and queue the record with its index and counter changes.

        indexed and counted are what the record was listed in and counted as before this
        write (None for a new record).
        """
        pipe.multi()
        pipe.set(self._tx_key(tx.payment_id), data, px=self._retention_ms)
        if tx.checkout_request_id is not None:
            pipe.set(self._checkout_key(tx.checkout_request_id), tx.payment_id, px=self._retention_ms)
        self._index(pipe, tx, indexed)
        self._count(pipe, tally_rows(counted, tallied(tx)))

    def _index(self, pipe, tx: Transaction, before: builtins.list[str] | None = None) -> None:
        """Queue the index writes for tx (moving it out of the sets that listed it before)."""
        member = tx.payment_id
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

    def _count(self, pipe, rows: builtins.list[tuple[int, int, str, int]]) -> None:
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

    def _forget_expired(self, ids: builtins.list[str], phone: str | None = None, extra: Sequence[str] = ()) -> None:
        """Remove from the indexes those of ids whose record no longer exists."""
        if not ids:
            return
        with self._redis.pipeline(transaction=False) as pipe:
            for member in ids:
                pipe.exists(self._tx_key(member))
            alive = pipe.execute()
        self._unindex([member for member, exists in zip(ids, alive, strict=True) if not exists], phone, extra)

    def _unindex(self, ids: builtins.list[str], phone: str | None = None, extra: Sequence[str] = ()) -> None:
        if not ids:
            return
        # The phone of an expired record is gone with it; phone sets left holding such ids
        # are cleaned when that phone is listed or swept, or expire with their last record.
        # So are the search sets (tail, receipt, reference): when searched, or with time.
        indexes = [
            self._all,
            *(self._status_key(s) for s in STATUSES),
            *extra,
            *(self._reason_key(r) for r in cast("set[str]", self._redis.smembers(self._reasons))),
        ]
        if phone is not None:
            indexes.append(self._phone_key(phone))
        with self._redis.pipeline(transaction=False) as pipe:
            for index in dict.fromkeys(indexes):  # extra may repeat one of the others
                pipe.zrem(index, *ids)
            pipe.execute()

    def _load(
        self, ids: builtins.list[str], phone: str | None = None, extra: Sequence[str] = ()
    ) -> builtins.list[Transaction]:
        """Fetch records in the order of ids, dropping (and unindexing) expired ones."""
        if not ids:
            return []
        found = self._redis.mget([self._tx_key(member) for member in ids])
        self._unindex([member for member, data in zip(ids, found, strict=True) if data is None], phone, extra)
        return [decode(data) for data in found if data is not None]


def _milliseconds(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))
