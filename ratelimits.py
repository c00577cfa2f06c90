"""Rate limits: how many pushes and polls one client may make, counted in the store.

The limits are settings in the `limits` library's notation ("10/minute;100/hour": every
window must have room). Each window is a fixed window counted by the store's atomic
`take_allowance`, so the counts are shared by every worker that shares the store, and
survive a restart on a durable one:

- Pushes (RATE_LIMIT_PUSH_PER_IP, per client address; RATE_LIMIT_PUSH_PER_PHONE, per
  keyed hash of the phone) are exact. Before a push every window is looked at (a take of
  nothing) and the push refused when one is spent; a push that sent a prompt then takes
  one unit from each. Two pushes racing for the last unit may both pass the look.
- Polls (RATE_LIMIT_STATUS_PER_IP, per route and client address) come many a second, so
  each worker takes a share of a window's allowance from the store at once (1/20 of the
  limit, at least one unit) and counts polls against it in memory, going back to the
  store when the share is used up. A client is never allowed more than the limit in a
  window; with W workers it is allowed at least limit - (W - 1) x share before a 429,
  since the other workers may hold unused shares. With one worker the count is exact.

A refusal is a 429 with Retry-After (seconds until the window ends) and X-RateLimit-Limit,
-Remaining and -Reset (epoch seconds) for the tightest window; a push's answer carries the
X-RateLimit headers too, an allowed poll's does not (its Remaining would be one worker's
estimate).
"""

from __future__ import annotations

import math
import threading
import time
from typing import NamedTuple

from limits import RateLimitItem, parse_many

from store import Store

SHARE_OF_LIMIT = 20  # a worker takes 1/20 of a poll window's allowance at a time
MAX_SHARES_KEPT = 10_000  # past this, shares whose window ended are dropped


class InvalidLimit(ValueError):
    """A limit setting the `limits` library cannot read."""


def parse(text: str) -> list[RateLimitItem]:
    """The windows of a limit setting; InvalidLimit if it names none or cannot be read."""
    try:
        items = parse_many(text)
    except ValueError as error:
        raise InvalidLimit(f"{text!r} is not a rate limit such as '10/minute;100/hour' ({error})") from None
    if not items:
        raise InvalidLimit(f"{text!r} names no limit")
    if any(item.amount < 1 for item in items):
        raise InvalidLimit(f"{text!r} would refuse every request: each window needs at least 1")
    return items


class Verdict(NamedTuple):
    """Whether a request may go on, and the tightest window's numbers for the headers."""

    allowed: bool
    limit: int
    remaining: int
    resets_at: float

    def headers(self, now: float) -> dict[str, str]:
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(max(0, self.remaining)),
            "X-RateLimit-Reset": str(math.ceil(self.resets_at)),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.resets_at - now)))
        return headers


def tightest(verdicts: list[Verdict]) -> Verdict:
    """A refusal if any, else the window with the fewest units left."""
    return min(verdicts, key=lambda verdict: (verdict.allowed, verdict.remaining))


class RateLimits:
    """One app's limits, rule name -> setting, counted in store (see the module docstring)."""

    def __init__(self, store: Store, rules: dict[str, str], *, clock=time.time):
        self.store = store
        self.clock = clock
        self.rules = {name: parse(text) for name, text in rules.items()}
        self._shares: dict[str, list] = {}  # window key -> [units left here, window end, left in the store]
        self._lock = threading.Lock()  # guards _shares
        self._claiming = threading.Lock()  # held while a share is taken from the store

    def look(self, rule: str, key: str) -> Verdict:
        """Whether key has room in every window of rule; takes nothing."""
        return tightest([self._take(item, rule, key, 0) for item in self.rules[rule]])

    def count(self, rule: str, key: str) -> Verdict:
        """Take one unit from every window of rule for key (what was looked at went through)."""
        return tightest([self._take(item, rule, key, 1) for item in self.rules[rule]])

    def poll(self, rule: str, key: str) -> Verdict:
        """Take one unit for a poll from this worker's share of every window; see the module docstring."""
        return tightest([self._take_from_share(item, rule, key) for item in self.rules[rule]])

    def _take(self, item: RateLimitItem, rule: str, key: str, cost: int) -> Verdict:
        allowance = self.store.take_allowance(_window_key(item, rule, key), cost, item.amount, item.get_expiry())
        allowed = allowance.left >= 1 if cost == 0 else allowance.taken  # a look: is there room for one more?
        return Verdict(allowed, item.amount, allowance.left, allowance.resets_at)

    def _take_from_share(self, item: RateLimitItem, rule: str, key: str) -> Verdict:
        window = _window_key(item, rule, key)
        kept = self._use_share(window, item.amount)
        if kept is not None:
            return kept
        # One thread at a time takes a new share, so that a worker's threads, finding the share
        # used up together, do not each take one: the others then find the new one.
        with self._claiming:
            kept = self._use_share(window, item.amount)
            if kept is not None:
                return kept
            size = max(1, item.amount // SHARE_OF_LIMIT)
            taken, left, resets_at = self.store.take_allowance(window, size, item.amount, item.get_expiry())
            if not taken and left > 0:  # less than a share is left: take what there is
                size = left
                taken, left, resets_at = self.store.take_allowance(window, size, item.amount, item.get_expiry())
            if not taken:
                return Verdict(False, item.amount, 0, resets_at)
            with self._lock:
                if len(self._shares) >= MAX_SHARES_KEPT:
                    now = self.clock()
                    self._shares = {name: share for name, share in self._shares.items() if share[1] > now}
                self._shares[window] = [size - 1, resets_at, left]
        return Verdict(True, item.amount, size - 1 + left, resets_at)

    def _use_share(self, window: str, limit: int) -> Verdict | None:
        """One unit from this worker's share of the window, if it has one left and the window lasts."""
        now = self.clock()
        with self._lock:
            share = self._shares.get(window)
            if share is None or share[0] <= 0 or share[1] <= now:
                return None
            share[0] -= 1
            return Verdict(True, limit, share[0] + share[2], share[1])


def _window_key(item: RateLimitItem, rule: str, key: str) -> str:
    return f"{rule}:{item.amount}/{item.get_expiry()}s:{key}"
