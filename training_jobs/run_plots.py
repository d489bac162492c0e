"""Charts of a training run and of a checkpoint scoreboard, rendered to RGB arrays (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..common.figures import figure_rgb
from ..training_contract.checkpoint_choice import VALIDATION_LOSS
from .run_reader import FACE_SIMILARITY, LOSS, RunSnapshot


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over up to `window` values (shorter at the start, so no values are lost)."""
    data = np.asarray(values, dtype=np.float64)
    if window <= 1 or data.size == 0:
        return data
    cumulative = np.cumsum(np.insert(data, 0, 0.0))
    idx = np.arange(1, data.size + 1)
    start = np.maximum(idx - window, 0)
    return (cumulative[idx] - cumulative[start]) / (idx - start)


def _figure(rows: int, width_px: int, height_px: int):
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    return fig, axes


def _plot_series(ax, steps: list[int], values: list[float], window: int, label: str, color: str) -> None:
    ax.plot(steps, values, color=color, alpha=0.3, linewidth=1, label=label)
    if len(values) > 1 and window > 1:
        ax.plot(steps, moving_average(values, window), color=color, linewidth=2, label=f"{label} (mean of {window})")
    ax.legend(loc="best", fontsize=8)
    ax.grid(True, alpha=0.3)


def plot_run(run: RunSnapshot, *, window: int = 20, width_px: int = 900, height_px: int = 600) -> np.ndarray:
    """Loss (with the validation loss, where measured) and face similarity over steps, raw and moving
    average; HxWx3 uint8."""
    fig, (loss_ax, face_ax) = _figure(2, width_px, height_px)
    name = run.output_dir.name
    loss_steps, loss_values = run.series(LOSS)
    if loss_values:
        _plot_series(loss_ax, loss_steps, loss_values, window, "loss", "tab:blue")
    else:
        loss_ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=loss_ax.transAxes)
    validation_steps, validation_values = run.series(VALIDATION_LOSS)
    if validation_values:
        loss_ax.plot(
            validation_steps,
            validation_values,
            color="tab:orange",
            marker="o",
            linewidth=2,
            label="validation loss (held out, fixed noise)",
        )
        loss_ax.legend(loc="best", fontsize=8)
    loss_ax.set_title(f"{name}: {run.state}", fontsize=10)
    loss_ax.set_ylabel("loss")
    face_steps, face_values = run.series(FACE_SIMILARITY)
    if face_values:
        _plot_series(face_ax, face_steps, face_values, window, "face similarity", "tab:green")
    else:
        face_ax.text(0.5, 0.5, "no face similarity logged", ha="center", va="center", transform=face_ax.transAxes)
    for checkpoint in run.checkpoints:
        if checkpoint.step is not None:
            for ax in (loss_ax, face_ax):
                ax.axvline(checkpoint.step, color="gray", linestyle=":", linewidth=0.8)
    face_ax.set_xlabel("step")
    face_ax.set_ylabel("cosine similarity")
    fig.tight_layout()
    return figure_rgb(fig)


def plot_scores(
    labels: Sequence[str],
    positions: Sequence[float],
    scores: Sequence[float],
    spreads: Sequence[float],
    best_index: int,
    *,
    x_label: str,
    width_px: int = 900,
    height_px: int = 450,
) -> np.ndarray:
    """Score per checkpoint (error bars: standard deviation over its images), best marked; HxWx3 uint8."""
    fig, (ax,) = _figure(1, width_px, height_px)
    ax.errorbar(positions, scores, yerr=spreads, marker="o", capsize=3, color="tab:blue")
    ax.scatter(
        [positions[best_index]],
        [scores[best_index]],
        s=160,
        facecolors="none",
        edgecolors="tab:red",
        linewidths=2,
        zorder=3,
        label=f"best: {labels[best_index]}",
    )
    ax.set_xlabel(x_label)
    ax.set_ylabel("face similarity")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return figure_rgb(fig)
