// Shared helpers of the console. Every value from a device or a user goes into the page as text (h()), never HTML.

export const TOKEN_KEY = "edgefleet.token";
export const $ = (sel) => document.querySelector(sel);
export const session = { token: sessionStorage.getItem(TOKEN_KEY) || "", role: "", name: "" };
// operator and admin tokens may act (send commands, start batch jobs); a viewer's only looks (the hub enforces it)
export const canOperate = () => session.role === "operator" || session.role === "admin";
export const bytes = (n) => (n >= 2 ** 20 ? `${(n / 2 ** 20).toFixed(1)} MB` : n >= 1024 ? `${(n / 1024).toFixed(1)} KB` : `${n} B`);

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== false && v !== null && v !== undefined) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) el.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return el;
}

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

export async function api(path, options = {}) {
  const resp = await fetch("/api/v1" + path, {
    ...options,
    headers: { "Authorization": `Bearer ${session.token}`, "Content-Type": "application/json", ...(options.headers || {}) },
  });
  const text = await resp.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = text; }
  if (!resp.ok) {
    const detail = body && body.detail !== undefined ? body.detail : `HTTP ${resp.status}`;
    throw new ApiError(resp.status, typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return body;
}

// "/devices" + query({q: "x", limit: 50}): empty values left out
export const query = (params) => {
  const s = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v !== null && v !== undefined));
  return s.toString() ? `?${s}` : "";
};

export function toast(message, bad = false) {
  const t = $("#toast");
  t.textContent = message;
  t.className = bad ? "bad" : "";
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 6000);
}

export const pill = (text, state = text) => h("span", { class: `pill state-${state}` }, text);
export const when = (ts) => (ts ? new Date(ts * 1000).toLocaleString() : "never");
export const labelText = (labels) => Object.entries(labels || {}).map(([k, v]) => `${k}=${v}`).join(", ");
export const duration = (s) => (s >= 3600 ? `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`
  : s >= 60 ? `${Math.floor(s / 60)}m ${Math.floor(s % 60)}s` : `${Math.max(0, Math.round(s))}s`);
export const ago = (ts) => (ts ? `${duration(Date.now() / 1000 - ts)} ago` : "never");

export function table(headers, rows, empty = "nothing yet") {
  return h("table", {},
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: headers.length, class: "muted" }, empty))));
}

// a two-column table of an object's keys and values (values that are objects shown as JSON)
export const kvTable = (obj, empty = "none") => table(["Key", "Value"], Object.entries(obj || {}).map(([k, v]) =>
  h("tr", { "data-key": k }, h("td", {}, k), h("td", {}, typeof v === "object" ? JSON.stringify(v) : String(v)))), empty);

export function card(label, value, id) {
  return h("div", { class: "card", "data-card": id }, h("div", { class: "label" }, label), h("div", { class: "value" }, String(value)));
}

// rollout buckets (hub/rollout/rollout_view.py), in the order the bar shows them
export const BAR_ORDER = ["running", "installing", "downloading", "pending", "waiting", "new", "not_moved", "failed", "rolled_back"];

export function countsBar(counts) {
  const total = Object.values(counts).reduce((a, b) => a + b, 0) || 1;
  const keys = [...BAR_ORDER.filter((k) => counts[k]), ...Object.keys(counts).filter((k) => !BAR_ORDER.includes(k))];
  return h("div", {},
    h("div", { class: "bar", role: "img", "aria-label": keys.map((k) => `${k} ${counts[k]}`).join(", ") },
      keys.map((k) => h("span", { class: `seg-${k}`, style: `width:${(100 * counts[k]) / total}%`, title: `${k}: ${counts[k]}` }))),
    h("div", { class: "legend" }, keys.map((k) => h("span", { "data-count": k }, `${k}: ${counts[k]}`))));
}

// a section whose body is replaced on each refresh; a failing source shows its reason in place, not a blank page
export function section(title, id) {
  const body = h("div", { "data-section": id });
  return { el: h("section", {}, h("h2", {}, title), body), body,
    show(...nodes) { body.replaceChildren(...nodes); },
    fail(e) { body.replaceChildren(h("p", { class: "muted" }, e.message)); } };
}
