// The test page: connection test, a raw test STK push, recent test payments and the success rate.
import { fetchJson, newKey, pageConfig } from "./api.js";
import { formatKes, localPhone, normalisePhone } from "./phone.js";

const config = pageConfig();
const $ = (id) => document.getElementById(id);
const STORAGE_KEY = "mpesa-test-payments";
const KEEP = 20;
const REFRESH_EVERY_MS = 5000;
const TIME = new Intl.DateTimeFormat("en-KE", { timeZone: "Africa/Nairobi", dateStyle: "short", timeStyle: "medium" });

const pretty = (value) => JSON.stringify(value, null, 2);

// ---- 1. connection test
$("connection-button").addEventListener("click", async () => {
  const button = $("connection-button");
  button.disabled = true;
  button.textContent = "Testing…";
  const outcome = $("connection-outcome");
  $("connection-result").hidden = false;
  outcome.className = "outcome";
  outcome.textContent = "Testing the connection…";
  let answer;
  try {
    answer = await fetchJson(`${config.urls.health}?deep=1`, { timeout: 30000 });
  } catch {
    answer = null;
  }
  const data = (answer && answer.body) || {};
  const ok = Boolean(answer && answer.status === 200 && data.status === "ok");
  outcome.className = ok ? "outcome outcome-ok" : "outcome outcome-failed";
  outcome.textContent = ok
    ? "ok: the server is up and Daraja gave it an access token."
    : `failed: ${answer ? data.message || data.error || "the server reported a problem" : "the server could not be reached"}.`;
  $("connection-mode").textContent = data.mode || "—";
  $("connection-store").textContent = data.store || "—";
  $("connection-status").textContent = answer ? String(answer.status) : "no answer";
  $("connection-raw").textContent = answer ? pretty(answer.body) : "No answer.";
  button.disabled = false;
  button.textContent = "Test connection";
});

// ---- 2. test push
const phoneInput = $("test-phone");
const handsetLink = $("test-handset-link");

function phoneChanged() {
  const phone = normalisePhone(phoneInput.value);
  $("test-phone-hint").textContent = phone
    ? `Sent to Daraja as ${phone}.`
    : phoneInput.value.trim() ? "The server will refuse this number." : "";
  if (handsetLink) {
    handsetLink.href = phone ? `${config.urls.handset}?phone=${phone}` : config.urls.handset;
  }
}
phoneInput.addEventListener("input", phoneChanged);

$("push-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const button = $("push-button");
  if (button.disabled) return;
  const amountText = form.elements.amount.value.trim();
  const body = {
    phone: form.elements.phone.value,
    amount: /^\d{1,12}$/.test(amountText) ? Number(amountText) : amountText,
    accountReference: form.elements.accountReference.value,
    description: form.elements.description.value,
  };
  const key = newKey();
  $("push-request").textContent = [
    `POST ${config.urls.stkpush}`,
    "Content-Type: application/json",
    `Idempotency-Key: ${key}`,
    "",
    pretty(body),
  ].join("\n");
  $("push-answer").textContent = "Waiting for the answer…";
  button.disabled = true;
  let answer;
  try {
    answer = await fetchJson(config.urls.stkpush, { method: "POST", body, headers: { "Idempotency-Key": key }, timeout: 45000 });
  } catch (error) {
    $("push-answer").textContent = `No answer: ${error.name === "AbortError" ? "timed out" : "network error"}.`;
    button.disabled = false;
    return;
  }
  button.disabled = false;
  $("push-answer").textContent = `HTTP ${answer.status}\n\n${answer.body === null ? "(not JSON)" : pretty(answer.body)}`;
  const data = answer.body || {};
  // A push M-Pesa did not answer in time is still pending: its payment may yet be paid.
  if (data.paymentId && (answer.status === 200 || data.status === "pending")) {
    const phone = normalisePhone(body.phone);
    remember({
      paymentId: data.paymentId,
      phone: phone ? localPhone(phone) : String(body.phone),
      amount: body.amount,
      startedAt: new Date().toISOString(),
      status: data.status || "pending",
      detail: "",
    });
    refreshSoon();
  }
});

// ---- 3. recent payments
function load() {
  try {
    const items = JSON.parse(localStorage.getItem(STORAGE_KEY) || "[]");
    return Array.isArray(items) ? items : [];
  } catch {
    return [];
  }
}

function save(items) {
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(items.slice(0, KEEP)));
  } catch {
    // Storage full or turned off: the table still shows this visit's payments.
  }
  render(items);
}

/** A payment's id: its paymentId (entries kept before payment ids have a checkoutRequestId). */
function idOf(item) {
  return item.paymentId || item.checkoutRequestId;
}

function confirmationLink(item) {
  const name = item.paymentId ? "paymentId" : "checkoutRequestId";
  return `${config.urls.confirmation}?${name}=${encodeURIComponent(idOf(item))}`;
}

function remember(item) {
  save([item, ...load().filter((old) => idOf(old) !== idOf(item))]);
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function render(items = load()) {
  const tbody = $("recent-rows");
  tbody.replaceChildren();
  for (const item of items.slice(0, KEEP)) {
    const row = tbody.insertRow();
    const started = new Date(item.startedAt);
    cell(row, Number.isNaN(started.getTime()) ? "—" : TIME.format(started));
    cell(row, item.phone);
    cell(row, typeof item.amount === "number" ? formatKes(item.amount) : String(item.amount));
    cell(row, item.status, `status status-${String(item.status).replace(/[^a-z_]/g, "")}`);
    cell(row, item.detail || "");
    const idCell = row.insertCell();
    if (item.status === "completed") {
      const link = document.createElement("a");
      link.href = confirmationLink(item);
      link.textContent = idOf(item);
      idCell.append(link);
    } else {
      idCell.textContent = idOf(item);
    }
    idCell.className = "mono";
  }
  $("recent-empty").hidden = items.length > 0;
  $("recent-table").hidden = items.length === 0;
}

async function refresh({ all = false } = {}) {
  const items = load();
  for (const item of items) {
    if (!all && item.status !== "pending") continue;
    let answer;
    try {
      answer = await fetchJson(`${config.urls.status}/${encodeURIComponent(idOf(item))}`, { timeout: 10000 });
    } catch {
      continue;
    }
    const data = answer.body || {};
    if (answer.status === 404) {
      item.status = "not_found";
      item.detail = "The server has no record of it (expired or restarted).";
    } else if (answer.status === 200 && data.status) {
      item.status = data.status;
      item.detail = data.status === "completed"
        ? data.MpesaReceiptNumber || data.transaction_id || ""
        : data.status === "failed" ? `${data.reason || "failed"}: ${data.message || ""}` : "";
    }
  }
  // Merge by id: a push may have been added while we were asking.
  const fresh = new Map(items.map((item) => [idOf(item), item]));
  save(load().map((item) => fresh.get(idOf(item)) || item));
}

let timer = null;
let running = false;
async function refreshLoop() {
  timer = null;
  running = true;
  await refresh();
  running = false;
  loadStats();
  if (load().some((item) => item.status === "pending")) refreshSoon();
}

function refreshSoon() {
  if (timer === null && !running) timer = setTimeout(refreshLoop, REFRESH_EVERY_MS);
}

$("refresh-button").addEventListener("click", async () => {
  const button = $("refresh-button");
  button.disabled = true;
  await refresh({ all: true });
  button.disabled = false;
  loadStats();
});

$("clear-button").addEventListener("click", () => save([]));

// ---- 4. success rate: every payment the server settled since it started (GET /stats)
const statsUrl = $("stats").dataset.url;
const tokenInput = $("stats-token"); // present outside simulator mode only
const PERCENT = new Intl.NumberFormat("en-KE", { style: "percent", maximumFractionDigits: 1 });
const REASONS = {
  cancelled: "Cancelled by the customer",
  timeout: "Timed out",
  insufficient_funds: "Not enough money",
  wrong_pin: "Wrong PIN",
  rejected: "Refused by M-Pesa",
  error: "Other error",
};

function statsProblem(text) {
  const outcome = $("stats-outcome");
  outcome.className = "outcome outcome-failed";
  outcome.textContent = text;
}

async function loadStats() {
  const headers = {};
  if (tokenInput) {
    const token = tokenInput.value.trim();
    if (!token) {
      $("stats-outcome").className = "outcome";
      $("stats-outcome").textContent = "Enter the admin token to see the numbers.";
      return;
    }
    headers.Authorization = `Bearer ${token}`;
  }
  let answer;
  try {
    answer = await fetchJson(statsUrl, { headers, timeout: 10000 });
  } catch {
    statsProblem("The server could not be reached.");
    return;
  }
  if (answer.status !== 200 || !answer.body) {
    statsProblem(answer.status === 401 ? "The admin token was refused."
      : answer.status === 404 ? "Statistics are off: ADMIN_TOKEN is not set on the server."
      : `The server answered HTTP ${answer.status}.`);
    return;
  }
  const data = answer.body;
  $("stats-outcome").className = "outcome";
  $("stats-outcome").textContent = data.payments ? `${data.payments} payment(s) settled.` : "No payment settled yet.";
  $("stats-rate").textContent = data.successRate === null ? "—" : PERCENT.format(data.successRate);
  $("stats-completed").textContent = String(data.byStatus.completed);
  $("stats-failed").textContent = String(data.byStatus.failed);
  const since = new Date(data.since);
  $("stats-since").textContent = Number.isNaN(since.getTime()) ? "—" : TIME.format(since);
  const rows = $("stats-reason-rows");
  rows.replaceChildren();
  for (const [reason, count] of Object.entries(data.byReason || {})) {
    const row = rows.insertRow();
    cell(row, REASONS[reason] ? `${REASONS[reason]} (${reason})` : reason);
    cell(row, String(count));
  }
  $("stats-reasons").hidden = rows.rows.length === 0;
}

$("stats-button").addEventListener("click", loadStats);
if (tokenInput) {
  tokenInput.addEventListener("keydown", (event) => {
    if (event.key === "Enter") loadStats();
  });
}

render();
phoneChanged();
loadStats();
if (load().some((item) => item.status === "pending")) refreshLoop();
