"""What the monitor shows of a run: its status text, the latest samples as one image, and the
signature of its files (a run that changed is read again)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..common.files import file_signature
from ..musubi_formats.names import SAMPLE_DIR
from ..training_contract.checkpoint_choice import VALIDATION_LOSS
from .job_registry import JobRecord
from .run_reader import FACE_SIMILARITY, LOSS, RunSnapshot


def format_duration(seconds: float) -> str:
    """H:MM:SS."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def describe_run(run: RunSnapshot, record: JobRecord | None, *, window: int = 20) -> str:
    """The status text: state, progress, loss, face similarity, ETA, last checkpoint."""
    status = run.status or {}
    state = record.state if record is not None else run.state
    lines = [f"{run.output_dir.name}: {state}" + (f" (job {record.job_id[:8]}, pid {record.pid})" if record else "")]
    step = status.get("step")
    total = status.get("total_steps")
    if isinstance(step, int):
        progress = f"step {step}" + (
            f"/{total} ({100.0 * step / total:.1f}%)" if isinstance(total, int) and total else ""
        )
        epoch, epochs = status.get("epoch"), status.get("total_epochs")
        if isinstance(epoch, int):
            progress += f", epoch {epoch}" + (f"/{epochs}" if isinstance(epochs, int) else "")
        lines.append(progress)
    elif run.metrics:
        lines.append(f"step {run.metrics[-1].get('step')} ({len(run.metrics)} logged, from {run.metrics_source})")
    for metric, label in ((LOSS, "loss"), (FACE_SIMILARITY, "face similarity")):
        _, values = run.series(metric)
        if values:
            recent = values[-window:]
            lines.append(f"{label} {values[-1]:.4f} (mean of last {len(recent)}: {sum(recent) / len(recent):.4f})")
    _, validation = run.series(VALIDATION_LOSS)
    if validation:
        lines.append(f"validation loss {validation[-1]:.4f} (lowest {min(validation):.4f}, {len(validation)} measured)")
    running = record is not None and not record.finished
    if record is not None:
        elapsed = (record.ended if record.ended else time.time()) - record.started
        eta = status.get("eta_sec")
        eta_text = f", ETA {format_duration(eta)}" if running and isinstance(eta, (int, float)) else ""
        lines.append(f"elapsed {format_duration(elapsed)}{eta_text}")
    checkpoint = run.latest_checkpoint
    if checkpoint is not None:
        lines.append(f"last checkpoint: {checkpoint.filename} ({checkpoint.label}); {len(run.checkpoints)} in all")
    else:
        lines.append("no checkpoint saved yet")
    chosen = run.checkpoint_table.recommendation() if run.checkpoint_table is not None else None
    if chosen is not None:
        lines.append(f"keep {chosen.name}: {chosen.reason}")
    if record is not None and record.detail and record.state == "failed":
        lines.append(f"failure:\n{record.detail}")
    elif status.get("error"):
        lines.append(f"error: {status['error']}")
    return "\n".join(lines)


def sample_grid_rgb(run: RunSnapshot, max_images: int, *, columns: int = 4) -> np.ndarray:
    """The latest round of samples side by side, as one (H, W, 3) uint8 image (a black tile when there are none)."""
    samples = run.latest_samples()[:max_images]
    if not samples:
        return np.zeros((64, 64, 3), dtype=np.uint8)
    tiles = []
    for sample in samples:
        with Image.open(sample.path) as image:
            tiles.append(image.convert("RGB"))
    width, height = tiles[0].size
    columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, tile in enumerate(tiles):
        if tile.size != (width, height):
            tile = tile.resize((width, height), Image.Resampling.LANCZOS)
        grid.paste(tile, ((index % columns) * width, (index // columns) * height))
    return np.asarray(grid)


def run_files_signature(folder: Path) -> str:
    """Names, sizes and modification times of the run's files and samples, as one string."""
    entries = []
    for path in (folder, folder / SAMPLE_DIR):
        if path.is_dir():
            entries += [(p.name, file_signature(p)) for p in path.iterdir() if p.is_file()]
    return repr(sorted(entries))
