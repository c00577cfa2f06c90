"""One lockout for ADMIN_TOKEN, wherever it is tried: the dashboard's sign-in and the bearer API.

After ADMIN_LOGIN_FREE_TRIES wrong tokens from one client address, each further try must wait
ADMIN_LOGIN_DELAY s, doubling with each wrong token up to ADMIN_LOGIN_MAX_DELAY, and while it
waits even the right token is refused: guessing is as slow on /transactions as on /admin/login.
The count lives in the store, so every worker sees it; a right token starts it again, and
it is forgotten LOGIN_MEMORY s after the last wrong one.

    verdict = lockout.try_token(given)   # in a request: "locked", "wrong" or "right", and the wait
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from dataclasses import dataclass
from typing import Literal

from flask import current_app, request

LOGIN_MEMORY = 15 * 60  # wrong tokens are forgotten after this long without another


@dataclass(frozen=True)
class Verdict:
    """What became of one try: `wait` is how long the address must wait before its next one."""

    outcome: Literal["locked", "wrong", "right"]
    failures: int
    wait: float

    @property
    def wait_seconds(self) -> int:
        """The wait in whole seconds, rounded up, as Retry-After and the messages say it."""
        return math.ceil(self.wait)


def try_token(given: str | None) -> Verdict:
    """Check the token `given` against ADMIN_TOKEN for this request's client address; None is
    a credential that cannot be right (another Authorization scheme) and counts as wrong.

    A locked address is refused without the token being looked at; a wrong token counts
    toward the lockout; the right one clears the count.
    """
    store = current_app.extensions["store"]
    slot = _slot()
    now = time.time()
    state = store.get_value(slot) or {}
    failures = state.get("failures", 0)
    wait = max(0.0, state.get("until", 0.0) - now)
    if wait > 0:
        return Verdict("locked", failures, wait)
    if given is not None and _matches(given, current_app.extensions["settings"].admin_token):
        if state:
            store.delete(slot)
        return Verdict("right", 0, 0.0)
    failures += 1
    wait = _wait_after(failures)
    store.set_value(slot, {"failures": failures, "until": now + wait}, LOGIN_MEMORY + wait)
    return Verdict("wrong", failures, wait)


def _matches(given: str, token: str) -> bool:
    # Digests of equal length: the comparison takes as long whatever the token sent.
    return hmac.compare_digest(_digest(given), _digest(token))


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _wait_after(failures: int) -> float:
    settings = current_app.extensions["settings"]
    over = failures - settings.admin_login_free_tries
    if over < 0:
        return 0.0
    return min(settings.admin_login_delay * 2**over, settings.admin_login_max_delay)


def _slot() -> str:
    address = request.remote_addr or "unknown"
    return "admin-login:" + hashlib.sha256(address.encode()).hexdigest()[:32]
