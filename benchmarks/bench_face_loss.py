"""Cost of the face-identity loss per call: warp vs recognizer, forward + backward; and with the decode.

    python benchmarks/bench_face_loss.py [--models_root DIR] [--pack NAME] [--device cpu|cuda]
                                         [--batch_sizes 1 4 8] [--image_size 512] [--repeat N]
    python benchmarks/bench_face_loss.py --vae_decoder [--image_size 512] [--face_box 160]

`--vae_decoder`: the real-size Qwen VAE decoder (random weights, the real config) decodes a
latent x0 estimate for the loss as the training step does (`full`, `half`, `face` decode, each
checkpointed per stage or not); prints the time of the loss's forward + backward and the bytes of
the tensors autograd saved for it (each storage once, weights excluded), against `full`
uncheckpointed, and the memory plan's estimate of the same bytes (the decoder's formula plus the
recognizer's saved bytes, which the plan measures on the loaded recognizer). The face's keypoints
are scaled so its `face` box is `--face_box` pixels.

A real photo is resized to image_size^2 (the decoded x0 estimate stands in for it), its face
detected once with the engine, and the batch warped to the recognizer's 112x112 template.
Prints milliseconds per call of: the warp (forward + backward to the pixels), the recognizer
(forward + backward to its input), the whole loss (forward + backward), and each part's share.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from face_consistency.faceid import FaceModel, load_face_model
from face_consistency.trainer.face.hook import FaceIdentityHook, FacePack
from face_consistency.trainer.face.loss import (
    FaceIdentityLoss,
    FrozenFaceRecognizer,
    face_region_boxes,
    full_image_region,
    warp_to_arcface,
)
from face_consistency.trainer.hooks import StepState
from face_consistency.trainer.memory_plan import decoder_saved_values, measure_saved_bytes
from face_consistency.trainer.models import VAE_CONFIG, shipped_config
from face_consistency.trainer.sampling import denormalize_latents
from face_consistency.trainer.vae_decode import checkpointed_decode, vae_scale

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


class PlainDecodeState(StepState):
    """The training step's decode without the per-stage checkpoints (for comparison)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raw = denormalize_latents(self.vae, latents.to(next(self.vae.parameters()).dtype))
        return checkpointed_decode(self.vae, raw, use_checkpoint=False)[:, :, 0]


def saved_bytes_and_ms(fn: Callable[[], torch.Tensor], frozen: list[torch.nn.Module]) -> tuple[int, float]:
    start = time.perf_counter()
    saved, loss = measure_saved_bytes(fn, frozen)
    loss.backward()
    return saved, (time.perf_counter() - start) * 1000.0


def kps_for_box(kps: torch.Tensor, image_size: int, box: int, multiple: int) -> torch.Tensor:
    """The keypoints scaled about their centre until `face_region_boxes` (on a grid of `multiple`
    pixels, the VAE's scale) gives a `box`-pixel box."""
    for _ in range(20):
        side = int(
            face_region_boxes(kps, (image_size, image_size), multiple=multiple)[0, 2]
            - face_region_boxes(kps, (image_size, image_size), multiple=multiple)[0, 0]
        )
        if side == box:
            return kps
        centre = kps.mean(dim=1, keepdim=True)
        kps = centre + (kps - centre) * (box / side)
    return kps


def vae_decoder_case(
    args: argparse.Namespace, model: FaceModel, recognizer: FrozenFaceRecognizer, kps: torch.Tensor
) -> None:
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    config = shipped_config(VAE_CONFIG)
    scale = vae_scale(config)
    vae = AutoencoderKLQwenImage(**config).eval().requires_grad_(False)
    kps = kps_for_box(kps, args.image_size, args.face_box, scale)
    latent_side = args.image_size // scale
    x0_hat = torch.randn(1, 16, 1, latent_side, latent_side)
    region = full_image_region(args.image_size, args.image_size)
    loss_fn = FaceIdentityLoss(recognizer, weight=1.0)
    reference = torch.randn(1, recognizer(torch.zeros(1, 3, recognizer.input_size, recognizer.input_size)).shape[-1])
    recognizer_bytes = recognizer.saved_bytes_per_sample()
    print(
        f"\nreal-size VAE decoder (random weights), {args.image_size}x{args.image_size} target, face box "
        f"{args.face_box}x{args.face_box}, CPU, {torch.get_num_threads()} threads; one forward+backward each"
    )
    print(
        f"{'decode':>6} {'checkpointed':>12} {'ms':>9} {'saved MiB':>10} {'time vs full':>13} {'bytes vs full':>14} "
        f"{'plan MiB':>9}"
    )

    def decoded_loss(hook: FaceIdentityHook, state: StepState, latents: torch.Tensor) -> torch.Tensor:
        images, source = hook._decode(state, latents, kps, region)
        return loss_fn(images, kps, reference, torch.ones(1, dtype=torch.bool), torch.zeros(1), source).loss

    base: tuple[int, float] | None = None
    for mode in ("full", "half", "face"):
        hook = FaceIdentityHook(
            FacePack(model, loss_fn, samples=None), None, use_loss=True, loss_every=1, eval_frequency=1, decode=mode
        )
        decoded_side = {"full": args.image_size, "half": args.image_size // 2, "face": args.face_box}[mode]
        values = decoder_saved_values(config, (decoded_side // scale,) * 2)
        for checkpointed in (False, True):
            state_class = StepState if checkpointed else PlainDecodeState
            latents = x0_hat.clone().requires_grad_(True)
            state = state_class(1, latents, latents, latents, torch.zeros(1), latents, vae, [])
            saved, ms = saved_bytes_and_ms(functools.partial(decoded_loss, hook, state, latents), [vae, recognizer])
            base = base or (saved, ms)
            plan = values.after_forward(checkpointed) * 4 + recognizer_bytes
            print(
                f"{mode:>6} {checkpointed!s:>12} {ms:>9.0f} {saved / 2**20:>10.1f} {ms / base[1]:>12.2f}x "
                f"{saved / base[0]:>13.3f}x {plan / 2**20:>9.1f}"
            )


def batch_milliseconds(
    loss_fn: FaceIdentityLoss, image: torch.Tensor, kps: torch.Tensor, device: torch.device, repeat: int
) -> tuple[float, float, float]:
    """Milliseconds per call of the warp, the recognizer and the whole loss (each forward + backward) on a batch."""
    recognizer = loss_fn.recognizer
    batch = image.shape[0]
    images = image.to(device).clone().requires_grad_(True)
    kps_b = kps.to(device)
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

    return (
        milliseconds_per_call(warp_only, device, repeat),
        milliseconds_per_call(recognizer_only, device, repeat),
        milliseconds_per_call(whole_loss, device, repeat),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models_root", type=Path, default=DEFAULT_DATA / "insightface")
    parser.add_argument("--pack", default="testpack")
    parser.add_argument("--photo", type=Path, default=DEFAULT_DATA / "faces" / "obama.jpg")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--image_size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--vae_decoder", action="store_true", help="the real-size VAE decoder case (CPU)")
    parser.add_argument("--face_box", type=int, default=160, help="face box side (pixels) of the decoder case")
    args = parser.parse_args()
    device = torch.device(args.device)

    photo = cv2.imread(str(args.photo))
    if photo is None:
        raise SystemExit(f"cannot read {args.photo}")
    side = min(photo.shape[:2])
    top, left = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
    bgr = cv2.resize(photo[top : top + side, left : left + side], (args.image_size,) * 2, interpolation=cv2.INTER_AREA)
    model = load_face_model(args.pack, models_root=args.models_root, provider="cpu")
    result = model.analyze([bgr])[0]
    if not result.ok or result.face is None:
        raise SystemExit(f"no face found in {args.photo} at {args.image_size}x{args.image_size}: {result.reason}")
    recognizer = FrozenFaceRecognizer.from_pack(args.pack, models_root=args.models_root).to(device)
    loss_fn = FaceIdentityLoss(recognizer, weight=1.0)
    image = torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1])).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    kps = torch.from_numpy(result.face.kps.astype(np.float32))[None]
    if args.vae_decoder:
        vae_decoder_case(args, model, recognizer.cpu(), kps)
        return

    print(
        f"device {device} ({torch.get_num_threads()} CPU threads), pack {args.pack} "
        f"({recognizer.spec.onnx_path.name}), {args.image_size}x{args.image_size} -> "
        f"{recognizer.input_size}x{recognizer.input_size}, {args.repeat} calls each"
    )
    print(
        f"{'batch':>5} {'warp ms':>9} {'recognizer ms':>14} {'loss ms':>9} {'warp %':>7} {'recognizer %':>13} "
        f"{'ms/sample':>10}"
    )
    for batch in args.batch_sizes:
        warp_ms, recognizer_ms, loss_ms = batch_milliseconds(
            loss_fn, image.expand(batch, -1, -1, -1), kps.expand(batch, 5, 2), device, args.repeat
        )
        parts = warp_ms + recognizer_ms
        print(
            f"{batch:>5} {warp_ms:>9.2f} {recognizer_ms:>14.2f} {loss_ms:>9.2f} "
            f"{100 * warp_ms / parts:>6.1f}% {100 * recognizer_ms / parts:>12.1f}% {loss_ms / batch:>10.2f}"
        )


if __name__ == "__main__":
    main()
