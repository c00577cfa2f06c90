"""Memory: bytes per record in the memory store at 100,000 records, and the time to expire them.

Records are shaped like real ones: a completed payment with Daraja's raw callback kept on the
record and in a history of five events (initiated, push accepted, queried, callback received,
completed), as payments.py writes them. The store gets an injected clock
(`store.open_store("memory://", retention=..., clock=...)`), so expiry is one jump of the clock
and the next store call sweeps every record, in-process, without sleeping.
"""

from __future__ import annotations

import gc
import time
import tracemalloc

from bench.harness import Context, fmt, median, table
from payments import event
from store import Transaction, open_store
from store.record import encode as _encode

RETENTION = 86400.0


class Clock:
    def __init__(self, now: float = 1_795_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(i: int, now: float) -> Transaction:
    """A completed payment as the server stores it after a callback."""
    phone = f"2547{i % 100_000_000:08d}"
    checkout_id = f"ws_CO_23112026133000{i % 1000:03d}{phone[3:]}"
    merchant_id = f"29115-34620561-{i}"
    receipt = f"SKL{i:07d}"[:10]
    desc = "The service request is processed successfully."
    callback = {
        "Body": {
            "stkCallback": {
                "MerchantRequestID": merchant_id,
                "CheckoutRequestID": checkout_id,
                "ResultCode": 0,
                "ResultDesc": desc,
                "CallbackMetadata": {
                    "Item": [
                        {"Name": "Amount", "Value": 1500.0},
                        {"Name": "MpesaReceiptNumber", "Value": receipt},
                        {"Name": "Balance"},
                        {"Name": "TransactionDate", "Value": 20261123133004},
                        {"Name": "PhoneNumber", "Value": int(phone)},
                    ]
                },
            }
        }
    }
    return Transaction(
        payment_id=checkout_id,
        checkout_request_id=checkout_id,
        merchant_request_id=merchant_id,
        phone=phone,
        amount=1500,
        account_reference="CART_12345",
        description="DJ Kraph Checkout",
        status="completed",
        result_code=0,
        result_desc=desc,
        mpesa_receipt_number=receipt,
        transaction_date="2026-11-23T13:30:04+03:00",
        callback=callback,
        initiated_at=now,
        completed_at=now + 25,
        settled_by="callback",
        history=[
            event("initiated", now, amount=1500, accountReference="CART_12345"),
            event(
                "push_accepted",
                now,
                merchantRequestId=merchant_id,
                customerMessage="Success. Request accepted for processing",
            ),
            event("queried", now + 20, result="pending"),
            event("callback_received", now + 25, resultCode=0, resultDesc=desc, receipt=receipt, raw=callback),
            event("completed", now + 25, receipt=receipt, source="callback"),
        ],
    )


def fill(count: int, clock: Clock):
    store = open_store("memory://", retention=RETENTION, clock=clock)
    for i in range(count):
        store.create(record(i, clock.now))
    return store


def run(ctx: Context) -> str:
    count = 10_000 if ctx.quick else 100_000
    creates = 2_000 if ctx.quick else 5_000
    rounds = ctx.runs(3, 1)

    # Bytes: what the store keeps, traced by tracemalloc (the records built to fill it are freed).
    ctx.log(f"memory: {count:,} records under tracemalloc")
    clock = Clock()
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    store = fill(count, clock)
    gc.collect()
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    per_record = (kept - base) / count
    sample = record(7, clock.now)
    json_bytes = len(_encode(sample).encode())

    # Time: create real records, read one among `count`, then jump the clock past the
    # retention and let one call sweep them all (the first round reuses the traced store,
    # now untraced).
    fills, gets, sweeps, small_sweeps = [], [], [], []
    for number in range(rounds):
        ctx.log(f"memory: round {number + 1}/{rounds}: create, read and expire {count:,} records")
        if number:
            clock = Clock()
            store = fill(count, clock)
        began = time.perf_counter()
        fill(creates, Clock())
        fills.append((time.perf_counter() - began) / creates)
        checkout_id = record(count // 2, clock.now).checkout_request_id
        began = time.perf_counter()
        for _ in range(1000):
            store.get(checkout_id)
        gets.append((time.perf_counter() - began) / 1000)
        clock.now += RETENTION + 1
        began = time.perf_counter()
        store.get(checkout_id)  # the first call after the jump sweeps every record
        sweeps.append(time.perf_counter() - began)
        left = store.list(limit=1)[1]
        if left:
            raise RuntimeError(f"{left} records survived their retention")
        del store
        clock = Clock()
        store = fill(count // 8, clock)
        clock.now += RETENTION + 1
        began = time.perf_counter()
        store.get(checkout_id)
        small_sweeps.append(time.perf_counter() - began)
        del store
        gc.collect()

    sweep = median(sweeps)
    ctx.summary.append(
        [
            f"memory store at {count:,} records",
            "measured",
            f"{per_record:,.0f} B/record; expiring all takes {sweep * 1000:,.0f} ms",
            "—",
        ]
    )
    rows = [
        ["bytes per stored record (tracemalloc)", f"**{fmt(per_record)}**"],
        ["of which the record's JSON text", fmt(json_bytes)],
        [
            f"memory held by {count:,} records",
            f"{(kept - base) / 2**20:,.1f} MiB (peak while filling {(peak - base) / 2**20:,.1f} MiB)",
        ],
        ["time to store one record (create)", f"{median(fills) * 1e6:,.1f} µs"],
        ["time to read one record (get) among them", f"{median(gets) * 1e6:,.1f} µs"],
        [
            f"time to expire all {count:,} (one call after the clock jumps)",
            f"**{sweep * 1000:,.0f} ms** ({sweep / count * 1e6:.2f} µs a record)",
        ],
        [
            f"time to expire {count // 8:,} the same way",
            f"{median(small_sweeps) * 1000:,.0f} ms ({median(small_sweeps) / (count // 8) * 1e6:.2f} µs a record)",
        ],
    ]
    return "\n".join(
        [
            "## 4. Memory store: size and expiry",
            "",
            f"{count:,} completed payments (raw callback on the record and in a 5-event history, "
            f'{json_bytes:,} bytes of JSON each) in `open_store("memory://", retention={RETENTION:.0f}, '
            f"clock=...)`, in-process; times are medians of {rounds} run(s). The create time is measured "
            f"by filling a fresh store with {creates:,} records.",
            "",
            table(["", ""], rows),
            "",
            "The sweep runs under the store's lock: the request that happens to trigger it waits for it, "
            "and so does every other request on that worker meanwhile. A cost per record that grows with "
            "the number of records means the sweep is worse than linear.",
        ]
    )
