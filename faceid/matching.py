"""One-to-one assignment of the people in a reference image to the faces in an output."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class FaceMatch:
    reference_index: int  # face index in the reference (left to right)
    output_index: int  # face index in the output (left to right)
    similarity: float


@dataclass
class FaceAssignment:
    matches: list[FaceMatch] = field(default_factory=list)  # ordered by reference_index
    unmatched_reference: list[int] = field(default_factory=list)  # people missing in the output
    unmatched_output: list[int] = field(default_factory=list)  # output faces nobody maps to

    def match_for_reference(self, reference_index: int) -> FaceMatch | None:
        return next((m for m in self.matches if m.reference_index == reference_index), None)


def match_faces(
    reference_embeddings: np.ndarray, output_embeddings: np.ndarray, min_similarity: float = -1.0
) -> FaceAssignment:
    """Hungarian assignment maximising total cosine similarity.

    Embeddings are L2-normalised rows: `reference_embeddings` (N, D), `output_embeddings`
    (M, D). Pairs the assignment makes but that score below `min_similarity` are dropped
    and both faces reported as unmatched (a stranger is not the missing person).
    """
    from scipy.optimize import linear_sum_assignment

    reference = np.asarray(reference_embeddings, dtype=np.float32)
    output = np.asarray(output_embeddings, dtype=np.float32)
    if reference.ndim != 2 or output.ndim != 2:
        raise ValueError(
            f"embeddings must be 2-D (faces, size); got {reference.shape} and {output.shape}"
        )
    if len(reference) and len(output) and reference.shape[1] != output.shape[1]:
        raise ValueError(
            f"embedding sizes differ: reference {reference.shape[1]}, output {output.shape[1]}"
        )
    matches: list[FaceMatch] = []
    if len(reference) and len(output):
        similarity_nm = reference @ output.T
        rows, cols = linear_sum_assignment(similarity_nm, maximize=True)
        matches = [
            FaceMatch(int(r), int(c), float(similarity_nm[r, c]))
            for r, c in zip(rows, cols)
            if similarity_nm[r, c] >= min_similarity
        ]
    matched_reference = {m.reference_index for m in matches}
    matched_output = {m.output_index for m in matches}
    return FaceAssignment(
        matches=sorted(matches, key=lambda m: m.reference_index),
        unmatched_reference=[i for i in range(len(reference)) if i not in matched_reference],
        unmatched_output=[j for j in range(len(output)) if j not in matched_output],
    )
