// The edgefleet fleet console: a single page over the hub's /api/v1, no framework, no CDN.
// Every value that comes from a device or a user is put in the page as text (h() below), never as HTML.

const REFRESH_MS = 2000;
const TOKEN_KEY = "edgefleet.token";
const $ = (sel) => document.querySelector(sel);
let token = sessionStorage.getItem(TOKEN_KEY) || "";
let refresh = null;   // the current view's refresh function
let timer = null;

// --- helpers -------------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== false && v !== null && v !== undefined) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) el.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return el;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const resp = await fetch("/api/v1" + path, {
    ...options,
    headers: { "Authorization": `Bearer ${token}`, "Content-Type": "application/json", ...(options.headers || {}) },
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

function toast(message, bad = false) {
  const t = $("#toast");
  t.textContent = message;
  t.className = bad ? "bad" : "";
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 6000);
}

const pill = (text, state = text) => h("span", { class: `pill state-${state}` }, text);
const when = (ts) => (ts ? new Date(ts * 1000).toLocaleString() : "never");
const labelText = (labels) => Object.entries(labels || {}).map(([k, v]) => `${k}=${v}`).join(", ");

function table(headers, rows, empty = "nothing yet") {
  return h("table", {},
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: headers.length, class: "muted" }, empty))));
}

function card(label, value, id) {
  return h("div", { class: "card", "data-card": id }, h("div", { class: "label" }, label), h("div", { class: "value" }, String(value)));
}

const BAR_ORDER = ["running", "installing", "downloading", "pending", "waiting", "failed", "rolled_back"];

function countsBar(counts) {
  const total = Object.values(counts).reduce((a, b) => a + b, 0) || 1;
  const keys = [...BAR_ORDER.filter((k) => counts[k]), ...Object.keys(counts).filter((k) => !BAR_ORDER.includes(k))];
  return h("div", {},
    h("div", { class: "bar", role: "img", "aria-label": keys.map((k) => `${k} ${counts[k]}`).join(", ") },
      keys.map((k) => h("span", { class: `seg-${k}`, style: `width:${(100 * counts[k]) / total}%`, title: `${k}: ${counts[k]}` }))),
    h("div", { class: "legend" }, keys.map((k) => h("span", { "data-count": k }, `${k}: ${counts[k]}`))));
}

// --- views: each sets up its static part once and returns a refresh function ----------------------

const views = {
  async overview(root) {
    root.append(h("h1", {}, "Fleet overview"));
    const body = root.appendChild(h("div"));
    return async () => {
      const [summary, rollouts, firing] = await Promise.all([api("/fleet/summary"), api("/rollouts"), api("/alerts/firing")]);
      const live = rollouts.filter((r) => !["succeeded", "rolled_back", "aborted", "superseded", "halted"].includes(r.phase));
      body.replaceChildren(
        h("div", { class: "cards" },
          card("Devices online", `${summary.online} / ${summary.devices}`, "online"),
          card("Inferences", summary.inferences.toLocaleString(), "inferences"),
          card("Errors", summary.errors.toLocaleString(), "errors"),
          card("Rollouts in progress", live.length, "rollouts"),
          card("Alerts firing", firing.length, "alerts")),
        h("h2", {}, "Devices by state"),
        h("div", {}, Object.entries(summary.by_state).map(([s, n]) => pill(`${s}: ${n}`, s))),
        h("h2", {}, "Rollouts in progress"),
        table(["Deployment", "Revision", "State", "Started"], live.map((r) => h("tr", {},
          h("td", {}, h("a", { class: "row-link", href: `#/deployments/${encodeURIComponent(r.deployment)}` }, r.deployment)),
          h("td", {}, String(r.revision)), h("td", {}, pill(r.state, r.phase)), h("td", {}, when(r.created_at))))),
        h("h2", {}, "Alerts firing"),
        table(["Rule", "Key", "Value", "Since"], firing.map((a) => h("tr", {},
          h("td", {}, a.rule), h("td", {}, a.key), h("td", {}, a.value == null ? "" : String(a.value)), h("td", {}, when(a.since))))),
      );
    };
  },

  async devices(root) {
    const filter = h("input", { type: "search", placeholder: "filter by id, label or module", "aria-label": "filter devices" });
    const count = h("span", { class: "muted" });
    const body = h("div");
    root.append(h("h1", {}, "Devices"), h("div", { class: "toolbar" }, filter, count), body);
    let devices = [];
    const render = () => {
      const q = filter.value.trim().toLowerCase();
      const shown = devices.filter((d) => !q || [d.id, labelText(d.labels), ...d.modules.map((m) => `${m.name}:${m.version}`)]
        .some((s) => s.toLowerCase().includes(q)));
      count.textContent = `${shown.length} of ${devices.length}`;
      body.replaceChildren(table(["Device", "Connection", "State", "Labels", "Modules", "Inferences", "Last seen"],
        shown.slice(0, 500).map((d) => h("tr", { "data-device": d.id },
          h("td", {}, d.id),
          h("td", {}, pill(d.online ? "online" : "offline")),
          h("td", {}, pill(d.state, d.state), d.error ? h("div", { class: "error" }, d.error) : ""),
          h("td", {}, labelText(d.labels)),
          h("td", {}, d.modules.map((m) => pill(`${m.name}:${m.version} ${m.state}`, m.state))),
          h("td", {}, d.inferences.toLocaleString()),
          h("td", {}, when(d.last_seen)))), "no devices enrolled"));
    };
    filter.addEventListener("input", render);
    return async () => { devices = await api("/devices"); render(); };
  },

  async deployments(root) {
    root.append(h("h1", {}, "Edge deployments"));
    const body = root.appendChild(h("div"));
    return async () => {
      const [deployments, rollouts] = await Promise.all([api("/deployments"), api("/rollouts")]);
      const latest = {};
      for (const r of rollouts) if (!latest[r.deployment]) latest[r.deployment] = r;  // newest first
      body.replaceChildren(table(["Name", "Module", "Target", "Priority", "Revision", "Latest rollout"],
        deployments.map((d) => h("tr", { "data-deployment": d.name },
          h("td", {}, h("a", { class: "row-link", href: `#/deployments/${encodeURIComponent(d.name)}` }, d.name)),
          h("td", {}, d.module), h("td", {}, h("code", {}, d.target)), h("td", {}, String(d.priority)),
          h("td", {}, `${d.revision} (stable ${d.stable_revision ?? "-"})`),
          h("td", {}, latest[d.name] ? pill(latest[d.name].state, latest[d.name].phase) : "")),
        ), "no deployments: `edgefleet deploy edge NAME --module M:V --target '*'`"));
    };
  },

  async deployment(root, name) {
    const title = h("h1", {}, `Deployment ${name}`);
    const actions = h("div", { class: "toolbar" });
    const body = h("div");
    root.append(h("a", { class: "row-link", href: "#/deployments" }, "← all deployments"), title, actions, body);
    const act = (action, confirmText) => h("button", {
      class: action === "abort" || action === "rollback" ? "danger" : "", "data-action": action,
      onclick: async () => {
        if (confirmText && !window.confirm(confirmText)) return;
        try {
          await api(`/rollouts/${encodeURIComponent(name)}/${action}`, { method: "POST" });
          toast(`${action}: done`);
        } catch (e) { toast(`${action} refused: ${e.message}`, true); }
        await tick();
      },
    }, action[0].toUpperCase() + action.slice(1));
    actions.append(act("pause"), act("resume"), act("abort", `Abort the rollout of ${name}?`),
      act("rollback", `Roll ${name} back to its previous revision?`));
    return async () => {
      let st;
      try { st = await api(`/rollouts/${encodeURIComponent(name)}`); } catch (e) {
        if (e.status !== 404) throw e;
        body.replaceChildren(h("p", { class: "muted" }, e.message));
        return;
      }
      body.replaceChildren(
        h("p", {}, pill(st.state, st.phase), ` revision ${st.revision} (${st.module})`,
          st.from_module ? ` from ${st.from_module}` : "", ` · wave ${st.wave} of ${st.waves} (${st.strategy.join(" → ")})`,
          ` · bake ${st.bake_s}s`),
        st.reason ? h("p", { class: "error", "data-reason": "" }, st.reason) : "",
        countsBar(st.counts),
        h("h2", {}, "Devices"),
        table(["Device", "Wave", "State", "Install state", "Error"], st.devices.map((d) => h("tr", { "data-device": d.id },
          h("td", {}, d.id, d.online ? "" : h("span", { class: "muted" }, " (offline)")),
          h("td", {}, d.wave == null ? "" : String(d.wave)), h("td", {}, pill(d.state)),
          h("td", {}, d.install_state || ""), h("td", {}, d.error || "")))),
      );
    };
  },

  async models(root) {
    root.append(h("h1", {}, "Model registry"));
    const body = root.appendChild(h("div"));
    return async () => {
      const models = await api("/models");
      body.replaceChildren(table(["Model", "Framework", "Tags", "Description", "Registered"],
        models.map((m) => h("tr", { "data-model": `${m.name}:${m.version}` },
          h("td", {}, `${m.name}:${m.version}`), h("td", {}, m.framework || ""),
          h("td", {}, Object.entries(m.tags || {}).map(([k, v]) => pill(`${k}=${v}`, "tag"))),
          h("td", {}, m.description || ""), h("td", {}, when(m.created_at)))),
        "no models: `edgefleet model register NAME FILE`"));
    };
  },

  async alerts(root) {
    root.append(h("h1", {}, "Alerts"));
    const body = root.appendChild(h("div"));
    return async () => {
      const [rules, events] = await Promise.all([api("/alerts/rules"), api("/alerts/events?limit=50")]);
      body.replaceChildren(
        h("h2", {}, "Rules"),
        table(["Rule", "Kind", "Deployment", "Threshold", "For", "Webhook"], rules.map((r) => h("tr", {},
          h("td", {}, r.name), h("td", {}, r.kind), h("td", {}, r.deployment || "*"), h("td", {}, String(r.threshold)),
          h("td", {}, `${r.for_s}s`), h("td", {}, r.webhook ? "yes" : "")))),
        h("h2", {}, "Recent events"),
        table(["When", "Rule", "State", "Message", "Webhook"], events.map((e) => h("tr", {},
          h("td", {}, when(e.ts)), h("td", {}, e.rule), h("td", {}, pill(e.state)), h("td", {}, e.message),
          h("td", {}, e.webhook ? (e.delivered ? "delivered" : `${e.attempts} attempt(s) ${e.last_error}`) : "")))),
      );
    };
  },

  async endpoints(root) {
    root.append(h("h1", {}, "Web endpoints"));
    const body = root.appendChild(h("div"));
    return async () => {
      const endpoints = await api("/endpoints");
      body.replaceChildren(table(["Endpoint", "Scoring URL", "Versions (traffic %)", "Replicas", "Max batch"],
        endpoints.map((e) => h("tr", { "data-endpoint": e.name },
          h("td", {}, e.name), h("td", {}, h("code", {}, e.url)),
          h("td", {}, (e.versions || []).map((v) => pill(`${v.module} ${Math.round(v.weight)}%`, "tag"))),
          h("td", {}, String(e.replicas)), h("td", {}, String(e.max_batch)))),
        "no endpoints: `edgefleet deploy web NAME --module M:V`"));
    };
  },
};

// --- routing, refresh, sign-in -------------------------------------------------------------------

async function tick() {
  if (!refresh) return;
  try {
    await refresh();
    $("#live").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    if (e.status === 401) return signOut("The hub refused the token (expired or revoked): sign in again.");
    $("#live").textContent = `hub not answering: ${e.message}`;
  }
}

async function route() {
  if (!token) return;
  const [, view = "overview", arg] = location.hash.split("/").map(decodeURIComponent);
  const name = view === "deployments" && arg ? "deployment" : views[view] ? view : "overview";
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.view === view);
  const root = $("#view");
  root.replaceChildren();
  refresh = null;
  refresh = await views[name](root, arg);
  await tick();
}

function signOut(message = "") {
  token = "";
  sessionStorage.removeItem(TOKEN_KEY);
  refresh = null;
  $("#view").hidden = $("#nav").hidden = $("#logout").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message;
}

async function signIn(candidate) {
  token = candidate;
  try {
    await api("/fleet/summary");
  } catch (e) {
    signOut(e.status === 401 || e.status === 403 ? `Token refused: ${e.message}` : `Hub not reachable: ${e.message}`);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("#login").hidden = true;
  $("#view").hidden = $("#nav").hidden = $("#logout").hidden = false;
  await route();
}

window.addEventListener("DOMContentLoaded", () => {
  $("#login").addEventListener("submit", (ev) => { ev.preventDefault(); signIn($("#token").value.trim()); });
  $("#logout").addEventListener("click", () => signOut());
  window.addEventListener("hashchange", route);
  timer = setInterval(() => { if (!document.hidden) tick(); }, REFRESH_MS);
  if (token) signIn(token); else signOut();
});
