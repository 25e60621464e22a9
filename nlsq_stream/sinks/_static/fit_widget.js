// nlsq_stream FitWidget view: status, progress against max_nfev, cost against iteration on a
// log scale (SVG), parameters, elapsed time and rate, and a Stop button.
//
// Every piece of text that comes from the user or the fit (model and parameter names, messages)
// is set with textContent or setAttribute, never parsed as HTML: nothing here uses innerHTML.

const SVG = "http://www.w3.org/2000/svg";
const W = 420, H = 180, PAD_L = 56, PAD_R = 10, PAD_T = 8, PAD_B = 24;
const FIELDS = [
  "fit_id", "title", "model_name", "method", "param_names", "params", "iteration", "nfev",
  "max_nfev", "cost", "optimality", "costs", "elapsed", "rate", "status", "status_style",
  "message", "running", "stop_requested",
];

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

function fmtTime(sec) {
  if (!(sec >= 0)) return "0.0 s";
  if (sec < 60) return `${sec.toFixed(1)} s`;
  const m = Math.floor(sec / 60);
  return `${m} min ${(sec - 60 * m).toFixed(0)} s`;
}

function drawPlot(svg, costs) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const pts = (costs || []).filter((p) => p[1] > 0 && Number.isFinite(p[1]));
  svg.setAttribute("data-npoints", String(pts.length));
  svg.appendChild(s("rect", { x: PAD_L, y: PAD_T, width: W - PAD_L - PAD_R,
    height: H - PAD_T - PAD_B, class: "nlsq-frame" }));
  if (pts.length === 0) return;
  const xs = pts.map((p) => p[0]);
  const ls = pts.map((p) => Math.log10(p[1]));
  let x0 = Math.min(...xs), x1 = Math.max(...xs);
  if (x1 === x0) x1 = x0 + 1;
  let y0 = Math.floor(Math.min(...ls)), y1 = Math.ceil(Math.max(...ls));
  if (y1 === y0) { y0 -= 1; y1 += 1; }
  const X = (x) => PAD_L + ((x - x0) / (x1 - x0)) * (W - PAD_L - PAD_R);
  const Y = (l) => PAD_T + ((y1 - l) / (y1 - y0)) * (H - PAD_T - PAD_B);
  const step = Math.max(1, Math.ceil((y1 - y0) / 5));
  for (let d = y0; d <= y1; d += step) {
    svg.appendChild(s("line", { x1: PAD_L, x2: W - PAD_R, y1: Y(d), y2: Y(d), class: "nlsq-grid" }));
    const label = s("text", { x: PAD_L - 4, y: Y(d) + 4, "text-anchor": "end", class: "nlsq-tick" });
    label.textContent = `1e${d}`;
    svg.appendChild(label);
  }
  for (const [x, anchor] of [[x0, "start"], [x1, "end"]]) {
    const label = s("text", { x: X(x), y: H - 6, "text-anchor": anchor, class: "nlsq-tick" });
    label.textContent = String(x);
    svg.appendChild(label);
  }
  const line = pts.map((p, i) => `${X(xs[i]).toFixed(1)},${Y(ls[i]).toFixed(1)}`).join(" ");
  svg.appendChild(s("polyline", { points: line, class: "nlsq-line" }));
  pts.forEach((p, i) => {
    svg.appendChild(s("circle", { cx: X(xs[i]).toFixed(1), cy: Y(ls[i]).toFixed(1), r: 2,
      class: "nlsq-point", "data-iteration": p[0] }));
  });
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
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: "nlsq-plot",
    "data-nlsq": "plot", role: "img", "aria-label": "cost against iteration, log scale" });
  const table = h("table", { class: "nlsq-params", "data-nlsq": "params" });
  const message = h("div", { class: "nlsq-message", "data-nlsq": "message" });
  root.append(head, bar, counts, svg, table, message);
  el.append(root);

  stop.addEventListener("click", () => {
    model.send({ type: "stop", fit_id: model.get("fit_id") });
    stop.disabled = true;
    stop.textContent = "Stopping…";
  });

  let pending = false;
  function update() {
    pending = false;
    const name = model.get("title") || model.get("model_name") || "fit";
    const method = model.get("method");
    title.textContent = method ? `${name} (${method})` : name;
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
    const nfev = model.get("nfev"), maxNfev = model.get("max_nfev");
    const frac = maxNfev > 0 ? Math.min(1, nfev / maxNfev) : running ? 0 : 1;
    fill.style.width = `${(100 * (running ? frac : 1)).toFixed(1)}%`;
    fill.className = `nlsq-bar-fill nlsq-${model.get("status_style")}`;
    const budget = maxNfev > 0 ? `/${maxNfev}` : "";
    counts.textContent =
      `iteration ${model.get("iteration")} · nfev ${nfev}${budget} · cost ${fmt(model.get("cost"), 4)}` +
      ` · ${fmtTime(model.get("elapsed"))} · ${fmt(model.get("rate"), 3)} it/s`;
    drawPlot(svg, model.get("costs"));
    const names = model.get("param_names") || [];
    const values = model.get("params") || [];
    while (table.firstChild) table.removeChild(table.firstChild);
    names.forEach((n, i) => {
      const tr = h("tr");
      tr.append(h("td", { class: "nlsq-pname" }, n), h("td", { class: "nlsq-pvalue" }, fmt(values[i])));
      table.append(tr);
    });
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
