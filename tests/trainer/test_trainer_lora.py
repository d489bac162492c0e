"""LoRA targets, network args, and loading a saved LoRA file back (--network_weights)."""

from __future__ import annotations

import pytest
import torch
from face_consistency.trainer import models
from face_consistency.trainer.lora import (
    NetworkArgsError,
    add_lora,
    comfy_lora_state_dict,
    load_comfy_lora,
    lora_file_modules,
    lora_target_modules,
    parse_network_args,
    save_lora,
)
from safetensors.torch import load_file
from tiny_qwen import write_tiny_model_files

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return write_tiny_model_files(tmp_path_factory.mktemp("models")).dit


def test_default_targets_are_attention_and_mlp_without_modulation(dit):
    model = models.load_transformer(dit, torch.float32)
    targets = lora_target_modules(model, parse_network_args([]))
    assert "transformer_blocks.0.attn.to_q" in targets and "transformer_blocks.0.img_mlp.net.2" in targets
    assert "transformer_blocks.1.attn.add_k_proj" in targets
    assert not any("img_mod" in t or "txt_mod" in t for t in targets)
    assert "transformer_blocks.1.txt_mlp.net.2" not in targets  # last block's text output is unused
    assert not any(not t.startswith("transformer_blocks.") for t in targets)


def test_include_and_exclude_patterns(dit):
    model = models.load_transformer(dit, torch.float32)
    args = parse_network_args(["exclude_patterns=[r'.*\\.attn\\..*']", "include_patterns=['img_mod']"])
    targets = lora_target_modules(model, args)
    assert not any(".attn." in t for t in targets)
    assert "transformer_blocks.0.img_mod.1" in targets


@pytest.mark.parametrize("entry", ["include_patterns", "exclude_patterns=[1]", "exclude_patterns=['(']", "x=1"])
def test_bad_network_args(entry):
    with pytest.raises(NetworkArgsError):
        parse_network_args([entry])


def test_saved_file_loads_back_with_alpha_folded_in(dit, tmp_path):
    trained = models.load_transformer(dit, torch.float32)
    targets = lora_target_modules(trained, parse_network_args([]))
    params = add_lora(trained, 4, 4.0, targets)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    path = save_lora(tmp_path / "l.safetensors", trained, 4.0, {"ss_network_dim": "4"})
    restarted = models.load_transformer(dit, torch.float32)
    add_lora(restarted, 4, 2.0, targets)
    assert load_comfy_lora(restarted, path, 2.0) == len(targets)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 64),
        timestep=torch.tensor([0.3]),
        encoder_hidden_states=torch.randn(1, 5, 32),
        img_shapes=[[(1, 4, 4)]],
        return_dict=False,
    )
    with torch.no_grad():
        assert torch.allclose(trained(**inputs)[0], restarted(**inputs)[0], atol=1e-5)
    saved = load_file(str(path))
    assert saved.keys() == comfy_lora_state_dict(trained, 4.0).keys()

    wrong_rank = models.load_transformer(dit, torch.float32)
    add_lora(wrong_rank, 8, 8.0, targets)
    with pytest.raises(NetworkArgsError, match="network_dim"):
        load_comfy_lora(wrong_rank, path, 8.0)


def test_fp8_base_keeps_the_lora_in_fp32_and_base_weights_in_float8(dit):
    import argparse

    from face_consistency.trainer.train import prepare_transformer

    args = argparse.Namespace(
        dit=dit,
        model_version="edit-2509",
        blocks_to_swap=1,
        network_args=[],
        fp8_base=True,
        network_dim=4,
        rope_positions="comfyui",
        network_alpha=4.0,
        network_weights=None,
        gradient_checkpointing=True,
    )
    transformer, params = prepare_transformer(args, torch.device("cpu"), torch.float32)
    assert {p.dtype for p in params} == {torch.float32}
    layer = transformer.transformer_blocks[0].attn.to_q
    assert layer.base_layer.weight.dtype == torch.float8_e4m3fn
    assert layer.lora_A.default.weight.std() > 0.01 and torch.count_nonzero(layer.lora_B.default.weight) == 0
    out = transformer(
        hidden_states=torch.randn(1, 16, 64),
        timestep=torch.tensor([0.5]),
        encoder_hidden_states=torch.randn(1, 5, 32),
        img_shapes=[[(1, 4, 4)]],
        return_dict=False,
    )[0]
    out.square().mean().backward()
    assert all(p.grad is not None for p in params)
    assert layer.lora_B.default.weight.grad is not None and layer.base_layer.weight.grad is None


def musubi_lora_state_dict(transformer: torch.nn.Module, rank: int, alpha: float, seed: int = 0) -> dict:
    """A LoRA as musubi-tuner's networks/lora_qwen_image.py writes one: every Linear of every
    QwenImageTransformerBlock (its `.*(_mod_).*` exclude, matched with fullmatch, never fires),
    named `lora_unet_<path with dots as underscores>`, saved in bf16 with a per-module alpha."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for index, block in enumerate(transformer.transformer_blocks):
        assert type(block).__name__ == "QwenImageTransformerBlock"  # musubi's QWEN_IMAGE_TARGET_REPLACE_MODULES
        for child, module in block.named_modules():
            if module.__class__.__name__ != "Linear":
                continue
            name = f"lora_unet.transformer_blocks.{index}.{child}".replace(".", "_")
            out[f"{name}.lora_down.weight"] = (
                torch.randn(rank, module.in_features, generator=generator) * 0.1
            ).bfloat16()
            out[f"{name}.lora_up.weight"] = (
                torch.randn(module.out_features, rank, generator=generator) * 0.1
            ).bfloat16()
            out[f"{name}.alpha"] = torch.tensor(alpha).bfloat16()
    return out


def test_musubi_target_set_is_every_linear_of_every_block(dit):
    model = models.load_transformer(dit, torch.float32)
    musubi = lora_target_modules(model, parse_network_args(["target_set=musubi"]))
    linears = [n for n, m in model.transformer_blocks.named_modules() if isinstance(m, torch.nn.Linear)]
    assert musubi == [f"transformer_blocks.{n}" for n in linears]
    assert {
        "transformer_blocks.0.img_mod.1",
        "transformer_blocks.1.txt_mod.1",
        "transformer_blocks.1.txt_mlp.net.2",
        "transformer_blocks.1.attn.to_add_out",
    } <= set(musubi)
    assert (
        lora_file_modules(model, _save(musubi_lora_state_dict(model, 2, 1.0), dit.parent / "m.safetensors")) == musubi
    )
    with pytest.raises(NetworkArgsError, match="target_set"):
        parse_network_args(["target_set=all"])


def test_real_model_has_840_musubi_targets_against_717():
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    with init_empty_weights():
        real = QwenImageTransformer2DModel(**models.shipped_config("qwen_image_edit_transformer.json"))
    assert len(lora_target_modules(real, parse_network_args(["target_set='musubi'"]))) == 840
    assert len(lora_target_modules(real, parse_network_args([]))) == 717


def _save(tensors: dict, path) -> str:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora_qwen_image", "ss_network_dim": "2"})
    return str(path)


def test_network_weights_of_a_musubi_lora_load_every_layer_with_its_delta(dit, tmp_path):
    import argparse

    from face_consistency.trainer.train import prepare_transformer

    reference = models.load_transformer(dit, torch.float32)
    tensors = musubi_lora_state_dict(reference, rank=2, alpha=1.0)
    path = _save(tensors, tmp_path / "musubi.safetensors")
    args = argparse.Namespace(
        dit=dit,
        model_version="edit-2509",
        blocks_to_swap=0,
        network_args=[],
        fp8_base=False,
        network_dim=2,
        network_alpha=2.0,
        network_weights=path,
        gradient_checkpointing=False,
        rope_positions="comfyui",
    )
    transformer, params = prepare_transformer(args, torch.device("cpu"), torch.float32)
    layer = transformer.transformer_blocks[0].img_mod[1]  # outside this trainer's default set
    stem = "lora_unet_transformer_blocks_0_img_mod_1"
    delta = layer.lora_B.default.weight @ layer.lora_A.default.weight * layer.scaling["default"]
    expected = tensors[f"{stem}.lora_up.weight"].float() @ tensors[f"{stem}.lora_down.weight"].float() * (1.0 / 2)
    torch.testing.assert_close(delta, expected)
    assert len(params) == 2 * len(tensors) // 3
    saved = comfy_lora_state_dict(transformer, 2.0)
    assert saved.keys() == tensors.keys()  # saved back under musubi's names, every layer
