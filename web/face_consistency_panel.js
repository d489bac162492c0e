// Face Consistency training panel: a ComfyUI sidebar tab listing training jobs with their state,
// progress, live loss / face-similarity charts, latest samples and a stop button.
// Fed by the pack's routes (/face_consistency/...) and its websocket events
// (face_consistency.progress / .finished / .failed). Plain ES module, no build step.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const ROUTE = "/face_consistency/jobs";
const FINAL_STATES = new Set(["completed", "stopped", "failed"]);
const FALLBACK_POLL_MS = 15000;
const CHART_WIDTH = 300;
const CHART_HEIGHT = 60;
const MOVING_AVERAGE = 20;
const LINE = { "vector-effect": "non-scaling-stroke" }; // the SVG stretches to the panel's width, its lines do not

const STYLE = `
.fc-panel { padding: 8px; font-size: 13px; display: flex; flex-direction: column; gap: 8px; }
.fc-panel h3 { margin: 0; font-size: 14px; }
.fc-job { border: 1px solid var(--border-color, #444); border-radius: 6px; padding: 6px; }
.fc-job-head { display: flex; justify-content: space-between; align-items: center; gap: 6px; cursor: pointer; }
.fc-state { font-weight: bold; text-transform: uppercase; font-size: 11px; }
.fc-state.training, .fc-state.caching, .fc-state.sampling, .fc-state.saving, .fc-state.starting { color: #4caf50; }
.fc-state.failed { color: #f44336; } .fc-state.stopped, .fc-state.stopping { color: #ff9800; }
.fc-bar { height: 4px; background: #333; border-radius: 2px; margin: 4px 0; }
.fc-bar > div { height: 100%; background: #4caf50; border-radius: 2px; }
.fc-line { opacity: 0.8; font-size: 12px; white-space: pre-wrap; }
.fc-chart-label { font-size: 11px; opacity: 0.8; margin-top: 4px; }
.fc-chart { display: block; width: 100%; height: ${CHART_HEIGHT}px; background: rgba(0,0,0,0.2); border-radius: 4px; }
.fc-samples { display: flex; flex-wrap: wrap; gap: 4px; margin-top: 4px; }
.fc-samples img { width: 72px; height: 72px; object-fit: cover; border-radius: 3px; cursor: zoom-in; }
.fc-stop { margin-top: 4px; }
`;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "className") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

function movingAverage(values, window) {
  const out = [];
  let sum = 0;
  values.forEach((value, i) => {
    sum += value;
    if (i >= window) sum -= values[i - window];
    out.push(sum / Math.min(i + 1, window));
  });
  return out;
}

// A small line chart: raw values faint, moving average solid; the caption (last value, min / max)
// is HTML above it, as text inside the stretched SVG would be squashed to illegibility.
function lineChart(title, points, color) {
  const caption = el("div", { className: "fc-chart-label" });
  if (points.length === 0) {
    caption.textContent = `${title}: no data yet`;
    return caption;
  }
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  caption.textContent = `${title} ${ys[ys.length - 1].toFixed(4)} · min ${y0.toFixed(4)} · max ${y1.toFixed(4)} · step ${x1}`;
  if (y1 - y0 < 1e-9) [y0, y1] = [y0 - 0.5, y1 + 0.5];
  const sx = (x) => (x1 === x0 ? CHART_WIDTH / 2 : ((x - x0) / (x1 - x0)) * (CHART_WIDTH - 2) + 1);
  const sy = (y) => CHART_HEIGHT - 2 - ((y - y0) / (y1 - y0)) * (CHART_HEIGHT - 4);
  const path = (values) => values.map((y, i) => `${i ? "L" : "M"}${sx(xs[i]).toFixed(1)},${sy(y).toFixed(1)}`).join("");
  const chart = svg("svg", {
    class: "fc-chart",
    viewBox: `0 0 ${CHART_WIDTH} ${CHART_HEIGHT}`,
    preserveAspectRatio: "none",
  });
  chart.append(svg("path", { d: path(ys), stroke: color, "stroke-opacity": 0.3, fill: "none", "stroke-width": 1, ...LINE }));
  chart.append(
    svg("path", { d: path(movingAverage(ys, MOVING_AVERAGE)), stroke: color, fill: "none", "stroke-width": 1.8, ...LINE }),
  );
  chart.setAttribute("aria-label", caption.textContent);
  return el("div", {}, caption, chart);
}

function progressOf(job) {
  if (job.step == null) return "";
  const total = job.total_steps ? `/${job.total_steps}` : "";
  const pct = job.total_steps ? ` (${((100 * job.step) / job.total_steps).toFixed(1)}%)` : "";
  return `step ${job.step}${total}${pct}`;
}

class TrainingPanel {
  constructor() {
    this.jobs = new Map();
    this.details = new Map();
    this.expanded = new Set();
    // job id -> {shown, loading}: the sample <img>s on screen and those of a newer round still loading
    this.sampleImages = new Map();
    this.root = null;
    this.timer = null;
  }

  mount(container) {
    if (!document.getElementById("fc-panel-style")) {
      document.head.append(el("style", { id: "fc-panel-style" }, STYLE));
    }
    this.root = el("div", { className: "fc-panel" });
    container.replaceChildren(this.root);
    this.refreshList();
    clearInterval(this.timer);
    this.timer = setInterval(() => this.root?.isConnected && this.refreshList(), FALLBACK_POLL_MS);
  }

  async refreshList() {
    try {
      const response = await api.fetchApi(ROUTE);
      if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
      const body = await response.json();
      this.jobs = new Map(body.jobs.map((job) => [job.job_id, job]));
      for (const id of this.expanded) await this.refreshDetail(id, false);
      this.render();
    } catch (error) {
      this.renderError(`Cannot list training jobs: ${error.message}`);
    }
  }

  async refreshDetail(jobId, render = true) {
    const response = await api.fetchApi(`${ROUTE}/${jobId}?max_points=600`);
    if (response.ok) this.details.set(jobId, await response.json());
    if (render) this.render();
  }

  onProgress(job) {
    this.jobs.set(job.job_id, { ...this.jobs.get(job.job_id), ...job });
    if (this.expanded.has(job.job_id)) this.refreshDetail(job.job_id);
    else this.render();
  }

  async stop(jobId, button) {
    button.disabled = true;
    button.textContent = "Stopping…";
    const response = await api.fetchApi(`${ROUTE}/${jobId}/stop`, { method: "POST" });
    if (!response.ok) {
      toast("error", "Stop failed", `${response.status} ${response.statusText}`);
    }
    this.refreshList();
  }

  renderError(message) {
    if (this.root) this.root.replaceChildren(el("div", { className: "fc-line" }, message));
  }

  render() {
    if (!this.root) return;
    const children = [el("h3", {}, "Face Consistency training")];
    if (this.jobs.size === 0) {
      children.push(el("div", { className: "fc-line" }, "No training jobs yet. Queue a FaceConsistencyTrainLaunch node."));
    }
    for (const job of this.jobs.values()) children.push(this.renderJob(job));
    this.root.replaceChildren(...children);
  }

  renderJob(job) {
    const open = this.expanded.has(job.job_id);
    const head = el(
      "div",
      {
        className: "fc-job-head",
        onclick: () => {
          if (open) this.expanded.delete(job.job_id);
          else this.expanded.add(job.job_id);
          if (!open) this.refreshDetail(job.job_id);
          else this.render();
        },
      },
      el("span", {}, `${open ? "▾" : "▸"} ${job.name}`),
      el("span", { className: `fc-state ${job.state}` }, job.state),
    );
    const box = el("div", { className: "fc-job" }, head);
    if (job.total_steps && job.step != null) {
      const pct = Math.min(100, (100 * job.step) / job.total_steps);
      box.append(el("div", { className: "fc-bar" }, el("div", { style: `width:${pct}%` })));
    }
    const numbers = [progressOf(job)];
    if (job.loss != null) numbers.push(`loss ${job.loss.toFixed(4)}`);
    if (job.face_similarity != null) numbers.push(`face sim ${job.face_similarity.toFixed(3)}`);
    box.append(el("div", { className: "fc-line" }, numbers.filter(Boolean).join(" · ")));
    if (job.latest_checkpoint) box.append(el("div", { className: "fc-line" }, `checkpoint: ${job.latest_checkpoint}`));
    if (job.state === "failed" && job.detail) box.append(el("div", { className: "fc-line" }, job.detail));
    const detail = this.details.get(job.job_id);
    if (!open) this.sampleImages.delete(job.job_id);
    if (open && detail) {
      const metrics = detail.metrics || [];
      const series = (key) => metrics.filter((m) => typeof m[key] === "number").map((m) => [m.step, m[key]]);
      box.append(lineChart("loss", series("loss"), "#2196f3"));
      const validation = (detail.validation || []).map((m) => [m.step, m.val_loss]);
      if (validation.length) box.append(lineChart("validation loss (held out)", validation, "#ff9800"));
      box.append(lineChart("face similarity", series("face_similarity"), "#4caf50"));
      if (detail.recommendation) {
        box.append(el("div", { className: "fc-line fc-keep" },
          `keep ${detail.recommendation.name}: ${detail.recommendation.reason}`));
      }
      box.append(this.renderSamples(job.job_id, detail.samples || []));
    }
    if (!FINAL_STATES.has(job.state)) {
      const button = el("button", { className: "fc-stop p-button p-button-sm p-button-danger" }, "Stop (save checkpoint)");
      button.addEventListener("click", (event) => {
        event.stopPropagation();
        this.stop(job.job_id, button);
      });
      box.append(button);
    }
    return box;
  }

  renderSamples(jobId, samples) {
    // A running job's detail is drawn again on every progress event. The images on screen stay; a newer
    // round loads off screen and replaces them once all its images have loaded. A round still loading is
    // never dropped for a newer one, so on a slow server the newest round it can deliver gets shown, and
    // a round whose images failed is fetched again on a later redraw.
    const state = this.sampleImages.get(jobId) || { shown: new Map(), loading: null };
    const loaded = (img) => img.complete && img.naturalWidth > 0;
    const broken = (images) => [...images.values()].some((img) => img.complete && !loaded(img));
    if (state.loading && [...state.loading.values()].every((img) => img.complete)) {
      if ([...state.loading.values()].every(loaded) || broken(state.shown)) state.shown = state.loading;
      state.loading = null;
    }
    const wanted = samples.map((sample) => [
      api.apiURL(`${ROUTE}/${jobId}/samples/${encodeURIComponent(sample.filename)}`),
      sample.filename,
    ]);
    const current = wanted.length === state.shown.size && wanted.every(([url]) => state.shown.has(url));
    if (!state.loading && (!current || broken(state.shown))) {
      const images = new Map(wanted.map(([url, filename]) => {
        const shown = state.shown.get(url);
        return [url, shown && loaded(shown) ? shown : this.sampleImage(url, filename)];
      }));
      if (state.shown.size === 0) state.shown = images;
      else state.loading = images;
    }
    this.sampleImages.set(jobId, state);
    return el("div", { className: "fc-samples" }, ...state.shown.values());
  }

  sampleImage(url, filename) {
    // a loaded image redraws (it may complete a round); a failed one waits for the next redraw to be
    // fetched again, rather than retrying in a loop
    return el("img", {
      src: url, title: filename, alt: filename, onclick: () => window.open(url, "_blank"), onload: () => this.render(),
    });
  }
}

function toast(severity, summary, detail) {
  const toasts = app.extensionManager?.toast;
  if (toasts) toasts.add({ severity, summary, detail, life: 8000 });
  else console.log(`[face_consistency] ${summary}: ${detail}`);
}

const panel = new TrainingPanel();

// Listening from import, not from setup(): the frontend opens its socket before it calls the
// extensions' setup(), and a message that finds no listener is logged as an unknown type.
api.addEventListener("face_consistency.progress", (event) => panel.onProgress(event.detail));
api.addEventListener("face_consistency.finished", (event) => {
  const job = event.detail;
  toast("success", `Training ${job.state}: ${job.name}`, job.latest_checkpoint ? `last checkpoint ${job.latest_checkpoint}` : "");
  panel.onProgress(job);
});
api.addEventListener("face_consistency.failed", (event) => {
  const job = event.detail;
  const lastLine = (job.detail || "").trim().split("\n").pop();
  toast("error", `Training failed: ${job.name}`, lastLine || "see the training log");
  panel.onProgress(job);
});

app.registerExtension({
  name: "face_consistency.training_panel",
  setup() {
    app.extensionManager.registerSidebarTab({
      id: "face-consistency-training",
      icon: "pi pi-chart-line",
      title: "Face training",
      tooltip: "Face Consistency training jobs",
      type: "custom",
      render: (container) => panel.mount(container),
    });
  },
});
