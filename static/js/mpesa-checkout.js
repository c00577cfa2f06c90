// mpesa-checkout.js: start an M-Pesa STK Push payment and follow it to the end.
//
// One framework-free ES module, used by this server's pay page and by a shop's own pages on
// another origin (list the shop's origin in the server's FRONTEND_URL):
//
//   import { startCheckout, reasonText } from "<payment server>/static/js/mpesa-checkout.js";
//
//   const result = await startCheckout({
//     server: "<payment server>",      // its base URL; "" (the default) = this page's origin
//     phone: "0712 345 678",            // any usual form; checked here before anything is sent
//     // exactly one of:
//     amount: 1500,                     // whole KES
//     items: [{ id: "ticket-regular", quantity: 2 }],      // priced by the server's catalogue
//     link: { amount, accountReference, description, expires, signature },  // a signed link, sent as-is
//     description: "DJ Kraph Checkout", // optional, with amount or items
//     accountReference: "CART_12345",   // optional, with amount or items
//     signal,                           // an AbortSignal: stop following (the prompt is not recalled)
//     orderId: "CART_12345",            // optional: the shop's order; its attempts share it
//     onProgress: (p) => {},            // {state, pollsLeft, secondsLeft, paymentId, checkoutRequestId, answer, failedInARow}
//     pollInterval: 3000,               // ms between status polls
//     maxPolls: 40,                     // 40 × 3 s = 2 minutes
//     idempotencyKey,                   // optional: re-send a push that got no answer (result.idempotencyKey)
//   });
//
// The promise never rejects for a payment that did not happen (only for a call without exactly
// one of amount, items or link); it resolves with
//   {status, reason, message, paymentId, orderId, checkoutRequestId, orderNumber, answer,
//    idempotencyKey, field, itemId, httpStatus, retryAfter}
// paymentId is the server's own id of the payment (use it in links: /confirmation.html?paymentId=…);
// checkoutRequestId is Daraja's, null when its answer to the push never came.
// where status is
//   "completed"  paid; `answer` is the server's status answer (receipt, amount, orderNumber,
//                items, tickets)
//   "failed"     M-Pesa ended it; reason: cancelled, wrong_pin, insufficient_funds, timeout,
//                rejected, error, or unknown (the server never learnt whether the prompt
//                reached the phone, and no payment came)
//   "timeout"    no final answer after maxPolls (reason no_answer); it may still complete
//   "cancelled"  the caller's signal aborted (reason aborted)
//   "error"      the push was refused or got no answer (reason invalid + field, sold_out +
//                itemId, in_progress, conflict, too_large, rate_limited + retryAfter, refused,
//                unavailable, gateway_timeout, server_error, network), or the payment could not
//                be followed (not_found, lost_contact)
// and message is plain words for the customer (the server's own message for a refused field).
//
// onProgress states: "sending" (the push is on its way), "waiting" (pushed, or a poll said
// pending; `answer` carries orderNumber, amount and items), "retrying" (a push or poll got no
// usable answer; the next one follows quietly). A push the server answered with an error but
// whose payment is still pending (M-Pesa did not answer in time: the prompt may yet come) is
// followed like an accepted one.
//
// Requests: POST <server>/stkpush with Content-Type: application/json and an Idempotency-Key
// (one per call; a push that got no answer is re-sent with the same key, so the phone is never
// prompted twice), then GET <server>/stkpush/status/<paymentId> every pollInterval, one at a
// time, as a simple request (no CORS preflight per poll).
import { fetchJson, newKey } from "./api.js";
import { PHONE_ERROR, normalisePhone } from "./phone.js";

export { PHONE_ERROR, formatKes, normalisePhone as normalizePhone } from "./phone.js";

const PUSH_TIMEOUT = 45000; // ms: the server waits up to DARAJA_TIMEOUT (15 s) for Daraja
const POLL_TIMEOUT = 10000;
const PUSH_RETRIES = 2; // re-sends, same key, of a push that got no answer or is still running
const PUSH_RETRY_DELAY = 1500;

const REASONS = {
  // How M-Pesa ended a payment (the server's `reason`).
  cancelled: "You cancelled the payment on your phone.",
  wrong_pin: "The M-Pesa PIN entered on the phone was wrong, so the payment did not go through.",
  insufficient_funds: "The M-Pesa balance is too low for this payment. Top up, then try again.",
  timeout: "The payment request timed out on the phone before the PIN was entered.",
  rejected: "M-Pesa did not allow this payment (a limit on the M-Pesa account, or the shop's M-Pesa settings).",
  error: "M-Pesa could not complete the payment.",
  unknown: "M-Pesa never told us whether the payment request reached your phone, and no payment came. "
    + "Check your M-Pesa messages before you pay again.",
  // Why we stopped following it.
  no_answer: "No answer came from the phone in time, so we stopped waiting. "
    + "If you did enter your PIN, check your M-Pesa messages before you pay again.",
  lost_contact: "We lost contact with the payment server, so we do not know whether the payment went through. "
    + "Check your M-Pesa messages before you pay again.",
  not_found: "The payment server no longer has a record of this payment, so we cannot tell whether it went through. "
    + "Check your M-Pesa messages before you pay again.",
  aborted: "We stopped following this payment. If a payment request shows up on your phone and you approve it, "
    + "it still goes through.",
  // Why the payment request was not sent.
  invalid: "Some of the payment details are not valid.",
  sold_out: "Sorry, this is sold out.",
  in_progress: "Your payment request is still on its way. Wait a few seconds, then try again.",
  conflict: "This payment clashes with one sent a moment ago with other details. Reload the page, then try again.",
  too_large: "The payment details are too long to send.",
  rate_limited: "Too many payment requests in a short time. Please wait a minute, then try again.",
  refused: "M-Pesa turned the payment request down.",
  unavailable: "M-Pesa cannot be reached right now. Please try again in a few minutes.",
  gateway_timeout: "M-Pesa did not answer in time. If a payment request shows up on your phone you can still "
    + "approve it; otherwise wait a minute and try again.",
  server_error: "Something went wrong while starting the payment. Please try again.",
  network: "We could not reach the payment server. Check your internet connection, then try again. "
    + "If a payment request shows up on your phone, you can still approve it.",
};

/** Plain words for a result's reason (also the server's failure reasons). */
export function reasonText(reason) {
  return REASONS[reason] || REASONS.error;
}

/** Start a payment and follow it; resolves with how it ended (see the header). */
export async function startCheckout({
  server = "",
  phone,
  amount,
  items,
  link,
  description,
  accountReference,
  orderId,
  signal,
  onProgress,
  pollInterval = 3000,
  maxPolls = 40,
  idempotencyKey,
} = {}) {
  const base = String(server || "").replace(/\/+$/, "");
  const key = idempotencyKey || newKey();
  const totalMs = pollInterval * maxPolls;
  let waitingSince = null;
  let paymentId = null;
  let checkoutRequestId = null;
  let last = null; // the newest answer that described the payment
  const follow = (data) => {
    paymentId = data.paymentId || paymentId;
    checkoutRequestId = data.checkoutRequestId || checkoutRequestId;
    last = { ...last, ...data };
  };

  const secondsLeft = () => (waitingSince === null
    ? Math.ceil(totalMs / 1000)
    : Math.max(0, Math.ceil((totalMs - (Date.now() - waitingSince)) / 1000)));
  const report = (state, pollsLeft, extra = {}) => {
    if (!onProgress) return;
    try {
      onProgress({ state, pollsLeft, secondsLeft: secondsLeft(), paymentId, checkoutRequestId, answer: last, ...extra });
    } catch (error) {
      setTimeout(() => { throw error; }); // the caller's bug: show it, but keep following the payment
    }
  };
  const end = (status, fields = {}) => {
    const reason = fields.reason;
    return {
      paymentId,
      orderId: (last && last.orderId) || undefined,
      checkoutRequestId,
      orderNumber: (last && last.orderNumber) || undefined,
      answer: last,
      idempotencyKey: key,
      ...fields,
      status,
      message: fields.message || (reason ? reasonText(reason) : ""),
    };
  };
  const cancelled = () => end("cancelled", { reason: "aborted" });

  const body = pushBody({ amount, items, link, description, accountReference, orderId });
  const msisdn = normalisePhone(phone);
  if (!msisdn) return end("error", { reason: "invalid", field: "phone", message: PHONE_ERROR });
  body.phone = msisdn;
  if (signal && signal.aborted) return cancelled();

  // 1. The push. No answer at all (or "still in progress") is re-sent with the same key.
  report("sending", maxPolls);
  let answer = null;
  for (let attempt = 0; ; attempt += 1) {
    let timedOut = false;
    try {
      answer = await fetchJson(`${base}/stkpush`, {
        method: "POST",
        body,
        headers: { "Idempotency-Key": key },
        timeout: PUSH_TIMEOUT,
        signal,
      });
    } catch (error) {
      answer = null;
      timedOut = error && error.name === "AbortError";
    }
    if (signal && signal.aborted) {
      if (answer && followable(answer)) follow(answer.body); // sent: the caller may still follow it
      return cancelled();
    }
    const retry = (!answer && !timedOut) || (answer && stillRunning(answer));
    if (!retry || attempt >= PUSH_RETRIES) break;
    report("retrying", maxPolls, { attempt: attempt + 1 });
    await pause(PUSH_RETRY_DELAY * (attempt + 1), signal);
    if (signal && signal.aborted) return cancelled();
  }
  if (!(answer && followable(answer))) return end("error", pushError(answer));
  follow(answer.body);
  const settled = answer.status === 200 && verdict(answer.body); // a retry may learn the end at once
  if (settled) return end(...settled);
  waitingSince = Date.now();
  report("waiting", maxPolls);

  // 2. Follow it: one poll at a time, every pollInterval, at most maxPolls.
  const statusUrl = `${base}/stkpush/status/${encodeURIComponent(paymentId || checkoutRequestId)}`;
  let failedInARow = 0;
  let failedPolls = 0;
  for (let polls = 1; polls <= maxPolls; polls += 1) {
    await pause(pollInterval, signal);
    if (signal && signal.aborted) return cancelled();
    let poll = null;
    try {
      poll = await fetchJson(statusUrl, { timeout: POLL_TIMEOUT, signal });
    } catch {
      poll = null;
    }
    // An abort while the answer's body was read leaves a bodiless answer: not a failed poll.
    if (signal && signal.aborted) return cancelled();
    const data = poll && poll.body;
    if (poll && poll.status === 200 && data) {
      failedInARow = 0;
      follow(data);
      const settled = verdict(data);
      if (settled) return end(...settled);
      report("waiting", maxPolls - polls);
    } else if (poll && poll.status === 404) {
      return end("error", { reason: "not_found", httpStatus: 404 });
    } else {
      // Network trouble or a busy server: ask again quietly; the caller decides when to say so.
      failedInARow += 1;
      failedPolls += 1;
      report("retrying", maxPolls - polls, { failedInARow });
    }
  }
  if (failedInARow > 0 || failedPolls > maxPolls / 2) return end("error", { reason: "lost_contact" });
  return end("timeout", { reason: "no_answer" });
}

/** How a status answer ends the checkout, as end()'s arguments; null while it is pending. */
function verdict(data) {
  if (data.status === "completed") return ["completed", { message: "Payment received." }];
  if (data.status !== "failed") return null;
  const reason = data.reason || "error";
  // "error" covers anything M-Pesa did not explain to us: its own words are the best we have.
  const known = reason !== "error" && REASONS[reason];
  return ["failed", { reason, message: known ? reasonText(reason) : data.message || reasonText("error") }];
}

function pushBody({ amount, items, link, description, accountReference, orderId }) {
  const given = [amount, items, link].filter((v) => v !== undefined && v !== null && v !== "");
  if (given.length !== 1) throw new TypeError("startCheckout needs exactly one of amount, items or link");
  const body = {};
  const put = (name, value) => {
    if (value !== undefined && value !== null && value !== "") body[name] = value;
  };
  put("orderId", orderId);
  if (link) {
    // The signature covers these values exactly as the shop wrote them: send them untouched.
    for (const name of ["amount", "accountReference", "description", "expires", "signature"]) put(name, link[name]);
    return body;
  }
  if (items) body.items = items.map(({ id, quantity }) => ({ id, quantity }));
  else body.amount = amount;
  put("description", description);
  put("accountReference", accountReference);
  return body;
}

/** A push answer naming a payment that may still be paid: accepted, or unanswered by M-Pesa. */
function followable(answer) {
  const data = answer.body || {};
  const id = data.paymentId || data.checkoutRequestId;
  if (answer.status === 200) return Boolean(id && data.status); // a replay may be any state
  // M-Pesa did not answer the push, but the payment may be on its way, or already paid (its
  // callback can beat the push's answer): follow it until the server knows.
  return answer.status >= 502 && answer.status <= 504 && Boolean(data.paymentId)
    && ["pending", "completed"].includes(data.status);
}

function stillRunning(answer) {
  const data = answer.body || {};
  return answer.status === 409 && data.field !== "items" && /in progress/i.test(data.message || "");
}

/** What a refused (or unanswered) push means, as the fields of an "error" result. */
function pushError(answer) {
  if (!answer) return { reason: "network" };
  const data = answer.body || {};
  const fields = { httpStatus: answer.status };
  if (data.field) fields.field = data.field;
  switch (answer.status) {
    case 400:
      return { ...fields, reason: "invalid", message: data.message || reasonText("invalid") };
    case 409:
      if (data.itemId || data.field === "items") {
        return { ...fields, reason: "sold_out", itemId: data.itemId, message: data.message || reasonText("sold_out") };
      }
      return { ...fields, reason: stillRunning(answer) ? "in_progress" : "conflict" };
    case 413:
      return { ...fields, reason: "too_large" };
    case 429: {
      const wait = Number(answer.headers && answer.headers.get("Retry-After"));
      return { ...fields, reason: "rate_limited", retryAfter: Number.isFinite(wait) && wait > 0 ? wait : undefined };
    }
    case 502:
      return {
        ...fields,
        reason: "refused",
        message: data.message ? `M-Pesa turned the payment request down: ${data.message}` : reasonText("refused"),
      };
    case 503:
      return { ...fields, reason: "unavailable" };
    case 504:
      return { ...fields, reason: "gateway_timeout" };
    default:
      return { ...fields, reason: "server_error", message: data.message || reasonText("server_error") };
  }
}

function pause(ms, signal) {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      if (signal) signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    if (signal) signal.addEventListener("abort", done, { once: true });
  });
}
