"""Does the face loss help? Tier 2 of issue 21: the same question through the project's real trainer.

    python benchmarks/bench_face_loss_tier2.py --out DIR [--seeds 1,2,3] [--arms mse,rollout,positive]
           [--heldout 64] [--lora_steps 200] [--cache ~/.cache/face_consistency_bench] [--threads 1]

Needs what tier 1 needs (the `[evidence]` extra, gan-face-generate, research-only: its faces go only into
DIR, outside the repository, and the cache; the `[judge]` extra, dlib). Every stage prints its wall time
and the load average beside it.

People, edit, second views, judges, calibration, headroom check, endpoint and decision rule are tier 1's
(`bench_face_loss_tier1.py`, imported, not copied: read its docstring). What differs:

- **The models** are the real classes the trainer loads, tiny (`face_tier2_models.py`):
  - a VAE (`AutoencoderKLQwenImage`, base_dim `--vae_base_dim`, `--vae_scale` 4 (dim_mult 1/2/4: a 64 px face
    is a 16 x 16 x 16 latent) or 2 (dim_mult 1/2: 32 x 32 x 16, more numbers than the face has pixels)),
    fitted as an autoencoder on generated pre-training faces (controls and edited targets) with the loss on
    the decoder's output before diffusers' clip to [-1, 1]. **Gate**: its round trip (the trainer's own
    latent-cache encode and sample decode) on the held-out people's controls must reach engine cosine >= 0.8
    and dlib similarity >= 0.7, else the benchmark stops;
  - the tests' tiny Qwen2.5-VL text encoder and tokenizer, one fixed prompt for every pair and sample;
  - a base DiT (`QwenImageTransformer2DModel`, `--dit_layers` blocks of `--dit_heads` x 32 dims), pre-trained
    fully (no LoRA) by the trainer's own flow-matching step (timestep sampling shift `--dit_shift`, 3: the samples
    start from pure noise, where only the control says what to draw) on the pre-training people's (control -> edit)
    pairs, where that edit is WEAKER than the benchmark's: the same colour grade but half the re-pose
    (rotation 6 deg, scale 0.94, shift (1.5, 1) px). The base draws and re-poses faces; the LoRA must learn the
    rest of the re-pose (tier 1's base had learnt the very edit the LoRA trained, which left the LoRA nothing
    to learn and the benchmark insensitive). Both are cached by a hash of their settings and data.
- **The arms** are LoRA runs of the trainer itself (`trainer/cli.py` parse + validate, `run_training`, in this
  process) on the LoRA-training people written as a musubi dataset (PNG pairs, one caption), the seed
  guide's flags (`tests/support/tiny_qwen.tiny_train_argv`: shift 2.2 timestep sampling, AdamW) with rank
  `--lora_rank`, `--lora_steps` steps of batch `--lora_batch`; the same `--seed` per seed in every arm, so the
  same data order, timesteps and noise (the face hook draws no random numbers):
    mse       MSE only
    rollout   `--use_face_as_loss --face_loss_rollout_steps 3` (tier 1's best variant), weight 0.1, the
              control's identity, max_t 0.5, the test pack (`--face_model_name testpack`, engine on the CPU)
    positive  positive control: + `--pc_weight` x the velocity MSE inside the target's face box (the engine's
              box on the target, in latents); the trainer has no flag for it, so the benchmark passes a
              `TrainingHook` (`FaceBoxMSE` below) to `run_training`: the hook contract the face loss uses
  `--arms` may add `face` (the loss at today's defaults, one-step estimate).
- **Samples** of the held-out people: the trainer's own sampler (`trainer/sampling.generate`: Euler,
  `--sample_steps` steps, flow shift `--sample_shift`, no CFG, the same seed per person in every run) with the
  base DiT and the run's LoRA loaded by the trainer's own `prepare_transformer(--network_weights)`. The
  controls are encoded at the training bucket (64 px) as the latent cache encodes them, not at the ~1 MP
  at which `--sample_prompts` would encode them (a 1 MP control is 16384 tokens on this CPU, and not what
  the LoRA was trained with).
- The base DiT alone (no LoRA) is sampled and judged too, and its means printed (not an arm).

Output (re-judgeable, tier 1's layout): DIR/people/..., DIR/samples/<arm>/seed<s>/<person>.png,
DIR/manifest.json; the trainer's run folders (LoRA, metrics.jsonl, status.json) and the dataset (PNG pairs)
in DIR/trainer/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from face_consistency.common.files import atomic_write_json
from face_consistency.faceid import load_face_model
from face_consistency.faceid.judge import load_judge, verdict
from face_consistency.musubi_formats.dataset import write_dataset_config
from face_consistency.trainer import models
from face_consistency.trainer.cli import build_hooks, validate_args
from face_consistency.trainer.cli import parse_args as trainer_parse_args
from face_consistency.trainer.hooks import ExtraLoss, TrainingHook
from face_consistency.trainer.sampling import EncodedSample, SampleSettings, generate
from face_consistency.trainer.train import prepare_transformer, run_training
from face_consistency.training_contract.protocol import JobState, read_metrics, read_status
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
from bench_face_loss_tier1 import (  # noqa: E402
    AUC_FLOOR,
    People,
    add_common_arguments,
    calibrate,
    engine_results,
    face_mask,
    find_people,
    finish_args,
    judge_arms,
    judge_samples,
    mean_of_found,
    print_verdicts,
    stage,
    write_people,
    write_samples,
)
from bench_face_vae_ceiling import fast_cpu  # noqa: E402
from face_tier1_data import ROLE_SEEDS, Edit, FaceSource, View, identities, to_uint8  # noqa: E402
from face_tier2_models import (  # noqa: E402
    PROMPT,
    DitSettings,
    TinyModels,
    VaeSettings,
    encode_pairs,
    fitted_vae,
    load_encoders,
    model_files,
    pretrained_dit,
    round_trip,
)
from tiny_qwen import tiny_train_argv  # noqa: E402  (face_tier2_models put tests/support/ on the path)

GATE_ENGINE, GATE_DLIB = 0.8, 0.7
KNOWN_ARMS = ("mse", "rollout", "positive", "face")


def arm_labels(args: argparse.Namespace) -> dict[str, str]:
    return {
        "mse": "MSE only",
        "rollout": f"face loss w 0.1 on a {args.rollout_steps}-step rollout (trainer flags)",
        "positive": f"positive control: + {args.pc_weight:g} x MSE inside the face box (benchmark hook)",
        "face": "face loss, today's defaults (w 0.1, one-step estimate)",
    }


@contextmanager
def timed(name: str, times: dict[str, float]) -> Iterator[None]:
    """tier 1's `stage`, with the load average of the machine beside its time."""
    with stage(name, times):
        yield
    print(
        f"  load average {os.getloadavg()[0]:.1f} / {os.getloadavg()[1]:.1f} (1 / 5 min) on {os.cpu_count()} cores",
        flush=True,
    )


# --------------------------------------------------------------------------- the VAE gate


def vae_gate(encoders, heldout: People, engine, judge) -> dict[str, float]:
    """Round trip of the held-out people's controls (and targets, reported) through the trainer's encode and
    decode: engine cosine and dlib similarity to the original, over the faces both sides are found in."""
    out: dict[str, float] = {}
    for name, images in (("control", heldout.control), ("target", heldout.target)):
        back = round_trip(encoders, images)
        before = engine_results(engine, images)
        after = engine_results(engine, torch.from_numpy(back).permute(0, 3, 1, 2).float() / 127.5 - 1.0)
        cos = [float(np.dot(a.embedding, b.embedding)) for a, b in zip(before, after) if a.ok and b.ok]
        sims = []
        for original, decoded in zip(to_uint8(images), back):
            a, b = judge.judge(original), judge.judge(decoded)
            if a.ok and b.ok:
                sims.append(verdict(a.descriptor, b.descriptor).similarity)
        out[f"{name}_engine"], out[f"{name}_dlib"] = mean_of_found(cos), mean_of_found(sims)
        out[f"{name}_engine_found"], out[f"{name}_dlib_found"] = len(cos), len(sims)
        out[f"{name}_l1"] = float(np.abs(back.astype(np.float32) - to_uint8(images).astype(np.float32)).mean())
    out["passed"] = bool(out["control_engine"] >= GATE_ENGINE and out["control_dlib"] >= GATE_DLIB)
    return out


# --------------------------------------------------------------------------- the arms through the trainer


class FaceBoxMSE(TrainingHook):
    """The positive control: `weight` x the velocity MSE inside each target's face box (in latents)."""

    def __init__(self, weight: float, masks: dict[str, torch.Tensor]) -> None:
        self.weight = weight
        self.masks = masks  # target stem -> [1, 1, h, w] share of each latent pixel inside the box

    def extra_loss(self, state) -> ExtraLoss:
        mask = torch.stack([self.masks[item.target.stem] for item in state.items]).to(state.v_pred)
        error = (state.v_pred - (state.noise - state.x0)) ** 2
        loss = self.weight * (error * mask).sum() / (mask.sum() * error.shape[1]).clamp(min=1.0)
        return ExtraLoss(loss, {"loss/face_box_mse": float(loss.detach())})


def latent_box_masks(people: People, scale: int) -> dict[str, torch.Tensor]:
    pooled = F.avg_pool2d(face_mask(people.box), scale)  # [N, 1, h, w]
    return {people.person_id(i): pooled[i].unsqueeze(1) for i in range(len(people))}


def write_dataset(people: People, folder: Path, batch: int) -> Path:
    """The LoRA-training people as a musubi dataset: targets + captions in images/, controls in controls/."""
    images, controls = folder / "images", folder / "controls"
    images.mkdir(parents=True, exist_ok=True)
    controls.mkdir(parents=True, exist_ok=True)
    for i, (target, control) in enumerate(zip(to_uint8(people.target), to_uint8(people.control))):
        pid = people.person_id(i)
        Image.fromarray(target).save(images / f"{pid}.png")
        Image.fromarray(control).save(controls / f"{pid}.png")
        (images / f"{pid}.txt").write_text(PROMPT, encoding="utf-8")
    general = {
        "resolution": [64, 64],
        "caption_extension": ".txt",
        "batch_size": batch,
        "num_repeats": 1,
        "enable_bucket": False,
        "bucket_no_upscale": False,
    }
    return write_dataset_config(
        folder / "dataset.toml",
        general,
        [
            {
                "image_directory": str(images),
                "control_directory": str(controls),
                "cache_directory": str(folder / "cache"),
            }
        ],
    )


def train_arm(arm: str, seed: int, files: TinyModels, dataset: Path, run_dir: Path, masks, args) -> tuple:
    """One LoRA run of the trainer; returns (its validated args, the LoRA file, a summary of its metrics)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    face = ["--face_model_name", args.pack, "--face_models_root", str(args.models_root), "--face_device", "cpu"]
    extra = {
        "mse": [],
        "positive": [],
        "rollout": ["--use_face_as_loss", "--face_loss_rollout_steps", str(args.rollout_steps), *face],
        "face": ["--use_face_as_loss", *face],
    }[arm]
    argv = tiny_train_argv(
        files,
        dataset,
        run_dir,
        max_train_steps=args.lora_steps,
        output_name="lora",
        extra=[
            "--seed",
            str(seed),
            "--network_dim",
            str(args.lora_rank),
            "--network_alpha",
            str(args.lora_rank),
            "--learning_rate",
            str(args.lora_lr),
            "--discrete_flow_shift",
            str(args.shift),
            *extra,
        ],
    )
    targs = validate_args(trainer_parse_args(argv))
    hooks = build_hooks(targs) + ([FaceBoxMSE(args.pc_weight, masks)] if arm == "positive" else [])
    state = run_training(targs, hooks)
    status = read_status(run_dir) or {}
    if state != JobState.COMPLETED:
        raise SystemExit(f"the trainer's run {run_dir} ended {state}: {status.get('error')}")
    records = [m for m in read_metrics(run_dir) if "loss" in m]
    k = max(1, min(20, len(records) // 4))
    summary: dict[str, Any] = {
        "mse_start": float(np.mean([m["loss"] for m in records[:k]])),
        "mse_end": float(np.mean([m["loss"] for m in records[-k:]])),
        "steps": len(records),
    }
    for key in ("loss/face", "loss/face_box_mse"):
        values = [m[key] for m in records if key in m]
        if values:
            kf = max(1, min(20, len(values) // 4))
            summary[key] = {
                "steps": len(values),
                "start": float(np.mean(values[:kf])),
                "end": float(np.mean(values[-kf:])),
            }
    for key in ("face_targets", "face_targets_without_face"):
        if key in status:
            summary[key] = status[key]
    return targs, run_dir / "lora.safetensors", summary


def encoded_samples(encoders, heldout: People, args) -> list[EncodedSample]:
    """Each held-out person's prompt and control as the trainer's sampler takes them (control at 64 px)."""
    data = encode_pairs(encoders, heldout.control, None)
    samples = []
    for i in range(len(heldout)):
        settings = SampleSettings(
            index=i,
            prompt=PROMPT,
            width=64,
            height=64,
            steps=args.sample_steps,
            seed=ROLE_SEEDS["eval_noise"] + i,
            flow_shift=args.sample_shift,
            cfg_scale=1.0,
        )
        embeds = data["prompt_embeds"][i : i + 1, : int(data["prompt_mask"][i].sum())]
        samples.append(EncodedSample(settings, embeds, None, [data["control"][i : i + 1]]))
    return samples


def draw(transformer, vae, samples: list[EncodedSample]) -> np.ndarray:
    """The samples drawn, each from its own seed (so that every arm's samples compare with the base's)."""
    transformer.eval()
    cpu = torch.device("cpu")
    images = []
    for s in samples:
        if s.prompt.seed is None:
            raise ValueError(f"sample {s.prompt.index} has no seed: the arms' samples would not compare")
        image = generate(transformer, vae, s, seed=s.prompt.seed, device=cpu, dtype=torch.float32, shift_terminal=0.0)
        images.append(np.asarray(image))
    return np.stack(images)


def sample_lora(targs, lora: Path, vae, samples: list[EncodedSample]) -> np.ndarray:
    """The held-out samples of the base DiT with the run's LoRA, loaded as the trainer continues a LoRA."""
    loaded = replace(targs, network_weights=str(lora))
    transformer, _ = prepare_transformer(loaded, torch.device("cpu"), torch.float32)
    return draw(transformer, vae, samples)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for the judged images, manifest.json and "
        "the trainer's runs (outside the repository: the faces are research-only)",
    )
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument(
        "--arms",
        default="mse,rollout,positive",
        help=f"comma-separated of {', '.join(KNOWN_ARMS)}; mse and positive are always run",
    )
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--lora_people", type=int, default=128)
    parser.add_argument("--pretrain_people", type=int, default=1024)
    parser.add_argument(
        "--vae_scale",
        type=int,
        choices=(2, 4),
        default=VaeSettings().scale,
        help="pixels per latent along a side (one or two downsamplings)",
    )
    parser.add_argument("--vae_base_dim", type=int, default=VaeSettings.base_dim)
    parser.add_argument("--vae_steps", type=int, default=VaeSettings.steps)
    parser.add_argument("--vae_batch", type=int, default=VaeSettings.batch)
    parser.add_argument("--dit_layers", type=int, default=DitSettings.layers)
    parser.add_argument("--dit_heads", type=int, default=DitSettings.heads)
    parser.add_argument("--dit_steps", type=int, default=DitSettings.steps)
    parser.add_argument("--dit_batch", type=int, default=DitSettings.batch)
    parser.add_argument("--dit_lr", type=float, default=DitSettings.lr)
    parser.add_argument(
        "--dit_shift", type=float, default=DitSettings.shift, help="the base's pre-training timestep sampling shift"
    )
    parser.add_argument("--shift", type=float, default=2.2, help="the LoRA runs' --discrete_flow_shift (seed guide)")
    parser.add_argument(
        "--sample_shift", type=float, default=DitSettings.shift, help="the samples' flow shift (the base's, by default)"
    )
    parser.add_argument("--sample_steps", type=int, default=12)
    parser.add_argument("--lora_steps", type=int, default=200)
    parser.add_argument("--lora_batch", type=int, default=8)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lora_lr", type=float, default=1e-3)
    parser.add_argument("--rollout_steps", type=int, default=3)
    parser.add_argument("--pc_weight", type=float, default=16.0, help="the positive control's face-box MSE weight")
    add_common_arguments(parser, "folder of the fitted VAE and base DiT")
    return finish_args(parser, parser.parse_args(argv), KNOWN_ARMS)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    fast_cpu(args.threads)
    times: dict[str, float] = {}
    start = time.monotonic()
    edit, view = Edit(), View()
    vae_settings = VaeSettings(
        base_dim=args.vae_base_dim,
        dim_mult=(1, 2, 4)[: 1 + args.vae_scale // 2],
        steps=args.vae_steps,
        batch=args.vae_batch,
    )
    dit_settings = DitSettings(
        layers=args.dit_layers,
        heads=args.dit_heads,
        steps=args.dit_steps,
        batch=args.dit_batch,
        lr=args.dit_lr,
        shift=args.dit_shift,
    )
    with timed("load face source, engine, judge", times):
        source = FaceSource()
        engine = load_face_model(args.pack, models_root=args.models_root, provider="cpu")
        judge = load_judge()
    with timed("people (render, edit, detect)", times):
        heldout = find_people("heldout", args.heldout, source, edit, view, engine, judge)
        lora = find_people("lora", args.lora_people, source, edit, None, engine, None)
        pre = source.render(identities("pretrain", args.pretrain_people))
    print(
        f"  people kept / candidates: held-out {len(heldout)}/{heldout.candidates}, LoRA "
        f"{len(lora)}/{lora.candidates}; "
        f"pre-training {len(pre)} (not filtered)"
    )
    with timed("calibration of the judges", times):
        calibration = calibrate(heldout)
    for name, c in calibration.items():
        print(f"  {name}: ROC-AUC {c['auc']:.4f} ({'PASS' if c['auc'] >= AUC_FLOOR else 'FAIL'} at >= {AUC_FLOOR})")

    data_key = f"{source.sha256}:{args.pretrain_people}:{ROLE_SEEDS['pretrain']}"
    with timed("VAE (fit or cache) and its gate", times):
        third = len(pre) // 3
        vae_faces = torch.cat(
            [pre[:third], edit.apply(pre[third : 2 * third]), dit_settings.edit.apply(pre[2 * third :])]
        )
        vae_path, vae_fitted = fitted_vae(vae_settings, vae_faces, args.cache, data_key)
        files = model_files(vae_path, dit_settings, args.cache)
        encoders = load_encoders(files)
        gate = vae_gate(encoders, heldout, engine, judge)
    print(
        f"  VAE {'fitted now' if vae_fitted else 'loaded from the cache'}: {vae_settings.scale}x, base_dim "
        f"{vae_settings.base_dim}, {sum(p.numel() for p in encoders.pipeline.vae.parameters()) / 1e6:.2f} M "
        "parameters; "
        f"{vae_path}"
    )
    for name in ("control", "target"):
        print(
            f"  VAE round trip of the held-out {name}s: engine cosine {gate[f'{name}_engine']:.3f} "
            f"({gate[f'{name}_engine_found']} found), dlib similarity {gate[f'{name}_dlib']:.3f} "
            f"({gate[f'{name}_dlib_found']} found), L1 {gate[f'{name}_l1']:.2f}/255"
        )
    if not gate["passed"]:
        raise SystemExit(
            f"VAE gate FAILED: the round trip keeps engine {gate['control_engine']:.3f} (needs >= "
            f"{GATE_ENGINE}) and dlib {gate['control_dlib']:.3f} (needs >= {GATE_DLIB}); fit longer "
            "(--vae_steps) or wider (--vae_base_dim) before comparing arms"
        )
    print(f"  VAE gate passed (engine >= {GATE_ENGINE}, dlib >= {GATE_DLIB})")

    with timed("base DiT (pre-train or cache)", times):
        dit_path, dit_fitted = pretrained_dit(dit_settings, files, encoders, pre, args.cache, data_key)
        files = TinyModels(dit_path, files.vae, files.text_encoder, files.tokenizer_dir)
    print(
        f"  base DiT {'pre-trained now' if dit_fitted else 'loaded from the cache'}: {dit_settings.layers} blocks x "
        f"{dit_settings.heads * 32} dims, {dit_settings.steps} steps on the weaker edit {asdict(dit_settings.edit)}"
    )

    out = args.out
    with timed("held-out people: write, judge the targets, encode, sample the base", times):
        people_rows, ceiling, copy_scores = write_people(heldout, engine, judge, out)
        samples = encoded_samples(encoders, heldout, args)
        vae = encoders.pipeline.vae
        base_images = draw(models.load_transformer(files.dit, torch.float32), vae, samples)
        base_scores = judge_samples(base_images, heldout, engine, judge)
        dataset = write_dataset(lora, out / "trainer" / "dataset", args.lora_batch)
        masks = latent_box_masks(lora, vae_settings.scale)
    base_means = {
        m: mean_of_found([r[m] for r in base_scores])
        for m in ("dlib_view", "engine_view", "landmark_err", "outside_err", "dlib_found")
    }
    print(
        "  base DiT alone (no LoRA) on the held-out people: " + ", ".join(f"{k} {v:.3f}" for k, v in base_means.items())
    )

    scores, images, runs = {}, {}, []
    with timed("arms (the trainer's LoRA runs, sampling, judging)", times):
        for seed in args.seeds:
            for arm in args.arms:
                t0 = time.monotonic()
                targs, lora_file, summary = train_arm(
                    arm, seed, files, dataset, out / "trainer" / f"{arm}_seed{seed}", masks, args
                )
                t1 = time.monotonic()
                images[(arm, seed)] = sample_lora(targs, lora_file, vae, samples)
                t2 = time.monotonic()
                scores[(arm, seed)] = judge_samples(images[(arm, seed)], heldout, engine, judge)
                t3 = time.monotonic()
                runs.append(
                    {
                        "arm": arm,
                        "seed": seed,
                        "seconds_train": t1 - t0,
                        "seconds_sample": t2 - t1,
                        "seconds_judge": t3 - t2,
                        **summary,
                    }
                )
                extra = "".join(
                    f"; {k} {v['start']:.4f} -> {v['end']:.4f} on {v['steps']} steps"
                    for k, v in summary.items()
                    if isinstance(v, dict)
                )
                faces = (
                    f"; face targets without a face {summary['face_targets_without_face']}/{summary['face_targets']}"
                    if "face_targets" in summary
                    else ""
                )
                means = {m: mean_of_found([r[m] for r in scores[(arm, seed)]]) for m in ("dlib_view", "engine_view")}
                print(
                    f"  {arm:>9} seed {seed}: train {t1 - t0:.1f} s, sample {t2 - t1:.1f} s, judge {t3 - t2:.1f} s; "
                    f"MSE {summary['mse_start']:.4f} -> {summary['mse_end']:.4f}{extra}{faces}; dlib_view "
                    f"{means['dlib_view']:.3f}, engine_view {means['engine_view']:.3f}; load "
                    f"{os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    sample_rows = write_samples(images, scores, heldout, out)
    with timed("statistics and verdicts", times):
        n = len(heldout)
        headroom, endpoints, verdicts, judge_ok = judge_arms(
            scores, ceiling, copy_scores, calibration, args.arms, args.seeds, n, args.bootstrap
        )
    print()
    print(
        f"TIER 2 (the trainer): held-out people {n}; seeds {args.seeds}; LoRA {args.lora_steps} steps x batch "
        f"{args.lora_batch}, rank {args.lora_rank} on {len(lora)} people; VAE {vae_settings.scale}x (round trip engine "
        f"{gate['control_engine']:.3f}, dlib {gate['control_dlib']:.3f}); samples {args.sample_steps} Euler steps; "
        "64 px"
    )
    print_verdicts(calibration, judge_ok, headroom, scores, args.seeds, endpoints, verdicts, arm_labels(args))

    manifest = {
        "benchmark": "bench_face_loss_tier2",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "edit": asdict(edit),
        "view": asdict(view),
        "vae": {**asdict(vae_settings), "file": str(vae_path), "gate": gate},
        "dit": {**asdict(dit_settings), "file": str(dit_path)},
        "generator_weights_sha256": source.sha256,
        "judges": {"dlib": judge.describe(), "engine": engine.describe(), "independent_judges_available": ["dlib"]},
        "calibration": calibration,
        "headroom": headroom,
        "base_alone": base_means,
        "people": people_rows,
        "samples": sample_rows,
        "runs": runs,
        "endpoints": endpoints,
        "verdicts": verdicts,
        "decision_rule": "bench_face_loss_tier1.py's docstring, section 'Decision rule'",
        "stage_seconds": times,
    }
    atomic_write_json(out / "manifest.json", json.loads(json.dumps(manifest, default=float)))
    total = time.monotonic() - start
    print("stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; total {total / 60:.1f} min")
    print(f"images and manifest: {out}; load average {os.getloadavg()[1]:.1f} (5 min) on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
