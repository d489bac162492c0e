"""The trainer's libraries: the ones a Python must have to run a training job, and the versions and
folders of those a process runs with. The launch checks the first (training_jobs/trainer_env.py);
the trainer records the second in status.json and its log, so a job shows which libraries it ran with."""
from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Iterable

# imported by the training process (onnx2torch only with the face loss); bitsandbytes is optional
REQUIRED = ("diffusers", "transformers", "peft", "accelerate", "onnx2torch")
REPORTED = ("torch", *REQUIRED, "huggingface_hub", "tokenizers", "bitsandbytes")


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


def describe(found: dict[str, dict[str, str]]) -> list[str]:
    """`name version (folder)` for each library of a `versions()` result."""
    return [f"{name} {info['version']} ({info['location']})" for name, info in found.items()]
