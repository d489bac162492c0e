"""The face-identity loss and face metrics inside the training loop (`--enable_face_loss`, `--use_face_as_loss`).

`build_training_hook(args)` loads the face model pack(s) before any training model loads (a bad
pack or an unavailable `--face_device` is a configuration error), and returns the
`TrainingHook` that

- after caching, caches each item's face target (5 keypoints, target and control embeddings)
  beside its latents, fingerprinted like them, and counts the items without a usable face;
- in the step, adds `face_loss_weight * (1 - cos)` of the decoded one-step estimate
  `x0_hat = x_t - t v_pred` (every `--face_loss_every` steps, samples with t <= max t), and every
  `--face_eval_frequency` steps measures the similarity of every sample's x0_hat face;
- after each sampling round, scores the samples against their control images as `evaluate` does.

With `--face_eval_model` a second pack (its own detector, recognizer and cached references)
measures the same x0 estimates and samples; it never contributes a gradient.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..faceid import FaceEngineError, FaceModel, ProviderError, load_face_model
from ..faceid.pack_download import TerminalProgress
from .dataset import DatasetItem
from .face_loss import FaceIdentityLoss, FrozenFaceRecognizer, face_region_boxes
from .face_metrics import HELDOUT, SampleScorer, heldout_keys
from .face_targets import FaceTargetBatch, FaceTargetCache, cache_face_targets, collate_face_targets
from .sampling import SAMPLE_DIR, EncodedSample
from .train import VAE_SCALE, ExtraLoss, StepState, TrainingHook

log = logging.getLogger("face_consistency.trainer")

DECODE_MODES = ("full", "half", "face")
REFERENCE = "control"  # the loss pulls towards the controls' identity (the person the edit starts from)


class FaceSetupError(ValueError):
    """The face model pack or its device cannot be used; the message says what to change."""


@dataclass
class FacePack:
    """One face model pack in training: the engine (detection, sample scoring) and its torch recognizer."""

    model: FaceModel
    loss: FaceIdentityLoss
    samples: SampleScorer | None
    targets: FaceTargetCache | None = None

    def batch(self, items: list[DatasetItem], device: torch.device) -> FaceTargetBatch:
        return collate_face_targets(self.targets.for_items(items), reference=REFERENCE).to(device)


def load_face_pack(args: argparse.Namespace, pack: str, prefix: str) -> FacePack:
    """The engine and frozen recognizer of `pack`, with the clear error a user can act on."""
    try:
        model = load_face_model(pack, models_root=args.face_models_root, provider=args.face_device,
                                det_size=args.face_det_size, allow_download=not args.offline,
                                progress=TerminalProgress())
        recognizer = FrozenFaceRecognizer.from_pack(model.pack_dir)
    except ProviderError as exc:
        raise FaceSetupError(
            f"--face_device {args.face_device}: {exc} The face engine detects faces while caching and scores "
            "samples; --face_device cpu runs it on the CPU (the loss itself runs on the training device)."
        ) from None
    except FaceEngineError as exc:
        raise FaceSetupError(f"face model pack {pack!r}: {exc}") from None
    samples = None
    if args.sample_prompts:
        samples = SampleScorer(model, Path(args.output_dir) / SAMPLE_DIR, Path(args.sample_prompts), prefix)
    loss = FaceIdentityLoss(recognizer, weight=args.face_loss_weight, max_t=args.face_loss_max_t,
                            t_weighting=args.face_loss_t_weighting)
    return FacePack(model, loss, samples)


def build_training_hook(args: argparse.Namespace) -> "FaceIdentityHook":
    """The hook for `--enable_face_loss` (metrics) and `--use_face_as_loss` (the loss too)."""
    training = load_face_pack(args, args.face_model_name, "")
    heldout = load_face_pack(args, args.face_eval_model, HELDOUT) if args.face_eval_model else None
    log.info("face model %s (%s, %d-d) on %s%s", training.model.pack_name, training.model.pack_dir,
             training.model.embedding_size, training.model.provider,
             f"; held-out {heldout.model.pack_name} ({heldout.model.embedding_size}-d)" if heldout else "")
    return FaceIdentityHook(training, heldout, use_loss=args.use_face_as_loss, loss_every=args.face_loss_every,
                            eval_frequency=args.face_eval_frequency, decode=args.face_decode)


class FaceIdentityHook(TrainingHook):
    def __init__(self, training: FacePack, heldout: FacePack | None, *, use_loss: bool, loss_every: int,
                 eval_frequency: int, decode: str = "face") -> None:
        if decode not in DECODE_MODES:
            raise ValueError(f"face decode mode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
        self.training = training
        self.heldout = heldout
        self.use_loss = use_loss
        self.loss_every = loss_every
        self.eval_frequency = eval_frequency
        self.decode = decode

    @property
    def packs(self) -> list[FacePack]:
        return [self.training] + ([self.heldout] if self.heldout else [])

    # --------------------------------------------------------------- caching

    def on_cached(self, items: list[DatasetItem], accelerator: Any, should_stop: Callable[[], bool]) -> dict[str, Any]:
        built = 0
        for pack in self.packs:
            pack.loss.to(accelerator.device)
            # each process caches its share, then every process loads them all
            mine = items[accelerator.process_index :: accelerator.num_processes]
            share = cache_face_targets(mine, pack.model, should_stop=should_stop)
            if pack is self.training:
                built = int(accelerator.reduce(torch.tensor([share.built], device=accelerator.device), "sum").item())
            accelerator.wait_for_everyone()
            pack.targets = cache_face_targets(items, pack.model, should_stop=should_stop)
        skipped = self.training.targets.without_face(REFERENCE)
        for target, reason in skipped.items():
            log.warning("face loss skips %s: %s", target, reason)
        log.info("face targets (%s): %d built, %d reused, %d of %d without a usable face",
                 self.training.model.pack_name, built, len(items) - built, len(skipped), len(items))
        status = {"face_targets": len(items), "face_targets_built": built, "face_targets_reused": len(items) - built,
                  "face_targets_without_face": len(skipped), "face_targets_skipped": skipped}
        if self.heldout:
            status["face_targets_heldout_without_face"] = len(self.heldout.targets.without_face(REFERENCE))
        return status

    # --------------------------------------------------------------- the step

    def extra_loss(self, state: StepState) -> ExtraLoss:
        loss_due = self.use_loss and state.step % self.loss_every == 0
        eval_due = state.step % self.eval_frequency == 0
        if not (loss_due or eval_due):
            return ExtraLoss()
        x0_hat = state.x0_hat()
        result = ExtraLoss()
        if loss_due:
            faces = self.training.batch(state.items, x0_hat.device)
            use = self.training.loss.active(state.t, faces.valid)
            result.metrics["face/loss_samples"] = int(use.sum())
            if bool(use.any()):
                images, region = self._decode(state, x0_hat[use], faces.kps[use], faces.source_region[use])
                out = self.training.loss(images, faces.kps[use], faces.reference[use], faces.valid[use],
                                         state.t[use], region)
                result.loss = out.loss
                result.metrics["loss/face"] = out.metrics["loss/face"]
        if eval_due:
            with torch.no_grad():
                x0 = x0_hat.detach()
                # A whole-target decode depends on the latents alone: with two packs, decode once for both.
                whole = self._decode_whole(state, x0) if self.heldout and self.decode != "face" else None
                result.metrics.update(self._measure(state, x0, self.training, whole))
                if self.heldout:
                    result.metrics.update(heldout_keys(self._measure(state, x0, self.heldout, whole)))
        return result

    def _measure(self, state: StepState, x0_hat: torch.Tensor, pack: FacePack,
                 whole: torch.Tensor | None = None) -> dict[str, Any]:
        """Similarity of every sample's x0_hat face to its reference, whatever its t.

        `whole`: all samples already decoded by `_decode_whole`, reused instead of decoding again.
        """
        faces = pack.batch(state.items, x0_hat.device)
        valid = faces.valid
        metrics: dict[str, Any] = {"face/valid": int(valid.sum()), "face/no_face": int((~valid).sum()),
                                   "face_sim/x0_count": int(valid.sum())}
        if not bool(valid.any()):
            return metrics
        if whole is None:
            images, region = self._decode(state, x0_hat[valid], faces.kps[valid], faces.source_region[valid])
        else:
            images, region = whole[valid], faces.source_region[valid]
        measured = pack.loss.measure(images, faces.kps[valid], faces.reference[valid], valid[valid], state.t[valid],
                                     region)
        measured.pop("face/no_face")
        metrics.update(measured)
        metrics["face/t_mean"] = float(state.t[valid].float().mean())
        return metrics

    def _decode(self, state: StepState, latents: torch.Tensor, kps: torch.Tensor,
                image_region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode [b, 16, 1, h, w] latents (with gradients) -> (pixels, the region of the target they show)."""
        if self.decode != "face":
            return self._decode_whole(state, latents), image_region
        width, height = (int(v) for v in image_region[0, 2:].tolist())
        boxes = face_region_boxes(kps.detach().cpu(), (width, height), multiple=VAE_SCALE)
        crops = torch.stack([latents[i, :, :, y0 // VAE_SCALE : y1 // VAE_SCALE, x0 // VAE_SCALE : x1 // VAE_SCALE]
                             for i, (x0, y0, x1, y1) in enumerate(boxes.tolist())])
        return state.decode(crops), boxes.to(image_region)

    def _decode_whole(self, state: StepState, latents: torch.Tensor) -> torch.Tensor:
        """Modes `full` and `half`: pixels of the whole target, so `source_region` is the whole image."""
        if self.decode == "half":
            # Averaged 2x2 latents decode to a half-size image of the whole target; the keypoints
            # keep their meaning through `source_region`.
            latents = F.avg_pool2d(latents[:, :, 0], kernel_size=2).unsqueeze(2)
        return state.decode(latents)

    # --------------------------------------------------------------- samples

    def on_samples(self, step: int, paths: list[Path], samples: list[EncodedSample]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for pack in self.packs:
            if pack.samples is None:
                continue
            try:
                metrics.update(pack.samples.score(paths))
            except FaceEngineError as exc:  # a scoring problem must not end the training run
                log.warning("could not score the samples of step %d with %s: %s", step, pack.model.pack_name, exc)
        return metrics
