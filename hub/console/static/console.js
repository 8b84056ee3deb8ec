// The edgefleet operations console: a single page over the hub's /api/v1, no framework, no CDN.
// Every value that comes from a device or a user is put in the page as text (h() in lib.js), never as HTML.
import { $, TOKEN_KEY, api, card, h, pill, session, table, when } from "./lib.js";
import { device, devices } from "./fleet.js";
import { deployment, deployments } from "./deploy.js";
import { batchJob, batchJobs } from "./batch.js";

const REFRESH_MS = 2000;
let refresh = null;   // the current view's refresh function: it fetches only what the view shows
let timer = null;

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

  devices,
  device,
  deployments,
  deployment,
  batch: batchJobs,
  batchJob,

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

// A poll waits for the previous one and backs off to 5x its duration, so a slow hub is never asked faster
// than it answers (a deployment page over 10,000 devices costs the hub more than a page of 50 devices).
let busy = false, nextAt = 0;

async function tick(force = false) {
  if (!refresh || (!force && (busy || Date.now() < nextAt))) return;
  const started = Date.now();
  busy = true;
  try {
    await refresh();
    $("#live").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    if (e.status === 401) return signOut("The hub refused the token (expired or revoked): sign in again.");
    $("#live").textContent = `hub not answering: ${e.message}`;
  } finally {
    busy = false;
    nextAt = started + Math.max(REFRESH_MS, 5 * (Date.now() - started));
  }
}

async function route() {
  if (!session.token) return;
  const [, view = "overview", arg] = location.hash.split("/").map(decodeURIComponent);
  const name = arg && view === "deployments" ? "deployment" : arg && view === "devices" ? "device"
    : arg && view === "batch" ? "batchJob" : views[view] ? view : "overview";
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.view === view);
  const root = $("#view");
  root.replaceChildren();
  refresh = null;
  refresh = await views[name](root, arg);
  await tick(true);
}

function signOut(message = "") {
  session.token = session.role = "";
  sessionStorage.removeItem(TOKEN_KEY);
  refresh = null;
  $("#view").hidden = $("#nav").hidden = $("#logout").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message;
}

async function signIn(candidate) {
  session.token = candidate;
  try {
    await api("/fleet/summary");
    Object.assign(session, await api("/whoami"));  // the role decides which actions the pages offer
  } catch (e) {
    signOut(e.status === 401 || e.status === 403 ? `Token refused: ${e.message}` : `Hub not reachable: ${e.message}`);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, session.token);
  $("#login").hidden = true;
  $("#view").hidden = $("#nav").hidden = $("#logout").hidden = false;
  await route();
}

window.addEventListener("DOMContentLoaded", () => {
  $("#login").addEventListener("submit", (ev) => { ev.preventDefault(); signIn($("#token").value.trim()); });
  $("#logout").addEventListener("click", () => signOut());
  window.addEventListener("hashchange", route);
  timer = setInterval(() => { if (!document.hidden) tick(); }, 250);  // tick() decides when the next poll is due
  if (session.token) signIn(session.token); else signOut();
});
