"""Over-training on the tiny models: does checkpoints.json see it, and which checkpoint does it keep?

    /work/venv/bin/python benchmarks/bench_checkpoint_choice.py [--items 2] [--held_out 2] [--epochs 400]
        [--save_every 50] [--learning_rate 1e-2] [--network_dim 64] [--heads 4] [--size 64] [--out DIR]

One real run of `face-consistency train` (in this process, on the CPU or the GPU there is) on the
random tiny Qwen-Image-Edit models of tests/support/tiny_qwen.py: a handful of synthetic training pairs
trained for many epochs, `--held_out` other pairs as a validation dataset (never trained on), a
checkpoint every `--save_every` epochs, and one sample prompt that starts from a training item's
control with that item's caption (the sample a LoRA that memorises its data turns into the
training target). The held-out pairs are the training items' controls and captions with other
targets: what a LoRA learns that holds for both lowers their loss, memorising the training targets
raises it. The random tiny VAE maps every image to nearly the same latent (two items' latents differ
by a standard deviation of 0.02 against 0.42 overall), which leaves nothing to memorise: each target
is therefore a random latent decoded by the tiny VAE, and after a first one-step run has cached the
dataset its cached latents are rewritten to those random latents (their fingerprints kept, so the
run reuses them). A LoRA that memorises then draws the training target's image. Printed: the
trainer's table (validation loss per sigma, nearest training target per checkpoint, the note), the
checkpoint it keeps and why, three checks (the validation
loss turns up; the samples' similarity to the nearest training target rises; the kept checkpoint
is the last before the rise) and what validation and the per-checkpoint samples and scoring cost
as a share of the run's time (the trainer's own timers, `status.json`). The tiny models draw no
faces, so the held-out likeness columns stay empty here: tests/trainer/test_trainer_validation.py scores
real photos. Not a test: figures only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from tiny_qwen import TinyModelFiles

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests" / "support"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2, help="training pairs")
    parser.add_argument("--held_out", type=int, default=2, help="validation pairs (other images)")
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--save_every", type=int, default=50, help="a checkpoint every N epochs")
    parser.add_argument("--learning_rate", type=float, default=1e-2)
    parser.add_argument("--network_dim", type=int, default=64)
    parser.add_argument(
        "--heads",
        type=int,
        default=4,
        help="attention heads of 32 dims each (the test models "
        "have 2 of 16: a 32-wide DiT cannot even pass the 64-dim latent tokens through, let "
        "alone memorise them)",
    )
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (multiple of 16)")
    parser.add_argument("--sample_steps", type=int, default=4)
    parser.add_argument("--out", type=Path, help="keep the run here (default: a temporary folder)")
    options = parser.parse_args()

    from face_consistency.cli import main as cli_main
    from face_consistency.training_contract.checkpoint_choice import format_table, read_table, validation_rise
    from face_consistency.training_contract.protocol import read_status
    from PIL import Image
    from tiny_qwen import TINY_TRANSFORMER_CONFIG, tiny_train_argv, write_tiny_dataset, write_tiny_model_files

    with tempfile.TemporaryDirectory() as scratch:
        root = options.out or Path(scratch)
        size = (options.size, options.size)
        dit_config = {
            **TINY_TRANSFORMER_CONFIG,
            "num_attention_heads": options.heads,
            "attention_head_dim": 32,
            "axes_dims_rope": [8, 12, 12],
        }
        files = write_tiny_model_files(root / "models", transformer_config=dit_config)
        dataset = write_tiny_dataset(root / "train", n=options.items, size=size, seed=0)
        # held out: other targets for the training items' own controls and captions, so that the only way
        # a LoRA can do better on the training items than on these is to memorise the training targets
        others = write_tiny_dataset(root / "other_targets", n=options.held_out, size=size, seed=1).parent
        pairs = []
        for index in range(options.held_out):
            with (
                Image.open(others / "images" / f"item_{index}.png") as target,
                Image.open(root / "train" / "controls" / f"item_{index % options.items}.png") as control,
            ):
                pairs.append((target.copy(), control.copy()))
        held_out = write_tiny_dataset(root / "held_out", n=options.held_out, size=size, pairs=pairs)
        decoded_targets = distinct_targets(
            files, [root / "train", root / "held_out"], [options.items, options.held_out], options.size
        )
        prompts = root / "prompts.txt"
        control = root / "train" / "controls" / "item_0.png"
        prompts.write_text(
            f"tiny edit number 0 --w {options.size} --h {options.size} --s {options.sample_steps} "
            f"--d 100 --ci {control}\n",
            encoding="utf-8",
        )
        out = root / "run"
        steps = options.items * options.epochs
        argv = tiny_train_argv(
            files,
            dataset,
            out,
            max_train_steps=steps,
            extra=[
                "--learning_rate",
                f"{options.learning_rate:g}",
                "--network_dim",
                str(options.network_dim),
                "--network_alpha",
                str(options.network_dim),
                "--max_train_epochs",
                str(options.epochs),
                "--save_every_n_epochs",
                str(options.save_every),
                "--sample_prompts",
                str(prompts),
                "--validation_dataset_config",
                str(held_out),
            ],
        )
        first = tiny_train_argv(
            files,
            dataset,
            root / "caching_pass",
            max_train_steps=1,
            extra=["--validation_dataset_config", str(held_out)],
        )
        if cli_main(["train", *first]) != 0:
            raise SystemExit("the caching pass failed")
        rewrite_cached_latents(decoded_targets)
        started = time.perf_counter()
        rc = cli_main(["train", *argv])
        wall = time.perf_counter() - started
        status = read_status(out) or {}
        if rc != 0:
            raise SystemExit(f"the run failed (rc {rc}): {status.get('error')}")
        table = read_table(out)
        if table is None:
            raise SystemExit(f"the run wrote no readable checkpoints.json in {out}")
        rows = sorted(table.rows, key=lambda row: row.step)
        print(
            f"\n{options.items} training pairs, {options.held_out} held out, {options.epochs} epochs "
            f"({steps} steps), a checkpoint every {options.save_every} epochs, {options.size} px, "
            f"lr {options.learning_rate:g}, rank {options.network_dim}, DiT width {32 * options.heads}\n"
        )
        print(format_table(table))
        rise = validation_rise(rows)
        chosen = table.recommendation()
        if chosen is None:
            raise SystemExit(f"checkpoints.json in {out} lists no checkpoint")
        losses = [loss for row in rows if (loss := row.validation_mean) is not None]
        nearness = [near for row in rows if (near := row.nearest_target_image) is not None]
        if len(losses) < len(rows) or len(nearness) < len(rows):
            raise SystemExit("a checkpoint has no validation loss or no sample to compare with the training targets")
        lowest = min(range(len(rows)), key=losses.__getitem__)
        print("\nchecks:")
        print(
            f"  validation loss turns up: {'yes' if rise else 'NO'} (lowest {losses[lowest]:.4f} at step "
            f"{rows[lowest].step}, last {losses[-1]:.4f} at step {rows[-1].step})"
        )
        print(
            f"  nearest-training-target similarity rises: {'yes' if nearness[-1] > nearness[0] else 'NO'} "
            f"({nearness[0]:.3f} at step {rows[0].step} -> {max(nearness):.3f} highest, {nearness[-1]:.3f} last)"
        )
        before = rise is not None and chosen.step == rise.step
        print(
            f"  kept checkpoint is the last before the rise: {'yes' if before else 'NO'} ({chosen.name}, step "
            f"{chosen.step})"
        )
        run_seconds = status.get("run_seconds") or wall
        validation, scoring = status.get("validation_seconds", 0.0), status.get("checkpoint_scoring_seconds", 0.0)
        sampling = status.get("checkpoint_sampling_seconds", 0.0)
        print(
            f"\ncost (the trainer's timers, of {run_seconds:.1f} s from start to the last checkpoint; "
            f"{wall:.1f} s wall in all):"
        )
        print(
            f"  validation loss ({len(rows)} x {options.held_out} items x {len(table.sigmas)} sigmas): "
            f"{validation:.2f} s = {100 * validation / run_seconds:.1f} %"
        )
        print(
            f"  samples drawn for the checkpoints ({len(rows)} rounds, none fell on a checkpoint's step): "
            f"{sampling:.2f} s = {100 * sampling / run_seconds:.1f} %"
        )
        print(f"  scoring them and writing checkpoints.json: {scoring:.2f} s = {100 * scoring / run_seconds:.1f} %")
        print(
            json.dumps(
                {
                    "validation_share": validation / run_seconds,
                    "sampling_share": sampling / run_seconds,
                    "scoring_share": scoring / run_seconds,
                    "kept_step": chosen.step,
                    "rise_after": rise.step if rise else None,
                }
            )
        )


def distinct_targets(
    files: TinyModelFiles, folders: list[Path], counts: list[int], size: int
) -> dict[Path, torch.Tensor]:
    """Each target image of the `folders`' datasets replaced by a random latent decoded by the tiny VAE;
    returns target image -> its latent (as the cache holds latents: normalised, [16, 1, h, w])."""
    import torch
    from face_consistency.trainer import models
    from face_consistency.trainer.sampling import decode_to_pil
    from face_consistency.trainer.vae_decode import vae_scale

    vae = models.load_vae(str(files.vae), torch.float32, torch.device("cpu"))
    latent_side = size // vae_scale(vae.config)
    generator = torch.Generator().manual_seed(0)
    latents = {}
    for folder, count in zip(folders, counts):
        for index in range(count):
            latent = torch.randn(1, 16, 1, latent_side, latent_side, generator=generator)
            path = folder / "images" / f"item_{index}.png"
            with torch.no_grad():
                decode_to_pil(vae, latent).save(path)
            latents[path] = latent[0]
    return latents


def rewrite_cached_latents(latents: dict[Path, torch.Tensor]) -> None:
    """Put each target's random latent into its cache file, keeping the file's fingerprint."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for image, latent in latents.items():
        (cache,) = (image.parent.parent / "cache").glob(f"{image.stem}_*_qi.safetensors")
        with safe_open(str(cache), "pt") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
        assert tensors["latents"].shape == latent.shape, (tensors["latents"].shape, latent.shape)
        tensors["latents"] = latent.to(tensors["latents"].dtype).contiguous()
        save_file(tensors, str(cache), metadata=metadata)


if __name__ == "__main__":
    main()
