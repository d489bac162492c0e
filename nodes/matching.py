"""Several people: match reference faces to output faces; keep the best images of a batch."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..faceid import Bands, FaceModel, FaceResult
from ..faceid.drawing import UNUSED_FACE_COLOR, draw_face, person_color
from ..faceid.judge import DlibJudge, Verdict, verdict
from ..faceid.matching import FaceAssignment, match_batch
from ..faceid.ranking import Fallback, Pick, pick_best
from ..faceid.scoring import analyze_references, reference_pairing
from . import comfy_env
from .imaging import save_previews, to_bgr_list, to_image_batch
from .scoring import CATEGORY, describe_model

DEFAULT_MIN_MATCH_SIMILARITY = 0.2


def _person(index: int) -> str:
    return f"P{index + 1}"


class FaceConsistencyMatchFaces:
    """Match each person of a reference image to one face of the output (Hungarian assignment)."""

    CATEGORY = CATEGORY
    FUNCTION = "match"
    OUTPUT_NODE = True
    RETURN_TYPES = ("FLOAT", "FLOAT", "INT", "STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("person_scores", "mean_score", "matched_count", "report", "annotated_images", "annotated_reference")
    OUTPUT_IS_LIST = (True, False, False, False, False, False)
    OUTPUT_TOOLTIPS = (
        "For each output image, one similarity per reference person (P1.. left to right); 0 when "
        "the person is missing.",
        "Mean similarity of all matched people over all images.",
        "Matched people summed over all images.",
        "Per image: each person's matched face and score, missing people, extra faces.",
        "Outputs with matched faces labelled P1, P2, ... and their scores.",
        "Reference image(s) with the people labelled P1, P2, ...",
    )
    DESCRIPTION = (
        "Several people: assigns reference faces to output faces one-to-one, maximising the total "
        "similarity. One reference image for all outputs, or one per output."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "face_model": ("FACE_MODEL",),
                "reference_image": ("IMAGE", {"tooltip": "The control image with the people (1, or one per output)."}),
                "images": ("IMAGE", {"tooltip": "Edited images."}),
                "min_similarity": (
                    "FLOAT",
                    {
                        "default": DEFAULT_MIN_MATCH_SIMILARITY,
                        "min": -1.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "A pairing scoring below this is not accepted: the person counts as "
                        "missing and the face as a stranger. -1 accepts every pairing.",
                    },
                ),
            }
        }

    def match(self, face_model: FaceModel, reference_image: Any, images: Any, min_similarity: float) -> dict[str, Any]:
        references = to_bgr_list(reference_image, "reference_image")
        outputs = to_bgr_list(images, "images")
        reference_pairing(len(references), len(outputs))  # check the batch rule before any detection runs
        progress = comfy_env.Progress(len(references) + len(outputs))
        reference_results = analyze_references(
            face_model, references, "reference_image", lambda: progress.update(1), all_faces=True
        )
        matches = match_batch(face_model, reference_results, outputs, min_similarity, lambda: progress.update(1))
        bands = Bands()
        lines = [f"Face matching: {describe_model(face_model)}"]
        for match, bgr in zip(matches, outputs):
            lines += describe_assignment(match.index, match.reference, match.result, match.assignment, bands)
            annotate_matches(bgr, match.result, match.assignment)  # our own converted copy
        person_scores = [score for match in matches for score in match.person_scores]
        matched_scores = [m.similarity for match in matches for m in match.assignment.matches]
        mean = float(np.mean(matched_scores)) if matched_scores else 0.0
        lines.append(f"mean {mean:.3f} over {len(matched_scores)} matched face(s) in {len(outputs)} image(s)")
        report = "\n".join(lines)
        for bgr, reference in zip(references, reference_results):
            annotate_people(bgr, reference)
        return {
            "ui": {"text": [report], "images": save_previews(outputs, "face_matching")},
            "result": (
                person_scores,
                mean,
                len(matched_scores),
                report,
                to_image_batch(outputs),
                to_image_batch(references),
            ),
        }


def describe_assignment(
    image_index: int, reference: FaceResult, output: FaceResult, assignment: FaceAssignment, bands: Bands
) -> list[str]:
    people = len(reference.faces)
    lines = [
        f"image {image_index}: {len(assignment.matches)} of {people} people matched, "
        f"{output.faces_found} face(s) found" + (f" ({output.reason})" if not output.faces else "")
    ]
    for person in range(people):
        match = assignment.match_for_reference(person)
        if match is None:
            lines.append(f"  {_person(person)}: missing")
        else:
            lines.append(
                f"  {_person(person)} -> face {match.output_index + 1}: {match.similarity:.3f} "
                f"{bands.label(match.similarity)}"
            )
    if assignment.unmatched_output:
        faces = ", ".join(str(j + 1) for j in assignment.unmatched_output)
        lines.append(f"  unmatched output face(s): {faces}")
    return lines


def annotate_matches(bgr: np.ndarray, output: FaceResult, assignment: FaceAssignment) -> None:
    """Draw in place: matched faces in their person's colour, strangers grey."""
    person_of = {m.output_index: m for m in assignment.matches}
    for j, face in enumerate(output.faces):
        match = person_of.get(j)
        if match is None:
            draw_face(bgr, face, "?", UNUSED_FACE_COLOR, primary=False)
        else:
            label = f"{_person(match.reference_index)} {match.similarity:.2f}"
            draw_face(bgr, face, label, person_color(match.reference_index))


def annotate_people(bgr: np.ndarray, reference: FaceResult) -> None:
    for person, face in enumerate(reference.faces):
        draw_face(bgr, face, _person(person), person_color(person))


class FaceConsistencyBestOf:
    """Sort images by score and keep those passing a threshold and/or the top k."""

    CATEGORY = CATEGORY
    FUNCTION = "pick"
    OUTPUT_NODE = True
    INPUT_IS_LIST = True
    RETURN_TYPES = ("IMAGE", "FLOAT", "INT", "STRING", "FLOAT")
    RETURN_NAMES = ("images", "scores", "indices", "report", "judge_scores")
    OUTPUT_IS_LIST = (False, True, True, False, True)
    OUTPUT_TOOLTIPS = (
        "The kept images, best first (an empty batch when nothing passes and fallback is 'empty').",
        "Their scores, best first.",
        "Their indices in the input batch.",
        "What was kept and why (with a judge: its verdict on each kept image).",
        "The held-out judge's similarity of each kept image (1 - dlib distance / 1.2); -1 where no judge "
        "is connected or it found no face.",
    )
    DESCRIPTION = "Keeps the best images by score (e.g. the scores of Face Similarity Score)."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "images": ("IMAGE",),
                "scores": ("FLOAT", {"forceInput": True, "tooltip": "One score per image, in order."}),
                "threshold": (
                    "FLOAT",
                    {
                        "default": Bands().good,
                        "min": -1.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Keep images scoring at least this; -1 keeps all.",
                    },
                ),
                "top_k": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": "Keep at most k; 0: no limit."}),
                "fallback": (
                    [f.value for f in Fallback],
                    {
                        "default": Fallback.BEST.value,
                        "tooltip": "When nothing passes: the single best image anyway, or nothing.",
                    },
                ),
            },
            "optional": {
                "judge": (
                    "FACE_JUDGE",
                    {
                        "tooltip": "A held-out judge (Face Judge Loader): the ranking stays by scores, and the "
                        "report shows the judge's own verdict on every kept image.",
                    },
                ),
                "reference_image": (
                    "IMAGE",
                    {
                        "tooltip": "With a judge: the control image(s) it compares with (1, or one per image).",
                    },
                ),
            },
        }

    def pick(
        self,
        images: list[Any],
        scores: list[float],
        threshold: list[float],
        top_k: list[int],
        fallback: list[str],
        judge: list[DlibJudge] | None = None,
        reference_image: list[Any] | None = None,
    ) -> dict[str, Any]:
        singles = [batch[i : i + 1] for batch in images for i in range(batch.shape[0])]
        values = [float(s) for s in scores]
        if not singles:
            raise ValueError("no images to pick from: the images input is empty")
        if len(singles) != len(values):
            raise ValueError(
                f"got {len(singles)} images but {len(values)} scores: connect the scores computed for "
                "exactly these images, in the same order"
            )
        pick = pick_best(values, threshold[0], top_k[0], fallback[0])
        kept = [singles[i] for i in pick.indices]
        if len({tuple(t.shape[1:]) for t in kept}) > 1:
            raise ValueError("the kept images differ in size and cannot form one IMAGE batch")
        batch = torch.cat(kept) if kept else singles[0][:0]
        verdicts = _judge_kept(judge[0], reference_image, singles, pick.indices) if judge else None
        report = describe_pick(values, pick, threshold[0], top_k[0], Fallback(fallback[0]), verdicts)
        judge_scores = [v.similarity if v is not None else -1.0 for v in (verdicts or {}).values()]
        return {
            "ui": {"text": [report]},
            "result": (
                batch,
                [values[i] for i in pick.indices],
                list(pick.indices),
                report,
                judge_scores or [-1.0] * len(pick.indices),
            ),
        }


def _judge_kept(
    judge: DlibJudge, reference_image: list[Any] | None, singles: list[Any], kept: list[int]
) -> dict[int, Verdict | None]:
    """The judge's verdict on each kept image against its reference (1 for all, or pairwise)."""
    if not reference_image:
        raise ValueError("the judge needs reference_image (the control image, 1 or one per image) to compare with")
    references = [bgr for batch in reference_image for bgr in to_bgr_list(batch, "reference_image")]
    reference_of = reference_pairing(len(references), len(singles), "reference_image")
    descriptors = judge.reference_descriptors(references, "bgr", "reference_image")
    verdicts: dict[int, Verdict | None] = {}
    for i in kept:
        result = judge.judge(to_bgr_list(singles[i], "images")[0], channel_order="bgr")
        verdicts[i] = verdict(result.face.descriptor, descriptors[reference_of[i]]) if result.face is not None else None
    return verdicts


def describe_pick(
    values: list[float],
    pick: Pick,
    threshold: float,
    top_k: int,
    fallback: Fallback,
    verdicts: dict[int, Verdict | None] | None = None,
) -> str:
    limit = f", keeping the top {top_k}" if top_k else ""
    lines = [f"best of {len(values)}: {pick.passed} at or above {threshold:.2f}{limit}"]
    if pick.fallback_used:
        lines.append(
            f"none passed; fallback 'best': keeping image {pick.indices[0]} ({values[pick.indices[0]]:.3f})"
            if fallback is Fallback.BEST
            else "none passed; fallback 'empty': no images returned"
        )
    for rank, i in enumerate(pick.indices):
        line = f"{rank + 1:>3}. image {i}: {values[i]:.3f}"
        if verdicts is not None:
            v = verdicts[i]
            line += (
                "  judge: no face found"
                if v is None
                else f"  judge {v.similarity:.3f} (distance {v.distance:.3f}, "
                f"{'same person' if v.same_person else 'NOT the same person'})"
            )
        lines.append(line)
    return "\n".join(lines)


NODE_CLASS_MAPPINGS = {
    "FaceConsistencyMatchFaces": FaceConsistencyMatchFaces,
    "FaceConsistencyBestOf": FaceConsistencyBestOf,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FaceConsistencyMatchFaces": "Face Matching (several people)",
    "FaceConsistencyBestOf": "Best Images by Face Score",
}
