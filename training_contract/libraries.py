"""The trainer's libraries: the ones a Python must have to run a training job, and the versions and
folders of those a process runs with. The launch checks the first (training_jobs/trainer_env.py);
the trainer records the second in status.json and its log, so a job shows which libraries it ran with."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Iterable

# imported by the training process (onnx2torch only with the face loss); bitsandbytes is optional
REQUIRED = ("diffusers", "transformers", "peft", "accelerate", "onnx2torch")
REPORTED = ("torch", *REQUIRED, "huggingface_hub", "tokenizers", "bitsandbytes")
# Model versions that need newer libraries than the pack's floors (pyproject.toml): Qwen-Image 2.1's
# classes (QwenImage21Transformer2DModel, AutoencoderKLQwenImage21) came in diffusers 0.41.0 and
# Qwen3VLForConditionalGeneration in transformers 4.57 (4.57.0 was withdrawn from PyPI).
MODEL_VERSION_FLOORS = {"qwen-image-2.1": {"diffusers": "0.41.0", "transformers": "4.57.1"}}


def missing(names: Iterable[str] = REQUIRED) -> list[str]:
    """The modules of `names` this Python cannot import (looked up, not imported)."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def versions(names: Iterable[str] = REPORTED) -> dict[str, dict[str, str]]:
    """{name: {"version", "location"}} of the installed distributions of `names`, as this process
    finds them (the first on sys.path, as imports do); absent ones are left out."""
    found = {}
    for name in names:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found[name] = {"version": dist.version, "location": str(dist.locate_file(""))}
    return found


def too_old_for(model_version: str, found: dict[str, dict[str, str]] | None = None) -> str | None:
    """Why this Python's libraries cannot train `model_version` (a message naming the versions it
    needs and those installed), or None when they can; `found` is a `versions()` result."""
    floors = MODEL_VERSION_FLOORS.get(model_version)
    if not floors:
        return None
    from packaging.version import InvalidVersion, Version

    found = versions(floors) if found is None else found
    short = []
    for name, floor in floors.items():
        installed = found.get(name, {}).get("version")
        try:
            new_enough = installed is not None and Version(installed) >= Version(floor)
        except InvalidVersion:
            new_enough = False
        if not new_enough:
            short.append(f"{name} {installed or 'not installed'}")
    if not short:
        return None
    needed = [f"{name}>={floor}" for name, floor in floors.items()]
    return (
        f"--model_version {model_version} needs {' and '.join(needed)}; this Python has {', '.join(short)}. "
        f"Install them into the trainer's Python (pip install {' '.join(repr(n) for n in needed)}) "
        "or pick another --model_version"
    )


def describe(found: dict[str, dict[str, str]]) -> list[str]:
    """`name version (folder)` for each library of a `versions()` result."""
    return [f"{name} {info['version']} ({info['location']})" for name, info in found.items()]
