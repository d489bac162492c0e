"""End to end in a real ComfyUI: the pack loads, its nodes are listed, a scoring workflow runs.

Runs only when COMFYUI_DIR points at a ComfyUI checkout (skipped otherwise):

    COMFYUI_DIR=/path/to/ComfyUI [COMFYUI_PYTHON=/path/to/its/python] \
        python -m pytest tests/test_e2e_comfyui.py -m e2e -v

The server runs on 127.0.0.1 with `--base-directory` in a temporary folder, so the checkout
is left untouched: the pack is symlinked into that folder's custom_nodes under a hyphenated
name (as users clone it), the shared test photos are copied into its input folder, and an
extra_model_paths.yaml maps `insightface` to the shared test pack root.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import cv2
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "example_workflows" / "api"
PACK_FOLDER = "ComfyUI-Face-Consistency"
OUR_NODES = (
    "FaceConsistencyLoadModel", "FaceConsistencyReference", "FaceConsistencySimilarity",
    "FaceConsistencyMatchFaces", "FaceConsistencyBestOf",
)
STARTUP_TIMEOUT_S = 300
RUN_TIMEOUT_S = 300

pytestmark = pytest.mark.e2e


def _comfyui_dir() -> Path:
    value = os.environ.get("COMFYUI_DIR")
    if not value:
        pytest.skip("set COMFYUI_DIR to a ComfyUI checkout to run the end-to-end tier")
    path = Path(value).expanduser().resolve()
    if not (path / "main.py").is_file():
        pytest.skip(f"COMFYUI_DIR={path} has no main.py: not a ComfyUI checkout")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    def __init__(self, url: str, process: subprocess.Popen, log_path: Path, base: Path) -> None:
        self.url, self.process, self.log_path, self.base = url, process, log_path, base

    def get(self, route: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{route}", timeout=30) as response:
            return json.loads(response.read())

    def post(self, route: str, payload: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            f"{self.url}{route}", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:  # ComfyUI explains a rejected prompt in the body
            raise AssertionError(f"POST {route} -> {exc.code}: {exc.read().decode()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


@pytest.fixture(scope="module")
def comfy_server(tmp_path_factory: pytest.TempPathFactory, testdata: Path) -> Iterator[ComfyServer]:
    comfyui = _comfyui_dir()
    base = tmp_path_factory.mktemp("comfy-base")
    for sub in ("custom_nodes", "input", "output", "temp", "user", "models"):
        (base / sub).mkdir()
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(REPO_ROOT, target_is_directory=True)
    for name in ("obama.jpg", "obama2.jpg", "biden.jpg"):
        shutil.copyfile(testdata / "faces" / name, base / "input" / name)
    # the example workflows' input names: a control and its "edit", a group photo and its mirror
    shutil.copyfile(testdata / "faces" / "obama.jpg", base / "input" / "control.png")
    shutil.copyfile(testdata / "faces" / "obama2.jpg", base / "input" / "edited.png")
    from insightface.data import get_image

    group_bgr = get_image("t1")
    cv2.imwrite(str(base / "input" / "group.png"), group_bgr)
    cv2.imwrite(str(base / "input" / "group_edited.png"), group_bgr[:, ::-1])
    extra_paths = base / "extra_model_paths.yaml"
    extra_paths.write_text(f"face_test_data:\n    base_path: {testdata}\n    insightface: insightface\n")

    port = _free_port()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    log_path = base / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                "--base-directory", str(base), "--extra-model-paths-config", str(extra_paths),
                "--database-url", "sqlite:///:memory:",
            ],
            cwd=comfyui, stdout=log, stderr=subprocess.STDOUT,
        )
    server = ComfyServer(f"http://127.0.0.1:{port}", process, log_path, base)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with code {process.returncode} while starting:\n{server.log()}")
            try:
                server.get("/object_info/FaceConsistencyLoadModel")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer within {STARTUP_TIMEOUT_S}s:\n{server.log()}")
                time.sleep(1.0)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def test_nodes_are_listed(comfy_server: ComfyServer) -> None:
    info = comfy_server.get("/object_info")
    missing = [name for name in OUR_NODES if name not in info]
    assert not missing, f"not registered: {missing}\n{comfy_server.log()}"
    packs = info["FaceConsistencyLoadModel"]["input"]["required"]["pack"][0]
    assert "testpack" in packs
    similarity = info["FaceConsistencySimilarity"]
    assert similarity["output_is_list"][0] is True and similarity["output_node"] is True


def run_prompt(server: ComfyServer, workflow: dict[str, Any]) -> dict[str, Any]:
    """Queue a workflow, wait for it, return its outputs (failing with the server log if it fails)."""
    queued = server.post("/prompt", {"prompt": workflow, "client_id": uuid.uuid4().hex})
    prompt_id = queued["prompt_id"]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while prompt_id not in (history := server.get(f"/history/{prompt_id}")):
        assert time.monotonic() < deadline, f"prompt not finished in {RUN_TIMEOUT_S}s:\n{server.log()}"
        time.sleep(0.5)
    entry = history[prompt_id]
    assert entry["status"]["status_str"] == "success", f"{entry['status']}\n{server.log()}"
    return entry["outputs"]


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
                "face_model": ["3", 0], "images": ["2", 0], "reference_image": ["1", 0],
                "face_selection": "largest", "face_index": 0, "no_face_policy": "score_zero",
                "threshold": 0.7, "band_excellent": 0.85, "band_good": 0.75, "band_moderate": 0.65,
                "copy_paste_threshold": 0.1,
            },
        },
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 3]}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["4", 4], "filename_prefix": "face_e2e"}},
    }


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
    scoring_half.update({
        "1": {"class_type": "LoadImage", "inputs": {"image": "obama.jpg"}},
        "20": {"class_type": "LoadImage", "inputs": {"image": "biden.jpg"}},
        "21": {"class_type": "LoadImage", "inputs": {"image": "obama2.jpg"}},
        "13": {"class_type": "ImageBatch", "inputs": {"image1": ["20", 0], "image2": ["21", 0]}},
    })
    scoring_half["16"]["inputs"]["threshold"] = 0.5
    outputs = run_prompt(comfy_server, scoring_half)

    report = outputs["19"]["text"][0]
    assert report.startswith("best of 2: 1 at or above 0.50") and "1. image 1:" in report
    assert len(outputs["17"]["images"]) == 1


def _chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no Chromium (set CHROMIUM) to load the UI workflows in ComfyUI's frontend")
    return path


async def _frontend_prompts(
    devtools_port: int, page_url: str, graphs: dict[str, str], shown_text_of: str | None = None
) -> dict[str, Any]:
    """Load each UI workflow in the real frontend (over the DevTools protocol) and let the
    frontend convert it to API format, as queueing it would. With `shown_text_of`, first queue
    that workflow from the page (test pack) and return the report the node shows."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.put(f"http://127.0.0.1:{devtools_port}/json/new?{page_url}") as response:
            target = await response.json()
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            message_ids = iter(range(1, 1_000_000))

            async def evaluate(expression: str) -> Any:
                message_id = next(message_ids)
                await ws.send_json({
                    "id": message_id, "method": "Runtime.evaluate",
                    "params": {"expression": expression, "awaitPromise": True, "returnByValue": True},
                })
                while (reply := await ws.receive_json()).get("id") != message_id:
                    pass
                result = reply["result"]
                assert "exceptionDetails" not in result, json.dumps(result["exceptionDetails"])[:2000]
                return result["result"].get("value")

            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while await evaluate("!!(window.app && window.app.graph)") is not True:
                assert time.monotonic() < deadline, "the ComfyUI frontend did not start"
                await asyncio.sleep(1.0)
            prompts = {}
            if shown_text_of is not None:
                graph = graphs[shown_text_of]
                prompts["shown_text"] = await evaluate(
                    f"(async () => {{ await app.loadGraphData({graph}, true, true, 'shown_text'); "
                    "for (const node of app.graph._nodes) {"
                    "  for (const w of node.widgets ?? []) {"
                    "    if (w.name === 'pack') w.value = 'testpack';"
                    "    if (w.name === 'det_size') w.value = '640'; } }"
                    "await app.queuePrompt(0, 1);"
                    "const node = app.graph._nodes.find(n => n.type === 'FaceConsistencySimilarity');"
                    "for (let i = 0; i < 600; i++) {"
                    "  const w = node.widgets.find(w => w.name === 'face_consistency_text');"
                    "  if (w && w.value) return w.value;"
                    "  await new Promise(r => setTimeout(r, 500)); }"
                    "return null; })()"
                )
            for name, graph in graphs.items():
                prompts[name] = json.loads(await evaluate(
                    f"(async () => {{ await app.loadGraphData({graph}, true, true, {json.dumps(name)}); "
                    "const missing = app.graph._nodes.filter(n => n.has_errors).map(n => n.type); "
                    "return JSON.stringify({missing, output: (await app.graphToPrompt()).output}); })()"
                ))
            return prompts


def test_ui_workflows_load_in_the_frontend(comfy_server: ComfyServer, tmp_path: Path) -> None:
    """Each UI-format example opens in ComfyUI's frontend and queues as its API-format twin;
    queued from the page, the scoring node shows its report (web/face_consistency_node_text.js)."""

    chromium = _chromium()
    devtools_port = _free_port()
    browser = subprocess.Popen(
        [
            chromium, "--headless=new", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={devtools_port}",
            f"--user-data-dir={tmp_path / 'chromium'}", "about:blank",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    names = ("score_one_edit", "best_of_n_seeds", "multi_person_edit")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{devtools_port}/json/version", timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "Chromium's DevTools endpoint did not open"
                time.sleep(0.5)
        graphs = {name: (REPO_ROOT / "example_workflows" / f"{name}.json").read_text() for name in names}
        prompts = asyncio.run(_frontend_prompts(devtools_port, comfy_server.url + "/", graphs, "score_one_edit"))
    finally:
        browser.terminate()
        browser.wait(timeout=30)

    shown = prompts.pop("shown_text")
    assert shown and shown.startswith("Face similarity: testpack on CPUExecutionProvider"), shown

    for name in names:
        assert prompts[name]["missing"] == [], name
        expected = json.loads((EXAMPLES / f"{name}.json").read_text())
        queued = prompts[name]["output"]
        assert set(queued) == set(expected), name
        for node_id, node in expected.items():
            assert queued[node_id]["class_type"] == node["class_type"]
            # the frontend adds display-only widgets (Preview Any's "preview"); all else must match
            assert {k: v for k, v in queued[node_id]["inputs"].items() if k in node["inputs"]} == node["inputs"]
            assert set(node["inputs"]) <= set(queued[node_id]["inputs"]), f"{name} node {node_id}"
