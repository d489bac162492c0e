"""Can the toy draw a face? Step 1 of the identity evidence: fit the tiny VAE on real face crops.

    python benchmarks/bench_face_vae_ceiling.py [--size 64] [--base_dim 8] [--minutes 15] [--batch 4]
           [--lr 2e-3] [--cache DIR]

The VAE is the real `AutoencoderKLQwenImage` class in a small config (the key layout of the real
one, so the trainer loads it with `--vae`), fitted as an autoencoder (L1 + 0.1 MSE on pixels,
flips and shifts of a few pixels as augmentation) on square face crops of every real face the
environment has: the shared photos, the six faces of insightface's `t1` group photo and
`skimage.data.astronaut()`. It trains for `--minutes` of wall time, is saved under `--cache`
(Wan key names, its config in the metadata), and then each crop's decode(encode(crop)) is scored
against the crop by both recognizers, each with its own detector: the engine (test pack, onnxruntime)
and the dlib judge. That is the ceiling any LoRA trained on this toy can reach.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from face_consistency.faceid import cosine_similarity, load_face_model
from face_consistency.faceid.judge import load_judge, verdict

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("FACE_TEST_DATA", REPO_ROOT.parent / "shared" / "testdata"))
sys.path.insert(0, str(REPO_ROOT / "tests"))
from tiny_qwen import TINY_VAE_CONFIG, diffusers_vae_key_to_wan  # noqa: E402

FACE_MARGIN = 1.8  # crop side / face box side: room around the face for both detectors


def face_crops(engine, faces_dir: Path, size: int) -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8 size x size) for every face found in the real photos."""
    import cv2
    from insightface.data import get_image
    from PIL import Image
    from skimage.data import astronaut

    sources = [(p.stem, np.asarray(Image.open(p).convert("RGB"))) for p in sorted(faces_dir.glob("*.jpg"))]
    sources += [("t1", np.ascontiguousarray(get_image("t1")[..., ::-1])), ("astronaut", astronaut())]
    crops = []
    for name, rgb in sources:
        result = engine.analyze([rgb], all_faces=True)[0]
        for j, face in enumerate(result.faces):
            x1, y1, x2, y2 = face.bbox
            side = max(x2 - x1, y2 - y1) * FACE_MARGIN
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            box = np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]).round().astype(int)
            pad = int(max(0, -box.min(), box[2] - rgb.shape[1], box[3] - rgb.shape[0]))
            padded = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_REFLECT)
            crop = padded[box[1] + pad : box[3] + pad, box[0] + pad : box[2] + pad]
            crops.append((f"{name}#{j}" if len(result.faces) > 1 else name,
                          cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)))
    return crops


def fit(vae, crops: np.ndarray, minutes: float, batch: int, lr: float, seed: int) -> tuple[int, float]:
    """Autoencoder fit for `minutes`; returns (steps, mean L1 of the last 10 steps, 0..2 scale)."""
    generator = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    vae.train()
    deadline, steps, losses = time.monotonic() + minutes * 60, 0, []
    while time.monotonic() < deadline:
        index = torch.randint(len(data), (batch,), generator=generator)
        x = data[index]
        flip = torch.rand(batch, generator=generator) < 0.5
        x[flip] = x[flip].flip(-1)
        dx, dy = (int(v) for v in torch.randint(-3, 4, (2,), generator=generator))
        x = torch.roll(x, (dy, dx), dims=(2, 3)).unsqueeze(2)
        decoded = vae.decode(vae.encode(x).latent_dist.mode()).sample
        loss = (decoded - x).abs().mean() + 0.1 * ((decoded - x) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float((decoded - x).detach().abs().mean()))
        steps += 1
    vae.eval()
    return steps, float(np.mean(losses[-10:]))


@torch.no_grad()
def round_trip(vae, crops: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float().unsqueeze(2) / 127.5 - 1.0
    decoded = torch.cat([vae.decode(vae.encode(x[i : i + 4]).latent_dist.mode()).sample for i in range(0, len(x), 4)])
    return ((decoded[:, :, 0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--base_dim", type=int, default=TINY_VAE_CONFIG["base_dim"])
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models_root", type=Path, default=DEFAULT_DATA / "insightface")
    parser.add_argument("--pack", default="testpack")
    parser.add_argument("--faces", type=Path, default=DEFAULT_DATA / "faces")
    parser.add_argument("--cache", type=Path, help="folder for the fitted VAE (default: a new temporary folder)")
    args = parser.parse_args()
    from diffusers import AutoencoderKLQwenImage

    engine = load_face_model(args.pack, models_root=args.models_root, provider="cpu")
    judge = load_judge()
    named = face_crops(engine, args.faces, args.size)
    names, crops = [n for n, _ in named], np.stack([c for _, c in named])
    torch.manual_seed(args.seed)
    config = {**TINY_VAE_CONFIG, "base_dim": args.base_dim}
    vae = AutoencoderKLQwenImage(**config)
    steps, l1 = fit(vae, crops, args.minutes, args.batch, args.lr, args.seed)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="face_vae_"))
    cache.mkdir(parents=True, exist_ok=True)
    weights = cache / f"qwen_image_vae_faces_{args.size}px_b{args.base_dim}.safetensors"
    save_file({diffusers_vae_key_to_wan(k): v.contiguous() for k, v in vae.state_dict().items()}, str(weights),
              metadata={"config": json.dumps(config)})
    decoded = round_trip(vae, crops)

    print(f"{len(crops)} face crops {args.size}x{args.size}; VAE base_dim {args.base_dim} "
          f"({sum(p.numel() for p in vae.parameters()) / 1e6:.1f} M parameters), {steps} steps of batch "
          f"{args.batch} in {args.minutes:g} min; last L1 {l1 * 127.5:.1f}/255; saved {weights}")
    print(f"{'crop':<22} {'engine: crop':>12} {'decode':>7} {'cos':>7}  {'dlib: crop':>10} {'decode':>7} {'dist':>6}"
          f" {'sim':>6}")
    engine_sims, judge_sims, found = [], [], {"engine": 0, "dlib": 0, "engine_crop": 0, "dlib_crop": 0}
    for name, crop, back in zip(names, crops, decoded):
        e_crop, e_back = engine.analyze([crop, back])
        j_crop, j_back = judge.judge(crop), judge.judge(back)
        found["engine_crop"] += e_crop.ok
        found["dlib_crop"] += j_crop.ok
        found["engine"] += e_back.ok
        found["dlib"] += j_back.ok
        cos = cosine_similarity(e_crop.embedding, e_back.embedding) if e_crop.ok and e_back.ok else None
        v = verdict(j_crop.descriptor, j_back.descriptor) if j_crop.ok and j_back.ok else None
        if cos is not None:
            engine_sims.append(cos)
        if v is not None:
            judge_sims.append(v.similarity)
        print(f"{name:<22} {'face' if e_crop.ok else 'none':>12} {'face' if e_back.ok else 'none':>7} "
              f"{'-' if cos is None else f'{cos:.3f}':>7}  {'face' if j_crop.ok else 'none':>10} "
              f"{'face' if j_back.ok else 'none':>7} {'-' if v is None else f'{v.distance:.3f}':>6} "
              f"{'-' if v is None else f'{v.similarity:.3f}':>6}")
    n = len(crops)
    print(f"ceiling, decode(encode(crop)) vs crop: engine cosine {np.mean(engine_sims) if engine_sims else float('nan'):.3f} "
          f"over {len(engine_sims)} (faces found: crops {found['engine_crop']}/{n}, decodes {found['engine']}/{n}); "
          f"dlib similarity {np.mean(judge_sims) if judge_sims else float('nan'):.3f} over {len(judge_sims)} "
          f"(faces found: crops {found['dlib_crop']}/{n}, decodes {found['dlib']}/{n})")


if __name__ == "__main__":
    main()
