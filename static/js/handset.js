// The simulated phone: show the simulator's pending prompts and answer them.
import { fetchJson, pageConfig, say } from "./api.js";
import { localPhone, normalisePhone } from "./phone.js";

const config = pageConfig();
const $ = (id) => document.getElementById(id);
const POLL_EVERY_MS = 1000;
const CLOCK = new Intl.DateTimeFormat("en-KE", { timeZone: "Africa/Nairobi", hour: "2-digit", minute: "2-digit", hour12: false });
const KSH = new Intl.NumberFormat("en-KE", { minimumFractionDigits: 2, maximumFractionDigits: 2 });

let phone = normalisePhone(new URLSearchParams(window.location.search).get("phone"));
let state = "idle"; // idle | prompt | acting | result
let current = null; // the prompt on the screen

function show(view) {
  for (const name of ["setup", "idle", "prompt", "result"]) $(`${name}-view`).hidden = name !== view;
}

function announce(text) {
  $("status").textContent = text;
}

function promptText(prompt) {
  const amount = Number(prompt.amount);
  const to = prompt.businessShortCode || config.shortcode;
  const account = prompt.accountReference ? ` account ${prompt.accountReference}` : "";
  return `Do you want to pay Ksh ${Number.isFinite(amount) ? KSH.format(amount) : prompt.amount} to ${to}${account}? Enter M-PESA PIN`;
}

function showPrompt(prompt, count) {
  current = prompt;
  state = "prompt";
  show("prompt");
  $("prompt-text").textContent = promptText(prompt);
  $("pin").value = "";
  say($("pin-error"), "");
  setButtons(true);
  $("prompt-count").textContent = count > 1 ? `1 of ${count} requests` : "";
  announce("M-Pesa payment request. " + promptText(prompt));
  $("pin").focus();
}

function showResult(text) {
  state = "result";
  current = null;
  show("result");
  $("result-text").textContent = text;
  announce(text);
  $("result-text").focus();
}

function setButtons(enabled) {
  for (const id of ["ok-button", "cancel-button", "timeout-button", "pin"]) $(id).disabled = !enabled;
}

function idle() {
  state = "idle";
  current = null;
  show("idle");
  $("idle-number").textContent = localPhone(phone);
}

function outcome(action, prompt) {
  const amount = `Ksh ${KSH.format(Number(current?.amount ?? prompt.amount))}`;
  if (prompt.status === "completed") {
    const receipt = prompt.receipt ? `${prompt.receipt} Confirmed. ` : "Confirmed. ";
    return `${receipt}${amount} paid to ${prompt.businessShortCode || config.shortcode}${prompt.accountReference ? ` for account ${prompt.accountReference}` : ""}.`;
  }
  if (action === "cancel") return "You cancelled the payment request.";
  if (action === "timeout") return "The payment request timed out.";
  if (prompt.resultCode === 2001) return "Wrong PIN. The payment was not made.";
  return prompt.resultDesc || "The payment did not go through.";
}

async function act(action) {
  if (state !== "prompt" || !current) return;
  const body = {};
  if (action === "pin") {
    const pin = $("pin").value.trim();
    if (!pin) {
      say($("pin-error"), "Enter your M-PESA PIN.");
      $("pin").focus();
      return;
    }
    body.pin = pin;
  }
  state = "acting";
  setButtons(false);
  const url = `${config.urls.prompts}/${encodeURIComponent(current.checkoutRequestId)}/${action}`;
  let answer;
  try {
    answer = await fetchJson(url, { method: "POST", body, timeout: 10000 });
  } catch {
    answer = null;
  }
  const data = (answer && answer.body) || {};
  const prompt = data.prompt || data;
  if (answer && answer.ok && prompt.status && prompt.status !== "pending") {
    showResult(outcome(action, prompt));
  } else if (answer && answer.status === 409) {
    showResult("This payment request is no longer waiting: it was already answered or it expired.");
  } else {
    state = "prompt";
    setButtons(true);
    const reason = !answer ? "The simulator could not be reached. Try again."
      : answer.ok ? "The simulator did not finish this request. Try again."
        : data.message || data.error || `The simulator refused (HTTP ${answer.status}).`;
    say($("pin-error"), reason);
    $("pin").focus();
  }
}

async function poll() {
  $("handset-clock").textContent = CLOCK.format(new Date());
  let answer = null;
  try {
    answer = await fetchJson(`${config.urls.prompts}?phone=${encodeURIComponent(phone)}`, { timeout: 5000 });
  } catch {
    answer = null;
  }
  if (answer && answer.status === 200 && answer.body && Array.isArray(answer.body.prompts)) {
    say($("handset-trouble"), "");
    const pending = answer.body.prompts.filter((prompt) => prompt.status === "pending" || !prompt.status);
    if (state === "idle" && pending.length) {
      showPrompt(pending[0], pending.length);
    } else if (state === "prompt" && current) {
      if (!pending.some((prompt) => prompt.checkoutRequestId === current.checkoutRequestId)) {
        showResult("This payment request has expired.");
      } else {
        $("prompt-count").textContent = pending.length > 1 ? `1 of ${pending.length} requests` : "";
      }
    }
  } else {
    say($("handset-trouble"), answer && answer.status === 503
      ? "No signal: the simulator is not answering."
      : "No signal: cannot reach the server.");
  }
  setTimeout(poll, POLL_EVERY_MS);
}

$("prompt-form").addEventListener("submit", (event) => {
  event.preventDefault();
  act("pin");
});
$("cancel-button").addEventListener("click", () => act("cancel"));
$("timeout-button").addEventListener("click", () => act("timeout"));
$("dismiss-button").addEventListener("click", idle);

$("setup-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const chosen = normalisePhone($("setup-phone").value);
  if (!chosen) {
    say($("setup-error"), "Enter a number such as 0712 345 678.");
    return;
  }
  phone = chosen;
  window.history.replaceState(null, "", `?phone=${phone}`);
  start();
});

function start() {
  document.title = `Phone ${localPhone(phone)} · M-Pesa payments`;
  idle();
  poll();
}

$("handset-clock").textContent = CLOCK.format(new Date());
if (phone) {
  start();
} else {
  show("setup");
  $("setup-phone").focus();
}
