"""The training hook contract: what an addition to the training step (the face-identity loss,
`face/hook.py`) sees of each micro-step and may add to it.

The loop (`train.py`) calls, per hook: `on_cached` once after caching, before the DiT loads;
`saved_bytes_per_sample` for the memory plan; `extra_loss` every micro-step, whose loss is added
to the flow-matching loss before the backward pass; `on_samples` after each sampling round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ..musubi_formats.dataset import DatasetItem
from .sampling import EncodedSample, denormalize_latents
from .vae_decode import checkpointed_decode, rgb_over_white


@dataclass
class StepState:
    """What one micro-step computed; extra losses read it (tensors are on the training device).

    x0, noise, x_t, v_pred: [B, C, 1, h, w] normalised latents (as cached; C = 16, or 64 for 2.1); v_pred carries the
    gradient to the LoRA. t: [B] flow time in (0, 1) (sigma; the model saw timestep = t).
    items: each sample's DatasetItem (target path, control paths, cache key, bucket).
    velocity(latents, t): the model's velocity for other latents of the same samples (same prompt
    and controls), with gradients; what `x0_rollout` steps with.
    """

    step: int
    x0: torch.Tensor
    noise: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    v_pred: torch.Tensor
    vae: torch.nn.Module
    items: list[DatasetItem]
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def x0_hat(self) -> torch.Tensor:
        """The one-step estimate of the clean latents (sharp only at low t)."""
        return self.x_t - self.t.view(-1, 1, 1, 1, 1).to(self.v_pred.dtype) * self.v_pred

    def x0_rollout(self, steps: int) -> torch.Tensor:
        """The clean latents reached by `steps` equal Euler steps of the model from x_t at t to 0, with
        gradients through every step. The first step reuses v_pred, so `steps` = 1 is `x0_hat`."""
        t = self.t.view(-1, 1, 1, 1, 1).to(self.v_pred.dtype)
        latents, v = self.x_t, self.v_pred
        for i in range(steps):
            if i:
                if self.velocity is None:
                    raise ValueError("a rollout needs the step's velocity function")
                v = self.velocity(latents, (t * (1 - i / steps)).flatten())
            latents = latents - t / steps * v
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode normalised latents [B, C, 1, h, w] to pixels [B, 3, H, W] in [-1, 1], with gradients
        (each decoder stage checkpointed: `vae_decode.py`; Qwen-Image 2.1's RGBA composited over white)."""
        dtype: torch.dtype = self.vae.dtype  # type: ignore[assignment]  # diffusers' ModelMixin.dtype
        return rgb_over_white(checkpointed_decode(self.vae, denormalize_latents(self.vae, latents.to(dtype)))[:, :, 0])


@dataclass
class ExtraLoss:
    loss: torch.Tensor | None = None  # added to the flow-matching loss (already weighted)
    metrics: dict[str, float] = field(default_factory=dict)  # logged to metrics.jsonl and status


class TrainingHook:
    """Base class for additions to the training step; every method defaults to doing nothing."""

    def on_cached(
        self, items: list[DatasetItem], accelerator: Accelerator, should_stop: Callable[[], bool]
    ) -> dict[str, Any]:
        """After caching; return values are merged into status.json. Long work here returns
        early once `should_stop()` (a stop was requested); the run then ends `stopped`."""
        return {}

    def extra_loss(self, state: StepState) -> ExtraLoss:
        return ExtraLoss()

    def saved_bytes_per_sample(self) -> int:
        """What `extra_loss` keeps for the backward pass per sample beyond the decode (for the memory plan)."""
        return 0

    def on_samples(self, step: int, paths: list[Path], samples: list[EncodedSample]) -> dict[str, float]:
        """After a sampling round; returned metrics go to metrics.jsonl and status.json."""
        return {}
