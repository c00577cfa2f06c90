"""The dashboard's pages: overview, transactions and their CSV, one payment's timeline, reconcile.

Lists come from `store.search` (indexed) and numbers from `store.overview` (per-time-bucket
counters), never from reading every record. Every view needs a signed-in operator.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from contextlib import suppress
from datetime import date, datetime

from flask import Response, current_app, render_template, request, stream_with_context, url_for

import mpesa
from admin.auth import login_required
from admin.charts import DEFAULT_WINDOW, WINDOWS, charts, overview_view, window_bounds
from admin.formatting import REASONS, SETTLED_BY, duration, humane, kes, nairobi
from store import STATUSES, Transaction

# Every dashboard line is logged as "admin", whichever module writes it, as before the split.
log = logging.getLogger("admin")

PAGE_SIZE = 25
EXPORT_CHUNK = 1000
MAX_EXPORT_ROWS = 100_000
CSV_COLUMNS = (
    "Receipt",
    "Completed (EAT)",
    "Phone",
    "Amount (KES)",
    "Reference",
    "Status",
    "Reason",
    "Note",
    "Payment ID",
    "Order ID",
    "Checkout request ID",
    "Started (EAT)",
    "Description",
)

EVENT_LABELS = {
    "initiated": "Payment started",
    "push_accepted": "STK push accepted by Daraja",
    "push_refused": "STK push refused: no prompt was sent",
    "push_outcome_unknown": "No answer from Daraja to the STK push: the prompt may have been sent",
    "matched_by_callback_url": "Matched by the callback URL (Daraja's answer to the push was lost)",
    "unmatched": "Callback matched no payment: recorded on its own",
    "outcome_unknown": "Outcome never known: settled as unknown (our verdict)",
    "query_received": "Status query answered by Daraja",
    "callback_received": "Callback received from Daraja",
    "completed": "Payment completed",
    "failed": "Payment failed",
    "timed_out": "Timed out: no answer from M-Pesa",
    "duplicate_ignored": "Repeated result ignored",
    "contradiction_ignored": "Contradicting result ignored",
    "receipt_added": "Receipt added by a late callback",
    "amount_mismatch": "Amount paid differs from the amount asked",
    "callback_without_amount": "Success callback without the amount: confirming by status query",
    "webhook_attempt": "Webhook sent to the shop",
    "webhook_delivered": "Webhook delivered",
    "webhook_given_up": "Webhook given up",
}

EVENT_TONES = {
    "completed": "good",
    "webhook_delivered": "good",
    "failed": "bad",
    "timed_out": "bad",
    "push_refused": "bad",
    "outcome_unknown": "bad",
    "push_outcome_unknown": "warn",
    "unmatched": "warn",
    "amount_mismatch": "bad",
    "webhook_given_up": "bad",
    "contradiction_ignored": "warn",
    "callback_without_amount": "warn",
    "duplicate_ignored": "warn",
}


def _store():
    return current_app.extensions["store"]


@login_required
def overview():
    """The money and the health of payments over a window (?window=hour|day|week|month)."""
    name = request.args.get("window", DEFAULT_WINDOW)
    if name not in WINDOWS:
        name = DEFAULT_WINDOW
    label, length, step = WINDOWS[name]
    since, until = window_bounds(time.time(), length, step)
    found = _store().overview(since, until, step)
    return render_template(
        "admin_overview.html",
        title="Overview",
        window=name,
        windows=WINDOWS,
        window_label=label,
        view=overview_view(found),
        charts=charts(found),
        retention_note=_retention_note(length),
    )


@login_required
def transactions():
    """Payments found by text, status, reason and dates, a page at a time."""
    search, form, problems = read_filters(request.args)
    page = _page_number(request.args.get("page"))
    found, total = _store().search(**search, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    pages = max(1, math.ceil(total / PAGE_SIZE))
    if page > pages:  # past the end (the list shrank, or a hand-made link): the last page
        page = pages
        found, total = _store().search(**search, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    links = {}
    filters = {k: v for k, v in form.items() if v}
    if page > 1:
        links["newer"] = url_for("admin.transactions", **filters, page=page - 1)
    if page < pages:
        links["older"] = url_for("admin.transactions", **filters, page=page + 1)
    return render_template(
        "admin_transactions.html",
        title="Transactions",
        form=form,
        problems=problems,
        rows=[row_view(tx) for tx in found],
        total=total,
        page=page,
        pages=pages,
        links=links,
        reasons=REASONS,
        statuses=STATUSES,
        export_limit=MAX_EXPORT_ROWS,
        filtered=bool(filters),
    )


@login_required
def export():
    """The same list as a CSV download, phones masked unless &full_phones=1."""
    search, form, problems = read_filters(request.args)
    full_phones = request.args.get("full_phones") in ("1", "on", "true")
    # Payments started from now on are left out, so paging cannot shift under the export.
    search["until"] = min(search["until"] or math.inf, time.time())
    store = _store()
    log.info("admin: CSV export from %s (%s phones)", request.remote_addr, "full" if full_phones else "masked")

    def rows():
        yield "\ufeff" + _csv_line(CSV_COLUMNS)  # the BOM tells spreadsheets it is UTF-8
        offset = 0
        while offset < MAX_EXPORT_ROWS:
            found, _ = store.search(**search, limit=min(EXPORT_CHUNK, MAX_EXPORT_ROWS - offset), offset=offset)
            for tx in found:
                yield _csv_line(csv_row(tx, full_phones))
            if len(found) < EXPORT_CHUNK:
                break
            offset += len(found)

    stamp = datetime.now(mpesa.NAIROBI).strftime("%Y%m%d-%H%M")
    return Response(
        stream_with_context(rows()),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="mpesa-payments-{stamp}.csv"'},
    )


@login_required
def transaction(payment_id):
    """One payment and its whole history as a timeline (a checkout request ID finds it too)."""
    tx = _store().get(payment_id) or _store().find(payment_id)
    if tx is None:
        return render_template(
            "admin_message.html",
            title="Not found",
            heading="No such payment",
            message=f"No payment has the id {payment_id!r}; it may have expired from the store.",
        ), 404
    return render_template(
        "admin_transaction.html",
        title=f"Payment {tx.mpesa_receipt_number or tx.payment_id}",
        tx=tx,
        row=row_view(tx),
        timeline=timeline(tx),
        callback=_pretty(tx.callback) if tx.callback else None,
        extra=_pretty(tx.extra) if tx.extra else None,
    )


@login_required
def reconcile():
    """Settle stale pending payments now (Payments.reconcile) and list them; queue due webhooks."""
    payments = current_app.extensions["payments"]
    settled = payments.reconcile()
    notifier = current_app.extensions.get("webhooks")
    requeued = notifier.redeliver_pending() if notifier is not None else None
    log.info("admin: reconcile from %s settled %d payment(s)", request.remote_addr, len(settled))
    return render_template(
        "admin_reconcile.html",
        title="Stale payments settled",
        rows=[row_view(tx) for tx in settled],
        ttl=payments.settings.transaction_ttl,
        requeued=requeued,
    )


def _retention_note(length: int) -> str | None:
    store = _store()
    retention = current_app.extensions["settings"].retention_seconds
    if store.kind in ("sqlite", "postgres") or length <= retention:  # the ledgers keep every payment
        return None
    return (
        f"The {store.kind} store keeps payments for {duration(retention, rough=True)} "
        "(RETENTION_SECONDS): older ones are not counted here. Use the SQLite or PostgreSQL "
        "store, or a longer retention, to see further back."
    )


def read_filters(args) -> tuple[dict, dict, list[str]]:
    """store.search() arguments, the form's values, and what was wrong with them."""
    problems = []
    form = {name: (args.get(name) or "").strip()[:100] for name in ("q", "status", "reason", "from", "to")}
    text = form["q"] or None
    if text:
        with suppress(mpesa.InvalidInput):  # not a phone: searched as it is
            text = mpesa.normalize_phone(text)  # 0712 345 678 finds 254712345678
    status = form["status"] or None
    if status not in (None, *STATUSES):
        problems.append(f"Unknown status {status!r}: showing every status.")
        status = form["status"] = None
    reason = form["reason"] or None
    if reason not in (None, *REASONS):
        problems.append(f"Unknown reason {reason!r}: showing every reason.")
        reason = form["reason"] = None
    since = _day_start(form, "from", problems)
    until = _day_start(form, "to", problems)
    if until is not None:
        until += 86400  # the whole "to" day
    if since is not None and until is not None and since >= until:
        problems.append("The first date is after the last: no dates applied.")
        since = until = None
    return (
        {"text": text, "status": status, "reason": reason, "since": since, "until": until},
        {k: v or "" for k, v in form.items()},
        problems,
    )


def _day_start(form: dict, name: str, problems: list[str]) -> float | None:
    value = form[name]
    if not value:
        return None
    try:
        day = date.fromisoformat(value)
    except ValueError:
        problems.append(f"{value!r} is not a date (YYYY-MM-DD): ignored.")
        form[name] = ""
        return None
    return datetime(day.year, day.month, day.day, tzinfo=mpesa.NAIROBI).timestamp()


def _page_number(raw: str | None) -> int:
    ok = raw is not None and raw.isascii() and raw.isdigit()  # not "²": int() refuses it
    return int(raw) if ok and 0 < int(raw) <= 100_000 else 1


def unmatched_label(tx: Transaction) -> str:
    """What a callback that matched no payment is called: money the shop must place by hand."""
    if "unmatched" not in tx.flags:
        return ""
    return "paid, not matched" if tx.status == "completed" else "not matched"


def row_view(tx: Transaction) -> dict:
    """One payment as the lists and the payment page show it."""
    return {
        "id": tx.payment_id,
        "url": url_for("admin.transaction", payment_id=tx.payment_id),
        "order_id": tx.order_id or "",
        "unmatched": unmatched_label(tx),
        "started": nairobi(tx.initiated_at),
        "started_iso": _iso(tx.initiated_at),
        "finished": nairobi(tx.completed_at) if tx.completed_at else "",
        "phone": mpesa.mask_phone(tx.phone),
        "full_phone": tx.phone,
        "amount": kes(tx.amount),
        "reference": tx.account_reference,
        "description": tx.description,
        "status": tx.status,
        "reason": tx.reason or "",
        "reason_label": REASONS.get(tx.reason, humane(tx.reason or "")),
        "receipt": tx.mpesa_receipt_number or "",
        "settled_by": SETTLED_BY.get(tx.settled_by, tx.settled_by or ""),
        "result": f"{tx.result_code}: {tx.result_desc}" if tx.result_code is not None else "",
        "flags": [humane(flag) for flag in tx.flags],
    }


def csv_row(tx: Transaction, full_phone: bool) -> list:
    """One payment as a CSV row, in CSV_COLUMNS order."""
    finished = tx.completed_at
    if tx.status == "completed" and tx.transaction_date:
        with suppress(ValueError):  # M-Pesa's own completion time, what its statement shows, when readable
            finished = datetime.fromisoformat(tx.transaction_date).timestamp()
    return [
        tx.mpesa_receipt_number or "",
        nairobi(finished, "%Y-%m-%d %H:%M:%S") if finished else "",
        tx.phone if full_phone else mpesa.mask_phone(tx.phone),
        tx.amount,
        tx.account_reference,
        tx.status,
        tx.reason or "",
        "; ".join(filter(None, [unmatched_label(tx), *(humane(f) for f in tx.flags if f != "unmatched")])),
        tx.payment_id,
        tx.order_id or "",
        tx.checkout_request_id or "",
        nairobi(tx.initiated_at, "%Y-%m-%d %H:%M:%S"),
        tx.description,
    ]


def _csv_line(values) -> str:
    out = io.StringIO()
    csv.writer(out).writerow([guard_cell(value) for value in values])
    return out.getvalue()


def guard_cell(value):
    """Text a spreadsheet would run as a formula (= + - @, tab, CR first) gets a ' in front."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def timeline(tx: Transaction) -> list[dict]:
    """Every history entry, oldest first, with a label; unknown events shown as they are."""
    entries = []
    for entry in sorted(tx.history, key=lambda item: item.get("at") or 0):
        name = str(entry.get("event") or "event")
        at = entry.get("at")
        details = [
            {"name": humane(key), "value": _plain(value)}
            for key, value in entry.items()
            if key not in ("at", "event", "raw")
        ]
        entries.append(
            {
                "event": name,
                "label": _event_label(name, entry),
                "tone": (
                    "bad" if name == "queried" and entry.get("result") == "error" else EVENT_TONES.get(name, "info")
                ),
                "at": nairobi(at, "%d %b %Y %H:%M:%S") if isinstance(at, (int, float)) else "",
                "iso": _iso(at) if isinstance(at, (int, float)) else "",
                "offset": (
                    f"+{at - tx.initiated_at:.1f} s" if isinstance(at, (int, float)) and tx.initiated_at else ""
                ),
                "details": details,
                "raw": _pretty(entry["raw"]) if entry.get("raw") is not None else None,
            }
        )
    return entries


def _event_label(name: str, entry: dict) -> str:
    if name == "queried":
        return {"pending": "Status query: still being processed", "error": "Status query failed"}.get(
            entry.get("result"), "Status query sent"
        )
    return EVENT_LABELS.get(name, humane(name))


def _plain(value) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return "" if value is None else str(value)


def _pretty(value) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)


def _iso(epoch: float | None) -> str:
    return datetime.fromtimestamp(epoch, mpesa.NAIROBI).isoformat() if epoch else ""
