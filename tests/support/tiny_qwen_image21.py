"""Tiny random Qwen-Image 2.1 models in ComfyUI's single-file layouts, for the 2.1 loading and LoRA tests.

    files = write_tiny_qwen_image21_files(tmp_path / "models")   # TinyQwenImage21Files(dit, text_encoder)

The models are the real classes (diffusers `QwenImage21Transformer2DModel`, transformers
`Qwen3VLForConditionalGeneration`) with tiny random configs. The DiT is written as ComfyUI's
`qwen_image_2.1_*` files are: diffusers names with the `model.diffusion_model.` prefix (or without)
and each block's SwiGLU gate and up projections fused into `img_mlp.gate_up.weight`, gate rows
first. The text encoder as ComfyUI's `qwen3vl_8b_*` files: `model.*` language model, `model.visual.*`
vision tower, `lm_head.weight`. Each file carries its tiny architecture in the safetensors metadata
entry `config`, which the trainer's loaders prefer over the shipped full-size configs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tiny_qwen import DIT_PREFIX, build_tiny_processor, fp8_scaled, tiny_text_encoder_config

TINY_21_TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": 64,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "context_in_dim": 32,
    "mlp_ratio": 3,
    "axes_dims_rope": [4, 6, 6],
}


@dataclass(frozen=True)
class TinyQwenImage21Files:
    dit: Path
    text_encoder: Path


def fuse_gate_up(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names -> ComfyUI's: `img_mlp.gate_layer` and `img_mlp.proj` become one `img_mlp.gate_up`
    (gate rows first), as ComfyUI's checkpoints store them."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("img_mlp.gate_layer.weight"):
            up = state_dict[key.replace("gate_layer", "proj")]
            out[key.replace("gate_layer", "gate_up")] = torch.cat([value, up], dim=0).contiguous()
        elif not key.endswith("img_mlp.proj.weight"):
            out[key] = value.contiguous()
    return out


def tiny_qwen3_vl_config(tokenizer, hidden_size: int = TINY_21_TRANSFORMER_CONFIG["context_in_dim"]) -> dict:
    """tiny_qwen's Qwen2.5-VL config made Qwen3-VL: interleaved multimodal rope, 16-pixel patches and a
    DeepStack merger in the vision tower (no windowed attention)."""
    config = tiny_text_encoder_config(tokenizer, hidden_size)
    text = config["text_config"]
    text["head_dim"] = 16
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [2, 3, 3],
        "mrope_interleaved": True,
    }
    vision = {k: v for k, v in config["vision_config"].items() if k not in ("window_size", "fullatt_block_indexes")}
    vision.update(patch_size=16, num_position_embeddings=16, deepstack_visual_indexes=[0])
    return {**config, "model_type": "qwen3_vl", "text_config": text, "vision_config": vision}


def tiny_qwen_image21_transformer(seed: int = 0, config: dict = TINY_21_TRANSFORMER_CONFIG):
    from diffusers import QwenImage21Transformer2DModel

    torch.manual_seed(seed)
    model = QwenImage21Transformer2DModel(**config)
    with torch.no_grad():  # random init leaves the zero-centred norms and outputs at zero: give them values
        for name, param in model.named_parameters():
            if "norm" in name or name.startswith("proj_out"):
                param.normal_(0.0, 0.2)
    return model


def write_tiny_qwen_image21_files(
    directory: str | Path,
    *,
    seed: int = 0,
    dit_prefix: bool = True,
    dit_fp8: bool = False,
    text_encoder_fp8: bool = False,
) -> TinyQwenImage21Files:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    transformer = tiny_qwen_image21_transformer(seed)
    prefix = DIT_PREFIX if dit_prefix else ""
    dit_sd = {prefix + k: v for k, v in fuse_gate_up(transformer.state_dict()).items()}
    if dit_fp8:
        dit_sd = fp8_scaled(dit_sd)
    dit = root / "qwen_image_2.1_tiny.safetensors"
    save_file(dit_sd, str(dit), metadata={"config": json.dumps(TINY_21_TRANSFORMER_CONFIG)})

    te_config = tiny_qwen3_vl_config(build_tiny_processor().tokenizer)
    torch.manual_seed(seed + 1)
    text_model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**te_config))
    te_sd = {}
    for key, value in text_model.state_dict().items():
        if key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model.") :]
        te_sd[key] = value.contiguous()
    if text_encoder_fp8:
        te_sd = fp8_scaled(te_sd)
    text_encoder = root / ("qwen3vl_tiny_fp8_scaled.safetensors" if text_encoder_fp8 else "qwen3vl_tiny.safetensors")
    save_file(te_sd, str(text_encoder), metadata={"config": json.dumps(te_config)})
    return TinyQwenImage21Files(dit=dit, text_encoder=text_encoder)
