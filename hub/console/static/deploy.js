// Edge deployments and a deployment's page: rollout state, countdowns, gates, waves, charts, history, devices.
import { BAR_ORDER, api, countsBar, duration, h, pill, query, section, table, toast, when } from "./lib.js";
import { lineChart, telemetryCharts } from "./charts.js";

const PAGE = 50;

export async function deployments(root) {
  root.append(h("h1", {}, "Edge deployments"));
  const body = root.appendChild(h("div"));
  return async () => {
    const [deps, rollouts] = await Promise.all([api("/deployments"), api("/rollouts")]);
    const latest = {};
    for (const r of rollouts) if (!latest[r.deployment]) latest[r.deployment] = r;  // newest first
    body.replaceChildren(table(["Name", "Module", "Target", "Priority", "Revision", "Latest rollout"],
      deps.map((d) => h("tr", { "data-deployment": d.name },
        h("td", {}, h("a", { class: "row-link", href: `#/deployments/${encodeURIComponent(d.name)}` }, d.name)),
        h("td", {}, d.module), h("td", {}, h("code", {}, d.target)), h("td", {}, String(d.priority)),
        h("td", {}, `${d.revision} (stable ${d.stable_revision ?? "-"})`),
        h("td", {}, latest[d.name] ? pill(latest[d.name].state, latest[d.name].phase) : "")),
      ), "no deployments: `edgefleet deploy edge NAME --module M:V --target '*'`"));
  };
}

// "wave 2 times out in 4m 10s": counts down every second between polls, from the hub's deadline
const countdowns = new Set();
setInterval(() => {
  for (const el of countdowns) {
    if (!el.isConnected) { countdowns.delete(el); continue; }
    el.textContent = duration(Number(el.dataset.deadline) - Date.now() / 1000 - Number(el.dataset.skew));
  }
}, 1000);

function countdown(deadline, left) {
  const el = h("strong", { "data-countdown": "", "data-deadline": deadline, "data-skew": deadline - left - Date.now() / 1000 }, duration(left));
  countdowns.add(el);
  return el;
}

function gates(last) {
  if (!last) return h("p", { class: "muted" }, "no gate checked yet");
  return h("div", {}, h("p", {}, pill(last.ok ? "passed" : "failed", last.ok ? "succeeded" : "failed")),
    table(["Check", "Value", "Limit", "Result", "Note"], last.checks.map((c) => h("tr", { "data-gate": c.name },
      h("td", {}, c.name), h("td", {}, c.value == null ? "n/a" : String(+c.value.toPrecision(3))), h("td", {}, String(c.limit)),
      h("td", {}, pill(c.ok ? "ok" : "failed", c.ok ? "running" : "failed")), h("td", {}, c.note || "")))));
}

export async function deployment(root, name) {
  const enc = encodeURIComponent(name);
  const actions = h("div", { class: "toolbar" });
  const head = h("div", { id: "rollout-head" });
  const parts = Object.fromEntries([["waves", "Waves"], ["gates", "Last gate"], ["charts", "Latency, errors and drift (last hour)"],
    ["history", "Revisions and rollouts"], ["events", "Recent events"]].map(([k, t]) => [k, section(t, k)]));
  const state = h("select", { name: "state", "aria-label": "device state" },
    ["", ...BAR_ORDER].map((s) => h("option", { value: s }, s || "any state")));
  const q = h("input", { type: "search", name: "q", placeholder: "device id", "aria-label": "filter devices" });
  const count = h("span", { class: "muted", id: "rollout-device-count" });
  const more = h("button", { "data-page": "next" }, "Next →");
  const first = h("button", { "data-page": "first" }, "First");
  const devices = h("div");
  root.append(h("a", { class: "row-link", href: "#/deployments" }, "← all deployments"), h("h1", {}, `Deployment ${name}`),
    actions, head, parts.waves.el, parts.gates.el, parts.charts.el,
    h("h2", {}, "Devices"), h("div", { class: "toolbar" }, state, q, first, more, count), devices, parts.history.el, parts.events.el);
  const act = (action, confirmText) => h("button", {
    class: action === "abort" || action === "rollback" ? "danger" : "", "data-action": action,
    onclick: async () => {
      if (confirmText && !window.confirm(confirmText)) return;
      try {
        await api(`/rollouts/${enc}/${action}`, { method: "POST" });
        toast(`${action}: done`);
      } catch (e) { toast(`${action} refused: ${e.message}`, true); }
      await refresh();
    },
  }, action[0].toUpperCase() + action.slice(1));
  actions.append(act("pause"), act("resume"), act("abort", `Abort the rollout of ${name}?`),
    act("rollback", `Roll ${name} back to its previous revision?`));
  let cursor = "", next = null, slow = 0;
  const restart = () => { cursor = ""; refresh().catch(() => {}); };
  let debounce = null;
  q.addEventListener("input", () => { clearTimeout(debounce); debounce = setTimeout(restart, 250); });
  state.addEventListener("change", restart);
  first.addEventListener("click", restart);
  more.addEventListener("click", () => { if (next) { cursor = next; refresh(); } });

  async function refresh() {
    let st;
    try { st = await api(`/rollouts/${enc}` + query({ limit: PAGE, cursor, state: state.value, q: q.value.trim() })); } catch (e) {
      if (e.status !== 404) throw e;
      head.replaceChildren(h("p", { class: "muted" }, e.message));
      return;
    }
    next = st.next_cursor;
    more.disabled = !next;
    const holding = st.holding_count ? h("div", { class: "holding", "data-holding": "" },
      h("p", {}, `wave ${st.wave} waits for ${st.holding_count} device(s); it times out in `, countdown(st.wave_timeout_at, st.wave_timeout_in_s)),
      h("div", { class: "holding-list" }, st.holding.map((d) => h("a", {
        class: `pill state-${d.online ? d.state : "offline"}`, "data-holding-device": d.id, href: `#/devices/${encodeURIComponent(d.id)}`,
        title: `${d.online ? "online" : "offline"}, ${d.install_state}, last seen ${when(d.last_seen)}`,
      }, `${d.id}${d.online ? "" : " (offline)"}${d.hold ? ` (${d.hold.text})` : ""}`))),
      st.holding_count > st.holding.length ? h("p", { class: "muted" }, `the first ${st.holding.length} named, offline ones first`) : "") : "";
    head.replaceChildren(
      h("p", {}, pill(st.state, st.phase), ` revision ${st.revision} (${st.module})`, st.from_module ? ` from ${st.from_module}` : "",
        ` · wave ${st.wave} of ${st.waves} (${st.strategy.join(" → ")}) · bake ${st.bake_s}s · on failure ${st.on_failure}`),
      st.bake_ends_at ? h("p", { "data-bake": "" }, "baking; gates are checked in ", countdown(st.bake_ends_at, st.bake_ends_in_s)) : "",
      st.reason ? h("p", { class: "error", "data-reason": "" }, st.reason) : "",
      st.outcome ? h("p", { "data-outcome": "" }, `outcome: ${st.outcome}`) : "",
      countsBar(st.counts), holding);
    parts.waves.show(table(["Wave", "Size", "Devices moved", "Progress"], st.by_wave.map((w) => h("tr", { "data-wave": w.wave },
      h("td", {}, `${w.wave}${w.wave === st.wave && !st.terminal ? " (current)" : ""}`), h("td", {}, w.label),
      h("td", {}, String(w.devices)), h("td", {}, w.devices ? countsBar(w.counts) : h("span", { class: "muted" }, "not started"))))));
    parts.gates.show(gates(st.last_gate));
    count.textContent = `${st.devices.length} shown of ${st.devices_total.toLocaleString()} matching`;
    devices.replaceChildren(table(["Device", "Wave", "State", "Install state", "Error"], st.devices.map((d) => h("tr", { "data-device": d.id },
      h("td", {}, h("a", { class: "row-link", href: `#/devices/${encodeURIComponent(d.id)}` }, d.id), d.online ? "" : h("span", { class: "muted" }, " (offline)")),
      h("td", {}, d.wave == null ? "" : String(d.wave)), h("td", {}, pill(d.state)),
      h("td", {}, d.install_state || "", d.hold ? h("div", { class: "muted", "data-device-hold": "" }, d.hold.text) : ""),
      h("td", {}, d.error || ""))), "no devices match"));
    if (slow++ % 5 === 0) await slowParts(st);  // history, charts and events change slowly: every 5th poll
  }

  async function slowParts(st) {
    const t = Date.now() / 1000;
    await Promise.all([
      Promise.all([api(`/deployments/${enc}/revisions`), api(`/rollouts${query({ deployment: name })}`)]).then(([revs, ros]) =>
        parts.history.show(table(["Revision", "Module", "Target", "Created", "Rollouts"], revs.map((r) => h("tr", { "data-revision": r.revision },
          h("td", {}, String(r.revision) + (r.revision === st.revision ? " (this rollout)" : "")), h("td", {}, r.module),
          h("td", {}, h("code", {}, r.target)), h("td", {}, `${when(r.created_at)} by ${r.created_by || "?"}`),
          h("td", {}, ros.filter((x) => x.revision === r.revision).map((x) => pill(`#${x.id} ${x.state}`, x.phase))))))),
      (e) => parts.history.fail(e)),
      Promise.all([
        api("/metrics/series" + query({ deployment: name, step: 60, since: t - 3600, until: t })),
        api(`/drift/${enc}/series` + query({ window: 300, points: 12 })).catch((e) => e),
      ]).then(([rows, drift]) => parts.charts.show(h("div", { class: "charts" }, telemetryCharts(rows, "deployment"),
        drift instanceof Error ? h("p", { class: "muted", "data-chart": "drift" }, `drift: ${drift.message}`)
          : lineChart({ id: "drift", title: "Input drift (PSI per feature)", series: Object.entries(drift.psi).map(([f, v]) =>
            ({ name: f, points: v.map((p, i) => [drift.t[i], p]) })) }))), (e) => parts.charts.fail(e)),
      api("/audit" + query({ subject: name, limit: 15 })).then((ev) => parts.events.show(table(["When", "Who", "What", "Detail"],
        ev.map((e) => h("tr", {}, h("td", {}, when(e.ts)), h("td", {}, e.actor), h("td", {}, e.action),
          h("td", {}, h("code", {}, JSON.stringify(e.detail))))), "no events")), (e) => parts.events.fail(e)),
    ]);
  }
  return refresh;
}
