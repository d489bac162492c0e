"""The trainer's samples beside ComfyUI's own sampler, on one DiT, noise and conditioning.

Run as a script with ComfyUI's source folder first on sys.path (tests/e2e/test_e2e_sampling.py does,
in a subprocess, so ComfyUI's global settings stay out of the test process):

    python tests/support/comfyui_sampling_parity.py COMFYUI_DIR CASES_JSON

CASES_JSON is a list of cases, each {"name", "width", "height", "references": [[w, h], ...] (px),
"steps", "shift_terminal", "cfg"} and optionally "before_shift_terminal" (the old default's).
For each, a random 1-block Qwen-Image DiT (float32, CPU) loads
into diffusers' class (the trainer's) and ComfyUI's; the trainer draws with `trainer/sampling.py`'s
`denoise`, ComfyUI with its nodes as a graph would: ModelSamplingAuraFlow(3.0) and CFGNorm(1.0) on the
model, TextEncodeQwenImageEditPlus-style conditioning (reference latents), then KSampler euler/simple,
or SamplerCustom euler with LTXVScheduler's sigmas when the case has a terminal stretch. Prints one
JSON object: per case the relative difference of the final latents (trainer vs ComfyUI), and the same
for the trainer with diffusers' positions and exact linspace sigmas (the convention before), which
tells a case that checks something from one that cannot fail.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import nullcontext
from unittest import mock

import torch

DIT_CONFIG = {  # one block, two heads of the real model's width and rope layout (16, 56, 56)
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 1,
    "attention_head_dim": 128,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "axes_dims_rope": (16, 56, 56),
}
SHIFT = 3.0
SEED = 42
TEXT_TOKENS = 12
WEIGHT_STD = 0.07


def comfyui_model(state_dict: dict[str, torch.Tensor]):
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.QwenImage({"image_model": "qwen_image", **DIT_CONFIG})
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    missing, unexpected = model.diffusion_model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise SystemExit(
            f"ComfyUI's model does not take diffusers' keys: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def comfyui_final(patcher, case, embeds, negative, raw_references, latent_h, latent_w) -> torch.Tensor:
    import comfy.sample
    import comfy.samplers
    import node_helpers
    from comfy_extras.nodes_cfg import CFGNorm
    from comfy_extras.nodes_lt import LTXVScheduler
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow

    import nodes

    model = ModelSamplingAuraFlow().patch_aura(patcher, SHIFT)[0]
    model = CFGNorm.execute(model, 1.0).args[0]

    def conditioning(tensor):
        return node_helpers.conditioning_set_values([[tensor, {}]], {"reference_latents": raw_references}, append=True)

    latent = {"samples": torch.zeros(1, 16, latent_h, latent_w)}  # EmptySD3LatentImage
    positive, negative_cond = conditioning(embeds), conditioning(negative)
    if case["shift_terminal"]:
        sigmas = LTXVScheduler.execute(
            case["steps"], math.log(SHIFT), math.log(SHIFT), True, case["shift_terminal"]
        ).args[0]
        latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])  # as SamplerCustom
        noise = comfy.sample.prepare_noise(latent_image, SEED)
        out = comfy.sample.sample_custom(
            model,
            noise,
            case["cfg"],
            comfy.samplers.sampler_object("euler"),
            sigmas,
            positive,
            negative_cond,
            latent_image,
            seed=SEED,
            disable_pbar=True,
        )
    else:
        out = nodes.common_ksampler(
            model, SEED, case["steps"], case["cfg"], "euler", "simple", positive, negative_cond, latent
        )[0]["samples"]
    return out


def trainer_final(transformer, case, embeds, negative, references, *, before: bool) -> torch.Tensor:
    import numpy as np
    from face_consistency.trainer import sampling

    settings = sampling.SampleSettings(
        index=0,
        prompt="",
        width=case["width"],
        height=case["height"],
        steps=case["steps"],
        flow_shift=SHIFT,
        cfg_scale=case["cfg"],
    )
    sample = sampling.EncodedSample(settings, embeds, negative if case["cfg"] > 1 else None, references)
    context = nullcontext()
    if before:  # diffusers' positions, exact linspace sigmas: what the samples did before
        context = mock.patch.multiple(
            sampling,
            use_positions=lambda *_: nullcontext(),
            unshifted_sigmas=lambda steps, terminal: np.linspace(1.0, 1.0 / steps, steps),
        )
    with context:
        terminal = case.get("before_shift_terminal", case["shift_terminal"]) if before else case["shift_terminal"]
        return sampling.denoise(
            transformer, sample, 8, seed=SEED, device=torch.device("cpu"), dtype=torch.float32, shift_terminal=terminal
        )


def run(cases: list[dict]) -> dict:
    import comfy.latent_formats
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(**DIT_CONFIG).eval()
    with torch.no_grad():  # diffusers zero-initialises some projections; random weights exercise every path
        for parameter in transformer.parameters():
            parameter.normal_(0.0, WEIGHT_STD)
    patcher = comfyui_model(transformer.state_dict())
    latent_format = comfy.latent_formats.Wan21()
    results = {}
    for case in cases:
        generator = torch.Generator().manual_seed(1)
        embeds = torch.randn(1, TEXT_TOKENS, DIT_CONFIG["joint_attention_dim"], generator=generator)
        negative = torch.randn(1, TEXT_TOKENS, DIT_CONFIG["joint_attention_dim"], generator=generator)
        references = [torch.randn(1, 16, 1, h // 8, w // 8, generator=generator) for w, h in case["references"]]
        raw_references = [latent_format.process_out(r) for r in references]  # ComfyUI's VAE space
        latent_h, latent_w = case["height"] // 8, case["width"] // 8
        theirs = latent_format.process_in(
            comfyui_final(patcher, case, embeds, negative, raw_references, latent_h, latent_w)
        ).reshape(1, 16, 1, latent_h, latent_w)
        ours = trainer_final(transformer, case, embeds, negative, references, before=False)
        before = trainer_final(transformer, case, embeds, negative, references, before=True)
        scale = theirs.norm().item()
        results[case["name"]] = {
            "relative": (ours - theirs).norm().item() / scale,
            "relative_before": (before - theirs).norm().item() / scale,
        }
    return results


if __name__ == "__main__":
    comfyui_dir, cases_json = sys.argv[1], sys.argv[2]
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, comfyui_dir)
    import comfy.options

    comfy.options.enable_args_parsing()
    print(json.dumps(run(json.loads(cases_json))))
