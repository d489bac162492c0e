"""Tiny random Qwen-Image 2.1 models in ComfyUI's single-file layouts, for the 2.1 loading and LoRA tests.

    files = write_tiny_qwen_image21_files(tmp_path / "models")
    # TinyQwenImage21Files(dit, vae, text_encoder, tokenizer_dir)

The models are the real classes (diffusers `QwenImage21Transformer2DModel`, transformers
`Qwen3VLForConditionalGeneration`) with tiny random configs. The DiT is written as ComfyUI's
`qwen_image_2.1_*` files are: diffusers names with the `model.diffusion_model.` prefix (or without)
and each block's SwiGLU gate and up projections fused into `img_mlp.gate_up.weight`, gate rows
first. The text encoder as ComfyUI's `qwen3vl_8b_*` files: `model.*` language model, `model.visual.*`
vision tower, `lm_head.weight`. The VAE (`AutoencoderKLQwenImage21`, 64 latent channels, 16x) in the Wan 2.2 layout
ComfyUI's `qwen_image_2.1_vae_*` file has (each stage nesting its residual blocks and resampler),
its convolutions with a singleton time axis or without. Each file carries its tiny architecture in the
safetensors metadata entry `config`, which the trainer's loaders prefer over the shipped full-size configs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tiny_qwen import DIT_PREFIX, build_tiny_processor, fp8_scaled, resnet_to_wan, tiny_text_encoder_config

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


# The real VAE's stages (four 2x downsamplings: 16x) and 64 latent channels, at tiny widths.
TINY_21_VAE_CONFIG = {
    "base_dim": 8,
    "decoder_base_dim": 8,
    "z_dim": 64,
    "dim_mult": [1, 2, 2, 2, 2],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True, True],
}


@dataclass(frozen=True)
class TinyQwenImage21Files:
    dit: Path
    vae: Path
    text_encoder: Path
    tokenizer_dir: Path


def diffusers_vae21_key_to_wan22(key: str, num_res_blocks: int) -> str:
    """The name ComfyUI's Wan 2.2-layout `qwen_image_2.1_vae` file uses for an AutoencoderKLQwenImage21 key
    (written independently of the trainer's renaming, which the tests check against it)."""
    top = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2."}
    for prefix, wan in top.items():
        if key.startswith(prefix):
            return wan + key[len(prefix) :]
    side, rest = key.split(".", 1)
    for prefix, wan in (("conv_in.", "conv1."), ("norm_out.", "head.0."), ("conv_out.", "head.2.")):
        if rest.startswith(prefix):
            return f"{side}.{wan}{rest[len(prefix) :]}"
    parts = rest.split(".")
    if parts[0] == "mid_block":
        tail = ".".join(parts[3:])
        if parts[1] == "attentions":
            return f"{side}.middle.1.{tail}"
        return f"{side}.middle.{2 * int(parts[2])}.{resnet_to_wan(tail)}"
    stage = "downsamples" if side == "encoder" else "upsamples"
    resnets = num_res_blocks if side == "encoder" else num_res_blocks + 1
    if parts[2] == "resnets":
        return f"{side}.{stage}.{parts[1]}.{stage}.{parts[3]}.{resnet_to_wan('.'.join(parts[4:]))}"
    return f"{side}.{stage}.{parts[1]}.{stage}.{resnets}.{'.'.join(parts[3:])}"


def tiny_qwen_image21_vae(seed: int = 0, config: dict = TINY_21_VAE_CONFIG):
    from diffusers import AutoencoderKLQwenImage21

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage21(**config)


def vae21_comfyui_state_dict(vae, *, time_axis: bool = True) -> dict[str, torch.Tensor]:
    """The VAE's weights in ComfyUI's layout; `time_axis`: convolutions stored [out, in, 1, k, k]."""
    out: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        is_conv = key.endswith(".weight") and value.dim() == 4
        tensor = value.unsqueeze(2) if time_axis and is_conv else value
        out[diffusers_vae21_key_to_wan22(key, vae.config.num_res_blocks)] = tensor.contiguous()
    return out


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


# Qwen's chat template for text turns: the 2.1 prompt encoding tokenizes the system turn with it to find
# how many leading tokens to drop (the tiny tokenizer has no template of its own).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}<|im_end|>\n{% endfor %}"
)


def build_tiny_qwen3_vl_processor():
    """A Qwen3VLProcessor over tiny_qwen's byte-level tokenizer: 16-pixel patches merged 2x2, so one
    vision slot covers 32x32 pixels, as one 2x2 group of the 2.1 VAE's latents does."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tokenizer = build_tiny_processor().tokenizer
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=256 * 256
        ),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(),
        chat_template=QWEN_CHAT_TEMPLATE,
    )


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
    vae_time_axis: bool = True,
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

    vae = root / "qwen_image_2.1_vae_tiny.safetensors"
    vae_sd = vae21_comfyui_state_dict(tiny_qwen_image21_vae(seed), time_axis=vae_time_axis)
    save_file(vae_sd, str(vae), metadata={"config": json.dumps(TINY_21_VAE_CONFIG)})

    processor = build_tiny_qwen3_vl_processor()
    tokenizer_dir = root / "tokenizer"
    processor.save_pretrained(str(tokenizer_dir))
    te_config = tiny_qwen3_vl_config(processor.tokenizer)
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
    return TinyQwenImage21Files(dit=dit, vae=vae, text_encoder=text_encoder, tokenizer_dir=tokenizer_dir)
