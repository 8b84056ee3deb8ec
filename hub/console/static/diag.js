// A device's "Logs & commands": the signed diagnostic commands of the hub (hub/fleet/commands.py, protocol §5a),
// their states and results, and the command history. Operators only: a viewer's token is told so, not refused later.
import { api, bytes, canOperate, h, pill, session, table, toast, when } from "./lib.js";

const LABELS = { logs: "Fetch logs", support_bundle: "Support bundle", restart_module: "Restart module" };

// what a command's result looks like as text: log lines as lines, anything else as indented JSON
function resultText(c) {
  if (c.result && Array.isArray(c.result.lines)) return c.result.lines.join("\n");
  return c.result == null ? "" : JSON.stringify(c.result, null, 2);
}

const argsText = (args) => Object.entries(args || {}).map(([k, v]) => `${k}=${v}`).join(" ");

// state as operators read it: "sent" waits for the device (until it expires at the hub)
const statePill = (c) => pill(c.state === "sent" ? "waiting" : c.state,
  { done: "succeeded", failed: "failed", expired: "offline", sent: "pending" }[c.state] || c.state);

export function commandsPart(deviceId) {
  const enc = encodeURIComponent(deviceId);
  const body = h("div", { "data-section": "commands" });
  const el = h("section", {}, h("h2", {}, "Logs & commands"), body);
  if (!canOperate()) {
    body.append(h("p", { class: "muted", "data-commands": "denied" },
      `Logs and commands need an operator token; this one (${session.name || "?"}) is a ${session.role || "viewer"}'s.`));
    return { el, refresh: async () => {} };
  }
  const module = h("select", { name: "module", "aria-label": "module" }, h("option", { value: "" }, "agent (every line)"));
  const lines = h("input", { type: "number", name: "lines", min: 1, max: 500, value: 200, "aria-label": "log lines" });
  const history = h("div", { "data-commands": "history" });
  const shown = h("div", { "data-commands": "result" });
  let selected = null;   // the command whose result is shown (the one just sent, or one clicked in the history)
  let modules = [];
  let waiting = false, polls = 0;

  const send = async (name) => {
    const mod = module.value;
    if (name === "restart_module" && !mod) return toast("choose the module to restart", true);
    if (name === "restart_module" && !window.confirm(`Restart module ${mod} on ${deviceId}?`)) return;
    const n = Math.min(500, Math.max(1, Math.round(Number(lines.value)) || 200));  // the device sends at most 500
    const args = name === "logs" ? { lines: n, ...(mod ? { module: mod } : {}) }
      : name === "restart_module" ? { module: mod } : {};
    try {
      const c = await api(`/devices/${enc}/commands`, { method: "POST", body: JSON.stringify({ name, args }) });
      selected = c.id;
      toast(`${LABELS[name]}: sent, signed, waiting for ${deviceId}`);
    } catch (e) { toast(`${LABELS[name]} refused: ${e.message}`, true); }
    await refresh();
  };
  const actions = Object.keys(LABELS).map((name) => h("button", {
    "data-command": name, class: name === "restart_module" ? "danger" : "", onclick: () => send(name) }, LABELS[name]));
  body.append(h("div", { class: "toolbar" }, module, h("label", { class: "muted" }, "lines ", lines), ...actions),
    shown, h("h3", {}, "History"), history);

  let shownKey = "";  // re-drawn only when it changes: a log being read keeps its scroll position between polls
  function showResult(c) {
    const key = c ? `${c.id}:${c.state}` : "";
    if (key === shownKey) return;
    shownKey = key;
    if (!c) { shown.replaceChildren(); return; }
    const text = resultText(c);
    const size = new TextEncoder().encode(text).length;
    shown.replaceChildren(h("div", { class: "result-head", "data-command-id": c.id, "data-state": c.state },
      h("strong", {}, `${c.name} ${argsText(c.args)}`), " ", statePill(c),
      c.state === "sent" ? ` the device answers when it is online (the command expires ${when(c.expires)})` : "",
      c.error ? h("div", { class: "error", "data-command-error": "" }, c.error) : "",
      c.state === "done" && !text ? h("div", { class: "muted" }, "the device answered with nothing (no log lines match)") : "",
      text ? h("div", { class: "muted", "data-result-size": size },
        `${bytes(size)}${c.result && Array.isArray(c.result.lines) ? `, ${c.result.lines.length} lines` : ""}`) : ""),
    text ? h("pre", { class: "json log", "data-result": c.name }, text) : "");
  }

  async function refresh(device) {
    if (device) {  // the device page hands over the modules it just fetched: the module choice follows them
      const names = device.modules.map((m) => m.name);
      if (names.join() !== modules.join()) {
        modules = names;
        const keep = module.value;
        module.replaceChildren(h("option", { value: "" }, "agent (every line)"), ...names.map((n) => h("option", { value: n }, n)));
        module.value = names.includes(keep) ? keep : "";
      }
    }
    // results can be large (a support bundle): the history is fetched while a command waits for its answer,
    // after a click, and otherwise every 5th poll of the page
    if (device && !waiting && polls++ % 5 !== 0) return;
    const list = await api(`/devices/${enc}/commands`);
    waiting = list.some((c) => c.state === "sent");
    history.replaceChildren(table(["Sent", "Command", "State", "By", "Answered", "Result"], list.map((c) => h("tr", {
      "data-command-row": c.id, "data-name": c.name, class: c.id === selected ? "selected" : "" },
    h("td", {}, when(c.created_at)), h("td", {}, `${c.name} ${argsText(c.args)}`), h("td", {}, statePill(c)),
    h("td", {}, c.created_by), h("td", {}, c.replied_at ? when(c.replied_at) : ""),
    h("td", {}, c.error ? h("span", { class: "error" }, c.error)
      : c.result != null ? h("button", { "data-show": c.id, onclick: () => { selected = c.id; showResult(c); refresh(); } }, "Show") : ""))),
    "no commands sent to this device yet"));
    history.querySelector("table").classList.add("commands");
    showResult(list.find((c) => c.id === selected));
  }
  return { el, refresh };
}
