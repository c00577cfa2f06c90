// What every page script shares: its settings from the page, JSON over fetch, request keys.

/** The server's settings for this page (the JSON block the template fills). */
export function pageConfig() {
  const block = document.getElementById("page-config");
  return JSON.parse(block.textContent);
}

/**
 * fetch() a JSON answer. Resolves to {status, ok, body, headers}; body is null when the answer
 * is not JSON. Rejects only when no answer came (network trouble, no answer in `timeout` ms,
 * or the caller's `signal` aborted).
 */
export async function fetchJson(url, { method = "GET", body, headers = {}, timeout = 15000, signal } = {}) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeout);
  const stop = () => controller.abort();
  if (signal) {
    if (signal.aborted) stop();
    else signal.addEventListener("abort", stop, { once: true });
  }
  try {
    const init = { method, headers: { Accept: "application/json", ...headers }, signal: controller.signal };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(url, init);
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    return { status: response.status, ok: response.ok, body: data, headers: response.headers };
  } finally {
    clearTimeout(timer);
    if (signal) signal.removeEventListener("abort", stop);
  }
}

/** A random UUID; crypto.randomUUID() exists only in secure contexts (HTTPS, localhost). */
export function newKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** Show or hide an element and set its text in one go. */
export function say(element, text) {
  element.textContent = text || "";
  element.hidden = !text;
}
