"""web/face_consistency_node_text.js in Node, against stand-ins of ComfyUI's `app` and widgets:
a pack node shows its `ui.text` in one read-only box that is neither queued nor saved."""

from __future__ import annotations

from pathlib import Path

from web_module_harness import needs_node, run_web_module

APP_JS = """
export const registered = [];
export const app = {
  registerExtension(extension) { registered.push(extension); },
  graph: { setDirtyCanvas() {} },
};
"""

WIDGETS_JS = """
export const ComfyWidgets = {
  STRING(node, name, spec, app) {
    const widget = { name, value: "", options: { multiline: spec[1].multiline },
                     inputEl: { style: {}, dataset: {}, setAttribute(key, value) { this[key] = value; } } };
    node.widgets.push(widget);
    return { widget };
  },
};
"""

HARNESS_JS = """
const { registered } = await import("./scripts/app.js");
await import("./extensions/pack/face_consistency_node_text.js");
const [extension] = registered;

function nodeType() {
  function Node() { this.widgets = []; this.size = [300, 100]; }
  Node.prototype.onExecuted = function () { this.previous = (this.previous ?? 0) + 1; };
  Node.prototype.computeSize = function () { return [300, 60 + 40 * this.widgets.length]; };
  Node.prototype.setSize = function (size) { this.size = size; };
  return Node;
}
const Ours = nodeType(), Theirs = nodeType();
await extension.beforeRegisterNodeDef(Ours,
                                      { name: "FaceConsistencySimilarity", display_name: "Face Similarity Score" });
await extension.beforeRegisterNodeDef(Theirs, { name: "KSampler" });

const ours = new Ours(), theirs = new Theirs();
ours.onExecuted({ text: ["first report"] });
ours.onExecuted({ text: ["line 1", "line 2"] });
ours.onExecuted({ images: [] });
theirs.onExecuted({ text: ["not ours"] });
const [widget] = ours.widgets;
console.log(JSON.stringify({
  name: extension.name, widgets: ours.widgets.length, value: widget.value, readOnly: widget.inputEl.readOnly,
  queued: widget.options.serialize, saved: widget.serialize, previous: ours.previous, width: ours.size[0],
  theirs: theirs.widgets.length, testid: widget.inputEl.dataset.testid, label: widget.inputEl["aria-label"],
}));
"""


@needs_node
def test_pack_nodes_show_their_text(tmp_path: Path) -> None:
    result = run_web_module(
        tmp_path, "face_consistency_node_text.js", {"app.js": APP_JS, "widgets.js": WIDGETS_JS}, HARNESS_JS
    )

    assert result == {
        "name": "face_consistency.node_text",
        "widgets": 1,
        "value": "line 1\nline 2",
        "readOnly": True,
        "queued": False,
        "saved": False,
        "previous": 3,
        "width": 420,
        "theirs": 0,
        "testid": "face-consistency-node-text",
        "label": "Face Similarity Score report",
    }
