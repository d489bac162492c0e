"""End to end in a real ComfyUI: a launch + monitor workflow trains the tiny model; the panel loads.

Runs only when COMFYUI_DIR points at a ComfyUI checkout (the server fixture of
`test_e2e_comfyui.py` skips otherwise); the panel check also needs Playwright with Chromium.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_e2e_comfyui import ComfyServer, comfy_server, run_prompt  # noqa: F401 (fixture)
from training_runs import TinyTraining, tiny_training  # noqa: F401 (fixture)

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parent.parent / "example_workflows" / "api" / "train_launch_monitor.json"


def test_launch_and_monitor_workflow_trains_in_comfyui(comfy_server: ComfyServer, tiny_training: TinyTraining) -> None:
    tiny_training.install_into_comfyui(comfy_server.base)
    workflow = json.loads(EXAMPLE.read_text())
    workflow["1"]["inputs"].update(
        dit=tiny_training.files.dit.name,
        vae=tiny_training.files.vae.name,
        text_encoder=tiny_training.files.text_encoder.name,
        dataset=str(tiny_training.dataset_toml),
        output_name="e2e_tiny",
        learning_rate=1e-3, network_dim=4, network_alpha=4.0,
        mixed_precision="no", optimizer_type="AdamW", gradient_checkpointing=False,
        enable_face_loss=False, sample_prompts="", max_train_steps=4,
        tokenizer=str(tiny_training.files.tokenizer_dir),
    )
    workflow["2"]["inputs"].update(wait_until="finished", timeout_minutes=5.0)

    outputs = run_prompt(comfy_server, workflow)

    status = outputs["2"]["text"][0]
    assert "e2e_tiny: completed" in status, f"{status}\n{comfy_server.log()}"
    assert (comfy_server.base / "output" / "loras" / "e2e_tiny" / "e2e_tiny.safetensors").is_file()
    jobs = comfy_server.get("/face_consistency/jobs")["jobs"]
    assert [j["state"] for j in jobs if j["name"] == "e2e_tiny"] == ["completed"]
    assert comfy_server.get("/api/face_consistency/jobs") == comfy_server.get("/face_consistency/jobs")


def test_training_panel_tab_appears_in_the_browser(comfy_server: ComfyServer) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the panel check needs Playwright")
    with sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch()
        except sync_api.Error as exc:
            pytest.skip(f"Playwright has no Chromium here: {exc}")
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(comfy_server.url)
        # the frontend names each sidebar button after its tab id
        page.wait_for_selector(".face-consistency-training-tab-button", timeout=60_000)
        page.click(".face-consistency-training-tab-button")
        page.wait_for_selector(".fc-panel", timeout=30_000)
        browser.close()
    assert not [e for e in errors if "face_consistency" in e], errors
