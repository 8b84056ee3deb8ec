// Line charts as inline SVG: no library, no CDN. lineChart({series, ...}) returns an <svg> element.
// series: [{name, points: [[t, value|null], ...]}]; t is unix seconds. Gaps (null) break the line.

const NS = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d"];

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

const fmt = (v) => (Math.abs(v) >= 1000 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : v.toPrecision(2));
const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });

export function lineChart({ id, title, series, unit = "", width = 560, height = 180, min = 0 }) {
  const pad = { l: 48, r: 12, t: 30, b: 36 };
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "data-chart": id });
  svg.append(s("title", {}, title));
  svg.append(s("text", { x: pad.l, y: 14, class: "chart-title" }, title));
  const pts = series.flatMap((x) => x.points.filter((p) => p[1] !== null && Number.isFinite(p[1])));
  if (!pts.length) {
    svg.append(s("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "chart-empty" }, "no data in this window"));
    return svg;
  }
  const t0 = Math.min(...pts.map((p) => p[0])), t1 = Math.max(...pts.map((p) => p[0]));
  const v0 = Math.min(min, ...pts.map((p) => p[1]));
  const top = Math.max(...pts.map((p) => p[1]));
  const v1 = top > v0 ? top : v0 + 1;  // a flat line (all zero errors) gets a unit scale, not 1e-9
  const x = (t) => pad.l + ((t - t0) / (t1 - t0 || 1)) * (width - pad.l - pad.r);
  const y = (v) => height - pad.b - ((v - v0) / (v1 - v0)) * (height - pad.t - pad.b);
  for (const v of [v0, (v0 + v1) / 2, v1]) {  // grid and axis labels
    svg.append(s("line", { x1: pad.l, x2: width - pad.r, y1: y(v), y2: y(v), class: "chart-grid" }));
    svg.append(s("text", { x: pad.l - 4, y: y(v) + 4, "text-anchor": "end", class: "chart-axis" }, fmt(v) + unit));
  }
  for (const t of t1 > t0 ? [t0, t1] : [t0]) {
    svg.append(s("text", { x: x(t), y: height - pad.b + 14, "text-anchor": t === t0 ? "start" : "end", class: "chart-axis" }, clock(t)));
  }
  series.forEach((ser, i) => {
    const color = COLORS[i % COLORS.length];
    let d = "", pen = false;
    for (const [t, v] of ser.points) {
      if (v === null || !Number.isFinite(v)) { pen = false; continue; }
      d += `${pen ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
    }
    const path = s("path", { d, fill: "none", stroke: color, "stroke-width": 1.8, "data-series": ser.name });
    path.append(s("title", {}, ser.name));
    svg.append(path);
    for (const [t, v] of ser.points.length === 1 ? ser.points : []) svg.append(s("circle", { cx: x(t), cy: y(v), r: 3, fill: color }));
    const lx = pad.l + i * 110;  // legend under the axis
    svg.append(s("rect", { x: lx, y: height - 14, width: 10, height: 3, fill: color }));
    svg.append(s("text", { x: lx + 14, y: height - 10, class: "chart-axis" }, ser.name));
  });
  return svg;
}

// the hub's /metrics/series rows as the two charts every page shows: latency percentiles and errors
export function telemetryCharts(rows, id) {
  const at = (k) => rows.map((r) => [r.t, r[k]]);
  return [
    lineChart({ id: `${id}-latency`, title: "Latency (ms)", unit: "", series: [
      { name: "p50", points: at("p50") }, { name: "p95", points: at("p95") }, { name: "p99", points: at("p99") }] }),
    lineChart({ id: `${id}-errors`, title: "Errors per minute and error rate (%)", series: [
      { name: "errors", points: at("errors") },
      { name: "error rate %", points: rows.map((r) => [r.t, 100 * r.error_rate]) }] }),
  ];
}
