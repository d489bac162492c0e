"""What the node tests feed the scoring nodes: real photos as ComfyUI IMAGE tensors, and the Face
Similarity Score's default inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

SCORE_DEFAULTS = dict(
    face_selection="largest",
    face_index=0,
    no_face_policy="score_zero",
    threshold=0.7,
    band_excellent=0.85,
    band_good=0.75,
    band_moderate=0.65,
    copy_paste_threshold=0.1,
)


def photo(faces_dir: Path, name: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A real photo as a ComfyUI IMAGE `[1,H,W,3]` (optionally letterboxed to (w, h))."""
    with Image.open(faces_dir / name) as img:
        img = img.convert("RGB")
        if size is not None:
            img = ImageOps.pad(img, size, Image.Resampling.BICUBIC, color=(128, 128, 128))
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def group_photo() -> torch.Tensor:
    from insightface.data import get_image

    bgr = get_image("t1")  # OpenCV order: BGR
    return torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1]).astype(np.float32) / 255.0)[None]
