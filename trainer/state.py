"""Resumable training state (`--save_state` / `--resume`): a folder beside each checkpoint.

Holds the LoRA weights (peft names), the optimizer, LR scheduler and RNG states (accelerate's
`save_state`, with a hook so only the LoRA is saved, not the whole transformer), each process's
noise generator, and the counters `trainer_state.json` (`step`, `epoch`, `batch_in_epoch`), so a
resumed run continues at the same step, epoch and batch with identical losses.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..common.files import atomic_write_json

PROGRESS_FILE = "trainer_state.json"
LORA_FILE = "lora_state.safetensors"


def noise_generator_file(process_index: int) -> str:
    return f"noise_generator_{process_index}.pt"


def save_state(
    directory: Path,
    accelerator: Accelerator,
    transformer: torch.nn.Module,
    generator: torch.Generator,
    progress: dict[str, int],
) -> None:
    """Write the state folder (all processes call this); it appears complete or not at all."""

    def keep_lora_only(models_: list, weights: list, out_dir: str) -> None:
        if accelerator.is_main_process:
            lora = get_peft_model_state_dict(accelerator.unwrap_model(transformer))
            save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, os.path.join(out_dir, LORA_FILE))
        weights.clear()

    partial = directory.with_name(f".{directory.name}.partial")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    handle = accelerator.register_save_state_pre_hook(keep_lora_only)
    try:
        accelerator.save_state(str(partial))
        torch.save(generator.get_state(), partial / noise_generator_file(accelerator.process_index))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            atomic_write_json(partial / PROGRESS_FILE, dict(progress))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a full disk gets its space back for the failed status
        raise
    finally:
        handle.remove()
    if accelerator.is_main_process:
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(partial, directory)
    accelerator.wait_for_everyone()


def load_state(
    directory: Path,
    accelerator: Accelerator,
    transformer: torch.nn.Module,
    generator: torch.Generator,
    progress: dict[str, int],
) -> None:
    """Restore a folder written by `save_state` into the prepared model, optimizer and scheduler."""

    def load_lora_only(models_: list, in_dir: str) -> None:
        set_peft_model_state_dict(accelerator.unwrap_model(transformer), load_file(os.path.join(in_dir, LORA_FILE)))
        models_.clear()

    handle = accelerator.register_load_state_pre_hook(load_lora_only)
    try:
        accelerator.load_state(str(directory))
    finally:
        handle.remove()
    generator.set_state(torch.load(directory / noise_generator_file(accelerator.process_index)))
    progress.update(json.loads((directory / PROGRESS_FILE).read_text(encoding="utf-8")))


class StateFolderError(ValueError):
    """A --resume folder that cannot be resumed, with the reason."""


def check_state_folder(directory: Path) -> dict[str, int]:
    """The counters of a state folder, once every file `load_state` reads is there and whole
    (checked before any model loads: a truncated file would fail deep in torch much later)."""
    progress_file = directory / PROGRESS_FILE
    if not progress_file.is_file():
        raise StateFolderError(f"--resume {directory}: not a state folder saved by --save_state (no {PROGRESS_FILE})")
    problems = [f"{name} {problem}" for name, problem in _state_file_problems(directory)]
    try:
        progress = json.loads(progress_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{PROGRESS_FILE} cannot be read ({exc})")
    else:
        if not isinstance(progress, dict) or not all(
            isinstance(progress.get(key), int) and progress[key] >= 0 for key in ("step", "epoch", "batch_in_epoch")
        ):
            problems.append(f"{PROGRESS_FILE} lacks the step, epoch and batch_in_epoch counters")
    if problems:
        raise StateFolderError(
            f"--resume {directory}: {'; '.join(problems)}. Resume from an earlier state folder, "
            "or train from scratch without --resume"
        )
    return progress


def _state_file_problems(directory: Path) -> Iterator[tuple[str, str]]:
    for name in (LORA_FILE, "optimizer.bin", "scheduler.bin", "random_states_0.pkl", noise_generator_file(0)):
        file = directory / name
        if not file.is_file() or file.stat().st_size == 0:
            yield name, "is missing or empty"
        elif file.suffix in (".bin", ".pt") and not zipfile.is_zipfile(file):  # torch.save writes zip archives
            yield name, "is truncated or corrupt"
        elif name == LORA_FILE:
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except (SafetensorError, OSError) as exc:
                yield name, f"is truncated or corrupt ({exc})"


def state_lora_rank(directory: Path) -> int | None:
    """The LoRA rank a state folder was trained at (None when it holds no LoRA layer)."""
    with safe_open(str(directory / LORA_FILE), framework="pt") as handle:
        keys = handle.keys()  # safe_open is not iterable itself
        return next((handle.get_slice(k).get_shape()[0] for k in keys if k.endswith("lora_A.weight")), None)
