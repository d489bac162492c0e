"""Does the face-identity loss help? Two tiny CPU trainings from one seed, with and without it.

    python benchmarks/bench_face_identity_training.py [--steps 60] [--face_loss_weight 0.1]
           [--face_loss_max_t 1.0] [--size 64] [--eval_t 0.3] [--work_dir DIR]

The dataset is the shared real photos, each cropped square around its face (the face fills
the tiny image), its control the mirrored crop. Both runs use the tiny random models of the
tests with identical seeds, flags and data; the second adds `--use_face_as_loss`. After
training, each LoRA predicts the one-step estimate x0_hat at t = eval_t (the same noise for
both runs), the VAE decodes it, and the figures are:

- identity: the engine's similarity (onnxruntime recognizer, not the torch copy the loss
  trained through) of each decoded face, aligned with the cached keypoints by InsightFace's
  own `norm_crop`, to the controls' identity; plus how many decodes the engine's detector
  still finds a face in;
- held-out: the similarity by a second recognizer, if `--heldout_pack` names one;
- pixel change: mean |difference| (0..255) of the decodes between the two runs, and each run's
  difference to the VAE reconstruction of the target;
- samples: the trainer's own `face_sim/sample_*` of its last sampling round;
- cost: one training micro-step (forward + backward) with / without the loss, and what one
  decode, warp and recognizer pass (forward + backward) cost at this size, best of interleaved
  repeats.

A tiny random DiT and VAE cannot draw a face: read the figures as whether the gradient moves
the trained recognizer's score and at what cost, not as image quality.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from face_consistency.cli import main as cli_main
from face_consistency.faceid import load_face_model
from face_consistency.musubi_formats.dataset import load_dataset_config
from face_consistency.trainer import models
from face_consistency.trainer.cli import parse_args, validate_args
from face_consistency.trainer.face.hook import build_training_hook
from face_consistency.trainer.face.loss import FrozenFaceRecognizer, warp_to_arcface
from face_consistency.trainer.face.targets import cache_face_targets, collate_face_targets
from face_consistency.trainer.flow_matching import collate, micro_step
from face_consistency.trainer.sampling import denormalize_latents, pack, unpack
from face_consistency.trainer.train import prepare_transformer
from face_consistency.training_contract.protocol import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("FACE_TEST_DATA", REPO_ROOT.parent / "shared" / "testdata"))
sys.path.insert(0, str(REPO_ROOT / "tests" / "support"))
from tiny_qwen import tiny_train_argv, write_tiny_dataset, write_tiny_model_files, write_tiny_prompts  # noqa: E402


@dataclass(frozen=True)
class TrainingRunFiles:
    """One training run of the benchmark: its output folder, its LoRA and its command line."""

    out: Path
    lora: Path
    argv: list[str]


def run_argv(files, dataset, prompts, out: Path, args: argparse.Namespace, face_loss: bool) -> list[str]:
    extra = [
        "--face_model_name",
        args.pack,
        "--face_models_root",
        str(args.models_root),
        "--face_device",
        "cpu",
        "--enable_face_loss",
        "--face_eval_frequency",
        str(args.steps),
        "--face_loss_weight",
        str(args.face_loss_weight),
        "--face_loss_max_t",
        str(args.face_loss_max_t),
        "--sample_prompts",
        str(prompts),
        "--sample_every_n_steps",
        str(args.steps),
    ]
    return tiny_train_argv(
        files, dataset, out, max_train_steps=args.steps, extra=extra + (["--use_face_as_loss"] if face_loss else [])
    )


@torch.no_grad()
def decoded_x0_estimates(argv: list[str], lora: Path, eval_t: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 [B, H, W, 3] of the decoded x0_hat at t = eval_t, and of the decoded x0 (the target)."""
    args = validate_args(parse_args([*argv, "--network_weights", str(lora)]))
    transformer, _ = prepare_transformer(args, torch.device("cpu"), torch.float32)
    transformer.eval()
    vae = models.load_vae(args.vae, torch.float32)
    batch = collate(load_dataset_config(args.dataset_config).items)
    x0 = batch.x0
    _, _, _, h, w = x0.shape
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    t = torch.full((x0.shape[0],), eval_t)
    x_t = (1 - eval_t) * x0 + eval_t * noise
    tokens = torch.cat([pack(x_t), *[pack(c) for c in batch.controls]], dim=1)
    img_shapes = [[(1, h // 2, w // 2), *[(1, c.shape[3] // 2, c.shape[4] // 2) for c in batch.controls]]] * x0.shape[0]
    prediction = transformer(
        hidden_states=tokens,
        timestep=t,
        encoder_hidden_states=batch.prompt_embeds,
        encoder_hidden_states_mask=batch.prompt_mask,
        img_shapes=img_shapes,
        return_dict=False,
    )[0]
    x0_hat = x_t - eval_t * unpack(prediction[:, : (h // 2) * (w // 2)], h, w)

    def to_uint8(latents: torch.Tensor) -> np.ndarray:
        pixels = vae.decode(denormalize_latents(vae, latents), return_dict=False)[0][:, :, 0]
        return ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()

    return to_uint8(x0_hat), to_uint8(x0)


def engine_similarity(engine, rgb: np.ndarray, kps: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor):
    """onnxruntime similarity of norm_crop(image, cached kps) to the reference; and faces the detector finds."""
    from insightface.model_zoo import get_model
    from insightface.utils.face_align import norm_crop

    recognizer = get_model(
        str(FrozenFaceRecognizer.from_pack(engine.pack_dir).spec.onnx_path), providers=["CPUExecutionProvider"]
    )
    sims = []
    for i in np.flatnonzero(valid.numpy()):
        bgr = np.ascontiguousarray(rgb[i][:, :, ::-1])
        embedding = recognizer.get_feat(norm_crop(bgr, kps[i].numpy(), image_size=112))[0]
        sims.append(float(np.dot(embedding / np.linalg.norm(embedding), reference[i].numpy())))
    detected = sum(
        r.ok for r in engine.analyze([np.ascontiguousarray(x[:, :, ::-1]) for x in rgb], channel_order="bgr")
    )
    return np.asarray(sims), detected


def step_costs(argv: list[str], repeat: int) -> dict[str, float]:
    """Best-of-`repeat` milliseconds (interleaved, so other load on the machine hits all alike) of one
    training micro-step + backward without and with the face loss, and of the loss's parts alone
    (forward + backward of the VAE decode, the warp and the recognizer) at the run's sizes."""
    args = validate_args(parse_args([*argv, "--use_face_as_loss", "--face_loss_max_t", "1"]))
    accelerator = Accelerator(mixed_precision="no")
    hook = build_training_hook(args)
    items = load_dataset_config(args.dataset_config).items[:1]
    hook.on_cached(items, accelerator, lambda: False)  # never asked to stop
    transformer, _ = prepare_transformer(args, torch.device("cpu"), torch.float32)
    vae = models.load_vae(args.vae, torch.float32)
    batch = collate(items)
    generator = torch.Generator().manual_seed(0)
    faces = hook.training.batch(items, torch.device("cpu"))
    targets = hook.training.targets
    if targets is None:
        raise RuntimeError("the hook cached no face targets")
    latents = batch.x0.clone().requires_grad_(True)
    images = torch.rand(1, 3, *targets.for_items(items)[0].image_size[::-1], requires_grad=True)
    crops = torch.rand(1, 3, 112, 112, requires_grad=True)

    def step(hooks: list) -> None:
        loss, extra = micro_step(args, transformer, vae, batch, generator, torch.device("cpu"), accelerator, 1, hooks)
        (loss + (extra.loss if extra.loss is not None else 0)).backward()

    parts = {
        "step without": lambda: step([]),
        "step with": lambda: step([hook]),
        "decode": lambda: vae.decode(denormalize_latents(vae, latents), return_dict=False)[0].sum().backward(),
        "warp": lambda: warp_to_arcface(images, faces.kps, faces.source_region).sum().backward(),
        "recognizer": lambda: hook.training.loss.recognizer(crops).sum().backward(),
    }
    best = {name: float("inf") for name in parts}
    for _ in range(repeat + 1):  # the first round warms up
        for name, fn in parts.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - start) * 1000.0)
    AcceleratorState._reset_state(reset_partial_state=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--face_loss_weight", type=float, default=0.1)
    parser.add_argument("--face_loss_max_t", type=float, default=1.0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--eval_t", type=float, default=0.3)
    parser.add_argument("--models_root", type=Path, default=DEFAULT_DATA / "insightface")
    parser.add_argument("--pack", default="testpack")
    parser.add_argument("--heldout_pack", help="a second recognizer's pack under --models_root (none is shared here)")
    parser.add_argument("--faces", type=Path, default=DEFAULT_DATA / "faces")
    parser.add_argument("--work_dir", type=Path)
    parser.add_argument("--repeat", type=int, default=10, help="timing repeats (best of)")
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_face_identity_"))

    engine = load_face_model(args.pack, models_root=args.models_root, provider="cpu", det_size=640)
    files = write_tiny_model_files(work / "models")
    dataset = write_tiny_dataset(
        work / "data",
        n=len(list(args.faces.glob("*.jpg"))),
        with_face_photos=args.faces,
        face_model=engine,
        size=(args.size, args.size),
    )
    prompts = write_tiny_prompts(work / "data", n=2, size=(args.size, args.size), steps=8)
    items = load_dataset_config(dataset).items
    runs: dict[str, TrainingRunFiles] = {}
    for name, face_loss in (("mse only", False), ("mse + face", True)):
        out = work / name.replace(" ", "_").replace("+", "plus")
        argv = run_argv(files, dataset, prompts, out, args, face_loss)
        if cli_main(["train", *argv]) != 0:
            raise SystemExit(f"training failed, see {out / 'status.json'}")
        runs[name] = TrainingRunFiles(out, out / "tiny.safetensors", argv)

    packs = [("training", args.pack)] + ([("held-out", args.heldout_pack)] if args.heldout_pack else [])
    print(
        f"{len(items)} face images {args.size}x{args.size}, {args.steps} steps, seed 42, face_loss_weight "
        f"{args.face_loss_weight}, face_loss_max_t {args.face_loss_max_t}; x0_hat at t={args.eval_t}; work dir {work}"
    )
    decodes = {}
    for name, run in runs.items():
        decodes[name], target_decode = decoded_x0_estimates(run.argv, run.lora, args.eval_t, seed=7)
    decodes = {"target (VAE round trip)": target_decode, **decodes}  # the ceiling: the true latents decoded
    for name, rgb in decodes.items():
        for label, pack_name in packs:
            pack_engine = load_face_model(pack_name, models_root=args.models_root, provider="cpu", det_size=640)
            faces = collate_face_targets(cache_face_targets(items, pack_engine).for_items(items))
            sims, detected = engine_similarity(pack_engine, rgb, faces.kps, faces.reference, faces.valid)
            print(
                f"{name:>23} {label:>8} similarity to the controls' identity: mean {sims.mean():+.4f} "
                f"min {sims.min():+.4f} max {sims.max():+.4f} (n={len(sims)}); detector finds {detected}/{len(items)}"
            )
    for name, run in runs.items():
        change = np.abs(decodes[name].astype(np.float32) - target_decode.astype(np.float32)).mean()
        last = [m for m in read_metrics(run.out) if "face_sim/sample_count" in m][-1]
        print(
            f"{name:>23} mean |x0_hat decode - target decode| {change:.2f}/255; samples with a face "
            f"{last['face_sim/sample_count']}/2 (sample mean {last.get('face_sim/sample_mean', 'n/a')})"
        )
    if not args.heldout_pack:
        print(
            "held-out: no second, independent recognizer is available here (only the test pack's MobileFaceNet); "
            "no held-out figure"
        )
    between = np.abs(decodes["mse + face"].astype(np.float32) - decodes["mse only"].astype(np.float32)).mean()
    print(f"mean pixel change between the runs' x0_hat decodes: {between:.2f}/255")
    costs = step_costs(runs["mse only"].argv, args.repeat)
    with_loss, without = costs.pop("step with"), costs.pop("step without")
    extra_ms = with_loss - without
    print(
        f"step (batch 1, forward + backward, best of {args.repeat}): {without:.1f} ms without, {with_loss:.1f} ms "
        f"with the loss, ratio {with_loss / without:.2f}; the extra {extra_ms:.1f} ms vs its parts measured apart: "
        + ", ".join(f"{k} {v:.1f} ms ({100 * v / extra_ms:.0f}%)" for k, v in costs.items())
    )


if __name__ == "__main__":
    main()
