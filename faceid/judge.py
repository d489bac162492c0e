"""A held-out judge of identity from another family: dlib's face recognition ResNet.

The face-identity loss trains against an ArcFace recognizer, and a generator tuned on ArcFace
can fool ArcFace. dlib's recognizer (a 128-d metric network trained on about 3 million faces,
LFW 99.38%) shares neither weights nor training data with InsightFace's packs, so its verdict
is a second opinion the loss never saw.

The judge locates faces itself (dlib's HOG frontal detector, or its CNN detector), never with
the engine's box: a detector failure of either shows as a failure of that one, per item.
Faces are aligned with dlib's 5-point shape predictor onto a 150x150 chip (padding 0.25),
as dlib's own examples do.

Scale: dlib compares faces by the Euclidean distance of their descriptors; below 0.6 is the
same person (dlib's threshold). For tables beside cosine similarities the distance is also
given as `similarity = 1 - distance / 1.2`, clipped to [0, 1]: 1 for identical descriptors,
0.5 exactly at dlib's threshold, 0 at twice the threshold.

Optional: `pip install "comfyui-face-consistency[judge]"` (dlib-bin and face_recognition_models,
whose `.dat` weights are read in place).
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .errors import FaceEngineError, ImageLoadError
from .images import load_image_sized, undetectable_reason
from .results import Agreement, JudgeIdentity
from .similarity import agreement

JUDGE_NAME = "dlib"
JUDGE_CHOICES = (JUDGE_NAME,)
DETECTORS = ("hog", "cnn")
DISTANCE_THRESHOLD = 0.6  # dlib's same-person threshold
SIMILARITY_AT_ZERO = 2 * DISTANCE_THRESHOLD  # distance at which the similarity scale reaches 0
SIMILARITY_THRESHOLD = 1.0 - DISTANCE_THRESHOLD / SIMILARITY_AT_ZERO  # 0.5
SIMILARITY_SCALE = "1 - distance / 1.2, clipped to [0, 1] (0.5 = dlib's same-person threshold, distance 0.6)"
CHIP_SIZE, CHIP_PADDING = 150, 0.25
DESCRIPTOR_SIZE = 128
# Detection runs on a copy at most this large (HOG cost grows with the pixel count); landmarks
# and the chip are taken from the full-resolution image.
DETECTION_SIDE = 1024
# Below this side HOG's 80 px window misses faces: the image is upsampled twice instead of once.
SMALL_SIDE = 400
INSTALL_HINT = (
    'pip install "comfyui-face-consistency[judge]" (in ComfyUI\'s Python: python -m pip install '
    "dlib-bin face_recognition_models)"
)


class JudgeNotInstalledError(FaceEngineError):
    """dlib or its weights (face_recognition_models) are missing."""


def distance_to_similarity(distance: float) -> float:
    """dlib distance -> the documented similarity scale (module docstring)."""
    return float(min(1.0, max(0.0, 1.0 - distance / SIMILARITY_AT_ZERO)))


@dataclass
class JudgeFace:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in the image's pixels
    det_score: float  # HOG: the detector's score; CNN: its confidence
    descriptor: np.ndarray  # (128,) float32

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    def to_dict(self) -> dict[str, Any]:
        return {"bbox": [round(float(v), 1) for v in self.box], "det_score": round(float(self.det_score), 4)}


@dataclass
class JudgeResult:
    """The judge's view of one image: the largest face it found, or why there is none."""

    image_size: tuple[int, int]  # (width, height); (0, 0) when the image could not be read
    faces_found: int = 0
    face: JudgeFace | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.face is not None

    @property
    def descriptor(self) -> np.ndarray | None:
        return self.face.descriptor if self.face is not None else None


@dataclass(frozen=True)
class Verdict:
    distance: float
    similarity: float
    same_person: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "distance": round(self.distance, 6),
            "similarity": round(self.similarity, 6),
            "same_person": self.same_person,
        }


def verdict(a: np.ndarray, b: np.ndarray) -> Verdict:
    distance = float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
    return Verdict(distance, distance_to_similarity(distance), distance < DISTANCE_THRESHOLD)


def mean_descriptor(descriptors: Iterable[np.ndarray]) -> JudgeIdentity:
    """dlib's descriptors live in a metric space (not on a sphere): their plain mean is the person."""
    vectors = [np.asarray(d, np.float32) for d in descriptors]
    if not vectors:
        raise ValueError("a judge identity needs at least one face descriptor")
    return JudgeIdentity(np.mean(vectors, axis=0).astype(np.float32), len(vectors), judge_agreement(vectors))


WEIGHT_FILES = {
    "shape_predictor": "shape_predictor_5_face_landmarks.dat",
    "recognizer": "dlib_face_recognition_resnet_model_v1.dat",
    "detector": "mmod_human_face_detector.dat",  # the CNN detector only
}


def _import_dlib() -> Any:
    try:
        import dlib
    except ImportError:
        raise JudgeNotInstalledError(f"the dlib judge needs dlib, which is not installed: {INSTALL_HINT}") from None
    return dlib


def weights_folder() -> Path:
    """face_recognition_models' `models/` folder, found without importing the package: its
    `__init__` imports pkg_resources, which setuptools 81 and later no longer ship."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise JudgeNotInstalledError(
            f"the dlib judge needs its model weights (face_recognition_models), which are not installed: {INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class DlibJudge:
    """dlib's detector, 5-point aligner and ResNet recognizer. Thread-safe; create with `load_judge`."""

    name = JUDGE_NAME

    def __init__(self, detector: str = "hog") -> None:
        if detector not in DETECTORS:
            raise ValueError(f"judge detector must be one of {', '.join(DETECTORS)}, got {detector!r}")
        dlib = self._dlib = _import_dlib()
        self.detector_kind = detector
        folder = weights_folder()
        self.weights = {
            role: folder / name for role, name in WEIGHT_FILES.items() if role != "detector" or detector == "cnn"
        }
        missing = [str(p) for p in self.weights.values() if not p.is_file()]
        if missing:
            raise JudgeNotInstalledError(
                f"dlib judge weights missing ({', '.join(missing)}); reinstall: {INSTALL_HINT}"
            )
        if detector == "cnn":
            self._detector = dlib.cnn_face_detection_model_v1(str(self.weights["detector"]))
        else:
            self._detector = dlib.get_frontal_face_detector()
        self._shapes = dlib.shape_predictor(str(self.weights["shape_predictor"]))
        self._recognizer = dlib.face_recognition_model_v1(str(self.weights["recognizer"]))
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {
            "judge": self.name,
            "dlib_version": getattr(self._dlib, "__version__", "unknown"),
            "detector": f"dlib {self.detector_kind} (its own, independent of the engine's)",
            "alignment": f"5-point shape predictor, {CHIP_SIZE}px chip, padding {CHIP_PADDING}",
            "descriptor_size": DESCRIPTOR_SIZE,
            "distance_threshold": DISTANCE_THRESHOLD,
            "similarity_scale": SIMILARITY_SCALE,
            "similarity_threshold": SIMILARITY_THRESHOLD,
        }

    def fingerprint(self) -> str:
        """Identifies weights and settings (for caches of descriptors)."""
        files = sorted((k, p.name, p.stat().st_size) for k, p in self.weights.items())
        payload = repr((self.describe(), files))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _detect(self, rgb: np.ndarray) -> list[tuple[Any, float]]:
        """Face rectangles (full-resolution coordinates) with scores."""
        dlib = self._dlib
        side = max(rgb.shape[:2])
        scale = min(1.0, DETECTION_SIDE / side)
        small = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else rgb
        upsample = 2 if max(small.shape[:2]) < SMALL_SIDE else 1
        if self.detector_kind == "cnn":
            found = [(d.rect, float(d.confidence)) for d in self._detector(small, upsample)]
        else:
            rects, scores, _ = self._detector.run(small, upsample, 0.0)
            found = list(zip(rects, (float(s) for s in scores)))
        return [
            (
                dlib.rectangle(
                    int(r.left() / scale), int(r.top() / scale), int(r.right() / scale), int(r.bottom() / scale)
                ),
                score,
            )
            for r, score in found
        ]

    def judge(self, image: Any, channel_order: str = "rgb") -> JudgeResult:
        """The largest face of one image (path, array, PIL image), described; never raises for no face."""
        try:
            bgr, original_size = load_image_sized(image, channel_order)
        except ImageLoadError as exc:
            return JudgeResult((0, 0), reason=str(exc))
        reason = undetectable_reason(*original_size)
        if reason is not None:
            return JudgeResult(original_size, reason=reason)
        rgb = np.ascontiguousarray(bgr[..., ::-1])
        scale_x, scale_y = original_size[0] / rgb.shape[1], original_size[1] / rgb.shape[0]
        with self._lock:  # dlib's objects are not documented as thread-safe
            found = self._detect(rgb)
            result = JudgeResult(original_size, faces_found=len(found))
            if not found:
                result.reason = f"no face detected by the judge (dlib {self.detector_kind})"
                return result
            rect, score = max(found, key=lambda f: f[0].width() * f[0].height())
            shape = self._shapes(rgb, rect)
            chip = self._dlib.get_face_chip(rgb, shape, size=CHIP_SIZE, padding=CHIP_PADDING)
            descriptor = np.asarray(self._recognizer.compute_face_descriptor(chip), np.float32)
        box = (rect.left() * scale_x, rect.top() * scale_y, rect.right() * scale_x, rect.bottom() * scale_y)
        result.face = JudgeFace(box, score, descriptor)
        return result

    def judge_all(self, images: Sequence[Any], channel_order: str = "rgb") -> list[JudgeResult]:
        return [self.judge(image, channel_order) for image in images]

    def reference_descriptors(
        self, images: Sequence[Any], channel_order: str = "rgb", name: str = "reference"
    ) -> list[np.ndarray]:
        """Descriptors of reference photos; a photo in which the judge finds no face is an error naming it."""
        descriptors = []
        for i, result in enumerate(self.judge_all(images, channel_order)):
            if result.face is None:
                raise JudgeFaceError(
                    f"{name} image {i} (of {len(images)}): {result.reason}. The judge needs a clear face in every "
                    "reference photo: replace that photo or disconnect the judge."
                )
            descriptors.append(result.face.descriptor)
        return descriptors

    def identity(self, images: Sequence[Any], channel_order: str = "rgb", name: str = "reference") -> JudgeIdentity:
        """Mean descriptor of reference photos, with their own agreement."""
        return mean_descriptor(self.reference_descriptors(images, channel_order, name))


class JudgeFaceError(FaceEngineError):
    """A reference photo in which the judge finds no face."""


_JUDGES: dict[str, DlibJudge] = {}
_JUDGES_LOCK = threading.Lock()


def load_judge(name: str = JUDGE_NAME, detector: str = "hog") -> DlibJudge:
    """The judge `name` (only "dlib"), loaded once per detector."""
    if name != JUDGE_NAME:
        raise ValueError(f"unknown judge {name!r}: choose one of {', '.join(JUDGE_CHOICES)}")
    with _JUDGES_LOCK:
        judge = _JUDGES.get(detector)
        if judge is None:
            judge = _JUDGES[detector] = DlibJudge(detector)
        return judge


def judge_agreement(descriptors: Sequence[np.ndarray]) -> Agreement | None:
    """`agreement` of reference photos on the judge's similarity scale."""
    return agreement(descriptors, lambda a, b: verdict(a, b).similarity)
