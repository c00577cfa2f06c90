"""How the dashboard writes times, money, shares, durations and names; no Flask here."""

from __future__ import annotations

import math
import re
from datetime import datetime

import mpesa

REASONS = {
    "cancelled": "Cancelled by the customer",
    "timeout": "Timed out",
    "insufficient_funds": "Not enough money",
    "wrong_pin": "Wrong PIN",
    "rejected": "Refused by M-Pesa (limits or set-up)",
    "error": "Other error",
    "unknown": "Outcome never known (no answer to the push, no callback)",
}

SETTLED_BY = {
    "callback": "Callback from Daraja",
    "query": "Status query",
    "timeout": "Timed out (our verdict)",
    "push": "Push refused (no prompt sent)",
}


def nairobi(epoch: float | None, pattern: str = "%d %b %Y %H:%M:%S") -> str:
    """An epoch as Nairobi time (EAT), the dashboard's only time zone."""
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, mpesa.NAIROBI).strftime(pattern)


def kes(amount) -> str:
    """KES 1,500."""
    return f"KES {amount:,}"


def percent(part: int, whole: int) -> str:
    """part of whole as 12.5%, or a dash when whole is 0."""
    if not whole:
        return "–"
    return f"{100 * part / whole:.1f}%"


def duration(seconds: float | None, rough: bool = False) -> str:
    """45 s, 2.5 min, 3 hours: an hour or more, or rough, in whole days, hours or minutes."""
    if seconds is None:
        return "–"
    if seconds == math.inf:
        return "over an hour"
    if rough or seconds >= 3600:
        for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
            if seconds >= size:
                count = round(seconds / size)
                return f"{count} {unit}{'s' if count != 1 else ''}"
    if seconds >= 120:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def humane(name: str) -> str:
    """resultCode, result_code -> Result code."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", str(name)).replace("_", " ").strip()
    return words[:1].upper() + words[1:].lower() if words else ""
