"""One micro-step of flow-matching training, on one page: noise, timestep, target, loss, the hooks' extra loss.

As musubi-tuner trains Qwen-Image-Edit (its `qwen_image_train_network.py`, with diffusers'
`QwenImageEditPlusPipeline` for the packing and the image shapes):

    x0 (target latents), eps ~ N(0, 1), t ~ timestep sampling
    x_t = (1 - t) x0 + t eps                     target velocity  eps - x0
    tokens = pack(x_t) ++ pack(control latents)  img_shapes = [(1, h/2, w/2), (1, hc/2, wc/2), ...]
    v_pred = transformer(tokens, t, prompt)[:, :target tokens] -> unpacked to [B, 16, 1, h, w]
    loss = mean(weighting(t) * (v_pred - (eps - x0))^2) + extra losses from hooks

Qwen-Image 2.1 (a batch whose cache holds `image_pad_mask`) differs only in the model call
(`qwen_image21.py`: latents [B, 64, 1, h, w] unpatched, condition tokens first, the target's slots after
the prompt's) and its token count (one per latent); the path, target, loss and `qwen_shift` are the same.

The hooks (`hooks.py`; the face identity, `face/hook.py`) see the step's `StepState`: x_t, t, v_pred
(with gradient), the VAE and each sample's DatasetItem, so `x0_hat = x_t - t v_pred` can be decoded
and scored with gradients. `train.py`'s loop calls `micro_step` once per micro-batch; the face-loss
tests and benchmarks call it directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from accelerate import Accelerator
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift
from diffusers.training_utils import compute_loss_weighting_for_sd3

from ..musubi_formats.dataset import DatasetConfigError, DatasetItem
from . import qwen_image21
from .cache import load_cached_item
from .hooks import ExtraLoss, StepState, TrainingHook
from .sampling import pack, unpack

# Qwen-Image's scheduler config (2509/2511 and 2.1 publish the same), used by `qwen_shift` to pick the shift
# from the image size.
QWEN_BASE_SEQ_LEN, QWEN_MAX_SEQ_LEN, QWEN_BASE_SHIFT, QWEN_MAX_SHIFT = 256, 8192, 0.5, 0.9


class FlowSettings(Protocol):
    """The flags the step reads (`TrainingConfig` has them; a benchmark may pass just these)."""

    @property
    def timestep_sampling(self) -> str: ...
    @property
    def discrete_flow_shift(self) -> float: ...
    @property
    def sigmoid_scale(self) -> float: ...
    @property
    def weighting_scheme(self) -> str: ...


@dataclass
class Batch:
    items: list[DatasetItem]
    x0: torch.Tensor  # [B, C, 1, h, w]: C = 16 (Edit), 64 (2.1)
    controls: list[torch.Tensor]  # each [B, C, 1, hc, wc]
    prompt_embeds: torch.Tensor  # [B, L, D]
    prompt_mask: torch.Tensor  # [B, L]
    image_pad_mask: torch.Tensor | None = None  # [B, L] bool, Qwen-Image 2.1: the controls' vision slots

    @property
    def target_tokens(self) -> int:
        """Tokens of one target image: 2x2 latents each for Qwen-Image-Edit, one per latent for 2.1."""
        h, w = self.x0.shape[-2:]
        return h * w if self.image_pad_mask is not None else (h // 2) * (w // 2)


def collate(items: list[DatasetItem]) -> Batch:
    """The cached latents, control latents and prompt embeddings of `items` (one bucket), as a batch."""
    cached = [load_cached_item(item) for item in items]
    x0 = torch.stack([c["latents"] for c in cached])
    n_controls = len(items[0].controls)
    controls = [torch.stack([c[f"control_latents_{k}"] for c in cached]) for k in range(n_controls)]
    embeds = [c["prompt_embeds"] for c in cached]
    length = max(e.shape[0] for e in embeds)
    prompt = torch.zeros(len(embeds), length, embeds[0].shape[1])
    mask = torch.zeros(len(embeds), length, dtype=torch.long)
    for i, e in enumerate(embeds):
        prompt[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = 1
    pad_mask = None
    if "image_pad_mask" in cached[0]:
        pad_mask = torch.zeros(len(embeds), length, dtype=torch.bool)
        for i, c in enumerate(cached):
            pad_mask[i, : c["image_pad_mask"].shape[0]] = c["image_pad_mask"]
        if not bool((pad_mask == pad_mask[0]).all()):  # the 2.1 transformer reads one layout per batch
            raise DatasetConfigError(
                f"{items[0].target} and the items batched with it place their control images at different "
                "prompt positions (Qwen-Image 2.1 needs one layout per batch): use batch_size 1"
            )
    return Batch(items, x0, controls, prompt, mask, pad_mask)


def micro_step(
    flow: FlowSettings,
    transformer: torch.nn.Module,
    vae: torch.nn.Module,
    batch: Batch,
    generator: torch.Generator,
    device: torch.device,
    accelerator: Accelerator,
    step: int,
    hooks: Sequence[TrainingHook],
) -> tuple[torch.Tensor, ExtraLoss]:
    """One micro-batch's flow-matching loss and the hooks' extra loss (both before the backward pass)."""
    # the clean latents and the noise (drawn on the CPU generator: the same numbers on any device)
    x0 = batch.x0.to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    # a flow time per sample, as --timestep_sampling draws it
    t = sample_timesteps(flow, x0.shape[0], batch.target_tokens, generator).to(device)
    # the point at t on the straight path from the latents (t = 0) to the noise (t = 1)
    t_5d = t.view(-1, 1, 1, 1, 1)
    x_t = (1 - t_5d) * x0 + t_5d * noise
    # the model's velocity there, with the batch's prompt and control images
    velocity = batch_velocity(transformer, accelerator, batch, device)
    v_pred = velocity(x_t, t)
    # the loss: the squared error against the path's velocity, noise - x0, weighted by t (--weighting_scheme)
    target = noise - x0
    weighting = compute_loss_weighting_for_sd3(flow.weighting_scheme, t_5d)
    loss = (weighting * (v_pred - target) ** 2).mean()
    # the hooks' extra loss (the face identity), from what this step computed
    extra = ExtraLoss()
    if hooks:
        state = StepState(step, x0, noise, x_t, t, v_pred, vae, batch.items, velocity)
        for hook in hooks:
            part = hook.extra_loss(state)
            extra.metrics.update(part.metrics)
            if part.loss is not None:
                extra.loss = part.loss if extra.loss is None else extra.loss + part.loss
    return loss, extra


def sample_timesteps(
    flow: FlowSettings, batch_size: int, num_target_tokens: int, generator: torch.Generator
) -> torch.Tensor:
    """Flow time t in (0, 1) per sample, as musubi's --timestep_sampling."""
    method = flow.timestep_sampling
    if method == "uniform":
        return torch.rand(batch_size, generator=generator)
    if method == "sigma":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=flow.discrete_flow_shift)
        sigmas: torch.Tensor = scheduler.sigmas  # set by diffusers' config decorator
        index = torch.randint(0, len(sigmas) - 1, (batch_size,), generator=generator)
        return sigmas[index].float()
    t = torch.sigmoid(flow.sigmoid_scale * torch.randn(batch_size, generator=generator))
    shift = flow_shift(flow, num_target_tokens)
    return t * shift / (1 + (shift - 1) * t)


def flow_shift(flow: FlowSettings, num_target_tokens: int) -> float:
    """The shift of `shift` sampling: fixed, or for `qwen_shift` the one the pipeline samples this many
    target tokens with."""
    if flow.timestep_sampling == "qwen_shift":
        return math.exp(
            calculate_shift(num_target_tokens, QWEN_BASE_SEQ_LEN, QWEN_MAX_SEQ_LEN, QWEN_BASE_SHIFT, QWEN_MAX_SHIFT)
        )
    return float(flow.discrete_flow_shift)


def batch_velocity(
    transformer: torch.nn.Module, accelerator: Accelerator, batch: Batch, device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model's velocity with `batch`'s prompt and controls: (latents [B, C, 1, h, w], t [B]) -> v, as latents."""
    controls = [c.to(device) for c in batch.controls]
    prompt_embeds = batch.prompt_embeds.to(device)
    prompt_mask = attention_mask(batch.prompt_mask.to(device))
    if batch.image_pad_mask is not None:
        pad_mask = batch.image_pad_mask.to(device)

        def velocity_21(latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            with accelerator.autocast():
                prediction = qwen_image21.velocity(
                    transformer, latents, timestep, controls, prompt_embeds, prompt_mask, pad_mask
                )
            return prediction.float()

        return velocity_21

    def velocity(latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        h, w = latents.shape[3], latents.shape[4]
        img_shapes = [
            [(1, h // 2, w // 2), *[(1, c.shape[3] // 2, c.shape[4] // 2) for c in controls]]
        ] * latents.shape[0]
        tokens = torch.cat([pack(latents), *[pack(c) for c in controls]], dim=1)
        with accelerator.autocast():
            prediction = transformer(
                hidden_states=tokens,
                timestep=timestep,
                encoder_hidden_states=prompt_embeds,
                encoder_hidden_states_mask=prompt_mask,
                img_shapes=img_shapes,
                return_dict=False,
            )[0]
        return unpack(prediction[:, : (h // 2) * (w // 2)].float(), h, w)

    return velocity


def attention_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """The prompt mask, or None when it is all ones: PyTorch's fastest attention kernels refuse a mask."""
    return None if bool(mask.all()) else mask
