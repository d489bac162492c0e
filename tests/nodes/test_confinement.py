"""Nodes read and write only inside ComfyUI's folders and registered job folders, symlinks resolved.

Every STRING input of every node is either marked as naming a file or folder (`comfy_env.PATH_INPUT`,
then tried here with paths outside, through a symlink, by `..` and with a NUL) or listed in
TEXT_INPUTS with where its own rule is tested: a node added later is covered without a new test,
and one whose path input is not marked fails here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from comfy_stubs import set_comfy_base
from face_consistency.musubi_formats.dataset import write_dataset_config
from face_consistency.nodes import NODE_CLASS_MAPPINGS, comfy_env
from face_consistency.nodes.folder import FaceConsistencyScoreFolder
from face_consistency.nodes.training import FaceConsistencyTrainLaunch, FaceConsistencyTrainMonitor
from PIL import Image

# STRING widgets that name no file or folder, and the test of the rule they follow instead
TEXT_INPUTS = {
    ("FaceConsistencyTrainLaunch", "output_name"): "a name, never a path: test_launch_refuses_names_that_are_paths",
    ("FaceConsistencyTrainLaunch", "sample_prompts"): "prompt text; its --ci paths: test_launch_confines_the_prompts",
    ("FaceConsistencyTrainLaunch", "extra_args"): "trainer flags; path flags refused: test_training_nodes.py",
}
SECRET = "planted secret 7f3a"


def _string_inputs() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for node_name, cls in sorted(NODE_CLASS_MAPPINGS.items()):
        types = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, spec in types.get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                if spec[0] == "STRING" and not options.get("forceInput"):
                    yield node_name, name, options


STRING_INPUTS = list(_string_inputs())
PATH_INPUTS = [(node, name) for node, name, options in STRING_INPUTS if options.get(comfy_env.PATH_INPUT)]


def test_every_string_input_is_a_path_input_or_known_text() -> None:
    unclassified = [
        (node, name)
        for node, name, options in STRING_INPUTS
        if not options.get(comfy_env.PATH_INPUT) and (node, name) not in TEXT_INPUTS
    ]
    assert not unclassified, (
        f"STRING inputs neither marked with comfy_env.path_input (when they name a file or "
        f"folder) nor listed in TEXT_INPUTS: {unclassified}"
    )
    assert len(PATH_INPUTS) >= 10  # Score Folder's four, Train Launch's three, the four output_folder inputs


@pytest.fixture()
def comfy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    base = tmp_path / "comfy"
    set_comfy_base(base)
    comfy_env.register_model_folders()
    monkeypatch.chdir(base / "input")  # relative paths of some inputs are taken from the working directory
    return base


@pytest.fixture()
def outside(tmp_path: Path) -> Path:
    """A folder outside ComfyUI holding a secret: a text file, a JSON file, an image and a dataset folder."""
    folder = tmp_path / "outside"
    (folder / "images").mkdir(parents=True)
    (folder / "secret.txt").write_text(SECRET)
    (folder / "secret.json").write_text(f'{{"state": "training", "step": 1, "note": "{SECRET}"}}')
    Image.new("RGB", (32, 32), "red").save(folder / "images" / "secret.png")
    return folder


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _hostile_values(comfy: Path, outside: Path) -> dict[str, str]:
    inside_link = comfy / "input" / "looks_inside"
    inside_link.symlink_to(outside, target_is_directory=True)
    (comfy / "input" / "secret_link.png").symlink_to(outside / "images" / "secret.png")
    return {
        "absolute folder": str(outside),
        "absolute file": str(outside / "secret.txt"),
        "missing path": str(outside / "no_such_thing"),  # refused all the same: no existence oracle
        "symlinked folder": str(inside_link),
        "symlinked file": str(comfy / "input" / "secret_link.png"),
        "through a symlink": str(inside_link / "images"),
        "dot-dot": "../" * 40 + str(outside).lstrip("/"),
        "quoted": f'"{outside}"',
        "nul": f"{comfy / 'input'}\x00/etc",
    }


def _call_with(node_name: str, name: str, value: str, comfy: Path) -> Any:
    """The node's function with `name` = `value`, every other input at its default (links: None)."""
    cls = NODE_CLASS_MAPPINGS[node_name]
    kwargs: dict[str, Any] = {}
    for input_name, spec in cls.INPUT_TYPES().get("required", {}).items():
        options = spec[1] if len(spec) > 1 else {}
        if isinstance(spec[0], list):
            kwargs[input_name] = options.get("default", spec[0][0] if spec[0] else "")
        else:
            kwargs[input_name] = options.get("default")
    kwargs[name] = value
    return getattr(cls(), cls.FUNCTION)(**kwargs)


@pytest.mark.parametrize(("node_name", "name"), PATH_INPUTS)
def test_every_path_input_refuses_what_lies_outside(comfy: Path, outside: Path, node_name: str, name: str) -> None:
    hostile = _hostile_values(comfy, outside)
    before = _snapshot(outside)
    is_changed = getattr(NODE_CLASS_MAPPINGS[node_name], "IS_CHANGED", None)
    for label, value in hostile.items():
        with pytest.raises(comfy_env.FolderAccessError, match=name) as refused:
            _call_with(node_name, name, value, comfy)
        assert SECRET not in str(refused.value), label
        if is_changed is not None:  # ComfyUI calls it before the node runs: it lists and reads nothing either
            try:
                fingerprint = is_changed(**{name: value})
            except comfy_env.FolderAccessError:
                continue
            never_cached = isinstance(fingerprint, float) and math.isnan(fingerprint)
            assert never_cached or fingerprint == is_changed(**{name: ""}), label  # NaN, or the input unlooked at
    assert _snapshot(outside) == before  # nothing written there
    assert not list((comfy / "output" / "loras").glob("*"))  # no run folder made, no job launched


def test_comfyuis_own_containment_test_is_used_where_it_exists(tmp_path: Path, outside: Path) -> None:
    fp = set_comfy_base(tmp_path / "comfy", newer=True)
    asked: list[tuple[str, str]] = []
    comfyuis = fp.is_within_directory
    fp.is_within_directory = lambda directory, target: asked.append((directory, target)) or comfyuis(directory, target)
    inside = tmp_path / "comfy" / "input" / "a.png"
    assert comfy_env.confine(inside, "x") == inside.resolve()
    with pytest.raises(comfy_env.FolderAccessError):
        comfy_env.confine(outside / "secret.txt", "x")
    assert any(target == str(inside) for _, target in asked)
    assert any(target == str(outside / "secret.txt") for _, target in asked)


def test_registered_job_folders_are_allowed(comfy: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "job_elsewhere"
    elsewhere.mkdir()
    with pytest.raises(comfy_env.FolderAccessError):
        comfy_env.confine(elsewhere / "status.json", "x")
    comfy_env.open_registry().reserve("job", elsewhere, ["python"])
    assert comfy_env.confine(elsewhere / "status.json", "x") == (elsewhere / "status.json").resolve()


# --- Score Folder: what the folder, the control folder and the prompt file name


def _sample(folder: Path, name: str = "face_000100_00_20260101120000_42_000.png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), "blue").save(folder / name)
    return folder / name


def test_score_folder_refuses_an_image_that_links_out(comfy: Path, outside: Path) -> None:
    samples = comfy / "output" / "run" / "sample"
    _sample(samples)
    (samples / "face_000200_00_20260101120000_42_000.png").symlink_to(outside / "images" / "secret.png")
    with pytest.raises(comfy_env.FolderAccessError, match="folder image .*face_000200"):
        FaceConsistencyScoreFolder().score_folder(None, str(samples), 0.5)
    with pytest.raises(comfy_env.FolderAccessError, match="folder image"):
        FaceConsistencyScoreFolder.IS_CHANGED(folder=str(samples))
    controls = comfy / "input" / "controls"
    controls.mkdir()
    (controls / "face.png").symlink_to(outside / "images" / "secret.png")
    with pytest.raises(comfy_env.FolderAccessError, match="control_dir image"):
        FaceConsistencyScoreFolder().score_folder(None, str(comfy / "input"), 0.5, control_dir=str(controls))


@pytest.mark.parametrize(
    "control",
    ["{outside}/images/secret.png", "../../../../../../../../..{outside}/images/secret.png", "{link}/secret.png"],
)
def test_score_folder_refuses_prompt_controls_outside(comfy: Path, outside: Path, control: str) -> None:
    samples = comfy / "output" / "run" / "sample"
    _sample(samples)
    link = comfy / "input" / "linked_images"
    link.symlink_to(outside / "images", target_is_directory=True)
    prompts = comfy / "input" / "prompts.txt"
    prompts.write_text(f"a face --ci {control.format(outside=outside, link=link)}\n")
    with pytest.raises(comfy_env.FolderAccessError, match="sample_prompts --ci of prompt 0"):
        FaceConsistencyScoreFolder().score_folder(None, str(samples), 0.5, sample_prompts=str(prompts))


# --- Train Launch: the dataset TOML and every path in it, the dataset folder, the prompts' --ci


def _launch_inputs(comfy: Path, **overrides: Any) -> dict[str, Any]:
    required = FaceConsistencyTrainLaunch.INPUT_TYPES()["required"]
    inputs = {name: spec[1].get("default") if len(spec) > 1 else None for name, spec in required.items()}
    for name in ("dit", "vae", "text_encoder"):
        path = comfy / "models" / {"dit": "diffusion_models", "vae": "vae", "text_encoder": "text_encoders"}[name]
        path.mkdir(parents=True, exist_ok=True)
        (path / f"{name}.safetensors").write_bytes(b"")
        inputs[name] = f"{name}.safetensors"
    inputs.update(output_name="confined", enable_face_loss=False)
    return {**inputs, **overrides}


class Launched(Exception):
    pass


@pytest.fixture()
def no_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Launching stops where the trainer would start: what the launch checks is what is tested."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise Launched()

    monkeypatch.setattr("face_consistency.training_jobs.job_control.launch", refuse)


def _dataset(folder: Path, n: int = 2) -> dict[str, str]:
    images, controls = folder / "images", folder / "controls"
    for sub in (images, controls):
        sub.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (32, 32), "green").save(images / f"item_{i}.png")
        (images / f"item_{i}.txt").write_text(f"caption {i}")
        Image.new("RGB", (32, 32), "white").save(controls / f"item_{i}.png")
    return {
        "image_directory": str(images),
        "control_directory": str(controls),
        "cache_directory": str(folder / "cache"),
    }


GENERAL = {"resolution": [32, 32], "caption_extension": ".txt", "batch_size": 1}


@pytest.mark.parametrize("key", ["image_directory", "control_directory", "cache_directory"])
def test_launch_refuses_a_toml_naming_a_folder_outside(comfy: Path, outside: Path, no_trainer: None, key: str) -> None:
    paths = _dataset(comfy / "input" / "data")
    outside_paths = _dataset(outside / "data")
    toml = write_dataset_config(
        comfy / "input" / "data" / "dataset.toml", GENERAL, [{**paths, key: outside_paths[key]}]
    )
    before = _snapshot(outside)
    with pytest.raises(comfy_env.FolderAccessError, match=f"dataset .*{key}"):
        FaceConsistencyTrainLaunch().launch(**_launch_inputs(comfy, dataset=str(toml)))
    assert _snapshot(outside) == before and not (outside / "data" / "cache").exists()  # no cache written there
    assert comfy_env.open_registry().records() == []  # no job


def test_launch_refuses_relative_toml_paths_that_climb_out(comfy: Path, outside: Path, no_trainer: None) -> None:
    paths = _dataset(comfy / "input" / "data")
    climb = "../" * 40 + str(outside).lstrip("/") + "/cache"  # the trainer's working directory is the run folder
    toml = write_dataset_config(
        comfy / "input" / "data" / "dataset.toml", GENERAL, [{**paths, "cache_directory": climb}]
    )
    with pytest.raises(comfy_env.FolderAccessError, match="cache_directory"):
        FaceConsistencyTrainLaunch().launch(**_launch_inputs(comfy, dataset=str(toml)))
    assert not (outside / "cache").exists()


@pytest.mark.parametrize("what", ["image", "control image", "caption"])
def test_launch_refuses_a_dataset_file_that_links_out(comfy: Path, outside: Path, no_trainer: None, what: str) -> None:
    folder = comfy / "input" / "data"
    _dataset(folder)
    planted = {
        "image": folder / "images" / "item_0.png",
        "control image": folder / "controls" / "item_0.png",
        "caption": folder / "images" / "item_0.txt",
    }[what]
    planted.unlink()
    planted.symlink_to(outside / ("secret.txt" if what == "caption" else "images/secret.png"))
    # a dataset folder without a TOML: the launch writes one for it, then checks what it names
    with pytest.raises(comfy_env.FolderAccessError, match=f"dataset {what} "):
        FaceConsistencyTrainLaunch().launch(**_launch_inputs(comfy, dataset=str(folder)))


def test_launch_refuses_jsonl_entries_outside(comfy: Path, outside: Path, no_trainer: None) -> None:
    folder = comfy / "input" / "data"
    _dataset(folder)
    jsonl = folder / "pairs.jsonl"
    jsonl.write_text(
        f'{{"image_path": "{outside}/images/secret.png", "control_path": "{folder}/controls/item_0.png", '
        '"caption": "x"}\n'
    )
    toml = write_dataset_config(folder / "dataset.toml", GENERAL, [{"image_jsonl_file": str(jsonl)}])
    with pytest.raises(comfy_env.FolderAccessError, match="dataset image"):
        FaceConsistencyTrainLaunch().launch(**_launch_inputs(comfy, dataset=str(toml)))


def test_launch_accepts_a_dataset_inside_comfyui(comfy: Path, no_trainer: None) -> None:
    folder = comfy / "input" / "data"
    toml = write_dataset_config(folder / "dataset.toml", GENERAL, [_dataset(folder)])
    with pytest.raises(Launched):  # every check passed: the trainer would start now
        FaceConsistencyTrainLaunch().launch(**_launch_inputs(comfy, dataset=str(toml)))


@pytest.mark.parametrize(
    "control", ["{outside}/images/secret.png", "../../../../../../../../../..{outside}/secret.txt", "{link}/secret.png"]
)
def test_launch_confines_the_prompts(comfy: Path, outside: Path, no_trainer: None, control: str) -> None:
    folder = comfy / "input" / "data"
    toml = write_dataset_config(folder / "dataset.toml", GENERAL, [_dataset(folder)])
    link = comfy / "input" / "linked"
    link.symlink_to(outside / "images", target_is_directory=True)
    prompts = f"first --ci {folder}/controls/item_0.png\nsecond --ci {control.format(outside=outside, link=link)}"
    with pytest.raises(comfy_env.FolderAccessError, match="sample_prompts --ci of prompt 1"):
        FaceConsistencyTrainLaunch().launch(**_launch_inputs(comfy, dataset=str(toml), sample_prompts=prompts))
    assert not (comfy / "output" / "loras" / "confined").exists()  # refused before the run folder is made


@pytest.mark.parametrize("name", ["../escaped", "a/b", "..", ".hidden", "x" * 300, "nul\x00name", "con:tab", ""])
def test_launch_refuses_names_that_are_paths(comfy: Path, no_trainer: None, name: str) -> None:
    with pytest.raises(ValueError, match="output_name"):
        FaceConsistencyTrainLaunch().launch(**_launch_inputs(comfy, output_name=name))
    assert not list((comfy / "output").rglob("*escaped*")) and not (comfy / "output" / "loras").exists()


def test_launch_refuses_a_face_pack_folder_outside(comfy: Path, outside: Path, no_trainer: None) -> None:
    """The pack is chosen from a list, but a workflow may name a pack's folder: confined like a path input."""
    assert FaceConsistencyTrainLaunch.VALIDATE_INPUTS(str(outside)) is True  # checked when the node runs
    assert "'mine' is not installed" in FaceConsistencyTrainLaunch.VALIDATE_INPUTS("mine")
    for value in (str(outside), "../" * 40 + str(outside).lstrip("/")):
        with pytest.raises(comfy_env.FolderAccessError, match="face_model_name"):
            FaceConsistencyTrainLaunch().launch(**_launch_inputs(comfy, face_model_name=value, enable_face_loss=True))
    assert not (comfy / "output" / "loras").exists()


# --- run folders inside ComfyUI whose files point elsewhere


def test_monitor_reads_no_status_or_metrics_that_link_out(comfy: Path, outside: Path) -> None:
    run = comfy / "output" / "loras" / "planted"
    run.mkdir(parents=True)
    (run / "status.json").symlink_to(outside / "secret.json")
    (outside / "metrics.jsonl").write_text(f'{{"step": 1, "loss": 0.5, "note": "{SECRET}"}}\n' * 3)
    (run / "metrics.jsonl").symlink_to(outside / "metrics.jsonl")
    (run / "train.log").symlink_to(outside / "secret.txt")
    status = FaceConsistencyTrainMonitor().monitor("no", 1.0, 5, 8, output_folder="loras/planted")["result"][0]
    assert SECRET not in status and "step 1" not in status and "0.5000" not in status
    log_text = NODE_CLASS_MAPPINGS["FaceConsistencyTrainLogs"]().logs(10, output_folder="loras/planted")["result"][0]
    assert SECRET not in log_text


def test_a_folder_linked_out_of_comfyui_is_refused(comfy: Path, outside: Path) -> None:
    (comfy / "output" / "loras").mkdir(parents=True, exist_ok=True)
    (comfy / "output" / "loras" / "linked_run").symlink_to(outside, target_is_directory=True)
    with pytest.raises(comfy_env.FolderAccessError, match="output_folder"):
        FaceConsistencyTrainMonitor().monitor("no", 1.0, 5, 8, output_folder="linked_run")
    assert os.path.islink(comfy / "output" / "loras" / "linked_run")
