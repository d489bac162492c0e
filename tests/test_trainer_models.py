"""Loading ComfyUI-style single files (tiny random models with the real key layouts)."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_qwen import DIT_PREFIX, write_tiny_model_files

from face_consistency.trainer import models


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return write_tiny_model_files(tmp_path_factory.mktemp("models"))


def test_files_use_comfyui_key_layouts(tiny_files):
    with safe_open(str(tiny_files.dit), "pt") as f:
        assert all(k.startswith(DIT_PREFIX) for k in f.keys())
    with safe_open(str(tiny_files.vae), "pt") as f:
        keys = set(f.keys())
    assert {"conv1.weight", "conv2.weight", "decoder.head.0.gamma", "encoder.conv1.weight"} <= keys
    assert not any("down_blocks" in k or "up_blocks" in k for k in keys)
    with safe_open(str(tiny_files.text_encoder), "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("model.layers.") for k in keys)
    assert any(k.startswith("visual.blocks.") for k in keys)
    assert not any(k.startswith("model.language_model") or k.startswith("model.visual") for k in keys)


def test_transformer_loads_with_and_without_prefix(tiny_files, tmp_path):
    with_prefix = models.load_transformer(tiny_files.dit, torch.float32)
    assert isinstance(with_prefix, QwenImageTransformer2DModel)
    raw = load_file(str(tiny_files.dit))
    with safe_open(str(tiny_files.dit), "pt") as f:
        metadata = f.metadata()
    bare = tmp_path / "bare.safetensors"
    save_file({k.removeprefix(DIT_PREFIX): v for k, v in raw.items()}, str(bare), metadata=metadata)
    without_prefix = models.load_transformer(bare, torch.float32)
    for (name, a), (_, b) in zip(with_prefix.state_dict().items(), without_prefix.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(with_prefix.img_in.weight, raw[DIT_PREFIX + "img_in.weight"])


def test_vae_wan_names_are_renamed_and_decode_matches(tiny_files):
    vae = models.load_vae(tiny_files.vae, torch.float32)
    assert isinstance(vae, AutoencoderKLQwenImage)
    raw = load_file(str(tiny_files.vae))
    assert torch.equal(vae.quant_conv.weight, raw["conv1.weight"])
    assert torch.equal(vae.decoder.conv_out.weight, raw["decoder.head.2.weight"])
    latents = vae.encode(torch.rand(1, 3, 1, 32, 32) * 2 - 1).latent_dist.mode()
    assert latents.shape == (1, 16, 1, 4, 4)


def test_text_encoder_prefixes_are_remapped(tiny_files):
    encoder = models.load_text_encoder(tiny_files.text_encoder, torch.float32)
    raw = load_file(str(tiny_files.text_encoder))
    assert torch.equal(encoder.model.language_model.layers[0].self_attn.q_proj.weight,
                       raw["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(encoder.model.visual.blocks[0].attn.qkv.weight, raw["visual.blocks.0.attn.qkv.weight"])
    assert encoder.lm_head.weight is encoder.model.language_model.embed_tokens.weight


def test_fp8_scaled_text_encoder_is_dequantized(tmp_path):
    plain = write_tiny_model_files(tmp_path / "plain", seed=3)
    scaled = write_tiny_model_files(tmp_path / "fp8", seed=3, text_encoder_fp8=True)
    raw = load_file(str(scaled.text_encoder))
    assert raw["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    reference = models.load_text_encoder(plain.text_encoder, torch.float32)
    dequantized = models.load_text_encoder(scaled.text_encoder, torch.float32)
    want = reference.model.language_model.layers[0].mlp.up_proj.weight
    got = dequantized.model.language_model.layers[0].mlp.up_proj.weight
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=0.07, atol=1e-3)
    assert not torch.equal(got, want)


def test_processor_from_local_folder(tiny_files):
    processor = models.load_processor(tiny_files.tokenizer_dir)
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == processor.image_token_id


def test_truncated_file_names_the_file(tiny_files, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_files.dit.read_bytes()[:5000])
    with pytest.raises(models.ModelFileError, match=r"DiT \(--dit\) file .*truncated\.safetensors"):
        models.load_transformer(truncated)


def test_wrong_kind_of_file_says_what_was_expected(tiny_files):
    with pytest.raises(models.ModelFileError, match=r"DiT .*qwen_image_vae_tiny.* does not match a Qwen-Image"):
        models.load_transformer(tiny_files.vae)
    with pytest.raises(models.ModelFileError, match=r"VAE .* does not match the Qwen-Image VAE"):
        models.load_vae(tiny_files.dit)


def test_full_size_config_is_used_without_embedded_config(tiny_files, tmp_path):
    raw = load_file(str(tiny_files.dit))
    no_config = tmp_path / "no_config.safetensors"
    save_file(raw, str(no_config))
    with pytest.raises(models.ModelFileError, match="with 60 blocks"):
        models.load_transformer(no_config)
    shipped = json.loads((models.CONFIG_DIR / models.TRANSFORMER_CONFIG).read_text())
    assert shipped["num_layers"] == 60 and shipped["joint_attention_dim"] == 3584


def test_missing_file_and_missing_tokenizer(tmp_path):
    with pytest.raises(models.ModelFileError, match="not found"):
        models.load_vae(tmp_path / "nope.safetensors")
    with pytest.raises(models.ModelFileError, match="--tokenizer"):
        models.load_processor(tmp_path)


def test_fp8_dit_file_is_upcast(tiny_files, tmp_path):
    from tiny_qwen import fp8_scaled

    raw = load_file(str(tiny_files.dit))
    with safe_open(str(tiny_files.dit), "pt") as f:
        metadata = f.metadata()
    fp8 = tmp_path / "dit_fp8_scaled.safetensors"
    save_file(fp8_scaled(raw), str(fp8), metadata=metadata)
    model = models.load_transformer(fp8, torch.float32)
    want = raw[DIT_PREFIX + "transformer_blocks.0.attn.to_q.weight"]
    got = model.transformer_blocks[0].attn.to_q.weight
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=0.07, atol=2e-3)
