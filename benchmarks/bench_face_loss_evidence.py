"""Does the face-identity loss help, judged by a recognizer it never saw? Steps 2 and 3 of the evidence.

    python benchmarks/bench_face_loss_evidence.py [--seeds 1,2,3] [--steps 300] [--high_weight 10]
           [--eval_t 0.3] [--vae_steps 2400] [--work_dir DIR] [--threads 1]

Uses the face VAE of `bench_face_vae_ceiling.py` (same default settings, so its cached file;
fitted first when there is none) as the trainer's `--vae`, with the tiny random DiT and text
encoder of the tests (`tests/support/tiny_qwen.py`). The dataset is three 128x128 face crops (the same
pixels the VAE was fitted on): obama with obama2 as its control, obama2 with obama as its control
(another photo of the same person), biden with his mirrored crop (a transformed copy). Every run
is `face-consistency train` with the tests' tiny flag set for `--steps` steps; per seed one run
without face flags and one with `--enable_face_loss --use_face_as_loss` at the default weight and
`--face_loss_max_t`, plus one run at `--high_weight` (first seed) to show what identity hacking
looks like.

Scored per run, for the two obama items, against the held-out photos obama3 and
obama_partial_face (never trained on; full resolution; their mean identity per recognizer):

- x0: the one-step estimate x0_hat at t = `--eval_t` (same noise for every run), decoded;
- sample: the trainer's own last sample (8 sampling steps from noise, the item's control);
- engine: the training recognizer (test pack, onnxruntime, not the torch copy the loss trains
  through), its own detector, cosine similarity;
- dlib: the held-out judge, its own detector, similarity = 1 - distance / 1.2 (0.5 = dlib's
  same-person threshold).

A face one recognizer does not find is counted, not scored. Per run type the figures are the
mean over seeds of each seed's mean over items, +- the std over seeds; the pixel change is
mean |with - without| (0..255) between runs of the same seed; the gain is the mean over seeds of
(run - the MSE-only run of the same seed), judged real only when it exceeds twice the larger of
the two run types' seed-to-seed std.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from face_consistency.cli import main as cli_main
from face_consistency.faceid import cosine_similarity, load_face_model
from face_consistency.faceid.judge import load_judge, verdict
from face_consistency.musubi_formats.names import MUSUBI_SAMPLE
from PIL import Image, ImageOps

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
from bench_face_identity_training import decoded_x0_estimates  # noqa: E402
from bench_face_vae_ceiling import DEFAULT_CACHE, DEFAULT_DATA, DEFAULT_SOURCES, fast_cpu, fitted_face_vae  # noqa: E402
from tiny_qwen import tiny_train_argv, write_tiny_dataset, write_tiny_model_files, write_tiny_prompts  # noqa: E402

SIZE = 128  # the ceiling script's default crop size
SCORED = ("obama", "obama2")  # items 0 and 1, the person with held-out photos
HELD_OUT = ("obama3.jpg", "obama_partial_face.jpg")


def face_dataset(directory: Path, crops: dict[str, np.ndarray]) -> Path:
    image = {name: Image.fromarray(crop) for name, crop in crops.items()}
    pairs = [
        (image["obama"], image["obama2"]),
        (image["obama2"], image["obama"]),
        (image["biden"], ImageOps.mirror(image["biden"])),
    ]
    return write_tiny_dataset(directory, n=len(pairs), pairs=pairs, size=(SIZE, SIZE))


class Scorer:
    """Both recognizers' similarity of images to the held-out photos' identity."""

    def __init__(self, engine, judge, held_out: list[Path]) -> None:
        self.engine, self.judge = engine, judge
        self.identity = engine.identity([str(p) for p in held_out])
        self.judge_identity = judge.identity([str(p) for p in held_out])

    def score(self, images: list[np.ndarray]) -> dict[str, list[float]]:
        """{"engine": [...], "dlib": [...]}: one similarity per image whose face that recognizer finds."""
        engine_sims = [
            cosine_similarity(r.embedding, self.identity.embedding) for r in self.engine.analyze(images) if r.ok
        ]
        judged = [self.judge.judge(image) for image in images]
        dlib_sims = [verdict(r.descriptor, self.judge_identity.descriptor).similarity for r in judged if r.ok]
        return {"engine": engine_sims, "dlib": dlib_sims}


def last_samples(out: Path, n: int) -> list[np.ndarray]:
    """The trainer's samples of prompts 0..n-1 at its last sampling step (RGB uint8)."""
    named = [(m, f) for f in (out / "sample").glob("*.png") if (m := MUSUBI_SAMPLE.match(f.stem)) is not None]
    last_step = max(int(m["step"]) for m, _ in named)
    by_prompt = {int(m["prompt"]): f for m, f in named if int(m["step"]) == last_step}
    return [np.asarray(Image.open(by_prompt[i]).convert("RGB")) for i in range(n)]


def mean_std(values: list[float]) -> str:
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return "n/a"
    return f"{np.mean(finite):.3f} ± {np.std(finite):.3f}" + (
        f" (of {len(finite)})" if len(finite) < len(values) else ""
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--high_weight", type=float, default=10.0, help="the identity-hacking run's face_loss_weight")
    parser.add_argument("--eval_t", type=float, default=0.3)
    parser.add_argument("--models_root", type=Path, default=DEFAULT_DATA / "insightface")
    parser.add_argument("--pack", default="testpack")
    parser.add_argument("--faces", type=Path, default=DEFAULT_DATA / "faces")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="folder of the fitted VAEs")
    parser.add_argument(
        "--vae_steps", type=int, default=2400, help="the VAE fit's steps (the ceiling script's --steps)"
    )
    parser.add_argument(
        "--vae_sources", default=",".join(DEFAULT_SOURCES), help="the VAE fit's photos (the ceiling script's --sources)"
    )
    parser.add_argument("--work_dir", type=Path)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see bench_face_vae_ceiling.py)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.monotonic()
    fast_cpu(args.threads)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_face_loss_evidence_"))

    engine = load_face_model(args.pack, models_root=args.models_root, provider="cpu")  # as the ceiling script crops
    judge = load_judge()
    face_vae = fitted_face_vae(
        engine, args.faces, steps=args.vae_steps, sources=tuple(args.vae_sources.split(",")), cache=args.cache
    )
    vae_minutes = (time.monotonic() - start) / 60
    crops = dict(zip(face_vae.names, face_vae.crops))
    files = dataclasses.replace(write_tiny_model_files(work / "models"), vae=face_vae.path)
    dataset = face_dataset(work / "data", crops)
    prompts = write_tiny_prompts(work / "data", n=len(SCORED), size=(SIZE, SIZE), steps=8)
    scorer = Scorer(engine, judge, [args.faces / name for name in HELD_OUT])

    face_flags = [
        "--enable_face_loss",
        "--use_face_as_loss",
        "--face_model_name",
        args.pack,
        "--face_models_root",
        str(args.models_root),
        "--face_device",
        "cpu",
        "--face_eval_frequency",
        str(args.steps),
    ]
    # (label, output folder, extra flags, seeds)
    run_types = [
        ("MSE only", "mse", [], seeds),
        ("MSE + face (weight 0.1)", "face", face_flags, seeds),
        (
            f"MSE + face (weight {args.high_weight:g})",
            "face_high",
            [*face_flags, "--face_loss_weight", str(args.high_weight)],
            seeds[:1],
        ),
    ]
    figures: dict[str, dict[int, dict]] = {label: {} for label, *_ in run_types}
    train_seconds: dict[str, list[float]] = {label: [] for label, *_ in run_types}
    for seed in seeds:
        for label, folder, flags, run_seeds in run_types:
            if seed not in run_seeds:
                continue
            out = work / f"{folder}_seed{seed}"
            argv = tiny_train_argv(
                files,
                dataset,
                out,
                max_train_steps=args.steps,
                extra=[
                    "--sample_prompts",
                    str(prompts),
                    "--sample_every_n_steps",
                    str(args.steps),
                    "--seed",
                    str(seed),
                    *flags,
                ],
            )
            t0 = time.monotonic()
            if cli_main(["train", *argv]) != 0:
                raise SystemExit(f"training failed, see {out / 'status.json'}")
            train_seconds[label].append(time.monotonic() - t0)
            x0, target_decode = decoded_x0_estimates(argv, out / "tiny.safetensors", args.eval_t, seed=7)
            x0 = list(x0[: len(SCORED)])
            samples = last_samples(out, len(SCORED))
            figures[label][seed] = {
                "x0": x0,
                "sample": samples,
                "x0_scores": scorer.score(x0),
                "sample_scores": scorer.score(samples),
            }
            print(
                f"{label} seed {seed}: trained in {train_seconds[label][-1]:.0f} s; x0 "
                f"{figures[label][seed]['x0_scores']}; "
                f"sample {figures[label][seed]['sample_scores']}",
                flush=True,
            )

    real = [crops[n] for n in SCORED]
    print(
        f"face VAE {face_vae.path.name} ({'fitted' if face_vae.fitted_now else 'cached'}, {vae_minutes:.1f} min); "
        f"{args.steps} steps per run, seeds {seeds}, x0_hat at t={args.eval_t}, work dir {work}"
    )
    print(
        f"scored: {', '.join(SCORED)} against held-out {', '.join(HELD_OUT)}; engine {args.pack} cosine, "
        f"dlib similarity (0.5 = its threshold); [found/total]"
    )
    for label, images in (("real crops", real), ("VAE round trip (the ceiling)", list(target_decode[: len(SCORED)]))):
        s = scorer.score(images)
        print(
            f"{label:>30}: engine {np.mean(s['engine']) if s['engine'] else float('nan'):.3f} "
            f"[{len(s['engine'])}/{len(images)}]  dlib {np.mean(s['dlib']) if s['dlib'] else float('nan'):.3f} "
            f"[{len(s['dlib'])}/{len(images)}]"
        )
    per_seed: dict[str, dict[str, list[float]]] = {}
    for name, by_seed in figures.items():
        row = {}
        for what in ("x0", "sample"):
            for recognizer in ("engine", "dlib"):
                scores = [by_seed[s][f"{what}_scores"][recognizer] for s in by_seed]
                row[f"{what} {recognizer}"] = [float(np.mean(v)) if v else float("nan") for v in scores]
                row[f"{what} {recognizer} found"] = [len(v) for v in scores]
        per_seed[name] = row
        found = {
            k: f"{sum(row[k + ' found'])}/{len(SCORED) * len(by_seed)}"
            for k in ("x0 engine", "x0 dlib", "sample engine", "sample dlib")
        }
        print(
            f"{name:>30} ({len(by_seed)} seed{'s' if len(by_seed) > 1 else ''}, "
            f"{np.mean(train_seconds[name]):.0f} s/run): "
            + "; ".join(f"{k} {mean_std(row[k])} [{found[k]}]" for k in found)
        )
    base_name = run_types[0][0]
    for name, *_ in run_types[1:]:
        for what in ("x0", "sample"):
            change = [
                np.mean(
                    np.abs(
                        np.asarray(figures[name][s][what], np.float32)
                        - np.asarray(figures[base_name][s][what], np.float32)
                    )
                )
                for s in figures[name]
            ]
            print(
                f"pixel change {what}, {name} vs {base_name} (same seed): {np.mean(change):.2f}/255 "
                f"(seeds {list(figures[name])})"
            )
    base_seeds = list(figures[base_name])
    for name, *_ in run_types[1:]:
        run_seeds = list(figures[name])
        for what in ("x0", "sample"):
            for recognizer in ("engine", "dlib"):
                key = f"{what} {recognizer}"
                base = np.asarray(per_seed[base_name][key])
                run = np.asarray(per_seed[name][key])
                if not (np.isfinite(base).all() and np.isfinite(run).all()):
                    print(f"gain {key}, {name}: not judged (a run without any face found)")
                    continue
                paired = run - base[[base_seeds.index(s) for s in run_seeds]]
                spread = max(base.std(), run.std())
                print(
                    f"gain {key}, {name} - {base_name}: {paired.mean():+.4f} (per seed "
                    f"{', '.join(f'{d:+.4f}' for d in paired)}); seed-to-seed std {spread:.4f}; "
                    f"exceeds twice the spread: {'yes' if abs(paired.mean()) > 2 * spread else 'no'}"
                )
    print(
        f"wall time {(time.monotonic() - start) / 60:.1f} min (VAE {vae_minutes:.1f} min), this process's CPU time "
        f"{time.process_time() / 60:.1f} min; load average now {os.getloadavg()[1]:.1f} (5 min), "
        f"{os.getloadavg()[2]:.1f} (15 min) on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
