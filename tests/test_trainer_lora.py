"""LoRA targets, network args, and loading a saved LoRA file back (--network_weights)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny_qwen import write_tiny_model_files

from face_consistency.trainer import models
from face_consistency.trainer.lora import (
    NetworkArgsError, add_lora, comfy_lora_state_dict, load_comfy_lora, lora_target_modules, parse_network_args,
    save_lora,
)

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
    inputs = dict(hidden_states=torch.randn(1, 16, 64), timestep=torch.tensor([0.3]),
                  encoder_hidden_states=torch.randn(1, 5, 32), img_shapes=[[(1, 4, 4)]], return_dict=False)
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

    from face_consistency.trainer.train import _prepare_transformer

    args = argparse.Namespace(dit=dit, model_version="edit-2509", blocks_to_swap=1, network_args=[], fp8_base=True, network_dim=4,
                              network_alpha=4.0, network_weights=None, gradient_checkpointing=True)
    transformer, params = _prepare_transformer(args, torch.device("cpu"), torch.float32)
    assert {p.dtype for p in params} == {torch.float32}
    layer = transformer.transformer_blocks[0].attn.to_q
    assert layer.base_layer.weight.dtype == torch.float8_e4m3fn
    assert layer.lora_A.default.weight.std() > 0.01 and torch.count_nonzero(layer.lora_B.default.weight) == 0
    out = transformer(hidden_states=torch.randn(1, 16, 64), timestep=torch.tensor([0.5]),
                      encoder_hidden_states=torch.randn(1, 5, 32), img_shapes=[[(1, 4, 4)]], return_dict=False)[0]
    out.square().mean().backward()
    assert all(p.grad is not None for p in params)
    assert layer.lora_B.default.weight.grad is not None and layer.base_layer.weight.grad is None
