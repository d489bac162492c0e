"""Which rotary-position convention should training use for LoRAs that run in ComfyUI?

    python benchmarks/bench_rope_positions.py [--steps 150] [--work_dir DIR]

diffusers and ComfyUI number Qwen-Image's tokens alike except for a side of 16 mod 32 px and a
control larger than its target (trainer/positions.py). This prints:

1. how often a training bucket has such a side: musubi's buckets at 1024 x 1024 for common photo
   aspect ratios (the controls follow their target's bucket unless `control_resolution` or
   `no_resize_control` says otherwise, and only then can a control be larger);
2. two tiny trainings from one seed on items where both differences occur (80 px targets, 5 x 5
   tokens; 112 px controls), one with `--rope_positions comfyui`, one with `diffusers`; then the
   flow-matching loss of each LoRA (and of the base without one) on the training items at fixed
   noise and sigmas 1.0, 0.75, 0.5, 0.25, with the positions ComfyUI uses at inference and with
   diffusers'. The DiT is the tests' tiny random one with the real head width and rope layout
   (128 = 16 + 56 + 56), so that positions weigh as they do in the real model.

A LoRA works in ComfyUI under ComfyUI's positions: the figures that decide are the loss a LoRA
trained under diffusers' positions loses when run under ComfyUI's, beside how far two training runs
that differ only in the convention end apart.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from face_consistency.cli import main as cli_main
from face_consistency.musubi_formats.dataset import bucket_for, load_dataset_config, write_dataset_config
from face_consistency.trainer.cli import parse_args, validate_args
from face_consistency.trainer.flow_matching import collate
from face_consistency.trainer.positions import set_positions
from face_consistency.trainer.sampling import pack, unpack
from face_consistency.trainer.train import prepare_transformer

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "support"))
from tiny_qwen import TINY_TRANSFORMER_CONFIG, tiny_train_argv, write_tiny_dataset, write_tiny_model_files  # noqa: E402

ROPE_DIT = {
    **TINY_TRANSFORMER_CONFIG,
    "attention_head_dim": 128,
    "num_attention_heads": 2,
    "axes_dims_rope": [16, 56, 56],
}
SIGMAS = (1.0, 0.75, 0.5, 0.25)
ASPECTS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16), (5, 4), (4, 5), (7, 5), (5, 7))


def bucket_census() -> None:
    odd = []
    for w, h in ASPECTS:
        bucket = bucket_for((w * 600, h * 600), (1024, 1024), enable_bucket=True, no_upscale=False)
        if any(side % 32 == 16 for side in bucket):
            odd.append(f"{w}:{h} -> {bucket[0]}x{bucket[1]}")
    print(
        f"buckets at 1024x1024 with a side of 16 mod 32 px: {len(odd)} of {len(ASPECTS)} aspect ratios "
        f"({', '.join(odd) or 'none'})"
    )


def dataset(work: Path) -> Path:
    toml = write_tiny_dataset(work / "data", n=4, size=(80, 80))
    data = work / "data"
    return write_dataset_config(
        toml,
        {"resolution": [80, 80], "caption_extension": ".txt", "batch_size": 1, "enable_bucket": False},
        [
            {
                "image_directory": str(data / "images"),
                "control_directory": str(data / "controls"),
                "cache_directory": str(data / "cache"),
                "control_resolution": [112, 112],
            }
        ],
    )


@torch.no_grad()
def losses(argv: list[str], lora: Path | None) -> dict[str, float]:
    """Mean flow-matching loss over the items and SIGMAS, at fixed noise, under each convention."""
    args = validate_args(parse_args([*argv, *(["--network_weights", str(lora)] if lora else [])]))
    transformer, _ = prepare_transformer(args, torch.device("cpu"), torch.float32)
    transformer.eval()
    batch = collate(load_dataset_config(args.dataset_config).items)
    x0 = batch.x0
    _, _, _, h, w = x0.shape
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    img_shapes = [[(1, h // 2, w // 2), *[(1, c.shape[3] // 2, c.shape[4] // 2) for c in batch.controls]]] * x0.shape[0]
    result = {}
    for convention in ("comfyui", "diffusers"):
        set_positions(transformer, convention)
        total = 0.0
        for sigma in SIGMAS:
            x_t = (1 - sigma) * x0 + sigma * noise
            tokens = torch.cat([pack(x_t), *[pack(c) for c in batch.controls]], dim=1)
            t = torch.full((x0.shape[0],), sigma)
            prediction = transformer(
                hidden_states=tokens,
                timestep=t,
                encoder_hidden_states=batch.prompt_embeds,
                encoder_hidden_states_mask=batch.prompt_mask,
                img_shapes=img_shapes,
                return_dict=False,
            )[0]
            v = unpack(prediction[:, : (h // 2) * (w // 2)], h, w)
            total += float(((v - (noise - x0)) ** 2).mean())
        result[convention] = total / len(SIGMAS)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--work_dir", type=Path)
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_rope_positions_"))
    bucket_census()
    files = write_tiny_model_files(work / "models", transformer_config=ROPE_DIT)
    toml = dataset(work)
    loras = {}
    for convention in ("comfyui", "diffusers"):
        out = work / convention
        argv = tiny_train_argv(files, toml, out, max_train_steps=args.steps, extra=["--rope_positions", convention])
        if cli_main(["train", *argv]) != 0:
            raise SystemExit(f"training failed, see {out / 'status.json'}")
        loras[f"trained with {convention}"] = out / "tiny.safetensors"
    base_argv = tiny_train_argv(files, toml, work / "base", max_train_steps=args.steps)  # the caches are there now
    rows = {
        "base (no LoRA)": losses(base_argv, None),
        **{name: losses(base_argv, lora) for name, lora in loras.items()},
    }
    print(
        f"4 items, 80x80 targets (5x5 tokens), 112x112 controls (7x7), {args.steps} steps, seed 42; loss = mean "
        f"MSE of the velocity over sigmas {', '.join(map(str, SIGMAS))}, fixed noise; work dir {work}"
    )
    print(f"{'LoRA':>24} | {'loss, ComfyUI positions':>24} | {'loss, diffusers positions':>26}")
    for name, row in rows.items():
        print(f"{name:>24} | {row['comfyui']:24.6f} | {row['diffusers']:26.6f}")
    matched, crossed = rows["trained with comfyui"], rows["trained with diffusers"]
    penalty = crossed["comfyui"] - crossed["diffusers"]
    between = crossed["comfyui"] - matched["comfyui"]
    print(
        f"the diffusers-trained LoRA run under ComfyUI's positions instead of its own: {penalty:+.6f} "
        f"({100 * penalty / crossed['diffusers']:+.4f}%); the two LoRAs under ComfyUI's positions differ by "
        f"{between:+.6f} ({100 * between / matched['comfyui']:+.3f}%), the training runs' own spread"
    )


if __name__ == "__main__":
    main()
