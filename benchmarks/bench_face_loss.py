"""Cost of the face-identity loss per call: warp vs recognizer, forward + backward.

    python benchmarks/bench_face_loss.py [--models_root DIR] [--pack NAME] [--device cpu|cuda]
                                         [--batch_sizes 1 4 8] [--image_size 512] [--repeat N]

A real photo is resized to image_size^2 (the decoded x0 estimate stands in for it), its face
detected once with the engine, and the batch warped to the recognizer's 112x112 template.
Prints milliseconds per call of: the warp (forward + backward to the pixels), the recognizer
(forward + backward to its input), the whole loss (forward + backward), and each part's share.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from face_consistency.faceid import load_face_model
from face_consistency.trainer.face_loss import FaceIdentityLoss, FrozenFaceRecognizer, warp_to_arcface

DEFAULT_DATA = Path(os.environ.get("FACE_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "testdata"))


def milliseconds_per_call(fn: Callable[[], None], device: torch.device, repeat: int) -> float:
    fn()  # warm-up: kernel selection / oneDNN primitive creation for this shape
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models_root", type=Path, default=DEFAULT_DATA / "insightface")
    parser.add_argument("--pack", default="testpack")
    parser.add_argument("--photo", type=Path, default=DEFAULT_DATA / "faces" / "obama.jpg")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--image_size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)

    photo = cv2.imread(str(args.photo))
    if photo is None:
        raise SystemExit(f"cannot read {args.photo}")
    side = min(photo.shape[:2])
    top, left = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
    bgr = cv2.resize(photo[top : top + side, left : left + side], (args.image_size,) * 2, interpolation=cv2.INTER_AREA)
    result = load_face_model(args.pack, models_root=args.models_root, provider="cpu").analyze([bgr])[0]
    if not result.ok:
        raise SystemExit(f"no face found in {args.photo} at {args.image_size}x{args.image_size}: {result.reason}")
    recognizer = FrozenFaceRecognizer.from_pack(args.pack, models_root=args.models_root).to(device)
    loss_fn = FaceIdentityLoss(recognizer, weight=1.0)
    image = torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1])).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    kps = torch.from_numpy(result.face.kps.astype(np.float32))[None]

    print(f"device {device} ({torch.get_num_threads()} CPU threads), pack {args.pack} "
          f"({recognizer.spec.onnx_path.name}), {args.image_size}x{args.image_size} -> "
          f"{recognizer.input_size}x{recognizer.input_size}, {args.repeat} calls each")
    print(f"{'batch':>5} {'warp ms':>9} {'recognizer ms':>14} {'loss ms':>9} {'warp %':>7} {'recognizer %':>13} {'ms/sample':>10}")
    for batch in args.batch_sizes:
        images = image.expand(batch, -1, -1, -1).to(device).clone().requires_grad_(True)
        kps_b = kps.expand(batch, 5, 2).to(device)
        reference = torch.randn(batch, recognizer(warp_to_arcface(images[:1].detach(), kps_b[:1])).shape[-1], device=device)
        valid = torch.ones(batch, dtype=torch.bool, device=device)
        t = torch.zeros(batch, device=device)
        crops = warp_to_arcface(images.detach(), kps_b).requires_grad_(True)

        def warp_only() -> None:
            warp_to_arcface(images, kps_b, image_size=recognizer.input_size).sum().backward()

        def recognizer_only() -> None:
            recognizer(crops).sum().backward()

        def whole_loss() -> None:
            loss_fn(images, kps_b, reference, valid, t).loss.backward()

        warp_ms = milliseconds_per_call(warp_only, device, args.repeat)
        recognizer_ms = milliseconds_per_call(recognizer_only, device, args.repeat)
        loss_ms = milliseconds_per_call(whole_loss, device, args.repeat)
        parts = warp_ms + recognizer_ms
        print(f"{batch:>5} {warp_ms:>9.2f} {recognizer_ms:>14.2f} {loss_ms:>9.2f} "
              f"{100 * warp_ms / parts:>6.1f}% {100 * recognizer_ms / parts:>12.1f}% {loss_ms / batch:>10.2f}")


if __name__ == "__main__":
    main()
