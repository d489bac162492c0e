"""Load the face model, build a reference identity, score edited images against it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..common.face_engine import (
    DEFAULTS,
    DET_SIZE_HELP,
    DET_SIZES,
    DET_THRESH_HELP,
    PROVIDER_HELP,
    PROVIDERS,
    FaceEngineSettings,
)
from ..faceid import (
    STANDARD_PACKS,
    Bands,
    FaceModel,
    FaceResult,
    Identity,
    Selection,
    as_roots,
    list_packs,
    load_face_engine,
    mean_identity,
)
from ..faceid.drawing import BAND_COLORS, UNUSED_FACE_COLOR, Region, draw_face, draw_label
from ..faceid.judge import DlibJudge, mean_descriptor
from ..faceid.pack_download import RELEASES
from ..faceid.scoring import (
    DEFAULT_COPY_PASTE_THRESHOLD,
    BatchScores,
    Control,
    ImageScore,
    NoFacePolicy,
    analyze_references,
    reference_pairing,
    score_batch,
)
from ..faceid.similarity import embedding_agreement
from . import comfy_env
from .imaging import copy_regions, save_previews, to_bgr_list, to_bgr_list_and_batch

CATEGORY = "face_consistency"
PACK_TOOLTIP = (
    "Folder under models/insightface/models/. Standard packs not installed yet download there when the node "
    "first runs (unless turned off in the settings)."
)
DOWNLOADS_ON_FIRST_USE = "downloads on first use"
NO_FACE_COLOR = (230, 50, 50)
UNCHANGED_COLOR = (200, 60, 220)


def _pack_roots() -> list[Path]:
    return as_roots(comfy_env.insightface_roots())


def band_inputs() -> dict[str, tuple]:
    """The three band-threshold widgets (`band_excellent`, `band_good`, `band_moderate`)."""
    defaults = Bands()
    return {
        f"band_{name}": (
            "FLOAT",
            {
                "default": getattr(defaults, name),
                "min": -1.0,
                "max": 1.0,
                "step": 0.01,
                "tooltip": f"Lowest similarity labelled '{name}'. The defaults suit 512-d ArcFace "
                "packs (buffalo_l, antelopev2); smaller recognizers score lower.",
            },
        )
        for name in ("excellent", "good", "moderate")
    }


def pack_choices(roots: list[Path]) -> list[str]:
    """Installed packs, then the standard ones not installed yet, labelled with their size."""
    installed = list_packs(roots)
    return installed + [
        f"{name} ({DOWNLOADS_ON_FIRST_USE}, {RELEASES[name].size_label})"
        for name in STANDARD_PACKS
        if name not in installed
    ]


def pack_name(choice: str) -> str:
    """The pack a choice names: `buffalo_l (downloads on first use, 289 MB)` is buffalo_l."""
    name, _, label = choice.partition(" (")
    return name if label.startswith(DOWNLOADS_ON_FIRST_USE) else choice


def pack_input(tooltip: str) -> tuple[list[str], dict[str, Any]]:
    """A node's face pack input: the installed packs, then the standard ones that download on first use."""
    packs = pack_choices(_pack_roots())
    default = next(p for p in packs if pack_name(p) == DEFAULTS.pack)
    return packs, {"default": default, "tooltip": tooltip}


def pack_problem(choice: str) -> str | None:
    """Why a node cannot use the pack `choice` names (None: it can). Checked in place of ComfyUI's check
    against the list: a workflow saved with "buffalo_l" stays valid while the list shows it as "buffalo_l
    (downloads on first use, ...)", and the other way round."""
    name = pack_name(choice)
    installed = list_packs(_pack_roots())
    if name in STANDARD_PACKS or name in installed:
        return None
    return (
        f"model pack '{name}' is not installed; installed: {', '.join(installed) or 'none'}. Put it into "
        f"models/insightface/models/{name}/ and refresh ComfyUI (press R), or pick another pack."
    )


class FaceConsistencyLoadModel:
    """An InsightFace model pack (detector + ArcFace recognizer) on an onnxruntime provider."""

    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("FACE_MODEL",)
    RETURN_NAMES = ("face_model",)
    DESCRIPTION = (
        "Loads a face detector + recognizer pack from models/insightface/models/<pack>/. A standard "
        "pack that is not installed yet downloads on first use."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "pack": pack_input(PACK_TOOLTIP),
                "provider": (list(PROVIDERS), {"default": DEFAULTS.provider, "tooltip": PROVIDER_HELP}),
                "det_size": ([str(s) for s in DET_SIZES], {"default": DEFAULTS.det_size, "tooltip": DET_SIZE_HELP}),
                "det_thresh": (
                    "FLOAT",
                    {
                        "default": DEFAULTS.det_thresh,
                        "min": 0.05,
                        "max": 0.95,
                        "step": 0.05,
                        "tooltip": DET_THRESH_HELP,
                    },
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, pack: str) -> bool | str:
        return pack_problem(pack) or True

    def load(
        self, pack: str, provider: str, det_size: str, det_thresh: float, unique_id: str | None = None
    ) -> dict[str, Any]:
        settings = FaceEngineSettings(
            pack=pack_name(pack),
            models_roots=tuple(_pack_roots()),
            provider=provider,
            det_size=det_size if det_size == "auto" else int(det_size),
            det_thresh=det_thresh,
            allow_download=comfy_env.pack_downloads_enabled(),
        )
        model = load_face_engine(settings, comfy_env.DownloadProgress(unique_id))
        return {"ui": {"text": [describe_model(model)]}, "result": (model,)}


def _embeddings(results: list[FaceResult]) -> list[np.ndarray]:
    """The embeddings of results that have a face (analyze_references gives only such)."""
    return [result.embedding for result in results if result.embedding is not None]


def describe_model(model: FaceModel) -> str:
    info = model.describe()
    text = (
        f"{info['pack']} on {info['provider']} ({info['embedding_size']}-d embeddings, "
        f"det size {info['det_size']}, threshold {info['det_thresh']:.2f})"
    )
    return f"{text}\n{info['provider_note']}" if info["provider_note"] else text


class FaceConsistencyReference:
    """The identity of one person: the mean embedding of one or more reference photos."""

    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("FACE_IDENTITY",)
    RETURN_NAMES = ("identity",)
    DESCRIPTION = "Mean face embedding of all reference photos (largest face of each)."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "face_model": ("FACE_MODEL",),
                "images": ("IMAGE", {"tooltip": "Photos of the person; every one needs a face."}),
            },
            "optional": {
                "images_2": ("IMAGE", {"tooltip": "More photos (any size; batches must be one size)."}),
                "judge": (
                    "FACE_JUDGE",
                    {
                        "tooltip": "Also build the person for the held-out judge (Face Judge Loader), so that "
                        "Face Similarity Score can show its verdict against this identity.",
                    },
                ),
            },
        }

    def build(
        self, face_model: FaceModel, images: Any, images_2: Any = None, judge: DlibJudge | None = None
    ) -> dict[str, Any]:
        groups = [("images", to_bgr_list(images, "images"))]
        if images_2 is not None:
            groups.append(("images_2", to_bgr_list(images_2, "images_2")))
        progress = comfy_env.Progress(sum(len(g) for _, g in groups))
        embeddings = [
            embedding
            for name, bgrs in groups
            for embedding in _embeddings(analyze_references(face_model, bgrs, name, lambda: progress.update(1)))
        ]
        identity = mean_identity(embeddings)
        identity.agreement = embedding_agreement(embeddings)
        text = f"identity from {identity.count} photo(s), {face_model.pack_name} ({face_model.embedding_size}-d)"
        if identity.agreement is not None:
            text += f"; the photos' own agreement {identity.agreement.mean:.3f} (min {identity.agreement.min:.3f})"
        if judge is not None:
            descriptors = [d for name, bgrs in groups for d in judge.reference_descriptors(bgrs, "bgr", name)]
            identity.judge = mean_descriptor(descriptors)
            text += f"\njudge {judge.name}: identity from {identity.judge.count} photo(s)"
            if identity.judge.agreement is not None:
                text += f", the photos' own agreement {identity.judge.agreement.mean:.3f}"
        return {"ui": {"text": [text]}, "result": (identity,)}


class FaceConsistencySimilarity:
    """Identity similarity of each edited image to the reference, with bands and a change guard."""

    CATEGORY = CATEGORY
    FUNCTION = "score"
    OUTPUT_NODE = True
    RETURN_TYPES = ("FLOAT", "FLOAT", "INT", "STRING", "IMAGE", "FLOAT", "FLOAT", "FLOAT")
    RETURN_NAMES = (
        "scores",
        "mean_score",
        "count_above",
        "report",
        "annotated_images",
        "face_change",
        "judge_scores",
        "reference_agreement",
    )
    OUTPUT_IS_LIST = (True, False, False, False, False, True, True, False)
    OUTPUT_TOOLTIPS = (
        "One similarity per input image, in order (0 where no face was found).",
        "Mean similarity (images without a face: 0, or left out with no_face_policy 'exclude').",
        "How many images score at or above the threshold.",
        "One row per image: index, score, band, face used or reason, face change.",
        "The images with the faces boxed, keypoints and score drawn.",
        "Per image: 1 − SSIM of the aligned face crops of control and output (about 0 = the face "
        "was returned unchanged); -1 where no reference_image or no face.",
        "Per image: the held-out judge's similarity (1 - dlib distance / 1.2; 0.5 = its same-person "
        "threshold); -1 where no judge is connected or it found no face.",
        "The reference photos' own mean similarity (reference_identity from two or more photos): real "
        "photos of the person agree this much; -1 when unknown. Feeds the Checkpoint Scoreboard's gauge.",
    )
    DESCRIPTION = (
        "ArcFace cosine similarity of the face in each image to the reference. One reference for "
        "all images, or one per image (pairwise) when the batch sizes match."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "face_model": ("FACE_MODEL",),
                "images": ("IMAGE", {"tooltip": "Edited images to score (any batch size)."}),
                "face_selection": (
                    [s.value for s in Selection],
                    {
                        "default": Selection.LARGEST.value,
                        "tooltip": "Which face of an image with several: largest, highest detection "
                        "score, the one most like the reference, or by index (left to right).",
                    },
                ),
                "face_index": ("INT", {"default": 0, "min": 0, "max": 99, "tooltip": "For 'index'."}),
                "no_face_policy": (
                    [p.value for p in NoFacePolicy],
                    {
                        "default": NoFacePolicy.SCORE_ZERO.value,
                        "tooltip": "An image without a face never stops the graph: it scores 0, and "
                        "'exclude' also leaves it out of the mean.",
                    },
                ),
                "threshold": (
                    "FLOAT",
                    {
                        "default": Bands().good,
                        "min": -1.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "count_above counts the images scoring at least this.",
                    },
                ),
                **band_inputs(),
                "copy_paste_threshold": (
                    "FLOAT",
                    {
                        "default": DEFAULT_COPY_PASTE_THRESHOLD,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Face change below this flags the output as returning the control's "
                        "face unchanged (needs reference_image).",
                    },
                ),
            },
            "optional": {
                "reference_image": (
                    "IMAGE",
                    {
                        "tooltip": "The control image (1, or one per output). Also the baseline of the "
                        "face-change guard.",
                    },
                ),
                "reference_identity": (
                    "FACE_IDENTITY",
                    {
                        "tooltip": "Scores against this identity instead of reference_image's face "
                        "(reference_image, if connected, then only feeds the change guard). Built from two "
                        "or more photos, it also gives the copy-paste gauge its baseline.",
                    },
                ),
                "judge": (
                    "FACE_JUDGE",
                    {
                        "tooltip": "A held-out judge (Face Judge Loader): each image also gets its verdict, with "
                        "its own detector. Against reference_identity, build that identity with the judge too.",
                    },
                ),
            },
        }

    def score(
        self,
        face_model: FaceModel,
        images: Any,
        face_selection: str,
        face_index: int,
        no_face_policy: str,
        threshold: float,
        band_excellent: float,
        band_good: float,
        band_moderate: float,
        copy_paste_threshold: float,
        reference_image: Any = None,
        reference_identity: Identity | None = None,
        judge: DlibJudge | None = None,
    ) -> dict[str, Any]:
        check_references(reference_image, reference_identity, judge)
        # the annotated images start as the input's 8-bit pixels, made in the pass that converts it
        outputs, annotated = to_bgr_list_and_batch(images, "images")
        batch, report = score_arrays(
            face_model,
            outputs,
            reference_image,
            reference_identity,
            judge,
            selection=face_selection,
            index=face_index,
            policy=no_face_policy,
            bands=Bands(band_excellent, band_good, band_moderate),
            threshold=threshold,
            copy_paste_threshold=copy_paste_threshold,
        )
        agreement = batch.agreement
        for bgr, image, row in zip(outputs, annotated, batch.rows):  # our own converted copies: draw on them
            copy_regions(image, bgr, annotate_scores(bgr, row))
        changes = [row.face_change if row.face_change is not None else -1.0 for row in batch.rows]
        return {
            "ui": {"text": [report], "images": save_previews(outputs, "face_similarity")},
            "result": (
                batch.scores,
                batch.mean,
                batch.count_at_or_above,
                report,
                annotated,
                changes,
                [row.judge_score for row in batch.rows],
                agreement.mean if agreement is not None else -1.0,
            ),
        }


def score_images(
    face_model: FaceModel,
    images: Any,
    reference_image: Any,
    reference_identity: Identity | None,
    judge: DlibJudge | None,
    **options: Any,
) -> tuple[list[np.ndarray], BatchScores, str]:
    """Score an IMAGE batch against reference_image (the control, 1 or pairwise) or reference_identity,
    with the judge's verdicts when one is connected: the images as BGR arrays, the scores and their report.

    `options` are score_batch's selection, index, policy, bands, threshold and copy_paste_threshold.
    """
    check_references(reference_image, reference_identity, judge)
    outputs = to_bgr_list(images, "images")
    return (outputs, *score_arrays(face_model, outputs, reference_image, reference_identity, judge, **options))


def check_references(reference_image: Any, reference_identity: Identity | None, judge: DlibJudge | None) -> None:
    """Raise ValueError when the inputs give nothing to score against (checked before any image is converted)."""
    if reference_image is None and reference_identity is None:
        raise ValueError("connect reference_image (the control image) or reference_identity")
    if judge is not None and reference_identity is not None and reference_identity.judge is None:
        raise ValueError(
            "the judge scores against reference_identity only when that identity was built with the judge: "
            "connect the same Face Judge Loader to Face Reference Identity's judge input"
        )


def score_arrays(
    face_model: FaceModel,
    outputs: list[np.ndarray],
    reference_image: Any,
    reference_identity: Identity | None,
    judge: DlibJudge | None,
    **options: Any,
) -> tuple[BatchScores, str]:
    """`score_images` of images already converted to BGR arrays (inputs checked by `check_references`)."""
    controls = to_bgr_list(reference_image, "reference_image") if reference_image is not None else []
    if controls:  # check the batch rule before any detection runs
        reference_pairing(len(controls), len(outputs), "reference_image")
    progress = comfy_env.Progress(len(controls) + len(outputs))
    control_results = analyze_references(face_model, controls, "reference_image", lambda: progress.update(1))
    if reference_identity is not None:
        references = [reference_identity.embedding]
        source = f"identity of {reference_identity.count} photo(s)"
    else:
        references = _embeddings(control_results)
        source = f"reference_image ({len(controls)})"
    judge_references: list[np.ndarray] = []
    if judge is not None:
        if reference_identity is None:
            judge_references = judge.reference_descriptors(controls, "bgr", "reference_image")
        elif reference_identity.judge is not None:  # checked above: built with the judge
            judge_references = [reference_identity.judge.descriptor]
    batch = score_batch(
        face_model,
        outputs,
        references,
        [Control.from_face(bgr, r.face) for bgr, r in zip(controls, control_results) if r.face is not None],
        on_image=lambda: progress.update(1),
        agreement=reference_identity.agreement if reference_identity is not None else None,
        judge=judge,
        judge_references=judge_references,
        **options,
    )
    report = batch.report([f"Face similarity: {describe_model(face_model)}; reference: {source}"])
    return batch, report


def annotate_scores(bgr: np.ndarray, row: ImageScore) -> list[Region]:
    """Draw every face in place; the scored one labelled with its score and band. Returns the regions drawn."""
    result = row.result
    regions = []
    for j, (face, similarity) in enumerate(zip(result.faces, row.face_scores)):
        if j == result.face_index:
            label = f"#{row.index} {row.score:.3f} {row.band}" + (" UNCHANGED" if row.unchanged else "")
            if row.judge_verdict is not None:
                label += f" dlib {row.judge_verdict.similarity:.2f}"
            color = UNCHANGED_COLOR if row.unchanged or row.band is None else BAND_COLORS[row.band]
            regions += draw_face(bgr, face, label, color)
        else:
            regions += draw_face(bgr, face, f"{similarity:.2f}", UNUSED_FACE_COLOR, primary=False)
    if not row.scored:
        regions.append(draw_label(bgr, f"#{row.index} {result.reason}", (0, 0), NO_FACE_COLOR))
    return regions


NODE_CLASS_MAPPINGS = {
    "FaceConsistencyLoadModel": FaceConsistencyLoadModel,
    "FaceConsistencyReference": FaceConsistencyReference,
    "FaceConsistencySimilarity": FaceConsistencySimilarity,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FaceConsistencyLoadModel": "Face Model Loader (InsightFace)",
    "FaceConsistencyReference": "Face Reference Identity",
    "FaceConsistencySimilarity": "Face Similarity Score",
}
