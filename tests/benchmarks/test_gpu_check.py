"""benchmarks/gpu_check.py --dry-run: the GPU check's code paths on the CPU at tiny sizes, so it cannot rot.

The dry run scores photos with the engine (the CPU provider on both sides), then runs optimizer
steps of the real trainer, bf16 and --fp8_base, with and without the face loss, at two block counts,
and writes the one JSON the GPU run writes (about 30 s on 2 cores).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.trainer

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_dry_run_writes_every_figure(testdata, tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--dry-run",
            "--test_data",
            str(testdata),
            "--out",
            str(out),
            "--work",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["dry_run"] is True
    scoring = report["scoring"]
    assert scoring["faces_found"] >= 1
    for side in ("accelerated", "cpu"):
        assert scoring[side]["provider"] == "CPUExecutionProvider" and scoring[side]["images_per_s"] > 0
    assert scoring["speedup_cpu_over_accelerated"] > 0

    variants = report["training"]["variants"]
    assert set(variants) == {"bf16", "bf16_fp8_base"}
    for name, variant in variants.items():
        assert set(variant["by_blocks"]) == {"1", "2"}
        for figures in variant["by_blocks"].values():
            assert figures["face_loss_samples"] == [1], name  # the face term ran in every step with it
            assert figures["step_s_without_face_loss"] > 0 and figures["step_s_with_face_loss"] > 0
            assert figures["plan_bytes_with"] > figures["plan_bytes_without"]  # the plan's face part
            assert figures["plan_parts_with"]["face_loss"] > 0
            assert figures["peak_cuda_bytes_with"] is None  # the CPU has no CUDA peak
        assert math.isfinite(variant["face_loss_at_60_blocks"]["ratio"])
    dit = {n: v["by_blocks"]["2"]["plan_parts_with"]["dit_weights"] for n, v in variants.items()}
    assert dit["bf16_fp8_base"] < dit["bf16"]  # --fp8_base reached the plan: float8 storage
    assert not list(tmp_path.glob("gpu_check_*"))  # the model files went with their temporary folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: the full check would run")
def test_without_a_gpu_the_full_check_points_to_the_dry_run(testdata, tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--test_data", str(testdata), "--out", str(tmp_path / "x.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "--dry-run" in result.stderr
    assert not (tmp_path / "x.json").exists()
