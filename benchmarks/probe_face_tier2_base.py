"""How fast does tier 2's base DiT learn to draw faces? A time-boxed probe of its pre-training.

    python benchmarks/probe_face_tier2_base.py --vae FILE --work DIR --name NAME [--init random|FILE]
           [--shift 3] [--lr 1e-3] [--batch 16] [--seconds 300] [--eval_every 100] [--sample_steps 1,12]
           [--sample_shift 3] [--copy_steps 0] [--layers 3] [--heads 3] [--save FILE]

Pre-trains (or continues) the tiny `QwenImageTransformer2DModel` of `bench_face_loss_tier2.py` exactly as its
`pretrained_dit` does (the trainer's `flow_matching.micro_step` on the pre-training people's pairs, encoded by
the fitted VAE `--vae`, which the benchmark prints), with a constant learning rate after 50 warm-up steps and
no EMA, and every `--eval_every` steps judges the model on the first `--eval_people` held-out people that every
judge finds a face in (tier 1's `find_people`, so the rates compare with the benchmark's "base DiT alone"):

- `x0_mse@1`: the latent MSE of the one-step estimate from pure noise (t = 1, where sampling starts) to the
  target; predicting the control itself scores `control_mse` (printed once), the mean about 1;
- per sampling step count: the trainer's sampler (`trainer/sampling.generate`, flow shift `--sample_shift`),
  dlib's and the engine's detection rate on the samples and their L1 to the target (/255).

`--copy_steps N` trains the first N steps on the identity edit (target = control). Encoded pairs and the
held-out people are kept in `--work`. Generated faces go only there (research-only, see tier 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from face_consistency.faceid import load_face_model
from face_consistency.faceid.judge import load_judge
from face_consistency.trainer import models
from face_consistency.trainer.flow_matching import Batch, batch_velocity, micro_step
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
from bench_face_loss_tier1 import DEFAULT_DATA, engine_results, find_people  # noqa: E402
from bench_face_loss_tier2 import draw, encoded_samples  # noqa: E402
from bench_face_vae_ceiling import fast_cpu  # noqa: E402
from face_tier1_data import ROLE_SEEDS, Edit, FaceSource, View, identities, shuffled_batches, to_uint8  # noqa: E402
from face_tier2_models import (  # noqa: E402
    DitSettings,
    atomic_save,
    encode_pairs,
    load_encoders,
    model_files,
    pretrained_dit,
)
from tiny_qwen import DIT_PREFIX  # noqa: E402

WARMUP = 50


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}  {message}", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", type=Path, required=True, help="the fitted VAE the benchmark printed")
    parser.add_argument("--work", type=Path, required=True, help="folder for the encoded pairs and the images")
    parser.add_argument("--name", required=True)
    parser.add_argument("--init", default="random", help="random (the benchmark's tiny DiT) or a DiT file")
    parser.add_argument("--shift", type=float, default=DitSettings.shift)
    parser.add_argument("--lr", type=float, default=DitSettings.lr)
    parser.add_argument("--batch", type=int, default=DitSettings.batch)
    parser.add_argument("--seconds", type=float, default=300.0, help="training time (evaluations not counted)")
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--eval_people", type=int, default=16)
    parser.add_argument("--sample_steps", default="1,12")
    parser.add_argument("--sample_shift", type=float, default=3.0)
    parser.add_argument("--copy_steps", type=int, default=0)
    parser.add_argument("--layers", type=int, default=DitSettings.layers)
    parser.add_argument("--heads", type=int, default=DitSettings.heads)
    parser.add_argument("--pretrain_people", type=int, default=1024)
    parser.add_argument(
        "--benchmark_steps",
        type=int,
        default=0,
        help="instead: pre-train the benchmark's base (its pretrained_dit, OneCycle and EMA, into the VAE's cache "
        "folder under the benchmark's key) for this many steps, judged every 250",
    )
    parser.add_argument("--save", type=Path, help="write the trained DiT here (ComfyUI's names)")
    parser.add_argument("--models_root", type=Path, default=DEFAULT_DATA / "insightface")
    parser.add_argument("--pack", default="testpack")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    fast_cpu(1)
    dit = DitSettings(layers=args.layers, heads=args.heads, shift=args.shift)
    files = model_files(args.vae, dit, args.vae.parent)
    encoders = load_encoders(files)
    vae = encoders.pipeline.vae
    engine = load_face_model(args.pack, models_root=args.models_root, provider="cpu")
    judge = load_judge()
    args.work.mkdir(parents=True, exist_ok=True)
    data_file = args.work / f"pairs_{args.vae.stem}_{args.pretrain_people}_{args.eval_people}.pt"
    if data_file.is_file():
        data = torch.load(data_file)
    else:
        source = FaceSource()
        pre = source.render(identities("pretrain", args.pretrain_people))
        heldout = find_people("heldout", args.eval_people, source, Edit(), View(), engine, judge)
        data = {
            "train": encode_pairs(encoders, pre, dit.edit.apply(pre)),
            "eval": encode_pairs(encoders, heldout.control, dit.edit.apply(heldout.control)),
            "eval_control": heldout.control,
            "eval_target": dit.edit.apply(heldout.control),
        }
        torch.save(data, data_file)
    train, held = data["train"], data["eval"]
    n = len(held["target"])
    targets = to_uint8(data["eval_target"])
    samples_by_steps = {
        steps: encoded_samples(
            encoders,
            _Heldout(data["eval_control"]),
            SimpleNamespace(sample_steps=steps, sample_shift=args.sample_shift),
        )
        for steps in (int(v) for v in args.sample_steps.split(","))
    }

    model = models.load_transformer(files.dit if args.init == "random" else Path(args.init), torch.float32)
    model.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP))
    flow = argparse.Namespace(
        timestep_sampling="shift", sigmoid_scale=1.0, discrete_flow_shift=args.shift, weighting_scheme="none"
    )
    accelerator = SimpleNamespace(autocast=nullcontext)
    generator = torch.Generator().manual_seed(ROLE_SEEDS["pretrain"])
    batches = shuffled_batches(len(train["target"]), args.batch, generator)
    held_batch = Batch([], held["target"], [held["control"]], held["prompt_embeds"], held["prompt_mask"])
    noise = torch.randn(held["target"].shape, generator=torch.Generator().manual_seed(0))
    log(f"{args.name}: control_mse {((held['control'] - held['target']) ** 2).mean():.3f} on {n} held-out people")

    losses: list[float] = []

    def evaluate(step: int, seconds: float) -> None:
        model.eval()
        with torch.no_grad():
            v = batch_velocity(model, accelerator, held_batch, torch.device("cpu"))(noise, torch.ones(n))
            x0_mse = float(((noise - v - held["target"]) ** 2).mean())
        parts = [f"x0_mse@1 {x0_mse:.3f}"]
        for steps, samples in samples_by_steps.items():
            images = draw(model, vae, samples)
            tensors = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            dlib = np.mean([judge.judge(a).ok for a in images])
            found = np.mean([r.ok for r in engine_results(engine, tensors)])
            l1 = np.abs(images.astype(np.float32) - targets.astype(np.float32)).mean()
            parts.append(f"{steps} steps: dlib {dlib:.2f} engine {found:.2f} L1 {l1:.1f}")
            Image.fromarray(np.concatenate([np.concatenate([t, s], 1) for t, s in zip(targets, images)])).save(
                args.work / f"{args.name}_steps{steps}.png"
            )
        model.train()
        loss = f"{np.mean(losses[-50:]):.4f}" if losses else "-"
        log(f"{args.name} step {step} ({seconds:.0f} s training): loss {loss}; " + "; ".join(parts))

    if args.benchmark_steps:
        # the benchmark's own pre-training (its settings, cache and key), judged at each of its progress lines
        source = FaceSource()
        settings = replace(dit, steps=args.benchmark_steps, lr=args.lr, batch=args.batch)
        begin = time.monotonic()

        def monitor(step: int, ema: dict[str, torch.Tensor]) -> None:
            model.load_state_dict(ema)
            evaluate(step, time.monotonic() - begin)

        path, fitted = pretrained_dit(
            settings,
            files,
            encoders,
            source.render(identities("pretrain", args.pretrain_people)),
            args.vae.parent,
            f"{source.sha256}:{args.pretrain_people}:{ROLE_SEEDS['pretrain']}",
            log=log,
            monitor=monitor,
        )
        log(f"base DiT {'pre-trained now' if fitted else 'in the cache already'}: {path}")
        if not fitted:
            model.load_state_dict(models.load_transformer(path, torch.float32).state_dict())
            evaluate(settings.steps, 0.0)
        return
    evaluate(0, 0.0)
    step, seconds = 0, 0.0
    while seconds < args.seconds:
        start = time.monotonic()
        idx = next(batches)
        x0 = train["control"][idx] if step < args.copy_steps else train["target"][idx]
        batch = Batch([], x0, [train["control"][idx]], train["prompt_embeds"][idx], train["prompt_mask"][idx])
        loss, _ = micro_step(flow, model, vae, batch, generator, torch.device("cpu"), accelerator, step + 1, [])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        step += 1
        seconds += time.monotonic() - start
        if step % args.eval_every == 0:
            log(f"  {seconds / step:.2f} s per step")
            evaluate(step, seconds)
    if step % args.eval_every:
        evaluate(step, seconds)
    if args.save:
        tensors = {DIT_PREFIX + k: v.detach() for k, v in model.state_dict().items()}
        atomic_save(tensors, args.save, dit.config(), {**asdict(dit), "probe": vars(args)})


class _Heldout:
    """What `encoded_samples` reads of tier 1's People: the controls and the count."""

    def __init__(self, control: torch.Tensor) -> None:
        self.control = control

    def __len__(self) -> int:
        return len(self.control)


if __name__ == "__main__":
    main()
