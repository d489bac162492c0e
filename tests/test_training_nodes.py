"""The six training nodes, on a musubi-tuner output folder and on real trainer runs."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from comfy_stubs import ProgressBar, set_comfy_base
from run_folders import write_lora, write_musubi_run
from workflow_runner import check_inputs, load_workflow

from face_consistency.nodes import training
from face_consistency.nodes.training import (
    FaceConsistencyCheckpointScoreboard,
    FaceConsistencyListCheckpoints,
    FaceConsistencyTrainLogs,
    FaceConsistencyTrainMonitor,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "example_workflows"


@pytest.fixture()
def comfy(tmp_path: Path) -> Path:
    set_comfy_base(tmp_path / "comfy")
    ProgressBar.instances.clear()
    ProgressBar.interrupt_after = None
    return tmp_path / "comfy"


def _assert_image(image: torch.Tensor) -> None:
    assert image.dtype == torch.float32 and image.dim() == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_monitor_reads_a_musubi_output_folder(comfy: Path) -> None:
    write_musubi_run(comfy / "output" / "loras" / "musubi_face")

    out = FaceConsistencyTrainMonitor().monitor("no", 1.0, 5, 8, output_folder="loras/musubi_face")
    status, plot, latest, samples = out["result"]

    assert "musubi_face: unknown" in status
    assert "loss 0.0333" in status and "face similarity 1.0000" in status
    assert "last checkpoint: musubi_face.safetensors (final); 4 in all" in status
    assert latest == "musubi_face/musubi_face.safetensors"
    _assert_image(plot)
    assert plot.shape[1:3] == (600, 900)
    # the newest sampling round (step 20) has two 40x48 images, side by side
    _assert_image(samples)
    assert samples.shape[1:3] == (48, 80)


def test_list_checkpoints_orders_a_musubi_folder_by_step(comfy: Path) -> None:
    write_musubi_run(comfy / "output" / "loras" / "musubi_face")
    node = FaceConsistencyListCheckpoints()

    lora_names, names, steps = node.list_checkpoints(True, output_folder="musubi_face")

    assert steps == [10, 15, 20, 30]
    assert lora_names == names == [
        "musubi_face/musubi_face-000001.safetensors",
        "musubi_face/musubi_face-step00000015.safetensors",
        "musubi_face/musubi_face-000002.safetensors",
        "musubi_face/musubi_face.safetensors",
    ]
    # the names are what LoraLoaderModelOnly offers, and the output is its combo type
    assert set(names) <= set(training.comfy_env.filename_list("loras"))
    assert FaceConsistencyListCheckpoints.RETURN_TYPES[0] == training.comfy_env.filename_list("loras")
    assert node.list_checkpoints(False, output_folder="musubi_face")[2] == [10, 15, 20]


def test_list_checkpoints_refuses_a_folder_loras_loaders_cannot_see(comfy: Path, tmp_path: Path) -> None:
    folder = write_musubi_run(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="not inside a ComfyUI loras folder"):
        FaceConsistencyListCheckpoints().list_checkpoints(True, output_folder=str(folder))


def test_nodes_name_a_missing_folder(comfy: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        FaceConsistencyTrainLogs().logs(10, output_folder="no_such_run")
    with pytest.raises(ValueError, match="connect a TRAINING_JOB or give an output folder"):
        FaceConsistencyTrainLogs().logs(10)


def test_scoreboard_picks_the_best_and_copies_it(comfy: Path) -> None:
    folder = comfy / "output" / "loras" / "run"
    names = [f"run/run-{epoch:06d}.safetensors" for epoch in (1, 2, 3)]
    for index, name in enumerate(names):
        write_lora(comfy / "output" / "loras" / name, steps=10 * (index + 1), seed=index)
    # per-checkpoint score lists (several seeds each); NaN = no face found in that image
    scores = [[0.61, 0.63], [0.80, math.nan, 0.78], [0.70, 0.72]]

    out = FaceConsistencyCheckpointScoreboard().rank(names, scores, [True])
    table, plot, best_name, best_score = out["result"]

    assert best_name == "run/run-000002.safetensors"
    assert best_score == pytest.approx(0.79)
    assert "run/run-000002.safetensors" in table and "<- best" in table and "(1 without a face)" in table
    _assert_image(plot)
    copy = folder / "run-best.safetensors"
    assert copy.read_bytes() == (folder / "run-000002.safetensors").read_bytes()
    # the copy is not listed as a checkpoint of its own
    assert "run/run-best.safetensors" not in FaceConsistencyListCheckpoints().list_checkpoints(
        True, output_folder="run"
    )[1]


def test_scoreboard_takes_one_score_per_checkpoint_in_any_order(comfy: Path) -> None:
    names = ["r/r-step00000300.safetensors", "r/r-step00000100.safetensors", "r/r-step00000200.safetensors"]
    table, _, best_name, best_score = FaceConsistencyCheckpointScoreboard().rank(names, [0.5, 0.9, 0.7], [False])[
        "result"
    ]
    assert best_name == "r/r-step00000100.safetensors" and best_score == pytest.approx(0.9)
    rows = table.splitlines()[1:]
    assert [row.split()[1] for row in rows] == ["100", "200", "300"]


def test_scoreboard_rejects_mismatched_inputs(comfy: Path) -> None:
    node = FaceConsistencyCheckpointScoreboard()
    with pytest.raises(ValueError, match="2 checkpoint names but 3 scores"):
        node.rank(["a.safetensors", "b.safetensors"], [0.1, 0.2, 0.3], [False])
    with pytest.raises(ValueError, match="no checkpoint has a valid score"):
        node.rank(["a.safetensors"], [math.nan], [False])


@pytest.mark.parametrize("name", ["train_launch_monitor.json", "evaluate_checkpoints.json"])
def test_example_workflows_fit_the_nodes(comfy: Path, name: str) -> None:
    workflow = load_workflow(EXAMPLES / name)
    check_inputs(workflow)
    assert {node["class_type"] for node in workflow.values()} & set(training.NODE_CLASS_MAPPINGS)
