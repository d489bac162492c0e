"""Load the single-file models ComfyUI users already have into diffusers/transformers classes.

- DiT `qwen_image_edit_2509_*.safetensors`: diffusers `QwenImageTransformer2DModel` names,
  optionally prefixed `model.diffusion_model.`; float8 files (`_fp8_e4m3fn`, scaled or not) are
  upcast to the training dtype.
- VAE `qwen_image_vae.safetensors`: Wan-style names (`conv1`, `decoder.head.0.gamma`, ...),
  renamed with diffusers' own Wan converter to `AutoencoderKLQwenImage` names.
- Text encoder `qwen_2.5_vl_7b*.safetensors`: `model.*` -> `model.language_model.*`,
  `visual.*` -> `model.visual.*`; `_fp8_scaled` files hold float8 weights with per-tensor
  scales (`<name>.scale_weight` or `<name>.weight_scale`), dequantized here.

Architectures come from the JSON configs shipped in `configs/`; a file whose safetensors
metadata carries a `config` entry (JSON) is built with that config instead (the test suite's
tiny models do this). Every mismatch between a file and its architecture is reported with the
file's path and what was expected, before any weight is used.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors import SafetensorError, safe_open
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TRANSFORMER_CONFIG = "qwen_image_edit_transformer.json"
VAE_CONFIG = "qwen_image_vae.json"
TEXT_ENCODER_CONFIG = "qwen_2_5_vl_7b_text_encoder.json"
EMBEDDED_CONFIG_KEY = "config"
DIT_PREFIX = "model.diffusion_model."
DEFAULT_PROCESSOR_REPO = "Qwen/Qwen-Image-Edit-2509"

FP8_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
FP8_AUXILIARY_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
FP8_MARKER_KEYS = ("scaled_fp8",)


class ModelFileError(ValueError):
    """A model file that is missing, unreadable, truncated or of the wrong kind."""


@dataclass
class SingleFile:
    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def shipped_config(name: str) -> dict[str, Any]:
    config = json.loads((CONFIG_DIR / name).read_text(encoding="utf-8"))
    return {k: v for k, v in config.items() if not k.startswith("_")}


def read_single_file(path: str | os.PathLike, what: str) -> SingleFile:
    """All tensors and the metadata of a safetensors file, or a ModelFileError naming it."""
    file_path = Path(path)
    if not file_path.is_file():
        raise ModelFileError(f"{what} file not found: {file_path}")
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(file_path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ModelFileError(
            f"{what} file {file_path} cannot be read as safetensors ({exc}); "
            "expected a complete .safetensors file (is it truncated or a different format?)"
        ) from exc
    if not tensors:
        raise ModelFileError(f"{what} file {file_path} holds no tensors")
    return SingleFile(file_path, tensors, metadata)


def _architecture_config(file: SingleFile, shipped_name: str, what: str) -> dict[str, Any]:
    embedded = file.metadata.get(EMBEDDED_CONFIG_KEY)
    if embedded is None:
        return shipped_config(shipped_name)
    try:
        config = json.loads(embedded)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{what} file {file.path}: its metadata `config` is not valid JSON ({exc})") from exc
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _build_empty(factory: Any, config: dict[str, Any], file: SingleFile, what: str, expected: str) -> Any:
    """Instantiate without allocating weights; a config of another architecture is the file's fault."""
    try:
        with init_empty_weights():
            return factory(config)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{what} file {file.path} does not match {expected}: its config is not one ({exc})") from exc


def _check_keys(
    file: SingleFile, state_dict: dict[str, torch.Tensor], model: torch.nn.Module, what: str, expected: str
) -> None:
    """Raise a ModelFileError listing missing/unexpected keys and shape mismatches."""
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(model_shapes) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(model_shapes))
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs expected {model_shapes[k]}"
        for k in sorted(set(model_shapes) & set(state_dict))
        if tuple(state_dict[k].shape) != model_shapes[k]
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        problems.append(f"{len(mismatched)} with other shapes (e.g. {'; '.join(mismatched[:2])})")
    raise ModelFileError(f"{what} file {file.path} does not match {expected}: " + ", ".join(problems))


def _materialize(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    model.load_state_dict(cast, strict=True, assign=True)


def load_transformer(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> QwenImageTransformer2DModel:
    what = "DiT (--dit)"
    file = read_single_file(path, what)
    # `_fp8_e4m3fn` / `_fp8_scaled` DiT files are upcast (with their scales) like the text encoder.
    state_dict = {k.removeprefix(DIT_PREFIX): v for k, v in _dequantize_fp8(file.tensors, dtype).items()}
    config = _architecture_config(file, TRANSFORMER_CONFIG, what)
    expected = (
        f"a Qwen-Image(-Edit) transformer with {config.get('num_layers', '?')} blocks "
        f"(diffusers names, optionally prefixed {DIT_PREFIX!r})"
    )
    model = _build_empty(lambda c: QwenImageTransformer2DModel(**c), config, file, what, expected)
    _check_keys(file, state_dict, model, what, expected)
    _materialize(model, state_dict, dtype)
    return model.eval().requires_grad_(False)


def load_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> AutoencoderKLQwenImage:
    what = "VAE (--vae)"
    file = read_single_file(path, what)
    # ComfyUI's file uses Wan names; a diffusers-named file passes through the converter unchanged.
    state_dict = convert_wan_vae_to_diffusers(dict(file.tensors))
    config = _architecture_config(file, VAE_CONFIG, what)
    expected = "the Qwen-Image VAE (Wan 2.1 layout, 16 latent channels)"
    model = _build_empty(lambda c: AutoencoderKLQwenImage(**c), config, file, what, expected)
    _check_keys(file, state_dict, model, what, expected)
    _materialize(model, state_dict, dtype)
    return model.eval().requires_grad_(False)


def _dequantize_fp8(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Turn ComfyUI `_fp8_scaled` weights (float8 + scale) back into `dtype` weights."""
    out: dict[str, torch.Tensor] = {}
    scales = {}
    for key, value in tensors.items():
        if key in FP8_MARKER_KEYS or key.endswith(FP8_AUXILIARY_SUFFIXES):
            continue
        for suffix in FP8_SCALE_SUFFIXES:
            if key.endswith(suffix):
                scales[key[: -len(suffix)] + ".weight"] = value
                break
        else:
            out[key] = value
    for key, value in out.items():
        if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale = scales.get(key)
            weight = value.to(torch.float32)
            if scale is not None:
                scale = scale.to(torch.float32)
                weight = weight * (scale.view(-1, *([1] * (weight.dim() - 1))) if scale.numel() > 1 else scale)
            out[key] = weight.to(dtype)
    return out


def _rename_text_encoder_key(key: str) -> str:
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + key[len("model."):]
    return key


def load_text_encoder(
    path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16
) -> Qwen2_5_VLForConditionalGeneration:
    what = "text encoder (--text_encoder)"
    file = read_single_file(path, what)
    tensors = _dequantize_fp8(file.tensors, dtype)
    state_dict = {_rename_text_encoder_key(k): v for k, v in tensors.items()}
    config = _architecture_config(file, TEXT_ENCODER_CONFIG, what)
    expected = "Qwen2.5-VL (`model.*` language model and `visual.*` vision tower)"
    model = _build_empty(
        lambda c: Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**c)), config, file, what, expected
    )
    tie_lm_head = "lm_head.weight" not in state_dict
    if tie_lm_head:
        # Only hidden states are used; ComfyUI files may omit the LM head, so share the embedding.
        state_dict["lm_head.weight"] = state_dict.get("model.language_model.embed_tokens.weight", torch.empty(0))
    _check_keys(file, state_dict, model, what, expected)
    _materialize(model, state_dict, dtype)
    if tie_lm_head:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def load_processor(tokenizer: str | os.PathLike | None) -> Qwen2VLProcessor:
    """Tokenizer + image processor from a local folder (itself or its `processor/`) or the hub repo."""
    if tokenizer is not None:
        folder = Path(tokenizer)
        candidates = [folder, folder / "processor"]
        for candidate in candidates:
            if (candidate / "tokenizer_config.json").is_file() or (candidate / "processor_config.json").is_file():
                return Qwen2VLProcessor.from_pretrained(str(candidate))
        raise ModelFileError(
            f"--tokenizer {folder}: no tokenizer/processor found there or in {folder / 'processor'} "
            "(expected tokenizer_config.json and processor files, e.g. the `processor` folder of "
            f"{DEFAULT_PROCESSOR_REPO})"
        )
    try:
        return Qwen2VLProcessor.from_pretrained(DEFAULT_PROCESSOR_REPO, subfolder="processor")
    except OSError as exc:
        raise ModelFileError(
            f"could not get the Qwen-Image-Edit processor from the hub ({DEFAULT_PROCESSOR_REPO}, processor/): "
            f"{exc}. Pass --tokenizer <folder> with a local copy of that folder."
        ) from exc
