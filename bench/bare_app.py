"""The ceiling for this stack: a bare Flask app answering POST /stkpush/status.

It reads the JSON body as any endpoint must and answers a fixed completed-payment body of
BARE_BODY_BYTES bytes (the real answer's size, measured by the benchmark): no store, no
logging, no rate limiter, no security headers. Served by the same command as the
server (`python serve.py --app bench.bare_app:app`), so the same workers and threads.
"""

from __future__ import annotations

import os

from flask import Flask, request

app = Flask(__name__)
app.json.sort_keys = False

ANSWER = {
    "success": True,
    "checkoutRequestId": "ws_CO_23112026133000123700000000",
    "status": "completed",
    "amount": 100,
    "currency": "KES",
    "phone": "2547******00",
    "accountReference": "BENCH-1",
    "transaction_id": "SKL1ABCD2E",
    "MpesaReceiptNumber": "SKL1ABCD2E",
    "description": "Benchmark",
    "completedAt": "2026-11-23T10:30:05.120Z",
    "transactionDate": "2026-11-23T13:30:04+03:00",
    "message": "Payment completed",
}


def _sized(answer: dict, size: int) -> dict:
    """Pad the message so the encoded body is exactly `size` bytes (when it can be)."""
    with app.app_context():
        length = len(app.json.response(answer).get_data())
    if size > length:
        answer = {**answer, "message": answer["message"] + " " * (size - length)}
    return answer


BODY = _sized(ANSWER, int(os.environ.get("BARE_BODY_BYTES") or 0))


@app.post("/stkpush/status")
def status():
    request.get_json(silent=True)
    return BODY


@app.get("/health")
def health():
    return {"status": "ok"}
