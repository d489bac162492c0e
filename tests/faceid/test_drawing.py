"""Drawing faces and labels: each call names the regions it changed (the scoring node copies only those back)."""

from __future__ import annotations

import numpy as np
import pytest
from face_consistency.faceid.drawing import BAND_COLORS, UNUSED_FACE_COLOR, draw_face, draw_label
from face_consistency.faceid.results import DetectedFace


def _outside(regions: list[tuple[int, int, int, int]], shape: tuple[int, ...]) -> np.ndarray:
    outside = np.ones(shape[:2], dtype=bool)
    for x1, y1, x2, y2 in regions:
        outside[max(0, y1) : max(0, y2), max(0, x1) : max(0, x2)] = False
    return outside


@pytest.mark.parametrize("size", [(64, 48), (480, 640), (1024, 1024), (3000, 2000)])
def test_everything_drawn_lies_in_the_regions_returned(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(size[0])
    width, height = size
    for _ in range(40):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        before = image.copy()
        # boxes anywhere, also past the edges (a face cut by the frame), keypoints also outside the box
        x1, y1 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
        x2, y2 = x1 + rng.uniform(0.02, 0.6) * width, y1 + rng.uniform(0.02, 0.6) * height
        kps = np.stack([rng.uniform(x1 - 10, x2 + 10, 5), rng.uniform(y1 - 10, y2 + 10, 5)], axis=1)
        face = DetectedFace(bbox=np.array([x1, y1, x2, y2], np.float32), kps=kps.astype(np.float32), det_score=0.9)
        primary = bool(rng.integers(2))
        label = "#12 0.734 excellent UNCHANGED dlib 0.81" if rng.integers(2) else "0.42"
        regions = draw_face(image, face, label, BAND_COLORS["good"] if primary else UNUSED_FACE_COLOR, primary)
        regions.append(draw_label(image, "#3 no face detected", (0, 0), (230, 50, 50)))
        changed = (image != before).any(axis=2)
        assert changed.any()
        assert not (changed & _outside(regions, image.shape)).any()
