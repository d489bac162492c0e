"""Loading ComfyUI-style single files (tiny random models with the real key layouts)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from face_consistency.trainer import models
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_qwen import DIT_PREFIX, write_tiny_model_files

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return write_tiny_model_files(tmp_path_factory.mktemp("models"))


def test_files_use_comfyui_key_layouts(tiny_files):
    with safe_open(str(tiny_files.dit), "pt") as f:
        assert all(k.startswith(DIT_PREFIX) for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
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
    assert torch.equal(
        encoder.model.language_model.layers[0].self_attn.q_proj.weight, raw["model.layers.0.self_attn.q_proj.weight"]
    )
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


def test_fp8_base_stores_float8_as_each_tensor_is_read(tiny_files):
    model = models.load_transformer(tiny_files.dit, torch.bfloat16, fp8_base=True)
    raw = load_file(str(tiny_files.dit))
    layer = model.transformer_blocks[0].attn.to_q
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(layer.weight, raw[DIT_PREFIX + "transformer_blocks.0.attn.to_q.weight"].to(torch.float8_e4m3fn))
    # norms stay in the compute dtype (diffusers' layerwise-casting skip list)
    assert model.transformer_blocks[0].attn.norm_q.weight.dtype == torch.bfloat16
    out = model(
        hidden_states=torch.randn(1, 16, 64, dtype=torch.bfloat16),
        timestep=torch.tensor([0.5]),
        encoder_hidden_states=torch.randn(1, 5, 32, dtype=torch.bfloat16),
        img_shapes=[[(1, 4, 4)]],
        return_dict=False,
    )[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_reading_in_small_chunks_loads_the_same_model(tiny_files, monkeypatch):
    whole = models.load_transformer(tiny_files.dit, torch.float32)
    opened = []
    real_safe_open = models.safe_open

    def counting_safe_open(*args, **kwargs):
        opened.append(args[0])
        return real_safe_open(*args, **kwargs)

    monkeypatch.setattr(models, "safe_open", counting_safe_open)
    monkeypatch.setattr(models, "CHUNK_BYTES", 4096)
    chunked = models.load_transformer(tiny_files.dit, torch.float32)
    assert len(opened) > 10  # the file was reopened per chunk
    for (name, a), (_, b) in zip(whole.state_dict().items(), chunked.state_dict().items()):
        assert torch.equal(a, b), name


def test_placement_puts_each_tensor_where_it_is_asked(tiny_files):
    asked = []

    def placement(name):
        asked.append(name)
        return torch.device("cpu")

    model = models.load_transformer(tiny_files.dit, torch.float32, placement=placement)
    assert set(model.state_dict()) <= set(asked)


def test_edit_2511_file_needs_zero_cond_t(tmp_path):
    files = write_tiny_model_files(tmp_path, edit_2511=True)
    with pytest.raises(models.ModelFileError, match="Qwen-Image-Edit-2511 .*pass --model_version edit-2511"):
        models.load_transformer(files.dit, torch.float32)
    model = models.load_transformer(files.dit, torch.float32, zero_cond_t=True)
    assert model.config.zero_cond_t and model.zero_cond_t


def test_zero_cond_t_conditions_the_reference_tokens_on_timestep_zero(tmp_path):
    files = write_tiny_model_files(tmp_path, edit_2511=True)
    model_2511 = models.load_transformer(files.dit, torch.float32, zero_cond_t=True)
    with safe_open(str(files.dit), "pt") as f:
        metadata = f.metadata()
    raw = load_file(str(files.dit))
    unmarked = tmp_path / "unmarked.safetensors"
    save_file({k: v for k, v in raw.items() if "__index" not in k}, str(unmarked), metadata=metadata)
    model_2509 = models.load_transformer(unmarked, torch.float32)
    torch.manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 32, 64),
        encoder_hidden_states=torch.randn(1, 5, 32),
        img_shapes=[[(1, 4, 4), (1, 4, 4)]],
        return_dict=False,
    )
    with torch.no_grad():
        at_t = model_2511(timestep=torch.tensor([0.7]), **inputs)[0]
        plain_at_t = model_2509(timestep=torch.tensor([0.7]), **inputs)[0]
        at_zero = model_2511(timestep=torch.tensor([0.0]), **inputs)[0]
        plain_at_zero = model_2509(timestep=torch.tensor([0.0]), **inputs)[0]
    assert not torch.allclose(at_t, plain_at_t, atol=1e-4)  # the reference tokens saw t = 0, not 0.7
    assert torch.allclose(at_zero, plain_at_zero, atol=1e-5)  # at t = 0 both conditionings agree


def test_large_host_allocations_are_mapped_where_glibc_allows(monkeypatch):
    import platform

    from face_consistency.trainer import host_memory

    glibc_linux = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert host_memory.map_large_allocations() is glibc_linux
    monkeypatch.setattr(host_memory.platform, "system", lambda: "Darwin")
    assert host_memory.map_large_allocations() is False
