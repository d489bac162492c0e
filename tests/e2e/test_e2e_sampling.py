"""The trainer's samples against ComfyUI 0.3.64's own sampler code, case by case.

`comfyui_sampling_parity.py` draws one sample both ways in a subprocess (ComfyUI's modules and
settings stay out of this process) on the same random 1-block DiT of the real head width, noise
and conditioning, float32 on the CPU, and reports the final latents' relative difference. Each
case is one of the conventions where the two used to part (docs/training.md, "Samples and
ComfyUI, side by side"); each also reports what the samples did before, which must miss the same
bar, so that a case checks something. Runs only with COMFYUI_DIR (the end-to-end tier):

    COMFYUI_DIR=/path/to/ComfyUI python -m pytest tests/e2e/test_e2e_sampling.py -m e2e -v
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from comfyui_server import comfyui_dir

# not marked `trainer`: CI's run at the minimum library versions has no ComfyUI requirements to import ComfyUI with
pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).resolve().parents[1] / "support" / "comfyui_sampling_parity.py"
TOLERANCE = 1e-5  # relative, on the final latents
SQUARE = {"width": 256, "height": 256, "references": [[256, 256]], "steps": 4, "shift_terminal": 0.0, "cfg": 4.0}
CASES = [
    # the default against a plain KSampler euler/simple; before, the default stretched to 0.02
    {**SQUARE, "name": "default_schedule", "before_shift_terminal": 0.02},
    # the terminal stretch is SamplerCustom + LTXVScheduler's (matched before too)
    {**SQUARE, "name": "shift_terminal_ltxv", "steps": 8, "shift_terminal": 0.02},
    # 30 steps do not divide 1000: simple_scheduler rounds each t down to 1/1000
    {**SQUARE, "name": "steps_not_dividing_1000", "steps": 30},
    # the trainer's own default: a small output beside a larger reference
    {**SQUARE, "name": "reference_larger_than_output", "width": 128, "height": 128, "references": [[256, 192]]},
    # 208 x 176 px: both sides 16 mod 32, an odd number of tokens to centre
    {**SQUARE, "name": "sides_16_mod_32", "width": 208, "height": 176, "references": [[208, 176]]},
]
SAME_BEFORE = {"shift_terminal_ltxv"}


@pytest.fixture(scope="module")
def parity() -> dict[str, dict[str, float]]:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), str(comfyui_dir()), json.dumps(CASES)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [c["name"] for c in CASES])
def test_trainer_sample_matches_comfyui(parity: dict[str, dict[str, float]], case: str) -> None:
    result = parity[case]
    assert result["relative"] < TOLERANCE, result
    if case in SAME_BEFORE:
        assert result["relative_before"] < TOLERANCE, result
    else:  # the convention the case is about moves the latents by more than the bar
        assert result["relative_before"] > TOLERANCE, result
