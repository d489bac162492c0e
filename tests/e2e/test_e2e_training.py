"""End to end in a real ComfyUI: a launch + monitor workflow trains the tiny model; the
evaluate_checkpoints example lists and ranks a run's checkpoints; the training panel lists,
charts and stops jobs in headless Chromium, with the pinned and with the newest frontend.

Runs only when COMFYUI_DIR points at a ComfyUI checkout (failed instead under CI=true); the
panel check also needs Chromium and the newest frontend (see `comfyui_server.py`):

    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_NEWEST_FRONTEND=/path/to/frontend [COMFYUI_PYTHON=/path/to/its/python] \\
        [CHROMIUM=/path/to/chromium] python -m pytest tests/e2e/test_e2e_training.py -m e2e -v
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from comfyui_server import (
    STARTUP_TIMEOUT_S,
    ComfyServer,
    DevToolsPage,
    chromium,
    open_page,
    run_prompt,
)
from face_consistency.training_contract import libraries
from face_consistency.training_contract.protocol import read_metrics
from run_folders import MUSUBI_CHECKPOINTS, MUSUBI_NAME, write_musubi_run
from training_runs import ComfyTinyFiles, TinyTraining, wait_for

pytestmark = pytest.mark.e2e

API_EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows" / "api"
EXAMPLE = API_EXAMPLES / "train_launch_monitor.json"
FINISHED_NAME = "e2e_tiny"
# our extension's file and routes, in the URL or stack of any error they cause; the frontend's
# own noise on a fresh user folder (404s for user.css, userdata, favicon) is not ours
OUR_MARKS = ("face-consistency", "face_consistency")
# the sidebar button of the tab web/face_consistency_panel.js registers: the frontend (1.27 as 1.58)
# gives it the tab's tooltip as its aria-label
TAB_BUTTON = 'button[aria-label="Face Consistency training jobs"]'


def launch_workflow(
    tiny: TinyTraining, installed: ComfyTinyFiles, output_name: str, max_train_steps: int, validation_dataset: str = ""
) -> dict[str, Any]:
    """The launch + monitor example on the tiny models: one sample and a checkpoint per epoch of 4 steps
    (with `validation_dataset`, held-out items scored at every checkpoint)."""
    workflow = json.loads(EXAMPLE.read_text())
    workflow["1"]["inputs"].update(
        dit=tiny.files.dit.name,
        vae=tiny.files.vae.name,
        text_encoder=tiny.files.text_encoder.name,
        dataset=str(installed.dataset_toml),
        output_name=output_name,
        learning_rate=1e-3,
        network_dim=4,
        network_alpha=4.0,
        mixed_precision="no",
        optimizer_type="AdamW",
        gradient_checkpointing=False,
        enable_face_loss=False,
        max_train_steps=max_train_steps,
        save_every_n_epochs=1,
        sample_every_n_epochs=1,
        sample_prompts=f"a tiny edit --w 32 --h 32 --s 2 --d 100 --ci {installed.control}",
        tokenizer=str(installed.tokenizer_dir),
        validation_dataset=validation_dataset,
    )
    return workflow


def held_out_folder(installed: ComfyTinyFiles) -> Path:
    """Two held-out pairs in ComfyUI's input folder, laid out like a dataset folder."""
    folder = installed.dataset_toml.parent.parent / "tiny_held_out"
    for index in (0, 1):
        for part in ("images", "controls"):
            (folder / part).mkdir(parents=True, exist_ok=True)
            source = installed.dataset_toml.parent / part / f"item_{index}.png"
            (folder / part / f"held_{index}.png").write_bytes(source.read_bytes())
        (folder / "images" / f"held_{index}.txt").write_text(f"tiny edit number {index}", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def finished_job(comfy_server: ComfyServer, tiny_training: TinyTraining) -> dict[str, Any]:
    """The launch + monitor workflow's outputs, the monitor waiting until the 8-step run finished.
    Session-scoped: pytest groups the tests by frontend across modules, and a module-scoped run would
    be launched again into the same folder when this module's tests come back after another's."""
    installed = tiny_training.install_into_comfyui(comfy_server.base)
    workflow = launch_workflow(
        tiny_training, installed, FINISHED_NAME, max_train_steps=8, validation_dataset=str(held_out_folder(installed))
    )
    workflow["2"]["inputs"].update(wait_until="finished", timeout_minutes=5.0)
    return run_prompt(comfy_server, workflow)


def jobs_by_name(server: ComfyServer) -> dict[str, dict[str, Any]]:
    return {job["name"]: job for job in server.get("/face_consistency/jobs")["jobs"]}


def test_launch_and_monitor_workflow_trains_in_comfyui(comfy_server: ComfyServer, finished_job: dict[str, Any]) -> None:
    status = finished_job["2"]["text"][0]
    assert f"{FINISHED_NAME}: completed" in status, f"{status}\n{comfy_server.log()}"
    output_dir = comfy_server.base / "output" / "loras" / FINISHED_NAME
    assert (output_dir / f"{FINISHED_NAME}.safetensors").is_file()
    assert sorted(p.name for p in (output_dir / "sample").glob("*.png")), "no samples written"
    assert len(finished_job["3"]["images"]) == 1 and len(finished_job["4"]["images"]) == 1  # plot, sample grid
    job = jobs_by_name(comfy_server)[FINISHED_NAME]
    assert job["state"] == "completed" and job["step"] == 8
    # the held-out items' loss at every checkpoint, and the checkpoint to keep, in the table, the monitor and the route
    table = json.loads((output_dir / "checkpoints.json").read_text())
    assert [row["step"] for row in table["checkpoints"]] == [4, 8] and table["validation_items"] == 2
    assert all(set(row["validation_loss"]) == {"1", "0.75", "0.5", "0.25"} for row in table["checkpoints"])
    keep = f"keep {table['recommendation']['name']}: {table['recommendation']['reason']}"
    assert keep in status.splitlines()
    detail = comfy_server.get(f"/face_consistency/jobs/{job['job_id']}")
    assert detail["recommendation"] == table["recommendation"] and len(detail["validation"]) == 2
    assert comfy_server.get("/api/face_consistency/jobs") == comfy_server.get("/face_consistency/jobs")


@pytest.mark.skipif(
    libraries.too_old_for("qwen-image-2.1") is not None, reason=str(libraries.too_old_for("qwen-image-2.1"))
)
def test_a_qwen_image_21_run_launched_in_comfyui_trains_with_the_face_loss(
    comfy_server: ComfyServer, tmp_path: Path, faces_dir: Path, testpack_dir: Path
) -> None:
    """The launch + monitor example with model_version qwen-image-2.1 on tiny 2.1 models in ComfyUI's folders:
    it trains with the face loss (the pack from ComfyUI's insightface folder), samples, and saves a LoRA in
    ComfyUI's 2.1 layout."""
    from face_consistency.faceid import load_face_model
    from safetensors import safe_open
    from tiny_qwen import write_tiny_dataset
    from tiny_qwen_image21 import write_tiny_qwen_image21_files

    engine = load_face_model(testpack_dir, provider="cpu", det_size=640)
    tiny = TinyTraining(
        write_tiny_qwen_image21_files(tmp_path / "models"),  # type: ignore[arg-type]
        write_tiny_dataset(tmp_path / "data", n=2, with_face_photos=faces_dir, face_model=engine),
    )
    installed = tiny.install_into_comfyui(comfy_server.base, name="tiny21")
    workflow = launch_workflow(tiny, installed, "e2e_tiny_21", max_train_steps=2)
    workflow["1"]["inputs"].update(
        model_version="qwen-image-2.1",
        face_model_name=testpack_dir.name,
        face_device="cpu",
        enable_face_loss=True,
        use_face_as_loss=True,
        extra_args="--face_loss_max_t 1",
        sample_prompts=f"a tiny edit --w 64 --h 64 --s 2 --d 7 --ci {installed.control}",
    )
    workflow["2"]["inputs"].update(wait_until="finished", timeout_minutes=5.0)
    outputs = run_prompt(comfy_server, workflow)
    status = outputs["2"]["text"][0]
    assert "e2e_tiny_21: completed" in status, f"{status}\n{comfy_server.log()}"
    output_dir = comfy_server.base / "output" / "loras" / "e2e_tiny_21"
    assert any("loss/face" in m for m in read_metrics(output_dir)), "the face loss did not run"
    assert sorted((output_dir / "sample").glob("*.png")), "no samples written"
    with safe_open(str(output_dir / "e2e_tiny_21.safetensors"), framework="pt") as lora:
        assert lora.metadata()["ss_model_version"] == "qwen-image-2.1"
        keys = list(lora.keys())
    assert keys and all(key.startswith("transformer.transformer_blocks.") for key in keys)


# evaluate_checkpoints' nodes that need the Qwen-Image-Edit models: the model loaders, the LoRA
# loader and the sampling chain that renders the control image with each checkpoint
QWEN_NODES = ("2", "3", "4", "5", "6", "7", "10", "11", "12", "13", "14")
# a stand-in render per checkpoint, in step order: the third keeps the person best
RENDERS = ("biden.jpg", "obama_partial_face.jpg", "obama2.jpg", "biden.jpg")


def evaluate_checkpoints_workflow() -> dict[str, Any]:
    """The evaluate_checkpoints example on the musubi run folder, with the test pack."""
    workflow = json.loads((API_EXAMPLES / "evaluate_checkpoints.json").read_text())
    workflow["1"]["inputs"]["output_folder"] = f"loras/{MUSUBI_NAME}"
    workflow["15"]["inputs"].update(pack="testpack", det_size="640")
    return workflow


def test_evaluate_checkpoints_example_lists_and_ranks_a_run(comfy_server: ComfyServer) -> None:
    """As far as it runs without the Qwen models: every checkpoint of a run folder is listed where
    LoraLoaderModelOnly looks, the server rejects the whole example for the missing Qwen model
    files only, and the rest (photos in place of the renders) ranks the checkpoints."""
    run = write_musubi_run(comfy_server.base / "output" / "loras" / MUSUBI_NAME)
    workflow = evaluate_checkpoints_workflow()

    errors = comfy_server.rejections(workflow)
    assert {node_id: [e["extra_info"]["input_name"] for e in node["errors"]] for node_id, node in errors.items()} == {
        "2": ["unet_name"],
        "6": ["clip_name"],
        "7": ["vae_name"],
    }, errors

    for node_id in QWEN_NODES:
        del workflow[node_id]
    renders = {str(30 + i): {"class_type": "LoadImage", "inputs": {"image": name}} for i, name in enumerate(RENDERS)}
    batch = ["30", 0]
    for i, render_id in enumerate(list(renders)[1:]):
        renders[f"4{i}"] = {"class_type": "ImageBatch", "inputs": {"image1": batch, "image2": [render_id, 0]}}
        batch = [f"4{i}", 0]
    # one image per list item: the scoring node runs once per checkpoint, as after the sampler
    renders["50"] = {"class_type": "RebatchImages", "inputs": {"images": batch, "batch_size": 1}}
    renders["51"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}
    workflow.update(renders)
    workflow["18"]["inputs"]["images"] = workflow["21"]["inputs"]["images"] = ["50", 0]
    outputs = run_prompt(comfy_server, workflow)

    listed = outputs["51"]["text"]
    by_step = sorted(MUSUBI_CHECKPOINTS, key=lambda checkpoint: checkpoint[1])
    assert listed == [f"{MUSUBI_NAME}/{stem}.safetensors" for stem, _, _ in by_step]
    lora_names = comfy_server.get("/object_info/LoraLoaderModelOnly")["LoraLoaderModelOnly"]["input"]["required"]
    assert set(listed) <= set(lora_names["lora_name"][0]), lora_names
    table = outputs["19"]["text"][0]
    assert all(name in table for name in listed), table
    best = listed[2]  # obama2.jpg's checkpoint
    assert table.endswith(f"copied {best} -> {MUSUBI_NAME}-best.safetensors"), table
    assert (run / f"{MUSUBI_NAME}-best.safetensors").read_bytes() == (run / Path(best).name).read_bytes()
    assert len(outputs["20"]["images"]) == 1  # score vs step
    assert len(outputs["21"]["images"]) == len(RENDERS)


def _job_box(name: str) -> str:
    """JS: the panel's box of the job called `name` (or undefined)."""
    return (
        f"[...document.querySelectorAll('.fc-panel .fc-job')]"
        f".find(box => box.querySelector('.fc-job-head span').textContent.endsWith({json.dumps(' ' + name)}))"
    )


def _state_of(name: str) -> str:
    return f"{_job_box(name)}?.querySelector('.fc-state').textContent"


def running_name(server: ComfyServer) -> str:
    """The long job the panel test stops, one per frontend."""
    return f"e2e_running_{server.frontend}"


async def _drive_panel(devtools_port: int, url: str, shots: Path, running: str) -> dict[str, Any]:
    async with open_page(devtools_port, url) as page:
        await page.wait_for("!!(window.app && window.app.graph)", "the ComfyUI frontend", STARTUP_TIMEOUT_S)
        await page.wait_for(f"!!document.querySelector({json.dumps(TAB_BUTTON)})", "the Face training sidebar button")
        await page.click(f"document.querySelector({json.dumps(TAB_BUTTON)})")
        await page.wait_for(
            f"{_state_of(FINISHED_NAME)} === 'completed' && !!{_job_box(running)}", "both jobs listed in the panel"
        )
        running_state = await page.evaluate(_state_of(running))
        for name in (FINISHED_NAME, running):  # expand both: charts and samples
            await page.click(f"{_job_box(name)}.querySelector('.fc-job-head')")
        captions = await _wait_for_details(page, FINISHED_NAME, charts=3)  # with the validation loss
        keep = await page.evaluate(f"{_job_box(FINISHED_NAME)}.querySelector('.fc-keep')?.textContent")
        await _wait_for_details(page, running)
        panel_open = await page.screenshot(shots / "training_panel.png")

        stop_buttons = await page.evaluate(
            f"[{_job_box(FINISHED_NAME)}.querySelectorAll('.fc-stop').length,"
            f" {_job_box(running)}.querySelectorAll('.fc-stop').length]"
        )
        await page.click(f"{_job_box(running)}.querySelector('.fc-stop')")
        await page.wait_for(f"{_state_of(running)} === 'stopped'", "the stopped job in the panel", 120)
        # the toast's text, wherever the frontend's toast component puts it (outside the panel)
        await page.wait_for(
            "[...document.body.querySelectorAll(':not(.fc-panel *)')].some(e => e.childElementCount === 0"
            f" && e.textContent.includes({json.dumps('Training stopped: ' + running)}))",
            "the 'training stopped' toast",
        )
        stopped = await page.screenshot(shots / "training_panel_stopped.png")
        return {
            "captions": captions,
            "keep": keep,
            "running_state": running_state,
            "stop_buttons": stop_buttons,
            "console_errors": page.console_errors,
            "screenshots": [panel_open, stopped],
        }


async def _wait_for_details(page: DevToolsPage, name: str, charts: int = 2) -> list[str]:
    """The expanded job shows its `charts` charts and samples (loaded from the sample route); returns
    the charts' captions."""
    box = _job_box(name)
    await page.wait_for(
        f"{box}.querySelectorAll('.fc-chart-label').length === {charts}"
        f" && {box}.querySelectorAll('svg.fc-chart path').length >= 2"
        f" && [...{box}.querySelectorAll('.fc-samples img')].some(img => img.complete && img.naturalWidth > 0)",
        f"{name}'s charts and samples",
        120,
        explain=f"JSON.stringify({{state: {_state_of(name)},"
        f" charts: {box}.querySelectorAll('svg.fc-chart path').length,"
        f" images: [...{box}.querySelectorAll('.fc-samples img')]"
        ".map(img => [img.getAttribute('src'), img.complete, img.naturalWidth])})",
    )
    return await page.evaluate(f"[...{box}.querySelectorAll('.fc-chart-label')].map(label => label.textContent)")


@pytest.fixture
def running_job(
    frontend_server: ComfyServer, finished_job: dict[str, Any], tiny_training: TinyTraining
) -> Iterator[str]:
    """A job launched (launch node alone) from the frontend's server to train far longer than the
    test, past its first epoch: a sample and a checkpoint to show. Stopped through the route if the
    test leaves it running. Yields its name."""
    name = running_name(frontend_server)
    installed = tiny_training.install_into_comfyui(frontend_server.base)
    run_prompt(frontend_server, {"1": launch_workflow(tiny_training, installed, name, max_train_steps=100_000)["1"]})
    try:
        wait_for(lambda: (jobs_by_name(frontend_server)[name].get("step") or 0) > 4, "its first epoch")
        yield name
    finally:
        job = jobs_by_name(frontend_server)[name]
        if job["state"] not in ("completed", "stopped", "failed"):
            frontend_server.post(f"/face_consistency/jobs/{job['job_id']}/stop", {})
            wait_for(lambda: jobs_by_name(frontend_server)[name]["state"] in ("stopped", "failed"), "its end")


def test_training_panel_lists_charts_and_stops_jobs(
    frontend_server: ComfyServer, running_job: str, tmp_path: Path
) -> None:
    """The panel's sidebar tab opens, lists the finished and the running job from /face_consistency/jobs
    with charts and samples, and its stop button stops the running one with a checkpoint saved
    (the pinned and the newest frontend, on one base directory: the newest lists both runs' jobs)."""
    with chromium(tmp_path / "chromium") as devtools_port:
        seen = asyncio.run(_drive_panel(devtools_port, frontend_server.url + "/", tmp_path, running_job))

    ours = [e for e in seen["console_errors"] if any(mark in e.lower() for mark in OUR_MARKS)]
    assert not ours, "\n".join(seen["console_errors"])
    loss, validation, face_similarity = seen["captions"]
    assert loss.startswith("loss ") and loss.endswith("· step 8"), loss
    assert validation.startswith("validation loss (held out) ") and validation.endswith("· step 8"), validation
    assert seen["keep"].startswith("keep e2e_tiny"), seen["keep"]
    assert face_similarity == "face similarity: no data yet"  # the face loss is off on the tiny model
    assert seen["running_state"] in ("training", "sampling", "saving"), seen
    assert seen["stop_buttons"] == [0, 1], "a stop button on the running job only"
    assert all(path.stat().st_size > 10_000 for path in seen["screenshots"])
    job = jobs_by_name(frontend_server)[running_job]
    assert job["state"] == "stopped" and job["latest_checkpoint"], job
    assert (frontend_server.base / "output" / "loras" / running_job / job["latest_checkpoint"]).is_file()
