"""The face-identity loss and face metrics inside the training loop (`--enable_face_loss`, `--use_face_as_loss`).

`build_training_hook(config)` loads the face model pack(s) before any training model loads (a bad
pack or an unavailable `--face_device` is a configuration error), and returns the
`TrainingHook` that

- after caching, caches each item's face target (5 keypoints, target and control embeddings)
  beside its latents, fingerprinted like them, and counts the items without a usable face;
- in the step, adds `face_loss_weight * (1 - cos)` of the decoded one-step estimate
  `x0_hat = x_t - t v_pred` (or the x0 of a `--face_loss_rollout_steps` Euler rollout) to the
  `--face_loss_reference` identity (every `--face_loss_every` steps, samples with t <= max t), plus
  `--face_loss_contrastive_weight` times an InfoNCE term against the faces of
  `--face_loss_negatives`; and every `--face_eval_frequency` steps measures the similarity of every
  sample's x0_hat face to its controls' identity;
- after each sampling round, scores the samples against their control images as `evaluate` does.

With `--face_eval_model` a second pack (its own detector, recognizer and cached references)
measures the same x0 estimates and samples; it never contributes a gradient. `--face_eval_model
dlib` makes that the dlib judge (faceid/judge.py): another family, its own detector on the decoded
x0 estimates (always the whole target decoded) and on the samples, the controls' mean descriptor
as the reference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...faceid import FaceEngineError, FaceModel, ProviderError, load_face_engine
from ...faceid.evaluate.report import summarize
from ...faceid.images import list_images
from ...faceid.judge import JUDGE_NAME, DlibJudge, load_judge, mean_descriptor, verdict
from ...faceid.pack_download import TerminalProgress
from ...faceid.results import JudgeIdentity
from ...musubi_formats.dataset import DatasetItem
from ...musubi_formats.names import SAMPLE_DIR
from ...training_contract.options import FACE_DECODE_MODES
from ..config import TrainingConfig
from ..hooks import ExtraLoss, StepState, TrainingHook
from ..sampling import EncodedSample
from ..vae_decode import vae_scale
from .loss import FaceIdentityLoss, FrozenFaceRecognizer, face_region_boxes
from .metrics import HELDOUT, SampleScorer, heldout_keys
from .targets import FaceTargetBatch, FaceTargetCache, ReferenceSource, cache_face_targets, collate_face_targets

log = logging.getLogger("face_consistency.trainer")

MEASURED_REFERENCE: ReferenceSource = (
    "control"  # x0 metrics: similarity to the controls' identity, whatever the loss pulls towards
)


class FaceSetupError(ValueError):
    """The face model pack or its device cannot be used; the message says what to change."""


@dataclass
class FacePack:
    """One face model pack in training: the engine (detection, sample scoring) and its torch recognizer."""

    model: FaceModel
    loss: FaceIdentityLoss
    samples: SampleScorer | None
    targets: FaceTargetCache | None = None

    def batch(
        self, items: list[DatasetItem], device: torch.device, reference: ReferenceSource = MEASURED_REFERENCE
    ) -> FaceTargetBatch:
        return collate_face_targets(self.cached_targets().for_items(items), reference=reference).to(device)

    def without_face(self, reference: ReferenceSource = MEASURED_REFERENCE) -> dict[str, str]:
        return self.cached_targets().without_face(reference)

    def cached_targets(self) -> FaceTargetCache:
        if self.targets is None:
            raise RuntimeError("the face targets are cached by on_cached, before the first step")
        return self.targets


class JudgeHeldout:
    """`--face_eval_model dlib`: the judge measures the x0 estimates against each item's controls.

    It sees the decoded pixels only (its own detector finds the face; the engine's keypoints are
    not used), so an estimate the judge cannot find a face in counts as `face_sim/x0_no_face`.
    """

    def __init__(self, judge: DlibJudge) -> None:
        self.judge = judge
        self.references: dict[Path, JudgeIdentity] = {}
        self.reasons: dict[str, str] = {}  # target file -> why the judge has no reference for it

    def cache(self, items: list[DatasetItem], should_stop: Callable[[], bool]) -> None:
        """The controls' mean descriptor per item (in memory: a few judge runs per control image)."""
        for item in items:
            if should_stop():
                return
            descriptors, problems = [], []
            for control in item.controls:
                with Image.open(control) as image:
                    result = self.judge.judge(image.convert("RGB"))
                if result.ok and result.descriptor is not None:
                    descriptors.append(result.descriptor)
                else:
                    problems.append(f"control {control}: {result.reason}")
            if descriptors:
                self.references[item.target] = mean_descriptor(descriptors)
            else:
                self.reasons[str(item.target)] = "; ".join(problems) or "no control images"

    def without_face(self) -> dict[str, str]:
        return dict(self.reasons)

    def measure(self, pixels: torch.Tensor, items: list[DatasetItem]) -> dict[str, Any]:
        """`face_sim/x0_*` of decoded estimates [B, 3, H, W] in [-1, 1], on the judge's similarity scale."""
        images = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        similarities, distances, missing = [], [], 0
        for image, item in zip(images.permute(0, 2, 3, 1).cpu().numpy(), items):
            reference = self.references.get(item.target)
            result = self.judge.judge(np.ascontiguousarray(image)) if reference is not None else None
            if reference is None or result is None or not result.ok or result.descriptor is None:
                missing += 1
                continue
            judged = verdict(result.descriptor, reference.descriptor)
            similarities.append(judged.similarity)
            distances.append(judged.distance)
        metrics: dict[str, Any] = {"face_sim/x0_count": len(similarities), "face_sim/x0_no_face": missing}
        if similarities:
            stats = summarize(similarities)
            metrics.update(
                {
                    "face_sim/x0_mean": stats["mean"],
                    "face_sim/x0_min": stats["min"],
                    "face_sim/x0_max": stats["max"],
                    "face_sim/x0": [round(s, 6) for s in similarities],
                    "face_sim/x0_distance_mean": float(np.mean(distances)),
                }
            )
        return metrics


def load_judge_heldout() -> JudgeHeldout:
    try:
        return JudgeHeldout(load_judge(JUDGE_NAME))
    except FaceEngineError as exc:
        raise FaceSetupError(f"--face_eval_model {JUDGE_NAME}: {exc}") from None


def load_face_pack(config: TrainingConfig, pack: str, prefix: str, judge: DlibJudge | None = None) -> FacePack:
    """The engine and frozen recognizer of `pack`, with the clear error a user can act on."""
    try:
        model = load_face_engine(config.face_engine(pack), progress=TerminalProgress())
        recognizer = FrozenFaceRecognizer.from_face_model(model)
    except ProviderError as exc:
        raise FaceSetupError(
            f"--face_device {config.face_device}: {exc} The face engine detects faces while caching and scores "
            "samples; --face_device cpu runs it on the CPU (the loss itself runs on the training device)."
        ) from None
    except FaceEngineError as exc:
        raise FaceSetupError(f"face model pack {pack!r}: {exc}") from None
    samples = None
    if config.sample_prompts:
        samples = SampleScorer(model, Path(config.output_dir) / SAMPLE_DIR, Path(config.sample_prompts), prefix, judge)
    loss = FaceIdentityLoss(
        recognizer,
        weight=config.face_loss_weight,
        max_t=config.face_loss_max_t,
        t_weighting=config.face_loss_t_weighting,
        contrastive_weight=config.face_loss_contrastive_weight,
        temperature=config.face_loss_temperature,
    )
    return FacePack(model, loss, samples)


def build_training_hook(config: TrainingConfig) -> FaceIdentityHook:
    """The hook for `--enable_face_loss` (metrics) and `--use_face_as_loss` (the loss too)."""
    heldout: FacePack | JudgeHeldout | None = None
    if config.face_eval_model == JUDGE_NAME:
        heldout = load_judge_heldout()
        # the training pack's sample rounds also score the samples with the judge
        training = load_face_pack(config, config.face_model_name, "", judge=heldout.judge)
        described = f"; held-out judge {JUDGE_NAME} ({heldout.judge.describe()['detector']})"
    else:
        training = load_face_pack(config, config.face_model_name, "")
        described = ""
        if config.face_eval_model:
            heldout_pack = heldout = load_face_pack(config, config.face_eval_model, HELDOUT)
            described = f"; held-out {heldout_pack.model.pack_name} ({heldout_pack.model.embedding_size}-d)"
    log.info(
        "face model %s (%s, %d-d) on %s%s",
        training.model.pack_name,
        training.model.pack_dir,
        training.model.embedding_size,
        training.model.provider,
        described,
    )
    negatives = None
    if config.use_face_as_loss and config.face_loss_negatives:
        negatives = negative_embeddings(training.model, Path(config.face_loss_negatives))
    return FaceIdentityHook(
        training,
        heldout,
        use_loss=config.use_face_as_loss,
        loss_every=config.face_loss_every,
        eval_frequency=config.face_eval_frequency,
        decode=config.face_decode,
        reference=cast(ReferenceSource, config.face_loss_reference),  # one of its choices (options.py)
        rollout_steps=config.face_loss_rollout_steps,
        negatives=negatives,
    )


def negative_embeddings(model: FaceModel, folder: Path) -> torch.Tensor:
    """[N, D]: the largest face of each photo in `folder` (other people: the contrastive term's negatives)."""
    photos = list_images(folder)
    results = model.analyze([str(p) for p in photos])
    for photo, result in zip(photos, results):
        if not result.ok:
            log.warning("--face_loss_negatives: %s is left out: %s", photo, result.reason)
    embeddings = [result.embedding for result in results if result.ok and result.embedding is not None]
    if not embeddings:
        raise FaceSetupError(
            f"--face_loss_negatives {folder}: no photo there has a face the {model.pack_name} "
            "detector finds; the contrastive term needs photos of other people"
        )
    log.info("contrastive face loss: %d negatives from %s", len(embeddings), folder)
    return torch.from_numpy(np.stack(embeddings)).float()


class FaceIdentityHook(TrainingHook):
    def __init__(
        self,
        training: FacePack,
        heldout: FacePack | JudgeHeldout | None,
        *,
        use_loss: bool,
        loss_every: int,
        eval_frequency: int,
        decode: str = "face",
        reference: ReferenceSource = "control",
        rollout_steps: int = 1,
        negatives: torch.Tensor | None = None,
    ) -> None:
        if decode not in FACE_DECODE_MODES:
            raise ValueError(f"face decode mode must be one of {', '.join(FACE_DECODE_MODES)}, got {decode!r}")
        self.reference = reference
        self.rollout_steps = rollout_steps
        self.negatives = negatives
        self.training = training
        self.heldout = heldout
        self.use_loss = use_loss
        self.loss_every = loss_every
        self.eval_frequency = eval_frequency
        self.decode = decode

    @property
    def packs(self) -> list[FacePack]:
        return [self.training] + ([self.heldout] if isinstance(self.heldout, FacePack) else [])

    # --------------------------------------------------------------- caching

    def on_cached(self, items: list[DatasetItem], accelerator: Any, should_stop: Callable[[], bool]) -> dict[str, Any]:
        built = 0
        if self.negatives is not None:
            self.negatives = self.negatives.to(accelerator.device)
        for pack in self.packs:
            pack.loss.to(accelerator.device)
            # each process caches its share, then every process loads them all
            mine = items[accelerator.process_index :: accelerator.num_processes]
            share = cache_face_targets(mine, pack.model, should_stop=should_stop)
            if pack is self.training:
                built = int(accelerator.reduce(torch.tensor([share.built], device=accelerator.device), "sum").item())
            accelerator.wait_for_everyone()
            pack.targets = cache_face_targets(items, pack.model, should_stop=should_stop)
        if isinstance(self.heldout, JudgeHeldout):
            self.heldout.cache(items, should_stop)
        skipped = self.training.without_face(self.reference if self.use_loss else MEASURED_REFERENCE)
        for target, reason in skipped.items():
            log.warning("face loss skips %s: %s", target, reason)
        log.info(
            "face targets (%s): %d built, %d reused, %d of %d without a usable face",
            self.training.model.pack_name,
            built,
            len(items) - built,
            len(skipped),
            len(items),
        )
        status = {
            "face_targets": len(items),
            "face_targets_built": built,
            "face_targets_reused": len(items) - built,
            "face_targets_without_face": len(skipped),
            "face_targets_skipped": skipped,
        }
        if self.heldout:
            status["face_targets_heldout_without_face"] = len(self.heldout.without_face())
        return status

    def saved_bytes_per_sample(self) -> int:
        return self.training.loss.recognizer.saved_bytes_per_sample() if self.use_loss else 0

    # --------------------------------------------------------------- the step

    def extra_loss(self, state: StepState) -> ExtraLoss:
        loss_due = self.use_loss and state.step % self.loss_every == 0
        eval_due = state.step % self.eval_frequency == 0
        if not (loss_due or eval_due):
            return ExtraLoss()
        x0_hat = state.x0_hat()
        result = ExtraLoss()
        if loss_due:
            faces = self.training.batch(state.items, x0_hat.device, self.reference)
            use = self.training.loss.active(state.t, faces.valid)
            result.metrics["face/loss_samples"] = int(use.sum())
            if bool(use.any()):
                x0 = x0_hat if self.rollout_steps == 1 else state.x0_rollout(self.rollout_steps)
                images, region = self._decode(state, x0[use], faces.kps[use], faces.source_region[use])
                out = self.training.loss(
                    images, faces.kps[use], faces.reference[use], faces.valid[use], state.t[use], region, self.negatives
                )
                result.loss = out.loss
                result.metrics.update({key: value for key, value in out.metrics.items() if key.startswith("loss/")})
        if eval_due:
            with torch.no_grad():
                x0 = x0_hat.detach()
                # A whole-target decode depends on the latents alone: with two packs, decode once for both.
                whole = self._decode_whole(state, x0) if self.heldout and self.decode != "face" else None
                result.metrics.update(self._measure(state, x0, self.training, whole))
                if isinstance(self.heldout, JudgeHeldout):
                    pixels = whole if whole is not None else self._decode_whole(state, x0)
                    result.metrics.update(heldout_keys(self.heldout.measure(pixels, state.items)))
                elif self.heldout:
                    result.metrics.update(heldout_keys(self._measure(state, x0, self.heldout, whole)))
        return result

    def _measure(
        self, state: StepState, x0_hat: torch.Tensor, pack: FacePack, whole: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """Similarity of every sample's x0_hat face to its reference, whatever its t.

        `whole`: all samples already decoded by `_decode_whole`, reused instead of decoding again.
        """
        faces = pack.batch(state.items, x0_hat.device)
        valid = faces.valid
        metrics: dict[str, Any] = {
            "face/valid": int(valid.sum()),
            "face/no_face": int((~valid).sum()),
            "face_sim/x0_count": int(valid.sum()),
        }
        if not bool(valid.any()):
            return metrics
        if whole is None:
            images, region = self._decode(state, x0_hat[valid], faces.kps[valid], faces.source_region[valid])
        else:
            images, region = whole[valid], faces.source_region[valid]
        measured = pack.loss.measure(
            images, faces.kps[valid], faces.reference[valid], valid[valid], state.t[valid], region
        )
        measured.pop("face/no_face")
        metrics.update(measured)
        metrics["face/t_mean"] = float(state.t[valid].float().mean())
        return metrics

    def _decode(
        self, state: StepState, latents: torch.Tensor, kps: torch.Tensor, image_region: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode [b, 16, 1, h, w] latents (with gradients) -> (pixels, the region of the target they show)."""
        if self.decode != "face":
            return self._decode_whole(state, latents), image_region
        width, height = (int(v) for v in image_region[0, 2:].tolist())
        scale = vae_scale(state.vae.config)  # type: ignore[arg-type]  # diffusers' ConfigMixin.config
        boxes = face_region_boxes(kps.detach().cpu(), (width, height), multiple=scale)
        crops = torch.stack(
            [
                latents[i, :, :, y0 // scale : y1 // scale, x0 // scale : x1 // scale]
                for i, (x0, y0, x1, y1) in enumerate(boxes.tolist())
            ]
        )
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
