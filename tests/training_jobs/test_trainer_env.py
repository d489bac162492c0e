"""The trainer environment: which Python a launch runs, the refusal that names the setup command, and
`setup-trainer` itself (both layouts), with pip installing a wheel built here from a folder (--no-index:
never the internet)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from face_consistency.training_contract import libraries
from face_consistency.training_jobs import job_control, trainer_env
from face_consistency.training_jobs.trainer_env import TrainerEnvironmentError

PROBE = "fc_probe_lib"
REPO_ROOT = Path(__file__).resolve().parents[2]


def write_wheel(folder: Path, name: str = PROBE, version: str = "1.0") -> Path:
    """A real, minimal pure-Python wheel of `name` (its module sets VALUE = 42)."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"VALUE = 42\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = (
        "".join(
            f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
            for path, data in files.items()
        )
        + f"{dist_info}/RECORD,,\n"
    )
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        archive.writestr(f"{dist_info}/RECORD", record)
    return wheel


@pytest.fixture(scope="module")
def local_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the probe wheel, versions 1.0 and 2.0."""
    wheels = tmp_path_factory.mktemp("wheels")
    write_wheel(wheels, version="1.0")
    write_wheel(wheels, version="2.0")
    return wheels


def requirements_file(folder: Path, text: str = f"{PROBE}==1.0\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    requirements = folder / "requirements-trainer.txt"
    requirements.write_text(text)
    return requirements


def set_up(folder: Path, requirements: Path, wheels: Path, layout: str, echo=lambda line: None) -> dict:
    return trainer_env.set_up(
        folder, layout=layout, find_links=[str(wheels)], no_index=True, requirements=requirements, echo=echo
    )


@pytest.fixture(scope="module")
def venv_env(tmp_path_factory: pytest.TempPathFactory, local_index: Path) -> tuple[Path, Path, dict, list[str]]:
    """A venv-layout environment set up for the probe wheel: (folder, requirements, manifest, what it printed)."""
    root = tmp_path_factory.mktemp("venv_env")
    requirements = requirements_file(root)
    lines: list[str] = []
    manifest = set_up(root / "trainer_env", requirements, local_index, "venv", lines.append)
    return root / "trainer_env", requirements, manifest, lines


@pytest.fixture(scope="module")
def target_env(tmp_path_factory: pytest.TempPathFactory, local_index: Path) -> tuple[Path, Path, dict]:
    """A target-layout environment for the probe wheel and numpy (which this Python has already)."""
    root = tmp_path_factory.mktemp("target_env")
    requirements = requirements_file(root, f"{PROBE}==1.0\nnumpy\n")
    return root / "trainer_env", requirements, set_up(root / "trainer_env", requirements, local_index, "target")


def run_with(runtime: trainer_env.TrainerRuntime, code: str) -> str:
    """Run `code` as the trainer would run: with the runtime's Python, its package folder first."""
    prefix = f"import sys; sys.path.insert(0, {str(runtime.site)!r}); " if runtime.site else ""
    return subprocess.run(
        [runtime.python, "-c", prefix + code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()


def test_without_an_environment_a_python_with_the_libraries_runs_the_trainer(tmp_path: Path) -> None:
    assert not libraries.missing()  # the test environment has them, as a standalone install does
    runtime = trainer_env.trainer_runtime(tmp_path / "none")
    assert runtime.python == sys.executable and runtime.site is None
    command = job_control.trainer_command(["--output_dir", "x"])
    assert command[:2] == [sys.executable, str(trainer_env.BOOTSTRAP)]
    assert command[2:] == ["train", "--output_dir", "x"]


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Python of a virtualenv without any package: a ComfyUI lacking the trainer's libraries."""
    bare = tmp_path_factory.mktemp("bare")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    return bare / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def check_with(python: Path, folder: Path) -> subprocess.CompletedProcess:
    """`setup-trainer --check`: what a launch from `python` would do."""
    return subprocess.run(
        [str(python), str(trainer_env.BOOTSTRAP), "setup-trainer", "--check", "--path", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_python_without_the_libraries_is_refused_naming_the_setup_command(tmp_path: Path, bare_python: Path) -> None:
    folder = tmp_path / "not_set_up"
    done = check_with(bare_python, folder)
    assert done.returncode == 1
    assert "training needs diffusers, transformers, peft, accelerate, onnx2torch, which this Python" in done.stderr
    assert f"{bare_python} {trainer_env.BOOTSTRAP} setup-trainer --path {folder}" in done.stderr
    assert "Traceback" not in done.stderr


def test_setup_makes_a_venv_that_sees_comfyuis_packages(venv_env: tuple[Path, Path, dict, list[str]]) -> None:
    folder, requirements, manifest, lines = venv_env

    assert manifest["layout"] == "venv" and manifest["base_python"] == sys.executable
    assert json.loads((folder / trainer_env.MANIFEST).read_text())[
        "requirements_sha256"
    ] == trainer_env.requirements_digest(requirements)
    runtime = trainer_env.trainer_runtime(folder, requirements=requirements)
    assert runtime.site is None and Path(runtime.python).is_relative_to(folder / "venv")
    # its own package from the venv; numpy and torch are this (ComfyUI's) Python's, not copied
    found = json.loads(
        run_with(
            runtime,
            "import json, fc_probe_lib, numpy, torch; print(json.dumps("
            "[fc_probe_lib.__file__, numpy.__file__, torch.__file__]))",
        )
    )
    assert Path(found[0]).is_relative_to(folder)
    assert not any(Path(path).is_relative_to(folder) for path in found[1:])
    assert not list(folder.rglob("torch/__init__.py"))
    assert manifest["libraries"]["diffusers"]["location"] == libraries.versions()["diffusers"]["location"]
    assert any("its torch is reused: torch " in line for line in lines)


def test_the_launch_runs_the_environments_python(
    venv_env: tuple[Path, Path, dict, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, requirements, manifest, _ = venv_env
    monkeypatch.setenv(trainer_env.ENV_VARIABLE, str(folder))
    monkeypatch.setattr(trainer_env, "REQUIREMENTS", requirements)  # the file it was set up with
    assert job_control.trainer_command(["--help"]) == [
        manifest["python"],
        str(trainer_env.BOOTSTRAP),
        "train",
        "--help",
    ]


def test_setup_target_layout_installs_only_what_this_python_lacks(target_env: tuple[Path, Path, dict]) -> None:
    folder, requirements, manifest = target_env

    site_dir = folder / "site-packages"
    assert manifest["layout"] == "target" and manifest["site"] == str(site_dir)
    assert sorted(p.name for p in site_dir.iterdir() if not p.name.startswith("__")) == [
        PROBE,
        f"{PROBE}-1.0.dist-info",
    ]  # numpy is this Python's: not installed again
    runtime = trainer_env.trainer_runtime(folder, requirements=requirements)
    assert runtime.python == sys.executable and runtime.site == site_dir
    assert runtime.command("train")[:4] == [sys.executable, str(trainer_env.BOOTSTRAP), "--site", str(site_dir)]
    assert run_with(runtime, "import fc_probe_lib; print(fc_probe_lib.VALUE)") == "42"


def test_an_out_of_date_environment_is_refused_and_set_up_again(tmp_path: Path, local_index: Path) -> None:
    requirements = requirements_file(tmp_path)
    folder = tmp_path / "trainer_env"
    set_up(folder, requirements, local_index, "target")
    requirements.write_text(f"{PROBE}==2.0\n")  # the pack was updated

    with pytest.raises(
        TrainerEnvironmentError,
        match=r"out of date: requirements-trainer.txt has changed since "
        r"it was set up \(the pack was updated\)\. Set it up again, with ComfyUI's Python: .*setup",
    ):
        trainer_env.trainer_runtime(folder, requirements=requirements)
    # as bootstrap.py runs it (--site), the check says the same, without a traceback
    stale = trainer_env.TrainerRuntime(sys.executable, folder / "site-packages", "")
    done = subprocess.run(
        stale.command("setup-trainer", "--check", "--path", str(folder)), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "has changed since it was set up" in done.stderr and "Traceback" not in done.stderr

    set_up(folder, requirements, local_index, "target")
    runtime = trainer_env.trainer_runtime(folder, requirements=requirements)
    assert sorted(p.name for p in runtime.site.glob("*.dist-info")) == [f"{PROBE}-2.0.dist-info"]


def test_the_launch_node_refuses_before_writing_anything(
    tmp_path: Path, target_env: tuple[Path, Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    from comfy_stubs import set_comfy_base
    from face_consistency.nodes import comfy_env
    from face_consistency.nodes.training import FaceConsistencyTrainLaunch
    from workflow_runner import load_workflow

    set_comfy_base(tmp_path / "comfy")
    comfy_env.register_model_folders()
    inputs = {
        **load_workflow(REPO_ROOT / "example_workflows" / "api" / "train_launch_monitor.json")["1"]["inputs"],
        "dataset": str(tmp_path / "comfy" / "input" / "data"),
        "output_name": "refused",
        "sample_prompts": "",
    }
    # set up for another requirements file than the pack's: out of date for the launch
    monkeypatch.setenv(trainer_env.ENV_VARIABLE, str(target_env[0]))
    with pytest.raises(TrainerEnvironmentError, match="out of date.*setup-trainer"):
        FaceConsistencyTrainLaunch().launch(**inputs)
    assert not (tmp_path / "comfy" / "output" / "loras" / "refused").exists()


def test_setup_refuses_a_folder_that_is_not_a_trainer_environment(tmp_path: Path, local_index: Path) -> None:
    folder = tmp_path / "my_files"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(TrainerEnvironmentError, match="is not empty and holds no trainer environment"):
        set_up(folder, requirements_file(tmp_path), local_index, "auto")
    assert (folder / "notes.txt").read_text() == "keep me"


def test_an_offline_setup_says_what_to_do(tmp_path: Path) -> None:
    empty = tmp_path / "no_wheels"
    empty.mkdir()
    folder = tmp_path / "trainer_env"
    with pytest.raises(
        TrainerEnvironmentError,
        match=r"failed \(exit code 1; pip's messages are above\)\. Nothing "
        r"of ComfyUI's own packages was changed\. If this machine is offline.*--no-index --find-links",
    ):
        set_up(folder, requirements_file(tmp_path), empty, "target")
    assert not (folder / trainer_env.MANIFEST).exists() and (folder / trainer_env.MARKER).exists()
    # an unfinished setup is not used: this Python, which has the libraries, runs the trainer
    assert trainer_env.trainer_runtime(folder, requirements=requirements_file(tmp_path)).python == sys.executable


def test_an_environment_made_for_another_python_is_refused(
    target_env: tuple[Path, Path, dict], bare_python: Path
) -> None:
    done = check_with(bare_python, target_env[0])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"out of date: it was made for the Python {sys.executable}" in done.stderr
    assert f"and ComfyUI now runs {bare_python}" in done.stderr


def test_the_dry_run_lists_what_the_environment_would_hold_and_installs_nothing(
    tmp_path: Path,
    local_index: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    lines: list[str] = []
    trainer_env.dry_run(
        find_links=[str(local_index)], no_index=True, requirements=requirements_file(tmp_path), echo=lines.append
    )
    assert "Would install fc_probe_lib-1.0" in capfd.readouterr().out
    assert "never here" in lines[0]
    assert libraries.versions([PROBE]) == {}  # not installed in this Python
