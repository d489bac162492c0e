"""The evaluation plot: similarity over training steps, and one line per sample prompt.

Drawn with matplotlib's object API on an Agg canvas (no pyplot global state, safe in
ComfyUI's worker thread). The same figure is written as PNG by the command and returned as
an RGB array by the FaceConsistencyScoreFolder node.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from ...common.figures import figure_rgb
from ...common.files import atomic_write_bytes
from ...musubi_formats.names import step_sort_key

PLOT_WIDTH_IN, PLOT_HEIGHT_IN, PLOT_DPI = 10.0, 8.0, 100
PLOT_SIZE = (int(PLOT_WIDTH_IN * PLOT_DPI), int(PLOT_HEIGHT_IN * PLOT_DPI))  # (width, height) pixels
PLOT_SOFTWARE = "comfyui-face-consistency evaluation plot"  # in the PNG's text: the plot is ours to replace
BAND_COLOURS = {"poor": "#f4c7c3", "moderate": "#fce8b2", "good": "#d9ead3", "excellent": "#b7e1cd"}


def _x_positions(keys: list[str]) -> tuple[list[float], str, list[str] | None]:
    """Numeric x for pure step or pure epoch keys; evenly spaced categories otherwise."""
    kinds = {step_sort_key(k)[0] for k in keys}
    if kinds == {0}:
        return [float(k) for k in keys], "training step", None
    if kinds == {1}:
        return [float(k[1:]) for k in keys], "epoch", None
    labels = ["(no step)" if k == "none" else k for k in keys]
    return [float(i) for i in range(len(keys))], "step / epoch", labels


def _shade_bands(ax: Any, bands: dict[str, float], low: float) -> None:
    edges = [
        ("poor", low, bands["moderate"]),
        ("moderate", bands["moderate"], bands["good"]),
        ("good", bands["good"], bands["excellent"]),
        ("excellent", bands["excellent"], 1.0),
    ]
    for name, bottom, top in edges:
        if top > bottom:
            ax.axhspan(bottom, top, color=BAND_COLOURS[name], alpha=0.6, zorder=0, lw=0)
            ax.text(1.005, (bottom + top) / 2, name, transform=ax.get_yaxis_transform(), va="center", fontsize=8)


def _figure(report: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PLOT_WIDTH_IN, PLOT_HEIGHT_IN), dpi=PLOT_DPI, layout="constrained")
    ax_steps, ax_prompts = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    by_step = report["by_step"]
    keys = sorted(by_step, key=step_sort_key)
    mins = [by_step[k]["min"] for k in keys] or [0.0]
    low = min(0.0, min(mins) - 0.05)
    bands = report["bands"]
    model = report["model"]
    judge = report.get("judge")
    fig.suptitle(
        f"Face identity similarity to the {report['metric']} — {model['pack']} "
        f"({report['embedding_size']}-d, {report['provider']}); "
        f"{report['valid_pairs']} of {report['total_pairs']} pairs scored"
        + (
            f"\nheld-out judge {judge['model']['judge']}: {judge['valid_pairs']} scored, "
            f"similarity {judge['model']['similarity_scale']}"
            if judge
            else ""
        ),
        fontsize=11,
    )
    for ax in (ax_steps, ax_prompts):
        _shade_bands(ax, bands, low)
        ax.set_ylim(low, 1.0)
        ax.grid(True, alpha=0.3)
        if report["threshold"] is not None:
            ax.axhline(report["threshold"], color="k", ls="--", lw=1, label=f"threshold {report['threshold']}")
    ax_steps.set_ylabel("cosine similarity")
    ax_prompts.set_ylabel("mean per prompt")
    if not keys:
        ax_steps.text(0.5, 0.5, "no scored pairs yet", ha="center", va="center", transform=ax_steps.transAxes)
        return fig
    xs, xlabel, labels = _x_positions(keys)
    means = np.array([by_step[k]["mean"] for k in keys])
    stds = np.array([by_step[k]["std"] for k in keys])
    ax_steps.fill_between(xs, means - stds, means + stds, color="tab:blue", alpha=0.2, label="± std")
    ax_steps.errorbar(
        xs,
        means,
        yerr=[means - np.array(mins), np.array([by_step[k]["max"] for k in keys]) - means],
        fmt="o-",
        color="tab:blue",
        ecolor="tab:gray",
        capsize=4,
        label="mean (whiskers: min/max)",
    )
    for x, key, mean in zip(xs, keys, means):
        ax_steps.annotate(
            f"n={by_step[key]['count']}",
            (x, mean),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize=8,
        )
    _mark_unchanged(ax_steps, report["unchanged"], dict(zip(keys, xs)), dict(zip(keys, means)))
    if judge and judge["by_step"]:
        _judge_curve(ax_steps, judge, position=dict(zip(keys, xs)))
    ax_steps.legend(loc="lower left", fontsize=8)
    prompt_lines = report["by_prompt_step"]
    position = dict(zip(keys, xs))
    for prompt, steps in prompt_lines.items():
        prompt_keys = [k for k in keys if k in steps]
        ax_prompts.plot(
            [position[k] for k in prompt_keys],
            [steps[k]["mean"] for k in prompt_keys],
            "o-",
            ms=3,
            label=f"prompt {prompt}",
        )
    if prompt_lines:
        ax_prompts.legend(loc="lower left", fontsize=8, ncol=min(6, len(prompt_lines)))
    else:
        ax_prompts.text(
            0.5, 0.5, "no prompt indices in these file names", ha="center", va="center", transform=ax_prompts.transAxes
        )
    ax_prompts.set_xlabel(xlabel)
    if labels is not None:
        ax_prompts.set_xticks(xs, labels)
    return fig


def _mark_unchanged(ax: Any, unchanged: dict[str, Any], position: dict[str, float], mean: dict[str, float]) -> None:
    """A red cross and count on each step with samples whose face is unchanged from the control:
    their ~1.0 scores lift the mean without any edit having happened."""
    keys = [k for k in unchanged["by_step"] if k in position]
    if not keys:
        return
    xs = [position[k] for k in keys]
    ax.plot(
        xs,
        [mean[k] for k in keys],
        "X",
        color="tab:red",
        ms=11,
        zorder=5,
        label=f"face unchanged from the control (change < {unchanged['change_threshold']:.2f})",
    )
    for x, key in zip(xs, keys):
        ax.annotate(
            f"{unchanged['by_step'][key]} unchanged",
            (x, mean[key]),
            textcoords="offset points",
            xytext=(0, -14),
            ha="center",
            fontsize=8,
            color="tab:red",
        )


def _judge_curve(ax: Any, judge: dict[str, Any], position: dict[str, float]) -> None:
    """The held-out judge's mean per step beside the engine's, with its same-person threshold."""
    keys = [k for k in position if k in judge["by_step"]]
    means = np.array([judge["by_step"][k]["mean"] for k in keys])
    stds = np.array([judge["by_step"][k]["std"] for k in keys])
    xs = [position[k] for k in keys]
    ax.fill_between(xs, means - stds, means + stds, color="tab:orange", alpha=0.15)
    ax.plot(xs, means, "s--", color="tab:orange", label=f"held-out judge {judge['model']['judge']} (mean ± std)")
    ax.axhline(
        judge["model"]["similarity_threshold"],
        color="tab:orange",
        ls=":",
        lw=1,
        label=f"{judge['model']['judge']} same-person threshold (distance {judge['model']['distance_threshold']})",
    )


def plot_png(report: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    _figure(report).savefig(buffer, format="png", dpi=PLOT_DPI, metadata={"Software": PLOT_SOFTWARE})
    return buffer.getvalue()


def is_evaluation_plot(path: str | os.PathLike) -> bool:
    """Whether the file is a plot `write_plot` wrote (its PNG text names this software): an evaluation
    may replace its own earlier plot, never a sample that happens to have the plot's name."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return getattr(image, "text", {}).get("Software") == PLOT_SOFTWARE
    except (OSError, UnidentifiedImageError, ValueError):
        return False


def write_plot(report: dict[str, Any], path: str | os.PathLike) -> None:
    atomic_write_bytes(path, plot_png(report))


def plot_rgb(report: dict[str, Any]) -> np.ndarray:
    """The plot as an (H, W, 3) uint8 RGB array."""
    return figure_rgb(_figure(report))
