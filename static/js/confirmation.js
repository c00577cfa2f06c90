// The receipt page: read one payment from the status endpoint and show it, with the order's
// items and, for tickets, each ticket's number and QR code (an <img> of the server's SVG).
import { fetchJson, pageConfig, say } from "./api.js";
import { reasonText } from "./mpesa-checkout.js";
import { formatKes } from "./phone.js";

const config = pageConfig();
const ROOT = config.urls.status.replace(/\/stkpush\/status$/, ""); // "" unless mounted under a prefix
const $ = (id) => document.getElementById(id);
// Links name the payment by its paymentId; older links by Daraja's checkoutRequestId.
const query = new URLSearchParams(window.location.search);
const id = query.get("paymentId") || query.get("checkoutRequestId");

const NAIROBI_TIME = new Intl.DateTimeFormat("en-KE", {
  timeZone: "Africa/Nairobi",
  dateStyle: "medium",
  timeStyle: "short",
});

function show(view) {
  for (const name of ["loading", "receipt", "problem"]) $(`${name}-view`).hidden = name !== view;
}

function problem(heading, message, { canRetry = false, order = "" } = {}) {
  show("problem");
  say($("problem-order"), order ? `Order ${order}` : "");
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
  // An order's reference is its number unless the shop gave one: no need to show it twice.
  const reference = data.accountReference !== data.orderNumber ? data.accountReference : "";
  say($("receipt-reference"), reference);
  $("receipt-reference-row").hidden = !reference;
  say($("receipt-description"), data.description);
  $("receipt-description-row").hidden = !data.description;
  say($("receipt-order"), data.orderNumber);
  $("receipt-order-row").hidden = !data.orderNumber;
  showItems(Array.isArray(data.items) ? data.items : [], data.amount);
  showTickets(Array.isArray(data.tickets) ? data.tickets : []);
  document.title = data.orderNumber
    ? `Order ${data.orderNumber} · M-Pesa payments`
    : `Receipt ${$("receipt-number").textContent} · M-Pesa payments`;
  $("status").textContent = "Payment received.";
  $("receipt-heading").focus();
}

function cell(tag, text, className) {
  const element = document.createElement(tag);
  element.textContent = text;
  if (className) element.className = className;
  return element;
}

function showItems(items, amount) {
  $("order-items").hidden = items.length === 0;
  $("order-rows").replaceChildren(...items.map((line) => {
    const row = document.createElement("tr");
    const name = cell("th", line.quantity > 1 && line.unitPrice != null
      ? `${line.name} (${formatKes(line.unitPrice)} each)` : line.name || line.id);
    name.scope = "row";
    row.append(name, cell("td", String(line.quantity ?? ""), "num"),
      cell("td", line.lineTotal != null ? formatKes(line.lineTotal) : "", "num"));
    return row;
  }));
  $("order-total").textContent = amount != null ? formatKes(amount) : "";
}

/** The QR image's address: the server's own path for it, never another site's. */
function qrSource(ticket) {
  const path = typeof ticket.qr === "string" && /^\/(?!\/)/.test(ticket.qr)
    ? ticket.qr : `/tickets/${encodeURIComponent(ticket.number)}/qr.svg`;
  return ROOT + path;
}

function showTickets(tickets) {
  $("tickets").hidden = tickets.length === 0;
  $("tickets-heading").textContent = tickets.length === 1 ? "Your ticket" : `Your ${tickets.length} tickets`;
  $("ticket-list").replaceChildren(...tickets.map((ticket) => {
    const item = document.createElement("li");
    item.className = "ticket";
    const code = document.createElement("img");
    code.className = "ticket-qr";
    code.src = qrSource(ticket);
    code.alt = `QR code of ticket ${ticket.number}`;
    code.width = code.height = 168;
    item.append(code, cell("p", ticket.name || "", "ticket-name"), cell("p", ticket.number, "ticket-number"));
    return item;
  }));
  $("print-button").textContent = tickets.length ? "Print tickets" : "Print receipt";
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
      "It is still waiting for the M-Pesa PIN on the phone. Once the PIN is entered, check again.",
      { canRetry: true, order: data.orderNumber });
  } else if (data.status === "failed") {
    const why = data.reason && data.reason !== "error" ? reasonText(data.reason) : data.message || reasonText("error");
    problem("This payment did not go through", `${why} No receipt was issued.`, { order: data.orderNumber });
  } else {
    problem("We could not load your receipt", "The payment server gave an answer we did not understand.", { canRetry: true });
  }
}

$("print-button").addEventListener("click", () => window.print());
$("check-again").addEventListener("click", load);
load();
