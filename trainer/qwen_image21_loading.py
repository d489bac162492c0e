"""Qwen-Image 2.1 × loading: its DiT and Qwen3-VL text encoder streamed from ComfyUI's single files.

- DiT `qwen_image_2.1_*.safetensors`: diffusers `QwenImage21Transformer2DModel` names, optionally
  prefixed `model.diffusion_model.`, except the SwiGLU gate and up projections, which ComfyUI fuses
  into one `img_mlp.gate_up.weight` (gate rows first, as diffusers'
  `convert_qwen_image21_transformer_checkpoint_to_diffusers` splits it): each half is cut from the
  fused tensor as it is read, so no fused copy is ever held.
- VAE `qwen_image_2.1_vae_*.safetensors`: the Wan 2.2 layout, each encoder/decoder stage nesting its
  residual blocks and its resampler (`encoder.downsamples.<i>.downsamples.<j>.residual.*`,
  `...downsamples.<j>.resample.*`), `middle.<0|1|2>`, `head.<0|2>`, `conv1`/`conv2` for the quant
  convolutions, renamed to `AutoencoderKLQwenImage21` names by `vae_model_key` (a file already in
  diffusers names passes unchanged). Its convolutions are 2-D: a file that stores one with a
  singleton time axis ([out, in, 1, k, k], as Wan's causal 3-D convolutions are) is squeezed as read.
- Text encoder `qwen3vl_8b_*.safetensors`: `model.*` (the language model), `model.visual.*` and
  `lm_head.weight`, renamed as for Qwen2.5-VL (`models.text_encoder_model_key`) to
  `Qwen3VLForConditionalGeneration` names.

The loading itself is `models.py`'s (header check before any tensor is read, per-tensor cast,
float8 scales, `--fp8_base`, placement for block swap). The classes are imported when a 2.1 model
is loaded, not with this module: 2509/2511 train on diffusers and transformers too old for them
(`training_contract.libraries.MODEL_VERSION_FLOORS`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..training_contract.model_versions import QWEN_IMAGE_21
from . import models
from .models import DIT_PREFIX, ModelFileError, SafetensorsHeader, TensorPlacement

TRANSFORMER_CONFIG = "qwen_image_21_transformer.json"
TEXT_ENCODER_CONFIG = "qwen3_vl_8b_text_encoder.json"
VAE_CONFIG = "qwen_image_21_vae.json"
PROCESSOR_REPO = "Qwen/Qwen-Image-2.1"
# Latent channels of the 2.1 VAE (Qwen-Image-Edit's has 16): its quant convolution's output says which a file is.
VAE_LATENT_CHANNELS = 64
# The name diffusers' and ComfyUI's model detection read a 2.1 DiT by (2509/2511 have `txt_norm.weight`).
DIT_MARKER = "txt_in.text_norm.weight"
# Qwen3's per-head query norm: every layer of Qwen3-VL has one, Qwen2.5-VL (2509/2511) none.
TEXT_ENCODER_MARKER = "self_attn.q_norm.weight"
FUSED_GATE_UP = "img_mlp.gate_up.weight"
GATE, UP = "img_mlp.gate_layer.weight", "img_mlp.proj.weight"


def is_qwen_image21_dit(header: SafetensorsHeader) -> bool:
    return DIT_MARKER in header.shapes or DIT_PREFIX + DIT_MARKER in header.shapes


def _check_family(header: SafetensorsHeader, family: str, holds_21: bool, as_21: str, as_edit: str) -> None:
    """Refuse a 2.1 file for another family (`as_21` says why) and another family's file for 2.1 (`as_edit`);
    `family` is the chosen `ModelVersion.family`. Read from the header: nothing loads before a mismatch."""
    if holds_21 and family != QWEN_IMAGE_21:
        raise ModelFileError(f"{header.what} file {header.path} {as_21}")
    if family == QWEN_IMAGE_21 and not holds_21:
        raise ModelFileError(f"{header.what} file {header.path} {as_edit}")


def check_dit_family(header: SafetensorsHeader, family: str) -> None:
    """A Qwen-Image 2.1 DiT trains only as qwen-image-2.1, and qwen-image-2.1 only from one."""
    _check_family(
        header,
        family,
        is_qwen_image21_dit(header),
        f"is a Qwen-Image 2.1 model (it has {DIT_MARKER}): pass --model_version qwen-image-2.1, with its Qwen3-VL "
        "text encoder and 2.1 VAE",
        f"is not a Qwen-Image 2.1 model (no {DIT_MARKER}; a Qwen-Image-Edit 2509/2511 DiT has txt_norm.weight): "
        "give qwen_image_2.1_*.safetensors, or pick the --model_version of this file",
    )


def check_text_encoder_family(header: SafetensorsHeader, family: str) -> None:
    """Qwen3-VL goes with Qwen-Image 2.1 only, Qwen2.5-VL with 2509/2511 only."""
    _check_family(
        header,
        family,
        any(key.endswith(TEXT_ENCODER_MARKER) for key in header.shapes),
        "is Qwen3-VL (Qwen-Image 2.1's text encoder): Qwen-Image-Edit 2509/2511 read Qwen2.5-VL-7B "
        "(qwen_2.5_vl_7b*.safetensors)",
        f"is not Qwen3-VL (no {TEXT_ENCODER_MARKER}): Qwen-Image 2.1 reads Qwen3-VL-8B (qwen3vl_8b_*.safetensors)",
    )


def is_qwen_image21_vae(header: SafetensorsHeader) -> bool:
    """The 2.1 VAE's post-quant convolution (`conv2` in ComfyUI's names) reads 64 latent channels."""
    shape = header.shapes.get("conv2.weight", header.shapes.get("post_quant_conv.weight", ()))
    return len(shape) >= 2 and shape[1] == VAE_LATENT_CHANNELS


def check_vae_family(header: SafetensorsHeader, family: str) -> None:
    """The 64-channel 16x VAE goes with Qwen-Image 2.1 only, the 16-channel one with 2509/2511 only."""
    _check_family(
        header,
        family,
        is_qwen_image21_vae(header),
        "is Qwen-Image 2.1's VAE (64 latent channels): Qwen-Image-Edit 2509/2511 read qwen_image_vae.safetensors",
        f"is not Qwen-Image 2.1's VAE (its latents do not have {VAE_LATENT_CHANNELS} channels): Qwen-Image 2.1 "
        "reads qwen_image_2.1_vae_*.safetensors",
    )


_WAN_RESIDUAL = (
    ("residual.0.", "norm1."),
    ("residual.2.", "conv1."),
    ("residual.3.", "norm2."),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)
_WAN_TOP = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv."}
_WAN_SIDE = {"conv1.": "conv_in.", "head.0.": "norm_out.", "head.2.": "conv_out."}


def _residual_name(rest: str) -> str:
    for wan, diffusers_name in _WAN_RESIDUAL:
        if rest.startswith(wan):
            return diffusers_name + rest[len(wan) :]
    return rest


def vae_model_key(key: str) -> str:
    """The `AutoencoderKLQwenImage21` name of a key of ComfyUI's (Wan 2.2-layout) 2.1 VAE file; other keys
    (diffusers names among them) are returned unchanged, for the layout check to name."""
    for wan, diffusers_name in _WAN_TOP.items():
        if key.startswith(wan):
            return diffusers_name + key[len(wan) :]
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key
    for wan, diffusers_name in _WAN_SIDE.items():
        if rest.startswith(wan):
            return f"{side}.{diffusers_name}{rest[len(wan) :]}"
    parts = rest.split(".")
    if parts[0] == "middle" and len(parts) > 2:
        tail = ".".join(parts[2:])
        if parts[1] == "1":
            return f"{side}.mid_block.attentions.0.{tail}"
        return f"{side}.mid_block.resnets.{int(parts[1]) // 2}.{_residual_name(tail)}"
    stage = "downsamples" if side == "encoder" else "upsamples"
    if parts[0] == stage and len(parts) > 4 and parts[2] == stage:
        block = "down_blocks" if side == "encoder" else "up_blocks"
        tail = ".".join(parts[4:])
        if tail.startswith(("resample.", "time_conv.")):
            sampler = "downsampler" if side == "encoder" else "upsampler"
            return f"{side}.{block}.{parts[1]}.{sampler}.{tail}"
        return f"{side}.{block}.{parts[1]}.resnets.{parts[3]}.{_residual_name(tail)}"
    return key


def load_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Any:
    """The 2.1 VAE (`AutoencoderKLQwenImage21`), streamed from ComfyUI's single file."""
    from diffusers import AutoencoderKLQwenImage21

    what = "VAE (--vae)"
    header = models.read_header(path, what)
    check_vae_family(header, QWEN_IMAGE_21)
    sources = {vae_model_key(key): key for key in header.shapes}
    config = models.architecture_config(header, VAE_CONFIG)
    expected = "Qwen-Image 2.1's VAE (64 latent channels, 16x; ComfyUI's Wan 2.2 layout or diffusers names)"
    model = models._build_empty(lambda: AutoencoderKLQwenImage21(**config), header, expected)
    models._cast_empty(model, dtype)
    model_shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    squeezed = frozenset(
        name
        for name, key in sources.items()
        if len(header.shapes[key]) == 5 and header.shapes[key][2] == 1 and len(model_shapes.get(name, ())) == 4
    )
    models.check_layout(header, sources, model, expected, squeezed=squeezed)
    models._fill(model, header, sources, lambda _name: torch.device(device), squeezed=squeezed)
    return model.eval().requires_grad_(False)


def dit_sources(header: SafetensorsHeader) -> tuple[dict[str, str], models.RowRanges]:
    """{model name: file name} of a 2.1 DiT file, and the row ranges of the fused gate/up tensors."""
    _, auxiliary = models._fp8_scales(header)
    sources: dict[str, str] = {}
    rows: models.RowRanges = {}
    for key in header.shapes:
        if key in auxiliary:
            continue
        name = key.removeprefix(DIT_PREFIX)
        if name.endswith(FUSED_GATE_UP):
            block = name[: -len(FUSED_GATE_UP)]
            half = header.shapes[key][0] // 2
            sources[block + GATE], rows[block + GATE] = key, (0, half)
            sources[block + UP], rows[block + UP] = key, (half, half)
        else:
            sources[name] = key
    return sources, rows


def load_transformer(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    *,
    fp8_base: bool = False,
    placement: TensorPlacement = models._on_cpu,
) -> Any:
    """The 2.1 DiT (`QwenImage21Transformer2DModel`), streamed from its file; `fp8_base` and
    `placement` as for `models.load_transformer`."""
    from diffusers import QwenImage21Transformer2DModel

    what = "DiT (--dit)"
    header = models.read_header(path, what)
    check_dit_family(header, QWEN_IMAGE_21)
    config = models.architecture_config(header, TRANSFORMER_CONFIG)
    expected = (
        f"a Qwen-Image 2.1 transformer with {config.get('num_layers', '?')} blocks (ComfyUI's layout: diffusers "
        f"names with a fused img_mlp.gate_up, optionally prefixed {DIT_PREFIX!r})"
    )
    model = models._build_empty(lambda: QwenImage21Transformer2DModel(**config), header, expected)
    models._cast_empty(model, dtype)
    if fp8_base:
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    sources, rows = dit_sources(header)
    models.check_layout(header, sources, model, expected, rows=rows)
    models._fill(model, header, sources, placement, rows)
    return model.eval().requires_grad_(False)


def load_text_encoder(
    path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"
) -> Any:
    """Qwen3-VL (`Qwen3VLForConditionalGeneration`), streamed from ComfyUI's single file."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    what = "text encoder (--text_encoder)"
    header = models.read_header(path, what)
    _, auxiliary = models._fp8_scales(header)
    sources = {models.text_encoder_model_key(k): k for k in header.shapes if k not in auxiliary}
    config = models.architecture_config(header, TEXT_ENCODER_CONFIG)
    expected = "Qwen3-VL (`model.*` language model, `model.visual.*` vision tower; ComfyUI's qwen3vl_8b layout)"
    model = models._build_empty(lambda: Qwen3VLForConditionalGeneration(Qwen3VLConfig(**config)), header, expected)
    models._cast_empty(model, dtype)
    # Only hidden states are used; a file without the LM head shares the embedding for it.
    models.check_layout(header, sources, model, expected, optional=frozenset({"lm_head.weight"}))
    models._fill(model, header, sources, lambda _name: torch.device(device))
    if "lm_head.weight" not in sources:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def load_processor(tokenizer: str | os.PathLike | None) -> Any:
    """Qwen3-VL's tokenizer and image processor (`Qwen3VLProcessor`): `--tokenizer`, or Qwen-Image 2.1's repo."""
    from transformers import Qwen3VLProcessor

    return models.load_processor(tokenizer, Qwen3VLProcessor, PROCESSOR_REPO, "Qwen-Image 2.1")
