// The pay page: check the form, start the STK push, then follow it to the end.
import { fetchJson, newKey, pageConfig, say } from "./api.js";
import { PHONE_ERROR, approxUsd, checkAmount, formatKes, localPhone, normalisePhone } from "./phone.js";

const config = pageConfig();
const POLL_EVERY_MS = 3000;
const MAX_POLLS = 40; // 2 minutes
const WAIT_SECONDS = (POLL_EVERY_MS * MAX_POLLS) / 1000;
const TROUBLE_AFTER = 3; // failed polls in a row before we say so

const $ = (id) => document.getElementById(id);
const form = $("pay-form");
const phoneInput = $("phone");
const amountInput = $("amount");
const payButton = $("pay-button");
const banner = $("banner");
const phoneHint = $("phone-hint");
const phoneHintText = phoneHint.textContent;
const views = { form: $("form-view"), wait: $("wait-view"), result: $("result-view") };

const REASONS = {
  cancelled: ["Payment cancelled", "You cancelled the payment on your phone."],
  wrong_pin: ["Wrong PIN", "The M-Pesa PIN entered on the phone was wrong, so the payment did not go through."],
  insufficient_funds: ["Not enough money on M-Pesa", "The M-Pesa balance is too low for this payment. Top up, then try again."],
  timeout: ["Payment timed out", "The payment request timed out on the phone before the PIN was entered."],
};

const PUSH_ERRORS = {
  409: "This payment clashes with one sent a moment ago with other details. Reload the page, then try again.",
  413: "The payment details are too long to send.",
  429: "Too many payment requests in a short time. Please wait a minute, then try again.",
  503: "M-Pesa cannot be reached right now. Please try again in a few minutes.",
  504: "M-Pesa did not answer in time. If a payment request shows up on your phone you can still approve it; otherwise wait a minute and try again.",
};

let busy = false;
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
  say($(`${name}-error`), text);
  if (text) input.setAttribute("aria-invalid", "true");
  else input.removeAttribute("aria-invalid");
}

function checkPhone() {
  const phone = normalisePhone(phoneInput.value);
  if (phone) {
    fieldError("phone", "");
    phoneHint.textContent = `The request goes to ${localPhone(phone)}.`;
  } else {
    phoneHint.textContent = phoneHintText;
    if (touched.phone) fieldError("phone", phoneInput.value.trim() ? PHONE_ERROR : "Enter your M-Pesa phone number.");
  }
  return phone;
}

function checkAmountField() {
  const result = checkAmount(amountInput.value, config.maxAmount);
  $("amount-usd").textContent = result.error ? "" : approxUsd(result.value, config.usdToKesRate);
  if (!result.error) fieldError("amount", "");
  else if (touched.amount) fieldError("amount", result.error);
  return result;
}

function release() {
  busy = false;
  payButton.disabled = false;
  payButton.textContent = "Pay with M-Pesa";
  form.removeAttribute("aria-busy");
}

function showBanner(text) {
  say(banner, text);
}

phoneInput.addEventListener("input", checkPhone);
phoneInput.addEventListener("blur", () => {
  if (phoneInput.value.trim()) touched.phone = true;
  checkPhone();
});
amountInput.addEventListener("input", checkAmountField);
amountInput.addEventListener("blur", () => {
  if (amountInput.value.trim()) touched.amount = true;
  checkAmountField();
});

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  if (busy) return;
  showBanner("");
  touched.phone = touched.amount = true;
  const phone = checkPhone();
  const amount = checkAmountField();
  if (!phone || amount.error) {
    (phone ? amountInput : phoneInput).focus();
    return;
  }

  const body = { phone, amount: amount.value };
  for (const name of ["description", "accountReference"]) {
    const value = form.elements[name].value.trim();
    if (value) body[name] = value;
  }
  const text = JSON.stringify(body);
  const key = unanswered && unanswered.body === text ? unanswered.key : newKey();

  busy = true;
  payButton.disabled = true;
  payButton.textContent = "Sending the request…";
  form.setAttribute("aria-busy", "true");
  announce("Sending the payment request to your phone.");

  let answer;
  try {
    answer = await fetchJson(config.urls.stkpush, {
      method: "POST",
      body,
      headers: { "Idempotency-Key": key },
      timeout: 45000,
    });
  } catch {
    unanswered = { key, body: text };
    showBanner("We could not reach the payment server. Check your internet connection, then press Pay again. "
      + "If a payment request shows up on your phone, you can still approve it.");
    release();
    return;
  }
  const data = answer.body || {};
  // The first send with this key is still running on the server: the next press replays it.
  const stillSending = answer.status === 409 && /in progress/i.test(data.message || "");
  unanswered = stillSending ? { key, body: text } : null;

  if (answer.status === 200 && data.success && data.checkoutRequestId) {
    wait(data.checkoutRequestId, phone, amount.value);
    return;
  }
  release();
  if (answer.status === 400 && (data.field === "phone" || data.field === "amount")) {
    fieldError(data.field, data.field === "phone" ? PHONE_ERROR : data.message);
    (data.field === "phone" ? phoneInput : amountInput).focus();
  } else if (stillSending) {
    showBanner("Your payment request is still on its way. Wait a few seconds, then press Pay again.");
  } else if (answer.status === 502) {
    showBanner(`M-Pesa turned the payment request down${data.message ? `: ${data.message}` : "."}`);
  } else {
    showBanner(PUSH_ERRORS[answer.status] || data.message
      || "Something went wrong while starting the payment. Please try again.");
  }
});

function wait(checkoutRequestId, phone, amount) {
  show("wait");
  $("wait-detail").textContent = `We sent a request for ${formatKes(amount)} to ${localPhone(phone)}.`;
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
  progress.max = WAIT_SECONDS;
  const tick = () => {
    const used = Math.min(WAIT_SECONDS, (Date.now() - started) / 1000);
    const left = Math.ceil(WAIT_SECONDS - used);
    progress.value = used;
    timeLeft.textContent = `Time left: ${Math.floor(left / 60)}:${String(left % 60).padStart(2, "0")}`;
  };
  tick();
  const clock = setInterval(tick, 1000);

  let polls = 0;
  let failedInARow = 0;
  let failedPolls = 0;
  const end = (heading, message) => {
    clearInterval(clock);
    finish(heading, message);
  };

  const poll = async () => {
    polls += 1;
    let answer = null;
    try {
      answer = await fetchJson(config.urls.status, {
        method: "POST",
        body: { checkoutRequestId },
        timeout: 10000,
      });
    } catch {
      answer = null;
    }
    const data = answer && answer.body;
    if (answer && answer.status === 200 && data) {
      failedInARow = 0;
      $("wait-note").textContent = "";
      if (data.status === "completed") {
        clearInterval(clock);
        announce("Payment received. Opening your receipt.");
        remember(true);
        window.location.assign(`${config.urls.confirmation}?checkoutRequestId=${encodeURIComponent(checkoutRequestId)}`);
        return;
      }
      if (data.status === "failed") {
        const [heading, message] = REASONS[data.reason]
          || ["Payment not completed", data.message || "M-Pesa could not complete the payment."];
        end(heading, message);
        return;
      }
    } else if (answer && answer.status === 404) {
      end("We lost track of this payment",
        "The payment server no longer has a record of this payment, so we cannot tell whether it went through. "
        + "Check your M-Pesa messages before you pay again.");
      return;
    } else {
      // Network trouble or a busy server: keep asking quietly, say so only if it lasts.
      failedInARow += 1;
      failedPolls += 1;
      if (failedInARow >= TROUBLE_AFTER) {
        $("wait-note").textContent = "We are having trouble reaching the payment server. Still trying…";
      }
    }
    if (polls >= MAX_POLLS) {
      if (failedInARow > 0 || failedPolls > MAX_POLLS / 2) {
        end("We could not check your payment",
          "We lost contact with the payment server, so we do not know whether the payment went through. "
          + "Check your M-Pesa messages before you pay again.");
      } else {
        end("No answer from your phone",
          "We waited 2 minutes without an answer, so the payment request has timed out. "
          + "If you did enter your PIN, check your M-Pesa messages before you pay again.");
      }
      return;
    }
    setTimeout(poll, POLL_EVERY_MS);
  };
  setTimeout(poll, POLL_EVERY_MS);
}

function finish(heading, message) {
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
if (!$("amount-error").hidden) {
  touched.amount = true;
  amountInput.setAttribute("aria-invalid", "true");
}
