"""`checkpoints.json`: one row per saved checkpoint of a run, and the checkpoint to keep with its reason.

The trainer writes the table beside the checkpoints (atomically, after every checkpoint); the
monitor, the panel and the Checkpoint Scoreboard read it. A row holds the checkpoint's step, its
validation loss per sigma (fixed noise on held-out items), the held-out likeness of its fixed-seed
samples (the training pack's cosine and the dlib judge's similarity to reference photos that are
neither controls nor training targets), each sample's similarity to its nearest training target
(face identity, and the whole image: a near-copy reproduces a training image) and a note.

`recommend` reads the rows in step order and says which checkpoint to keep and why: the highest
held-out likeness (else the lowest validation loss) among the checkpoints before the run shows
over-training, i.e. before the validation loss rises from its lowest point and before the first
near-copy of a training target. Torch-free: the watcher side imports it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..common.files import atomic_write_json
from .protocol import run_file

CHECKPOINTS_FILE = "checkpoints.json"
TABLE_VERSION = 1
DEFAULT_VALIDATION_SIGMAS = (1.0, 0.75, 0.5, 0.25)  # ai-toolkit's validation sigmas
VALIDATION_LOSS = "val_loss"  # metrics.jsonl / status.json: the mean over the sigmas
# A validation loss this much above its lowest point (relative) counts as a rise: fixed noise makes
# the figure repeatable, so what moves it is the LoRA.
RISE_TOLERANCE = 0.02
# A sample whose whole image correlates this much with a training target (grey 64 px thumbnails,
# Pearson) reproduces that image: two photos of one person in one setting stay well below it.
NEAR_COPY_IMAGE_SIMILARITY = 0.95


def sigma_metric(sigma: float) -> str:
    """`val_loss/sigma_0.75`: the validation loss at one sigma, in metrics.jsonl and status.json."""
    return f"{VALIDATION_LOSS}/sigma_{sigma:g}"


@dataclass
class CheckpointRow:
    name: str  # the checkpoint's file name
    step: int
    epoch: int | None = None
    validation_loss: dict[str, float] | None = None  # sigma (as "%g") -> loss; None: no validation items
    likeness: float | None = None  # mean cosine of the samples' faces to the references (training pack)
    likeness_dlib: float | None = None  # the dlib judge's mean similarity (None: judge not installed)
    likeness_samples: int = 0  # samples with a face scored against the references
    nearest_target: float | None = None  # highest face cosine of a sample to any training target
    nearest_target_image: float | None = None  # highest image correlation of a sample to any training target
    near_copies: int = 0  # samples at or above NEAR_COPY_IMAGE_SIMILARITY to a training target
    samples: int = 0
    note: str = ""

    @property
    def validation_mean(self) -> float | None:
        if not self.validation_loss:
            return None
        return sum(self.validation_loss.values()) / len(self.validation_loss)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "validation_loss_mean": self.validation_mean}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> CheckpointRow:
        known = {key: record[key] for key in cls.__dataclass_fields__ if key in record}
        return cls(**known)


@dataclass(frozen=True)
class Recommendation:
    name: str
    step: int
    reason: str  # "step 1500: highest held-out likeness 0.78 (dlib 0.71); validation loss rises after ..."


@dataclass
class CheckpointTable:
    rows: list[CheckpointRow] = field(default_factory=list)
    sigmas: tuple[float, ...] = DEFAULT_VALIDATION_SIGMAS
    references: int = 0  # reference photos of the person the likeness is measured against
    validation_items: int = 0

    def recommendation(self) -> Recommendation | None:
        return recommend(self.rows)

    def to_dict(self) -> dict[str, Any]:
        chosen = self.recommendation()
        return {
            "version": TABLE_VERSION,
            "sigmas": list(self.sigmas),
            "references": self.references,
            "validation_items": self.validation_items,
            "near_copy_image_similarity": NEAR_COPY_IMAGE_SIMILARITY,
            "checkpoints": [row.to_dict() for row in self.rows],
            "recommendation": asdict(chosen) if chosen else None,
        }


def write_table(output_dir: str | os.PathLike, table: CheckpointTable) -> Path:
    path = Path(output_dir) / CHECKPOINTS_FILE
    atomic_write_json(path, table.to_dict())
    return path


def read_table(folder: str | os.PathLike) -> CheckpointTable | None:
    """The run's table, or None when the folder has none (or it is unreadable, or a link out of the folder)."""
    path = run_file(folder, CHECKPOINTS_FILE)
    if path is None:
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        rows = [CheckpointRow.from_dict(row) for row in record["checkpoints"]]
        return CheckpointTable(
            rows,
            tuple(record.get("sigmas", DEFAULT_VALIDATION_SIGMAS)),
            int(record.get("references", 0)),
            int(record.get("validation_items", 0)),
        )
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None


def _first(rows: Sequence[CheckpointRow], key: Any, *, highest: bool) -> CheckpointRow:
    """The row with the highest (lowest) key; ties go to the earlier checkpoint (less training)."""
    best = rows[0]
    for row in rows[1:]:
        if (key(row) > key(best)) if highest else (key(row) < key(best)):
            best = row
    return best


def validation_rise(rows: Sequence[CheckpointRow]) -> CheckpointRow | None:
    """The checkpoint of the lowest validation loss when a later one is higher by RISE_TOLERANCE; else None."""
    scored = [(row, mean) for row in rows if (mean := row.validation_mean) is not None]
    if len(scored) < 2:
        return None
    lowest, lowest_mean = min(scored, key=lambda scored_row: scored_row[1])  # min() keeps the first of equal losses
    later = [row for row, mean in scored if row.step > lowest.step and mean > lowest_mean * (1 + RISE_TOLERANCE)]
    return lowest if later else None


def recommend(rows: Sequence[CheckpointRow]) -> Recommendation | None:
    """The checkpoint to keep and why, in words; None without rows."""
    if not rows:
        return None
    rows = sorted(rows, key=lambda row: row.step)
    rise = validation_rise(rows)
    first_copy = next((row for row in rows if row.near_copies > 0), None)
    candidates = [
        row
        for row in rows
        if (rise is None or row.step <= rise.step) and (first_copy is None or row.step < first_copy.step)
    ] or rows[:1]
    liked = [row for row in candidates if row.likeness is not None]
    validated = [row for row in candidates if row.validation_mean is not None]
    if liked:
        chosen = _first(liked, lambda row: row.likeness, highest=True)
        why = f"highest held-out likeness {chosen.likeness:.2f}"
        if chosen.likeness_dlib is not None:
            why += f" (dlib {chosen.likeness_dlib:.2f})"
    elif validated:
        chosen = _first(validated, lambda row: row.validation_mean, highest=False)
        why = f"lowest validation loss {chosen.validation_mean:.4f}"
        if any(row.samples for row in rows):
            why += " (no held-out likeness: give --likeness_references, photos of the person)"
    else:
        chosen = candidates[-1]
        why = (
            "the latest checkpoint before any sign of over-training; nothing else to choose by (give held-out "
            "items, --validation_split or a validation dataset, and --likeness_references)"
        )
    signals = []
    if rise is not None:
        signals.append(f"validation loss rises after step {rise.step}")
    if first_copy is not None:
        signals.append(
            f"near-copies of training targets appear at step {first_copy.step} "
            f"({first_copy.near_copies} of {first_copy.samples} samples)"
        )
    if not signals:
        signals.append(
            "no over-training seen: "
            + ("the validation loss has not risen" if validated else "no validation loss measured")
            + (" and no sample copies a training target" if any(row.samples for row in rows) else "")
        )
    return Recommendation(chosen.name, chosen.step, f"step {chosen.step}: {why}; {' and '.join(signals)}")


def _figure(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def format_table(table: CheckpointTable) -> str:
    """The table as text (log, monitor, scoreboard), the recommendation last."""
    sigmas = [f"{sigma:g}" for sigma in table.sigmas]
    head = (
        f"{'checkpoint':<40} {'step':>7} "
        + " ".join(f"{'val@' + s:>9}" for s in sigmas)
        + f" {'likeness':>8} {'dlib':>6} {'near-tgt':>8} {'img-tgt':>7} {'copies':>6}  note"
    )
    lines = [head]
    for row in sorted(table.rows, key=lambda row: row.step):
        losses = " ".join(f"{_figure((row.validation_loss or {}).get(s), 4):>9}" for s in sigmas)
        lines.append(
            f"{row.name:<40} {row.step:>7} {losses} {_figure(row.likeness):>8} {_figure(row.likeness_dlib):>6} "
            f"{_figure(row.nearest_target):>8} {_figure(row.nearest_target_image):>7} "
            f"{row.near_copies:>3}/{row.samples:<2}  {row.note}".rstrip()
        )
    chosen = table.recommendation()
    if chosen is not None:
        lines.append(f"keep {chosen.name}: {chosen.reason}")
    return "\n".join(lines)
