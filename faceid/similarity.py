"""Cosine similarity, identities from several photos, and the similarity bands users read."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from .results import Agreement, Identity


def normalize(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    if norm == 0.0 or not np.isfinite(norm):
        raise ValueError("cannot normalise a zero or non-finite embedding")
    return vector / norm


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two embeddings (normalised here, so raw embeddings work too)."""
    return float(np.dot(normalize(a), normalize(b)))


def mean_identity(embeddings: Iterable[np.ndarray]) -> Identity:
    vectors = [normalize(e) for e in embeddings]
    if not vectors:
        raise ValueError("an identity needs at least one embedding")
    return Identity(embedding=normalize(np.mean(vectors, axis=0)), count=len(vectors))


def agreement(values: Sequence[Any], similarity: Callable[[Any, Any], float]) -> Agreement | None:
    """Mean/min/max of `similarity(a, b)` over all pairs of `values`; None with fewer than two."""
    scores = [float(similarity(a, b)) for a, b in combinations(values, 2)]
    if not scores:
        return None
    return Agreement(float(np.mean(scores)), min(scores), max(scores), len(scores))


def embedding_agreement(embeddings: Sequence[np.ndarray]) -> Agreement | None:
    """`agreement` of reference photos' embeddings (cosine similarity)."""
    return agreement(embeddings, cosine_similarity)


@dataclass(frozen=True)
class Bands:
    """Similarity bands; the defaults are the seed guide's, tuned for 512-d ArcFace packs."""

    excellent: float = 0.85
    good: float = 0.75
    moderate: float = 0.65

    def __post_init__(self) -> None:
        if not (self.excellent >= self.good >= self.moderate):
            raise ValueError(
                f"bands must satisfy excellent >= good >= moderate, got {self.excellent}, {self.good}, {self.moderate}"
            )

    def label(self, score: float) -> str:
        if score >= self.excellent:
            return "excellent"
        if score >= self.good:
            return "good"
        if score >= self.moderate:
            return "moderate"
        return "poor"

    def to_dict(self) -> dict[str, float]:
        return {"excellent": self.excellent, "good": self.good, "moderate": self.moderate}
