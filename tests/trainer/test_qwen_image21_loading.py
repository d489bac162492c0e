"""Qwen-Image 2.1 files: the DiT and Qwen3-VL text encoder streamed from ComfyUI's single-file layouts
(tiny real-class models), the full-size shipped configs, and the checks that refuse a file of the
other family or too old libraries before anything is loaded."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from accelerate import init_empty_weights
from face_consistency.trainer import models
from face_consistency.trainer import qwen_image21_loading as q21
from face_consistency.trainer.cli import ConfigError, build_parser, validate_args
from face_consistency.training_contract import libraries
from face_consistency.training_contract.model_versions import QWEN_IMAGE_21, QWEN_IMAGE_EDIT
from safetensors.torch import save_file
from tiny_qwen import write_tiny_dataset, write_tiny_model_files
from tiny_qwen_image21 import (
    TINY_21_TRANSFORMER_CONFIG,
    fuse_gate_up,
    tiny_qwen_image21_transformer,
    tiny_qwen_image21_vae,
    write_tiny_qwen_image21_files,
)

# Run again by CI under the declared floors, where 2.1's classes do not exist: there the tests that
# need them skip, and the CLI's refusal naming the versions needed is what is tested.
pytestmark = pytest.mark.trainer
TOO_OLD_FOR_21 = libraries.too_old_for("qwen-image-2.1")
needs_21_classes = pytest.mark.skipif(TOO_OLD_FOR_21 is not None, reason=str(TOO_OLD_FOR_21))


def _forward(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    """One block-causal pass: a 3-token prompt and a 4x4-token target image."""
    generator = torch.Generator().manual_seed(seed)
    height = width = 4
    text = torch.randn(1, 3, TINY_21_TRANSFORMER_CONFIG["context_in_dim"], generator=generator)
    latents = torch.randn(1, height * width, TINY_21_TRANSFORMER_CONFIG["in_channels"], generator=generator)
    img_mask = torch.tensor([[False] * 3 + [True] * (height * width // 4)])
    with torch.no_grad():
        return model(latents, text, torch.tensor([0.4]), [[(1, height, width)]], img_mask).sample


@needs_21_classes
@pytest.mark.parametrize("dit_prefix", [True, False])
def test_dit_streams_from_comfyui_layout_with_fused_gate_up(tmp_path, dit_prefix):
    files = write_tiny_qwen_image21_files(tmp_path, dit_prefix=dit_prefix)
    reference = tiny_qwen_image21_transformer(0)
    placed = []

    def placement(name):
        placed.append(name)
        return torch.device("cpu")

    loaded = q21.load_transformer(files.dit, torch.float32, placement=placement)
    expected = reference.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert (
        "transformer_blocks.1.img_mlp.gate_layer.weight" in placed
        and "transformer_blocks.1.img_mlp.proj.weight" in placed
    )
    assert torch.allclose(_forward(loaded), _forward(reference), atol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())


@needs_21_classes
def test_dit_fp8_file_and_fp8_base(tmp_path):
    files = write_tiny_qwen_image21_files(tmp_path, dit_fp8=True)
    reference = tiny_qwen_image21_transformer(0)
    loaded = q21.load_transformer(files.dit, torch.float32, fp8_base=True)
    assert loaded.transformer_blocks[0].img_mlp.gate_layer.weight.dtype == torch.float8_e4m3fn
    assert loaded.transformer_blocks[0].img_mlp.proj.weight.dtype == torch.float8_e4m3fn
    # float8 twice (the file, then the storage) keeps the output near the full-precision model's
    out, ref = _forward(loaded), _forward(reference)
    assert (out - ref).abs().mean() < 0.1 * ref.abs().mean()


@needs_21_classes
def test_dit_with_a_broken_fused_tensor_is_refused_before_reading(tmp_path, monkeypatch):
    reference = tiny_qwen_image21_transformer(0)
    sd = fuse_gate_up(reference.state_dict())
    sd["transformer_blocks.0.img_mlp.gate_up.weight"] = sd["transformer_blocks.0.img_mlp.gate_up.weight"][:-2].clone()
    path = tmp_path / "qwen_image_2.1_broken.safetensors"
    save_file(sd, str(path), metadata={"config": json.dumps(TINY_21_TRANSFORMER_CONFIG)})
    monkeypatch.setattr(models, "read_tensors", lambda *a, **k: pytest.fail("tensor data read"))
    with pytest.raises(models.ModelFileError, match=r"does not match a Qwen-Image 2.1 transformer.*other shapes"):
        q21.load_transformer(path, torch.float32)


@needs_21_classes
def test_files_of_the_other_family_are_refused_from_the_header(tmp_path, monkeypatch):
    files_21 = write_tiny_qwen_image21_files(tmp_path / "q21")
    files_2509 = write_tiny_model_files(tmp_path / "q2509")
    header_21 = models.read_header(files_21.dit, "DiT (--dit)")
    header_2509 = models.read_header(files_2509.dit, "DiT (--dit)")
    q21.check_dit_family(header_21, QWEN_IMAGE_21)
    q21.check_dit_family(header_2509, QWEN_IMAGE_EDIT)
    with pytest.raises(models.ModelFileError, match="is a Qwen-Image 2.1 model .*--model_version qwen-image-2.1"):
        q21.check_dit_family(header_21, QWEN_IMAGE_EDIT)
    with pytest.raises(models.ModelFileError, match="is not a Qwen-Image 2.1 model .*qwen_image_2.1_"):
        q21.check_dit_family(header_2509, QWEN_IMAGE_21)
    monkeypatch.setattr(models, "read_tensors", lambda *a, **k: pytest.fail("tensor data read"))
    with pytest.raises(models.ModelFileError, match="is not a Qwen-Image 2.1 model"):
        q21.load_transformer(files_2509.dit, torch.float32)


@needs_21_classes
@pytest.mark.parametrize("fp8", [False, True])
def test_qwen3_vl_text_encoder_streams_from_comfyui_layout(tmp_path, fp8):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    files = write_tiny_qwen_image21_files(tmp_path, text_encoder_fp8=fp8)
    config = json.loads(models.read_header(files.text_encoder, "te").metadata["config"])
    torch.manual_seed(1)
    reference = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**config)).eval()
    loaded = q21.load_text_encoder(files.text_encoder, torch.float32)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        out = loaded.model(input_ids=ids).last_hidden_state
        ref = reference.model(input_ids=ids).last_hidden_state
    if fp8:
        assert (out - ref).abs().mean() < 0.1 * ref.abs().mean()
    else:
        assert torch.allclose(out, ref, atol=1e-5)


@needs_21_classes
@pytest.mark.parametrize("time_axis", [True, False])
def test_vae_streams_from_comfyui_wan22_layout(tmp_path, time_axis):
    """ComfyUI's nested Wan 2.2 names become AutoencoderKLQwenImage21's, with or without the singleton time
    axis on the convolutions; the loaded VAE encodes RGBA to 64 channels at 1/16 and decodes as the original."""
    files = write_tiny_qwen_image21_files(tmp_path, vae_time_axis=time_axis)
    reference = tiny_qwen_image21_vae(0).eval()
    loaded = q21.load_vae(files.vae)
    assert set(loaded.state_dict()) == set(reference.state_dict())
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in loaded.state_dict().items())
    pixels = torch.rand(1, 4, 1, 64, 32) * 2 - 1
    with torch.no_grad():
        latents = loaded.encode(pixels).latent_dist.mode()
        assert latents.shape == (1, 64, 1, 4, 2)
        assert torch.allclose(loaded.decode(latents).sample, reference.decode(latents).sample)


@needs_21_classes
def test_vae_of_the_other_family_is_refused_from_the_header(tmp_path, monkeypatch):
    files_21 = write_tiny_qwen_image21_files(tmp_path / "q21")
    files_2509 = write_tiny_model_files(tmp_path / "q2509")
    monkeypatch.setattr(models, "read_tensors", lambda *a, **k: pytest.fail("tensor data read"))
    with pytest.raises(models.ModelFileError, match="is not Qwen-Image 2.1's VAE .*qwen_image_2.1_vae"):
        q21.load_vae(files_2509.vae)
    with pytest.raises(models.ModelFileError, match="is Qwen-Image 2.1's VAE .*qwen_image_vae.safetensors"):
        q21.check_vae_family(models.read_header(files_21.vae, "VAE (--vae)"), QWEN_IMAGE_EDIT)


@needs_21_classes
def test_full_size_configs_match_the_published_models():
    """Qwen-Image 2.1's DiT (7.1 B parameters, 265 tensors in ComfyUI's fused layout: 8 per block and 9
    outside) and Qwen3-VL-8B (8.77 B, 750 tensors), built on the meta device from the shipped configs."""
    from diffusers import QwenImage21Transformer2DModel
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    with init_empty_weights():
        dit = QwenImage21Transformer2DModel(**models.shipped_config(q21.TRANSFORMER_CONFIG))
        te = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**models.shipped_config(q21.TEXT_ENCODER_CONFIG)))
    dit_sd = dit.state_dict()
    assert len(dit.transformer_blocks) == 32 and dit.inner_dim == 4096
    assert sum(v.numel() for v in dit_sd.values()) == 7_115_124_736
    comfy_keys = fuse_gate_up({k: v for k, v in dit_sd.items()})
    assert len(comfy_keys) == 265
    assert comfy_keys["transformer_blocks.0.img_mlp.gate_up.weight"].shape == (2 * 3 * 4096, 4096)
    assert dit_sd["txt_in.in_layer.weight"].shape == (4096, 4096)  # Qwen3-VL's 4096-wide hidden states
    te_sd = te.state_dict()
    assert len(te_sd) == 750
    assert sum(v.numel() for v in te_sd.values()) == 8_767_123_696
    assert te.config.text_config.num_hidden_layers == 36 and te.config.vision_config.out_hidden_size == 4096


def _argv(dit, files, dataset, out, version):
    return [
        "--dit",
        str(dit),
        "--vae",
        str(files.vae),
        "--text_encoder",
        str(files.text_encoder),
        "--dataset_config",
        str(dataset),
        "--output_dir",
        str(out),
        "--model_version",
        version,
    ]


@needs_21_classes
def test_cli_checks_libraries_and_the_dit_family_before_loading(tmp_path, monkeypatch):
    files = write_tiny_model_files(tmp_path / "models")
    files_21 = write_tiny_qwen_image21_files(tmp_path / "models21")
    dataset = write_tiny_dataset(tmp_path / "data", n=1)
    parser = build_parser()

    def validate(dit, version):
        return validate_args(parser.parse_args(_argv(dit, files, dataset, tmp_path / "out", version)))

    with pytest.raises(ConfigError, match="is a Qwen-Image 2.1 model .*pass --model_version qwen-image-2.1"):
        validate(files_21.dit, "edit-2509")
    with pytest.raises(ConfigError, match="is not a Qwen-Image 2.1 model"):
        validate(files.dit, "qwen-image-2.1")
    with pytest.raises(ConfigError, match="is not Qwen3-VL .*Qwen-Image 2.1 reads Qwen3-VL-8B"):
        validate(files_21.dit, "qwen-image-2.1")  # with 2509's text encoder
    trainable = validate_args(
        parser.parse_args(_argv(files_21.dit, files_21, dataset, tmp_path / "out", "qwen-image-2.1"))
    )
    assert trainable.model_version == "qwen-image-2.1"
    with pytest.raises(ConfigError, match="is Qwen3-VL .*2509/2511 read Qwen2.5-VL-7B"):
        validate_args(parser.parse_args(_argv(files.dit, files_21, dataset, tmp_path / "out", "edit-2511")))
    mixed = argparse.Namespace(text_encoder=files_21.text_encoder, vae=files.vae)  # 2509's VAE with a 2.1 model
    with pytest.raises(ConfigError, match="is not Qwen-Image 2.1's VAE"):
        validate_args(parser.parse_args(_argv(files_21.dit, mixed, dataset, tmp_path / "out", "qwen-image-2.1")))
    assert validate(files.dit, "edit-2509").model_version == "edit-2509"

    old = {"diffusers": {"version": "0.39.0", "location": "x"}, "transformers": {"version": "4.52.1", "location": "x"}}
    monkeypatch.setattr(libraries, "versions", lambda names=libraries.REPORTED: {n: old[n] for n in names if n in old})
    with pytest.raises(ConfigError, match=r"needs diffusers>=0.41.0 and transformers>=4.57.1"):
        validate(files_21.dit, "qwen-image-2.1")
    assert validate(files.dit, "edit-2509").model_version == "edit-2509"  # 2509 keeps the declared floors


def test_the_installed_libraries_decide_whether_21_can_be_asked_for(tmp_path):
    """At the declared floors (CI's second run) the CLI stops a 2.1 job first, naming the versions; with
    newer libraries it goes on to check the files."""
    args = build_parser().parse_args(
        [
            "--dit",
            str(tmp_path / "missing.safetensors"),
            "--vae",
            "v",
            "--text_encoder",
            "t",
            "--dataset_config",
            "d",
            "--output_dir",
            str(tmp_path),
            "--model_version",
            "qwen-image-2.1",
        ]
    )
    expected = "needs diffusers>=0.41.0 and transformers>=4.57.1" if TOO_OLD_FOR_21 else "file not found"
    with pytest.raises(ConfigError, match=expected):
        validate_args(args)


def _int8_quantized(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """2-D weights as int8 plus a scale and a `.comfy_quant` entry, as ComfyUI's int8/ConvRot files hold them."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(".weight") and value.dim() == 2:
            scale = value.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
            out[key] = (value / scale).round().to(torch.int8)
            out[key[: -len(".weight")] + ".weight_scale"] = scale.float()
            out[key[: -len(".weight")] + ".comfy_quant"] = torch.tensor(list(b'{"format": "int8"}'), dtype=torch.uint8)
        else:
            out[key] = value
    return out


@needs_21_classes
def test_integer_quantized_files_are_refused_not_cast(tmp_path, monkeypatch):
    """int8 weights cast to bf16 would be garbage: the header check refuses them, for 2.1 and for 2509."""
    files = write_tiny_qwen_image21_files(tmp_path / "q21")
    files_2509 = write_tiny_model_files(tmp_path / "q2509")
    monkeypatch.setattr(models, "read_tensors", lambda *a, **k: pytest.fail("tensor data read"))
    for load, path in (
        (q21.load_transformer, files.dit),
        (q21.load_text_encoder, files.text_encoder),
        (models.load_transformer, files_2509.dit),
    ):
        header = models.read_header(path, "x")
        sd = {key: torch.zeros(shape, dtype=torch.bfloat16) for key, shape in header.shapes.items()}
        quantized = tmp_path / f"int8_{path.name}"
        save_file(_int8_quantized(sd), str(quantized), metadata=header.metadata)
        with pytest.raises(models.ModelFileError, match=r"holds integer-quantized weights .*: I8; .*use the bf16 file"):
            load(quantized, torch.float32)
