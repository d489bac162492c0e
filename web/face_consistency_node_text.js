// Shows the text a Face Consistency node returns in `ui.text` (reports, the provider in use)
// in a read-only box on the node, as Preview Any does for its input.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const WIDGET_NAME = "face_consistency_text";
const TEST_ID = "face-consistency-node-text"; // the box's data-testid: tests find it by it, in any frontend version

app.registerExtension({
  name: "face_consistency.node_text",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name.startsWith("FaceConsistency")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (!message?.text?.length) return;
      let widget = this.widgets?.find((w) => w.name === WIDGET_NAME);
      if (!widget) {
        widget = ComfyWidgets.STRING(this, WIDGET_NAME, ["STRING", { multiline: true }], app).widget;
        widget.options = { ...widget.options, serialize: false }; // display only: not a prompt input
        widget.serialize = false; // nor saved with the workflow
        if (widget.inputEl) {
          widget.inputEl.readOnly = true;
          widget.inputEl.style.fontFamily = "monospace";
          widget.inputEl.setAttribute("aria-label", `${nodeData.display_name ?? nodeData.name} report`);
          widget.inputEl.dataset.testid = TEST_ID;
        }
      }
      widget.value = message.text.join("\n");
      this.setSize([Math.max(this.size[0], 420), this.computeSize()[1]]);
      app.graph.setDirtyCanvas(true, true);
    };
  },
});
