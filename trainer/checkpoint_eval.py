"""What the trainer measures at every checkpoint: the validation loss on held-out items with fixed
noise at fixed sigmas, the held-out likeness of the samples, and their nearness to training targets.

`ValidationLoss` scores the held-out items (never trained on) at each sigma with noise drawn once
per item from `--validation_seed` (the training generator is not touched, so a run with validation
trains exactly as one without), under `torch.no_grad`. `SampleEvidence` scores one checkpoint's
samples: against reference photos of the person (`--likeness_references`; the training pack and,
when installed, the dlib judge) and against the training targets (the face's cosine, and the whole
image's correlation, which flags near-copies). The table and the recommendation are
`training_contract/checkpoint_choice.py`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import torch
from PIL import Image

from ..faceid import FaceEngineError, FaceModel, ProviderError, load_face_engine
from ..faceid.judge import DlibJudge, JudgeNotInstalledError, load_judge, verdict
from ..faceid.pack_download import TerminalProgress
from ..musubi_formats.dataset import DatasetItem
from ..training_contract.checkpoint_choice import NEAR_COPY_IMAGE_SIMILARITY, VALIDATION_LOSS, sigma_metric
from .config import TrainingConfig

log = logging.getLogger("face_consistency.trainer")

THUMBNAIL_SIDE = 64  # the near-copy test compares grey thumbnails: layout and tones, not texture


class LatentBatch(Protocol):
    """What `ValidationLoss` reads of the loop's batch (`flow_matching.Batch`)."""

    @property
    def x0(self) -> torch.Tensor: ...


BatchT = TypeVar("BatchT", bound=LatentBatch)


class ValidationLoss:
    """Flow-matching loss of the held-out items at fixed sigmas with fixed noise.

    `measure(batch_of, velocity_of)` takes the loop's own pieces: `batch_of(items)` collates
    cached items (a batch with `x0` and `controls`), `velocity_of(batch)` is the model's velocity
    for that batch, `(latents, t) -> v`. Each item is scored alone (items may differ in size).
    """

    def __init__(self, items: Sequence[DatasetItem], sigmas: Sequence[float], seed: int) -> None:
        self.items = list(items)
        self.sigmas = tuple(float(s) for s in sigmas)
        self.seed = seed
        self._noise: dict[str, torch.Tensor] = {}

    def noise_for(self, index: int, shape: torch.Size) -> torch.Tensor:
        """The item's noise: the same tensor at every call of a run and in every run with this seed."""
        key = self.items[index].key
        if key not in self._noise:
            generator = torch.Generator("cpu").manual_seed(self.seed * 1_000_003 + index)
            self._noise[key] = torch.randn(shape, generator=generator)
        return self._noise[key]

    @torch.no_grad()
    def measure(
        self,
        batch_of: Callable[[list[DatasetItem]], BatchT],
        velocity_of: Callable[[BatchT], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
        device: torch.device,
    ) -> dict[str, float]:
        """`val_loss` (the mean over the sigmas) and `val_loss/sigma_<s>` for each sigma."""
        totals = dict.fromkeys(self.sigmas, 0.0)
        for index, item in enumerate(self.items):
            batch = batch_of([item])
            x0 = batch.x0.to(device)
            noise = self.noise_for(index, x0.shape).to(device)
            velocity = velocity_of(batch)
            for sigma in self.sigmas:
                t = torch.full((x0.shape[0],), sigma, device=device)
                x_t = (1 - sigma) * x0 + sigma * noise
                totals[sigma] += float(((velocity(x_t, t) - (noise - x0)) ** 2).mean())
        losses = {sigma_metric(sigma): total / len(self.items) for sigma, total in totals.items()}
        return {VALIDATION_LOSS: sum(losses.values()) / len(losses), **losses}


def thumbnail(path: Path) -> np.ndarray:
    """The image as a zero-mean, unit-norm grey THUMBNAIL_SIDE² vector (a flat image: all zeros)."""
    with Image.open(path) as image:
        grey = np.asarray(
            image.convert("L").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BILINEAR), np.float64
        ).ravel()
    grey -= grey.mean()
    norm = np.linalg.norm(grey)
    return grey / norm if norm > 0 else grey


class SampleEvidence:
    """Scores one checkpoint's samples: held-out likeness and nearness to the training targets."""

    def __init__(
        self,
        training_targets: Sequence[Path],
        model: FaceModel | None = None,
        references: Sequence[Path] = (),
        judge: DlibJudge | None = None,
    ) -> None:
        self.target_thumbnails = np.stack([thumbnail(p) for p in training_targets])
        self.model = model
        self.references = list(references)
        self.judge = judge
        self.reference = model.identity(self.references) if model is not None and self.references else None
        self.judge_reference = (
            judge.identity(self.references).descriptor if judge is not None and self.references else None
        )
        self.target_embeddings = None
        if model is not None:
            found = [r.embedding for r in model.analyze(list(training_targets)) if r.ok and r.embedding is not None]
            self.target_embeddings = np.stack(found) if found else None

    def score(self, samples: Sequence[Path]) -> dict[str, float | int | None]:
        """The fields of a `CheckpointRow` for these samples (means over the samples with a face)."""
        image_nearness = [float(np.max(self.target_thumbnails @ thumbnail(p))) for p in samples]
        fields: dict[str, float | int | None] = {
            "samples": len(samples),
            "nearest_target_image": max(image_nearness) if image_nearness else None,
            "near_copies": sum(value >= NEAR_COPY_IMAGE_SIMILARITY for value in image_nearness),
        }
        if self.model is not None and samples:
            faces = [r.embedding for r in self.model.analyze(list(samples)) if r.ok and r.embedding is not None]
            if faces and self.reference is not None:
                fields["likeness"] = float(np.mean([np.dot(f, self.reference.embedding) for f in faces]))
                fields["likeness_samples"] = len(faces)
            if faces and self.target_embeddings is not None:
                fields["nearest_target"] = float(np.max(np.stack(faces) @ self.target_embeddings.T))
        if self.judge is not None and self.judge_reference is not None and samples:
            judged = [
                verdict(r.descriptor, self.judge_reference).similarity
                for r in self.judge.judge_all(list(samples))
                if r.ok and r.descriptor is not None
            ]
            if judged:
                fields["likeness_dlib"] = float(np.mean(judged))
        return fields


def build_sample_evidence(config: TrainingConfig, training_targets: Sequence[Path]) -> SampleEvidence:
    """Without --likeness_references only the image nearness; with them the training pack (`--face_model_name`)
    and the dlib judge when it is installed. Raises ValueError with what to change."""
    references = list(config.likeness_reference_paths)
    if not references:
        return SampleEvidence(training_targets)
    try:
        model = load_face_engine(config.face_engine(), progress=TerminalProgress())
    except (ProviderError, FaceEngineError) as exc:
        raise ValueError(f"--likeness_references: face model pack {config.face_model_name!r}: {exc}") from None
    try:
        judge = load_judge()
    except JudgeNotInstalledError:
        log.info(
            "the dlib judge is not installed: held-out likeness from the training pack only "
            '(pip install "comfyui-face-consistency[judge]" adds it)'
        )
        judge = None
    try:
        return SampleEvidence(training_targets, model, references, judge)
    except FaceEngineError as exc:  # a reference photo without a face (the pack's or the judge's detector)
        raise ValueError(f"--likeness_references: {exc}. Give photos with one clear face each") from None
