"""Rank LoRA checkpoints by face similarity: group scores per checkpoint, pick the best, keep a copy."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..common.files import atomic_path
from ..musubi_formats.names import BEST_SUFFIX, parse_checkpoint_name


@dataclass(frozen=True)
class CheckpointScore:
    name: str
    step: int | None
    epoch: int | None
    final: bool
    scores: tuple[float, ...]  # every score given for this checkpoint, NaN for "no face"

    @property
    def valid(self) -> list[float]:
        return [s for s in self.scores if math.isfinite(s)]

    @property
    def mean(self) -> float:
        return float(np.mean(self.valid)) if self.valid else math.nan

    @property
    def std(self) -> float:
        return float(np.std(self.valid)) if len(self.valid) > 1 else 0.0


def _flatten_scores(item: Any) -> list[float]:
    """One list input item: a number, or a list / array / tensor of numbers."""
    if hasattr(item, "detach"):  # torch tensor
        item = item.detach().cpu().numpy()
    if isinstance(item, (list, tuple, np.ndarray)):
        return [v for sub in np.asarray(item, dtype=object).ravel() for v in _flatten_scores(sub)]
    if item is None:
        return [math.nan]
    try:
        return [float(item)]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"a score must be a number or a list of numbers, got {item!r}") from exc


def group_scores(
    names: Sequence[str], scores: Sequence[Any], saved_steps: dict[str, int] | None = None
) -> list[CheckpointScore]:
    """Pair checkpoint names with their scores (same order and length; a repeated name pools its scores).

    One name with many scores is one checkpoint scored several times. The result is ordered
    by training step (final last), the order the checkpoints were saved in; `saved_steps` gives the
    step of a checkpoint whose name holds none (an epoch checkpoint's `ss_steps`).
    """
    names = [str(n) for n in names]
    if not names:
        raise ValueError("no checkpoint names were given")
    if len(names) == 1 and len(scores) > 1:
        scores = [[v for item in scores for v in _flatten_scores(item)]]
    if len(names) != len(scores):
        raise ValueError(
            f"{len(names)} checkpoint names but {len(scores)} scores: connect one score (or one list of scores) "
            "per checkpoint, from the same per-checkpoint chain as the names"
        )
    pooled: dict[str, list[float]] = {}
    for name, item in zip(names, scores):
        pooled.setdefault(name, []).extend(_flatten_scores(item))
    results = []
    for name, values in pooled.items():
        _, step, epoch, final = parse_checkpoint_name(name)
        step = step if step is not None else (saved_steps or {}).get(name)
        results.append(CheckpointScore(name, step, epoch, final, tuple(values)))

    def order(c: CheckpointScore) -> tuple[bool, float, float]:
        return (c.final, math.inf if c.step is None else c.step, math.inf if c.epoch is None else c.epoch)

    return sorted(results, key=order)


def best_checkpoint(results: Sequence[CheckpointScore]) -> CheckpointScore:
    """Highest mean score; ties go to the earlier checkpoint (less training, same identity)."""
    scored = [r for r in results if math.isfinite(r.mean)]
    if not scored:
        raise ValueError("no checkpoint has a valid score (no face was found in any evaluated image)")
    return max(scored, key=lambda r: r.mean)  # max() keeps the first of equal scores


def chart_positions(results: Sequence[CheckpointScore]) -> tuple[list[float], str]:
    """X positions of the checkpoints on a chart and the axis label: steps, else epochs, else the saved order."""
    steps = [r.step for r in results if r.step is not None]
    if len(steps) == len(results):
        return [float(step) for step in steps], "step"
    epochs = [r.epoch for r in results if r.epoch is not None]
    if len(epochs) == len(results):
        return [float(epoch) for epoch in epochs], "epoch"
    return [float(i) for i in range(len(results))], "checkpoint (saved order)"


UNCHANGED_NOTE = "UNCHANGED face"


def copy_paste_notes(
    results: Sequence[CheckpointScore],
    agreement: float | None,
    changes: Sequence[CheckpointScore] = (),
    change_threshold: float = 0.10,
) -> dict[str, str]:
    """Checkpoint name -> a warning where its mean score is above the reference photos' own agreement
    (`agreement`: real photos of the person agree this much; None unknown), which real second photos do
    not reach; COPY? where its face change (`changes`, grouped like the scores, NaN unknown) is also near
    zero. A near-zero face change alone, with or without an agreement, is UNCHANGED: a LoRA that
    returns its input scores about 1.0 against the control."""
    change_of = {c.name: c.mean for c in changes}
    notes = {}
    for r in results:
        change = change_of.get(r.name, math.nan)
        unchanged = math.isfinite(change) and change < change_threshold
        above = agreement is not None and math.isfinite(r.mean) and r.mean > agreement
        if above and unchanged:
            notes[r.name] = (
                f"COPY? above the references' agreement {agreement:.3f} with face change {change:.3f} "
                f"< {change_threshold:.2f}"
            )
        elif above:
            notes[r.name] = f"above the references' agreement {agreement:.3f}: check by eye"
        elif unchanged:
            notes[r.name] = (
                f"{UNCHANGED_NOTE} (change {change:.3f} < {change_threshold:.2f}): "
                "the samples return the control's face"
            )
    return notes


def format_table(results: Sequence[CheckpointScore], best: CheckpointScore, notes: dict[str, str] | None = None) -> str:
    notes = notes or {}
    rows = [f"{'checkpoint':<48} {'step':>8} {'mean':>8} {'std':>7} {'n':>4}"]
    for r in results:
        step = str(r.step) if r.step is not None else (f"e{r.epoch}" if r.epoch is not None else "final")
        mean = f"{r.mean:.4f}" if math.isfinite(r.mean) else "n/a"
        no_face = len(r.scores) - len(r.valid)
        mark = "  <- best" if r is best else ""
        skipped = f"  ({no_face} without a face)" if no_face else ""
        note = f"  {notes[r.name]}" if r.name in notes else ""
        rows.append(f"{r.name:<48} {step:>8} {mean:>8} {r.std:>7.4f} {len(r.valid):>4}{mark}{skipped}{note}")
    return "\n".join(rows)


def best_copy_path(checkpoint_path: str | os.PathLike) -> Path:
    """`{output_name}-best.safetensors` beside the checkpoint."""
    path = Path(checkpoint_path)
    output_name, *_ = parse_checkpoint_name(path.name)
    return path.with_name(f"{output_name}{BEST_SUFFIX}.safetensors")


def copy_as_best(checkpoint_path: str | os.PathLike) -> Path:
    """Copy the checkpoint to `{output_name}-best.safetensors` atomically (a reader never sees half a file)."""
    source = Path(checkpoint_path)
    target = best_copy_path(source)
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return target
