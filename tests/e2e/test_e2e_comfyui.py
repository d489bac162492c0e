"""End to end in a real ComfyUI: the pack loads, its nodes are listed, a scoring workflow runs.

Runs only when COMFYUI_DIR points at a ComfyUI checkout (skipped otherwise; failed under CI=true);
the browser check runs once per frontend (the pinned one, and the newest in
COMFYUI_NEWEST_FRONTEND). The servers and the browser driver are `comfyui_server.py`'s:

    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_NEWEST_FRONTEND=/path/to/frontend [COMFYUI_PYTHON=/path/to/its/python] \
        [CHROMIUM=/path/to/chromium] python -m pytest tests/e2e/test_e2e_comfyui.py -m e2e -v
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from comfyui_server import (
    RUN_TIMEOUT_S,
    STARTUP_TIMEOUT_S,
    ComfyServer,
    chromium,
    open_page,
    run_prompt,
)
from face_consistency.faceid import STANDARD_PACKS
from face_consistency.faceid.pack_download import RELEASES
from face_consistency.nodes.comfy_env import DOWNLOAD_SETTING

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "example_workflows" / "api"
OUR_NODES = (
    "FaceConsistencyLoadModel",
    "FaceConsistencyReference",
    "FaceConsistencySimilarity",
    "FaceConsistencyMatchFaces",
    "FaceConsistencyBestOf",
    "FaceConsistencyGate",
)

pytestmark = pytest.mark.e2e


def test_nodes_are_listed(comfy_server: ComfyServer) -> None:
    info = comfy_server.get("/object_info")
    missing = [name for name in OUR_NODES if name not in info]
    assert not missing, f"not registered: {missing}\n{comfy_server.log()}"
    packs = info["FaceConsistencyLoadModel"]["input"]["required"]["pack"][0]
    assert "testpack" in packs
    similarity = info["FaceConsistencySimilarity"]
    assert similarity["output_is_list"][0] is True and similarity["output_node"] is True


def test_loader_lists_standard_packs_before_they_are_installed(comfy_server: ComfyServer) -> None:
    """Beside the installed test pack, every standard pack not installed is offered with its size
    (the server runs with FACE_CONSISTENCY_OFFLINE=1: nothing is downloaded here)."""
    spec = comfy_server.get("/object_info/FaceConsistencyLoadModel")["FaceConsistencyLoadModel"]["input"]
    packs = spec["required"]["pack"][0]
    offered = {name: f"{name} (downloads on first use, {RELEASES[name].size_label})" for name in STANDARD_PACKS}
    assert packs[0] == "testpack" and all(name in packs or label in packs for name, label in offered.items()), packs
    assert any(label in packs for label in offered.values()), packs
    assert spec["hidden"] == {"unique_id": "UNIQUE_ID"}


def example(name: str) -> dict[str, Any]:
    """An example workflow with the test pack in place of buffalo_l."""
    workflow = json.loads((EXAMPLES / f"{name}.json").read_text())
    for node in workflow.values():
        if node["class_type"] == "FaceConsistencyLoadModel":
            node["inputs"].update(pack="testpack", det_size="640")
    return workflow


def score_workflow() -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "obama.jpg"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "obama2.jpg"}},
        "3": {
            "class_type": "FaceConsistencyLoadModel",
            "inputs": {"pack": "testpack", "provider": "cpu", "det_size": "640", "det_thresh": 0.5},
        },
        "4": {
            "class_type": "FaceConsistencySimilarity",
            "inputs": {
                "face_model": ["3", 0],
                "images": ["2", 0],
                "reference_image": ["1", 0],
                "face_selection": "largest",
                "face_index": 0,
                "no_face_policy": "score_zero",
                "threshold": 0.7,
                "band_excellent": 0.85,
                "band_good": 0.75,
                "band_moderate": 0.65,
                "copy_paste_threshold": 0.1,
            },
        },
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 3]}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["4", 4], "filename_prefix": "face_e2e"}},
    }


def test_a_standard_pack_not_installed_is_accepted_and_offline_says_how_to_get_it(comfy_server: ComfyServer) -> None:
    """A workflow asking for buffalo_l (not installed) passes ComfyUI's validation; with downloads
    off (the test server's FACE_CONSISTENCY_OFFLINE=1) the run fails with what to fetch and where."""
    workflow = score_workflow()
    workflow["3"]["inputs"]["pack"] = "buffalo_l"
    queued = comfy_server.post("/prompt", {"prompt": workflow, "client_id": "offline-check"})
    assert queued.get("node_errors") == {}, queued
    deadline = time.monotonic() + 120
    while queued["prompt_id"] not in (history := comfy_server.get(f"/history/{queued['prompt_id']}")):
        assert time.monotonic() < deadline, comfy_server.log()
        time.sleep(0.5)
    status = history[queued["prompt_id"]]["status"]
    errors = [data for kind, data in status["messages"] if kind == "execution_error"]
    assert status["status_str"] == "error" and errors, status
    message = errors[0]["exception_message"]
    assert "downloading is off" in message and "releases/download/v0.7/buffalo_l.zip (289 MB)" in message, message


def test_scoring_workflow_runs(comfy_server: ComfyServer) -> None:
    outputs = run_prompt(comfy_server, score_workflow())

    report = outputs["5"]["text"][0]
    assert "testpack on CPUExecutionProvider" in report
    score = float(outputs["6"]["text"][0])
    assert score == pytest.approx(0.723, abs=0.01)  # obama / obama2, the measured figure
    assert f"{score:.3f}" in report and "moderate" in report
    assert outputs["3"]["text"][0].startswith("testpack on CPUExecutionProvider")
    assert outputs["4"]["text"][0] == report
    preview = outputs["4"]["images"][0]
    assert (comfy_server.base / "temp" / preview["filename"]).is_file()
    saved = outputs["7"]["images"][0]
    assert (comfy_server.base / "output" / saved["subfolder"] / saved["filename"]).is_file()


def test_example_score_one_edit_runs(comfy_server: ComfyServer) -> None:
    outputs = run_prompt(comfy_server, example("score_one_edit"))
    assert "0.72" in outputs["5"]["text"][0] and len(outputs["6"]["images"]) == 1


def test_example_multi_person_edit_runs(comfy_server: ComfyServer) -> None:
    outputs = run_prompt(comfy_server, example("multi_person_edit"))
    report = outputs["5"]["text"][0]
    assert "6 of 6 people matched" in report
    assert len(outputs["6"]["images"]) == 1 and len(outputs["7"]["images"]) == 1


def test_example_best_of_n_seeds_is_valid(comfy_server: ComfyServer) -> None:
    """Its Qwen-Image-Edit models are not here: check every node and input against the server."""
    info = comfy_server.get("/object_info")
    for node_id, node in example("best_of_n_seeds").items():
        spec = info.get(node["class_type"])
        assert spec is not None, f"node {node_id}: unknown type {node['class_type']}"
        required, optional = spec["input"].get("required", {}), spec["input"].get("optional", {})
        missing = set(required) - set(node["inputs"])
        unknown = set(node["inputs"]) - set(required) - set(optional)
        assert not missing and not unknown, f"node {node_id} {node['class_type']}: missing {missing}, unknown {unknown}"


def test_best_of_chain_runs_over_a_batch(comfy_server: ComfyServer) -> None:
    """best_of_n_seeds' scoring half on a real batch: list outputs feed the list-input node."""
    workflow = example("best_of_n_seeds")
    scoring_half = {k: workflow[k] for k in ("1", "14", "15", "16", "17", "18", "19")}
    scoring_half.update(
        {
            "1": {"class_type": "LoadImage", "inputs": {"image": "obama.jpg"}},
            "20": {"class_type": "LoadImage", "inputs": {"image": "biden.jpg"}},
            "21": {"class_type": "LoadImage", "inputs": {"image": "obama2.jpg"}},
            "13": {"class_type": "ImageBatch", "inputs": {"image1": ["20", 0], "image2": ["21", 0]}},
        }
    )
    scoring_half["16"]["inputs"]["threshold"] = 0.5
    outputs = run_prompt(comfy_server, scoring_half)

    report = outputs["19"]["text"][0]
    assert report.startswith("best of 2: 1 at or above 0.50") and "1. image 1:" in report
    assert len(outputs["17"]["images"]) == 1


def gate_workflow(first: dict[str, Any], second: dict[str, Any], empty_side: str = "skip downstream") -> dict[str, Any]:
    """Two images batched (ImageBatch fits the second to the first's size), gated against obama.jpg; each
    side saved by Save Image, the reasons and report shown by Preview Any."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "obama.jpg"}},
        "2": first,
        "3": second,
        "4": {"class_type": "ImageBatch", "inputs": {"image1": ["2", 0], "image2": ["3", 0]}},
        "5": {
            "class_type": "FaceConsistencyLoadModel",
            "inputs": {"pack": "testpack", "provider": "cpu", "det_size": "640", "det_thresh": 0.5},
        },
        "6": {
            "class_type": "FaceConsistencyGate",
            "inputs": {
                "face_model": ["5", 0],
                "images": ["4", 0],
                "reference_image": ["1", 0],
                "threshold": 0.6,
                "several_faces": "reject",
                "reject_unchanged": True,
                "copy_paste_threshold": 0.1,
                "require_both": False,
                "judge_threshold": 0.5,
                "empty_side": empty_side,
                "band_excellent": 0.85,
                "band_good": 0.75,
                "band_moderate": 0.65,
            },
        },
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "gate_passed"}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["6", 1], "filename_prefix": "gate_rejected"}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["6", 2]}},
        "10": {"class_type": "PreviewAny", "inputs": {"source": ["6", 3]}},
    }


def load(name: str) -> dict[str, Any]:
    return {"class_type": "LoadImage", "inputs": {"image": name}}


NO_FACE = {"class_type": "EmptyImage", "inputs": {"width": 256, "height": 256, "batch_size": 1, "color": 0x808080}}


@pytest.mark.parametrize(
    ("first", "second", "passed", "rejected"),
    [
        (load("obama2.jpg"), load("biden.jpg"), 1, 1),  # partly
        (load("obama2.jpg"), load("reference.png"), 2, 0),  # wholly (reference.png is obama3.jpg)
        (load("biden.jpg"), NO_FACE, 0, 2),  # not at all
    ],
    ids=["partly", "wholly", "not_at_all"],
)
def test_gate_splits_a_batch_and_an_empty_side_runs_nothing(
    comfy_server: ComfyServer, first: dict[str, Any], second: dict[str, Any], passed: int, rejected: int
) -> None:
    outputs = run_prompt(comfy_server, gate_workflow(first, second))
    reasons, report = outputs["9"]["text"], outputs["10"]["text"][0]
    assert len(reasons) == 2 and sum(r.startswith("passed: ") for r in reasons) == passed, reasons
    assert f"{passed} of 2 passed, {rejected} rejected" in report
    for node, count in (("7", passed), ("8", rejected)):
        saved = outputs.get(node, {}).get("images", [])
        assert len(saved) == count, (node, outputs.get(node))
        assert all((comfy_server.base / "output" / i["subfolder"] / i["filename"]).is_file() for i in saved)
    if second is NO_FACE:
        assert reasons[1] == "rejected: no face"


def test_gate_empty_batch_option_gives_zero_images(comfy_server: ComfyServer) -> None:
    """With empty_side 'empty batch' the empty side is a [0, H, W, 3] IMAGE: Get Image Size takes it;
    ComfyUI 0.3.64's Save Image cannot (it reads images[0]), which is why skipping is the default."""
    workflow = gate_workflow(load("obama2.jpg"), load("reference.png"), "empty batch")
    del workflow["8"]
    workflow["11"] = {"class_type": "GetImageSize", "inputs": {"image": ["6", 1]}}
    workflow["12"] = {"class_type": "PreviewAny", "inputs": {"source": ["11", 2]}}
    outputs = run_prompt(comfy_server, workflow)
    assert outputs["12"]["text"] == ["0"] and len(outputs["7"]["images"]) == 2

    workflow = gate_workflow(load("obama2.jpg"), load("reference.png"), "empty batch")
    queued = comfy_server.post("/prompt", {"prompt": workflow, "client_id": "gate-empty-save"})
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while queued["prompt_id"] not in (history := comfy_server.get(f"/history/{queued['prompt_id']}")):
        assert time.monotonic() < deadline, comfy_server.log()
        time.sleep(0.5)
    status = history[queued["prompt_id"]]["status"]
    errors = [data for kind, data in status["messages"] if kind == "execution_error"]
    assert status["status_str"] == "error" and errors[0]["node_type"] == "SaveImage", status


# the box web/face_consistency_node_text.js puts on the scoring node, by its data-testid and aria-label
NODE_TEXT_BOX = 'textarea[data-testid="face-consistency-node-text"][aria-label="Face Similarity Score report"]'


async def _frontend_prompts(
    devtools_port: int, page_url: str, graphs: dict[str, str], shown_text_of: str | None = None
) -> dict[str, Any]:
    """Load each UI workflow in the real frontend and let the frontend convert it to API format,
    as queueing it does. With `shown_text_of`, first queue that workflow from the page (test
    pack) and return the report its node shows on the page."""
    async with open_page(devtools_port, page_url) as page:
        await page.wait_for("!!(window.app && window.app.graph)", "the ComfyUI frontend", STARTUP_TIMEOUT_S)
        prompts = {"version": await page.evaluate("window.__COMFYUI_FRONTEND_VERSION__ ?? null")}
        if shown_text_of is not None:
            graph = graphs[shown_text_of]
            await page.evaluate(
                f"(async () => {{ await app.loadGraphData({graph}, true, true, 'shown_text'); "
                "for (const node of app.graph.nodes) {"
                "  for (const w of node.widgets ?? []) {"
                "    if (w.name === 'pack') w.value = 'testpack';"
                "    if (w.name === 'det_size') w.value = '640'; } }"
                "await app.queuePrompt(0, 1); })()"
            )
            box = f"document.querySelector({json.dumps(NODE_TEXT_BOX)})"
            prompts["shown_text"] = await page.wait_for(
                f"{box}?.isConnected && {box}.readOnly && {box}.value", "the report on the scoring node", RUN_TIMEOUT_S
            )
        for name, graph in graphs.items():
            # unknown: node types the frontend has no definition for (it loads them as placeholders);
            # flagged: nodes it marks with errors (frontend 1.58 also marks nodes whose model file
            # is not on the server)
            prompts[name] = json.loads(
                await page.evaluate(
                    f"(async () => {{ await app.loadGraphData({graph}, true, true, {json.dumps(name)}); "
                    "const nodes = app.graph.nodes;"
                    "const unknown = nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type);"
                    "const flagged = nodes.filter(n => n.has_errors).map(n => String(n.id));"
                    "return JSON.stringify({unknown, flagged, output: (await app.graphToPrompt()).output}); })()"
                )
            )
        return prompts


def _has_a_missing_file(node: dict[str, Any], spec: dict[str, Any]) -> bool:
    """Whether a node names a file the server does not offer (a combo value not in its list)."""
    inputs = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
    return any(
        isinstance(inputs.get(key, [None])[0], list) and not isinstance(value, list) and value not in inputs[key][0]
        for key, value in node["inputs"].items()
    )


def test_ui_workflows_load_in_the_frontend(frontend_server: ComfyServer, tmp_path: Path) -> None:
    """Each UI-format example opens in ComfyUI's frontend (pinned and newest) and queues as its
    API-format twin; queued from the page, the scoring node shows its report
    (web/face_consistency_node_text.js)."""
    names = ("score_one_edit", "best_of_n_seeds", "multi_person_edit")
    graphs = {name: (REPO_ROOT / "example_workflows" / f"{name}.json").read_text() for name in names}
    with chromium(tmp_path / "chromium") as devtools_port:
        prompts = asyncio.run(_frontend_prompts(devtools_port, frontend_server.url + "/", graphs, "score_one_edit"))

    version = prompts.pop("version")
    shown = prompts.pop("shown_text")
    assert shown.startswith("Face similarity: testpack on CPUExecutionProvider"), (version, shown)

    info = frontend_server.get("/object_info")
    for name in names:
        expected = json.loads((EXAMPLES / f"{name}.json").read_text())
        assert prompts[name]["unknown"] == [], (version, name)
        for node_id in prompts[name]["flagged"]:
            node = expected[node_id]
            assert _has_a_missing_file(node, info[node["class_type"]]), (version, name, node_id, node["class_type"])
        queued = prompts[name]["output"]
        assert set(queued) == set(expected), (version, name)
        for node_id, node in expected.items():
            assert queued[node_id]["class_type"] == node["class_type"]
            # the frontend adds display-only widgets (Preview Any's "preview"); all else must match
            assert {k: v for k, v in queued[node_id]["inputs"].items() if k in node["inputs"]} == node["inputs"], (
                version,
                name,
                node_id,
            )
            assert set(node["inputs"]) <= set(queued[node_id]["inputs"]), (version, name, node_id)


async def _toggle_download_setting(devtools_port: int, page_url: str) -> dict[str, Any]:
    async with open_page(devtools_port, page_url) as page:
        await page.wait_for(
            "!!(window.app && window.app.extensionManager?.setting)", "the ComfyUI frontend", STARTUP_TIMEOUT_S
        )
        return json.loads(
            await page.evaluate(
                "(async () => { const s = app.extensionManager.setting, id = " + json.dumps(DOWNLOAD_SETTING) + ";"
                "const before = s.get(id); await s.set(id, false); const after = s.get(id);"
                "return JSON.stringify({before, after}); })()"
            )
        )


def test_download_setting_is_in_the_frontend_and_saved_where_the_nodes_read_it(
    comfy_server: ComfyServer, tmp_path: Path
) -> None:
    """web/face_consistency_settings.js registers the setting (on by default); turned off in the
    page, it lands in the user's comfy.settings.json, the file `pack_downloads_enabled` reads."""
    settings_file = comfy_server.base / "user" / "default" / "comfy.settings.json"
    original = settings_file.read_text()
    try:
        with chromium(tmp_path / "chromium") as devtools_port:
            seen = asyncio.run(_toggle_download_setting(devtools_port, comfy_server.url + "/"))
        assert seen == {"before": True, "after": False}
        assert json.loads(settings_file.read_text())[DOWNLOAD_SETTING] is False
    finally:
        settings_file.write_text(original)
