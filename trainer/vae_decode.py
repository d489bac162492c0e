"""VAE decoding of one-frame latents with gradients, checkpointed stage by stage (`torch.utils.checkpoint`).

The face loss decodes x0 estimates with gradients. Decoded plainly, the Qwen VAE decoder keeps every
stage's activations for the backward pass (about 1.5 GiB fp32 at 256², growing 4x per doubling of the
side). Checkpointed per stage, only each stage's input is kept and the backward pass recomputes one
stage at a time, so the decode's memory is the stage boundaries plus the largest single stage.

A single frame needs none of the decoder's causal time cache (its convolutions see zero padding in
time either way, and the 3-D upsamplers skip their time convolution on the first frame), so each
stage is called without it; `checkpointed_decode` equals `vae.decode` (checked by the tests).

Qwen-Image 2.1's VAE (`AutoencoderKLQwenImage21`) has 2-D convolutions and up blocks whose
upsampled shortcut spans the block: each of its up blocks is one stage, called as the first
(and only) chunk, as its `_decode` calls it for a single frame. It decodes RGBA: `rgb_over_white`
gives the RGB image the face engine and the samples use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def vae_scale(config: Mapping[str, Any]) -> int:
    """Pixels per latent along a side: each `temperal_downsample` entry is one 2x spatial downsampling
    (8 for Qwen-Image's VAE; diffusers' Qwen pipelines compute their `vae_scale_factor` the same way)."""
    return 2 ** len(config["temperal_downsample"])


def decoder_stages(vae: nn.Module) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The decoder of `AutoencoderKLQwenImage` (or Qwen-Image 2.1's `AutoencoderKLQwenImage21`) as a chain
    of single-frame stages. A 2.1 up block is one stage, its shortcut spanning it, called as the first
    chunk (`vae.decode`'s one frame: the time-doubling shortcut keeps its last frame)."""
    decoder = vae.get_submodule("decoder")
    norm_out, nonlinearity, conv_out = (
        decoder.get_submodule(name) for name in ("norm_out", "nonlinearity", "conv_out")
    )

    def head(x: torch.Tensor) -> torch.Tensor:
        return conv_out(nonlinearity(norm_out(x)))

    stages: list[Callable[[torch.Tensor], torch.Tensor]] = [
        vae.get_submodule("post_quant_conv"),
        decoder.get_submodule("conv_in"),
        decoder.get_submodule("mid_block"),
    ]
    for up_block in decoder.get_submodule("up_blocks").children():
        if hasattr(up_block, "upsampler"):
            stages.append(functools.partial(up_block, first_chunk=True))  # Qwen-Image 2.1's residual up block
            continue
        stages += list(up_block.get_submodule("resnets").children())
        upsamplers = getattr(up_block, "upsamplers", None)  # None in the last block
        stages += list(upsamplers.children()) if upsamplers is not None else []
    return [*stages, head]


def checkpointed_decode(vae: nn.Module, latents: torch.Tensor, *, use_checkpoint: bool = True) -> torch.Tensor:
    """Decode raw (denormalised) latents [B, C, 1, h, w] to pixels [B, 3 (2.1: 4), 1, H, W] in [-1, 1].

    With gradients enabled and `use_checkpoint`, every stage is checkpointed; without gradients it
    is a plain forward pass.
    """
    if latents.ndim != 5 or latents.shape[2] != 1:
        raise ValueError(f"checkpointed_decode takes one-frame latents [B, C, 1, h, w], got {tuple(latents.shape)}")
    x = latents
    for stage in decoder_stages(vae):
        x = checkpoint(stage, x, use_reentrant=False) if use_checkpoint and torch.is_grad_enabled() else stage(x)
    return x.clamp(-1.0, 1.0)


def rgb_over_white(pixels: torch.Tensor) -> torch.Tensor:
    """RGB pixels [B, 3, ...] in [-1, 1] of a decode: an RGBA one (Qwen-Image 2.1's) composited over white."""
    if pixels.shape[1] != 4:
        return pixels
    alpha = (pixels[:, 3:] + 1) / 2
    return pixels[:, :3] * alpha + (1 - alpha)
