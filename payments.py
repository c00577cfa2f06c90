"""The payment life cycle: start a push, learn its outcome, settle it exactly once.

A payment is pending until Daraja tells us how it ended, by callback (the fast
path) or by STK Query (the fallback when callbacks are lost). The first result
from Daraja wins; repeats and contradicting results are recorded and ignored.
Past TRANSACTION_TTL a pending payment gets one last query and is otherwise
marked failed with reason "timeout" — our own verdict, not Daraja's, so a real
result arriving later still replaces it (flagged "late_result") rather than
leaving money taken from a customer unrecorded.

Knows nothing of Flask: the server turns these results into HTTP answers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import checkout
import mpesa
from config import Settings
from store import DuplicateTransaction, Store, Transaction
from telemetry import metrics

log = logging.getLogger(__name__)


# Outcomes of a settlement that leave the record in a (new) final state.
FINAL_OUTCOMES = ("completed", "failed", "amount_mismatch", "timed_out")


TICKET_TTL = 400 * 24 * 3600  # a ticket can be looked up (and checked in) this long


@dataclass(frozen=True)
class PaymentRequest:
    phone: str
    amount: int
    description: str
    account_reference: str
    order: checkout.Order | None = None


class SoldOut(Exception):
    """Not enough units of an item left for this order."""

    def __init__(self, item: checkout.OrderLine):
        super().__init__(f"Sold out: {item.name}")
        self.item = item


def event(name: str, at: float, **details) -> dict:
    return {"at": at, "event": name, **{k: v for k, v in details.items() if v is not None}}


def awaits_receipt(tx: Transaction) -> bool:
    """Completed by STK Query, which brings no receipt number: the callback may still bring it."""
    return tx.status == "completed" and tx.settled_by == "query" and not tx.mpesa_receipt_number


def settled_for_good(tx: Transaction) -> bool:
    """True once nothing Daraja may still send can change the record's verdict or receipt.

    Our own timeout yields to a late result, and a payment that awaits_receipt gets it from
    the callback (see Payments._settle); every other final record stays as it is.
    """
    return tx.is_final and tx.settled_by != "timeout" and not awaits_receipt(tx)


class Payments:
    """Starts payments and settles them in the store, idempotently."""

    def __init__(
        self,
        store: Store,
        daraja: mpesa.Daraja,
        settings: Settings,
        clock=time.time,
        on_final=None,
        catalog: checkout.Catalog | None = None,
        on_settling=None,
    ):
        self.store = store
        self.daraja = daraja
        self.settings = settings
        self.clock = clock
        self.catalog = catalog
        self.on_final = on_final  # called with the record each time it reaches a final state
        # Called as on_settling(tx, now) inside the update that makes tx final, after every
        # other change: what it writes on tx is saved with the verdict or not at all.
        self.on_settling = on_settling

    @property
    def callback_url(self) -> str:
        return f"{self.settings.callback_url}/hooks/stk/{self.settings.callback_token}"

    def prepare(self, body) -> PaymentRequest:
        """Check a /stkpush body and price it; raise mpesa.InvalidInput naming the bad field."""
        if not isinstance(body, dict):
            raise mpesa.InvalidInput("body", "Request body must be a JSON object")
        if body.get("phone") in (None, ""):
            raise mpesa.InvalidInput("phone", "Phone number is required")
        phone = mpesa.normalize_phone(body["phone"])
        texts = {}
        for name, limit in (("description", 200), ("accountReference", 100)):
            value = body.get(name, "")
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise mpesa.InvalidInput(name, f"{name} must be text")
            if len(value) > limit:
                raise mpesa.InvalidInput(name, f"{name} must be at most {limit} characters")
            texts[name] = value.strip()
        order = None
        if body.get("items") is not None:
            if self.catalog is None:
                raise mpesa.InvalidInput("items", "This shop has no catalogue: send an amount")
            if body.get("amount") not in (None, ""):
                raise mpesa.InvalidInput("amount", "Send either items or an amount, not both")
            order = self.catalog.price(body["items"], self.settings.max_amount)
            amount = order.total
        else:
            if self.settings.pricing == "catalog":
                raise mpesa.InvalidInput("amount", "Prices come from the shop's catalogue: send items")
            if self.settings.checkout_secret:
                checkout.check_link(self.settings.checkout_secret, body, self.clock())
            amount = mpesa.validate_amount(body.get("amount"), self.settings.max_amount)
        return PaymentRequest(phone, amount, texts["description"], texts["accountReference"], order)

    def start(self, request: PaymentRequest) -> tuple[Transaction, mpesa.PushAccepted]:
        """Hold stock, send the prompt and record the pending payment.

        SoldOut and Daraja errors propagate (with the stock released again).
        """
        held = self._hold_stock(request.order)
        reference = request.account_reference or (request.order.number if request.order else "")
        try:
            accepted = metrics.timed("stk_push", self.daraja.stk_push)(
                request.phone,
                request.amount,
                callback_url=self.callback_url,
                account_reference=reference or request.description,
                description=request.description,
            )
        except BaseException:
            self._release_stock(held)
            raise
        now = self.clock()
        extra: dict[str, Any] = {}
        if request.order is not None:
            extra["order"] = request.order.to_dict()
        if held:
            extra["stock"] = "held"
        tx = Transaction(
            payment_id=accepted.checkout_request_id,
            checkout_request_id=accepted.checkout_request_id,
            merchant_request_id=accepted.merchant_request_id,
            phone=request.phone,
            amount=request.amount,
            account_reference=reference,
            description=request.description,
            initiated_at=now,
            extra=extra,
            history=[
                event("initiated", now, amount=request.amount, accountReference=request.account_reference),
                event(
                    "push_accepted",
                    now,
                    merchantRequestId=accepted.merchant_request_id,
                    customerMessage=accepted.customer_message,
                ),
            ],
        )
        try:
            self.store.create(tx)
        except DuplicateTransaction:
            log.error(
                "daraja returned a CheckoutRequestID already stored: %s",
                mpesa.mask_checkout_id(accepted.checkout_request_id),
            )
            raise
        log.info(
            "payment %s started: %s KES phone=%s",
            mpesa.mask_checkout_id(tx.checkout_request_id),
            tx.amount,
            mpesa.mask_phone(tx.phone),
        )
        orphan = self.store.get_value(f"orphan:{tx.checkout_request_id}")
        if orphan:
            self.store.delete(f"orphan:{tx.checkout_request_id}")
            self.handle_callback(orphan["body"])
        return self.store.get(tx.payment_id) or tx, accepted

    def handle_callback(self, body) -> Transaction | None:
        """Apply a Daraja callback; MalformedCallback propagates, unknown ids are kept aside."""
        result = mpesa.parse_callback(body)
        now = self.clock()
        found = self.store.find(result.checkout_request_id)
        tx, outcome = self.store.update(
            found.payment_id if found else result.checkout_request_id,
            lambda tx: self._settle(
                tx,
                source="callback",
                code=result.result_code,
                desc=result.result_desc,
                amount=result.amount,
                receipt=result.receipt,
                transaction_date=result.transaction_date,
                raw=body,
                now=now,
            ),
        )
        metrics.callback(outcome or "unknown_id")
        if tx is None:
            log.warning(
                "callback for unknown CheckoutRequestID %s (ResultCode %s) kept for matching",
                mpesa.mask_checkout_id(result.checkout_request_id),
                result.result_code,
            )
            self.store.set_value(
                f"orphan:{result.checkout_request_id}", {"body": body}, self.settings.retention_seconds
            )
            return None
        self._log_outcome(tx, "callback", outcome)
        return tx

    def status(self, checkout_request_id: str) -> Transaction | None:
        """The stored record, after asking Daraja when a callback is overdue."""
        tx = self.store.find(checkout_request_id)
        if tx is None or tx.is_final:
            return tx
        age = self.clock() - tx.initiated_at
        if age >= self.settings.transaction_ttl:
            return self.settle_expired(tx)
        if age >= self.settings.first_query_after and self._may_query(tx):
            return self._query_and_settle(tx) or tx
        return tx

    def settle_expired(self, tx: Transaction) -> Transaction:
        """One last query for a payment past its TTL; otherwise mark it timed out."""
        if not self.store.add(
            f"final-query:{tx.checkout_request_id}", {"at": self.clock()}, self.settings.query_interval
        ):
            return self.store.get(tx.payment_id) or tx
        settled = self._query_and_settle(tx)
        if settled is not None and settled.is_final:
            return settled
        now = self.clock()
        timed_out, outcome = self.store.update(tx.payment_id, lambda tx: self._time_out(tx, now))
        self._log_outcome(timed_out, "timeout", outcome)
        return timed_out or tx

    def reconcile(self) -> list[Transaction]:
        """Settle every payment still pending past its TTL (after an outage, or on a schedule)."""
        cutoff = self.clock() - self.settings.transaction_ttl
        return [self.settle_expired(tx) for tx in self.store.pending_before(cutoff)]

    def _may_query(self, tx: Transaction) -> bool:
        # One query per transaction per interval across every thread, worker and dyno.
        return self.store.add(f"query:{tx.checkout_request_id}", {"at": self.clock()}, self.settings.query_interval)

    def _query_and_settle(self, tx: Transaction) -> Transaction | None:
        now = self.clock()
        try:
            result = metrics.timed("stk_query", self.daraja.stk_query)(tx.checkout_request_id)
        except mpesa.DarajaError as error:
            log.warning("stk query for %s failed: %s", mpesa.mask_checkout_id(tx.checkout_request_id), error)
            failure = str(error)
            queried, _ = self.store.update(
                tx.payment_id,
                lambda tx: tx.history.append(event("queried", now, result="error", error=failure)),
            )
            return queried
        if result.pending:
            queried, _ = self.store.update(
                tx.payment_id, lambda tx: tx.history.append(event("queried", now, result="pending"))
            )
            return queried
        settled, outcome = self.store.update(
            tx.payment_id,
            lambda tx: self._settle(tx, source="query", code=result.result_code, desc=result.result_desc, now=now),
        )
        self._log_outcome(settled, "query", outcome)
        return settled

    def _settle(
        self,
        tx: Transaction,
        *,
        source: str,
        code,
        desc: str,
        now: float,
        amount: Decimal | None = None,
        receipt: str | None = None,
        transaction_date=None,
        raw=None,
    ) -> str:
        """Apply a Daraja result to tx; runs inside store.update, so it touches nothing but tx."""
        tx.history.append(event(f"{source}_received", now, resultCode=code, resultDesc=desc, receipt=receipt, raw=raw))
        replaces_timeout = tx.settled_by == "timeout"
        if tx.is_final and not replaces_timeout:
            if code == 0 and receipt and awaits_receipt(tx):
                tx.mpesa_receipt_number = receipt
                tx.transaction_date = transaction_date.isoformat() if transaction_date else None
                tx.callback = raw
                tx.history.append(event("receipt_added", now, receipt=receipt))
                return "receipt_added"
            same = code == tx.result_code
            tx.history.append(
                event("duplicate_ignored" if same else "contradiction_ignored", now, source=source, resultCode=code)
            )
            return "duplicate" if same else "contradiction"

        if replaces_timeout:
            tx.flags.append("late_result")
        tx.result_code, tx.result_desc = code, desc
        tx.settled_by = source
        tx.completed_at = now
        if raw is not None:
            tx.callback = raw
        if code == 0:
            tx.mpesa_receipt_number = receipt
            tx.transaction_date = transaction_date.isoformat() if transaction_date else None
            if amount is not None and amount != Decimal(tx.amount):
                tx.flags.append("amount_mismatch")
                tx.history.append(event("amount_mismatch", now, asked=tx.amount, paid=str(amount)))
                self._finish(tx, "failed", "error", now)
                return "amount_mismatch"
            tx.history.append(event("completed", now, receipt=receipt, source=source))
            return self._finish(tx, "completed", None, now)
        reason = mpesa.result_reason(code)[0]
        tx.history.append(event("failed", now, reason=reason, resultCode=code, source=source))
        return self._finish(tx, "failed", reason, now)

    def _time_out(self, tx: Transaction, now: float) -> str:
        if tx.is_final:
            return "already_final"
        tx.settled_by = "timeout"
        tx.result_desc = "No answer from M-Pesa before the payment timed out"
        tx.completed_at = now
        tx.history.append(event("timed_out", now, after=round(now - tx.initiated_at, 1)))
        self._finish(tx, "failed", "timeout", now)
        return "timed_out"

    def _finish(self, tx: Transaction, status: str, reason: str | None, now: float) -> str:
        """Enter a final state; note what the stock must do and issue tickets when paid.

        Stock moves are recorded here ("to_release", "to_reclaim") and carried out after
        the record is saved (_move_stock), so a crash in between can only leave units
        held (never sold twice).
        """
        tx.status, tx.reason = status, reason
        stock = tx.extra.get("stock")
        if status == "completed":
            if stock in ("held", "to_release"):
                tx.extra["stock"] = "sold"
            elif stock == "released":  # our timeout gave the units back; the money came anyway
                tx.extra["stock"] = "to_reclaim"
            lines = (tx.extra.get("order") or {}).get("items", [])
            if "tickets" not in tx.extra and any(line["kind"] == "ticket" for line in lines):
                tx.extra["tickets"] = [
                    {"number": checkout.ticket_number(), "itemId": line["id"], "name": line["name"]}
                    for line in lines
                    if line["kind"] == "ticket"
                    for _ in range(line["quantity"])
                ]
                tx.history.append(event("tickets_issued", now, tickets=[t["number"] for t in tx.extra["tickets"]]))
        elif stock == "held":
            tx.extra["stock"] = "to_release"
        if self.on_settling is not None:
            self.on_settling(tx, now)
        return status

    def _hold_stock(self, order: checkout.Order | None) -> list[tuple[str, int]]:
        """Hold the units of every limited item, all or nothing; SoldOut otherwise."""
        held: list[tuple[str, int]] = []
        for line in order.lines if order else ():
            capacity = self._capacity(line.id)
            if capacity is None:
                continue
            if self.store.adjust_counter(f"stock:{line.id}", line.quantity, maximum=capacity) is None:
                self._release_stock(held)
                raise SoldOut(line)
            held.append((line.id, line.quantity))
        return held

    def _capacity(self, item_id: str) -> int | None:
        """How many units of the item exist; None when unlimited or no longer in the catalogue."""
        item = self.catalog.items.get(item_id) if self.catalog else None
        return item.capacity if item else None

    def _release_stock(self, held) -> None:
        for item_id, quantity in held:
            self.store.adjust_counter(f"stock:{item_id}", -quantity)

    def _limited_lines(self, tx: Transaction) -> list[tuple[str, int]]:
        lines = (tx.extra.get("order") or {}).get("items", [])
        return [(line["id"], line["quantity"]) for line in lines if self._capacity(line["id"]) is not None]

    def _move_stock(self, tx: Transaction) -> None:
        """Carry out the stock move _finish recorded, exactly once (claimed in the store)."""

        def claim(tx: Transaction) -> str | None:
            move = {"to_release": ("released", "release"), "to_reclaim": ("sold", "reclaim")}
            state_action = move.get(tx.extra.get("stock") or "")
            if state_action is None:
                return None
            tx.extra["stock"], action = state_action
            return action

        _, action = self.store.update(tx.payment_id, claim)
        if action == "release":
            self._release_stock(self._limited_lines(tx))
        elif action == "reclaim":
            for item_id, quantity in self._limited_lines(tx):
                sold = self.store.adjust_counter(f"stock:{item_id}", quantity)
                capacity = self._capacity(item_id)
                if sold is not None and capacity is not None and sold > capacity:
                    log.error(
                        "item %s oversold (%s of %s): payment %s arrived after its timeout",
                        item_id,
                        sold,
                        capacity,
                        mpesa.mask_checkout_id(tx.checkout_request_id),
                    )
                    self.store.update(tx.payment_id, lambda tx: tx.flags.append("oversold"))

    def available(self, item: checkout.Item) -> int | None:
        """Units of item still for sale (capacity minus held and sold)."""
        if item.capacity is None:
            return None
        return max(0, item.capacity - self.store.get_counter(f"stock:{item.id}"))

    def ticket(self, number: str) -> tuple[Transaction, dict] | None:
        """The paid payment a ticket number belongs to, and the ticket."""
        entry = self.store.get_value(f"ticket:{number}")
        tx = self.store.get(entry["checkoutRequestId"]) if entry else None
        if tx is None or tx.status != "completed":
            return None
        ticket = next((t for t in tx.extra.get("tickets", []) if t["number"] == number), None)
        return (tx, ticket) if ticket else None

    def check_in(self, number: str) -> tuple[dict | None, dict | None]:
        """Mark a ticket used at the door: (ticket, None), or (ticket, first check-in) if used."""
        found = self.ticket(number)
        if found is None:
            return None, None
        tx, ticket = found
        now = self.clock()
        if not self.store.add(f"checkin:{number}", {"at": now}, TICKET_TTL):
            return ticket, self.store.get_value(f"checkin:{number}")
        self.store.update(tx.payment_id, lambda tx: tx.history.append(event("ticket_checked_in", now, ticket=number)))
        return ticket, None

    def _log_outcome(self, tx: Transaction | None, source: str, outcome) -> None:
        if tx is None:
            return
        if outcome in FINAL_OUTCOMES:
            metrics.payment_settled(tx)
        if tx.extra.get("stock") in ("to_release", "to_reclaim"):
            self._move_stock(tx)
        if outcome == "completed":
            for ticket in tx.extra.get("tickets", []):
                self.store.set_value(
                    f"ticket:{ticket['number']}", {"checkoutRequestId": tx.checkout_request_id}, TICKET_TTL
                )
        if outcome in FINAL_OUTCOMES and self.on_final is not None:
            try:
                self.on_final(tx)
            except Exception:  # a notification problem must never undo a settled payment
                log.exception("on_final hook failed for %s", mpesa.mask_checkout_id(tx.checkout_request_id))
        if outcome in ("duplicate", "contradiction"):
            log.warning(
                "%s for %s ignored (%s): payment already %s",
                source,
                mpesa.mask_checkout_id(tx.checkout_request_id),
                outcome,
                tx.status,
            )
        elif outcome == "amount_mismatch":
            log.error(
                "payment %s paid a different amount than the %s KES asked: not completed",
                mpesa.mask_checkout_id(tx.checkout_request_id),
                tx.amount,
            )
        else:
            log.info(
                "payment %s %s via %s (reason=%s) phone=%s",
                mpesa.mask_checkout_id(tx.checkout_request_id),
                tx.status,
                source,
                tx.reason or "-",
                mpesa.mask_phone(tx.phone),
            )
