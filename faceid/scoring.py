"""Score a batch of edited images against a reference identity: no-face policy, bands,
threshold count, copy-paste guard and a plain-text report. ComfyUI-free; nodes adapt it."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from .alignment import aligned_crop, face_region_change
from .errors import NoFaceError
from .judge import DlibJudge, JudgeResult, Verdict, verdict
from .model import FaceModel
from .results import Agreement, DetectedFace, FaceResult, Selection
from .similarity import Bands, normalize

DEFAULT_COPY_PASTE_THRESHOLD = 0.10  # 1 − SSIM below this: the face region was handed back unchanged
# Folder evaluation measures the face change only for samples at least this similar to their control:
# an unchanged face region embeds far above it (test pack: the control itself 1.000, as JPEG q50 0.993,
# downscaled by half 0.985; other photos of the person 0.72 to 0.76), so the decoding it costs is spent
# only where a copy is possible.
UNCHANGED_SCORE_FLOOR = 0.90
# Images analysed in one call (detected side by side on the CPU's cores) between progress updates
ANALYSIS_CHUNK = 8


class NoFacePolicy(str, Enum):
    """What an output without a usable face contributes."""

    SCORE_ZERO = "score_zero"  # scores 0 and counts in the mean
    EXCLUDE = "exclude"  # scores 0 in the per-image list but is left out of the mean


@dataclass(frozen=True)
class Control:
    """The control (input) image's face, for measuring how much an output's face changed."""

    crop: np.ndarray  # aligned BGR crop

    @classmethod
    def from_face(cls, bgr: np.ndarray, face: DetectedFace) -> Control:
        return cls(crop=aligned_crop(bgr, face))


@dataclass
class ImageScore:
    index: int
    result: FaceResult
    score: float  # cosine similarity; 0.0 when the image has no usable face
    band: str | None  # None when the image has no usable face
    excluded: bool
    face_change: float | None  # 1 − SSIM against the control; None without control or face
    face_scores: list[float]  # similarity of every detected face, left to right
    unchanged: bool  # face_change below the copy-paste threshold
    above_agreement: bool | None = None  # score above the reference photos' own agreement (None: unknown)
    judge: JudgeResult | None = None  # the held-out judge's own view of the output, when one was given
    judge_verdict: Verdict | None = None  # its verdict against the reference, None where it found no face

    @property
    def scored(self) -> bool:
        return self.band is not None

    @property
    def copy_paste(self) -> bool:
        """Closer to the reference than its real photos are to each other, with the face region unchanged."""
        return bool(self.above_agreement) and self.unchanged

    @property
    def judge_score(self) -> float:
        """The judge's similarity (its documented scale), -1 where it gave no verdict."""
        return self.judge_verdict.similarity if self.judge_verdict is not None else -1.0


@dataclass
class BatchScores:
    rows: list[ImageScore]
    bands: Bands
    threshold: float
    copy_paste_threshold: float
    agreement: Agreement | None = None  # the reference photos' own agreement (the same-person baseline)
    judge: DlibJudge | None = None

    @property
    def included(self) -> list[float]:
        """Scores that count in the mean (all but excluded no-face images)."""
        return [r.score for r in self.rows if not r.excluded]

    @property
    def scores(self) -> list[float]:
        return [r.score for r in self.rows]

    @property
    def mean(self) -> float:
        return float(np.mean(self.included)) if self.included else 0.0

    @property
    def count_at_or_above(self) -> int:
        return sum(1 for r in self.rows if r.scored and r.score >= self.threshold)

    def report(self, title: Sequence[str] = ()) -> str:
        b = self.bands
        lines = [
            *title,
            f"bands: excellent >= {b.excellent:.2f}, good >= {b.good:.2f}, moderate >= {b.moderate:.2f}, poor below",
        ]
        if self.agreement is not None:
            lines.append(
                f"reference photos' own agreement: {self.agreement.mean:.3f} (min {self.agreement.min:.3f}, "
                f"{self.agreement.pairs} pair(s)): real photos of one person agree this much"
            )
        if self.judge is not None:
            info = self.judge.describe()
            lines.append(
                f"held-out judge {info['judge']} ({info['detector']}): distance, same person below "
                f"{info['distance_threshold']}; similarity {info['similarity_scale']}"
            )
        judge_head = f"  {'dlib d':>6}  {'dlib s':>6}" if self.judge is not None else ""
        lines.append(f"{'#':>3}  {'score':>6}  {'band':<9}  {'face':<10}  {'change':>6}{judge_head}  note")
        for r in self.rows:
            index = r.result.face_index
            face = f"{index + 1} of {r.result.faces_found}" if r.scored and index is not None else "-"
            change = f"{r.face_change:6.3f}" if r.face_change is not None else f"{'-':>6}"
            judged = ""
            if self.judge is not None:
                v = r.judge_verdict
                judged = f"  {v.distance:6.3f}  {v.similarity:6.3f}" if v is not None else f"  {'-':>6}  {'-':>6}"
            lines.append(
                f"{r.index:>3}  {r.score:6.3f}  {(r.band or 'no face'):<9}  {face:<10}  {change}{judged}  "
                f"{_note(r, self)}".rstrip()
            )
        unchanged = sum(r.unchanged for r in self.rows)
        excluded = sum(r.excluded for r in self.rows)
        lines.append(
            f"mean {self.mean:.3f} over {len(self.included)} image(s); {self.count_at_or_above} at or "
            f"above {self.threshold:.2f}; {excluded} excluded (no face); {unchanged} unchanged"
        )
        if self.judge is not None:
            verdicts = [r.judge_verdict for r in self.rows if r.judge_verdict is not None]
            mean = np.mean([v.similarity for v in verdicts]) if verdicts else float("nan")
            lines.append(
                f"judge: mean similarity {mean:.3f} over {len(verdicts)} image(s); "
                f"{sum(v.same_person for v in verdicts)} same person; "
                f"{len(self.rows) - len(verdicts)} without a verdict"
            )
        copies = sum(r.copy_paste for r in self.rows)
        if copies:
            lines.append(
                f"COPY-PASTE? {copies} output(s) score above the reference photos' own agreement with an unchanged "
                "face: that is identity no real second photo reaches; the edit most likely returned the control."
            )
        if unchanged:
            lines.append(
                "WARNING: unchanged faces score perfect identity without any edit having happened; "
                "judge those outputs by eye, or score against other photos of the person."
            )
        return "\n".join(lines)


def _note(row: ImageScore, batch: BatchScores) -> str:
    notes = []
    if row.judge is not None and row.judge_verdict is None:
        notes.append(f"judge: {row.judge.reason or 'no reference verdict'}")
    elif row.judge_verdict is not None and row.scored and not row.judge_verdict.same_person:
        notes.append("judge: NOT the same person")
    return "; ".join([n for n in [_engine_note(row, batch)] if n] + notes)


def _engine_note(row: ImageScore, batch: BatchScores) -> str:
    if not row.scored:
        action = "excluded from the mean" if row.excluded else "scored 0"
        return f"{row.result.reason} ({action})"
    if row.copy_paste and batch.agreement is not None:
        return (
            f"COPY? above the references' agreement {batch.agreement.mean:.3f} and face unchanged "
            f"(change {row.face_change:.3f} < {batch.copy_paste_threshold:.2f})"
        )
    if row.unchanged:
        return (
            f"UNCHANGED face (change {row.face_change:.3f} < {batch.copy_paste_threshold:.2f}): "
            "the output copies the control's face"
        )
    return ""


def reference_pairing(reference_count: int, output_count: int, what: str = "reference") -> list[int]:
    """Which reference each output is compared with: one for all, or pairwise when counts match."""
    if output_count < 1:
        raise ValueError("no images to score: the images batch is empty")
    if reference_count == 1:
        return [0] * output_count
    if reference_count == output_count:
        return list(range(output_count))
    raise ValueError(
        f"{what} batch has {reference_count} images and the outputs batch {output_count}: give one "
        f"{what} for all outputs, or exactly one per output (pairwise, in order). To combine several "
        "photos of one person into one reference, use a Face Reference (FACE_IDENTITY) node."
    )


def reference_without_face(name: str, index: int, count: int, reason: str | None) -> NoFaceError:
    return NoFaceError(
        f"{name} image {index} (of {count}): {reason}. A reference must show the person's face "
        "clearly; replace that image or lower the detection threshold."
    )


def analyze_references(
    model: FaceModel,
    images: Sequence[np.ndarray],
    name: str = "reference",
    on_image: Callable[[], None] | None = None,
    *,
    all_faces: bool = False,
) -> list[FaceResult]:
    """Largest face of each reference image (and, with `all_faces`, every face embedded in
    `result.faces`); a reference without a face is an error naming it."""
    results = []
    for i, result in enumerate(analyze_each(model, images, all_faces=all_faces)):
        if not result.ok:
            raise reference_without_face(name, i, len(images), result.reason)
        results.append(result)
        if on_image is not None:
            on_image()
    return results


def analyze_each(
    model: FaceModel,
    images: Sequence[np.ndarray],
    references: Sequence[np.ndarray | None] | None = None,
    **options: Any,
) -> Iterator[FaceResult]:
    """`model.analyze` of each BGR image with `options`, against `references[i]` where given (what
    best_match chooses by), in order. Up to ANALYSIS_CHUNK images that share a reference are analysed
    in one call, which detects them side by side on the CPU's cores; the next call is made only when
    its first result is asked for, so a caller's progress moves image by image."""
    start = 0
    while start < len(images):
        reference = references[start] if references is not None else None
        end, limit = start + 1, min(len(images), start + ANALYSIS_CHUNK)
        while end < limit and (references is None or references[end] is reference):
            end += 1
        yield from model.analyze(list(images[start:end]), reference=reference, channel_order="bgr", **options)
        start = end


def score_batch(
    model: FaceModel,
    outputs: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    controls: Sequence[Control] = (),
    *,
    selection: Selection | str = Selection.LARGEST,
    index: int = 0,
    policy: NoFacePolicy | str = NoFacePolicy.SCORE_ZERO,
    bands: Bands | None = None,
    threshold: float = 0.75,
    copy_paste_threshold: float = DEFAULT_COPY_PASTE_THRESHOLD,
    on_image: Callable[[], None] | None = None,
    agreement: Agreement | None = None,
    judge: DlibJudge | None = None,
    judge_references: Sequence[np.ndarray] = (),
) -> BatchScores:
    """Score each output (BGR uint8) against its reference embedding (1 for all, or pairwise).

    `controls` (1 or pairwise, optional) enable the copy-paste guard; with `agreement` (the
    reference photos' own) an output above it with an unchanged face is flagged as a copy. All
    faces of every output are detected and embedded (`result.faces`), so callers can draw them.
    `judge` with its reference descriptors (1 or pairwise) adds the held-out judge's verdicts.
    """
    judge_of = reference_pairing(len(judge_references), len(outputs), "judge reference") if judge else []
    bands = bands or Bands()
    policy = NoFacePolicy(policy)
    selection = Selection(selection)
    reference_of = reference_pairing(len(references), len(outputs))
    control_of = reference_pairing(len(controls), len(outputs), "control") if controls else None
    references = [normalize(r) for r in references]
    for embedding in references:
        model.check_embedding_size(embedding)
    # the reference matters to the analysis only where it chooses the face
    choosing_by = [references[r] for r in reference_of] if selection is Selection.BEST_MATCH else None
    results = analyze_each(model, outputs, choosing_by, selection=selection, index=index, all_faces=True)
    rows = []
    for i, (bgr, result) in enumerate(zip(outputs, results)):
        reference = references[reference_of[i]]
        change = None
        if result.face is not None and result.face.embedding is not None:
            score = float(np.dot(result.face.embedding, reference))
            band = bands.label(score)
            if control_of is not None:
                change = face_region_change(controls[control_of[i]].crop, aligned_crop(bgr, result.face))
        else:
            score, band = 0.0, None
        row = ImageScore(
            index=i,
            result=result,
            score=score,
            band=band,
            excluded=band is None and policy is NoFacePolicy.EXCLUDE,
            face_change=change,
            face_scores=[float(np.dot(f.embedded(), reference)) for f in result.faces],
            unchanged=change is not None and change < copy_paste_threshold,
            above_agreement=score > agreement.mean if agreement is not None and band is not None else None,
        )
        if judge is not None:
            row.judge = judge.judge(bgr, channel_order="bgr")
            if row.judge.face is not None:
                row.judge_verdict = verdict(row.judge.face.descriptor, judge_references[judge_of[i]])
        rows.append(row)
        if on_image is not None:
            on_image()
    return BatchScores(rows, bands, float(threshold), float(copy_paste_threshold), agreement, judge)
