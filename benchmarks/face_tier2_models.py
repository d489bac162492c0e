"""The tiny real-class models of the tier-2 face-loss benchmark: a VAE that keeps identity and a base DiT
that draws faces, both fitted on generated pre-training faces and cached by a hash of their settings.

Used by `bench_face_loss_tier2.py` (read its docstring first). The model files are what the trainer
loads (`--vae`, `--dit`, `--text_encoder`, `--tokenizer`): the real diffusers / transformers classes in
tiny configs, written by the tests' writer (`tests/support/tiny_qwen.py`) in ComfyUI's single-file layouts. No
generated face is written into the repository; the cache lies outside it.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from face_consistency.trainer.cache import CacheEncoders
from face_consistency.trainer.flow_matching import Batch, micro_step
from safetensors.torch import save_file

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(BENCHMARKS.parent / "tests" / "support"))
from bench_face_vae_ceiling import fit, latent_statistics  # noqa: E402
from face_tier1_data import ROLE_SEEDS, Edit, shuffled_batches, to_uint8  # noqa: E402
from tiny_qwen import DIT_PREFIX, build_tiny_processor, diffusers_vae_key_to_wan, write_tiny_model_files  # noqa: E402

PROMPT = "apply the edit"  # the one caption of every pair and sample


@dataclass(frozen=True)
class VaeSettings:
    """A small `AutoencoderKLQwenImage`: 2 ** len(dim_mult - 1) pixels per latent (4x by default), z 16, the
    Wan key layout (2 res blocks) so ComfyUI's loader names apply."""

    base_dim: int = 8
    dim_mult: tuple[int, ...] = (1, 2, 4)
    steps: int = 800
    batch: int = 8
    lr: float = 2e-3

    def config(self) -> dict:
        downsamplings = len(self.dim_mult) - 1
        return {
            "base_dim": self.base_dim,
            "z_dim": 16,
            "dim_mult": list(self.dim_mult),
            "num_res_blocks": 2,
            "attn_scales": [],
            "temperal_downsample": [False] + [True] * (downsamplings - 1),
        }

    @property
    def scale(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


@dataclass(frozen=True)
class DitSettings:
    """A tiny `QwenImageTransformer2DModel`, pre-trained fully (no LoRA) on the pre-training people's
    (control -> `edit`) pairs; `edit` is weaker than the benchmark's, so that the LoRA has something to learn."""

    layers: int = 3
    heads: int = 3  # of 32 dims each
    steps: int = 1000
    batch: int = 16
    lr: float = 1e-3
    # `shift` timestep sampling of the pre-training. Not tier 1's 1: sampling starts from pure noise (t = 1),
    # where only the control says what to draw, and shift 1 almost never trains there (t > 0.9 on 1.4 % of the
    # steps): after 500 steps its one-step estimate from noise was as far from the target as the mean (latent
    # MSE 0.80, the control itself 0.32); 100 more steps at shift 3 (t > 0.9 on 14 %) took it to 0.29
    # (docs/face-loss.md, tier 2's probes).
    shift: float = 3.0
    ema: float = 0.995
    edit: Edit = field(default_factory=lambda: Edit(angle_deg=6.0, scale=0.94, shift_px=(1.5, 1.0)))

    def config(self) -> dict:
        return {
            "patch_size": 2,
            "in_channels": 64,
            "out_channels": 16,
            "num_layers": self.layers,
            "attention_head_dim": 32,
            "num_attention_heads": self.heads,
            "joint_attention_dim": 32,
            "guidance_embeds": False,
            "axes_dims_rope": [8, 12, 12],
        }


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, config: dict, settings: dict) -> None:
    partial = path.with_suffix(".partial")
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(partial),
        metadata={"config": json.dumps(config), "settings": json.dumps(settings, default=str)},
    )
    os.replace(partial, path)


def fitted_vae(settings: VaeSettings, faces: torch.Tensor, cache: Path, data_key: str, log=print) -> tuple[Path, bool]:
    """The VAE file (Wan names, config with the faces' latent statistics in its metadata) fitted on `faces`
    ([N, 3, 64, 64] in [-1, 1]) with the loss on the decoder's output before diffusers' clip
    (`bench_face_vae_ceiling.fit`); from the cache when these settings and data were fitted before."""
    from diffusers import AutoencoderKLQwenImage

    config = settings.config()
    key = _key(asdict(settings), config, data_key, "tier2-vae-v1")
    path = cache / f"tier2_vae_{settings.scale}x_b{settings.base_dim}_{key}.safetensors"
    if path.is_file():
        return path, False
    crops = to_uint8(faces)
    torch.manual_seed(ROLE_SEEDS["pretrain"])
    vae = AutoencoderKLQwenImage(**config)
    start = time.monotonic()
    l1 = fit(vae, crops, settings.steps, settings.batch, settings.lr, ROLE_SEEDS["pretrain"])
    log(
        f"  VAE fitted: {settings.steps} steps x batch {settings.batch} in {time.monotonic() - start:.0f} s, "
        f"last L1 {l1 * 127.5:.2f}/255"
    )
    mean, std = latent_statistics(vae, crops[:1024])
    cache.mkdir(parents=True, exist_ok=True)
    atomic_save(
        {diffusers_vae_key_to_wan(k): v for k, v in vae.state_dict().items()},
        path,
        {**config, "latents_mean": mean, "latents_std": std},
        asdict(settings),
    )
    return path, True


@torch.no_grad()
def encode_pairs(
    encoders: CacheEncoders, controls: torch.Tensor, targets: torch.Tensor | None, chunk: int = 64
) -> dict[str, torch.Tensor]:
    """What the trainer caches per item, batched: normalised latents [N, 16, 1, h, w] of the targets and the
    controls (`_encode_vae_image`, as `CacheEncoders.encode_image` at the 64 px bucket) and the prompt
    embeddings of PROMPT with each control ([N, L, D], zero-padded, with the mask)."""
    vae = encoders.pipeline.vae

    def latents(images: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                encoders.pipeline._encode_vae_image(
                    images[i : i + chunk].unsqueeze(2).to(vae.dtype),
                    generator=None,  # type: ignore[arg-type]  # diffusers passes it on as Optional
                ).float()
                for i in range(0, len(images), chunk)
            ]
        )

    from PIL import Image

    embeds = [encoders.encode_prompt(PROMPT, [Image.fromarray(a)]) for a in to_uint8(controls)]
    length = max(e.shape[0] for e in embeds)
    prompt = torch.zeros(len(embeds), length, embeds[0].shape[1])
    mask = torch.zeros(len(embeds), length, dtype=torch.long)
    for i, e in enumerate(embeds):
        prompt[i, : len(e)] = e
        mask[i, : len(e)] = 1
    out = {"control": latents(controls), "prompt_embeds": prompt, "prompt_mask": mask}
    if targets is not None:
        out["target"] = latents(targets)
    return out


@dataclass(frozen=True)
class TinyModels:
    dit: Path
    vae: Path
    text_encoder: Path
    tokenizer_dir: Path


def template_processor():
    """The tests' tiny byte-level processor, with the Edit template's system prompt split into added tokens so
    that the prefix the pipeline drops (`prompt_template_encode_start_idx`, 64: the real tokenizer's length of
    it) is 64 tokens here too. Byte by byte it is about 300, and the DiT would attend to the ~240 left over in
    every block: most of its cost on this CPU, for text that says nothing."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import QwenImageEditPlusPipeline

    pipeline = QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        processor=None,
        transformer=None,
    )
    prefix = pipeline.prompt_template_encode.split("{}")[0]
    start = prefix.index("\n") + 1
    system = prefix[start : prefix.index("<|im_end|>")]
    processor = build_tiny_processor()
    tokenizer = processor.tokenizer
    pieces = pipeline.prompt_template_encode_start_idx - len(tokenizer(prefix.replace(system, "")).input_ids)
    bounds = [round(i * len(system) / pieces) for i in range(pieces + 1)]
    tokenizer.add_tokens(sorted({system[a:b] for a, b in itertools.pairwise(bounds)}))
    length = len(tokenizer(prefix).input_ids)
    if length != pipeline.prompt_template_encode_start_idx:
        raise RuntimeError(f"the template prefix is {length} tokens, not {pipeline.prompt_template_encode_start_idx}")
    return processor


def model_files(vae_path: Path, dit: DitSettings, cache: Path) -> TinyModels:
    """The tests' tiny text encoder (seed 0, hidden size = the DiT's joint_attention_dim) with
    `template_processor()`'s tokenizer, beside a random DiT of `dit`'s config; the VAE is the fitted one."""
    folder = cache / f"tier2_models_{_key(dit.config(), 'tier2-files-v2')}"
    if not (folder / "done").is_file():
        if folder.exists():
            shutil.rmtree(folder)
        write_tiny_model_files(folder, transformer_config=dit.config(), processor=template_processor())
        (folder / "done").write_text("ok")
    dit_file = next(folder.glob("qwen_image_edit_*_tiny.safetensors"))
    te = next(folder.glob("qwen_2.5_vl_tiny*.safetensors"))
    return TinyModels(dit_file, vae_path, te, folder / "tokenizer")


def load_encoders(files: TinyModels) -> CacheEncoders:
    """The trainer's cache encoders (VAE and, loaded on first use, text encoder) for these files."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import QwenImageEditPlusPipeline
    from face_consistency.trainer import models

    vae = models.load_vae(files.vae)
    # diffusers types every component as required; a pipeline holds None for those it does not use
    pipeline = QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,  # type: ignore[arg-type]
        tokenizer=None,  # type: ignore[arg-type]
        processor=None,  # type: ignore[arg-type]
        transformer=None,  # type: ignore[arg-type]
    )
    device = torch.device("cpu")
    return CacheEncoders(
        pipeline,
        files.vae,
        files.text_encoder,
        torch.float32,
        str(files.tokenizer_dir),
        True,
        device,
        lambda: (
            models.load_text_encoder(files.text_encoder, torch.float32, device),
            models.load_processor(files.tokenizer_dir),
        ),
    )


def pretrained_dit(
    settings: DitSettings,
    files: TinyModels,
    encoders: CacheEncoders,
    controls: torch.Tensor,
    cache: Path,
    data_key: str,
    log=print,
    monitor: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
) -> tuple[Path, bool]:
    """The base DiT file (ComfyUI's prefixed names, config in its metadata), pre-trained fully by the
    trainer's own flow-matching step (`flow_matching.micro_step`: packing, timesteps, loss) on the pre-training
    people's (control -> settings.edit) pairs in the VAE's latent space, EMA weights; cached by a hash of its
    settings, the VAE file and the data. `monitor(step, EMA weights)` is called at each progress line (every 250
    steps and the last), to judge the base as it learns (`probe_face_tier2_base.py`)."""
    from face_consistency.trainer import models

    key = _key(asdict(settings), files.vae.name, files.text_encoder.parent.name, data_key, "tier2-dit-v1")
    path = cache / f"tier2_dit_{key}.safetensors"
    if path.is_file():
        return path, False
    start = time.monotonic()
    data = encode_pairs(encoders, controls, settings.edit.apply(controls))
    log(
        f"  pre-training pairs encoded (latents {tuple(data['target'].shape[1:])}, prompt "
        f"{tuple(data['prompt_embeds'].shape[1:])}): {time.monotonic() - start:.0f} s"
    )
    torch.manual_seed(ROLE_SEEDS["pretrain"])
    model = models.load_transformer(files.dit, torch.float32)
    model.requires_grad_(True).train()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=settings.steps, pct_start=0.05)
    args = argparse.Namespace(
        timestep_sampling="shift", sigmoid_scale=1.0, discrete_flow_shift=settings.shift, weighting_scheme="none"
    )
    accelerator = SimpleNamespace(autocast=nullcontext)
    generator = torch.Generator().manual_seed(ROLE_SEEDS["pretrain"])
    batches = shuffled_batches(len(controls), settings.batch, generator)
    losses = []
    for step in range(settings.steps):
        idx = next(batches)
        batch = Batch(
            [], data["target"][idx], [data["control"][idx]], data["prompt_embeds"][idx], data["prompt_mask"][idx]
        )
        # no hooks: the VAE is not used
        loss, _ = micro_step(
            args, model, encoders.pipeline.vae, batch, generator, torch.device("cpu"), accelerator, step + 1, []
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            for name, value in model.state_dict().items():
                ema[name].lerp_(value, 1.0 - settings.ema)
        losses.append(loss.item())
        if (step + 1) % 250 == 0 or step + 1 == settings.steps:
            log(
                f"  DiT pre-training step {step + 1}/{settings.steps}: MSE {np.mean(losses[-100:]):.4f} "
                f"({time.monotonic() - start:.0f} s)"
            )
            if monitor is not None:
                monitor(step + 1, ema)
    atomic_save({DIT_PREFIX + k: v for k, v in ema.items()}, path, settings.config(), asdict(settings))
    return path, True


@torch.no_grad()
def round_trip(encoders: CacheEncoders, images: torch.Tensor) -> np.ndarray:
    """decode(encode(image)) by the trainer's own code (the latent cache's encode, the samples' decode), RGB
    uint8 [N, 64, 64, 3]."""
    from face_consistency.trainer.sampling import denormalize_latents

    vae = encoders.pipeline.vae
    latents = torch.cat(
        [
            encoders.pipeline._encode_vae_image(
                images[i : i + 64].unsqueeze(2),
                generator=None,  # type: ignore[arg-type]  # diffusers passes it on as Optional
            )
            for i in range(0, len(images), 64)
        ]
    )
    decoded = torch.cat(
        [
            vae.decode(denormalize_latents(vae, latents[i : i + 64]), return_dict=False)[0][:, :, 0]
            for i in range(0, len(latents), 64)
        ]
    )
    return to_uint8(decoded)
