"""Draw detections onto BGR uint8 images (the engine's layout): box, the five keypoints and a
label (score, band, person). Colours are given as RGB, as people write them."""

from __future__ import annotations

import cv2
import numpy as np

from .results import DetectedFace

RGB = tuple[int, int, int]
# x1, y1, x2, y2: the pixels [y1:y2, x1:x2] of an image, which hold all that one drawing call changed
Region = tuple[int, int, int, int]
BAND_COLORS: dict[str, RGB] = {
    "excellent": (40, 200, 80),
    "good": (160, 210, 40),
    "moderate": (245, 160, 30),
    "poor": (230, 50, 50),
}
UNUSED_FACE_COLOR: RGB = (170, 170, 170)
KEYPOINT_COLORS: tuple[RGB, ...] = ((0, 160, 255), (0, 160, 255), (255, 255, 0), (255, 0, 255), (255, 0, 255))
# matplotlib's tab10, so person labels match the colours of the evaluation plots
PERSON_COLORS: tuple[RGB, ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def person_color(person_index: int) -> RGB:
    return PERSON_COLORS[person_index % len(PERSON_COLORS)]


def _bgr(color: RGB) -> tuple[int, int, int]:
    return color[2], color[1], color[0]


def _line_width(image: np.ndarray) -> int:
    return max(1, round(max(image.shape[:2]) / 400))


def draw_face(bgr: np.ndarray, face: DetectedFace, label: str, color: RGB, primary: bool = True) -> list[Region]:
    """Draw one face in place; secondary faces get a thinner box and no keypoints. Returns the regions drawn."""
    width = _line_width(bgr) if primary else max(1, _line_width(bgr) // 2)
    x1, y1, x2, y2 = (int(v) for v in np.rint(face.bbox))
    cv2.rectangle(bgr, (x1, y1), (x2, y2), _bgr(color), width, cv2.LINE_AA)
    # a line of `width` spreads width/2 either side, anti-aliasing a pixel or two more: the box's four sides
    m = width + 2
    regions = [
        (x1 - m, y1 - m, x2 + m + 1, y1 + m + 1),
        (x1 - m, y2 - m, x2 + m + 1, y2 + m + 1),
        (x1 - m, y1 - m, x1 + m + 1, y2 + m + 1),
        (x2 - m, y1 - m, x2 + m + 1, y2 + m + 1),
    ]
    if primary:
        radius = width + 1
        for (x, y), kp_color in zip(np.rint(face.kps), KEYPOINT_COLORS):
            cv2.circle(bgr, (int(x), int(y)), radius, _bgr(kp_color), -1, cv2.LINE_AA)
            r = radius + 2
            regions.append((int(x) - r, int(y) - r, int(x) + r + 1, int(y) + r + 1))
    if label:
        regions.append(draw_label(bgr, label, (x1, y1), color))
    return regions


def draw_label(bgr: np.ndarray, text: str, anchor: tuple[int, int], color: RGB) -> Region:
    """Text on a filled box just above `anchor` (inside the image when the face touches the top).
    Returns the region drawn."""
    scale = max(0.4, max(bgr.shape[:2]) / 1600)
    thickness = max(1, round(scale * 2))
    (w, h), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    x = min(max(0, anchor[0]), max(0, bgr.shape[1] - w - 4))
    y = anchor[1] - h - baseline - 4 if anchor[1] - h - baseline - 4 >= 0 else anchor[1]
    y = min(max(0, y), max(0, bgr.shape[0] - h - baseline - 4))
    cv2.rectangle(bgr, (x, y), (x + w + 4, y + h + baseline + 4), _bgr(color), -1)
    text_color = (0, 0, 0) if sum(color) > 380 else (255, 255, 255)
    cv2.putText(bgr, text, (x + 2, y + h + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, text_color, thickness, cv2.LINE_AA)
    margin = thickness + 2  # strokes and their anti-aliasing may reach past the box
    return x - margin, y - margin, x + w + 5 + margin, y + h + baseline + 5 + margin
