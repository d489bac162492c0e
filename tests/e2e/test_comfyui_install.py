"""Installing the pack into a typical ComfyUI changes nothing it has, and its training jobs run with the
trainer's own libraries.

Runs when COMFYUI_TYPICAL_PYTHON names the Python of a fresh virtualenv holding ComfyUI's requirements
(`.ci/run` builds it: ComfyUI 0.3.64's requirements.txt without torchaudio, with transformers 5.x as pip
resolves them) and COMFYUI_DIR a ComfyUI checkout; skipped otherwise, failed instead under CI=true. It
uses pip's package index, as `.ci/run` does. In order, on that one virtualenv (one torch install):

1. pip's dry run of requirements.txt (`--report`), as `pip install -r` and comfy-cli install it:
   no protected package changes and exactly one OpenCV package is there afterwards;
2. the same after transformers 4.57.1 is installed over 5.x (huggingface-hub and tokenizers follow);
3. requirements.txt installed for real as ComfyUI-Manager does (one `pip install <line>` per line):
   the same holds for what is installed afterwards;
4. `bootstrap.py setup-trainer` with that Python into a temporary folder;
5. a real ComfyUI run by that Python trains the tiny models from the launch + monitor workflow; the
   job's status.json records the libraries it ran with: the trainer environment's, torch ComfyUI's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from comfyui_server import ComfyServer, _prepare_base, comfyui_dir, run_prompt, running_comfyui, unavailable
from face_consistency.training_contract.protocol import read_status
from face_consistency.training_jobs import trainer_env
from test_e2e_training import launch_workflow
from training_runs import TinyTraining

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO_ROOT / "requirements.txt"
# what ComfyUI and other packs commonly depend on: installing the pack must not move any of them
PROTECTED = (
    "torch",
    "torchvision",
    "numpy",
    "pillow",
    "transformers",
    "huggingface-hub",
    "tokenizers",
    "safetensors",
    "pydantic",
    "aiohttp",
)
# each installs the same `cv2` module: two of them break each other (removing one removes cv2 for both)
OPENCV = ("opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless")
TRANSFORMERS_4 = "4.57.1"
PIP_TIMEOUT_S = 900


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip(python: Path, *args: str) -> str:
    done = subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT_S,
    )
    assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def installed(python: Path) -> dict[str, str]:
    return {canonical(p["name"]): p["version"] for p in json.loads(pip(python, "list", "--format=json"))}


def would_install(python: Path, report: Path, *requirements: str) -> dict[str, str]:
    """What `pip install` of `requirements` would install or replace: its dry run's report."""
    pip(python, "install", "--dry-run", "--quiet", "--report", str(report), *requirements)
    return {
        canonical(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }


def problems(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """A protected package (or an OpenCV) changed, or not exactly one OpenCV package afterwards."""
    found = [
        f"{name} {before[name]} -> {after.get(name, 'removed')}"
        for name in (*PROTECTED, *OPENCV)
        if name in before and after.get(name) != before[name]
    ]
    opencv = sorted(name for name in OPENCV if name in after)
    if len(opencv) != 1:
        found.append(f"{len(opencv)} OpenCV packages afterwards: {', '.join(opencv) or 'none'}")
    return found


def check_dry_run(python: Path, report: Path) -> dict[str, str]:
    before = installed(python)
    planned = would_install(python, report, "-r", str(REQUIREMENTS))
    assert not problems(before, {**before, **planned}), (problems(before, {**before, **planned}), planned)
    return planned


@pytest.fixture(scope="module")
def typical_python() -> Path:
    value = os.environ.get("COMFYUI_TYPICAL_PYTHON")
    if not value:
        unavailable(
            "set COMFYUI_TYPICAL_PYTHON to the Python of a fresh virtualenv holding ComfyUI's requirements "
            "(see .ci/run) to check that installing the pack changes none of them"
        )
    python = Path(value)
    if not python.is_file():
        unavailable(f"COMFYUI_TYPICAL_PYTHON={value} is not a file")
    return python


def test_requirements_change_nothing_protected_with_transformers_5(typical_python: Path, tmp_path: Path) -> None:
    before = installed(typical_python)
    assert "insightface" not in before, "COMFYUI_TYPICAL_PYTHON must be a fresh ComfyUI environment (rebuild it)"
    assert before["transformers"].startswith("5."), before["transformers"]
    planned = check_dry_run(typical_python, tmp_path / "report.json")
    assert "insightface" in planned and "opencv-python" in planned  # the check looked at a real install


@pytest.fixture(scope="module")
def typical_python_4(typical_python: Path) -> Path:
    """The same ComfyUI environment with transformers 4.57.1, as many installs have."""
    pip(typical_python, "install", "--quiet", f"transformers=={TRANSFORMERS_4}")
    return typical_python


def test_requirements_change_nothing_protected_with_transformers_4(typical_python_4: Path, tmp_path: Path) -> None:
    before = installed(typical_python_4)
    assert before["transformers"] == TRANSFORMERS_4 and before["huggingface-hub"].startswith("0.")
    check_dry_run(typical_python_4, tmp_path / "report.json")


@pytest.fixture(scope="module")
def installed_as_manager(typical_python_4: Path) -> tuple[dict[str, str], dict[str, str]]:
    """requirements.txt installed line by line, as ComfyUI-Manager does; pip's lists before and after."""
    before = installed(typical_python_4)
    for line in REQUIREMENTS.read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement:
            pip(typical_python_4, "install", "--quiet", requirement)
    return before, installed(typical_python_4)


def test_installing_as_comfyui_manager_changes_nothing_protected(
    installed_as_manager: tuple[dict[str, str], dict[str, str]],
) -> None:
    before, after = installed_as_manager
    assert not problems(before, after)
    assert {"insightface", "onnxruntime", "tensorboard"} <= set(after)
    assert not {"diffusers", "peft", "accelerate", "bitsandbytes"} & set(after)  # the trainer's stay apart


@pytest.fixture(scope="module")
def trainer_env_dir(
    typical_python_4: Path,
    installed_as_manager: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    folder = tmp_path_factory.mktemp("typical") / "trainer_env"
    done = subprocess.run(
        [str(typical_python_4), str(trainer_env.BOOTSTRAP), "setup-trainer", "--path", str(folder)],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT_S,
    )
    assert done.returncode == 0, f"setup-trainer failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return folder


@pytest.fixture(scope="module")
def typical_comfyui(
    typical_python_4: Path,
    trainer_env_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    testdata: Path,
) -> Iterator[ComfyServer]:
    """ComfyUI run by the typical environment's Python, finding the trainer environment set up above."""
    base = tmp_path_factory.mktemp("typical-comfy-base")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("COMFYUI_PYTHON", str(typical_python_4))
        env.setenv(trainer_env.ENV_VARIABLE, str(trainer_env_dir))
        with running_comfyui(comfyui_dir(), base, _prepare_base(base, testdata)) as server:
            yield server


def test_a_job_launched_from_comfyui_runs_with_the_trainer_environments_libraries(
    typical_python_4: Path,
    installed_as_manager: tuple[dict[str, str], dict[str, str]],
    trainer_env_dir: Path,
    typical_comfyui: ComfyServer,
    tiny_training: TinyTraining,
) -> None:
    comfyui_libraries = installed_as_manager[1]
    pins = dict(
        line.split("==")
        for line in trainer_env.REQUIREMENTS.read_text().splitlines()
        if line and not line.startswith("#")
    )
    installed = tiny_training.install_into_comfyui(typical_comfyui.base)
    workflow = launch_workflow(tiny_training, installed, "typical_tiny", max_train_steps=4)
    workflow["2"]["inputs"].update(wait_until="finished", timeout_minutes=5.0)

    outputs = run_prompt(typical_comfyui, workflow)

    assert "typical_tiny: completed" in outputs["2"]["text"][0], typical_comfyui.log()
    output_dir = typical_comfyui.base / "output" / "loras" / "typical_tiny"
    status = read_status(output_dir)
    assert status is not None and status["state"] == "completed"
    libraries = status["libraries"]
    for name in ("diffusers", "transformers", "huggingface_hub", "peft", "accelerate"):
        assert libraries[name]["version"] == pins[name], (name, libraries[name])
        assert Path(libraries[name]["location"]).is_relative_to(trainer_env_dir), (name, libraries[name])
    # ComfyUI keeps its own transformers 4.57.1; the trainer ran with 5.x beside it
    assert comfyui_libraries["transformers"] == TRANSFORMERS_4 != libraries["transformers"]["version"]
    assert not Path(libraries["torch"]["location"]).is_relative_to(trainer_env_dir)  # ComfyUI's torch, reused
    assert f"transformers {pins['transformers']}" in (output_dir / "train.log").read_text()
