"""The training panel's ES module in Node, against stand-ins of ComfyUI's `app` / `api` and a minimal DOM.

Checks what the browser would do: the sidebar tab is registered, jobs from the routes are listed,
the stop button posts to the stop route, finished / failed events raise toasts, and a running job's
samples are swapped round by round as their images load (or fail) on a slow server.
"""

from __future__ import annotations

from pathlib import Path

from web_module_harness import needs_node, run_web_module

APP_JS = """
export const registered = { extensions: [], tabs: [], toasts: [] };
export const app = {
  registerExtension(extension) { registered.extensions.push(extension); },
  extensionManager: {
    registerSidebarTab(tab) { registered.tabs.push(tab); },
    toast: { add(message) { registered.toasts.push(message); } },
  },
};
"""

API_JS = """
export const calls = [];
const listeners = {};
const running = { job_id: "a".repeat(32), name: "face_lora", state: "training", step: 5, total_steps: 10,
                  loss: 0.25, face_similarity: 0.71, latest_checkpoint: "face_lora-step00000004.safetensors" };
export const detail = { ...running,
                 metrics: [{ step: 1, loss: 0.5, face_similarity: 0.6 },
                           { step: 5, loss: 0.25, face_similarity: 0.71 }],
                 samples: [{ filename: "face_lora_000004_00_20260101120000.png", step: 4, prompt_index: 0 }] };
function reply(body) { return { ok: true, status: 200, statusText: "OK", json: async () => body }; }
export const api = {
  async fetchApi(route, options = {}) {
    calls.push([options.method || "GET", route]);
    if (route === "/face_consistency/jobs") return reply({ jobs: [running] });
    if (route.startsWith(`/face_consistency/jobs/${running.job_id}/stop`)) return reply({ state: "stopping" });
    if (route.startsWith(`/face_consistency/jobs/${running.job_id}`)) return reply(detail);
    return { ok: false, status: 404, statusText: "Not Found", json: async () => ({}) };
  },
  apiURL(route) { return `/api${route}`; },
  addEventListener(name, listener) { (listeners[name] ||= []).push(listener); },
  emit(name, detail) { for (const listener of listeners[name] || []) listener({ detail }); },
};
"""

DOM_JS = """
const images = [];  // every <img> created, oldest first
class Element {
  constructor(tag) { this.tagName = tag; this.children = []; this.attributes = {}; this.listeners = {};
                     this.textContent = ""; this.className = ""; this.isConnected = true; this.disabled = false;
                     if (tag === "img") { this.complete = false; this.naturalWidth = 0; images.push(this); } }
  append(...nodes) { for (const n of nodes) this.children.push(typeof n === "string" ? { text: n } : n); }
  replaceChildren(...nodes) { this.children = []; this.append(...nodes); }
  setAttribute(key, value) { this.attributes[key] = String(value); }
  addEventListener(type, fn) { (this.listeners[type] ||= []).push(fn); }
  click() { for (const fn of this.listeners.click || []) fn({ stopPropagation() {} }); }
  // an <img> finishes loading, as the browser would report it
  settle(ok) {
    this.complete = true;
    this.naturalWidth = ok ? 64 : 0;
    for (const fn of this.listeners[ok ? "load" : "error"] || []) fn();
  }
  get text() { return [this.textContent, ...this.children.map((c) => c.text)].join(" "); }
  find(predicate) {
    for (const child of this.children) {
      if (!child.children) continue;
      if (predicate(child)) return child;
      const found = child.find(predicate);
      if (found) return found;
    }
    return null;
  }
}
globalThis.document = {
  head: new Element("head"),
  createElement: (tag) => new Element(tag),
  createElementNS: (_, tag) => new Element(tag),
  getElementById: () => null,
};
const tick = () => new Promise((resolve) => setTimeout(resolve, 20));

const { registered } = await import("./scripts/app.js");
const { api, calls } = await import("./scripts/api.js");
await import("./extensions/pack/face_consistency_panel.js");
const shownImages = (root) => {
  const shown = [];
  root.find((e) => {
    if (e.tagName === "img") shown.push([e.attributes.src.split("/").pop(), e.complete, e.naturalWidth > 0]);
    return false;
  });
  return shown;
};
"""

HARNESS_JS = (
    DOM_JS
    + """
const result = { extensions: registered.extensions.map((e) => e.name) };
registered.extensions[0].setup();
result.tabs = registered.tabs.map((t) => t.id);
const container = new Element("div");
registered.tabs[0].render(container);
await tick();
result.listed = container.text;
container.find((e) => e.className === "fc-job-head").click();  // open the job: charts and samples
await tick();
result.images = [];
container.find((e) => { if (e.tagName === "img") result.images.push(e.attributes.src); return false; });
result.charts = [];
container.find((e) => { if (e.tagName === "svg") result.charts.push(e.children.length); return false; });
result.captions = [];
container.find((e) => { if (e.className === "fc-chart-label") result.captions.push(e.textContent); return false; });
container.find((e) => e.tagName === "button").click();
await tick();
api.emit("face_consistency.finished", { job_id: "a".repeat(32), name: "face_lora", state: "completed",
                                         latest_checkpoint: "face_lora.safetensors" });
api.emit("face_consistency.failed", { job_id: "b".repeat(32), name: "other", state: "failed",
                                       detail: "CUDA out of memory\\nTraceback line" });
result.toasts = registered.toasts;
result.calls = calls;
console.log(JSON.stringify(result));
process.exit(0);
"""
)


@needs_node
def test_panel_lists_jobs_stops_them_and_toasts(tmp_path: Path) -> None:
    result = run_web_module(tmp_path, "face_consistency_panel.js", {"app.js": APP_JS, "api.js": API_JS}, HARNESS_JS)

    job_id = "a" * 32
    assert result["extensions"] == ["face_consistency.training_panel"]
    assert result["tabs"] == ["face-consistency-training"]
    assert "face_lora" in result["listed"] and "training" in result["listed"]
    assert "step 5/10 (50.0%)" in result["listed"] and "loss 0.2500" in result["listed"]
    assert result["images"] == [f"/api/face_consistency/jobs/{job_id}/samples/face_lora_000004_00_20260101120000.png"]
    assert result["charts"] == [2, 2]  # raw path, moving average
    assert result["captions"] == [
        "loss 0.2500 · min 0.2500 · max 0.5000 · step 5",
        "face similarity 0.7100 · min 0.6000 · max 0.7100 · step 5",
    ]
    assert ["POST", f"/face_consistency/jobs/{job_id}/stop"] in result["calls"]
    severities = [(t["severity"], t["summary"]) for t in result["toasts"]]
    assert ("success", "Training completed: face_lora") in severities
    assert ("error", "Training failed: other") in severities
    assert any(t["detail"] == "Traceback line" for t in result["toasts"])


SAMPLE_ROUNDS_JS = (
    DOM_JS
    + """
const { detail } = await import("./scripts/api.js");
const round = (n) => [{ filename: `face_lora_00000${n}_00_2026010112000${n}.png`, step: n, prompt_index: 0 }];
const latest = (name) => images.filter((img) => img.attributes.src.endsWith(name)).pop();
const progress = async (samples) => {  // the trainer wrote a newer round; the poller's event arrives
  if (samples) detail.samples = samples;
  api.emit("face_consistency.progress", { job_id: "a".repeat(32), state: "training" });
  await tick();
};
registered.extensions[0].setup();
const container = new Element("div");
registered.tabs[0].render(container);
await tick();
detail.samples = round(4);
container.find((e) => e.className === "fc-job-head").click();
await tick();
const seen = { opened: shownImages(container) };
latest("04.png").settle(false);                    // the server answered 503: a broken image on screen
await progress();                                  // the next redraw fetches it again, off screen
seen.retrying = shownImages(container);
await progress(round(8));                          // a newer round does not drop the one still loading
latest("04.png").settle(true);                     // the retry arrives: on screen, and round 8 starts loading
seen.retried = shownImages(container);
await progress(round(9));                          // round 9 waits for round 8
seen.waiting = shownImages(container);
latest("08.png").settle(true);                     // round 8 replaces 4; round 9 loads next
seen.newer = shownImages(container);
latest("09.png").settle(false);                    // round 9 fails while round 8 is fine: 8 stays
await progress();
seen.kept = shownImages(container);
latest("09.png").settle(true);
seen.newest = shownImages(container);
const fetchesOf = (n) => images.filter((img) => img.attributes.src.endsWith(`${n}.png`)).length;
seen.fetches = Object.fromEntries(["04", "08", "09"].map((n) => [n, fetchesOf(n)]));
console.log(JSON.stringify(seen));
process.exit(0);
"""
)


@needs_node
def test_running_job_samples_swap_in_once_loaded_and_failed_ones_are_fetched_again(tmp_path: Path) -> None:
    seen = run_web_module(tmp_path, "face_consistency_panel.js", {"app.js": APP_JS, "api.js": API_JS}, SAMPLE_ROUNDS_JS)

    def loaded(step: int) -> list[list[object]]:
        return [[f"face_lora_00000{step}_00_2026010112000{step}.png", True, True]]  # name, complete, has pixels

    assert seen["opened"] == [["face_lora_000004_00_20260101120004.png", False, False]]
    assert seen["retrying"] == [["face_lora_000004_00_20260101120004.png", True, False]]
    assert seen["retried"] == loaded(4)
    assert seen["waiting"] == loaded(4)
    assert seen["newer"] == loaded(8)
    assert seen["kept"] == loaded(8)
    assert seen["newest"] == loaded(9)
    assert seen["fetches"] == {"04": 2, "08": 1, "09": 2}  # one refetch per failure, none of a loaded image


VALIDATION_JS = (
    DOM_JS
    + """
const { detail } = await import("./scripts/api.js");
detail.validation = [{ step: 2, val_loss: 0.41 }, { step: 4, val_loss: 0.38 }, { step: 6, val_loss: 0.44 }];
detail.recommendation = { name: "face_lora-step00000004.safetensors", step: 4,
                          reason: "step 4: lowest validation loss 0.3800; validation loss rises after step 4" };
registered.extensions[0].setup();
const container = new Element("div");
registered.tabs[0].render(container);
await tick();
container.find((e) => e.className === "fc-job-head").click();
await tick();
const result = { captions: [], keep: [] };
container.find((e) => { if (e.className === "fc-chart-label") result.captions.push(e.textContent); return false; });
container.find((e) => { if (e.className.includes("fc-keep")) result.keep.push(e.text.trim()); return false; });
console.log(JSON.stringify(result));
process.exit(0);
"""
)


@needs_node
def test_panel_draws_the_validation_loss_and_the_checkpoint_to_keep(tmp_path: Path) -> None:
    result = run_web_module(tmp_path, "face_consistency_panel.js", {"app.js": APP_JS, "api.js": API_JS}, VALIDATION_JS)

    assert result["captions"][1] == "validation loss (held out) 0.4400 · min 0.3800 · max 0.4400 · step 6"
    assert result["keep"] == [
        "keep face_lora-step00000004.safetensors: step 4: lowest validation loss 0.3800; "
        "validation loss rises after step 4"
    ]
