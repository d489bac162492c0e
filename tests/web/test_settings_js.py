"""web/face_consistency_settings.js in Node: the ComfyUI setting the nodes read to turn pack downloads off."""

from __future__ import annotations

from pathlib import Path

from face_consistency.nodes.comfy_env import DOWNLOAD_SETTING
from web_module_harness import needs_node, run_web_module

APP_JS = """
export const registered = [];
export const app = { registerExtension(extension) { registered.push(extension); } };
"""

HARNESS_JS = """
const { registered } = await import("./scripts/app.js");
await import("./extensions/pack/face_consistency_settings.js");
console.log(JSON.stringify(registered.map((e) => ({ name: e.name, settings: e.settings }))));
"""


@needs_node
def test_the_download_setting_is_the_one_the_nodes_read(tmp_path: Path) -> None:
    [extension] = run_web_module(tmp_path, "face_consistency_settings.js", {"app.js": APP_JS}, HARNESS_JS)
    [setting] = extension["settings"]
    assert extension["name"] == "face_consistency.settings"
    assert setting["id"] == DOWNLOAD_SETTING
    assert (setting["type"], setting["defaultValue"]) == ("boolean", True)
    assert setting["category"][0] == "Face Consistency" and "first use" in setting["name"]
