"""IMAGE tensors <-> the BGR/RGB uint8 arrays the face library works on, and node previews."""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch

from ..faceid import ImageLoadError, image_list
from ..faceid.images import check_float_range
from . import comfy_env

PREVIEW_MAX_SIDE = 384


def to_bgr_list(images: Any, name: str = "images") -> list[np.ndarray]:
    """Split an IMAGE batch `[B,H,W,C]` into BGR uint8 arrays (the engine's input).

    RGB images are converted one at a time in numpy with the engine's rounding (a batch-wide
    torch pass is slower and needs several batch-sized temporaries); RGBA and grayscale go
    through the engine's own rules (alpha composited on white).
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ImageLoadError(f"input '{name}' must be an IMAGE batch [B,H,W,C]; got {shape}")
    if images.shape[0] == 0:
        raise ImageLoadError(f"input '{name}' is an empty batch (0 images)")
    if images.shape[1] < 1 or images.shape[2] < 1:
        raise ImageLoadError(
            f"input '{name}' holds images of {images.shape[2]}x{images.shape[1]} pixels (width x height): "
            "nothing to score; check the node that makes them (a crop or resize to 0)"
        )
    if images.shape[-1] != 3:
        try:
            return image_list(images)
        except ImageLoadError as exc:
            raise ImageLoadError(f"input '{name}': {exc}") from None
    batch = images.detach().to("cpu", torch.float32).numpy()
    bgrs = []
    for i, rgb in enumerate(batch):
        # max propagates NaN and +inf, min -inf: two passes that also tell whether clipping is needed
        low, peak = float(rgb.min()), float(rgb.max())
        if not (math.isfinite(low) and math.isfinite(peak)):
            raise ImageLoadError(f"input '{name}' image {i} contains NaN or infinite values")
        check_float_range(peak, f"input '{name}' image {i}")
        scaled = np.multiply(rgb, 255.0, dtype=np.float32)
        np.add(scaled, 0.5, out=scaled)
        if low < 0.0 or peak > 1.0:
            np.clip(scaled, 0.0, 255.0, out=scaled)
        bgrs.append(cv2.cvtColor(scaled.astype(np.uint8), cv2.COLOR_RGB2BGR))
    return bgrs


def to_image_batch(bgr_images: Sequence[np.ndarray]) -> torch.Tensor:
    """BGR uint8 arrays of one size -> IMAGE `[B,H,W,3]` RGB float 0..1."""
    batch = np.empty((len(bgr_images), *bgr_images[0].shape), dtype=np.float32)
    for bgr, out in zip(bgr_images, batch):
        # cvtColor reads contiguously (~2x faster than bgr[..., ::-1]); one multiply casts and scales into the
        # batch (the same float32 product as casting first, without a second pass over the float image)
        np.multiply(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), np.float32(1.0 / 255.0), out=out)
    return torch.from_numpy(batch)


def rgb_to_image(rgb: np.ndarray) -> torch.Tensor:
    """One (H, W, 3) uint8 RGB array (a rendered plot, a sample grid) -> IMAGE `[1,H,W,3]` float 0..1."""
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).unsqueeze(0)


def save_previews(bgr_images: Sequence[np.ndarray], prefix: str) -> list[dict[str, str]]:
    """Downscaled JPEG previews in ComfyUI's temp folder, as a node's `ui.images` entries.

    JPEG, by an integer factor: a PNG of the same preview costs about 50x more to encode, which
    would be a visible share of a scoring run. The image is cut to a multiple of the factor first (at
    most factor - 1 pixels of its right and bottom edges), which puts OpenCV's area resize on its
    integer path: about 5x faster than the general one for a 1024x1024 image.
    """
    folder = comfy_env.temp_directory()
    folder.mkdir(parents=True, exist_ok=True)
    run = uuid.uuid4().hex[:8]
    entries = []
    for i, bgr in enumerate(bgr_images):
        factor = math.ceil(max(bgr.shape[:2]) / PREVIEW_MAX_SIDE)
        # at least a pixel a side: a 1x6000 strip stays one pixel wide
        size = (max(1, bgr.shape[1] // factor), max(1, bgr.shape[0] // factor))
        whole = bgr[: size[1] * factor, : size[0] * factor]
        preview = bgr if factor == 1 else cv2.resize(whole, size, interpolation=cv2.INTER_AREA)
        encoded, jpeg = cv2.imencode(".jpg", preview, [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not encoded:
            raise RuntimeError(f"OpenCV could not encode preview {i} ({preview.shape})")
        filename = f"{prefix}_{run}_{i:04d}.jpg"
        (folder / filename).write_bytes(jpeg.tobytes())
        entries.append({"filename": filename, "subfolder": "", "type": "temp"})
    return entries
