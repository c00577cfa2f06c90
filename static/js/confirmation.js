// The receipt page: read one payment from the status endpoint and show it.
import { fetchJson, pageConfig, say } from "./api.js";
import { formatKes } from "./phone.js";

const config = pageConfig();
const $ = (id) => document.getElementById(id);
const id = new URLSearchParams(window.location.search).get("checkoutRequestId");

const NAIROBI_TIME = new Intl.DateTimeFormat("en-KE", {
  timeZone: "Africa/Nairobi",
  dateStyle: "medium",
  timeStyle: "short",
});

const REASONS = {
  cancelled: "The payment was cancelled on the phone.",
  wrong_pin: "The M-Pesa PIN entered on the phone was wrong.",
  insufficient_funds: "The M-Pesa balance was too low for this payment.",
  timeout: "The payment request timed out before the PIN was entered.",
};

function show(view) {
  for (const name of ["loading", "receipt", "problem"]) $(`${name}-view`).hidden = name !== view;
}

function problem(heading, message, { canRetry = false } = {}) {
  show("problem");
  $("problem-heading").textContent = heading;
  $("problem-message").textContent = message;
  $("check-again").hidden = !canRetry;
  $("status").textContent = `${heading}. ${message}`;
  $("problem-heading").focus();
}

function when(data) {
  const moment = new Date(data.transactionDate || data.completedAt || "");
  if (Number.isNaN(moment.getTime())) return "—";
  return NAIROBI_TIME.format(moment);
}

function receipt(data) {
  show("receipt");
  $("receipt-number").textContent = data.MpesaReceiptNumber || data.transaction_id || "—";
  $("receipt-amount").textContent = data.amount != null ? formatKes(data.amount, { cents: true }) : "—";
  $("receipt-phone").textContent = data.phone || "—";
  $("receipt-date").textContent = when(data);
  say($("receipt-reference"), data.accountReference);
  $("receipt-reference-row").hidden = !data.accountReference;
  say($("receipt-description"), data.description);
  $("receipt-description-row").hidden = !data.description;
  document.title = `Receipt ${$("receipt-number").textContent} · M-Pesa payments`;
  $("status").textContent = "Payment received.";
  $("receipt-heading").focus();
}

async function load() {
  if (!id) {
    problem("No payment to show", "This page shows the receipt of one payment, but the link does not say which one.");
    return;
  }
  show("loading");
  let answer;
  try {
    answer = await fetchJson(`${config.urls.status}/${encodeURIComponent(id)}`);
  } catch {
    problem("We could not load your receipt",
      "The payment server could not be reached. Check your internet connection and try again.", { canRetry: true });
    return;
  }
  const data = answer.body || {};
  if (answer.status === 404) {
    problem("Payment not found",
      "We have no payment with this reference. The link may be incomplete, or the record may have expired.");
  } else if (answer.status !== 200) {
    problem("We could not load your receipt",
      data.message || "The payment server had a problem. Please try again in a moment.", { canRetry: true });
  } else if (data.status === "completed") {
    receipt(data);
  } else if (data.status === "pending") {
    problem("This payment is not finished yet",
      "It is still waiting for the M-Pesa PIN on the phone. Once the PIN is entered, check again.", { canRetry: true });
  } else if (data.status === "failed") {
    problem("This payment did not go through",
      `${REASONS[data.reason] || data.message || "M-Pesa could not complete it."} No receipt was issued.`);
  } else {
    problem("We could not load your receipt", "The payment server gave an answer we did not understand.", { canRetry: true });
  }
}

$("print-button").addEventListener("click", () => window.print());
$("check-again").addEventListener("click", load);
load();
