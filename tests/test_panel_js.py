"""The training panel's ES module in Node, against stand-ins of ComfyUI's `app` / `api` and a minimal DOM.

Checks what the browser would do: the sidebar tab is registered, jobs from the routes are listed,
the stop button posts to the stop route, and finished / failed events raise toasts.
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
const detail = { ...running, metrics: [{ step: 1, loss: 0.5, face_similarity: 0.6 }, { step: 5, loss: 0.25, face_similarity: 0.71 }],
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

HARNESS_JS = """
class Element {
  constructor(tag) { this.tagName = tag; this.children = []; this.attributes = {}; this.listeners = {};
                     this.textContent = ""; this.className = ""; this.isConnected = true; this.disabled = false; }
  append(...nodes) { for (const n of nodes) this.children.push(typeof n === "string" ? { text: n } : n); }
  replaceChildren(...nodes) { this.children = []; this.append(...nodes); }
  setAttribute(key, value) { this.attributes[key] = String(value); }
  addEventListener(type, fn) { (this.listeners[type] ||= []).push(fn); }
  click() { for (const fn of this.listeners.click || []) fn({ stopPropagation() {} }); }
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


@needs_node
def test_panel_lists_jobs_stops_them_and_toasts(tmp_path: Path) -> None:
    result = run_web_module(tmp_path, "face_consistency_panel.js", {"app.js": APP_JS, "api.js": API_JS}, HARNESS_JS)

    job_id = "a" * 32
    assert result["extensions"] == ["face_consistency.training_panel"]
    assert result["tabs"] == ["face-consistency-training"]
    assert "face_lora" in result["listed"] and "training" in result["listed"]
    assert "step 5/10 (50.0%)" in result["listed"] and "loss 0.2500" in result["listed"]
    assert result["images"] == [
        f"/api/face_consistency/jobs/{job_id}/samples/face_lora_000004_00_20260101120000.png"]
    assert result["charts"] == [2, 2]  # raw path, moving average
    assert result["captions"] == ["loss 0.2500 · min 0.2500 · max 0.5000 · step 5",
                                  "face similarity 0.7100 · min 0.6000 · max 0.7100 · step 5"]
    assert ["POST", f"/face_consistency/jobs/{job_id}/stop"] in result["calls"]
    severities = [(t["severity"], t["summary"]) for t in result["toasts"]]
    assert ("success", "Training completed: face_lora") in severities
    assert ("error", "Training failed: other") in severities
    assert any(t["detail"] == "Traceback line" for t in result["toasts"])
