"""Read a training run folder: ours (the job protocol) or a plain musubi-tuner output folder.

What a monitor needs from either kind of folder:
- the status (`status.json`, ours only) and the per-step metrics (`metrics.jsonl`, or the
  scalars of TensorBoard event files a musubi run wrote with `--logging_dir` inside its folder);
- the LoRA checkpoints, named the musubi way: `{name}-{epoch:06d}.safetensors`,
  `{name}-step{step:08d}.safetensors` and the final `{name}.safetensors`;
- `checkpoints.json` (ours only): each checkpoint's validation loss and held-out likeness, and the
  checkpoint to keep;
- the samples in `sample/`: `{name}_{step:06d}_{prompt:02d}_{YYYYmmddHHMMSS}[_{seed}][_{n:03d}].png`,
  or `e{epoch:06d}` in place of the step when an epoch triggered them.

Only files inside the folder are read: one that is a symlink to a file elsewhere is left out, as
if it were not there (the routes and nodes serve what this reads).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.files import IMAGE_SUFFIXES
from ..common.paths import is_within_directory
from ..musubi_formats.names import SAMPLE_DIR, checkpoint_files, parse_checkpoint_name, parse_sample_name
from ..training_contract.checkpoint_choice import CheckpointTable, read_table
from ..training_contract.protocol import LOG_FILE, read_metrics, read_status, run_file

log = logging.getLogger(__name__)


# Canonical metric names and the keys / TensorBoard tags they are read from, first match wins.
LOSS = "loss"
FACE_SIMILARITY = "face_similarity"
# Ours: `loss` (metrics.jsonl) / `loss/current` (TensorBoard, as musubi-tuner), and the face
# loss's `face_sim/x0_mean` (similarity of the one-step estimate's face to the reference).
METRIC_ALIASES: dict[str, tuple[str, ...]] = {
    LOSS: ("loss", "loss/current"),
    FACE_SIMILARITY: ("face_similarity", "face_sim/x0_mean"),
}


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    output_name: str
    step: int | None
    epoch: int | None
    final: bool

    @property
    def filename(self) -> str:
        return self.path.name

    @property
    def label(self) -> str:
        if self.final:
            return "final"
        if self.step is not None:
            return f"step {self.step}"
        return f"epoch {self.epoch}"


@dataclass(frozen=True)
class Sample:
    path: Path
    step: int | None
    epoch: int | None
    prompt_index: int
    timestamp: str
    seed: int | None

    @property
    def round_key(self) -> tuple[str, int]:
        """Samples written by the same sampling round share this key."""
        return ("step", self.step) if self.step is not None else ("epoch", self.epoch or 0)


@dataclass
class RunSnapshot:
    output_dir: Path
    status: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    checkpoints: list[Checkpoint]
    samples: list[Sample]
    metrics_source: str  # "metrics.jsonl", "tensorboard" or "none"
    checkpoint_table: CheckpointTable | None = None  # checkpoints.json, where the trainer wrote one

    @property
    def state(self) -> str:
        if self.status and isinstance(self.status.get("state"), str):
            return self.status["state"]
        return "unknown"

    @property
    def latest_checkpoint(self) -> Checkpoint | None:
        return self.checkpoints[-1] if self.checkpoints else None

    def latest_samples(self) -> list[Sample]:
        """The samples of the most recent sampling round, ordered by prompt."""
        if not self.samples:
            return []
        newest = max(self.samples, key=lambda s: (s.timestamp, s.round_key))
        return sorted((s for s in self.samples if s.round_key == newest.round_key), key=lambda s: s.prompt_index)

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one canonical metric, skipping steps where it is missing or not finite."""
        steps: list[int] = []
        values: list[float] = []
        for record in self.metrics:
            value = record.get(metric)
            step = record.get("step")
            if isinstance(value, (int, float)) and isinstance(step, int) and math.isfinite(value):
                steps.append(step)
                values.append(float(value))
        return steps, values


def normalise_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """Add canonical keys (`loss`, `face_similarity`) from whichever alias the record uses."""
    out = dict(record)
    for canonical, aliases in METRIC_ALIASES.items():
        if canonical in out:
            continue
        for alias in aliases:
            if alias in record:
                out[canonical] = record[alias]
                break
    return out


def _checkpoint_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata; the monitor lists the checkpoints every few seconds,
    so each file is read once per version (size, mtime)."""
    try:
        stat = path.stat()
    except OSError:
        return {}
    return dict(_metadata_of_version(str(path), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=1024)
def _metadata_of_version(path: str, size: int, mtime_ns: int) -> tuple[tuple[str, str], ...]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="np") as f:
            return tuple((f.metadata() or {}).items())
    except Exception as exc:  # a file being written or not a safetensors file: list it without metadata
        log.debug("cannot read safetensors metadata of %s: %s", path, exc)
        return ()


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def list_checkpoints(output_dir: str | os.PathLike, output_name: str | None = None) -> list[Checkpoint]:
    """LoRA checkpoints in `output_dir`, ordered by training step (final last).

    A step comes from the file name or, for epoch checkpoints, from the `ss_steps` metadata
    musubi writes. Given `output_name`, only that run's files are listed; `{name}-best`
    copies made by the scoreboard never are.
    """
    checkpoints: list[Checkpoint] = []
    for path in checkpoint_files(output_dir, output_name):
        name, step, epoch, final = parse_checkpoint_name(path.name)
        metadata = _checkpoint_metadata(path)
        step = step if step is not None else _int_or_none(metadata.get("ss_steps"))
        epoch = epoch if epoch is not None else _int_or_none(metadata.get("ss_epoch"))
        checkpoints.append(Checkpoint(path, name, step, epoch, final))

    def order(c: Checkpoint) -> tuple[bool, float, float, float]:
        unknown = math.inf
        return (
            c.final,
            c.step if c.step is not None else unknown,
            c.epoch if c.epoch is not None else unknown,
            c.path.stat().st_mtime,
        )

    return sorted(checkpoints, key=order)


def run_checkpoints(output_dir: str | os.PathLike, status: dict[str, Any] | None) -> list[Checkpoint]:
    """The checkpoints of the run whose status.json is `status`: only its output name's when it names one."""
    output_name = status.get("output_name") if status else None
    return list_checkpoints(output_dir, output_name if isinstance(output_name, str) else None)


def run_progress(output_dir: str | os.PathLike) -> dict[str, Any]:
    """Where the run in `output_dir` stands, from its status.json and checkpoint names alone (no
    metrics file is read): step, total_steps, epoch, loss, face_similarity, latest_checkpoint."""
    status = normalise_metrics(read_status(output_dir) or {})
    checkpoints = run_checkpoints(output_dir, status)
    return {
        "step": status.get("step"),
        "total_steps": status.get("total_steps"),
        "epoch": status.get("epoch"),
        LOSS: status.get(LOSS),
        FACE_SIMILARITY: status.get(FACE_SIMILARITY),
        "latest_checkpoint": checkpoints[-1].filename if checkpoints else None,
    }


def list_samples(output_dir: str | os.PathLike) -> list[Sample]:
    """Sample images in `output_dir/sample/` with musubi names, oldest first."""
    folder = Path(output_dir) / SAMPLE_DIR
    if not folder.is_dir() or not is_within_directory(output_dir, folder):
        return []
    samples: list[Sample] = []
    for path in folder.iterdir():
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file() or not is_within_directory(folder, path):
            continue
        name = parse_sample_name(path)
        # musubi's names always carry both; the test also narrows their types
        if name.layout != "musubi" or name.prompt_index is None or name.timestamp is None:
            continue
        samples.append(
            Sample(
                path=path,
                step=name.step,
                epoch=name.epoch,
                prompt_index=name.prompt_index,
                timestamp=name.timestamp,
                seed=name.seed,
            )
        )
    return sorted(samples, key=lambda s: (s.timestamp, s.round_key, s.prompt_index))


def find_event_files(output_dir: str | os.PathLike) -> list[Path]:
    return sorted(p for p in Path(output_dir).rglob("events.out.tfevents.*") if is_within_directory(output_dir, p))


def read_tensorboard_metrics(event_files: Iterable[Path]) -> list[dict[str, Any]]:
    """Scalars from TensorBoard event files, merged into one record per step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_step: dict[int, dict[str, Any]] = {}
    for path in event_files:
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        try:
            accumulator.Reload()
        except Exception as exc:  # a truncated file from a crashed run: use the others
            log.warning("cannot read TensorBoard events %s: %s", path, exc)
            continue
        for tag in accumulator.Tags().get("scalars", []):
            for event in accumulator.Scalars(tag):
                record = by_step.setdefault(int(event.step), {"step": int(event.step)})
                record[tag] = float(event.value)
                record.setdefault("time", float(event.wall_time))
    return [normalise_metrics(by_step[step]) for step in sorted(by_step)]


def read_run(output_dir: str | os.PathLike) -> RunSnapshot:
    """Everything a monitor shows about the run in `output_dir`."""
    folder = Path(output_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"training output folder not found: {folder}")
    status = read_status(folder)
    metrics = read_metrics(folder, normalise_metrics)
    source = "metrics.jsonl" if metrics else "none"
    if not metrics:
        event_files = find_event_files(folder)
        if event_files:
            metrics = read_tensorboard_metrics(event_files)
            source = "tensorboard"
    return RunSnapshot(
        output_dir=folder,
        status=status,
        metrics=metrics,
        checkpoints=run_checkpoints(folder, status),
        samples=list_samples(folder),
        metrics_source=source,
        checkpoint_table=read_table(folder),
    )


def tail_lines(path: str | os.PathLike, lines: int, *, max_bytes: int = 1 << 20) -> list[str]:
    """The last `lines` lines of a text file (reads at most `max_bytes` from its end)."""
    if lines <= 0:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
    # progress bars rewrite one line with \r: keep only what the last rewrite shows
    rows = [row.rsplit("\r", 1)[-1] for row in text.split("\n")]
    if rows and rows[-1] == "":
        rows.pop()
    return rows[-lines:]


def log_tail(output_dir: str | os.PathLike, lines: int = 50) -> list[str]:
    path = run_file(output_dir, LOG_FILE)
    return tail_lines(path, lines) if path is not None else []
