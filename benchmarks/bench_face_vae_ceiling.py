"""Can the toy draw a face? Step 1 of the identity evidence: fit the tiny VAE on real face crops.

    python benchmarks/bench_face_vae_ceiling.py [--size 128] [--margin 1.5] [--base_dim 8] [--steps 2400]
           [--batch 2] [--lr 2e-3] [--sources shared,astronaut] [--cache DIR] [--threads 1]

The VAE is the real `AutoencoderKLQwenImage` class in a small config (8x spatial compression,
z_dim 16 and the key layout of the real one, so the trainer loads it with `--vae`), fitted as an
autoencoder (L1 + 0.1 MSE on the decoder's output before diffusers' clip to [-1, 1], Adam with a cosine
learning-rate decay, mirror flips and shifts of a few pixels as augmentation) on square face crops (side =
`--margin` x the engine's face box) of the real faces the environment has: the shared photos, the faces of
insightface's `t1` group photo and `skimage.data.astronaut()` (`--sources` picks among them; t1 is left out
by default). After the fit
the per-channel mean and std of the crops' latents are written into its config
(`latents_mean` / `latents_std`, as the real VAE's are dataset statistics), so the trainer's
normalised latents have unit scale. The file is cached under `--cache`, named by a hash of every
setting and of the crops: a rerun with the same settings loads it and skips the fit.

Then each crop's decode(encode(crop)) is scored against the crop by both recognizers, each with
its own detector: the engine (test pack, onnxruntime) and the dlib judge (HOG detector; crops
under 400 px are upsampled twice, see faceid/judge.py). That is the ceiling any LoRA trained on
this toy can reach.

Speed: on a shared 2-core CPU one torch thread runs these small convolutions several times
faster than two (OpenMP threads wait on each other when another process holds a core), and
denormal floats are flushed to zero (the freshly initialised VAE produces many).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from face_consistency.faceid import FaceModel, cosine_similarity, load_face_model
from face_consistency.faceid.judge import load_judge, verdict
from face_consistency.trainer.vae_decode import decoder_stages
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("FACE_TEST_DATA", REPO_ROOT.parent / "shared" / "testdata"))
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "face_consistency_bench_vae"
SOURCES = ("shared", "astronaut", "t1")
# t1's six small group-photo faces, upscaled, share the capacity and blur every decode (docs/face-loss.md)
DEFAULT_SOURCES = ("shared", "astronaut")
sys.path.insert(0, str(REPO_ROOT / "tests" / "support"))
from tiny_qwen import TINY_VAE_CONFIG, diffusers_vae_key_to_wan  # noqa: E402


def fast_cpu(threads: int) -> None:
    """See the module docstring's `Speed`."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def source_photos(faces_dir: Path, sources: tuple[str, ...]) -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8) of the chosen real photos."""
    from insightface.data import get_image
    from PIL import Image
    from skimage.data import astronaut

    photos = []
    if "shared" in sources:
        photos += [(p.stem, np.asarray(Image.open(p).convert("RGB"))) for p in sorted(faces_dir.glob("*.jpg"))]
    if "t1" in sources:
        photos.append(("t1", np.ascontiguousarray(get_image("t1")[..., ::-1])))
    if "astronaut" in sources:
        photos.append(("astronaut", astronaut()))
    return photos


def face_crops(
    engine: FaceModel, photos: list[tuple[str, np.ndarray]], size: int, margin: float
) -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8 size x size) for every face the engine finds in the photos."""
    import cv2

    crops = []
    for name, rgb in photos:
        result = engine.analyze([rgb], all_faces=True)[0]
        for j, face in enumerate(result.faces):
            x1, y1, x2, y2 = face.bbox
            side = max(x2 - x1, y2 - y1) * margin
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            box = np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]).round().astype(int)
            pad = int(max(0, -box.min(), box[2] - rgb.shape[1], box[3] - rgb.shape[0]))
            padded = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_REFLECT)
            crop = padded[box[1] + pad : box[3] + pad, box[0] + pad : box[2] + pad]
            crops.append(
                (
                    f"{name}#{j}" if len(result.faces) > 1 else name,
                    cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA),
                )
            )
    return crops


def to_tensor(crops: np.ndarray) -> torch.Tensor:
    """RGB uint8 [N, H, W, 3] -> [N, 3, 1, H, W] in [-1, 1] (one video frame, as the VAE takes it)."""
    return (torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1.0).unsqueeze(2)


def fit(vae, crops: np.ndarray, steps: int, batch: int, lr: float, seed: int) -> float:
    """Autoencoder fit; returns the mean L1 of the last 20 steps (0..2 scale)."""
    generator = torch.Generator().manual_seed(seed)
    data = to_tensor(crops)[:, :, 0]
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr * 0.02)
    vae.train()
    losses = []
    for _ in range(steps):
        x = data[torch.randint(len(data), (batch,), generator=generator)]
        flip = torch.rand(batch, generator=generator) < 0.5
        x[flip] = x[flip].flip(-1)
        dx, dy = (int(v) for v in torch.randint(-3, 4, (2,), generator=generator))
        x = torch.roll(x, (dy, dx), dims=(2, 3)).unsqueeze(2)
        # `vae.decode` clips to [-1, 1], which zeroes the gradient of every clipped pixel: fitted through
        # the clip, the decoder sat at the average face for 10-12 minutes (issue 21); unclipped, it leaves
        # it within a few hundred steps
        decoded = vae.encode(x).latent_dist.mode()
        for stage in decoder_stages(vae):
            decoded = stage(decoded)
        loss = (decoded - x).abs().mean() + 0.1 * ((decoded - x) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float((decoded.detach().clamp(-1.0, 1.0) - x).abs().mean()))
    vae.eval()
    return float(np.mean(losses[-20:]))


@torch.no_grad()
def latent_statistics(vae, crops: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the crops' (and their mirrors') latents."""
    x = to_tensor(np.concatenate([crops, crops[:, :, ::-1]]))
    z = torch.cat([vae.encode(x[i : i + 4]).latent_dist.mode() for i in range(0, len(x), 4)])
    return z.mean(dim=(0, 2, 3, 4)).tolist(), z.std(dim=(0, 2, 3, 4)).clamp(min=1e-3).tolist()


@torch.no_grad()
def round_trip(vae, crops: np.ndarray) -> np.ndarray:
    x = to_tensor(crops)
    decoded = torch.cat([vae.decode(vae.encode(x[i : i + 4]).latent_dist.mode()).sample for i in range(0, len(x), 4)])
    return ((decoded[:, :, 0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


@dataclass(frozen=True)
class FaceVAE:
    path: Path  # the trainer's `--vae`
    names: list[str]
    crops: np.ndarray  # RGB uint8 [N, size, size, 3], what it was fitted on
    fitted_now: bool
    fit_seconds: float
    last_l1: float  # 0..255; NaN when loaded from the cache


def fitted_face_vae(
    engine: FaceModel,
    faces_dir: Path,
    *,
    size: int = 128,
    margin: float = 1.5,
    base_dim: int = 8,
    steps: int = 2400,
    batch: int = 2,
    lr: float = 2e-3,
    seed: int = 0,
    sources: tuple[str, ...] = DEFAULT_SOURCES,
    cache: Path = DEFAULT_CACHE,
) -> FaceVAE:
    """The VAE fitted on the face crops with these settings: from the cache, or fitted and cached."""
    from diffusers import AutoencoderKLQwenImage

    named = face_crops(engine, source_photos(faces_dir, sources), size, margin)
    names, crops = [n for n, _ in named], np.stack([c for _, c in named])
    config = {**TINY_VAE_CONFIG, "base_dim": base_dim}
    settings = {
        "config": config,
        "size": size,
        "margin": margin,
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "sources": list(sources),
        "loss_on": "unclipped decode",
        "crops": hashlib.sha256(crops.tobytes()).hexdigest(),
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    path = cache / f"qwen_image_vae_faces_{size}px_b{base_dim}_{key}.safetensors"
    if path.is_file():
        return FaceVAE(path, names, crops, False, 0.0, float("nan"))
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(**config)
    start = time.monotonic()
    l1 = fit(vae, crops, steps, batch, lr, seed)
    seconds = time.monotonic() - start
    mean, std = latent_statistics(vae, crops)
    config = {**config, "latents_mean": mean, "latents_std": std}
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(
        {diffusers_vae_key_to_wan(k): v.contiguous() for k, v in vae.state_dict().items()},
        str(partial),
        metadata={"config": json.dumps(config), "settings": json.dumps(settings)},
    )
    os.replace(partial, path)
    return FaceVAE(path, names, crops, True, seconds, l1 * 127.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--margin", type=float, default=1.5, help="crop side / the engine's face box side")
    parser.add_argument("--base_dim", type=int, default=TINY_VAE_CONFIG["base_dim"])
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sources", default=",".join(DEFAULT_SOURCES), help=f"comma-separated, of {', '.join(SOURCES)}"
    )
    parser.add_argument("--models_root", type=Path, default=DEFAULT_DATA / "insightface")
    parser.add_argument("--pack", default="testpack")
    parser.add_argument("--faces", type=Path, default=DEFAULT_DATA / "faces")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="folder of the fitted VAEs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see Speed above)")
    args = parser.parse_args()
    sources = tuple(s for s in args.sources.split(",") if s)
    if not sources or set(sources) - set(SOURCES):
        parser.error(f"--sources: comma-separated names of {', '.join(SOURCES)}, got {args.sources!r}")
    fast_cpu(args.threads)
    from face_consistency.trainer.models import load_vae

    engine = load_face_model(args.pack, models_root=args.models_root, provider="cpu")
    judge = load_judge()
    face_vae = fitted_face_vae(
        engine,
        args.faces,
        size=args.size,
        margin=args.margin,
        base_dim=args.base_dim,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        sources=sources,
        cache=args.cache,
    )
    vae = load_vae(face_vae.path)
    crops = face_vae.crops
    decoded = round_trip(vae, crops)

    fitted = (
        f"fitted in {face_vae.fit_seconds / 60:.1f} min, last L1 {face_vae.last_l1:.1f}/255"
        if face_vae.fitted_now
        else "loaded from the cache"
    )
    print(
        f"{len(crops)} face crops {args.size}x{args.size} (margin {args.margin}); VAE base_dim {args.base_dim} "
        f"({sum(p.numel() for p in vae.parameters()) / 1e6:.1f} M parameters), {args.steps} steps of batch "
        f"{args.batch}, lr {args.lr:g} cosine; {fitted}; {face_vae.path}"
    )
    print(
        f"{'crop':<22} {'engine: crop':>12} {'decode':>7} {'cos':>7}  {'dlib: crop':>10} {'decode':>7} {'dist':>6}"
        f" {'sim':>6}  {'|decode-crop|':>13}"
    )
    engine_sims, judge_sims, found = [], [], {"engine": 0, "dlib": 0, "engine_crop": 0, "dlib_crop": 0}
    for name, crop, back in zip(face_vae.names, crops, decoded):
        e_crop, e_back = engine.analyze([crop, back])
        j_crop, j_back = judge.judge(crop), judge.judge(back)
        found["engine_crop"] += e_crop.ok
        found["dlib_crop"] += j_crop.ok
        found["engine"] += e_back.ok
        found["dlib"] += j_back.ok
        # an embedding (a descriptor) is there exactly when the engine (the judge) found the face
        cos = (
            cosine_similarity(e_crop.embedding, e_back.embedding)
            if e_crop.embedding is not None and e_back.embedding is not None
            else None
        )
        v = (
            verdict(j_crop.descriptor, j_back.descriptor)
            if j_crop.descriptor is not None and j_back.descriptor is not None
            else None
        )
        if cos is not None:
            engine_sims.append(cos)
        if v is not None:
            judge_sims.append(v.similarity)
        change = np.abs(back.astype(np.float32) - crop.astype(np.float32)).mean()
        print(
            f"{name:<22} {'face' if e_crop.ok else 'none':>12} {'face' if e_back.ok else 'none':>7} "
            f"{'-' if cos is None else f'{cos:.3f}':>7}  {'face' if j_crop.ok else 'none':>10} "
            f"{'face' if j_back.ok else 'none':>7} {'-' if v is None else f'{v.distance:.3f}':>6} "
            f"{'-' if v is None else f'{v.similarity:.3f}':>6}  {change:>9.1f}/255"
        )
    n = len(crops)
    print(
        "ceiling, decode(encode(crop)) vs crop: engine cosine "
        f"{np.mean(engine_sims) if engine_sims else float('nan'):.3f} "
        f"over {len(engine_sims)} (faces found: crops {found['engine_crop']}/{n}, decodes {found['engine']}/{n}); "
        f"dlib similarity {np.mean(judge_sims) if judge_sims else float('nan'):.3f} over {len(judge_sims)} "
        f"(faces found: crops {found['dlib_crop']}/{n}, decodes {found['dlib']}/{n})"
    )
    print(
        f"this process's CPU time {time.process_time() / 60:.1f} min; load average now {os.getloadavg()[1]:.1f} "
        f"(5 min), {os.getloadavg()[2]:.1f} (15 min) on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
