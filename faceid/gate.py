"""Pass or reject each image of a scored batch, with the reason in words. ComfyUI-free; the gate node adapts it.

An image passes when its face scores at least the threshold against the reference and nothing
else rules it out: no face (or an image the detector cannot take), several faces (unless the
rules score the selected one), a face handed back unchanged from the control, and, when the
rules require it, the held-out judge not seeing the same person.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from .judge import SIMILARITY_THRESHOLD
from .scoring import BatchScores, ImageScore


class SeveralFaces(str, Enum):
    """What an image with more than one face gets."""

    REJECT = "reject"
    SCORE_SELECTED = "score_selected"  # the face the scoring selected (largest, by default) decides


@dataclass(frozen=True)
class GateRules:
    threshold: float
    several_faces: SeveralFaces = SeveralFaces.REJECT
    reject_unchanged: bool = True  # a face returned unchanged from the control (needs the control)
    require_judge: bool = False  # with a judge: it must see the same person too
    judge_threshold: float = SIMILARITY_THRESHOLD  # on the judge's similarity scale (0.5 = dlib's 0.6 distance)


@dataclass(frozen=True)
class GateDecision:
    index: int
    passed: bool
    reason: str  # "passed: ..." or "rejected: ...", with the score and band where the image has a face


def gate_decisions(batch: BatchScores, rules: GateRules) -> list[GateDecision]:
    """One decision per scored image, in order."""
    return [_decide(row, batch, rules) for row in batch.rows]


def _decide(row: ImageScore, batch: BatchScores, rules: GateRules) -> GateDecision:
    result = row.result
    failures, notes = [], []  # what rules the image out; what else was measured
    if not row.scored:
        failures.append("no face" if result.faces_found == 0 else result.reason or "no usable face")
    else:
        score = f"{row.score:.3f} ({row.band})"
        if row.score < rules.threshold:
            failures.append(f"{score} below {rules.threshold:.2f}")
        else:
            notes.append(f"{score} >= {rules.threshold:.2f}")
        if result.faces_found > 1 and SeveralFaces(rules.several_faces) is SeveralFaces.REJECT:
            failures.append(f"several faces ({result.faces_found} found)")
        if rules.reject_unchanged and row.unchanged:
            failures.append(
                f"face unchanged from the control (change {row.face_change:.3f} < {batch.copy_paste_threshold:.2f})"
            )
    judged = _judge_words(row, rules)
    if judged is not None:
        agrees, words = judged
        (failures if rules.require_judge and not agrees else notes).append(words)
    verdict = "rejected" if failures else "passed"
    return GateDecision(row.index, not failures, f"{verdict}: {'; '.join(failures + notes)}")


def _judge_words(row: ImageScore, rules: GateRules) -> tuple[bool, str] | None:
    """Whether the judge sees the same person, and its verdict in words; None without a judge."""
    if row.judge is None:
        return None
    v = row.judge_verdict
    if v is None:
        return False, f"judge: {row.judge.reason or 'no face'}"
    same = v.similarity >= rules.judge_threshold
    return same, f"judge {v.similarity:.3f} ({'same person' if same else 'NOT the same person'})"


def gate_report(decisions: Sequence[GateDecision], rules: GateRules, title: Sequence[str] = ()) -> str:
    passed = sum(d.passed for d in decisions)
    lines = list(title)
    rule = f"gate: passes at or above {rules.threshold:.2f}"
    if SeveralFaces(rules.several_faces) is SeveralFaces.REJECT:
        rule += "; several faces rejected"
    if rules.reject_unchanged:
        rule += "; faces unchanged from the control rejected"
    if rules.require_judge:
        rule += f"; the judge must agree (similarity >= {rules.judge_threshold:.2f})"
    lines.append(rule)
    lines.extend(f"{d.index:>3}  {d.reason}" for d in decisions)
    lines.append(f"{passed} of {len(decisions)} passed, {len(decisions) - passed} rejected")
    return "\n".join(lines)
