"""Aligned face crops, and how much a face region changed between two images.

The change measure is the copy-paste guard: an edit that hands back the control's face
untouched scores perfect identity, so identity alone cannot tell a good edit from no edit.
"""

from __future__ import annotations

import cv2
import numpy as np

from .results import DetectedFace

ALIGNED_SIZE = 112  # the ArcFace template size the recognizer sees


def aligned_crop(bgr: np.ndarray, face: DetectedFace, size: int = ALIGNED_SIZE) -> np.ndarray:
    """The face warped onto the ArcFace 5-point template (the recognizer's exact input)."""
    from insightface.utils.face_align import norm_crop

    return norm_crop(bgr, face.kps, image_size=size)


def change_view(crop: np.ndarray) -> np.ndarray:
    """What the change measure compares of an aligned BGR crop: its luminance at half size.

    Luminance only, as in the original SSIM: colour grading alone is not a redrawn face. At half
    the crop size, because keypoints detected anew in the output jitter by a few pixels: measured
    on a copy of the control shifted by (7, 5) px, 1 − SSIM is 0.15 at 112 px and 0.04 at 56 px,
    while other photos of the same person stay at 0.75 to 0.83. Small (56x56 bytes), so a folder
    evaluation keeps one per file instead of decoding the file again."""
    return cv2.resize(cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY), None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)


def view_change(control_view: np.ndarray, output_view: np.ndarray) -> float:
    """1 − SSIM of two `change_view`s: ~0 for an unchanged face, towards 1 for a redrawn one."""
    from skimage.metrics import structural_similarity

    if control_view.shape != output_view.shape:
        raise ValueError(f"the face views differ in shape: {control_view.shape} vs {output_view.shape}")
    ssim = structural_similarity(control_view, output_view, data_range=255)
    return float(max(0.0, 1.0 - ssim))


def face_region_change(control_crop: np.ndarray, output_crop: np.ndarray) -> float:
    """1 − SSIM of two aligned BGR crops (`view_change` of their `change_view`s)."""
    return view_change(change_view(control_crop), change_view(output_crop))
