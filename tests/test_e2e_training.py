"""End to end in a real ComfyUI: a launch + monitor workflow trains the tiny model; the training
panel lists, charts and stops jobs in headless Chromium.

Runs only when COMFYUI_DIR points at a ComfyUI checkout; the panel check also needs Chromium
(see `comfyui_server.py`):

    COMFYUI_DIR=/path/to/ComfyUI [COMFYUI_PYTHON=/path/to/its/python] [CHROMIUM=/path/to/chromium] \\
        python -m pytest tests/test_e2e_training.py -m e2e -v
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from comfyui_server import (  # noqa: F401 (fixture)
    STARTUP_TIMEOUT_S, ComfyServer, DevToolsPage, chromium, comfy_server, open_page, run_prompt,
)
from training_runs import TinyTraining, tiny_training, wait_for  # noqa: F401 (fixture)

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parent.parent / "example_workflows" / "api" / "train_launch_monitor.json"
FINISHED_NAME, RUNNING_NAME = "e2e_tiny", "e2e_running"
# our extension's file and routes, in the URL or stack of any error they cause; the frontend's
# own noise on a fresh user folder (404s for user.css, userdata, favicon) is not ours
OUR_MARKS = ("face-consistency", "face_consistency")
# as registered by web/face_consistency_panel.js: ComfyUI frontend 1.27 renders the sidebar button
# of a tab with class "<tab id>-tab-button" and the tab's tooltip as its aria-label
TAB_BUTTON = 'button.face-consistency-training-tab-button[aria-label="Face Consistency training jobs"]'


def launch_workflow(tiny: TinyTraining, output_name: str, max_train_steps: int) -> dict[str, Any]:
    """The launch + monitor example on the tiny models: one sample and a checkpoint per epoch of 4 steps."""
    control = tiny.dataset_toml.parent / "controls" / "item_0.png"
    workflow = json.loads(EXAMPLE.read_text())
    workflow["1"]["inputs"].update(
        dit=tiny.files.dit.name,
        vae=tiny.files.vae.name,
        text_encoder=tiny.files.text_encoder.name,
        dataset=str(tiny.dataset_toml),
        output_name=output_name,
        learning_rate=1e-3, network_dim=4, network_alpha=4.0,
        mixed_precision="no", optimizer_type="AdamW", gradient_checkpointing=False,
        enable_face_loss=False, max_train_steps=max_train_steps,
        save_every_n_epochs=1, sample_every_n_epochs=1,
        sample_prompts=f"a tiny edit --w 32 --h 32 --s 2 --d 100 --ci {control}",
        tokenizer=str(tiny.files.tokenizer_dir),
    )
    return workflow


@pytest.fixture(scope="module")
def finished_job(comfy_server: ComfyServer, tiny_training: TinyTraining) -> dict[str, Any]:
    """The launch + monitor workflow's outputs, the monitor waiting until the 8-step run finished."""
    tiny_training.install_into_comfyui(comfy_server.base)
    workflow = launch_workflow(tiny_training, FINISHED_NAME, max_train_steps=8)
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
    assert comfy_server.get("/api/face_consistency/jobs") == comfy_server.get("/face_consistency/jobs")


def _job_box(name: str) -> str:
    """JS: the panel's box of the job called `name` (or undefined)."""
    return (f"[...document.querySelectorAll('.fc-panel .fc-job')]"
            f".find(box => box.querySelector('.fc-job-head span').textContent.endsWith({json.dumps(' ' + name)}))")


def _state_of(name: str) -> str:
    return f"{_job_box(name)}?.querySelector('.fc-state').textContent"


async def _drive_panel(devtools_port: int, url: str, shots: Path) -> dict[str, Any]:
    async with open_page(devtools_port, url) as page:
        await page.wait_for("!!(window.app && window.app.graph)", "the ComfyUI frontend", STARTUP_TIMEOUT_S)
        await page.wait_for(f"!!document.querySelector({json.dumps(TAB_BUTTON)})", "the Face training sidebar button")
        await page.click(f"document.querySelector({json.dumps(TAB_BUTTON)})")
        await page.wait_for(f"{_state_of(FINISHED_NAME)} === 'completed' && !!{_job_box(RUNNING_NAME)}",
                            "both jobs listed in the panel")
        running_state = await page.evaluate(_state_of(RUNNING_NAME))
        for name in (FINISHED_NAME, RUNNING_NAME):  # expand both: charts and samples
            await page.click(f"{_job_box(name)}.querySelector('.fc-job-head')")
        captions = await _wait_for_details(page, FINISHED_NAME)
        await _wait_for_details(page, RUNNING_NAME)
        panel_open = await page.screenshot(shots / "training_panel.png")

        stop_buttons = await page.evaluate(
            f"[{_job_box(FINISHED_NAME)}.querySelectorAll('.fc-stop').length,"
            f" {_job_box(RUNNING_NAME)}.querySelectorAll('.fc-stop').length]"
        )
        await page.click(f"{_job_box(RUNNING_NAME)}.querySelector('.fc-stop')")
        await page.wait_for(f"{_state_of(RUNNING_NAME)} === 'stopped'", "the stopped job in the panel", 120)
        await page.wait_for(
            "[...document.querySelectorAll('.p-toast-message')].map(t => t.textContent)"
            f".find(text => text.includes('Training stopped: {RUNNING_NAME}'))",
            "the 'training stopped' toast",
        )
        stopped = await page.screenshot(shots / "training_panel_stopped.png")
        return {
            "captions": captions, "running_state": running_state, "stop_buttons": stop_buttons,
            "console_errors": page.console_errors, "screenshots": [panel_open, stopped],
        }


async def _wait_for_details(page: DevToolsPage, name: str) -> list[str]:
    """The expanded job shows its loss chart and samples (loaded from the sample route); returns
    the charts' captions."""
    box = _job_box(name)
    await page.wait_for(
        f"{box}.querySelectorAll('.fc-chart-label').length === 2"
        f" && {box}.querySelectorAll('svg.fc-chart path').length >= 2"
        f" && [...{box}.querySelectorAll('.fc-samples img')].some(img => img.complete && img.naturalWidth > 0)",
        f"{name}'s charts and samples", 120,
    )
    return await page.evaluate(f"[...{box}.querySelectorAll('.fc-chart-label')].map(label => label.textContent)")


@pytest.fixture
def running_job(comfy_server: ComfyServer, finished_job: dict[str, Any], tiny_training: TinyTraining) -> Iterator[None]:
    """A job launched (launch node alone) to train far longer than the test, past its first epoch:
    a sample and a checkpoint to show. Stopped through the route if the test leaves it running."""
    run_prompt(comfy_server, {"1": launch_workflow(tiny_training, RUNNING_NAME, max_train_steps=100_000)["1"]})
    try:
        wait_for(lambda: (jobs_by_name(comfy_server)[RUNNING_NAME].get("step") or 0) > 4, "its first epoch")
        yield
    finally:
        job = jobs_by_name(comfy_server)[RUNNING_NAME]
        if job["state"] not in ("completed", "stopped", "failed"):
            comfy_server.post(f"/face_consistency/jobs/{job['job_id']}/stop", {})
            wait_for(lambda: jobs_by_name(comfy_server)[RUNNING_NAME]["state"] in ("stopped", "failed"), "its end")


def test_training_panel_lists_charts_and_stops_jobs(
    comfy_server: ComfyServer, running_job: None, tmp_path: Path
) -> None:
    """The panel's sidebar tab opens, lists the finished and the running job from /face_consistency/jobs
    with charts and samples, and its stop button stops the running one with a checkpoint saved."""
    with chromium(tmp_path / "chromium") as devtools_port:
        seen = asyncio.run(_drive_panel(devtools_port, comfy_server.url + "/", tmp_path))

    ours = [e for e in seen["console_errors"] if any(mark in e.lower() for mark in OUR_MARKS)]
    assert not ours, "\n".join(seen["console_errors"])
    loss, face_similarity = seen["captions"]
    assert loss.startswith("loss ") and loss.endswith("· step 8"), loss
    assert face_similarity == "face similarity: no data yet"  # the face loss is off on the tiny model
    assert seen["running_state"] in ("training", "sampling", "saving"), seen
    assert seen["stop_buttons"] == [0, 1], "a stop button on the running job only"
    assert all(path.stat().st_size > 10_000 for path in seen["screenshots"])
    job = jobs_by_name(comfy_server)[RUNNING_NAME]
    assert job["state"] == "stopped" and job["latest_checkpoint"], job
    assert (comfy_server.base / "output" / "loras" / RUNNING_NAME / job["latest_checkpoint"]).is_file()
