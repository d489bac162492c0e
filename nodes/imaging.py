"""IMAGE tensors <-> the BGR/RGB uint8 arrays the face library works on, and node previews."""
from __future__ import annotations

import uuid
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..faceid import ImageLoadError, image_list
from . import comfy_env

PREVIEW_MAX_SIDE = 512


def to_bgr_list(images: Any, name: str = "images") -> list[np.ndarray]:
    """Split an IMAGE batch `[B,H,W,C]` into BGR uint8 arrays (the engine's input).

    RGB batches are converted in one vectorised torch pass with the engine's rounding; RGBA
    and grayscale go through the engine's own rules (alpha composited on white).
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ImageLoadError(f"input '{name}' must be an IMAGE batch [B,H,W,C]; got {shape}")
    if images.shape[0] == 0:
        raise ImageLoadError(f"input '{name}' is an empty batch (0 images)")
    if images.shape[-1] != 3:
        return image_list(images)
    batch = images.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(batch).all()):
        raise ImageLoadError(f"input '{name}' contains NaN or infinite values")
    bgr = (batch.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).flip(-1)
    return list(bgr.numpy())


def to_image_batch(rgb_images: Sequence[np.ndarray]) -> torch.Tensor:
    """RGB uint8 arrays of one size -> IMAGE `[B,H,W,3]` float 0..1."""
    return torch.from_numpy(np.stack(rgb_images)).to(torch.float32).div_(255.0)


def save_previews(rgb_images: Sequence[np.ndarray], prefix: str) -> list[dict[str, str]]:
    """Downscaled PNG previews in ComfyUI's temp folder, as a node's `ui.images` entries."""
    folder = comfy_env.temp_directory()
    folder.mkdir(parents=True, exist_ok=True)
    run = uuid.uuid4().hex[:8]
    entries = []
    for i, rgb in enumerate(rgb_images):
        preview = Image.fromarray(rgb)
        preview.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE), Image.Resampling.BILINEAR)
        filename = f"{prefix}_{run}_{i:04d}.png"
        preview.save(folder / filename, compress_level=1)
        entries.append({"filename": filename, "subfolder": "", "type": "temp"})
    return entries
