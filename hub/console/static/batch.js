// Batch scoring jobs on the hub (/api/v1/batch-jobs, hub/batch/jobs.py): the list, a start form for operators,
// and a job's page whose progress follows the job while it runs (the console's poll), with cancel.
import { api, canOperate, duration, h, kvTable, pill, section, table, toast, when } from "./lib.js";

const STATE_PILL = { running: "installing", succeeded: "succeeded", failed: "failed", cancelled: "aborted" };
const statePill = (j) => pill(j.state, STATE_PILL[j.state] || j.state);
const link = (j) => h("a", { class: "row-link", href: `#/batch/${j.id}` }, `#${j.id}`);

// "1,200 / 3,000 rows (40%)" and a bar; parts once the job wrote them (its summary)
function progress(j) {
  const pct = Math.round(100 * (j.progress || 0));
  const rows = j.rows_total ? `${j.rows_done.toLocaleString()} / ${j.rows_total.toLocaleString()} rows (${pct}%)`
    : j.state === "running" ? "starting" : `${(j.rows_done || 0).toLocaleString()} rows`;
  const parts = j.summary && j.summary.parts != null ? `, ${j.summary.parts} part(s)` : "";
  return h("div", { "data-progress": pct },
    h("div", { class: "bar", role: "progressbar", "aria-valuenow": pct, "aria-valuemin": 0, "aria-valuemax": 100 },
      h("span", { class: j.state === "failed" ? "seg-failed" : j.state === "running" ? "seg-installing" : "seg-running",
        style: `width:${pct}%` })),
    h("span", { class: "muted", "data-rows": "" }, rows + parts));
}

const ended = (j) => (j.finished_at ? `${when(j.finished_at)} (${duration(j.finished_at - j.started_at)})` : "");

async function cancel(j, after) {
  if (!window.confirm(`Cancel batch job #${j.id} (${j.module})?`)) return;
  try {
    await api(`/batch-jobs/${j.id}/cancel`, { method: "POST" });
    toast(`batch job #${j.id} cancelled`);
  } catch (e) { toast(`cancel refused: ${e.message}`, true); }
  await after();
}

const cancelButton = (j, after) => (j.state === "running" && canOperate()
  ? h("button", { class: "danger", "data-cancel": j.id, onclick: () => cancel(j, after) }, "Cancel") : "");

function startForm(after) {
  const field = (name, placeholder, label, required = true) =>
    h("input", { name, placeholder, "aria-label": label, required, autocomplete: "off" });
  const module = field("module", "module:version or module@alias", "module");
  const input = field("input", "/data/rows.parquet (on the hub's machine)", "input path");
  const output = field("output", "/data/scored.parquet or a directory", "output path");
  const columns = field("columns", "x=f0,f1,f2 (optional)", "columns", false);
  const overwrite = h("input", { type: "checkbox", name: "overwrite", "aria-label": "overwrite" });
  const error = h("p", { class: "error", role: "alert", "data-start-error": "" });
  const form = h("form", { class: "toolbar wrap", "data-start": "" }, module, input, output, columns,
    h("label", {}, overwrite, " overwrite"), h("button", { type: "submit", class: "primary" }, "Start"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { module: module.value.trim(), input: input.value.trim(), output: output.value.trim(),
      overwrite: overwrite.checked, columns: columns.value.trim() ? columns.value.trim().split(/\s+/) : [] };
    try {
      const j = await api("/batch-jobs", { method: "POST", body: JSON.stringify(body) });
      error.textContent = "";
      toast(`batch job #${j.id} started`);
      location.hash = `#/batch/${j.id}`;
    } catch (e) {
      error.textContent = `refused: ${e.message}`;
      await after();
    }
  });
  return h("section", {}, h("h2", {}, "Start a batch job"),
    h("p", { class: "muted" }, "Scores a CSV or Parquet file (or a directory of Parquet files) on the hub's machine with the module's signed bundle."),
    form, error);
}

export async function batchJobs(root) {
  const body = h("div");
  root.append(h("h1", {}, "Batch jobs"), body);
  if (canOperate()) root.append(startForm(() => refresh()));
  async function refresh() {
    const jobs = await api("/batch-jobs?limit=100");
    body.replaceChildren(table(["Job", "State", "Module", "Progress", "Started", "Ended", "Output", "Error", ""],
      jobs.map((j) => h("tr", { "data-job": j.id, "data-state": j.state },
        h("td", {}, link(j)), h("td", {}, statePill(j)), h("td", {}, j.module), h("td", {}, progress(j)),
        h("td", {}, `${when(j.started_at)} by ${j.created_by || "?"}`), h("td", {}, ended(j)),
        h("td", {}, h("code", {}, j.output)), h("td", { class: "error" }, j.error || ""), h("td", {}, cancelButton(j, refresh)))),
      "no batch jobs: start one below or with `edgefleet batch submit M:V --input PATH --output PATH`"));
  }
  return refresh;
}

export async function batchJob(root, id) {
  const head = h("div", { id: "job-head" });
  const parts = Object.fromEntries([["summary", "Result"], ["options", "Options"]].map(([k, t]) => [k, section(t, k)]));
  root.append(h("a", { class: "row-link", href: "#/batch" }, "← all batch jobs"), h("h1", {}, `Batch job #${id}`), head,
    parts.summary.el, parts.options.el);
  async function refresh() {
    let j;
    try { j = await api(`/batch-jobs/${encodeURIComponent(id)}`); } catch (e) {
      if (e.status !== 404 && e.status !== 422) throw e;
      head.replaceChildren(h("p", { class: "error" }, e.message));
      return;
    }
    head.replaceChildren(
      h("p", { "data-job-state": j.state }, statePill(j), ` ${j.module}`, j.requested !== j.module ? ` (asked as ${j.requested})` : "",
        ` · started ${when(j.started_at)} by ${j.created_by || "?"}`, j.finished_at ? ` · ended ${ended(j)}` : "",
        j.state === "running" && j.rows_per_s ? ` · ${Math.round(j.rows_per_s).toLocaleString()} rows/s` : "", " ", cancelButton(j, refresh)),
      progress(j),
      kvTable({ input: j.input, output: j.output }),
      j.error ? h("p", { class: "error", "data-job-error": "" }, j.error) : "");
    parts.summary.show(j.summary ? kvTable(j.summary) : h("p", { class: "muted" }, j.state === "running" ? "running…" : "no result"));
    parts.options.show(kvTable(j.options));
  }
  return refresh;
}
