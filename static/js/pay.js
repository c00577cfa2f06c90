// The pay page: check the form, show the cart, then let mpesa-checkout.js start the STK push
// and follow it; this script only keeps the page's views up to date.
import { fetchJson, pageConfig, say } from "./api.js";
import { reasonText, startCheckout } from "./mpesa-checkout.js";
import { PHONE_ERROR, approxUsd, checkAmount, formatKes, localPhone, normalisePhone } from "./phone.js";

const config = pageConfig();
const SERVER = config.urls.stkpush.replace(/\/stkpush$/, ""); // "" unless mounted under a prefix
const POLL_EVERY_MS = 3000;
const MAX_POLLS = 40; // 2 minutes
const WAIT_SECONDS = (POLL_EVERY_MS * MAX_POLLS) / 1000;
const PROMPT_SECONDS = config.promptSeconds || 60; // how long the PIN prompt stays on the phone
const SAFARICOM = config.safaricomPrefixes || [];
const TROUBLE_AFTER = 3; // failed polls in a row before we say so

const $ = (id) => document.getElementById(id);
const form = $("pay-form");
const phoneInput = $("phone");
const amountInput = $("amount"); // absent when paying for a cart
const payButton = $("pay-button");
const banner = $("banner");
const phoneHint = $("phone-hint");
const phoneHintText = phoneHint.textContent;
const views = { form: $("form-view"), wait: $("wait-view"), result: $("result-view") };
const params = new URLSearchParams(window.location.search);

// What this link pays for: a cart of catalogue items, a signed amount, or a typed amount.
const cart = $("cart") ? parseCart(params.get("items")) : null;
const signed = !cart && params.has("signature");

const HEADINGS = {
  cancelled: "Payment cancelled",
  wrong_pin: "Wrong PIN",
  insufficient_funds: "Not enough money on M-Pesa",
  timeout: "Payment timed out",
  no_answer: "No answer from your phone",
  lost_contact: "We could not check your payment",
  not_found: "We lost track of this payment",
  unknown: "No answer from M-Pesa",
};

let busy = false;
let blocked = ""; // why this link cannot be paid (a broken cart or link); "" when it can
let unanswered = null; // {key, body}: a push that got no answer is re-sent with the same key
const touched = { phone: false, amount: false };

function announce(text) {
  $("status").textContent = text;
}

function show(view) {
  for (const [name, element] of Object.entries(views)) element.hidden = name !== view;
}

function fieldError(name, text) {
  const input = name === "phone" ? phoneInput : amountInput;
  if (!input) return false;
  say($(`${name}-error`), text);
  if (text) input.setAttribute("aria-invalid", "true");
  else input.removeAttribute("aria-invalid");
  return true;
}

function checkPhone() {
  const phone = normalisePhone(phoneInput.value);
  if (phone) {
    fieldError("phone", "");
    const national = phone.slice(3);
    phoneHint.textContent = SAFARICOM.length && !SAFARICOM.some((prefix) => national.startsWith(prefix))
      ? `${localPhone(phone)} does not look like a Safaricom number: M-Pesa prompts go to Safaricom lines only (a number moved to Safaricom still works).`
      : `The request goes to ${localPhone(phone)}.`;
  } else {
    phoneHint.textContent = phoneHintText;
    if (touched.phone) fieldError("phone", phoneInput.value.trim() ? PHONE_ERROR : "Enter your M-Pesa phone number.");
  }
  return phone;
}

function checkAmountField() {
  if (!amountInput) return { value: null };
  const result = checkAmount(amountInput.value, config.maxAmount);
  $("amount-usd").textContent = result.error ? "" : approxUsd(result.value, config.usdToKesRate);
  if (!result.error) fieldError("amount", "");
  else if (touched.amount) fieldError("amount", result.error);
  return result;
}

function release() {
  busy = false;
  payButton.disabled = Boolean(blocked);
  payButton.textContent = "Pay with M-Pesa";
  form.removeAttribute("aria-busy");
}

function showBanner(text) {
  say(banner, text);
}

function block(text) {
  blocked = text;
  showBanner(text);
  payButton.disabled = true;
}

phoneInput.addEventListener("input", checkPhone);
phoneInput.addEventListener("blur", () => {
  if (phoneInput.value.trim()) touched.phone = true;
  checkPhone();
});
if (amountInput) {
  amountInput.addEventListener("input", checkAmountField);
  amountInput.addEventListener("blur", () => {
    if (amountInput.value.trim()) touched.amount = true;
    checkAmountField();
  });
}

// ---- the cart: ?items=<id>:<qty>,<id>:<qty>, priced by the server's catalogue

/** "a:2,b" -> [{id: "a", quantity: 2}, {id: "b", quantity: 1}], or null when malformed. */
function parseCart(text) {
  const lines = [];
  for (const part of String(text || "").split(",")) {
    const match = /^\s*([A-Za-z0-9_-]{1,64})\s*(?::\s*(\d{1,3})\s*)?$/.exec(part);
    if (!match) return null;
    const quantity = match[2] === undefined ? 1 : Number(match[2]);
    if (quantity < 1) return null;
    const line = lines.find((l) => l.id === match[1]);
    if (line) line.quantity += quantity;
    else lines.push({ id: match[1], quantity });
  }
  return lines.length ? lines : null;
}

function cartRow(cells) {
  const row = document.createElement("tr");
  cells.forEach((text, n) => {
    const cell = document.createElement(n === 0 ? "th" : "td");
    if (n === 0) cell.scope = "row";
    else cell.className = "num";
    cell.textContent = text;
    row.append(cell);
  });
  return row;
}

async function showCart() {
  const section = $("cart");
  const rows = $("cart-rows");
  if (!cart) {
    section.removeAttribute("aria-busy");
    $("cart-total").textContent = "—";
    block("This payment link's list of items is not valid, so it cannot be paid. Ask the shop for a new link.");
    return;
  }
  const fill = (lines, total) => {
    rows.replaceChildren(...lines.map((line) => cartRow(line)));
    $("cart-total").textContent = total === null ? "Set when you pay" : formatKes(total);
    $("cart-usd").textContent = total === null ? "" : approxUsd(total, config.usdToKesRate);
    section.removeAttribute("aria-busy");
  };
  fill(cart.map((line) => [line.id, String(line.quantity), ""]), null);

  let catalog = null;
  try {
    const answer = await fetchJson(`${SERVER}/catalog`, { timeout: 10000 });
    if (answer.status === 200 && answer.body && Array.isArray(answer.body.items)) catalog = answer.body.items;
  } catch {
    catalog = null; // the server prices the order anyway
  }
  if (!catalog) {
    $("cart-hint").textContent = "We could not load the prices just now; the shop's prices apply when you pay.";
    return;
  }
  const byId = new Map(catalog.map((item) => [item.id, item]));
  const unknown = cart.filter((line) => !byId.has(line.id));
  if (unknown.length) {
    fill(cart.map((line) => [byId.get(line.id)?.name || line.id, String(line.quantity), ""]), null);
    block(`This payment link asks for something the shop does not sell (${unknown.map((l) => l.id).join(", ")}). `
      + "Ask the shop for a new link.");
    return;
  }
  let total = 0;
  const lines = cart.map((line) => {
    const item = byId.get(line.id);
    total += item.price * line.quantity;
    const name = line.quantity > 1 ? `${item.name} (${formatKes(item.price)} each)` : item.name;
    return [name, String(line.quantity), formatKes(item.price * line.quantity)];
  });
  fill(lines, total);
  const gone = cart.map((line) => byId.get(line.id))
    .filter((item, n) => item.available != null && item.available < cart[n].quantity);
  if (gone.length) {
    block(`Sold out: ${gone.map((item) => (item.available > 0
      ? `${item.name} (only ${item.available} left)` : item.name)).join(", ")}.`);
  } else if (total > config.maxAmount) {
    block(`This order comes to ${formatKes(total)}, more than the ${formatKes(config.maxAmount)} one M-Pesa payment may be.`);
  }
}

// ---- paying

function orderFromForm(phone, amount) {
  const text = (name) => form.elements[name].value.trim();
  if (cart) return { items: cart, description: text("description"), accountReference: text("accountReference") };
  if (signed) {
    // The shop signed these values exactly as they are in the link: send them untouched.
    const raw = (name) => params.get(name) ?? undefined;
    return { link: { amount: raw("amount"), accountReference: raw("accountReference"),
      description: raw("description"), expires: raw("expires"), signature: raw("signature") } };
  }
  return { amount, description: text("description"), accountReference: text("accountReference") };
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  if (busy || blocked) return;
  showBanner("");
  touched.phone = touched.amount = true;
  const phone = checkPhone();
  const amount = checkAmountField();
  if (!phone || amount.error) {
    (phone ? amountInput : phoneInput).focus();
    return;
  }

  const order = orderFromForm(phone, amount.value);
  const text = JSON.stringify({ phone, ...order });
  const key = unanswered && unanswered.body === text ? unanswered.key : undefined;

  busy = true;
  payButton.disabled = true;
  payButton.textContent = "Sending the request…";
  form.setAttribute("aria-busy", "true");
  announce("Sending the payment request to your phone.");

  let waiting = null;
  const result = await startCheckout({
    server: SERVER,
    phone,
    ...order,
    idempotencyKey: key,
    pollInterval: POLL_EVERY_MS,
    maxPolls: MAX_POLLS,
    onProgress(progress) {
      if (progress.state === "sending" || !progress.paymentId) return;
      if (!waiting) waiting = wait(phone, progress.answer, amount.value);
      waiting.update(progress);
    },
  });
  if (waiting) waiting.stop();
  // A push that got no answer (or is still running on the server) is re-sent with its key.
  unanswered = ["network", "in_progress"].includes(result.reason) ? { key: result.idempotencyKey, body: text } : null;

  if (result.status === "completed") {
    announce("Payment received. Opening your receipt.");
    remember(true);
    window.location.assign(`${config.urls.confirmation}?paymentId=${encodeURIComponent(result.paymentId)}`);
  } else if (result.paymentId) {
    ended(result);
  } else {
    refused(result);
  }
});

/** The push was not accepted: say why next to the field, or in the banner. */
function refused(result) {
  release();
  if (result.reason === "invalid" && (result.field === "phone" || result.field === "amount")
      && fieldError(result.field, result.field === "phone" ? PHONE_ERROR : result.message)) {
    (result.field === "phone" ? phoneInput : amountInput).focus();
    return;
  }
  if (result.reason === "network") {
    showBanner("We could not reach the payment server. Check your internet connection, then press Pay again. "
      + "If a payment request shows up on your phone, you can still approve it.");
  } else if (result.reason === "in_progress") {
    showBanner("Your payment request is still on its way. Wait a few seconds, then press Pay again.");
  } else if (result.reason === "sold_out") {
    block(sentence(result.message));
  } else if (result.reason === "invalid" && ["signature", "expires"].includes(result.field)) {
    block(`${sentence(result.message)} Ask the shop for a new payment link.`);
  } else {
    showBanner(result.message);
  }
}

function sentence(text) {
  return /[.!?]$/.test(text) ? text : `${text}.`;
}

/** The waiting view: the request was sent; a clock and the polls' news keep it current. */
function wait(phone, answer, typedAmount) {
  show("wait");
  const amount = answer && answer.amount != null ? answer.amount : typedAmount;
  $("wait-detail").textContent = amount != null
    ? `We sent a request for ${formatKes(amount)} to ${localPhone(phone)}.`
    : `We sent a payment request to ${localPhone(phone)}.`;
  say($("wait-order"), answer && answer.orderNumber ? `Order ${answer.orderNumber}` : "");
  $("wait-note").textContent = "";
  const handsetLink = $("handset-link");
  if (handsetLink && config.urls.handset) {
    handsetLink.href = `${config.urls.handset}?phone=${encodeURIComponent(phone)}`;
  }
  $("wait-heading").focus();
  announce("Payment request sent. Check your phone and enter your M-Pesa PIN.");

  const started = Date.now();
  const progress = $("wait-progress");
  const timeLeft = $("time-left");
  progress.max = PROMPT_SECONDS;
  const tick = () => {
    const used = Math.min(PROMPT_SECONDS, (Date.now() - started) / 1000);
    const left = Math.ceil(PROMPT_SECONDS - used);
    progress.value = used;
    timeLeft.textContent = left > 0
      ? `Time left to enter your PIN: ${Math.floor(left / 60)}:${String(left % 60).padStart(2, "0")}`
      : "The prompt on your phone has closed. Waiting for M-Pesa's answer…";
  };
  tick();
  const clock = setInterval(tick, 1000);
  return {
    update(progressReport) {
      // Network trouble is ridden out quietly; say so only if it lasts.
      $("wait-note").textContent = progressReport.state === "retrying" && progressReport.failedInARow >= TROUBLE_AFTER
        ? "We are having trouble reaching the payment server. Still trying…" : "";
    },
    stop() {
      clearInterval(clock);
    },
  };
}

/** The payment was sent but did not complete: say why, offer Try again. */
function ended(result) {
  let heading = HEADINGS[result.reason] || "Payment not completed";
  let message = result.message;
  if (result.reason === "no_answer") {
    message = `We waited ${WAIT_SECONDS / 60} minutes without an answer, so the payment request has timed out. `
      + "If you did enter your PIN, check your M-Pesa messages before you pay again.";
  } else if (result.status === "error" && !HEADINGS[result.reason]) {
    heading = "We could not check your payment";
    message = reasonText("lost_contact");
  }
  show("result");
  $("result-heading").textContent = heading;
  $("result-message").textContent = message;
  announce(`${heading}. ${message}`);
  $("result-heading").focus();
}

$("retry-button").addEventListener("click", () => {
  show("form");
  release();
  announce("");
  phoneInput.focus();
});

function remember(value) {
  const key = "pay:left-for-receipt";
  try {
    if (value === undefined) return sessionStorage.getItem(key) === "1";
    if (value) sessionStorage.setItem(key, "1");
    else sessionStorage.removeItem(key);
  } catch {
    // Storage turned off: the Back button then shows the page as it was left.
  }
  return false;
}

// Coming back from the receipt with the Back button restores a page that was waiting.
window.addEventListener("pageshow", (event) => {
  if (event.persisted && remember()) {
    remember(false);
    show("form");
    release();
  }
});

checkPhone();
checkAmountField();
if (amountInput && !$("amount-error").hidden) {
  touched.amount = true;
  amountInput.setAttribute("aria-invalid", "true");
}
if ($("cart")) showCart();
if (signed && amountInput && !amountInput.readOnly) {
  block("The amount in this payment link is not valid, so it cannot be paid. Ask the shop for a new link.");
}
