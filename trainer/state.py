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
from pathlib import Path

import torch
from accelerate import Accelerator
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ..faceid.fileio import atomic_write_json

PROGRESS_FILE = "trainer_state.json"
LORA_FILE = "lora_state.safetensors"


def save_state(
    directory: Path, accelerator: Accelerator, transformer: torch.nn.Module, generator: torch.Generator,
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
    finally:
        handle.remove()
    torch.save(generator.get_state(), partial / f"noise_generator_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(partial / PROGRESS_FILE, dict(progress))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(partial, directory)
    accelerator.wait_for_everyone()


def load_state(
    directory: Path, accelerator: Accelerator, transformer: torch.nn.Module, generator: torch.Generator,
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
    generator.set_state(torch.load(directory / f"noise_generator_{accelerator.process_index}.pt"))
    progress.update(json.loads((directory / PROGRESS_FILE).read_text(encoding="utf-8")))


def is_state_folder(directory: Path) -> bool:
    return (directory / PROGRESS_FILE).is_file()
