"""Pick the best images of a batch by score: sort, filter by threshold and/or top-k."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum


class Fallback(str, Enum):
    """What to return when no image passes the filter."""

    BEST = "best"  # the single highest-scoring image anyway
    EMPTY = "empty"  # nothing, with a report saying so


@dataclass(frozen=True)
class Pick:
    indices: list[int]  # original indices, best first
    passed: int  # how many met the threshold (before top-k)
    fallback_used: bool


def pick_best(
    scores: Sequence[float],
    threshold: float | None = None,
    top_k: int = 0,
    fallback: Fallback | str = Fallback.BEST,
) -> Pick:
    """Indices sorted by score (ties keep input order); NaN scores never pass and sort last.

    `threshold` None keeps every scored image; `top_k` 0 means no limit.
    """
    fallback = Fallback(fallback)
    if top_k < 0:
        raise ValueError(f"top_k must be 0 (no limit) or more, got {top_k}")
    values = [float(s) for s in scores]
    order = sorted(range(len(values)), key=lambda i: (math.isnan(values[i]), -_finite(values[i]), i))
    passing = [i for i in order if not math.isnan(values[i]) and (threshold is None or values[i] >= threshold)]
    kept = passing[:top_k] if top_k else passing
    if kept or not values:
        return Pick(indices=kept, passed=len(passing), fallback_used=False)
    if fallback is Fallback.BEST:
        return Pick(indices=order[:1], passed=0, fallback_used=True)
    return Pick(indices=[], passed=0, fallback_used=True)


def _finite(value: float) -> float:
    return -math.inf if math.isnan(value) else value
