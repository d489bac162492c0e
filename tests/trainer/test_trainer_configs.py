"""The shipped full-size configs build the real models (meta device: no memory), under whichever
diffusers/transformers generation is installed (CI runs this file under the declared minimums too).

Reference figures of the real files, independent of this code:
- Qwen-Image(-Edit-2509/2511) DiT: 20,430,401,088 parameters in 1,933 tensors, 1,087 of them
  one-dimensional (biases and norms), as a GGUF export of Qwen-Image-Edit-2509 lists them
  (1,933 tensors: 1,087 F32 vectors + 846 matrices), with the matrix shapes below.
- Qwen2.5-VL-7B: 8,292,166,656 parameters (the model card's 8.29B), 152,064-token vocabulary.
- Qwen-Image VAE (the Wan 2.1 VAE layout): about 127M parameters (a 254 MB bf16 file).
"""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from face_consistency.trainer import models
from tiny_qwen import DIT_PREFIX, diffusers_vae_key_to_wan
from transformers import Qwen2_5_VLForConditionalGeneration

pytestmark = pytest.mark.trainer

DIT_MATRIX_SHAPES = {  # torch order [out, in]
    "img_in.weight": (3072, 64),
    "txt_in.weight": (3072, 3584),
    "time_text_embed.timestep_embedder.linear_1.weight": (3072, 256),
    "time_text_embed.timestep_embedder.linear_2.weight": (3072, 3072),
    "norm_out.linear.weight": (6144, 3072),
    "proj_out.weight": (64, 3072),
    "transformer_blocks.0.attn.to_q.weight": (3072, 3072),
    "transformer_blocks.0.attn.add_k_proj.weight": (3072, 3072),
    "transformer_blocks.59.attn.to_add_out.weight": (3072, 3072),
    "transformer_blocks.59.img_mod.1.weight": (18432, 3072),
    "transformer_blocks.59.txt_mod.1.weight": (18432, 3072),
    "transformer_blocks.0.img_mlp.net.0.proj.weight": (12288, 3072),
    "transformer_blocks.0.txt_mlp.net.2.weight": (3072, 12288),
}


def _header(shapes: dict[str, tuple[int, ...]], what: str) -> models.SafetensorsHeader:
    """A file's header as the loader sees it, without writing 40 GB of weights."""
    return models.SafetensorsHeader(models.CONFIG_DIR / "real.safetensors", what, {}, shapes, {k: 2 for k in shapes})


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["edit-2509", "edit-2511"])
def test_shipped_dit_config_is_the_real_transformer(zero_cond_t):
    with init_empty_weights():
        model = QwenImageTransformer2DModel(**models.shipped_config(models.TRANSFORMER_CONFIG), zero_cond_t=zero_cond_t)
    shapes = _shapes(model)
    assert len(shapes) == 1933
    assert sum(1 for s in shapes.values() if len(s) == 1) == 1087
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 20_430_401_088
    assert {k: shapes[k] for k in DIT_MATRIX_SHAPES} == DIT_MATRIX_SHAPES
    # ComfyUI's single-file layout (prefixed names, and the 2511 marker) passes the loader's check.
    comfy = {DIT_PREFIX + k: s for k, s in shapes.items()}
    if zero_cond_t:
        comfy[models.INDEX_TIMESTEP_ZERO_KEY] = (0,)
    header = _header(comfy, "DiT (--dit)")
    models.check_dit_version(header, zero_cond_t)
    assert models.count_transformer_blocks(header) == 60
    sources = {k.removeprefix(DIT_PREFIX): k for k in comfy if k != models.INDEX_TIMESTEP_ZERO_KEY}
    models.check_layout(header, sources, model, "the real DiT")


def test_shipped_vae_config_is_the_real_vae_in_wan_names():
    with init_empty_weights():
        model = AutoencoderKLQwenImage(**models.shipped_config(models.VAE_CONFIG))
    shapes = _shapes(model)
    assert len(shapes) == 194
    assert abs(sum(torch.Size(s).numel() for s in shapes.values()) - 127e6) < 0.5e6
    wan = {diffusers_vae_key_to_wan(k): s for k, s in shapes.items()}
    assert {"conv1.weight", "decoder.head.0.gamma", "encoder.downsamples.0.residual.0.gamma"} <= set(wan)
    header = _header(wan, "VAE (--vae)")
    sources = convert_wan_vae_to_diffusers({k: k for k in wan})
    models.check_layout(header, sources, model, "the real VAE")


def test_shipped_text_encoder_config_is_qwen2_5_vl_7b_with_the_multimodal_rope():
    config = models.text_encoder_config(models.shipped_config(models.TEXT_ENCODER_CONFIG))
    with init_empty_weights():
        model = Qwen2_5_VLForConditionalGeneration(config)
    shapes = _shapes(model)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 8_292_166_656
    assert shapes["model.language_model.embed_tokens.weight"] == (152064, 3584)
    text = config.text_config
    assert text.rope_scaling["mrope_section"] == [16, 24, 24]  # what transformers 4.x reads
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]  # what 5.x reads
    assert text.rope_scaling.get("rope_theta", getattr(text, "rope_theta", None)) == 1000000.0
    # ComfyUI's layout: `model.*` language model, `visual.*` vision tower, no LM head.
    comfy = {}
    for key, shape in shapes.items():
        if key == "lm_head.weight":
            continue
        comfy[key.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)] = shape
    header = _header(comfy, "text encoder (--text_encoder)")
    sources = {models.text_encoder_model_key(k): k for k in comfy}
    models.check_layout(header, sources, model, "Qwen2.5-VL", optional=frozenset({"lm_head.weight"}))
