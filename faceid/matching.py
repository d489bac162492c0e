"""One-to-one assignment of the people in a reference image to the faces in an output."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .model import FaceModel
from .results import FaceResult
from .scoring import reference_pairing


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
        raise ValueError(f"embeddings must be 2-D (faces, size); got {reference.shape} and {output.shape}")
    if len(reference) and len(output) and reference.shape[1] != output.shape[1]:
        raise ValueError(f"embedding sizes differ: reference {reference.shape[1]}, output {output.shape[1]}")
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


@dataclass
class ImageMatch:
    """One output image: its faces, the reference it was matched against, and the assignment."""

    index: int
    reference: FaceResult
    result: FaceResult
    assignment: FaceAssignment

    @property
    def person_scores(self) -> list[float]:
        """One similarity per reference person (left to right); 0 where the person is missing."""
        scores = []
        for person in range(len(self.reference.faces)):
            match = self.assignment.match_for_reference(person)
            scores.append(match.similarity if match else 0.0)
        return scores


def match_batch(
    model: FaceModel,
    references: Sequence[FaceResult],
    outputs: Sequence[np.ndarray],
    min_similarity: float = -1.0,
    on_image: Callable[[], None] | None = None,
) -> list[ImageMatch]:
    """Match the people of each output's reference (1 for all, or pairwise) to the output's faces.

    `references` are analysed with `all_faces` (every face embedded); `outputs` are BGR uint8.
    """
    reference_of = reference_pairing(len(references), len(outputs))
    matches = []
    for i, bgr in enumerate(outputs):
        reference = references[reference_of[i]]
        result = model.analyze([bgr], all_faces=True, channel_order="bgr")[0]
        assignment = match_faces(
            np.stack([f.embedded() for f in reference.faces]),
            np.stack([f.embedded() for f in result.faces]) if result.faces else np.zeros((0, 1)),
            min_similarity,
        )
        matches.append(ImageMatch(i, reference, result, assignment))
        if on_image is not None:
            on_image()
    return matches
