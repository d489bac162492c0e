"""The six training nodes, on a musubi-tuner output folder and on real trainer runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import test_example_workflows as example_checks
import torch
from comfy_stubs import ProgressBar, set_comfy_base
from face_consistency.common.face_engine import PROVIDER_HELP
from face_consistency.nodes import comfy_env, training
from face_consistency.nodes.scoring import FaceConsistencyLoadModel, pack_name
from face_consistency.nodes.training import (
    FaceConsistencyCheckpointScoreboard,
    FaceConsistencyListCheckpoints,
    FaceConsistencyTrainLaunch,
    FaceConsistencyTrainLogs,
    FaceConsistencyTrainMonitor,
    FaceConsistencyTrainStop,
)
from face_consistency.training_contract import libraries
from face_consistency.training_contract.protocol import read_metrics, read_status
from face_consistency.training_jobs.run_reader import list_checkpoints, read_run
from run_folders import write_lora, write_musubi_run
from training_runs import TinyTraining, group_gone, wait_for
from workflow_runner import check_inputs, load_workflow, run_workflow

EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"
API_EXAMPLES = EXAMPLES / "api"


@pytest.fixture()
def comfy(tmp_path: Path) -> Path:
    set_comfy_base(tmp_path / "comfy")
    comfy_env.register_model_folders()  # as when ComfyUI loads the pack
    ProgressBar.instances.clear()
    ProgressBar.interrupt_after = None
    return tmp_path / "comfy"


def _assert_image(image: torch.Tensor) -> None:
    assert image.dtype == torch.float32 and image.dim() == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0


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
    assert (
        lora_names
        == names
        == [
            "musubi_face/musubi_face-000001.safetensors",
            "musubi_face/musubi_face-step00000015.safetensors",
            "musubi_face/musubi_face-000002.safetensors",
            "musubi_face/musubi_face.safetensors",
        ]
    )
    # the names are what LoraLoaderModelOnly offers, and the output is its combo type
    assert set(names) <= set(training.comfy_env.filename_list("loras"))
    assert FaceConsistencyListCheckpoints.RETURN_TYPES[0] == training.comfy_env.filename_list("loras")
    assert node.list_checkpoints(False, output_folder="musubi_face")[2] == [10, 15, 20]


def test_runs_in_comfyuis_output_folder_are_listed_for_lora_loaders(tmp_path: Path) -> None:
    """ComfyUI searches only models/loras for LoRAs: loading the pack adds output/loras, where
    the launch node writes its runs."""
    fp = set_comfy_base(tmp_path / "comfy")
    write_musubi_run(tmp_path / "comfy" / "output" / "loras" / "musubi_face")
    assert fp.get_folder_paths("loras") == [str(tmp_path / "comfy" / "models" / "loras")]

    comfy_env.register_model_folders()

    assert fp.get_folder_paths("loras")[1:] == [str(tmp_path / "comfy" / "output" / "loras")]
    assert "musubi_face/musubi_face-000001.safetensors" in comfy_env.filename_list("loras")


def test_checkpoint_metadata_is_read_once_per_file_version(tmp_path: Path, monkeypatch) -> None:
    """The panel lists checkpoints every 2 s: headers are re-read only when a file changes."""
    import safetensors

    folder = write_musubi_run(tmp_path / "run")
    opened: list[str] = []
    real_safe_open = safetensors.safe_open

    def counted_safe_open(path: str, **kwargs):
        opened.append(Path(path).name)
        return real_safe_open(path, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", counted_safe_open)
    first = list_checkpoints(folder)
    assert list_checkpoints(folder) == first and len(opened) == len(first) == 4
    write_lora(folder / "musubi_face-000001.safetensors", steps=11, epoch=1)  # rewritten: read again
    steps = [c.step for c in list_checkpoints(folder)]
    assert opened[4:] == ["musubi_face-000001.safetensors"] and steps == [11, 15, 20, 30]


def test_list_checkpoints_refuses_a_folder_loras_loaders_cannot_see(comfy: Path, tmp_path: Path) -> None:
    folder = write_musubi_run(comfy / "input" / "elsewhere")  # a ComfyUI folder, but not a loras one
    with pytest.raises(ValueError, match="not inside a ComfyUI loras folder"):
        FaceConsistencyListCheckpoints().list_checkpoints(True, output_folder=str(folder))


def test_nodes_read_no_run_outside_comfyuis_folders(comfy: Path, tmp_path: Path) -> None:
    folder = write_musubi_run(tmp_path / "elsewhere")  # not a ComfyUI folder, no registered job
    for read in (
        lambda: FaceConsistencyTrainLogs().logs(10, output_folder=str(folder)),
        lambda: FaceConsistencyTrainMonitor().monitor("no", 1.0, 5, 8, output_folder=str(folder)),
    ):
        with pytest.raises(ValueError, match="outside ComfyUI's folders"):
            read()


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
    assert (
        "run/run-best.safetensors"
        not in FaceConsistencyListCheckpoints().list_checkpoints(True, output_folder="run")[1]
    )


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


@pytest.mark.parametrize("name", ["train_launch_monitor", "evaluate_checkpoints", "evaluate_checkpoints_qwen_image_21"])
def test_example_workflows_fit_the_nodes(comfy: Path, name: str) -> None:
    workflow = load_workflow(API_EXAMPLES / f"{name}.json")
    check_inputs(workflow)
    assert {node["class_type"] for node in workflow.values()} & set(training.NODE_CLASS_MAPPINGS)
    # the template browser's UI-format file is the same graph with the same widget values
    example_checks.test_ui_workflow_matches_api(name)


def _tiny_launch_inputs(tiny: TinyTraining, comfy: Path, name: str, steps: int) -> dict[str, Any]:
    installed = tiny.install_into_comfyui(comfy)
    return {
        "dit": tiny.files.dit.name,
        "vae": tiny.files.vae.name,
        "text_encoder": tiny.files.text_encoder.name,
        "dataset": str(installed.dataset_toml),
        "output_name": name,
        "learning_rate": 1e-3,
        "network_dim": 4,
        "network_alpha": 4.0,
        "mixed_precision": "no",
        "optimizer_type": "AdamW",
        "gradient_checkpointing": False,
        "enable_face_loss": False,
        "sample_prompts": "",
        "max_train_steps": steps,
        "tokenizer": str(installed.tokenizer_dir),
    }


def test_launch_and_monitor_workflow_runs_to_completion(comfy: Path, tiny_training: TinyTraining) -> None:
    control = tiny_training.install_into_comfyui(comfy).control
    workflow = load_workflow(API_EXAMPLES / "train_launch_monitor.json")
    workflow["1"]["inputs"].update(
        _tiny_launch_inputs(tiny_training, comfy, "tiny_face", 4),
        sample_prompts=f"a tiny edit --w 64 --h 64 --s 2 --d 7 --ci {control}",
        sample_every_n_epochs=1,
        extra_args="--save_every_n_steps 2",
    )
    workflow["2"]["inputs"].update(wait_until="finished", timeout_minutes=5.0)

    results = run_workflow(workflow)  # Launch returns at once; the monitor waits for the end
    job = results["1"][0]
    status, plot, latest, samples = results["2"]

    assert "tiny_face: completed" in status, status
    assert "step 4/4 (100.0%)" in status and "loss " in status
    assert latest == "tiny_face/tiny_face.safetensors"
    assert results["1"][1] == str((comfy / "output" / "loras" / "tiny_face").resolve())
    _assert_image(plot)
    _assert_image(samples)
    assert samples.shape[1:3] == (64, 64) and float(samples.std()) > 0.0  # one real sample image
    bar = ProgressBar.instances[-1]
    assert (bar.total, bar.current) == (4, 4)
    assert "saved" in results["5"][0]

    lora_names, _, steps = FaceConsistencyListCheckpoints().list_checkpoints(True, job=job)
    assert lora_names == ["tiny_face/tiny_face-step00000002.safetensors", "tiny_face/tiny_face.safetensors"]
    assert steps == [2, 4]
    # a finished run is cached by ComfyUI: its fingerprint stays the same
    assert FaceConsistencyTrainMonitor.IS_CHANGED(job=job) == FaceConsistencyTrainMonitor.IS_CHANGED(job=job)
    # launching again under the same name would overwrite its checkpoints and add to its metrics: refused
    log_size = (comfy / "output" / "loras" / "tiny_face" / "train.log").stat().st_size
    with pytest.raises(
        training.job_control.JobConflictError, match="already holds the run 'tiny_face' \\(2 checkpoint"
    ):
        FaceConsistencyTrainLaunch().launch(**workflow["1"]["inputs"])
    assert [record.job_id for record in training.open_registry().records()] == [job.job_id]
    assert (comfy / "output" / "loras" / "tiny_face" / "train.log").stat().st_size == log_size


@pytest.mark.parametrize(
    "extra",
    [
        "--output_dir /elsewhere",
        "--output_dir=/elsewhere",
        "--resume /tmp/state",
        "--config_file /tmp/x.toml",
        "--save_every_n_steps 2 --logging_dir /tmp/tb",
    ],
)
def test_launch_refuses_extra_args_that_move_the_run(comfy: Path, tiny_training: TinyTraining, extra: str) -> None:
    inputs = {
        **load_workflow(API_EXAMPLES / "train_launch_monitor.json")["1"]["inputs"],
        **_tiny_launch_inputs(tiny_training, comfy, "tiny_extra", 2),
        "extra_args": extra,
    }
    flag = extra.split()[-2].split("=")[0] if "=" not in extra else "--output_dir"
    with pytest.raises(ValueError, match=f"extra_args may not set {flag}: the launch node chooses"):
        FaceConsistencyTrainLaunch().launch(**inputs)
    assert not (comfy / "output" / "loras" / "tiny_extra").exists()  # refused before anything is written
    assert all(job.name != "tiny_extra" for job in training.open_registry().records())


def test_stop_node_saves_a_checkpoint_and_ends_the_process_tree(comfy: Path, tiny_training: TinyTraining) -> None:
    inputs = {
        **load_workflow(API_EXAMPLES / "train_launch_monitor.json")["1"]["inputs"],
        **_tiny_launch_inputs(tiny_training, comfy, "tiny_stop", 10_000),
        "extra_args": "--save_every_n_steps 2",
    }
    job, output_dir = FaceConsistencyTrainLaunch().launch(**inputs)["result"]
    record = training.open_registry().get(job.job_id)
    wait_for(lambda: ((read_status(output_dir) or {}).get("step") or 0) >= 1, "the first training step")
    assert math.isnan(FaceConsistencyTrainMonitor.IS_CHANGED(job=job))  # never cached while it runs
    # a second launch into the running job's folder is refused before it writes anything there
    with pytest.raises(training.job_control.JobConflictError, match="already training into"):
        FaceConsistencyTrainLaunch().launch(**{**inputs, "sample_prompts": "another run --ci x.png"})
    assert not (Path(output_dir) / "sample_prompts.txt").exists()
    ProgressBar.interrupt_after = 0  # the user presses Cancel while the monitor waits
    with pytest.raises(InterruptedError):
        FaceConsistencyTrainMonitor().monitor("finished", 5.0, 20, 4, job=job)
    ProgressBar.interrupt_after = None
    assert training.job_control.process_alive(record.pid)  # cancelling the wait does not stop training
    before = {c.filename for c in read_run(output_dir).checkpoints}
    # another run's checkpoint in the same folder, at a later step, is never this job's
    write_lora(Path(output_dir) / "older_run-step99999999.safetensors", steps=99999999)
    status, _, latest, _ = FaceConsistencyTrainMonitor().monitor("next checkpoint", 5.0, 20, 4, job=job)["result"]
    # this run's next one: a step checkpoint, or the epoch checkpoint saved right after one at an epoch's end
    assert latest.startswith("tiny_stop/tiny_stop-") and latest.split("/")[1] not in before, status
    assert "tiny_stop: training" in status or "tiny_stop: saving" in status, status

    report = FaceConsistencyTrainStop().stop(120, job=job)["result"][0]

    assert report.startswith(f"job {job.job_id}: stopped"), report
    step = read_status(output_dir)["step"]
    assert f"last checkpoint: tiny_stop/tiny_stop-step{step:08d}.safetensors (step {step})" in report
    assert (Path(output_dir) / f"tiny_stop-step{step:08d}.safetensors").is_file()
    wait_for(lambda: group_gone(record.pid), "no process of the job's tree left", timeout_s=10)
    assert training.open_registry().get(job.job_id).state == "stopped"


def test_scoreboard_copy_paste_gauge(comfy: Path) -> None:
    names = ["r/r-step00000100.safetensors", "r/r-step00000200.safetensors", "r/r-step00000300.safetensors"]
    scores = [[0.60, 0.62], [0.80, 0.82], [0.99, 0.98]]
    changes = [[0.55, 0.60], [0.50, -1.0], [0.01, 0.02]]  # -1: unknown (no control)
    node = FaceConsistencyCheckpointScoreboard()
    table = node.rank(names, scores, [False], reference_agreement=[0.73], face_change=changes)["result"][0]
    rows = {row.split()[0]: row for row in table.splitlines()[1:] if row.startswith("r/")}
    assert "COPY? above the references' agreement 0.730 with face change 0.015" in rows[names[2]]
    assert "above the references' agreement 0.730: check by eye" in rows[names[1]]
    assert "agreement" not in rows[names[0]]
    assert "2 checkpoint(s) score above the reference photos' own agreement" in table
    # without an agreement (the similarity node gives -1) there is no gauge, but an unchanged face is still flagged
    assert "agreement" not in node.rank(names, scores, [False], reference_agreement=[-1.0])["result"][0]
    table = node.rank(names, scores, [False], reference_agreement=[-1.0], face_change=changes)["result"][0]
    rows = {row.split()[0]: row for row in table.splitlines()[1:] if row.startswith("r/")}
    assert "UNCHANGED face (change 0.015 < 0.10)" in rows[names[2]]
    assert "UNCHANGED" not in rows[names[0]] + rows[names[1]] and "agreement" not in table
    assert "1 checkpoint(s) return the control's face unchanged" in table


class Launched(Exception):
    """Raised by the stand-in for job_control.launch, with the trainer command the node's request gives."""


def _launch_command(
    monkeypatch, tiny_training: TinyTraining, comfy: Path, name: str, **changes: Any
) -> tuple[dict[str, Any], list[str]]:
    """The launch node's inputs (defaults, the tiny run's files, the face loss on) and the command it builds."""

    def capture(registry, request):
        request.write_inputs()  # as the launch does before the trainer starts
        raise Launched(request.argv())

    monkeypatch.setattr(training.job_control, "launch", capture)
    required = FaceConsistencyTrainLaunch.INPUT_TYPES()["required"]
    inputs = {
        **{key: spec[1]["default"] for key, spec in required.items() if len(spec) > 1 and "default" in spec[1]},
        **_tiny_launch_inputs(tiny_training, comfy, name, 0),
        "enable_face_loss": True,
        **changes,
    }
    with pytest.raises(Launched) as launched:
        FaceConsistencyTrainLaunch().launch(**inputs)
    return inputs, launched.value.args[0]


def test_the_launch_nodes_arguments_are_the_trainers_flags(
    comfy: Path, tiny_training: TinyTraining, monkeypatch
) -> None:
    """Both are built from training_contract/options.py: every setting the node shows parses as the flag of its name,
    with the node's value, and the whole command passes the trainer's checks."""
    from face_consistency.trainer.cli import parse_args, validate_args

    inputs, command = _launch_command(monkeypatch, tiny_training, comfy, "tiny_flags")
    args = parse_args(command)
    for name in (*training.SETTINGS, *training.FACE_INPUTS):
        if name != "max_train_epochs" or not inputs.get("max_train_steps"):
            assert getattr(args, name) == (pack_name(inputs[name]) if name == "face_model_name" else inputs[name]), name
    required = FaceConsistencyTrainLaunch.INPUT_TYPES()["required"]
    # the node offers every provider the trainer takes, with the face engine's default everywhere
    assert required["face_device"] == (["auto", "cuda", "cpu"], {"default": "auto", "tooltip": PROVIDER_HELP})
    assert args.face_device == inputs["face_device"] == "auto"
    # the pack is chosen from the packs Load Face Model lists
    assert required["face_model_name"][0] == FaceConsistencyLoadModel.INPUT_TYPES()["required"]["pack"][0]
    assert validate_args(args).model_version == "edit-2509"
    # the face loss's variants at their defaults add no flag
    assert not any(
        arg.startswith(
            ("--face_loss_reference", "--face_loss_rollout", "--face_loss_contrastive", "--face_loss_negatives")
        )
        for arg in command
    )


def test_the_launch_nodes_face_loss_variants_are_the_trainers_flags(
    comfy: Path, tiny_training: TinyTraining, faces_dir: Path, monkeypatch
) -> None:
    from face_consistency.trainer.cli import parse_args, validate_args

    negatives = comfy / "input" / "other_people"
    negatives.mkdir()
    (negatives / "biden.jpg").write_bytes((faces_dir / "biden.jpg").read_bytes())
    variants = {
        "face_loss_reference": "target",
        "face_loss_rollout_steps": 3,
        "face_loss_contrastive_weight": 0.1,
        "face_loss_negatives": str(negatives),
    }
    _, command = _launch_command(monkeypatch, tiny_training, comfy, "tiny_variants", use_face_as_loss=True, **variants)
    args = validate_args(parse_args(command))
    assert args.use_face_as_loss and {name: getattr(args, name) for name in variants} == variants
    with pytest.raises(ValueError, match="needs face_loss_negatives"):
        _launch_command(
            monkeypatch, tiny_training, comfy, "tiny_variants", use_face_as_loss=True, face_loss_contrastive_weight=0.1
        )
    # without the (experimental) loss the variants add nothing: metrics only
    _, command = _launch_command(monkeypatch, tiny_training, comfy, "tiny_variants", **variants)
    args = validate_args(parse_args(command))
    assert args.enable_face_loss and not args.use_face_as_loss and args.face_loss_contrastive_weight == 0


def test_scoreboard_orders_epoch_checkpoints_by_their_saved_steps_and_shows_the_trainers_table(comfy: Path) -> None:
    """As List Checkpoints: an epoch checkpoint's step is its ss_steps; the run's checkpoints.json is shown."""
    from face_consistency.training_contract.checkpoint_choice import CheckpointRow, CheckpointTable, write_table

    folder = write_musubi_run(comfy / "output" / "loras" / "musubi_face")  # epochs at steps 10 and 20, step 15
    names = [
        "musubi_face/musubi_face-000002.safetensors",
        "musubi_face/musubi_face-step00000015.safetensors",
        "musubi_face/musubi_face-000001.safetensors",
    ]
    node = FaceConsistencyCheckpointScoreboard()
    table = node.rank(names, [0.7, 0.6, 0.5], [False])["result"][0]
    order = [line.split()[0] for line in table.splitlines()[1:4]]
    assert order == [names[2], names[1], names[0]]  # steps 10, 15, 20
    assert "checkpoints.json" not in table

    rows = [
        CheckpointRow(
            "musubi_face-000001.safetensors", 10, 1, {"1": 0.5}, likeness=0.62, likeness_dlib=0.58, samples=2
        ),
        CheckpointRow("musubi_face-step00000015.safetensors", 15, None, {"1": 0.4}, likeness=0.71, samples=2),
        CheckpointRow("musubi_face-000002.safetensors", 20, 2, {"1": 0.6}, likeness=0.75, near_copies=1, samples=2),
    ]
    write_table(folder, CheckpointTable(rows, (1.0,)))
    table = node.rank(names, [0.7, 0.6, 0.5], [False])["result"][0]
    assert "the trainer's table (checkpoints.json):" in table
    assert table.splitlines()[-1] == (
        "keep musubi_face-step00000015.safetensors: step 15: highest held-out likeness 0.71; validation loss rises "
        "after step 15 and near-copies of training targets appear at step 20 (1 of 2 samples)"
    )
    # the monitor says the same
    status = FaceConsistencyTrainMonitor().monitor("no", 1.0, 5, 8, output_folder="loras/musubi_face")["result"][0]
    assert status.splitlines()[-1] == table.splitlines()[-1]


def test_the_launch_node_passes_a_validation_dataset_and_likeness_references(
    comfy: Path, tiny_training: TinyTraining, faces_dir: Path, monkeypatch
) -> None:
    from face_consistency.trainer.cli import parse_args, validate_args

    held_out = comfy / "input" / "held_out"
    for part in ("images", "controls"):
        (held_out / part).mkdir(parents=True)
    source = tiny_training.dataset_toml.parent
    for index in (0, 1):
        for part in ("images", "controls"):
            (held_out / part / f"h_{index}.png").write_bytes((source / part / f"item_{index}.png").read_bytes())
        (held_out / "images" / f"h_{index}.txt").write_text("held out")
    references = comfy / "input" / "person"
    references.mkdir()
    (references / "obama3.jpg").write_bytes((faces_dir / "obama3.jpg").read_bytes())
    control = comfy / "input" / "tiny_dataset" / "controls" / "item_0.png"
    prompts = f"tiny edit --w 32 --h 32 --s 2 --d 1 --ci {control}"
    with pytest.raises(ValueError, match="give sample_prompts too"):
        _launch_command(monkeypatch, tiny_training, comfy, "tiny_held", likeness_references=str(references))
    _, command = _launch_command(
        monkeypatch,
        tiny_training,
        comfy,
        "tiny_held",
        validation_dataset=str(held_out),
        likeness_references=str(references),
        sample_prompts=prompts,
    )
    args = validate_args(parse_args(command))
    run = comfy / "output" / "loras" / "tiny_held"
    assert args.validation_dataset_config == str(run / "validation_dataset.toml")
    assert sorted(item.key for item in args.dataset_group.validation_items) == ["h_0", "h_1"]
    assert {item.cache_directory for item in args.dataset_group.validation_items} == {run / "validation_dataset_cache"}
    assert list(args.likeness_reference_paths) == [references.resolve() / "obama3.jpg"]
    # a photo that is a link out of ComfyUI's folders is refused, as the folder itself would be
    (references / "elsewhere.jpg").symlink_to(faces_dir / "obama2.jpg")
    with pytest.raises(comfy_env.FolderAccessError, match="likeness_references photo"):
        _launch_command(
            monkeypatch, tiny_training, comfy, "tiny_held", likeness_references=str(references), sample_prompts=prompts
        )


@pytest.mark.skipif(
    libraries.too_old_for("qwen-image-2.1") is not None, reason=str(libraries.too_old_for("qwen-image-2.1"))
)
def test_the_launch_node_trains_qwen_image_21_with_the_face_loss(
    comfy: Path, tmp_path: Path, faces_dir: Path, testpack_dir: Path
) -> None:
    """A tiny Qwen-Image 2.1 run from the node: its DiT, Qwen3-VL and 64-channel VAE from ComfyUI's folders, the
    face loss with a pack from ComfyUI's insightface folder, samples; the LoRA in ComfyUI's 2.1 layout."""
    from face_consistency.faceid import load_face_model
    from safetensors.torch import load_file
    from tiny_qwen import write_tiny_dataset
    from tiny_qwen_image21 import write_tiny_qwen_image21_files

    files = write_tiny_qwen_image21_files(tmp_path / "models21")
    engine = load_face_model(testpack_dir, provider="cpu", det_size=640)
    dataset = write_tiny_dataset(tmp_path / "data21", n=2, with_face_photos=faces_dir, face_model=engine)
    installed = TinyTraining(files, dataset).install_into_comfyui(comfy)  # type: ignore[arg-type]
    pack = comfy / "models" / "insightface" / "models" / testpack_dir.name
    pack.parent.mkdir(parents=True, exist_ok=True)
    pack.symlink_to(testpack_dir)
    required = FaceConsistencyTrainLaunch.INPUT_TYPES()["required"]
    inputs = {
        **{key: spec[1]["default"] for key, spec in required.items() if len(spec) > 1 and "default" in spec[1]},
        **_tiny_launch_inputs(TinyTraining(files, dataset), comfy, "tiny_21", 2),  # type: ignore[arg-type]
        "model_version": "qwen-image-2.1",
        "face_model_name": testpack_dir.name,
        "face_device": "cpu",
        "enable_face_loss": True,
        "use_face_as_loss": True,
        "sample_prompts": f"a tiny edit --w 64 --h 64 --s 2 --d 7 --ci {installed.control}",
        "sample_every_n_epochs": 1,
        "extra_args": "--face_loss_max_t 1",
    }
    assert FaceConsistencyTrainLaunch.INPUT_TYPES()["optional"]["model_version"][0] == [
        "edit-2509",
        "edit-2511",
        "qwen-image-2.1",
        "edit",
    ]
    job = FaceConsistencyTrainLaunch().launch(**inputs)["result"][0]
    out = Path(job.output_dir)
    wait_for(lambda: read_status(out).get("state") in ("completed", "failed"), "the 2.1 run to end")
    status = read_status(out)
    assert status["state"] == "completed", status
    assert any("loss/face" in m for m in read_metrics(out)), "the face loss did not run"
    assert sorted((out / "sample").glob("*.png"))
    keys = load_file(str(out / "tiny_21.safetensors")).keys()
    assert keys and all(key.startswith("transformer.transformer_blocks.") for key in keys)
