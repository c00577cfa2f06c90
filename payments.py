"""The payment life cycle: start a push, learn its outcome, settle it exactly once.

A payment exists before its push leaves: the record is created under a payment id of
our own ("pay_" + 24 hex digits), and that id is in the push's CallBackURL, so a callback
finds its payment even when Daraja's answer to the push (the CheckoutRequestID) was lost.
A push Daraja certainly refused settles the record failed at once ("push"); one whose
fate is unknown (no answer in time, an answer that is not Daraja's) leaves it pending.

A payment is pending until Daraja tells us how it ended, by callback (the fast
path) or by STK Query (the fallback when callbacks are lost). The first result
from Daraja wins; repeats and contradicting results are recorded and ignored.
Past TRANSACTION_TTL a pending payment gets one last query and is otherwise
marked failed with reason "timeout" — our own verdict, not Daraja's, so a real
result arriving later still replaces it (flagged "late_result") rather than
leaving money taken from a customer unrecorded. A payment whose push was never
answered cannot be queried: past its TTL it is failed with reason "unknown", which a
later callback replaces the same way.

A callback that matches no payment becomes a record of its own, flagged "unmatched"
("paid, not matched" when it brings money): never matched on phone and amount, whose
callbacks may mask the one and failures carry neither.

Each payment belongs to an order (the shop's orderId, the catalogue order, or one of
ours): an order is paid once any of its attempts completed (`order_status`).

Knows nothing of Flask: the server turns these results into HTTP answers. One room past the
usual size because every rule above, stock holds and tickets included, runs inside the same
settling update: split apart, the exactly-once reasoning would have to be read across files.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import checkout
import mpesa
from config import Settings
from store import DuplicateTransaction, Store, Transaction, order_key
from telemetry import metrics

log = logging.getLogger(__name__)


# Outcomes of a settlement that leave the record in a (new) final state.
FINAL_OUTCOMES = ("completed", "failed", "amount_mismatch", "timed_out")


TICKET_TTL = 400 * 24 * 3600  # a ticket can be looked up (and checked in) this long
PAYMENT_ID_PREFIX = "pay_"
MAX_QUERIES_REMEMBERED = 10_000  # past this, query intervals that ended are forgotten


def new_payment_id() -> str:
    """An opaque id of our own; hex cannot spell a word Daraja refuses in a CallBackURL."""
    return PAYMENT_ID_PREFIX + secrets.token_hex(12)


def new_order_id() -> str:
    return "ord_" + secrets.token_hex(8)


@dataclass(frozen=True)
class PaymentRequest:
    phone: str
    amount: int
    description: str
    account_reference: str
    order: checkout.Order | None = None
    order_id: str | None = None  # the shop's, or the catalogue order's number; else one of ours


class PushFailed(Exception):
    """Daraja did not accept the push: `error` says how, `payment` is the record as it stands.

    The record is failed (settled_by "push") when the prompt certainly never left, and
    still pending when it may have reached the phone (push_sent_maybe).
    """

    def __init__(self, error: mpesa.DarajaError, payment: Transaction):
        super().__init__(str(error))
        self.error = error
        self.payment = payment


def push_sent_maybe(error: mpesa.DarajaError) -> bool:
    """False when the push certainly did not reach Daraja or was refused by it."""
    refused = (mpesa.DarajaRequestError, mpesa.DarajaAuthError, mpesa.DarajaRateLimited)
    return not isinstance(error, refused) and error.request_sent is not False


class SoldOut(Exception):
    """Not enough units of an item left for this order; `payment` is its failed record."""

    def __init__(self, item: checkout.OrderLine):
        super().__init__(f"Sold out: {item.name}")
        self.item = item
        self.payment: Transaction | None = None


def shown(payment_id: str | None) -> str:
    """A payment id as logs show it: records made before payment ids have their
    CheckoutRequestID as payment id, and it ends with the payer's number."""
    return mpesa.mask_checkout_id(payment_id)


def whole_shillings(amount: Decimal | None) -> int | None:
    """A callback's Amount as whole KES; None when absent or not a whole number."""
    if amount is None or amount != amount.to_integral_value() or amount < 0:
        return None
    return int(amount)


def event(name: str, at: float, **details) -> dict:
    return {"at": at, "event": name, **{k: v for k, v in details.items() if v is not None}}


def awaits_receipt(tx: Transaction) -> bool:
    """Completed by STK Query, which brings no receipt number: the callback may still bring it."""
    return tx.status == "completed" and tx.settled_by == "query" and not tx.mpesa_receipt_number


AMOUNTLESS = "amountlessCallback"  # tx.extra: what a success callback without its amount brought


def hold_amountless_callback(tx: Transaction, receipt: str | None, transaction_date, now: float) -> str:
    """Keep what a success callback without its amount brought; it completes nothing by itself.

    Daraja's callback is the only message that carries the amount paid. Without it, an STK
    Query confirms the ResultCode (Payments._confirm_amountless) and the success is recorded
    with the amount, and the receipt if none came, flagged unconfirmed (with_amountless_callback).
    """
    date = transaction_date.isoformat() if transaction_date else None
    tx.extra[AMOUNTLESS] = {"receipt": receipt, "transactionDate": date}
    tx.history.append(event("callback_without_amount", now, receipt=receipt))
    return "amount_missing"


def with_amountless_callback(
    tx: Transaction, amount: Decimal | None, receipt: str | None, date: str | None
) -> tuple[str | None, str | None]:
    """The receipt and date of a success, flagging what no callback confirmed if one came amountless.

    A later callback that does carry the amount has it checked as usual, and no flag.
    """
    held = tx.extra.pop(AMOUNTLESS, None)
    if held is None or amount is not None:
        return receipt, date
    tx.flags.append("amount_unconfirmed")
    receipt = receipt or held["receipt"]
    if not receipt:
        tx.flags.append("receipt_unconfirmed")
    return receipt, date or held["transactionDate"]


def settled_for_good(tx: Transaction) -> bool:
    """True once nothing Daraja may still send can change the record's verdict or receipt.

    Our own timeout yields to a late result, and a payment that awaits_receipt gets it from
    the callback (see Payments._settle); every other final record stays as it is.
    """
    return tx.is_final and tx.settled_by != "timeout" and not awaits_receipt(tx)


def order_status_of(tx: Transaction, paid: dict | None) -> str:
    """ "completed" when tx completed, or its order's marker `paid` says an attempt for the same
    amount did; else tx's status."""
    if tx.status == "completed" or paid is None:
        return tx.status
    return "completed" if paid.get("amount") == tx.amount else tx.status


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
        self._queried_until: dict[str, float] = {}  # payment id -> end of the query interval seen taken

    def callback_url(self, payment_id: str) -> str:
        """Where Daraja is to send this payment's result: the id in the path finds the record."""
        return f"{self.settings.callback_url}/hooks/stk/{self.settings.callback_token}/{payment_id}"

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
        order_id = body.get("orderId")
        if order_id is not None and not (isinstance(order_id, str) and mpesa.ID_PATTERN.match(order_id)):
            raise mpesa.InvalidInput("orderId", "orderId must be 1 to 64 letters, digits, _ or -")
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
        return PaymentRequest(
            phone,
            amount,
            texts["description"],
            texts["accountReference"],
            order,
            order_id or (order.number if order else None),
        )

    def start(self, request: PaymentRequest, payment_id: str | None = None) -> tuple[Transaction, mpesa.PushAccepted]:
        """Record the pending payment, hold its stock, send the prompt, note Daraja's ids.

        payment_id, when given, is the id to create the record under (an Idempotency-Key's
        slot names it first). SoldOut propagates with the record failed; a Daraja error as
        PushFailed, with the record failed or, if the prompt may be on its way, pending.
        """
        tx = self._create(request, payment_id or new_payment_id())
        try:
            held = self._hold_stock(request.order, tx.payment_id)
        except SoldOut as sold_out:
            sold_out.payment = self._refuse(tx.payment_id, "rejected", str(sold_out))
            raise
        if held:
            marked, _ = self.store.update(tx.payment_id, lambda tx: tx.extra.update(stock="held"))
            tx = marked or tx
        try:
            accepted = metrics.timed("stk_push", self.daraja.stk_push)(
                request.phone,
                request.amount,
                callback_url=self.callback_url(tx.payment_id),
                account_reference=tx.account_reference or request.description,
                description=request.description,
            )
        except mpesa.DarajaError as error:
            raise PushFailed(error, self._push_failed(tx.payment_id, error)) from error
        except Exception as error:
            self._push_outcome_unknown(tx.payment_id, type(error).__name__)
            raise
        return self._push_accepted(tx.payment_id, accepted), accepted

    def _create(self, request: PaymentRequest, payment_id: str) -> Transaction:
        now = self.clock()
        order_id = request.order_id or new_order_id()
        extra: dict[str, Any] = {}
        if request.order is not None:
            extra["order"] = request.order.to_dict()
        tx = Transaction(
            payment_id,
            request.phone,
            request.amount,
            order_id=order_id,
            account_reference=request.account_reference or (request.order.number if request.order else ""),
            description=request.description,
            initiated_at=now,
            extra=extra,
            history=[
                event(
                    "initiated",
                    now,
                    amount=request.amount,
                    accountReference=request.account_reference,
                    orderId=order_id,
                )
            ],
        )
        self.store.create(tx)
        log.info(
            "payment %s started: %s KES phone=%s order=%s", payment_id, tx.amount, mpesa.mask_phone(tx.phone), order_id
        )
        return tx

    def _push_accepted(self, payment_id: str, accepted: mpesa.PushAccepted) -> Transaction:
        now = self.clock()

        def note(tx: Transaction) -> None:
            if tx.checkout_request_id is None:  # else its callback came first and set it
                tx.checkout_request_id = accepted.checkout_request_id
                tx.merchant_request_id = accepted.merchant_request_id
            tx.history.append(
                event(
                    "push_accepted",
                    now,
                    merchantRequestId=accepted.merchant_request_id,
                    customerMessage=accepted.customer_message,
                )
            )

        try:
            tx, _ = self.store.update(payment_id, note)
        except DuplicateTransaction:
            log.error("payment %s: daraja answered with a CheckoutRequestID another payment has", payment_id)
            raise
        if tx is None:
            raise LookupError(f"payment {payment_id} left the store while its push was sent")
        log.info("payment %s pushed: the prompt is on its way", payment_id)
        return tx

    def _push_failed(self, payment_id: str, error: mpesa.DarajaError) -> Transaction:
        """Settle the record of a push that never reached the phone; note one that may have."""
        if push_sent_maybe(error):
            return self._push_outcome_unknown(payment_id, str(error))
        reason = "rejected" if isinstance(error, mpesa.DarajaRequestError) else "error"
        return self._refuse(payment_id, reason, str(error))

    def _push_outcome_unknown(self, payment_id: str, error: str) -> Transaction:
        now = self.clock()
        log.warning("payment %s: push outcome unknown (%s); the callback or a query will tell", payment_id, error)
        tx, _ = self.store.update(
            payment_id, lambda tx: tx.history.append(event("push_outcome_unknown", now, error=error))
        )
        if tx is None:
            raise LookupError(f"payment {payment_id} left the store while its push was sent")
        return tx

    def _refuse(self, payment_id: str, reason: str, why: str) -> Transaction:
        """Fail a payment whose prompt never left: Daraja refused it, or there was nothing to sell."""
        now = self.clock()

        def refuse(tx: Transaction) -> str:
            if tx.is_final:
                return "already_final"
            tx.settled_by, tx.result_desc, tx.completed_at = "push", why, now
            tx.history.append(event("push_refused", now, reason=reason, error=why))
            return self._finish(tx, "failed", reason, now)

        tx, outcome = self.store.update(payment_id, refuse)
        if tx is None:
            raise LookupError(f"payment {payment_id} left the store while its push was sent")
        self._log_outcome(tx, "push", outcome)
        return tx

    def handle_callback(self, body, payment_id: str | None = None) -> Transaction:
        """Apply a Daraja callback to its payment, or record it unmatched; MalformedCallback propagates.

        payment_id is the one in the callback's path (pushes sent by this version carry it).
        """
        result = mpesa.parse_callback(body)
        now = self.clock()
        tx, outcome = self._apply_callback(result, body, now, payment_id)
        metrics.callback(outcome)
        if outcome == "amount_missing":
            return self._confirm_amountless(tx)
        self._log_outcome(tx, "callback", outcome)
        return tx

    def _confirm_amountless(self, tx: Transaction) -> Transaction:
        """Ask Daraja (STK Query) whether a success callback that came without its amount is one.

        The answer carries no amount either: 0 completes the payment flagged
        amount_unconfirmed, another code fails it, and pending leaves it to the usual queries.
        """
        log.warning(
            "callback for payment %s says paid but carries no amount: confirming by STK Query", shown(tx.payment_id)
        )
        if not self._may_query(tx):
            return tx  # queried a moment ago: the next status poll or reconcile asks again
        return self._query_and_settle(tx) or tx

    def _apply_callback(
        self, result: mpesa.CallbackResult, body, now: float, payment_id: str | None, again: bool = False
    ) -> tuple[Transaction, str]:
        """Settle the callback's payment, or record it unmatched; (record, outcome)."""
        checkout_id = result.checkout_request_id
        target = self._callback_target(checkout_id, payment_id)

        def settle(tx: Transaction) -> str:
            if tx.checkout_request_id is None:  # the push's answer never came: the URL found it
                tx.checkout_request_id = checkout_id
                tx.merchant_request_id = result.merchant_request_id or None
                tx.history.append(event("matched_by_callback_url", now))
            return self._settle(
                tx,
                source="callback",
                code=result.result_code,
                desc=result.result_desc,
                amount=result.amount,
                receipt=result.receipt,
                transaction_date=result.transaction_date,
                raw=body,
                now=now,
            )

        if target is not None:
            try:
                tx, outcome = self.store.update(target, settle)
            except DuplicateTransaction:  # its CheckoutRequestID is another record's: that one's it
                if again:
                    raise
                return self._apply_callback(result, body, now, None, again=True)
            if tx is not None and outcome is not None:
                return tx, outcome
        unmatched = self._unmatched(result, body, now)
        try:
            self.store.create(unmatched)
        except DuplicateTransaction:  # a repeat of a callback recorded meanwhile
            if again:
                raise
            return self._apply_callback(result, body, now, None, again=True)
        return unmatched, "unmatched"

    def _callback_target(self, checkout_id: str, payment_id: str | None) -> str | None:
        """The payment id of the record a callback is for, or None."""
        if payment_id is not None:
            tx = self.store.get(payment_id)
            if tx is not None and tx.checkout_request_id in (None, checkout_id):
                return payment_id
            if tx is not None:
                log.warning(
                    "callback to payment %s carries another CheckoutRequestID than its own: matched by that id",
                    shown(payment_id),
                )
        found = self.store.find(checkout_id)
        return found.payment_id if found is not None else None

    def _unmatched(self, result: mpesa.CallbackResult, body, now: float) -> Transaction:
        """A record of its own for a callback that matches no payment (never matched on phone + amount)."""
        amount = whole_shillings(result.amount)
        paid = result.result_code == 0 and amount is not None
        reason = None if paid else mpesa.result_reason(result.result_code)[0]
        tx = Transaction(
            new_payment_id(),
            result.phone or "",  # as the callback gives it: Safaricom may mask it
            amount or 0,
            checkout_request_id=result.checkout_request_id,
            merchant_request_id=result.merchant_request_id or None,
            status="completed" if paid else "failed",
            reason=reason,
            result_code=result.result_code,
            result_desc=result.result_desc,
            mpesa_receipt_number=result.receipt if paid else None,
            transaction_date=result.transaction_date.isoformat() if paid and result.transaction_date else None,
            callback=body,
            initiated_at=now,
            completed_at=now,
            settled_by="callback",
            flags=["unmatched"],
            history=[
                event(
                    "callback_received",
                    now,
                    resultCode=result.result_code,
                    resultDesc=result.result_desc,
                    receipt=result.receipt,
                    raw=body,
                ),
                event("unmatched", now),
            ],
        )
        return tx

    def status(self, payment_id: str | None = None, *, checkout_request_id: str | None = None) -> Transaction | None:
        """The record with this payment id (or CheckoutRequestID), after asking Daraja when a
        callback is overdue."""
        if payment_id is not None:
            tx = self.store.get(payment_id)
        else:
            tx = self.store.find(checkout_request_id) if checkout_request_id is not None else None
        return self._followed_up(tx) if tx is not None else None

    def poll(
        self, payment_id: str | None = None, *, checkout_request_id: str | None = None
    ) -> tuple[Transaction | None, str | None]:
        """status() and order_status() of one payment, as a status poll answers: the record and
        its order's marker read together."""
        tx, paid = self.store.get_with_order(payment_id, checkout_request_id=checkout_request_id)
        if tx is None:
            return None, None
        followed = self._followed_up(tx)
        if followed is not tx:  # settled or queried meanwhile: its order may have changed too
            return followed, self.order_status(followed)
        return tx, order_status_of(tx, paid)

    def _followed_up(self, tx: Transaction) -> Transaction:
        """tx, or what it became after asking Daraja when a callback is overdue."""
        if tx.extra.get("stock") in ("to_release", "to_reclaim"):
            self._move_stock(tx)  # its verdict was saved but the process died before moving the stock
        if tx.is_final:
            return tx
        age = self.clock() - tx.initiated_at
        if age >= self.settings.transaction_ttl:
            return self.settle_expired(tx)
        if tx.checkout_request_id is not None and age >= self.settings.first_query_after and self._may_query(tx):
            return self._query_and_settle(tx) or tx
        return tx

    def order_status(self, tx: Transaction) -> str:
        """ "completed" once an attempt of tx's order for the same amount completed; else tx's status."""
        if tx.status == "completed" or tx.order_id is None:
            return tx.status
        return order_status_of(tx, self.store.get_value(order_key(tx.order_id)))

    def settle_expired(self, tx: Transaction) -> Transaction:
        """One last query for a payment past its TTL; otherwise mark it timed out (or unknown)."""
        if not self.store.add(f"final-query:{tx.payment_id}", {"at": self.clock()}, self.settings.query_interval):
            return self.store.get(tx.payment_id) or tx
        if tx.checkout_request_id is not None:  # without it there is nothing to query
            settled = self._query_and_settle(tx)
            if settled is not None and settled.is_final:
                return settled
        now = self.clock()
        timed_out, outcome = self.store.update(tx.payment_id, lambda tx: self._time_out(tx, now))
        self._log_outcome(timed_out, "timeout", outcome)
        return timed_out or tx

    def reconcile(self) -> list[Transaction]:
        """Settle every payment still pending past its TTL (after an outage, or on a schedule),
        then end the stock holds of payments that are final or gone."""
        cutoff = self.clock() - self.settings.transaction_ttl
        settled = [self.settle_expired(tx) for tx in self.store.pending_before(cutoff)]
        self._end_stale_holds()
        return settled

    def _end_stale_holds(self) -> None:
        """Release (or keep, when paid) the holds a crash left behind.

        A hold outlives its payment's verdict only if the process died between saving the
        verdict and moving the stock. Every hold belongs to a record made before it; a hold
        whose record is gone is released, one whose payment is still pending is left alone.
        """
        for owner in self.store.stock_holders():
            tx = self.store.get(owner)
            if tx is not None and tx.is_final:
                self._move_stock(tx)
                log.info(
                    "reconcile: stock held for %s payment %s %s",
                    tx.status,
                    shown(tx.payment_id),
                    "kept" if tx.status == "completed" else "released",
                )
            elif tx is None:
                released = self.store.release_stock(owner)
                if released:
                    log.warning("reconcile: stock held for unknown payment %s released: %s", shown(owner), released)

    def _may_query(self, tx: Transaction) -> bool:
        # One query per transaction per interval across every thread, worker and dyno: whoever
        # adds the interval's key sends it. Most polls of a pending payment come while the key is
        # taken. This process remembers until when a key it found taken lasts, and asks the store
        # again only after that; in between, a read tells, without a write.
        now = self.clock()
        if self._queried_until.get(tx.payment_id, 0.0) > now:
            return False
        key = f"query:{tx.payment_id}"
        taken = self.store.get_value(key)
        won = taken is None and self.store.add(key, {"at": now}, self.settings.query_interval)
        self._remember_query(tx.payment_id, taken["at"] if taken else now, now)
        return won

    def _remember_query(self, payment_id: str, at: float, now: float) -> None:
        if len(self._queried_until) >= MAX_QUERIES_REMEMBERED:
            self._queried_until = {key: until for key, until in self._queried_until.items() if until > now}
        self._queried_until[payment_id] = at + self.settings.query_interval

    def _query_and_settle(self, tx: Transaction) -> Transaction | None:
        now = self.clock()
        checkout_id = tx.checkout_request_id
        if checkout_id is None:
            return None
        try:
            result = metrics.timed("stk_query", self.daraja.stk_query)(checkout_id)
        except mpesa.DarajaError as error:
            log.warning("stk query for payment %s failed: %s", shown(tx.payment_id), error)
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
                if "receipt_unconfirmed" in tx.flags:
                    tx.flags.remove("receipt_unconfirmed")
                tx.history.append(event("receipt_added", now, receipt=receipt))
                return "receipt_added"
            same = code == tx.result_code
            tx.history.append(
                event("duplicate_ignored" if same else "contradiction_ignored", now, source=source, resultCode=code)
            )
            return "duplicate" if same else "contradiction"
        if source == "callback" and code == 0 and amount is None:
            return hold_amountless_callback(tx, receipt, transaction_date, now)

        if replaces_timeout:
            tx.flags.append("late_result")
        tx.result_code, tx.result_desc = code, desc
        tx.settled_by = source
        tx.completed_at = now
        if raw is not None:
            tx.callback = raw
        if code == 0:
            date = transaction_date.isoformat() if transaction_date else None
            receipt, tx.transaction_date = with_amountless_callback(tx, amount, receipt, date)
            tx.mpesa_receipt_number = receipt
            if amount is not None and amount != Decimal(tx.amount):
                tx.flags.append("amount_mismatch")
                tx.history.append(event("amount_mismatch", now, asked=tx.amount, paid=str(amount)))
                self._finish(tx, "failed", "error", now)
                return "amount_mismatch"
            tx.history.append(event("completed", now, receipt=receipt, source=source))
            return self._finish(tx, "completed", None, now)
        tx.extra.pop(AMOUNTLESS, None)
        reason = mpesa.result_reason(code)[0]
        tx.history.append(event("failed", now, reason=reason, resultCode=code, source=source))
        return self._finish(tx, "failed", reason, now)

    def _time_out(self, tx: Transaction, now: float) -> str:
        """Our own verdict on a payment Daraja never settled: "timeout", or "unknown" when the
        push was never answered (so its prompt may or may not have been shown)."""
        if tx.is_final:
            return "already_final"
        tx.settled_by = "timeout"
        tx.completed_at = now
        after = round(now - tx.initiated_at, 1)
        if tx.checkout_request_id is None:
            tx.result_desc = "The push's outcome never became known: no answer from M-Pesa and no callback"
            tx.history.append(event("outcome_unknown", now, after=after))
            self._finish(tx, "failed", "unknown", now)
        else:
            tx.result_desc = "No answer from M-Pesa before the payment timed out"
            tx.history.append(event("timed_out", now, after=after))
            self._finish(tx, "failed", "timeout", now)
        return "timed_out"

    def _finish(self, tx: Transaction, status: str, reason: str | None, now: float) -> str:
        """Enter a final state; note what the stock must do and issue tickets when paid.

        Stock moves are recorded here ("sold", "to_release", "to_reclaim") and carried out
        after the record is saved (_move_stock), so a crash in between can only leave units
        held (never sold twice) until reconcile or the next status poll moves them.
        """
        tx.status, tx.reason = status, reason
        stock = tx.extra.get("stock")
        may_hold = stock in ("held", "to_release") or (stock is None and bool(self._limited_lines(tx)))
        if status == "completed":
            if may_hold:
                tx.extra["stock"] = "sold"  # the hold itself ends after the save (keep_stock)
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
        elif may_hold:
            tx.extra["stock"] = "to_release"
        if self.on_settling is not None:
            self.on_settling(tx, now)
        return status

    def _hold_stock(self, order: checkout.Order | None, owner: str) -> dict[str, int]:
        """Hold the units of every limited item for owner, all or nothing; SoldOut otherwise."""
        lines = {line.id: line for line in order.lines} if order else {}
        units: dict[str, int] = {}
        capacity: dict[str, int] = {}
        for item_id, line in lines.items():
            limit = self._capacity(item_id)
            if limit is not None:
                units[item_id], capacity[item_id] = line.quantity, limit
        refused = self.store.hold_stock(owner, units, capacity) if units else None
        if refused is not None:
            raise SoldOut(lines[refused])
        return units

    def _capacity(self, item_id: str) -> int | None:
        """How many units of the item exist; None when unlimited or no longer in the catalogue."""
        item = self.catalog.items.get(item_id) if self.catalog else None
        return item.capacity if item else None

    def _limited_lines(self, tx: Transaction) -> list[tuple[str, int]]:
        lines = (tx.extra.get("order") or {}).get("items", [])
        return [(line["id"], line["quantity"]) for line in lines if self._capacity(line["id"]) is not None]

    @staticmethod
    def _stock_owner(tx: Transaction) -> str | None:
        """The id the payment holds its stock under: its payment id. None for a record made
        before payments had ids (and orders) of their own, whose units sit in the counters alone."""
        return tx.payment_id if tx.order_id is not None else None

    def _move_stock(self, tx: Transaction) -> None:
        """Carry out what the saved verdict means for the payment's units, exactly once.

        Failed: the hold is released. Completed: the hold is kept (sold); if our timeout
        had released it before the money came, the units are taken back, even past the
        capacity (flagged "oversold"). The store ends a hold once, by release or keep,
        whoever races; the record's marker is claimed first where the next step depends
        on it ("to_release" for a late payment, "to_reclaim" for the taking back).
        """
        stock, owner = tx.extra.get("stock"), self._stock_owner(tx)
        if tx.status == "completed":
            if stock == "to_reclaim":
                self._reclaim_stock(tx, owner)
            elif owner is not None:
                self.store.keep_stock(owner)
        elif tx.status == "failed":
            if stock != "released" and not self._claim_stock(tx, "released", lambda tx: tx.status == "failed"):
                return
            if owner is not None:
                self.store.release_stock(owner)
            elif stock == "to_release":  # held before holds had owners: in the counters alone
                for item_id, quantity in self._limited_lines(tx):
                    self.store.adjust_counter(f"stock:{item_id}", -quantity)

    def _claim_stock(self, tx: Transaction, marker: str, when) -> bool:
        """Set the record's stock marker if when(stored record) holds; True if this call did."""

        def claim(tx: Transaction) -> bool:
            if tx.extra.get("stock") == marker or not when(tx):
                return False
            tx.extra["stock"] = marker
            return True

        _, claimed = self.store.update(tx.payment_id, claim)
        return bool(claimed)

    def _reclaim_stock(self, tx: Transaction, owner: str | None) -> None:
        if not self._claim_stock(tx, "sold", lambda tx: tx.extra.get("stock") == "to_reclaim"):
            return
        if owner is not None and self.store.keep_stock(owner):
            return  # the release had not happened yet: the units never left
        for item_id, quantity in self._limited_lines(tx):
            sold = self.store.adjust_counter(f"stock:{item_id}", quantity)
            capacity = self._capacity(item_id)
            if sold is not None and capacity is not None and sold > capacity:
                log.error(
                    "item %s oversold (%s of %s): payment %s arrived after its timeout",
                    item_id,
                    sold,
                    capacity,
                    shown(tx.payment_id),
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
        # Tickets sold before payment ids name the CheckoutRequestID: their records' key.
        tx = self.store.get(entry.get("paymentId") or entry["checkoutRequestId"]) if entry else None
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
        stock = tx.extra.get("stock")
        if (outcome in FINAL_OUTCOMES and stock is not None) or stock in ("to_release", "to_reclaim"):
            self._move_stock(tx)
        if outcome == "completed":
            for ticket in tx.extra.get("tickets", []):
                self.store.set_value(f"ticket:{ticket['number']}", {"paymentId": tx.payment_id}, TICKET_TTL)
            if tx.order_id is not None:  # the order is paid, whatever its other attempts did
                self.store.add(
                    order_key(tx.order_id),
                    {"paymentId": tx.payment_id, "amount": tx.amount},
                    self.settings.retention_seconds,
                )
        if outcome in FINAL_OUTCOMES and self.on_final is not None:
            try:
                self.on_final(tx)
            except Exception:  # a notification problem must never undo a settled payment
                log.exception("on_final hook failed for payment %s", shown(tx.payment_id))
        if outcome in ("duplicate", "contradiction"):
            log.warning(
                "%s for payment %s ignored (%s): payment already %s", source, shown(tx.payment_id), outcome, tx.status
            )
        elif outcome == "amount_mismatch":
            log.error(
                "payment %s paid a different amount than the %s KES asked: not completed",
                shown(tx.payment_id),
                tx.amount,
            )
        elif outcome == "unmatched":
            log.warning(
                "callback matched no payment (ResultCode %s): recorded as payment %s, %s and unmatched",
                tx.result_code,
                tx.payment_id,
                tx.status,
            )
        else:
            log.info(
                "payment %s %s via %s (reason=%s) phone=%s",
                shown(tx.payment_id),
                tx.status,
                source,
                tx.reason or "-",
                mpesa.mask_phone(tx.phone),
            )
