"""The overview's numbers and its three SVG charts, drawn from a store.Overview; no Flask here.

Each chart is geometry for its template (admin_charts.html) plus a sentence that says the
same in words, for screen readers and for anyone who would rather read than look.
"""

from __future__ import annotations

import math

from admin.formatting import REASONS, SETTLED_BY, duration, humane, kes, nairobi, percent
from store import TALLY_UTC_OFFSET, Overview, Tally

WINDOWS = {  # name: (label, length, step)
    "hour": ("Last hour", 3600, 300),
    "day": ("Last 24 hours", 86400, 3600),
    "week": ("Last 7 days", 7 * 86400, 86400),
    "month": ("Last 30 days", 30 * 86400, 86400),
}

DEFAULT_WINDOW = "day"
WIDTH, HEIGHT = 480, 220
PLOT = {"left": 54, "right": 8, "top": 14, "bottom": 32}


def window_bounds(now: float, length: int, step: int) -> tuple[float, float]:
    """[since, until) of `length` s ending with the step now falls in (Nairobi-aligned)."""
    until = (math.floor((now + TALLY_UTC_OFFSET) / step) + 1) * step - TALLY_UTC_OFFSET
    return float(until - length), float(until)


def overview_view(found: Overview) -> dict:
    """The numbers on the overview, each ready to show."""
    total = found.total
    final = total.completed + total.failed
    settled = total.group("settled")
    queries = total["event:queried"] + total["event:query_received"]
    query_errors = total["event:queried:error"]
    calls = total["event:push_accepted"] + queries
    reasons = [
        {
            "reason": reason,
            "label": REASONS.get(reason, humane(reason)),
            "count": count,
            "share": percent(count, total.failed),
        }
        for reason, count in sorted(total.group("reason").items(), key=lambda item: (-item[1], item[0]))
    ]
    return {
        "started": total.started,
        "completed": total.completed,
        "failed": total.failed,
        "pending": total.pending,
        "received": kes(total.received),
        "conversion": percent(total.completed, total.started),
        "median": duration(total.time_to_final(0.5)),
        "p95": duration(total.time_to_final(0.95)),
        "final": final,
        "settled": [
            {"by": by, "label": label, "count": settled.get(by, 0), "share": percent(settled.get(by, 0), final)}
            for by, label in SETTLED_BY.items()
        ],
        "reasons": reasons,
        "queries": queries,
        "query_errors": query_errors,
        "query_error_rate": percent(query_errors, queries),
        "daraja_calls": calls,
        "daraja_error_rate": percent(query_errors, calls),
        "system_failures": total["reason:error"] + total["reason:rejected"],
        "mismatches": total["flag:amount_mismatch"],
        "late_results": total["flag:late_result"],
        "ignored_callbacks": total["event:duplicate_ignored"] + total["event:contradiction_ignored"],
        "callbacks": total["event:callback_received"],
        "since": nairobi(found.since, "%d %b %Y %H:%M"),
        "until": nairobi(found.until, "%d %b %Y %H:%M"),
    }


def _bucket_label(start: float, step: float, count: int) -> str:
    if step >= 86400:
        return nairobi(start, "%a %d" if count <= 7 else "%d %b")
    return nairobi(start, "%H:%M")


def charts(found: Overview) -> dict:
    """Geometry and text equivalents of the three SVG charts."""
    rows = []
    for start, counts in found.buckets:
        rows.append(
            {
                "label": _bucket_label(start, found.step, len(found.buckets)),
                "long": nairobi(start, "%d %b %Y %H:%M"),
                "started": counts.started,
                "completed": counts.completed,
                "failed": counts.failed,
                "received": counts.received,
                "rate": counts.conversion,
            }
        )
    return {
        "rows": rows,
        "per": _per(found.step),
        "volume": volume_chart(rows, found.step),
        "success": success_chart(rows, found.step),
        "reasons": reasons_chart(found.total),
    }


def _nice_ceiling(value: float) -> int:
    if value <= 1:
        return 1
    power = 10 ** math.floor(math.log10(value))
    return int(next(step * power for step in (1, 2, 4, 6, 8, 10) if step * power >= value))


def _x_labels(rows: list[dict], x_of) -> list[dict]:
    """About six labels; every other one is "minor", left out on narrow screens."""
    every = max(1, math.ceil(len(rows) / 6))
    shown = [n for n in range(len(rows)) if n % every == 0]
    return [{"x": round(x_of(n), 1), "text": rows[n]["label"], "minor": k % 2 == 1} for k, n in enumerate(shown)]


def volume_chart(rows: list[dict], step: float) -> dict:
    """Bars of payments started per step, completed ones drawn over them."""
    plot_w = WIDTH - PLOT["left"] - PLOT["right"]
    plot_h = HEIGHT - PLOT["top"] - PLOT["bottom"]
    top = _nice_ceiling(max([row["started"] for row in rows] + [1]))
    slot = plot_w / max(1, len(rows))
    bar_w = max(1.0, slot * 0.7)
    base = PLOT["top"] + plot_h

    def x_of(n):
        return PLOT["left"] + slot * n + slot / 2

    def height(value):
        return plot_h * value / top

    bars = []
    for n, row in enumerate(rows):
        x = round(x_of(n) - bar_w / 2, 1)
        bars.append(
            {
                "x": x,
                "w": round(bar_w, 1),
                "started_y": round(base - height(row["started"]), 1),
                "started_h": round(height(row["started"]), 1),
                "completed_y": round(base - height(row["completed"]), 1),
                "completed_h": round(height(row["completed"]), 1),
                "tip": f"{row['long']}: {row['started']} started, {row['completed']} completed",
            }
        )
    busiest = max(rows, key=lambda row: row["started"]) if rows else None
    started = sum(row["started"] for row in rows)
    completed = sum(row["completed"] for row in rows)
    summary = f"{started} payments started and {completed} completed, {_per(step)}."
    if busiest and busiest["started"]:
        summary += f" Busiest: {busiest['long']} with {busiest['started']} started."
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "bars": bars,
        "base": base,
        "left": PLOT["left"],
        "right": WIDTH - PLOT["right"],
        "grid": _grid(top, plot_h, base, str),
        "labels": _x_labels(rows, x_of),
        "label_y": base + 18,
        "summary": summary,
    }


def success_chart(rows: list[dict], step: float) -> dict:
    """Completed / started per step as a line; steps without payments leave a gap."""
    plot_w = WIDTH - PLOT["left"] - PLOT["right"]
    plot_h = HEIGHT - PLOT["top"] - PLOT["bottom"]
    slot = plot_w / max(1, len(rows))
    base = PLOT["top"] + plot_h

    def x_of(n):
        return PLOT["left"] + slot * n + slot / 2

    lines, current, points = [], [], []
    for n, row in enumerate(rows):
        if row["rate"] is None:
            if current:
                lines.append(current)
            current = []
            continue
        point = (round(x_of(n), 1), round(base - plot_h * row["rate"], 1))
        current.append(point)
        points.append(
            {"x": point[0], "y": point[1], "tip": f"{row['long']}: {percent(row['completed'], row['started'])}"}
        )
    if current:
        lines.append(current)
    rates = [row for row in rows if row["rate"] is not None]
    if rates:
        low = min(rates, key=lambda row: row["rate"])
        summary = (
            f"Share of payments completed, {_per(step)}, from "
            f"{percent(low['completed'], low['started'])} at {low['long']} to "
            f"{max(_percent_value(row) for row in rates):.0f}%."
        )
    else:
        summary = "No payments in this window, so no success rate."
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "lines": [" ".join(f"{x},{y}" for x, y in line) for line in lines],
        "points": points,
        "base": base,
        "left": PLOT["left"],
        "right": WIDTH - PLOT["right"],
        "grid": _grid(100, plot_h, base, lambda value: f"{value}%"),
        "labels": _x_labels(rows, x_of),
        "label_y": base + 18,
        "summary": summary,
    }


def _percent_value(row: dict) -> float:
    return 100 * row["rate"]


def reasons_chart(total: Tally) -> dict:
    """Horizontal bars, each under its label: failed payments by reason, most common first."""
    reasons = sorted(total.group("reason").items(), key=lambda item: (-item[1], item[0]))
    label_h, bar_h, gap, right = 24, 18, 14, 60
    row_h = label_h + bar_h + gap
    height = max(1, len(reasons)) * row_h + gap
    top = max([count for _, count in reasons] + [1])
    span = WIDTH - right
    bars = []
    for n, (reason, count) in enumerate(reasons):
        y = gap + n * row_h
        w = max(round(span * count / top, 1), 1.0)
        bars.append(
            {
                "bar_y": y + label_h,
                "w": w,
                "label": REASONS.get(reason, humane(reason)),
                "count": count,
                "label_y": y + label_h - 7,
                "count_y": y + label_h + bar_h - 3,
                "count_x": w + 8,
            }
        )
    parts = [f"{REASONS.get(reason, humane(reason)).lower()} {count}" for reason, count in reasons]
    summary = "Failed payments by reason: " + ", ".join(parts) + "." if parts else "No failed payments in this window."
    return {"width": WIDTH, "height": height, "bars": bars, "bar_h": bar_h, "summary": summary}


def _grid(top: int, plot_h: float, base: float, label) -> list[dict]:
    """Lines at 0, half and the top of the scale; half only when it is a whole number."""
    shares = (0, 0.5, 1) if top % 2 == 0 else (0, 1)
    return [{"y": round(base - plot_h * share, 1), "text": label(round(top * share))} for share in shares]


def _per(step: float) -> str:
    return {300: "per 5 minutes", 3600: "per hour", 86400: "per day"}.get(int(step), "per step")
