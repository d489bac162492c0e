"""A Qwen-Image 2.1 LoRA in the layout ComfyUI's 2.1 loader applies, fused gate/up included, and
`--network_weights` continuing one.

`comfyui_qwen_image_lora_key_map` is the key listing of ComfyUI's `comfy/lora.py`
(`model_lora_keys_unet`: its generic entries and the `QwenImage` branch, which Qwen-Image 2.1's model
class inherits), as read in ComfyUI's source for the model ComfyUI builds from a 2.1 file
(`comfy/ldm/qwen_image21/model.py`: Linear layers `to_q/to_k/to_v/to_out.0`, a fused
`img_mlp.gate_up` and `img_mlp.out`; all under `diffusion_model.`). A target is the weight's name,
or (name, (dim, first row, rows)) for a half of the fused gate/up.
"""

from __future__ import annotations

import json

import pytest
import torch
from face_consistency.trainer import qwen_image21_loading as q21
from face_consistency.trainer.lora import (
    NetworkArgsError,
    add_lora,
    load_comfy_lora,
    lora_file_modules,
    lora_target_modules,
    parse_network_args,
    save_lora,
)
from face_consistency.training_contract import libraries
from face_consistency.training_contract.model_versions import MODEL_VERSIONS
from safetensors.torch import load_file, save_file
from tiny_qwen_image21 import (
    TINY_21_TRANSFORMER_CONFIG,
    fuse_gate_up,
    tiny_qwen_image21_transformer,
    write_tiny_qwen_image21_files,
)

# marked for CI's run under the declared floors, where 2.1's classes do not exist and these skip
pytestmark = [
    pytest.mark.trainer,
    pytest.mark.skipif(libraries.too_old_for("qwen-image-2.1") is not None, reason="needs 2.1's classes"),
]


def comfyui_qwen_image_lora_key_map(comfy_state_dict: dict[str, torch.Tensor]) -> dict[str, object]:
    key_map: dict[str, object] = {}
    for k in comfy_state_dict:  # the generic entries of every diffusion model
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_map["lora_unet_{}".format(k[len("diffusion_model.") : -len(".weight")].replace(".", "_"))] = k
            key_map[k[: -len(".weight")]] = k
    for k in comfy_state_dict:  # isinstance(model, comfy.model_base.QwenImage)
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_lora = k[len("diffusion_model.") : -len(".weight")]
            targets = [(key_lora, k)]
            if key_lora.endswith(".img_mlp.gate_up"):
                half = comfy_state_dict[k].shape[0] // 2
                targets = [
                    (key_lora.replace(".gate_up", ".gate_layer"), (k, (0, 0, half))),
                    (key_lora.replace(".gate_up", ".proj"), (k, (0, half, half))),
                ]
            for key_lora, to in targets:
                key_map[key_lora] = to
                key_map[f"transformer.{key_lora}"] = to
                key_map["lycoris_{}".format(key_lora.replace(".", "_"))] = to
    return key_map


def comfyui_apply(comfy_state_dict: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Patch the weights as ComfyUI's loader does: each mapped LoRA's `up @ down * alpha / rank` added to
    its weight, or to the rows its offset names; a LoRA key that maps to nothing is left over."""
    key_map = comfyui_qwen_image_lora_key_map(comfy_state_dict)
    patched = {k: v.clone() for k, v in comfy_state_dict.items()}
    used = set()
    for stem, target in key_map.items():
        if f"{stem}.lora_up.weight" not in lora:
            continue
        up, down = lora[f"{stem}.lora_up.weight"], lora[f"{stem}.lora_down.weight"]
        alpha = float(lora[f"{stem}.alpha"]) if f"{stem}.alpha" in lora else float(down.shape[0])
        delta = (up @ down) * (alpha / down.shape[0])
        name, offset = (target, None) if isinstance(target, str) else target
        weight = patched[name] if offset is None else patched[name].narrow(*offset)
        weight += delta
        used |= {f"{stem}.lora_up.weight", f"{stem}.lora_down.weight", f"{stem}.alpha"}
    leftover = sorted(set(lora) - used)
    assert not leftover, f"ComfyUI would not load {leftover[:3]}"
    return patched


def _trained_lora(transformer: torch.nn.Module, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05


def _forward(model: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    text = torch.randn(1, 3, 32, generator=generator)
    latents = torch.randn(1, 16, 64, generator=generator)
    with torch.no_grad():
        return model(latents, text, torch.tensor([0.6]), [[(1, 4, 4)]], torch.tensor([[False] * 3 + [True] * 4])).sample


def test_lora_keys_are_applied_by_comfyui_onto_the_fused_gate_up(tmp_path):
    files = write_tiny_qwen_image21_files(tmp_path / "models")
    transformer = q21.load_transformer(files.dit, torch.float32)
    targets = lora_target_modules(transformer, parse_network_args([]))
    assert "transformer_blocks.0.img_mlp.gate_layer" in targets and "transformer_blocks.1.attn.to_out.0" in targets
    add_lora(transformer, 4, 2.0, targets)
    _trained_lora(transformer)
    path = save_lora(tmp_path / "face.safetensors", transformer, 2.0, MODEL_VERSIONS["qwen-image-2.1"].lora_metadata)
    lora = load_file(str(path))
    assert "transformer.transformer_blocks.0.img_mlp.gate_layer.lora_down.weight" in lora
    assert not any(k.startswith("lora_unet_") for k in lora)

    comfy_sd = {
        "diffusion_model." + k: v for k, v in fuse_gate_up(tiny_qwen_image21_transformer(0).state_dict()).items()
    }
    key_map = comfyui_qwen_image_lora_key_map(comfy_sd)
    stems = {k.rsplit(".", 2)[0] for k in lora if k.endswith(".lora_down.weight")}
    assert stems <= set(key_map)
    gate_targets = [key_map[s] for s in stems if s.endswith("img_mlp.gate_layer")]
    assert gate_targets and all(isinstance(t, tuple) and t[1][1] == 0 for t in gate_targets)

    # The model ComfyUI patches (fused file + LoRA) predicts what the trained model predicts.
    patched = comfyui_apply(comfy_sd, lora)
    patched_file = tmp_path / "patched.safetensors"
    save_file(
        {k.removeprefix("diffusion_model."): v for k, v in patched.items()},
        str(patched_file),
        metadata={"config": json.dumps(TINY_21_TRANSFORMER_CONFIG)},
    )
    merged = q21.load_transformer(patched_file, torch.float32)
    transformer.eval()
    assert torch.allclose(_forward(merged), _forward(transformer), atol=1e-5)
    assert not torch.allclose(_forward(merged), _forward(q21.load_transformer(files.dit, torch.float32)), atol=1e-3)


def test_network_weights_continue_a_qwen_image21_lora(tmp_path):
    files = write_tiny_qwen_image21_files(tmp_path / "models")
    trained = q21.load_transformer(files.dit, torch.float32)
    add_lora(trained, 4, 4.0, lora_target_modules(trained, parse_network_args([])))
    _trained_lora(trained)
    path = save_lora(tmp_path / "face.safetensors", trained, 4.0, {})

    fresh = q21.load_transformer(files.dit, torch.float32)
    modules = lora_file_modules(fresh, path)
    assert "transformer_blocks.1.img_mlp.proj" in modules
    add_lora(fresh, 4, 2.0, modules)  # another alpha: folded into the up weights
    assert load_comfy_lora(fresh, path, 2.0) == len(modules)
    trained.eval(), fresh.eval()
    assert torch.allclose(_forward(fresh), _forward(trained), atol=1e-5)


def test_a_2509_lora_names_no_layer_of_qwen_image21(tmp_path):
    files = write_tiny_qwen_image21_files(tmp_path / "models")
    model = q21.load_transformer(files.dit, torch.float32)
    # a Qwen-Image-Edit layer: 2.1 has no text-stream projections
    lora = {
        "lora_unet_transformer_blocks_0_attn_add_q_proj.lora_down.weight": torch.zeros(4, 64),
        "lora_unet_transformer_blocks_0_attn_add_q_proj.lora_up.weight": torch.zeros(64, 4),
    }
    save_file(lora, str(tmp_path / "edit_2509.safetensors"))
    with pytest.raises(NetworkArgsError, match="name no Linear layer .*LoRA for this --model_version"):
        lora_file_modules(model, tmp_path / "edit_2509.safetensors")


def test_every_block_linear_of_the_full_size_model_gets_a_key_comfyui_applies():
    """On the real 2.1 architecture (meta device): the default targets are every Linear of the 32 blocks,
    each saved name is in ComfyUI's key map, and together they cover every block weight ComfyUI holds,
    the fused gate_up by its two halves."""
    from accelerate import init_empty_weights
    from diffusers import QwenImage21Transformer2DModel
    from face_consistency.trainer import models
    from face_consistency.trainer.lora import lora_key

    with init_empty_weights():
        model = QwenImage21Transformer2DModel(**models.shipped_config(q21.TRANSFORMER_CONFIG))
    targets = lora_target_modules(model, parse_network_args([]))
    assert len(targets) == 32 * 7  # to_q, to_k, to_v, to_out.0, img_mlp.gate_layer, .proj, .out
    comfy_sd = {"diffusion_model." + k: v for k, v in fuse_gate_up(model.state_dict()).items()}
    key_map = comfyui_qwen_image_lora_key_map(comfy_sd)
    covered: dict[str, list] = {}
    for target in targets:
        mapped = key_map[lora_key(target, model)]
        name, offset = (mapped, None) if isinstance(mapped, str) else mapped
        covered.setdefault(name, []).append(offset)
    block_weights = {k for k, v in comfy_sd.items() if ".transformer_blocks." in k and v.dim() == 2}
    assert set(covered) == block_weights
    half = 3 * 4096
    assert sorted(covered["diffusion_model.transformer_blocks.5.img_mlp.gate_up.weight"]) == [
        (0, 0, half),
        (0, half, half),
    ]
