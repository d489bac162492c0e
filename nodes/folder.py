"""FaceConsistencyScoreFolder: the command line's folder evaluation as a node (report + plot)."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import cv2

from ..common.files import atomic_write_json, check_writable_file, file_signature
from ..faceid import Bands, FaceModel, Identity
from ..faceid.evaluate import EvaluationError, EvaluationSources, FolderEvaluation
from ..faceid.evaluate.plot import plot_rgb, write_plot
from ..faceid.evaluate.report import summary_table
from ..faceid.images import list_images
from ..faceid.judge import DlibJudge
from ..musubi_formats.prompts import PromptFileError, load_prompt_file, resolve_prompt_path
from . import comfy_env
from .imaging import save_previews, to_image_batch
from .scoring import CATEGORY, band_inputs

# Evaluations kept between runs, so a re-queued node embeds only new or changed images.
KEPT_EVALUATIONS = 4
_evaluations: OrderedDict[tuple, FolderEvaluation] = OrderedDict()


def _confined_inputs(
    folder: str, sample_prompts: str, control_dir: str
) -> tuple[Path | None, Path | None, Path | None]:
    """The folder, prompt file and control folder, and every image they hold or name (the prompt file's
    --ci controls, as the pairing resolves them), inside ComfyUI's folders."""
    folders = comfy_env.allowed_folders()
    confined = []
    for text, what in ((folder, "folder"), (sample_prompts, "sample_prompts"), (control_dir, "control_dir")):
        path = comfy_env.input_path(text, what)
        confined.append(path)
        if path is not None and path.is_dir():
            for image in list_images(path):
                comfy_env.confine(image, f"{what} image", folders)
    folder_path, prompts, _ = confined
    if prompts is not None and prompts.is_file():
        try:
            prompt_list = load_prompt_file(prompts)
        except PromptFileError:
            prompt_list = []  # the evaluation reports it
        for prompt in prompt_list:
            for raw in prompt.control_images:
                for candidate in resolve_prompt_path(raw, prompts)[1]:  # from where the evaluation looks
                    comfy_env.confine(candidate, f"sample_prompts --ci of prompt {prompt.index}", folders)
    return folder_path, prompts, confined[2]


def _sources(folder: str, sample_prompts: str, control_dir: str) -> EvaluationSources:
    folder_path, prompts, controls = _confined_inputs(folder, sample_prompts, control_dir)
    if folder_path is None:
        raise EvaluationError("set 'folder' to the sample folder (or the folder of generated images)")
    if controls is not None:
        return EvaluationSources(control_dir=controls, generated_dir=folder_path)
    return EvaluationSources(sample_dir=folder_path, sample_prompts=prompts)


def _evaluation(model: FaceModel, sources: EvaluationSources, judge: DlibJudge | None) -> FolderEvaluation:
    key = (id(model), id(judge), sources.sample_dir, sources.sample_prompts, sources.control_dir, sources.generated_dir)
    evaluation = _evaluations.get(key)
    if evaluation is None or evaluation.model is not model or evaluation.judge is not judge:
        evaluation = FolderEvaluation(model, sources, judge=judge)
        _evaluations[key] = evaluation
        while len(_evaluations) > KEPT_EVALUATIONS:
            _evaluations.popitem(last=False)
    _evaluations.move_to_end(key)
    return evaluation


class FaceConsistencyScoreFolder:
    """Score a folder of samples against their controls: JSON report and plot, as the CLI writes."""

    CATEGORY = CATEGORY
    FUNCTION = "score_folder"
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report_json", "plot")
    OUTPUT_NODE = True
    DESCRIPTION = (
        "Scores every image of a musubi-tuner sample folder (controls from its prompt file's --ci), "
        "a seed-guide folder (control_image_N.png beside *_step_S_N.png) or a folder of generated "
        "images named like the images in control_dir. Same report as `face-consistency evaluate`."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "face_model": ("FACE_MODEL",),
                "folder": comfy_env.path_input(
                    "musubi sample folder (output_dir/sample), a seed-guide folder, or the "
                    "generated images when control_dir is set (inside ComfyUI's folders)."
                ),
                "threshold": (
                    "FLOAT",
                    {
                        "default": 0.75,
                        "min": -1.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "The report counts samples at or above this similarity.",
                    },
                ),
            },
            "optional": {
                "sample_prompts": comfy_env.path_input(
                    "musubi prompt file; the --ci image(s) of line k are the controls of prompt k."
                ),
                "control_dir": comfy_env.path_input(
                    "Folder of controls: stem.png or stem_N.png belong to generated stem.png."
                ),
                "reference_identity": (
                    "FACE_IDENTITY",
                    {
                        "tooltip": "Score against this person (beside the controls, or alone when there are none).",
                    },
                ),
                "save_report": comfy_env.path_input(
                    "If set, also write the JSON report here (a .json path inside ComfyUI's output "
                    "folder; relative paths are taken from there) and the plot beside it (.png)."
                ),
                "judge": (
                    "FACE_JUDGE",
                    {
                        "tooltip": "A held-out judge (Face Judge Loader): every pair also scored by it, its curve in "
                        "the plot, as `face-consistency evaluate --judge dlib`.",
                    },
                ),
                **band_inputs(),
            },
        }

    @classmethod
    def IS_CHANGED(cls, folder: str = "", sample_prompts: str = "", control_dir: str = "", **_: Any) -> str:
        """Changes whenever a file in the folders (or the prompt file) is added, removed or rewritten."""
        folder_path, prompts, controls = _confined_inputs(folder, sample_prompts, control_dir)
        parts = []
        for path in (folder_path, controls):
            if path is not None and path.is_dir():
                parts += [f"{p}:{file_signature(p)}" for p in list_images(path)]
        if prompts is not None:
            parts.append(f"{prompts}:{file_signature(prompts)}")
        return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()

    def score_folder(
        self,
        face_model: FaceModel,
        folder: str,
        threshold: float,
        sample_prompts: str = "",
        control_dir: str = "",
        reference_identity: Identity | None = None,
        save_report: str = "",
        band_excellent: float | None = None,
        band_good: float | None = None,
        band_moderate: float | None = None,
        judge: DlibJudge | None = None,
    ) -> dict[str, Any]:
        defaults = Bands()
        bands = Bands(
            band_excellent if band_excellent is not None else defaults.excellent,
            band_good if band_good is not None else defaults.good,
            band_moderate if band_moderate is not None else defaults.moderate,
        )
        report_text = save_report.strip().strip('"')
        # the plot goes beside the report as .png: a .json report never has the plot's name
        report_path = comfy_env.output_file(report_text, "save_report", ".json") if report_text else None
        if report_path is not None:  # before the scoring, not after it
            check_writable_file(report_path, "save_report")
            check_writable_file(report_path.with_suffix(".png"), "save_report's plot")
        evaluation = _evaluation(face_model, _sources(folder, sample_prompts, control_dir), judge)
        evaluation.sources.check_outputs(
            {  # never over an input; a plot saved into the sample folder is not a sample
                "save_report": report_path,
                "save_report's plot": report_path.with_suffix(".png") if report_path is not None else None,
            }
        )
        evaluation.reference = reference_identity
        evaluation.threshold = threshold
        evaluation.bands = bands
        evaluation.progress = comfy_env.Progress
        report = evaluation.run_round().report
        plot = cv2.cvtColor(plot_rgb(report), cv2.COLOR_RGB2BGR)  # the previews and IMAGE batch take BGR
        if report_path is not None:
            atomic_write_json(report_path, report)
            write_plot(report, report_path.with_suffix(".png"))
        table = summary_table(report)
        return {
            "ui": {"text": [table], "images": save_previews([plot], "face_folder_plot")},
            "result": (json.dumps(report, indent=2, default=str), to_image_batch([plot])),
        }


NODE_CLASS_MAPPINGS = {"FaceConsistencyScoreFolder": FaceConsistencyScoreFolder}
NODE_DISPLAY_NAME_MAPPINGS = {"FaceConsistencyScoreFolder": "Face Consistency: Score Folder"}
