"""One STK prompt on the simulated handset: its record, how the control API shows it, and the
callback document Daraja sends when it ends.

The engine creates and ends prompts under its lock; a Prompt itself knows nothing of time or
threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from mpesa import daraja_timestamp
from simulator.wire import result_desc


def iso(moment: datetime) -> str:
    """A moment as the control API writes it: UTC, milliseconds, a Z."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Prompt:
    """One STK prompt on the simulated handset."""

    checkout_id: str
    merchant_id: str
    phone: str
    amount: int
    account_reference: str
    transaction_desc: str
    shortcode: str
    callback_url: str
    created_at: datetime
    expires_at: datetime
    callback: str = "send"
    callback_delay: float = 0.0
    status: str = "pending"
    result_code: int | str | None = None
    result_desc: str | None = None
    receipt: str | None = None
    timer: int | None = None
    queried_at: float | None = None

    def to_json(self) -> dict:
        """The prompt as the control API and the handset show it."""
        return {
            "checkoutRequestId": self.checkout_id,
            "merchantRequestId": self.merchant_id,
            "phone": self.phone,
            "amount": self.amount,
            "accountReference": self.account_reference,
            "transactionDesc": self.transaction_desc,
            "businessShortCode": self.shortcode,
            "status": self.status,
            "resultCode": self.result_code,
            "resultDesc": self.result_desc,
            "receipt": self.receipt,
            "createdAt": iso(self.created_at),
            "expiresAt": iso(self.expires_at),
        }

    def callback_body(self, code: int | str, receipt: str | None = None) -> dict:
        """Daraja's callback document for this prompt ending with `code`."""
        result = {
            "MerchantRequestID": self.merchant_id,
            "CheckoutRequestID": self.checkout_id,
            "ResultCode": code,
            "ResultDesc": result_desc(code),
        }
        if code == 0:
            result["CallbackMetadata"] = {
                "Item": [
                    {"Name": "Amount", "Value": float(self.amount)},
                    {"Name": "MpesaReceiptNumber", "Value": receipt},
                    {"Name": "Balance"},
                    {"Name": "TransactionDate", "Value": int(daraja_timestamp())},
                    {"Name": "PhoneNumber", "Value": int(self.phone)},
                ]
            }
        return {"Body": {"stkCallback": result}}
