"""Load the held-out identity judge (dlib), for the scoring nodes' optional `judge` input."""

from __future__ import annotations

from typing import Any

from ..faceid.judge import DETECTORS, DlibJudge, load_judge
from .scoring import CATEGORY


class FaceConsistencyLoadJudge:
    """dlib's face recognizer with its own detector: a second opinion the face loss never trained on."""

    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("FACE_JUDGE",)
    RETURN_NAMES = ("judge",)
    DESCRIPTION = (
        "A held-out recognizer from another family (dlib ResNet, 128-d, same person below distance 0.6). "
        "Connect it to Face Similarity Score, Face Reference Identity or Best Images by Face Score to see "
        "its verdict beside InsightFace's. Needs dlib-bin and face_recognition_models."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "detector": (
                    list(DETECTORS),
                    {
                        "default": "hog",
                        "tooltip": "The judge's own face detector: hog (fast, frontal faces) or cnn (finds more "
                        "faces, slow on the CPU). Never the InsightFace detector, so each detector's misses show.",
                    },
                ),
            }
        }

    def load(self, detector: str) -> dict[str, Any]:
        judge = load_judge(detector=detector)
        return {"ui": {"text": [describe_judge(judge)]}, "result": (judge,)}


def describe_judge(judge: DlibJudge) -> str:
    info = judge.describe()
    return (
        f"judge {info['judge']} {info['dlib_version']}: {info['detector']}; same person below distance "
        f"{info['distance_threshold']}; similarity {info['similarity_scale']}"
    )


NODE_CLASS_MAPPINGS = {"FaceConsistencyLoadJudge": FaceConsistencyLoadJudge}
NODE_DISPLAY_NAME_MAPPINGS = {"FaceConsistencyLoadJudge": "Face Judge Loader (dlib, held-out)"}
