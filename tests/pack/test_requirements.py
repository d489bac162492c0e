"""The three dependency lists agree: requirements.txt (ComfyUI's Python), requirements-trainer.txt (the
trainer environment, pinned) and pyproject.toml (standalone: both, plus torch)."""

from __future__ import annotations

from pathlib import Path

from face_consistency.common.files import tomllib
from face_consistency.training_contract import libraries
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[2]
# what ComfyUI and other packs commonly depend on (tests/e2e/test_comfyui_install.py checks none of them moves)
PROTECTED = {
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
}
# registry metadata, not a library the pack imports: the Comfy Registry reads the supported frontend
# versions from this dependency (tests/pack/test_registry_metadata.py)
REGISTRY_FRONTEND = "comfyui-frontend-package"
OPENCV = {"opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"}


def read_requirements(path: Path) -> dict[str, Requirement]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    requirements = [Requirement(line) for line in lines if line]
    return {canonicalize_name(r.name): r for r in requirements}


def pyproject_dependencies() -> dict[str, Requirement]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}


def test_comfyui_requirements_are_the_packages_own_minus_torch_and_the_trainers() -> None:
    comfyui = read_requirements(REPO_ROOT / "requirements.txt")
    trainer = read_requirements(REPO_ROOT / "requirements-trainer.txt")
    standalone = pyproject_dependencies()
    for name, requirement in comfyui.items():
        assert str(standalone[name]) == str(requirement), name  # same floor and marker in both
    assert set(standalone) - set(comfyui) == (
        {"torch", "torchvision", REGISTRY_FRONTEND} | (set(trainer) & set(standalone))
    )


def test_comfyui_requirements_move_nothing_comfyui_has_and_name_no_opencv() -> None:
    comfyui = read_requirements(REPO_ROOT / "requirements.txt")
    assert not set(comfyui) & OPENCV
    assert not set(comfyui) & {"torch", "torchvision", "transformers", "huggingface-hub", "tokenizers"}
    for name in set(comfyui) & PROTECTED:  # at most a floor ComfyUI's own requirements already meet
        assert all(spec.operator == ">=" for spec in comfyui[name].specifier), comfyui[name]
    assert not set(comfyui) & {canonicalize_name(name) for name in libraries.REQUIRED}


def test_the_trainer_pins_meet_the_declared_floors_and_cover_what_the_trainer_imports() -> None:
    trainer = read_requirements(REPO_ROOT / "requirements-trainer.txt")
    standalone = pyproject_dependencies()
    for name, requirement in trainer.items():
        (pin,) = requirement.specifier
        assert pin.operator == "==", requirement  # tested versions, not ranges
        if name in standalone:
            assert standalone[name].specifier.contains(pin.version), (requirement, standalone[name])
    assert {canonicalize_name(name) for name in libraries.REQUIRED} <= set(trainer)
