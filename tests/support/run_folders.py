"""Run folders on disk for job-control, node and route tests: a plain musubi-tuner output folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

MUSUBI_NAME = "musubi_face"
# (file stem, step in the ss_steps metadata, epoch)
MUSUBI_CHECKPOINTS = (
    (f"{MUSUBI_NAME}-000002", 20, 2),
    (f"{MUSUBI_NAME}-step00000015", 15, 2),
    (f"{MUSUBI_NAME}-000001", 10, 1),
    (MUSUBI_NAME, 30, 3),
)
# step 20 is the newest sampling round: two prompts
MUSUBI_SAMPLES = (
    f"{MUSUBI_NAME}_e000001_00_20260101115900.png",
    f"{MUSUBI_NAME}_000010_00_20260101120000_42.png",
    f"{MUSUBI_NAME}_000020_00_20260101121000_42_000.png",
    f"{MUSUBI_NAME}_000020_01_20260101121001_000.png",
)


def write_lora(path: Path, *, steps: int | None = None, epoch: int | None = None, seed: int = 0) -> Path:
    """A small LoRA file with musubi's key names and `ss_*` metadata."""
    generator = torch.Generator().manual_seed(seed)
    prefix = "lora_unet_transformer_blocks_0_attn_to_q"
    tensors = {
        f"{prefix}.lora_down.weight": torch.randn(4, 32, generator=generator),
        f"{prefix}.lora_up.weight": torch.randn(32, 4, generator=generator),
        f"{prefix}.alpha": torch.tensor(4.0),
    }
    metadata = {"ss_network_module": "networks.lora_qwen_image"}
    if steps is not None:
        metadata["ss_steps"] = str(steps)
    if epoch is not None:
        metadata["ss_epoch"] = str(epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def write_musubi_run(folder: Path, *, steps: int = 30) -> Path:
    """Checkpoints, `sample/` images and TensorBoard event files, as a musubi-tuner run leaves them."""
    from torch.utils.tensorboard import SummaryWriter

    folder.mkdir(parents=True, exist_ok=True)
    for index, (stem, step, epoch) in enumerate(MUSUBI_CHECKPOINTS):
        write_lora(folder / f"{stem}.safetensors", steps=step, epoch=epoch, seed=index)
    sample_dir = folder / "sample"
    sample_dir.mkdir(exist_ok=True)
    for index, name in enumerate(MUSUBI_SAMPLES):
        colour = np.full((48, 40, 3), 40 * (index + 1), dtype=np.uint8)
        Image.fromarray(colour).save(sample_dir / name)
    writer = SummaryWriter(log_dir=str(folder / "logs" / "network_train"))
    for step in range(1, steps + 1):
        writer.add_scalar("loss/current", 1.0 / step, step)
        writer.add_scalar("loss/average", 1.0 / step + 0.01, step)
        writer.add_scalar("face_sim/x0_mean", 0.5 + step / (2 * steps), step)
    writer.close()
    return folder
