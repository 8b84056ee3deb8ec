// The device list (server-side search, filters, keyset pages) and a device's own page.
import { ago, api, h, kvTable, labelText, pill, query, section, table, when } from "./lib.js";
import { telemetryCharts } from "./charts.js";
import { commandsPart } from "./diag.js";

const PAGE = 50;
const STATUSES = ["", "online", "offline", "failed", "pending", "installing", "running", "idle"];

export async function devices(root) {
  const q = h("input", { type: "search", name: "q", placeholder: "id, label or module", "aria-label": "search devices" });
  const status = h("select", { name: "status", "aria-label": "status" },
    STATUSES.map((s) => h("option", { value: s }, s || "any status")));
  const label = h("input", { type: "search", name: "label", placeholder: "site=berlin,tier!=test", "aria-label": "label filter" });
  const deployment = h("input", { type: "search", name: "deployment", placeholder: "deployment", "aria-label": "deployment filter" });
  const count = h("span", { class: "muted", id: "device-count" });
  const prev = h("button", { "data-page": "prev" }, "← Previous");
  const next = h("button", { "data-page": "next" }, "Next →");
  const chips = h("div", { class: "chips" });
  const body = h("div");
  root.append(h("h1", {}, "Devices"), h("div", { class: "toolbar" }, q, status, label, deployment),
    chips, h("div", { class: "toolbar" }, prev, next, count), body);
  // keyset pages: cursors[i] is the cursor that fetched page i (page 0: none)
  let cursors = [""], at = 0, last = null, seq = 0;
  const filters = () => ({ q: q.value.trim(), status: status.value, label: label.value.trim(), deployment: deployment.value.trim() });
  const load = async () => {
    const mine = ++seq;  // a slow answer to an older filter must not overwrite a newer one
    const page = await api("/devices" + query({ ...filters(), limit: PAGE, cursor: cursors[at] }));
    if (mine !== seq) return;
    last = page;
    const from = page.total ? at * PAGE + 1 : 0;
    count.textContent = `${from.toLocaleString()}–${(at * PAGE + page.items.length).toLocaleString()} of ${page.total.toLocaleString()}`;
    prev.disabled = at === 0;
    next.disabled = !page.next_cursor;
    chips.replaceChildren(...Object.entries(page.counts).filter(([, n]) => n).map(([s, n]) =>
      h("button", { class: `pill state-${s}`, "data-status": s, onclick: () => { status.value = s; restart(); } }, `${s}: ${n.toLocaleString()}`)));
    body.replaceChildren(table(["Device", "Connection", "State", "Labels", "Modules", "Inferences", "Last seen"],
      page.items.map((d) => h("tr", { "data-device": d.id },
        h("td", {}, h("a", { class: "row-link", href: `#/devices/${encodeURIComponent(d.id)}` }, d.id)),
        h("td", {}, pill(d.online ? "online" : "offline")),
        h("td", {}, pill(d.state, d.state), d.error ? h("div", { class: "error" }, d.error) : "",
          d.hold ? h("div", { class: "muted", "data-list-hold": "" }, d.hold.text) : ""),
        h("td", {}, labelText(d.labels)),
        h("td", {}, d.modules.map((m) => [pill(`${m.name}:${m.version} ${m.state}`, m.state),
          m.error ? h("div", { class: "error" }, m.error) : ""])),
        h("td", {}, d.inferences.toLocaleString()),
        h("td", { title: when(d.last_seen) }, ago(d.last_seen)))), "no devices match"));
  };
  const restart = () => { cursors = [""]; at = 0; load().catch(() => {}); };
  let debounce = null;
  for (const input of [q, label, deployment]) {
    input.addEventListener("input", () => { clearTimeout(debounce); debounce = setTimeout(restart, 250); });
  }
  status.addEventListener("change", restart);
  prev.addEventListener("click", () => { if (at > 0) { at -= 1; load(); } });
  next.addEventListener("click", () => {
    if (!last || !last.next_cursor) return;
    cursors[at + 1] = last.next_cursor;
    at += 1;
    load();
  });
  return load;  // the poll refetches only the page on screen
}

export async function device(root, id) {
  const title = h("h1", {}, "Device ", h("span", { id: "device-id" }, id));
  const head = h("p", { id: "device-head" });
  const parts = Object.fromEntries([["modules", "Modules"], ["telemetry", "Telemetry (last hour)"], ["labels", "Labels"],
    ["facts", "Facts"], ["config", "Configuration (desired state)"], ["reported", "Reported state"], ["events", "Recent events"]]
    .map(([k, t]) => [k, section(t, k)]));
  const diag = commandsPart(id);
  root.append(h("a", { class: "row-link", href: "#/devices" }, "← all devices"), title, head, ...Object.values(parts).map((p) => p.el),
    diag.el);
  return async () => {
    let d;
    try { d = await api(`/devices/${encodeURIComponent(id)}`); } catch (e) {
      if (e.status !== 404) throw e;
      head.replaceChildren(h("span", { class: "error" }, e.message));
      return;
    }
    const t = Date.now() / 1000;
    head.replaceChildren(pill(d.online ? "online" : "offline"), pill(d.state, d.state),
      ` last seen ${ago(d.last_seen)} · desired revision ${d.revision}, reported ${d.reported_revision ?? "-"}${d.reported_source === "offline" ? " (installed offline)" : ""}`,
      ` · ${d.inferences.toLocaleString()} inferences, ${d.errors.toLocaleString()} errors`,
      d.error ? h("div", { class: "error" }, d.error) : "",
      d.hold ? h("div", { class: "holding", "data-hold": "", title: `held since ${when(d.hold.since)}, until ${when(d.hold.until)}` },
        `Updates ${d.hold.text} (an application on the device defers installs)`) : "");
    parts.modules.show(table(["Module", "Deployment", "State", "Error"], d.modules.map((m) => h("tr", { "data-module": m.name },
      h("td", {}, `${m.name}:${m.version}`),
      h("td", {}, m.deployment ? h("a", { class: "row-link", href: `#/deployments/${encodeURIComponent(m.deployment)}` }, m.deployment) : "(not desired)"),
      h("td", {}, pill(m.state, m.state)), h("td", {}, m.error || ""))), "no modules"));
    parts.labels.show(kvTable(d.labels));
    parts.facts.show(kvTable(d.facts));
    parts.config.show(table(["Module", "Bundle", "Deployment", "Collect (ppm)", "Device bake"], d.desired.map((m) => h("tr", {},
      h("td", {}, `${m.name}:${m.version}`), h("td", {}, h("code", {}, m.bundle.slice(0, 19) + "…")), h("td", {}, m.deployment),
      h("td", {}, String(m.collect_rate_ppm ?? 0)), h("td", {}, m.bake ? JSON.stringify(m.bake) : "none"))), "nothing desired"),
      h("p", { class: "muted" }, `signed state expires ${when(d.desired_expires)}; enrolled ${when(d.created_at)}`));
    parts.reported.show(d.reported ? h("pre", { class: "json" }, JSON.stringify(d.reported, null, 2)) : h("p", { class: "muted" }, "nothing reported yet"));
    await Promise.all([
      diag.refresh(d).catch((e) => diag.el.querySelector("[data-commands=history]").replaceChildren(h("p", { class: "muted" }, e.message))),
      api("/metrics/series" + query({ device: id, step: 60, since: t - 3600, until: t }))
        .then((rows) => parts.telemetry.show(h("div", { class: "charts" }, telemetryCharts(rows, "device"))), (e) => parts.telemetry.fail(e)),
      api("/audit" + query({ subject: id, limit: 20 }))
        .then((ev) => parts.events.show(table(["When", "Who", "What", "Detail"], ev.map((e) => h("tr", {},
          h("td", {}, when(e.ts)), h("td", {}, e.actor), h("td", {}, e.action), h("td", {}, h("code", {}, JSON.stringify(e.detail))))),
        "no events")), (e) => parts.events.fail(e)),
    ]);
  };
}
