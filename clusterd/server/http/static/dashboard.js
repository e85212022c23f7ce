// The clusterd dashboard: one EventSource on /api/v1/events; each "snapshot" event redraws the
// workers, jobs, throughput chart and task stream. No build step, no library.
"use strict";
const HISTORY = 300; // snapshots kept for the throughput chart (one a second: 5 minutes)
const WINDOW = 120; // seconds of task stream drawn at most (the server sends 120)
const history = [];
const SVG = "http://www.w3.org/2000/svg";

function token() { return sessionStorage.getItem("clusterd-token"); }

async function start() {
  // With a client secret, /api/v1 answers 401: ask for the token once, keep it for the session.
  for (;;) {
    const headers = token() ? { Authorization: "Bearer " + token() } : {};
    const r = await fetch("/api/v1/stats", { headers });
    if (r.status !== 401) break;
    const t = window.prompt("clusterd client secret (bearer token):");
    if (!t) { setStatus("needs the client secret"); return; }
    sessionStorage.setItem("clusterd-token", t.trim());
  }
  const q = token() ? "?token=" + encodeURIComponent(token()) : "";
  const source = new EventSource("/api/v1/events" + q);
  source.addEventListener("snapshot", (e) => draw(JSON.parse(e.data)));
  source.onopen = () => setStatus("live");
  source.onerror = () => setStatus("reconnecting…");
}

function setStatus(text) { document.getElementById("status").textContent = text; }

function el(tag, attrs, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function bar(done, total, state) {
  const pct = total ? Math.round((100 * done) / total) : (state === "done" ? 100 : 0);
  const b = el("div", { class: "bar" });
  b.append(el("div", { class: "fill " + state, style: "width:" + pct + "%" }));
  b.append(el("span", {}, done + "/" + total));
  return b;
}

function draw(snap) {
  const s = snap.stats;
  document.getElementById("summary").textContent =
    `${s.workers} workers · ${s.slots_busy}/${s.slots} slots busy · ${s.jobs_active} jobs active · ${s.subtasks_queued} queued`;
  drawWorkers(snap.workers);
  drawJobs(snap.jobs);
  history.push({ t: snap.now, n: s.subtasks_completed });
  if (history.length > HISTORY) history.shift();
  drawThroughput();
  drawTaskStream(snap);
}

function drawWorkers(workers) {
  const body = document.querySelector("#workers tbody");
  body.replaceChildren(...workers.map((w) => {
    const row = el("tr", { id: "worker-" + w.name });
    row.append(el("td", {}, w.name), el("td"), el("td", {}, w.done), el("td", {}, w.failed));
    row.children[1].append(bar(w.busy, w.slots, "busy"));
    return row;
  }));
}

function drawJobs(jobs) {
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren(...jobs.map((j) => {
    const row = el("tr", { id: "job-" + j.id, "data-state": j.state, "data-done": j.done,
      "data-total": j.total });
    row.append(el("td", {}, j.id), el("td", {}, j.task), el("td", {}, j.state), el("td"));
    row.children[3].append(bar(j.done, j.total, j.state));
    return row;
  }));
}

function drawThroughput() {
  const svg = document.getElementById("throughput");
  const rates = [];
  for (let i = 1; i < history.length; i++) {
    const dt = history[i].t - history[i - 1].t;
    rates.push(dt > 0 ? (history[i].n - history[i - 1].n) / dt : 0);
  }
  const top = Math.max(1, ...rates);
  const step = 600 / Math.max(10, rates.length - 1); // fills the chart as history grows
  const pts = rates.map((r, i) => `${step * i},${115 - (105 * r) / top}`);
  svg.replaceChildren(el("svg:text", { x: 2, y: 10 }, top.toFixed(1) + "/s"),
    el("svg:polyline", { points: pts.join(" "), fill: "none", stroke: "#4a8", "stroke-width": 2 }));
}

function colour(job) {
  let h = 0;
  for (const c of job) h = (h * 31 + c.charCodeAt(0)) % 360;
  return `hsl(${h},55%,55%)`;
}

function lanes(snap) {
  // One lane per slot, like Dask's task stream: a run goes to the first lane of its worker
  // that is free by its start, so a worker's concurrent sub-tasks never overlap.
  const rows = []; const free = new Map(); const out = [];
  for (const w of snap.workers) free.set(w.name, []);
  for (const r of [...snap.runs].sort((a, b) => a.start - b.start)) {
    if (!free.has(r.worker)) free.set(r.worker, []);
    const ends = free.get(r.worker);
    let lane = ends.findIndex((e) => e <= r.start + 1e-3);
    if (lane < 0) { lane = ends.length; ends.push(0); rows.push([r.worker, lane]); }
    ends[lane] = r.end;
    out.push([r, r.worker + "/" + lane]);
  }
  for (const [name, ends] of free) if (!ends.length) rows.push([name, 0]);
  rows.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] - b[1]));
  return [rows.map(([w, l]) => w + "/" + l), out];
}

function drawTaskStream(snap) {
  const svg = document.getElementById("taskstream");
  const [rows, runs] = lanes(snap);
  const first = Math.min(snap.now - 10, ...snap.runs.map((r) => r.start));
  const span = Math.min(WINDOW, snap.now - first);
  const rowH = Math.max(4, Math.floor(110 / Math.max(1, rows.length)));
  const x = (t) => 60 + (540 * (t - (snap.now - span))) / span;
  const nodes = rows.filter((r) => r.endsWith("/0")).map((r) =>
    el("svg:text", { x: 2, y: 10 + rows.indexOf(r) * rowH }, r.slice(0, -2)));
  nodes.push(el("svg:text", { x: 560, y: 118 }, Math.round(span) + " s"));
  for (const [r, lane] of runs) {
    const row = rows.indexOf(lane);
    const x0 = Math.max(60, x(r.start));
    nodes.push(el("svg:rect", { x: x0, y: 2 + row * rowH, width: Math.max(1, x(r.end) - x0 - 0.5),
      height: rowH - 2, fill: r.ok ? colour(r.job) : "#c55", "data-job": r.job }));
  }
  svg.replaceChildren(...nodes);
}

start();
