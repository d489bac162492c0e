"""An estimate of peak GPU memory by part, printed before training and written to status.json.

Parameter counts come from the real architecture built on the meta device (no memory); activation
sizes come from formulas in saved elements per token or per pixel, counted with
`torch.autograd.graph.saved_tensors_hooks` on the real-width modules (tests/trainer/test_memory_plan.py
checks them against measured bytes, within 20%):

- a transformer block saves about `Architecture.block_saved_per_token` x dim values per token (image,
  control and text tokens alike; PyTorch's SDPA without a mask keeps no tokens² matrix): 18 for
  Qwen-Image-Edit's dual-stream block (3072 wide, GELU MLP 4x), 25 for Qwen-Image 2.1's single-stream
  block (4096 wide, SwiGLU MLP 3x); with gradient checkpointing each block keeps only its input
  (1 x dim per token) and the backward pass recomputes one block at a time;
- an image is (side / (VAE scale x patch size))² tokens: 8x VAE and 2x2 patches for Edit, 16x VAE
  and patch size 1 for 2.1 (both 64 x 64 tokens at 1024²); 2.1's condition images sit in the one
  joint sequence at their own latent size, as its target does;
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

import diffusers
import torch
from accelerate import init_empty_weights
from diffusers import ModelMixin

from ..training_contract.model_versions import QWEN_IMAGE_21, QWEN_IMAGE_EDIT
from .lora import NetworkArgs, lora_target_modules
from .vae_decode import decoder_stages, vae_scale

GIB = 1024**3
OVERHEAD_BYTES = 1 * GIB  # CUDA context, gradient buffers in flight, allocator slack (an assumption)
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "adafactor": 0}  # per LoRA parameter
FACE_BOX_FRACTION = 0.5  # `face` decode: the box is taken as half the target's shorter side


@dataclass(frozen=True)
class Architecture:
    """What the plan reads off a model family: its diffusers classes (built on the meta device; looked up
    by name, as diffusers releases before 2.1's lack its classes) and the values a transformer block
    saves for backward per token, in units of its width (measured on the real-width block, fp32)."""

    transformer_class: str
    vae_class: str
    block_saved_per_token: int


ARCHITECTURES = {
    QWEN_IMAGE_EDIT: Architecture("QwenImageTransformer2DModel", "AutoencoderKLQwenImage", 18),
    QWEN_IMAGE_21: Architecture("QwenImage21Transformer2DModel", "AutoencoderKLQwenImage21", 25),
}


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
    family: str = QWEN_IMAGE_EDIT  # `ModelVersion.family`: the ARCHITECTURES entry


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


def image_tokens(size: tuple[int, int], scale: int = 8, patch: int = 2) -> int:
    """DiT tokens of an image of `size` (w, h) pixels: a VAE of `scale` pixels per latent, then `patch` x
    `patch` patches (Qwen-Image-Edit: 8 and 2; Qwen-Image 2.1: 16 and 1)."""
    side = scale * patch
    return (size[0] // side) * (size[1] // side)


def _build_empty(class_name: str, config: dict[str, Any]) -> ModelMixin:
    with init_empty_weights():
        model: ModelMixin = getattr(diffusers, class_name)(**config)
    return model


def _dit_counts(inputs: MemoryInputs) -> dict[str, int]:
    return _dit_counts_of(
        ARCHITECTURES[inputs.family].transformer_class,
        json.dumps(inputs.transformer_config, sort_keys=True),
        inputs.network_args,
    )


@functools.lru_cache(maxsize=8)
def _dit_counts_of(class_name: str, config_json: str, network_args: NetworkArgs) -> dict[str, int]:
    model = _build_empty(class_name, json.loads(config_json))
    blocks: torch.nn.ModuleList = model.transformer_blocks
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
        "patch": model.config["patch_size"],
    }


def _stage_saved(
    stage: Callable[[torch.Tensor], torch.Tensor], inputs: float, outputs: float, head_conv: torch.nn.Module
) -> float:
    """Values a decoder stage saves for backward, from its input and output sizes (counted on the real VAEs).

    Qwen-Image-Edit's causal convolutions pad two frames in time (3x their input for a 3x3x3 kernel);
    2.1's fold the frame away and pad only in space (and copy their input even where they do not pad).
    A 2.1 up block is one stage (its shortcut spans it): its residual blocks, then its upsampler."""
    module = stage.func if isinstance(stage, functools.partial) else stage
    name = type(module).__name__
    if not isinstance(module, torch.nn.Module):  # the head, a function: norm, activation, conv_out
        return 2 * inputs + _stage_saved(head_conv, inputs, outputs, head_conv)
    if name == "QwenImageCausalConv3d":
        return inputs * (1 if getattr(module, "kernel_size", None) == (1, 1, 1) else 3)
    if name == "QwenImage21CausalConv3d":
        return inputs
    if name == "QwenImageMidBlock":
        return 30 * inputs
    if name == "QwenImage21MidBlock":
        return 18.5 * inputs
    if name == "QwenImageResidualBlock":
        return 4.5 * inputs + 5.5 * outputs
    if name == "QwenImage21ResidualBlock":
        widens = not isinstance(module.get_submodule("conv_shortcut"), torch.nn.Identity)
        return (4 if widens else 3) * inputs + 3 * outputs
    if name in ("QwenImageResample", "QwenImage21Resample"):
        return 4 * inputs
    if name == "QwenImage21ResidualUpBlock":
        upsampler = getattr(module, "upsampler", None)
        middle = outputs / 4 if upsampler is not None else outputs  # the residual blocks' output, before upsampling
        first, *rest = module.get_submodule("resnets").children()
        saved = _stage_saved(first, inputs, middle, head_conv) + sum(
            _stage_saved(r, middle, middle, head_conv) for r in rest
        )
        return saved + (_stage_saved(upsampler, middle, outputs, head_conv) if upsampler is not None else 0)
    raise ValueError(f"the memory plan knows no decoder stage {name}")


@functools.lru_cache(maxsize=4)
def _empty_vae(class_name: str, config_json: str) -> ModelMixin:
    return _build_empty(class_name, json.loads(config_json))


def vae_module(inputs: MemoryInputs) -> ModelMixin:
    """The job's VAE on the meta device."""
    return _empty_vae(ARCHITECTURES[inputs.family].vae_class, json.dumps(inputs.vae_config, sort_keys=True))


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


def decoder_saved_values(
    vae_config: dict[str, Any], latent_size: tuple[int, int], family: str = QWEN_IMAGE_EDIT
) -> DecoderSaved:
    """What the real-size VAE decoder of `family` keeps for the backward pass of one decode of `latent_size`
    (w, h)."""
    vae = _empty_vae(ARCHITECTURES[family].vae_class, json.dumps(vae_config, sort_keys=True))
    head_conv = vae.get_submodule("decoder.conv_out")
    x = torch.empty(1, vae.config["z_dim"], 1, latent_size[1], latent_size[0], device="meta")
    boundaries, largest, total = 0.0, 0.0, 0.0
    with torch.no_grad():
        for stage in decoder_stages(vae):
            y = stage(x)
            saved = _stage_saved(stage, x.numel(), y.numel(), head_conv)
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
    counts = _dit_counts(inputs)
    dim, blocks, patch = counts["dim"], counts["blocks"], counts["patch"]
    base_linear = 1 if inputs.fp8_base else inputs.compute_bytes
    block_bytes = counts["block"] * base_linear  # a block's params are nearly all Linear weights
    dit_bytes = counts["linear"] * base_linear + (counts["total"] - counts["linear"]) * inputs.compute_bytes
    swapped = inputs.blocks_to_swap * block_bytes
    # swapped blocks stream in leaf by leaf: the one computing and the one in flight
    streaming = 2 * counts["largest_leaf"] * inputs.compute_bytes if inputs.blocks_to_swap else 0
    lora_params = inputs.network_dim * counts["lora_width"]
    scale = vae_scale(inputs.vae_config)
    tokens = inputs.batch_size * (
        image_tokens(inputs.target_size, scale, patch)
        + sum(image_tokens(c, scale, patch) for c in inputs.control_sizes)
        + inputs.text_tokens
    )
    per_block = ARCHITECTURES[inputs.family].block_saved_per_token * tokens * dim * inputs.compute_bytes
    # each forward pass of a face-loss rollout keeps its activations for the backward pass too
    if inputs.gradient_checkpointing:
        activations = inputs.face_rollout_steps * blocks * tokens * dim * inputs.compute_bytes + per_block
    else:
        activations = inputs.face_rollout_steps * blocks * per_block
    parts = {
        "dit_weights": dit_bytes - swapped + streaming,
        "vae_weights": sum(p.numel() for p in vae_module(inputs).parameters()) * inputs.compute_bytes,
        "lora_and_grads": lora_params * 8,
        "optimizer_state": lora_params * OPTIMIZER_STATE_BYTES.get(inputs.optimizer.lower(), 8),
        "activations": activations,
        "face_loss": 0,
        "overhead": OVERHEAD_BYTES,
    }
    if inputs.face_decode:
        width, height = decode_size(inputs)
        recognizer = inputs.face_recognizer_saved_bytes / inputs.compute_bytes
        latent = (width // scale, height // scale)
        values = decoder_saved_values(inputs.vae_config, latent, inputs.family).peak(True, recognizer)
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
    blocks = _dit_counts(inputs)["blocks"]
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
