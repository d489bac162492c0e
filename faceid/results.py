"""Plain result types of the engine: no ComfyUI, no onnxruntime objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np


class Selection(str, Enum):
    """Which face to use when an image has several."""

    LARGEST = "largest"
    HIGHEST_SCORE = "highest_score"
    INDEX = "index"  # counted left to right
    BEST_MATCH = "best_match"  # closest to a given reference identity


@dataclass
class DetectedFace:
    bbox: np.ndarray  # (4,) x1, y1, x2, y2 in the original image's pixels
    kps: np.ndarray  # (5, 2) eyes, nose, mouth corners, original pixels
    det_score: float
    embedding: np.ndarray | None = None  # (D,) L2-normalised, when computed

    def embedded(self) -> np.ndarray:
        """The embedding of a face the recognizer has seen (every face of an `all_faces` analysis)."""
        if self.embedding is None:
            raise ValueError("this face was detected but not embedded")
        return self.embedding

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.bbox
        return float(max(0.0, x2 - x1) * max(0.0, y2 - y1))

    def to_dict(self) -> dict:
        return {
            "bbox": [round(float(v), 2) for v in self.bbox],
            "kps": [[round(float(x), 2), round(float(y), 2)] for x, y in self.kps],
            "det_score": round(float(self.det_score), 4),
        }


@dataclass
class FaceResult:
    """What the engine found in one image. No face is a result with a reason, not an exception."""

    image_size: tuple[int, int]  # (width, height)
    faces_found: int
    face: DetectedFace | None = None
    face_index: int | None = None  # index of `face` in left-to-right order
    reason: str | None = None
    faces: list[DetectedFace] = field(default_factory=list)  # all faces, when requested

    @property
    def ok(self) -> bool:
        return self.face is not None and self.face.embedding is not None

    @property
    def embedding(self) -> np.ndarray | None:
        return self.face.embedding if self.face is not None else None

    def rescale_to(self, original_size: tuple[int, int]) -> None:
        """Give sizes, boxes and keypoints in the pixels of the original of a downscaled image."""
        width, height = self.image_size
        if tuple(original_size) == (width, height) or not width or not height:
            return
        scale = np.array([original_size[0] / width, original_size[1] / height], np.float32)
        for face in {id(f): f for f in [*self.faces, self.face] if f is not None}.values():
            face.bbox = face.bbox * np.tile(scale, 2)
            face.kps = face.kps * scale
        self.image_size = (int(original_size[0]), int(original_size[1]))


@dataclass(frozen=True)
class Agreement:
    """How much photos of one person agree with each other: the same-person baseline of real photos."""

    mean: float
    min: float
    max: float
    pairs: int

    def to_dict(self) -> dict[str, Any]:
        return {"mean": round(self.mean, 6), "min": round(self.min, 6), "max": round(self.max, 6), "pairs": self.pairs}


@dataclass(frozen=True)
class JudgeIdentity:
    """A person for the held-out judge: the mean of its descriptors of one or more photos."""

    descriptor: np.ndarray
    count: int
    agreement: Agreement | None = None  # the photos' own agreement on the judge's scale


@dataclass
class Identity:
    """A person's identity: mean of L2-normalised embeddings, re-normalised."""

    embedding: np.ndarray
    count: int
    agreement: Agreement | None = None  # the photos' own mean similarity (two or more photos)
    judge: JudgeIdentity | None = None  # the same photos seen by the held-out judge, when one was given
