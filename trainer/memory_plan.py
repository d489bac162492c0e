"""An estimate of peak GPU memory by part, printed before training and written to status.json.

Parameter counts come from the real architecture built on the meta device (no memory); activation
sizes come from formulas in saved elements per token or per pixel, counted with
`torch.autograd.graph.saved_tensors_hooks` on the real-width modules (tests/trainer/test_memory_plan.py
checks them against measured bytes, within 20%):

- a transformer block saves about `BLOCK_SAVED_PER_TOKEN` (18) x dim values per token (image,
  control and text tokens alike; PyTorch's SDPA without a mask keeps no tokens² matrix); with
  gradient checkpointing each block keeps only its input (1 x dim per token) and the backward
  pass recomputes one block at a time;
- the VAE decoder's stages save, per value of their input (or output), the coefficients in
  `_stage_saved`; checkpointed (`vae_decode.py`) it keeps the stage inputs, plus one stage's
  activations while that stage is recomputed;
- the face recognizer's saved bytes per sample are measured on the loaded recognizer (one
  112x112 forward at plan time: its architecture varies by pack, and it is cheap to run).

Not counted: the backward pass's transient gradient buffers, attention workspaces and the CUDA
context; `OVERHEAD_BYTES` stands for them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

from .lora import NetworkArgs, lora_target_modules
from .vae_decode import decoder_stages, vae_scale

GIB = 1024**3
BLOCK_SAVED_PER_TOKEN = 18  # x dim values per token per transformer block, without checkpointing
OVERHEAD_BYTES = 1 * GIB  # CUDA context, gradient buffers in flight, allocator slack (an assumption)
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "adafactor": 0}  # per LoRA parameter
FACE_BOX_FRACTION = 0.5  # `face` decode: the box is taken as half the target's shorter side


@dataclass(frozen=True)
class MemoryInputs:
    """What the estimate depends on (from the flags, the dataset's buckets and the cached prompts)."""

    transformer_config: dict[str, Any]
    vae_config: dict[str, Any]
    compute_bytes: int  # 2 for bf16/fp16, 4 for fp32
    fp8_base: bool
    blocks_to_swap: int
    gradient_checkpointing: bool
    batch_size: int
    target_size: tuple[int, int]  # (width, height) of the largest bucket
    control_sizes: tuple[tuple[int, int], ...]
    text_tokens: int
    network_dim: int
    network_args: NetworkArgs
    optimizer: str
    face_decode: str | None  # None: no face loss
    face_recognizer_saved_bytes: int = 0  # per sample, what the loss's recognizer keeps for backward
    face_rollout_steps: int = 1  # DiT forward passes kept for the backward pass (--face_loss_rollout_steps)


@dataclass(frozen=True)
class MemoryPlan:
    parts: dict[str, int]  # bytes on the GPU by part
    swapped_bytes: int  # base weights kept in CPU memory by --blocks_to_swap
    device_bytes: int | None

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def as_status(self) -> dict[str, Any]:
        return {
            "parts_gib": {k: round(v / GIB, 2) for k, v in self.parts.items()},
            "total_gib": round(self.total / GIB, 2),
            "swapped_to_cpu_gib": round(self.swapped_bytes / GIB, 2),
            "device_gib": round(self.device_bytes / GIB, 2) if self.device_bytes else None,
        }

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in self.parts.items())
        device = f" of the device's {self.device_bytes / GIB:.1f} GiB" if self.device_bytes else ""
        return (
            f"memory plan: about {self.total / GIB:.1f} GiB{device} at peak ({parts} GiB); "
            f"{self.swapped_bytes / GIB:.1f} GiB of base weights swapped to CPU memory"
        )


def measure_saved_bytes(fn: Callable[[], Any], frozen: Iterable[torch.nn.Module] = ()) -> tuple[int, Any]:
    """Bytes of the tensors autograd saves for backward while `fn()` runs (each storage once, the
    parameters of `frozen` excluded), and fn's result. What the formulas here are checked against."""
    weights = {p.untyped_storage().data_ptr() for module in frozen for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in weights:
            storages[pointer] = max(storages.get(pointer, 0), tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(storages.values()), result


def image_tokens(size: tuple[int, int], scale: int = 8) -> int:
    """DiT tokens of an image of `size` (w, h) pixels: a VAE of `scale` pixels per latent (8: Qwen-Image's),
    then 2x2 patches."""
    return (size[0] // (2 * scale)) * (size[1] // (2 * scale))


def _dit_counts(config: dict[str, Any], network_args: NetworkArgs) -> dict[str, int]:
    return _dit_counts_of(json.dumps(config, sort_keys=True), network_args)


@functools.lru_cache(maxsize=8)
def _dit_counts_of(config_json: str, network_args: NetworkArgs) -> dict[str, int]:
    with init_empty_weights():
        model: torch.nn.Module = QwenImageTransformer2DModel(**json.loads(config_json))
    blocks: torch.nn.ModuleList = model.transformer_blocks  # type: ignore[assignment]
    block = blocks[0]
    linear = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
    leaf = max(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    modules = dict(model.named_modules())
    lora_width = sum(modules[t].in_features + modules[t].out_features for t in lora_target_modules(model, network_args))
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "linear": linear,
        "block": sum(p.numel() for p in block.parameters()),
        "blocks": len(blocks),
        "largest_leaf": leaf,
        "lora_width": lora_width,
        "dim": model.inner_dim,
    }


def _stage_saved(stage: Callable[[torch.Tensor], torch.Tensor], inputs: int, outputs: int) -> float:
    """Values a decoder stage saves for backward, from its input and output sizes (counted on the real VAE)."""
    name = type(stage).__name__
    if name == "QwenImageCausalConv3d":
        return inputs * (1 if getattr(stage, "kernel_size", None) == (1, 1, 1) else 3)
    if name == "QwenImageMidBlock":
        return 30 * inputs
    if name == "QwenImageResidualBlock":
        return 4.5 * inputs + 5.5 * outputs
    if name == "QwenImageResample":
        return 4 * inputs
    return 5 * inputs  # the head: norm, activation, conv_out


@functools.lru_cache(maxsize=2)
def _empty_vae(config_json: str) -> torch.nn.Module:
    with init_empty_weights():
        return AutoencoderKLQwenImage(**json.loads(config_json))  # an nn.Module


@dataclass(frozen=True)
class DecoderSaved:
    """Values the VAE decoder saves for backward, for one decode."""

    boundaries: float  # the stage inputs: all that checkpointed stages keep through the forward pass
    largest_stage: float  # the most any one stage saves (held while it is recomputed)
    total: float  # everything, without checkpointing

    def after_forward(self, checkpointed: bool) -> float:
        """What is kept once the forward pass is done (what `measure_saved_bytes` counts)."""
        return self.boundaries if checkpointed else self.total

    def peak(self, checkpointed: bool, alongside: float = 0.0) -> float:
        """The most held at once, with `alongside` values saved after the decode (the recognizer's):
        the backward pass frees those before it recomputes the decoder's stages."""
        if checkpointed:
            return self.boundaries + max(self.largest_stage, alongside)
        return self.total + alongside


def decoder_saved_values(vae_config: dict[str, Any], latent_size: tuple[int, int]) -> DecoderSaved:
    """What the real-size VAE decoder keeps for the backward pass of one decode of `latent_size` (w, h)."""
    vae = _empty_vae(json.dumps(vae_config, sort_keys=True))
    x = torch.empty(1, vae_config.get("z_dim", 16), 1, latent_size[1], latent_size[0], device="meta")
    boundaries, largest, total = 0.0, 0.0, 0.0
    with torch.no_grad():
        for stage in decoder_stages(vae):
            y = stage(x)
            saved = _stage_saved(stage, x.numel(), y.numel())
            boundaries += x.numel()
            largest = max(largest, saved)
            total += saved
            x = y
    return DecoderSaved(boundaries, largest, total)


def decode_size(inputs: MemoryInputs) -> tuple[int, int]:
    """(width, height) in pixels the face term decodes per sample."""
    width, height = inputs.target_size
    if inputs.face_decode == "half":
        return width // 2, height // 2
    if inputs.face_decode == "face":
        scale = vae_scale(inputs.vae_config)
        side = max(scale, int(min(width, height) * FACE_BOX_FRACTION) // scale * scale)
        return side, side
    return width, height


def estimate(inputs: MemoryInputs, device_bytes: int | None = None) -> MemoryPlan:
    counts = _dit_counts(inputs.transformer_config, inputs.network_args)
    dim, blocks = counts["dim"], counts["blocks"]
    base_linear = 1 if inputs.fp8_base else inputs.compute_bytes
    block_bytes = counts["block"] * base_linear  # a block's params are nearly all Linear weights
    dit_bytes = counts["linear"] * base_linear + (counts["total"] - counts["linear"]) * inputs.compute_bytes
    swapped = inputs.blocks_to_swap * block_bytes
    # swapped blocks stream in leaf by leaf: the one computing and the one in flight
    streaming = 2 * counts["largest_leaf"] * inputs.compute_bytes if inputs.blocks_to_swap else 0
    lora_params = inputs.network_dim * counts["lora_width"]
    scale = vae_scale(inputs.vae_config)
    tokens = inputs.batch_size * (
        image_tokens(inputs.target_size, scale)
        + sum(image_tokens(c, scale) for c in inputs.control_sizes)
        + inputs.text_tokens
    )
    per_block = BLOCK_SAVED_PER_TOKEN * tokens * dim * inputs.compute_bytes
    # each forward pass of a face-loss rollout keeps its activations for the backward pass too
    if inputs.gradient_checkpointing:
        activations = inputs.face_rollout_steps * blocks * tokens * dim * inputs.compute_bytes + per_block
    else:
        activations = inputs.face_rollout_steps * blocks * per_block
    parts = {
        "dit_weights": dit_bytes - swapped + streaming,
        "vae_weights": sum(p.numel() for p in _empty_vae(json.dumps(inputs.vae_config, sort_keys=True)).parameters())
        * inputs.compute_bytes,
        "lora_and_grads": lora_params * 8,
        "optimizer_state": lora_params * OPTIMIZER_STATE_BYTES.get(inputs.optimizer.lower(), 8),
        "activations": activations,
        "face_loss": 0,
        "overhead": OVERHEAD_BYTES,
    }
    if inputs.face_decode:
        width, height = decode_size(inputs)
        recognizer = inputs.face_recognizer_saved_bytes / inputs.compute_bytes
        values = decoder_saved_values(inputs.vae_config, (width // scale, height // scale)).peak(True, recognizer)
        parts["face_loss"] = int(inputs.batch_size * values * inputs.compute_bytes)
    return MemoryPlan({k: int(v) for k, v in parts.items()}, int(swapped), device_bytes)


def recommend(inputs: MemoryInputs, device_bytes: int) -> tuple[list[str], MemoryPlan]:
    """Flags that bring the estimate under `device_bytes`, cheapest in speed first, and the plan with them."""
    flags: list[str] = []
    current = inputs
    plan = estimate(current, device_bytes)
    steps: list[tuple[str, Callable[[MemoryInputs], MemoryInputs]]] = []
    if not inputs.gradient_checkpointing:
        steps.append(("--gradient_checkpointing", lambda i: replace(i, gradient_checkpointing=True)))
    if inputs.face_decode in ("full", "half"):
        steps.append(("--face_decode face", lambda i: replace(i, face_decode="face")))
    if not inputs.fp8_base:
        steps.append(("--fp8_base", lambda i: replace(i, fp8_base=True)))
    if inputs.optimizer.lower() == "adamw":
        steps.append(("--optimizer_type AdamW8bit", lambda i: replace(i, optimizer="AdamW8bit")))
    for flag, change in steps:
        if plan.total <= device_bytes:
            break
        current = change(current)
        plan = estimate(current, device_bytes)
        flags.append(flag)
    blocks = _dit_counts(inputs.transformer_config, inputs.network_args)["blocks"]
    if plan.total > device_bytes and current.blocks_to_swap < blocks - 1:
        while plan.total > device_bytes and current.blocks_to_swap < blocks - 1:
            current = replace(current, blocks_to_swap=current.blocks_to_swap + 1)
            plan = estimate(current, device_bytes)
        flags.append(f"--blocks_to_swap {current.blocks_to_swap}")
    return flags, plan


def plan_warning(inputs: MemoryInputs, plan: MemoryPlan) -> str | None:
    """The warning for a plan over the device's memory, naming the flags that would make it fit."""
    if plan.device_bytes is None or plan.total <= plan.device_bytes:
        return None
    flags, fitted = recommend(inputs, plan.device_bytes)
    fits = fitted.total <= plan.device_bytes
    return (
        f"the memory plan ({plan.total / GIB:.1f} GiB) exceeds the device's {plan.device_bytes / GIB:.1f} GiB: "
        f"{'add' if fits else 'even with'} {' '.join(flags)} ({fitted.total / GIB:.1f} GiB"
        f"{'' if fits else '; also lower the resolution in the dataset TOML'})"
    )
