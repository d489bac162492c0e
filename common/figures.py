"""matplotlib figures as images."""

from __future__ import annotations

from typing import Any

import numpy as np


def figure_rgb(fig: Any) -> np.ndarray:
    """A matplotlib Figure rendered on an Agg canvas, as an (H, W, 3) uint8 RGB array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
