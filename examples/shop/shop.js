// A small shop on its own origin that sells from the payment server's catalogue and takes the
// payment with the server's checkout module. No build step: this file, index.html, shop.css.
//
// The payment server's address is the body's data-server attribute; everything the shop asks
// of it goes there: GET /catalog, the checkout module, and (through it) the push and polls.
const SERVER = (document.body.dataset.server || "").replace(/\/+$/, "");

const $ = (id) => document.getElementById(id);
const cart = new Map(); // item id -> quantity
let catalog = []; // [{id, name, price, description, kind, capacity, available}]
let checkout = null; // the checkout module, once loaded
let simulatorMode = false;
let paying = false;

function say(element, text) {
  element.textContent = text || "";
  element.hidden = !text;
}

function show(view) {
  for (const name of ["cart", "progress", "result"]) $(`${name}-view`).hidden = name !== view;
}

const KES = new Intl.NumberFormat("en-KE", { maximumFractionDigits: 0 });
const kes = (amount) => `KES ${KES.format(amount)}`;

// ---- the catalogue

async function loadCatalog() {
  try {
    const response = await fetch(`${SERVER}/catalog`, { headers: { Accept: "application/json" } });
    const data = await response.json();
    if (!response.ok || !Array.isArray(data.items)) throw new Error(data.message || `HTTP ${response.status}`);
    catalog = data.items;
    say($("catalog-status"), "");
  } catch {
    say($("catalog-status"), "The shop cannot be loaded right now. Please try again in a moment.");
    return false;
  }
  renderProducts();
  renderCart();
  return true;
}

function left(item) {
  return item.available == null ? Infinity : item.available - (cart.get(item.id) || 0);
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function renderProducts() {
  $("products").replaceChildren(...catalog.map((item) => {
    const card = element("li", `product product-${item.kind === "ticket" ? "ticket" : "item"}`);
    card.dataset.id = item.id;
    const stock = item.available == null ? ""
      : item.available <= 0 ? "Sold out" : `${item.available} left`;
    const add = element("button", "add-button", item.available === 0 ? "Sold out" : "Add to cart");
    add.type = "button";
    add.disabled = paying || left(item) <= 0;
    add.setAttribute("aria-label", `Add ${item.name} to the cart`);
    add.addEventListener("click", () => change(item.id, +1));
    card.append(
      element("h2", "product-name", item.name),
      element("p", "product-description", item.description || ""),
      element("p", "product-price", kes(item.price)),
      element("p", item.available === 0 ? "product-stock sold-out" : "product-stock", stock),
      add,
    );
    return card;
  }));
}

// ---- the cart

function change(id, by) {
  const item = catalog.find((i) => i.id === id);
  const quantity = Math.max(0, (cart.get(id) || 0) + by);
  if (!item || (by > 0 && left(item) <= 0)) return;
  if (quantity === 0) cart.delete(id);
  else cart.set(id, quantity);
  renderProducts();
  renderCart();
  $("status").textContent = `${item.name}: ${quantity} in the cart.`;
}

function quantityButton(label, text, onClick, disabled) {
  const button = element("button", "qty-button", text);
  button.type = "button";
  button.setAttribute("aria-label", label);
  button.disabled = disabled;
  button.addEventListener("click", onClick);
  return button;
}

function renderCart() {
  const lines = [...cart.entries()].map(([id, quantity]) => ({ item: catalog.find((i) => i.id === id), quantity }))
    .filter((line) => line.item);
  const total = lines.reduce((sum, line) => sum + line.item.price * line.quantity, 0);
  $("cart-lines").replaceChildren(...lines.map(({ item, quantity }) => {
    const row = element("li", "cart-line");
    row.dataset.id = item.id;
    const controls = element("span", "qty");
    controls.append(
      quantityButton(`One ${item.name} fewer`, "−", () => change(item.id, -1), paying),
      element("span", "qty-count", String(quantity)),
      quantityButton(`One more ${item.name}`, "+", () => change(item.id, +1), paying || left(item) <= 0),
    );
    const name = element("span", "cart-name", item.name);
    if (left(item) < 0) {
      // Someone else bought it since the page loaded: say so on the line itself.
      name.append(element("span", "cart-note", item.available > 0 ? `Only ${item.available} left` : "Sold out"));
    }
    row.append(name, controls, element("span", "cart-price", kes(item.price * quantity)));
    return row;
  }));
  const short = lines.some(({ item }) => left(item) < 0);
  $("pay-button").disabled = paying || short;
  say($("cart-short"), short ? "Lower the quantities marked above, then pay." : "");
  const empty = lines.length === 0;
  $("cart-empty").hidden = !empty;
  $("cart-lines").hidden = empty;
  $("cart-total-row").hidden = empty;
  $("checkout-form").hidden = empty;
  $("cart-total").textContent = kes(total);
}

// ---- paying

$("phone").addEventListener("input", () => {
  if (checkout && checkout.normalizePhone($("phone").value)) say($("phone-error"), "");
});

$("checkout-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (paying || !checkout) return;
  say($("banner"), "");
  const phone = checkout.normalizePhone($("phone").value);
  if (!phone) {
    say($("phone-error"), checkout.PHONE_ERROR);
    $("phone").setAttribute("aria-invalid", "true");
    $("phone").focus();
    return;
  }
  $("phone").removeAttribute("aria-invalid");
  say($("phone-error"), "");
  paying = true;
  $("pay-button").disabled = true;
  $("pay-button").textContent = "Sending the request…";
  renderProducts();
  renderCart();

  const items = [...cart.entries()].map(([id, quantity]) => ({ id, quantity }));
  let clock = null;
  const result = await checkout.startCheckout({
    server: SERVER,
    phone,
    items,
    description: "DJ Kraph Live shop",
    onProgress(progress) {
      if (progress.state === "sending" || !progress.paymentId) return;
      if (!clock) clock = waiting(phone, progress);
      $("progress-note").textContent = progress.state === "retrying" && progress.failedInARow >= 3
        ? "We are having trouble reaching the payment server. Still trying…" : "";
    },
  });
  if (clock) clearInterval(clock);
  paying = false;
  $("pay-button").disabled = false;
  $("pay-button").textContent = "Pay with M-Pesa";
  finished(result);
});

function waiting(phone, progress) {
  show("progress");
  const answer = progress.answer || {};
  $("progress-heading").textContent = "Check your phone and enter your M-Pesa PIN";
  $("progress-detail").textContent = answer.amount != null
    ? `We sent a request for ${kes(answer.amount)} to ${localPhone(phone)}.`
    : `We sent a payment request to ${localPhone(phone)}.`;
  say($("progress-order"), answer.orderNumber ? `Order ${answer.orderNumber}` : "");
  const link = $("handset-link");
  link.href = `${SERVER}/handset.html?phone=${encodeURIComponent(phone)}`;
  link.hidden = !simulatorMode;
  $("progress-heading").focus();
  $("status").textContent = "Payment request sent. Check your phone and enter your M-Pesa PIN.";
  const deadline = Date.now() + progress.secondsLeft * 1000;
  const bar = $("progress-bar");
  bar.max = progress.secondsLeft;
  const tick = () => {
    const seconds = Math.max(0, Math.ceil((deadline - Date.now()) / 1000));
    bar.value = bar.max - seconds;
    $("progress-time").textContent = `Time left: ${Math.floor(seconds / 60)}:${String(seconds % 60).padStart(2, "0")}`;
  };
  tick();
  return setInterval(tick, 1000);
}

function finished(result) {
  const receipt = $("receipt-link");
  const order = result.orderNumber || (result.answer && result.answer.orderNumber);
  if (result.status === "error" && !result.paymentId) {
    // Refused before any prompt: back to the cart, with the reason.
    show("cart");
    if (result.field === "phone") {
      say($("phone-error"), result.message);
      $("phone").focus();
    } else {
      say($("banner"), result.message);
    }
    if (result.reason === "sold_out") loadCatalog(); // show what is left now
    return;
  }
  show("result");
  say($("result-order"), order ? `Order ${order}` : "");
  if (result.status === "completed") {
    const data = result.answer || {};
    const tickets = Array.isArray(data.tickets) ? data.tickets.length : 0;
    $("result-heading").textContent = "Payment received";
    $("result-message").textContent = `Thank you! M-Pesa receipt ${data.MpesaReceiptNumber || ""}`.trim()
      + (tickets ? `. Your ${tickets === 1 ? "ticket is" : `${tickets} tickets are`} ready.` : ".");
    receipt.href = `${SERVER}/confirmation.html?paymentId=${encodeURIComponent(result.paymentId)}`;
    receipt.hidden = false;
    cart.clear();
    loadCatalog();
  } else {
    $("result-heading").textContent = result.status === "timeout" ? "No answer from your phone" : "Payment not completed";
    $("result-message").textContent = result.message;
    receipt.hidden = true;
  }
  $("result-view").classList.toggle("result-ok", result.status === "completed");
  $("status").textContent = `${$("result-heading").textContent}. ${$("result-message").textContent}`;
  $("result-heading").focus();
}

$("again-button").addEventListener("click", () => {
  show("cart");
  loadCatalog(); // a payment that did not complete gives its items back
});

function localPhone(msisdn) {
  const rest = msisdn.slice(3);
  return `0${rest.slice(0, 3)} ${rest.slice(3, 6)} ${rest.slice(6)}`;
}

// ---- start: the checkout module and the catalogue come from the payment server

async function start() {
  try {
    checkout = await import(`${SERVER}/static/js/mpesa-checkout.js`);
  } catch {
    say($("banner"), "Payments are not available right now: the payment server cannot be reached.");
  }
  if (!(await loadCatalog())) return;
  try {
    const health = await (await fetch(`${SERVER}/health`)).json();
    simulatorMode = health.mode === "simulator"; // the demo: offer the simulated phone
  } catch {
    simulatorMode = false;
  }
}

start();
