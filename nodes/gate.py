"""The face gate: a batch in, the images that keep the person's face on one side, the rest on the other."""

from __future__ import annotations

from typing import Any

import torch

from ..faceid import Bands, FaceModel, Identity, Selection
from ..faceid.gate import GateRules, SeveralFaces, gate_decisions, gate_report
from ..faceid.judge import SIMILARITY_THRESHOLD, DlibJudge
from ..faceid.scoring import DEFAULT_COPY_PASTE_THRESHOLD
from . import comfy_env
from .scoring import CATEGORY, band_inputs, score_images

EMPTY_SIDES = ("skip downstream", "empty batch")


class FaceConsistencyGate:
    """Passes or rejects each image by its face score against the reference, with the reason."""

    CATEGORY = CATEGORY
    FUNCTION = "gate"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING", "STRING", "INT", "INT")
    RETURN_NAMES = ("passed", "rejected", "reasons", "report", "passed_count", "rejected_count")
    OUTPUT_IS_LIST = (False, False, True, False, False, False)
    OUTPUT_TOOLTIPS = (
        "The images that pass, in their order. When none passes, see empty_side.",
        "The images that do not pass, in their order. When none is rejected, see empty_side.",
        "One line per input image, in order: passed or rejected, why, the score and band (and the judge's verdict).",
        "The rules and every image's decision.",
        "How many images passed.",
        "How many images were rejected.",
    )
    DESCRIPTION = (
        "Splits a batch by face identity: an image passes when its face scores at least the threshold against "
        "the reference (ArcFace cosine). No face, several faces and a face returned unchanged from the control "
        "go to the rejected side with their reason; with a judge connected, require_both also asks dlib's "
        "held-out recognizer to see the same person."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "face_model": ("FACE_MODEL",),
                "images": ("IMAGE", {"tooltip": "The images to split (any batch size)."}),
                "threshold": (
                    "FLOAT",
                    {
                        "default": Bands().good,
                        "min": -1.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "An image passes at or above this similarity. The default suits 512-d ArcFace "
                        "packs (buffalo_l, antelopev2); smaller recognizers score lower.",
                    },
                ),
                "several_faces": (
                    [s.value for s in SeveralFaces],
                    {
                        "default": SeveralFaces.REJECT.value,
                        "tooltip": "An image with more than one face: rejected, or decided by its largest face.",
                    },
                ),
                "reject_unchanged": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Reject a face returned unchanged from the control (a copy scores perfect "
                        "identity without any edit). Needs reference_image.",
                    },
                ),
                "copy_paste_threshold": (
                    "FLOAT",
                    {
                        "default": DEFAULT_COPY_PASTE_THRESHOLD,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Face change (1 - SSIM of the aligned faces) below this counts as unchanged.",
                    },
                ),
                "require_both": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "With a judge connected: pass only where the judge also sees the same person "
                        "(both recognizers agree). Without a judge this must be off.",
                    },
                ),
                "judge_threshold": (
                    "FLOAT",
                    {
                        "default": SIMILARITY_THRESHOLD,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "The judge's similarity that counts as the same person (0.5 is dlib's own "
                        "threshold, distance 0.6).",
                    },
                ),
                "empty_side": (
                    list(EMPTY_SIDES),
                    {
                        "default": EMPTY_SIDES[0],
                        "tooltip": "A side with no image: 'skip downstream' leaves the nodes it feeds unrun, "
                        "without an error (ComfyUI's Save Image and Preview Image fail on an empty batch); "
                        "'empty batch' gives a batch of 0 images for nodes that handle one.",
                    },
                ),
                **band_inputs(),
            },
            "optional": {
                "reference_image": (
                    "IMAGE",
                    {
                        "tooltip": "The control image (1, or one per image). Also the baseline of reject_unchanged.",
                    },
                ),
                "reference_identity": (
                    "FACE_IDENTITY",
                    {
                        "tooltip": "Scores against this identity instead of reference_image's face.",
                    },
                ),
                "judge": (
                    "FACE_JUDGE",
                    {
                        "tooltip": "A held-out judge (Face Judge Loader): its verdict joins each reason, and "
                        "require_both makes it a condition.",
                    },
                ),
            },
        }

    def gate(
        self,
        face_model: FaceModel,
        images: torch.Tensor,
        threshold: float,
        several_faces: str,
        reject_unchanged: bool,
        copy_paste_threshold: float,
        require_both: bool,
        judge_threshold: float,
        empty_side: str,
        band_excellent: float,
        band_good: float,
        band_moderate: float,
        reference_image: Any = None,
        reference_identity: Identity | None = None,
        judge: DlibJudge | None = None,
    ) -> dict[str, Any]:
        if require_both and judge is None:
            raise ValueError(
                "require_both needs a judge: connect a Face Judge Loader to the judge input, or turn require_both off"
            )
        rules = GateRules(threshold, SeveralFaces(several_faces), reject_unchanged, require_both, judge_threshold)
        _, batch, _ = score_images(
            face_model,
            images,
            reference_image,
            reference_identity,
            judge,
            selection=Selection.LARGEST,
            bands=Bands(band_excellent, band_good, band_moderate),
            threshold=threshold,
            copy_paste_threshold=copy_paste_threshold,
        )
        decisions = gate_decisions(batch, rules)
        report = gate_report(decisions, rules, [f"Face gate: {face_model.pack_name}"])
        passed = [d.index for d in decisions if d.passed]
        rejected = [d.index for d in decisions if not d.passed]
        return {
            "ui": {"text": [report]},
            "result": (
                side(images, passed, empty_side),
                side(images, rejected, empty_side),
                [d.reason for d in decisions],
                report,
                len(passed),
                len(rejected),
            ),
        }


def side(images: torch.Tensor, indices: list[int], empty_side: str) -> Any:
    """The images at `indices` as one IMAGE batch; none: per empty_side, a blocker or a [0, H, W, C] batch."""
    if indices:
        return images[indices]
    if empty_side == EMPTY_SIDES[0]:
        return comfy_env.silent_blocker()
    return images[:0]


NODE_CLASS_MAPPINGS = {"FaceConsistencyGate": FaceConsistencyGate}
NODE_DISPLAY_NAME_MAPPINGS = {"FaceConsistencyGate": "Face Gate (pass / reject)"}
