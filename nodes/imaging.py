"""IMAGE tensors <-> the BGR/RGB uint8 arrays the face library works on, and node previews."""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from typing import Any, NoReturn

import cv2
import numpy as np
import torch

from ..faceid import ImageLoadError, image_list
from ..faceid.drawing import Region
from ..faceid.images import FLOAT_RANGE_LIMIT, check_float_range
from . import comfy_env

PREVIEW_MAX_SIDE = 384


# Conversion works through blocks of rows of about this many bytes of float pixels: each block is read
# from memory once and its temporaries stay in the core's cache (a whole-image temporary is as large
# as the image and made the conversion twice as slow).
CONVERSION_BLOCK_BYTES = 384 * 1024
SCALE_TO_UNIT = np.float32(1.0 / 255.0)


def to_bgr_list(images: Any, name: str = "images") -> list[np.ndarray]:
    """Split an IMAGE batch `[B,H,W,C]` into BGR uint8 arrays (the engine's input).

    RGB images are converted in numpy with the engine's rounding, a block of rows at a time; RGBA
    and grayscale go through the engine's own rules (alpha composited on white).
    """
    return _convert(images, name, None)


def to_bgr_list_and_batch(images: Any, name: str = "images") -> tuple[list[np.ndarray], torch.Tensor]:
    """`to_bgr_list`, and the IMAGE batch of the same 8-bit pixels (`to_image_batch` of the arrays),
    made in the same pass over the input: a node that draws on the arrays outputs this batch with the
    drawn regions copied in (`copy_regions`) instead of converting whole images back to float."""
    batch = _checked_batch(images, name)
    if batch.shape[-1] != 3:
        bgrs = _convert(batch, name, None)
        return bgrs, to_image_batch(bgrs)
    floats = np.empty(tuple(batch.shape), dtype=np.float32)
    return _convert(batch, name, floats), torch.from_numpy(floats)


def _checked_batch(images: Any, name: str) -> torch.Tensor:
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
    return images


def _convert(images: Any, name: str, floats: np.ndarray | None) -> list[np.ndarray]:
    """BGR uint8 arrays of the batch; with `floats` (the batch's shape), also their RGB float 0..1 values."""
    images = _checked_batch(images, name)
    if images.shape[-1] != 3:
        try:
            return image_list(images)
        except ImageLoadError as exc:
            raise ImageLoadError(f"input '{name}': {exc}") from None
    batch = images.detach().to("cpu", torch.float32).numpy()
    height, width = batch.shape[1:3]
    rows = max(1, CONVERSION_BLOCK_BYTES // (width * 3 * 4))
    scaled = np.empty((min(rows, height), width, 3), dtype=np.float32)
    rgb = np.empty((min(rows, height), width, 3), dtype=np.uint8)
    bgrs = []
    for i, image in enumerate(batch):
        bgr = np.empty((height, width, 3), dtype=np.uint8)
        for start in range(0, height, rows):
            block = image[start : start + rows]
            # max propagates NaN and +inf, min -inf: two passes that also tell whether clipping is needed
            low, peak = float(block.min()), float(block.max())
            if not (math.isfinite(low) and math.isfinite(peak)) or peak > FLOAT_RANGE_LIMIT:
                _refuse(image, f"input '{name}' image {i}")
            values, out = scaled[: len(block)], rgb[: len(block)]
            np.multiply(block, 255.0, out=values)
            if low < 0.0 or peak > 1.0:
                np.add(values, 0.5, out=values)
                np.clip(values, 0.0, 255.0, out=out, casting="unsafe")  # the cast truncates: rounds half up
            else:
                np.add(values, 0.5, out=out, casting="unsafe")
            if floats is not None:
                np.multiply(out, SCALE_TO_UNIT, out=floats[i, start : start + rows])
            cv2.cvtColor(out, cv2.COLOR_RGB2BGR, dst=bgr[start : start + rows])
        bgrs.append(bgr)
    return bgrs


def _refuse(image: np.ndarray, what: str) -> NoReturn:
    """Raise ImageLoadError for an image with NaN, infinite or 0..255 values, with its whole-image figures."""
    low, peak = float(image.min()), float(image.max())
    if not (math.isfinite(low) and math.isfinite(peak)):
        raise ImageLoadError(f"{what} contains NaN or infinite values")
    check_float_range(peak, what)
    raise AssertionError(f"{what} was refused for values it does not hold")


def copy_regions(image: torch.Tensor, bgr: np.ndarray, regions: Sequence[Region]) -> None:
    """Copy `regions` of a BGR uint8 array into its IMAGE `[H,W,3]` (from `to_bgr_list_and_batch`):
    where it was drawn on, the image then holds what `to_image_batch` would give."""
    floats = image.numpy()
    height, width = bgr.shape[:2]
    for x1, y1, x2, y2 in regions:
        x1, y1, x2, y2 = max(0, x1), max(0, y1), min(width, x2), min(height, y2)
        if x1 < x2 and y1 < y2:
            rgb = cv2.cvtColor(bgr[y1:y2, x1:x2], cv2.COLOR_BGR2RGB)
            np.multiply(rgb, SCALE_TO_UNIT, out=floats[y1:y2, x1:x2])


def to_image_batch(bgr_images: Sequence[np.ndarray]) -> torch.Tensor:
    """BGR uint8 arrays of one size -> IMAGE `[B,H,W,3]` RGB float 0..1."""
    batch = np.empty((len(bgr_images), *bgr_images[0].shape), dtype=np.float32)
    for bgr, out in zip(bgr_images, batch):
        # cvtColor reads contiguously (~2x faster than bgr[..., ::-1]); one multiply casts and scales into the
        # batch (the same float32 product as casting first, without a second pass over the float image)
        np.multiply(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), SCALE_TO_UNIT, out=out)
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
