"""What the control API can set, checked from its JSON: the settings, scenario rules and faults.

SimulatorConfig holds the settings, with the simulator's fixed credentials as defaults; only
TUNABLE ones change at run time (PATCH /simulator/config). A scenario Rule decides how matching
pushes end, a Fault makes the next requests to an endpoint fail. Bad input is a werkzeug
BadRequest, which the control API answers as {"error": ...}.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from werkzeug.exceptions import BadRequest

from mpesa import PROMPT_SECONDS, SANDBOX_PASSKEY, SANDBOX_SHORTCODE, InvalidInput, normalize_phone
from simulator.wire import RESULT_DESCS, WHOLE, as_text

SIM_CONSUMER_KEY = "simulator-consumer-key"
SIM_CONSUMER_SECRET = "simulator-consumer-secret"
SIM_PIN = "1234"

AWAIT = "await"  # a scenario outcome: leave the prompt to the handset
CALLBACK_MODES = ("send", "drop", "duplicate", "contradict")
FAULT_ENDPOINTS = ("oauth", "stkpush", "query", "any")
FAULT_MODES = ("http500", "http503_html", "garbage", "slow", "rate_limit", "quota", "http429", "invalid_token")
TUNABLE = (
    "pin",
    "auto_delay",
    "prompt_timeout",
    "query_min_interval",
    "token_ttl",
    "timestamp_skew",
    "invalidate_previous_tokens",
)


@dataclass
class SimulatorConfig:
    """How the simulated Daraja behaves; PATCH /simulator/config changes the tunable part."""

    consumer_key: str = SIM_CONSUMER_KEY
    consumer_secret: str = field(default=SIM_CONSUMER_SECRET, repr=False)
    shortcodes: dict[str, str] = field(  # shortcode -> passkey
        default_factory=lambda: {SANDBOX_SHORTCODE: SANDBOX_PASSKEY}, repr=False
    )
    pin: str = SIM_PIN
    token_ttl: int = 3599
    auto_delay: float = 3.0
    prompt_timeout: float = float(PROMPT_SECONDS)
    query_min_interval: float = 1.0
    timestamp_skew: float = 600
    callback_timeout: float = 10.0
    invalidate_previous_tokens: bool = False

    def public(self) -> dict:
        """The settings without secrets (no consumer secret, no passkeys)."""
        settings = dataclasses.asdict(self)
        del settings["consumer_secret"]
        settings["shortcodes"] = sorted(self.shortcodes)
        return settings


def _setting(data: dict, key: str):
    """One tunable setting from a PATCH body, checked."""
    value = data[key]
    if key == "pin":
        text = as_text(value)
        if text is None or not WHOLE.fullmatch(text):
            raise BadRequest("pin must be digits")
        return text
    if key == "invalidate_previous_tokens":
        if not isinstance(value, bool):
            raise BadRequest(f"{key} must be true or false")
        return value
    checked = _count(data, key) if key == "token_ttl" else _number(data, key, positive=key == "prompt_timeout")
    if checked is None:
        raise BadRequest(f"{key} cannot be null")
    return checked


def config_changes(data: dict) -> dict:
    """The tunable settings a PATCH body changes, every one checked."""
    _only_keys(data, TUNABLE)
    return {key: _setting(data, key) for key in data}


def _number(data: dict, key: str, default=None, *, positive: bool = False):
    value = data.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{key} must be a number")
    if value < 0 or (positive and value == 0):
        raise BadRequest(f"{key} must be {'positive' if positive else 'zero or more'}")
    return value


def _count(data: dict, key: str, default=None) -> int | None:
    value = data.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"{key} must be a whole number of at least 1")
    return value


def _choice(data: dict, key: str, options: tuple, default=None) -> str:
    value = data.get(key, default)
    if value not in options:
        raise BadRequest(f"{key} must be one of {', '.join(options)}")
    return value


def parse_result_code(value) -> int | str:
    """A ResultCode given to the control API: an integer, digits, or a known text code."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,9}", value.strip()):
        return int(value)
    if isinstance(value, str) and value in RESULT_DESCS:
        return value
    raise BadRequest("resultCode must be an integer or a known code such as SFC_IC0003")


def checked_phone(value) -> str:
    """A phone number in any accepted format, as 2547XXXXXXXX; a bad one is refused."""
    try:
        return normalize_phone(value)
    except InvalidInput as exc:
        raise BadRequest(f"phone: {exc.message}") from None


def _only_keys(data: dict, allowed: tuple) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")


@dataclass
class Rule:
    """A scenario rule: which pushes it matches and how they end."""

    id: int
    phone: str | None = None
    amount: int | None = None
    result: int | str | None = None  # None: the number's usual outcome; AWAIT: the handset
    delay: float | None = None  # None: auto_delay
    callback: str = "send"
    callback_delay: float = 0.0
    times: int | None = None  # None: every matching push
    used: int = 0

    KEYS = ("phone", "amount", "resultCode", "delay", "callback", "callbackDelay", "times")

    @classmethod
    def from_json(cls, rule_id: int, data: dict) -> Rule:
        _only_keys(data, cls.KEYS)
        result = data.get("resultCode")
        if result is not None and result != AWAIT:
            result = parse_result_code(result)
        amount = data.get("amount")
        if amount is not None:
            text = as_text(amount)
            if text is None or not WHOLE.fullmatch(text) or int(text) < 1:
                raise BadRequest("amount must be a whole number of at least 1")
            amount = int(text)
        return cls(
            id=rule_id,
            phone=checked_phone(data["phone"]) if data.get("phone") is not None else None,
            amount=amount,
            result=result,
            delay=_number(data, "delay"),
            callback=_choice(data, "callback", CALLBACK_MODES, "send"),
            callback_delay=_number(data, "callbackDelay", 0),
            times=_count(data, "times"),
        )

    def matches(self, phone: str, amount: int) -> bool:
        return (
            (self.times is None or self.used < self.times)
            and self.phone in (None, phone)
            and self.amount in (None, amount)
        )

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "phone": self.phone,
            "amount": self.amount,
            "resultCode": self.result,
            "delay": self.delay,
            "callback": self.callback,
            "callbackDelay": self.callback_delay,
            "times": self.times,
            "used": self.used,
        }


@dataclass
class Fault:
    """The next `remaining` requests to `endpoint` fail in `mode`."""

    id: int
    endpoint: str
    mode: str
    remaining: int
    delay: float

    KEYS = ("endpoint", "mode", "count", "delay")

    @classmethod
    def from_json(cls, fault_id: int, data: dict) -> Fault:
        _only_keys(data, cls.KEYS)
        return cls(
            id=fault_id,
            endpoint=_choice(data, "endpoint", FAULT_ENDPOINTS, "any"),
            mode=_choice(data, "mode", FAULT_MODES),
            remaining=_count(data, "count", 1),
            delay=_number(data, "delay", 0),
        )

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "endpoint": self.endpoint,
            "mode": self.mode,
            "count": self.remaining,
            "delay": self.delay,
        }
