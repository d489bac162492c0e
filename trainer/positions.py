"""The rotary positions of Qwen-Image's tokens, as diffusers or as ComfyUI numbers them.

diffusers' `QwenEmbedRope` (scale_rope) and ComfyUI 0.3.64's `comfy/ldm/qwen_image/model.py` give
the same positions when every image's token grid has even sides and no reference image is larger
than the output. They differ in two places:

- an odd side of n tokens (an output or reference side of 16 mod 32 px): diffusers centres it on
  -(n - n//2) .. n//2 - 1, ComfyUI on -(n//2) .. n - 1 - n//2, one further;
- the text: diffusers starts its positions after the largest image (max of h//2, w//2 over the
  output and every reference), ComfyUI after the output image only.

`use_positions(transformer, "comfyui")` swaps the transformer's position module for one that
numbers as ComfyUI does (the samples always do; training does when `--rope_positions comfyui`);
the frequencies themselves are diffusers' tables, looked up at other indices.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope
from diffusers.utils.torch_utils import lru_cache_unless_export

from ..training_contract.options import ROPE_POSITIONS

TABLE_SIZE = 4096  # QwenEmbedRope's pos_freqs / neg_freqs rows


class ComfyUIRope(QwenEmbedRope):
    """QwenEmbedRope with ComfyUI's image centring and text start (module docstring)."""

    def forward(self, video_fhw, device: torch.device | None = None, max_txt_seq_len=None):
        if max_txt_seq_len is None:
            raise ValueError("`max_txt_seq_len` must be provided.")
        shapes = video_fhw[0] if isinstance(video_fhw, list) else video_fhw  # one sample's shapes, as diffusers
        if not isinstance(shapes, list):
            shapes = [shapes]
        pos_freqs, _ = self._get_device_freqs(device) if device is not None else (self.pos_freqs, self.neg_freqs)
        _, out_height, out_width = shapes[0]
        text_start = max(out_height // 2, out_width // 2)
        text_freqs = pos_freqs[text_start : text_start + int(max_txt_seq_len)]
        return self._image_freqs(tuple(tuple(shape) for shape in shapes), device), text_freqs

    @lru_cache_unless_export(maxsize=128)
    def _image_freqs(self, shapes: tuple[tuple[int, int, int], ...], device: torch.device | None) -> torch.Tensor:
        """Every image's tokens, in order: frame index, then the centred row and column."""
        pos_freqs, neg_freqs = (
            self._get_device_freqs(device) if device is not None else (self.pos_freqs, self.neg_freqs)
        )
        signed = torch.cat([neg_freqs, pos_freqs], dim=0)  # row TABLE_SIZE + p is position p, negative or not
        frame_axis, height_axis, width_axis = signed.split([d // 2 for d in self.axes_dim], dim=1)
        image_freqs = []
        for index, (frames, height, width) in enumerate(shapes):
            rows = TABLE_SIZE + torch.arange(index, index + frames, device=signed.device)
            grid = (frames, height, width, -1)
            f = frame_axis[rows].view(frames, 1, 1, -1).expand(grid)
            h = height_axis[TABLE_SIZE + _centred(height, signed.device)].view(1, height, 1, -1).expand(grid)
            w = width_axis[TABLE_SIZE + _centred(width, signed.device)].view(1, 1, width, -1).expand(grid)
            image_freqs.append(torch.cat([f, h, w], dim=-1).reshape(frames * height * width, -1))
        return torch.cat(image_freqs, dim=0)


def _centred(n: int, device: torch.device) -> torch.Tensor:
    """ComfyUI's positions of n tokens along a side: 0 .. n-1 shifted down by n//2."""
    return torch.arange(n, device=device) - n // 2


def _rope_like(module: QwenEmbedRope, convention: str) -> QwenEmbedRope:
    cls = ComfyUIRope if convention == "comfyui" else QwenEmbedRope
    if type(module) is cls:
        return module
    return cls(theta=module.theta, axes_dim=list(module.axes_dim), scale_rope=module.scale_rope)


def _base(transformer: torch.nn.Module) -> torch.nn.Module:
    """The module that owns `pos_embed` (under peft's wrapper, when there is one)."""
    get_base = getattr(transformer, "get_base_model", None)
    return get_base() if callable(get_base) else transformer


def set_positions(transformer: torch.nn.Module, convention: str) -> None:
    """Number the transformer's tokens as `convention` does ("comfyui" or "diffusers") from now on.

    Only Qwen-Image's `QwenEmbedRope` (scale_rope) has the two conventions; another position module
    (the layered 3-D rope) is left alone.
    """
    if convention not in ROPE_POSITIONS:
        raise ValueError(f"rope positions must be one of {', '.join(ROPE_POSITIONS)}, got {convention!r}")
    base = _base(transformer)
    module = getattr(base, "pos_embed", None)
    if isinstance(module, QwenEmbedRope) and module.scale_rope:
        base.pos_embed = _rope_like(module, convention)


@contextmanager
def use_positions(transformer: torch.nn.Module, convention: str) -> Iterator[None]:
    """`set_positions` for the duration of a block, then the module it had before."""
    base = _base(transformer)
    before = getattr(base, "pos_embed", None)
    set_positions(transformer, convention)
    try:
        yield
    finally:
        if before is not None:
            base.pos_embed = before
