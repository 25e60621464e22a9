// nlsq_stream FitWidget view: status, progress against max_nfev, cost against iteration on a
// log scale (SVG), parameters, elapsed time and rate, and a Stop button.
// A batch of fits (view "batch"): counts, fits a second and ETA, the converged fits against
// elapsed seconds (SVG line) and the cost quantiles over the progress events (SVG band: min-max
// light, 10-90 % darker, median line; log scale), and the same Stop button (it stops the batch).
//
// Every piece of text that comes from the user or the fit (model and parameter names, messages)
// is set with textContent or setAttribute, never parsed as HTML: nothing here uses innerHTML.

const SVG = "http://www.w3.org/2000/svg";
const W = 420, H = 180, PAD_L = 56, PAD_R = 10, PAD_T = 8, PAD_B = 24;
const FIELDS = [
  "fit_id", "title", "model_name", "method", "param_names", "params", "iteration", "nfev",
  "max_nfev", "cost", "optimality", "costs", "elapsed", "rate", "status", "status_style",
  "message", "running", "stop_requested", "view", "n_fits", "n_running", "n_converged",
  "n_failed", "n_stopped", "fits_per_second", "eta", "counts", "batch_progress",
];
// batch_progress rows: [iteration, elapsed, n_converged, n_failed, q0, q10, q50, q90, q100]
const B_IT = 0, B_T = 1, B_CONV = 2, B_Q = 4;

function h(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function s(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function fmt(v, digits = 6) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a >= 1e-3 && a < 1e6 ? v.toPrecision(digits) : v.toExponential(digits - 1);
}

function fmtRate(v) {
  if (!(v > 0)) return "0";
  return v >= 100 ? Math.round(v).toLocaleString("en-US") : v.toPrecision(3);
}

function fmtTime(sec) {
  if (!(sec >= 0)) return "0.0 s";
  if (sec < 60) return `${sec.toFixed(1)} s`;
  const m = Math.floor(sec / 60);
  return `${m} min ${(sec - 60 * m).toFixed(0)} s`;
}

function clear(svg) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  svg.appendChild(s("rect", { x: PAD_L, y: PAD_T, width: W - PAD_L - PAD_R,
    height: H - PAD_T - PAD_B, class: "nlsq-frame" }));
}

function tick(svg, x, y, anchor, text) {
  const label = s("text", { x, y, "text-anchor": anchor, class: "nlsq-tick" });
  label.textContent = text;
  svg.appendChild(label);
}

// Scales for x in [x0, x1] and log10(y) in [floor, ceil] of [l0, l1]; decade grid lines.
function logAxes(svg, x0, x1, l0, l1, xLabel) {
  if (x1 === x0) x1 = x0 + 1;
  let y0 = Math.floor(l0), y1 = Math.ceil(l1);
  if (y1 === y0) { y0 -= 1; y1 += 1; }
  const X = (x) => PAD_L + ((x - x0) / (x1 - x0)) * (W - PAD_L - PAD_R);
  const Y = (l) => PAD_T + ((y1 - Math.max(y0, l)) / (y1 - y0)) * (H - PAD_T - PAD_B);
  const step = Math.max(1, Math.ceil((y1 - y0) / 5));
  for (let d = y0; d <= y1; d += step) {
    svg.appendChild(s("line", { x1: PAD_L, x2: W - PAD_R, y1: Y(d), y2: Y(d), class: "nlsq-grid" }));
    tick(svg, PAD_L - 4, Y(d) + 4, "end", `1e${d}`);
  }
  tick(svg, X(x0), H - 6, "start", xLabel(x0));
  tick(svg, X(x1), H - 6, "end", xLabel(x1));
  return [X, Y, y0];
}

const pointsAttr = (xy) => xy.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" ");

function drawPlot(svg, costs) {
  clear(svg);
  const pts = (costs || []).filter((p) => p[1] > 0 && Number.isFinite(p[1]));
  svg.setAttribute("data-npoints", String(pts.length));
  if (pts.length === 0) return;
  const xs = pts.map((p) => p[0]);
  const ls = pts.map((p) => Math.log10(p[1]));
  const [X, Y] = logAxes(svg, Math.min(...xs), Math.max(...xs), Math.min(...ls),
    Math.max(...ls), String);
  svg.appendChild(s("polyline", { points: pointsAttr(pts.map((p, i) => [X(xs[i]), Y(ls[i])])),
    class: "nlsq-line" }));
  pts.forEach((p, i) => {
    svg.appendChild(s("circle", { cx: X(xs[i]).toFixed(1), cy: Y(ls[i]).toFixed(1), r: 2,
      class: "nlsq-point", "data-iteration": p[0] }));
  });
}

// The converged fits against elapsed seconds (linear, 0 to n_fits).
function drawConverged(svg, rows, nFits) {
  clear(svg);
  svg.setAttribute("data-npoints", String(rows.length));
  if (rows.length === 0) return;
  const t1 = Math.max(rows[rows.length - 1][B_T], 1e-9);
  const top = Math.max(nFits, 1);
  const X = (t) => PAD_L + (t / t1) * (W - PAD_L - PAD_R);
  const Y = (n) => PAD_T + (1 - n / top) * (H - PAD_T - PAD_B);
  for (const n of [0, top]) {
    svg.appendChild(s("line", { x1: PAD_L, x2: W - PAD_R, y1: Y(n), y2: Y(n), class: "nlsq-grid" }));
    tick(svg, PAD_L - 4, Y(n) + 4, "end", String(n));
  }
  tick(svg, X(0), H - 6, "start", "0 s");
  tick(svg, X(t1), H - 6, "end", fmtTime(t1));
  const xy = [[X(0), Y(0)], ...rows.map((r) => [X(r[B_T]), Y(r[B_CONV])])];
  svg.appendChild(s("polyline", { points: pointsAttr(xy), class: "nlsq-line",
    "data-nlsq": "converged-line" }));
}

// The cost quantiles over the progress events: min-max band, 10-90 % band, median line.
function drawBand(svg, rows) {
  clear(svg);
  const ok = (v) => v !== null && v !== undefined && Number.isFinite(v) && v > 0;
  const pts = rows.filter((r) => ok(r[B_Q + 2]));
  svg.setAttribute("data-npoints", String(pts.length));
  if (pts.length === 0) return;
  const logs = pts.flatMap((r) => r.slice(B_Q).filter(ok).map(Math.log10));
  const its = pts.map((r) => r[B_IT]);
  const [X, Y, floor] = logAxes(svg, Math.min(...its), Math.max(...its), Math.min(...logs),
    Math.max(...logs), String);
  const at = (r, k) => [X(r[B_IT]), ok(r[B_Q + k]) ? Y(Math.log10(r[B_Q + k])) : Y(floor)];
  const band = (lo, hi, cls, name) => {
    const outline = [...pts.map((r) => at(r, hi)), ...pts.slice().reverse().map((r) => at(r, lo))];
    svg.appendChild(s("polygon", { points: pointsAttr(outline), class: cls, "data-nlsq": name }));
  };
  band(0, 4, "nlsq-band-outer", "band-minmax");
  band(1, 3, "nlsq-band-inner", "band-10-90");
  svg.appendChild(s("polyline", { points: pointsAttr(pts.map((r) => at(r, 2))),
    class: "nlsq-median", "data-nlsq": "median" }));
}

function plotSvg(name, label) {
  return s("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: "nlsq-plot",
    "data-nlsq": name, role: "img", "aria-label": label });
}

function batchCounts(model) {
  const n = model.get("n_fits"), stopped = model.get("n_stopped"), eta = model.get("eta");
  const parts = [
    `converged ${model.get("n_converged")}/${n}`,
    `failed ${model.get("n_failed")}`,
    ...(stopped > 0 ? [`stopped ${stopped}`] : []),
    `running ${model.get("n_running")}`,
    `${fmtRate(model.get("fits_per_second"))} fits/s`,
    fmtTime(model.get("elapsed")),
  ];
  if (model.get("running")) parts.push(`ETA ${eta === null || eta === undefined ? "?" : fmtTime(eta)}`);
  return parts.join(" · ");
}

function fitCounts(model) {
  const nfev = model.get("nfev"), maxNfev = model.get("max_nfev");
  const budget = maxNfev > 0 ? `/${maxNfev}` : "";
  return `iteration ${model.get("iteration")} · nfev ${nfev}${budget} · cost ${fmt(model.get("cost"), 4)}` +
    ` · ${fmtTime(model.get("elapsed"))} · ${fmt(model.get("rate"), 3)} it/s`;
}

function render({ model, el }) {
  const root = h("div", { class: "nlsq-fit", "data-nlsq": "root" });
  const head = h("div", { class: "nlsq-head" });
  const title = h("span", { class: "nlsq-title", "data-nlsq": "title" });
  const status = h("span", { class: "nlsq-status", "data-nlsq": "status" });
  const stop = h("button", { class: "nlsq-stop", "data-nlsq": "stop", type: "button" }, "Stop");
  head.append(title, status, stop);
  const bar = h("div", { class: "nlsq-bar" });
  const fill = h("div", { class: "nlsq-bar-fill", "data-nlsq": "progress" });
  bar.append(fill);
  const counts = h("div", { class: "nlsq-counts", "data-nlsq": "counts" });
  // the fit view
  const fitView = h("div", { class: "nlsq-fit-view", "data-nlsq": "fit-view" });
  const svg = plotSvg("plot", "cost against iteration, log scale");
  const table = h("table", { class: "nlsq-params", "data-nlsq": "params" });
  fitView.append(svg, table);
  // the batch view
  const batchView = h("div", { class: "nlsq-batch-view", "data-nlsq": "batch-view" });
  const convSvg = plotSvg("converged", "converged fits against elapsed seconds");
  const bandSvg = plotSvg("band", "cost quantiles against progress iteration, log scale");
  batchView.append(h("div", { class: "nlsq-caption" }, "converged fits against time"), convSvg,
    h("div", { class: "nlsq-caption" }, "cost: min–max, 10–90 %, median"), bandSvg);
  const message = h("div", { class: "nlsq-message", "data-nlsq": "message" });
  root.append(head, bar, counts, fitView, batchView, message);
  el.append(root);

  stop.addEventListener("click", () => {
    model.send({ type: "stop", fit_id: model.get("fit_id") });  // the fit or batch shown
    stop.disabled = true;
    stop.textContent = "Stopping…";
  });

  let pending = false;
  function update() {
    pending = false;
    const batch = model.get("view") === "batch";
    root.setAttribute("data-view", batch ? "batch" : "fit");
    fitView.hidden = batch;
    batchView.hidden = !batch;
    const name = model.get("title") || model.get("model_name") || (batch ? "batch" : "fit");
    const method = model.get("method");
    const what = batch ? `${name} · ${model.get("n_fits")} fits` : name;
    title.textContent = method ? `${what} (${method})` : what;
    const st = model.get("status");
    status.textContent = st;
    status.className = `nlsq-status nlsq-${model.get("status_style")}`;
    root.setAttribute("data-status", st);
    const running = model.get("running");
    stop.hidden = !running;
    if (running && !model.get("stop_requested")) {
      stop.disabled = false;
      stop.textContent = "Stop";
    }
    let frac;
    if (batch) {
      const n = model.get("n_fits");
      frac = n > 0 ? (n - model.get("n_running")) / n : 1;
    } else {
      const nfev = model.get("nfev"), maxNfev = model.get("max_nfev");
      frac = maxNfev > 0 ? Math.min(1, nfev / maxNfev) : running ? 0 : 1;
    }
    fill.style.width = `${(100 * (running ? frac : 1)).toFixed(1)}%`;
    fill.className = `nlsq-bar-fill nlsq-${model.get("status_style")}`;
    counts.textContent = batch ? batchCounts(model) : fitCounts(model);
    if (batch) {
      const rows = model.get("batch_progress") || [];
      drawConverged(convSvg, rows, model.get("n_fits"));
      drawBand(bandSvg, rows);
    } else {
      drawPlot(svg, model.get("costs"));
      const names = model.get("param_names") || [];
      const values = model.get("params") || [];
      while (table.firstChild) table.removeChild(table.firstChild);
      names.forEach((n, i) => {
        const tr = h("tr");
        tr.append(h("td", { class: "nlsq-pname" }, n), h("td", { class: "nlsq-pvalue" }, fmt(values[i])));
        table.append(tr);
      });
    }
    message.textContent = model.get("message");
  }
  function schedule() {
    if (!pending) {
      pending = true;
      Promise.resolve().then(update);  // one redraw for all the fields of one state message
    }
  }
  for (const f of FIELDS) model.on(`change:${f}`, schedule);
  update();
  return () => {
    for (const f of FIELDS) model.off(`change:${f}`, schedule);
  };
}

export default { render };
