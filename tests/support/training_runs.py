"""Real trainer runs for job-control, node and route tests: the tiny models and dataset (the session's
`tiny_training` fixture, tests/conftest.py), installed into a ComfyUI or run; waiting for a run."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tiny_qwen import TinyModelFiles, tiny_train_argv

T = TypeVar("T")
RUN_TIMEOUT_S = 300.0  # a tiny run takes well under a minute; 2 shared CI cores can be slow


@dataclass(frozen=True)
class ComfyTinyFiles:
    """The tiny dataset and tokenizer as a ComfyUI user keeps them: in ComfyUI's input folder (the
    launch node reads nothing outside ComfyUI's folders)."""

    dataset_toml: Path
    tokenizer_dir: Path

    @property
    def control(self) -> Path:
        return self.dataset_toml.parent / "controls" / "item_0.png"


@dataclass(frozen=True)
class TinyTraining:
    files: TinyModelFiles
    dataset_toml: Path

    def argv(self, output_dir: Path, steps: int, *extra: str) -> list[str]:
        return tiny_train_argv(self.files, self.dataset_toml, output_dir, max_train_steps=steps, extra=extra)

    def install_into_comfyui(self, comfy_base: Path, name: str = "tiny") -> ComfyTinyFiles:
        """Link the model files into ComfyUI's diffusion_models / vae / text_encoders folders (ComfyUI
        resolves those names itself), and copy the dataset and the tokenizer into its input folder
        (`{name}_dataset`, `{name}_tokenizer`: another name, another training's copies)."""
        for folder, path in (
            ("diffusion_models", self.files.dit),
            ("vae", self.files.vae),
            ("text_encoders", self.files.text_encoder),
        ):
            target = comfy_base / "models" / folder / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(path)
        dataset = comfy_base / "input" / f"{name}_dataset"
        for part in ("images", "controls"):
            shutil.copytree(self.dataset_toml.parent / part, dataset / part, dirs_exist_ok=True)
        toml = dataset / "dataset.toml"  # the same settings, its folders (and cache) those of the copy
        toml.write_text(self.dataset_toml.read_text().replace(str(self.dataset_toml.parent), str(dataset)))
        tokenizer = comfy_base / "input" / f"{name}_tokenizer"
        shutil.copytree(self.files.tokenizer_dir, tokenizer, dirs_exist_ok=True)
        return ComfyTinyFiles(toml, tokenizer)


def wait_for(condition: Callable[[], T], what: str, timeout_s: float = RUN_TIMEOUT_S, interval_s: float = 0.25) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def group_gone(pid: int) -> bool:
    """True when no process of the process group led by `pid` exists any more."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False
