"""Training from a graph: launch the trainer in the background, watch it, stop it, rank its checkpoints.

Thin adapters over `training_contract.launch` (a launch in the trainer's terms), `training_jobs.job_control`
(launch and stop), `training_jobs.job_registry`, `training_jobs.run_reader` (run
folders, ours or musubi-tuner's), `training_jobs.run_plots` and `training_jobs.checkpoint_scores`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..common.face_engine import FaceEngineSettings
from ..faceid.images import list_images
from ..faceid.scoring import DEFAULT_COPY_PASTE_THRESHOLD
from ..musubi_formats.dataset import dataset_config_for, load_dataset_config
from ..musubi_formats.names import output_name_problem
from ..musubi_formats.prompts import parse_prompt_text, resolve_prompt_path
from ..training_contract import options
from ..training_contract.checkpoint_choice import CheckpointTable, read_table
from ..training_contract.checkpoint_choice import format_table as format_checkpoint_table
from ..training_contract.launch import FACE_LOSS_VARIANTS, LaunchRequest
from ..training_contract.protocol import LOG_FILE, read_status
from ..training_jobs import job_control
from ..training_jobs.checkpoint_scores import (
    UNCHANGED_NOTE,
    best_checkpoint,
    chart_positions,
    copy_as_best,
    copy_paste_notes,
    format_table,
    group_scores,
)
from ..training_jobs.job_registry import JobRecord, UnknownJobError
from ..training_jobs.run_plots import plot_run, plot_scores
from ..training_jobs.run_reader import list_checkpoints, log_tail, read_run, run_checkpoints
from ..training_jobs.run_summary import describe_run, run_files_signature, sample_grid_rgb
from ..training_jobs.trainer_env import trainer_runtime
from . import comfy_env
from .comfy_env import open_registry
from .imaging import rgb_to_image
from .scoring import pack_input, pack_name, pack_problem

CATEGORY = "face_consistency/training"
TRAINING_JOB = "TRAINING_JOB"
LORAS = comfy_env.LORAS_FOLDER
WAIT_CHOICES = ("no", "next checkpoint", "finished")
POLL_S = 2.0


@dataclass(frozen=True)
class TrainingJob:
    """What flows along a TRAINING_JOB link: enough to find the job again after a restart."""

    job_id: str
    output_dir: str
    name: str


def _lora_name_type() -> list[str]:
    # A list output type is a COMBO output: it links to LoraLoader's `lora_name` when both lists
    # are equal, so it is computed from the same folder listing at the moment ComfyUI asks.
    return comfy_env.filename_list(LORAS)


class _LoraNameOutputs(type):
    """Metaclass resolving the `LORA_NAME` placeholder in OUTPUT_TYPES to the current LoRA list."""

    OUTPUT_TYPES: tuple[str, ...]

    @property
    def RETURN_TYPES(cls) -> tuple[Any, ...]:
        return tuple(_lora_name_type() if t == "LORA_NAME" else t for t in cls.OUTPUT_TYPES)


def _resolve_folder(folder: str) -> Path:
    """An output folder given as an absolute path, or relative to ComfyUI's output or loras folders;
    every place looked at lies inside ComfyUI's folders (checked before it is looked at)."""
    text = folder.strip().strip('"')
    path = Path(text).expanduser()
    candidates = (
        [path]
        if path.is_absolute()
        else [
            comfy_env.output_directory() / path,
            *(root / path for root in comfy_env.folder_roots(LORAS)),
        ]
    )
    allowed = comfy_env.allowed_folders()
    for candidate in candidates:
        if comfy_env.confine(candidate, "output_folder", allowed).is_dir():
            return candidate.resolve()
    raise ValueError(f"training output folder {text!r} not found (looked in: {', '.join(str(c) for c in candidates)})")


def _resolve_run(job: TrainingJob | None, output_folder: str) -> tuple[JobRecord | None, Path]:
    """The registered job (when there is one) and the folder it writes to."""
    registry = open_registry()
    if job is not None:
        try:
            record = registry.refresh(job.job_id)
        except UnknownJobError:
            return None, Path(job.output_dir)
        return record, record.output_dir
    if not output_folder.strip():
        raise ValueError("connect a TRAINING_JOB or give an output folder")
    folder = _resolve_folder(output_folder)
    found = registry.find_by_output_dir(folder)
    return (registry.refresh(found.job_id) if found else None), folder


def _fingerprint(job: TrainingJob | None, output_folder: str) -> str | float:
    """IS_CHANGED value: NaN (never equal, never cached) while a job runs, else the folder's file state."""
    try:
        record, folder = _resolve_run(job, output_folder)
    except (ValueError, OSError):
        return math.nan
    if record is not None and not record.finished:
        return math.nan
    return run_files_signature(folder)


def _optional_target_inputs() -> dict[str, Any]:
    return {
        "job": (TRAINING_JOB, {"tooltip": "A job from FaceConsistencyTrainLaunch."}),
        "output_folder": comfy_env.path_input(
            "Or a run folder: absolute, or relative to ComfyUI's output or loras folders "
            "(a musubi-tuner output folder works too)."
        ),
    }


def _relative_lora_name(path: Path) -> str | None:
    """`path` as ComfyUI's LoRA loaders name it (relative to a loras folder), or None outside them."""
    resolved = path.resolve()
    for root in comfy_env.folder_roots(LORAS):
        try:
            return resolved.relative_to(root.resolve()).as_posix()
        except ValueError:
            continue
    return None


# Trainer options the launch node shows (their widgets come from training_contract/options.py), in the node's order.
SETTINGS = (
    "learning_rate",
    "network_dim",
    "network_alpha",
    "max_train_epochs",
    "save_every_n_epochs",
    "seed",
    "timestep_sampling",
    "discrete_flow_shift",
    "optimizer_type",
    "mixed_precision",
    "gradient_checkpointing",
)

# The face inputs, in the node's order (a saved workflow keeps its widget values by position): the face engine's
# settings (common/face_engine.py) as the trainer's flags spell them, and the loss weight and metrics' frequency.
FACE_INPUTS = ("face_loss_weight", "face_model_name", "face_device", "face_det_size", "face_eval_frequency")
PACK_TOOLTIP = (
    "The face engine's pack (--face_model_name), as Load Face Model lists them; standard packs not installed yet "
    "download on first use. A workflow may also name a pack's folder inside ComfyUI's folders."
)
# Optional inputs after the older ones (saved workflows keep their widget values): the loss, off unless
# asked for (the evidence shows a trade-off, not a help), and its variants.
FACE_LOSS_INPUTS = ("use_face_as_loss", *FACE_LOSS_VARIANTS)
# Settings that may name a folder: a pack (by name, or its folder), the tokenizer's folder, the negatives' folder.
PATH_SETTINGS = ("tokenizer", "face_loss_negatives")
# The launch's settings that are paths, confined by the node (the pack: `_face_pack`).
LAUNCH_PATH_SETTINGS = ("tokenizer", "face_loss_negatives", "likeness_references")


def _setting_input(name: str) -> tuple[Any, ...]:
    kind, settings = options.node_input(name)
    return (kind, {**settings, comfy_env.PATH_INPUT: True}) if name in PATH_SETTINGS else (kind, settings)


def _confine_dataset(source: Path | None, output_dir: Path, resolution: int, input_name: str = "dataset") -> Path:
    """The run's dataset TOML (`dataset_config_for`), once it and every file and folder it names, as the
    trainer will find them from its working directory (`output_dir`), lie inside ComfyUI's folders."""
    if source is None:
        raise ValueError("set 'dataset' to a musubi dataset .toml or a dataset folder")
    folders = comfy_env.allowed_folders()
    toml = dataset_config_for(str(source), output_dir, resolution, input_name)
    comfy_env.confine(toml, input_name, folders)

    def check_path(what: str, path: Path) -> None:
        comfy_env.confine(path, f"{input_name} {what}", folders)

    load_dataset_config(toml, working_dir=output_dir, check_path=check_path)
    return toml


def _face_engine(settings: dict[str, Any]) -> FaceEngineSettings:
    """The face engine the node's face inputs name (taken out of `settings`), searched for in ComfyUI's
    insightface folders as the loader node searches them, downloading per ComfyUI's setting."""
    return FaceEngineSettings(
        pack=_face_pack(settings.pop("face_model_name")),
        models_roots=tuple(comfy_env.insightface_roots()),
        provider=settings.pop("face_device"),
        det_size=settings.pop("face_det_size"),
        allow_download=comfy_env.pack_downloads_enabled(),
    )


def _confine_photos_and_controls(request: LaunchRequest) -> None:
    """Every likeness reference photo, and every --ci control image of the sample prompts wherever the trainer
    will look for it, inside ComfyUI's folders (a symlink counts where it points)."""
    folders = comfy_env.allowed_folders()
    references = request.settings.get("likeness_references")
    for photo in list_images(references) if references else []:
        comfy_env.confine(photo, "likeness_references photo", folders)
    prompt_file = request.sample_prompts_file
    for prompt in parse_prompt_text(request.sample_prompts):
        for raw in prompt.control_images:
            for candidate in resolve_prompt_path(raw, prompt_file, prompt_file.parent)[1]:
                comfy_env.confine(candidate, f"sample_prompts --ci of prompt {prompt.index}", folders)


def _with_datasets(request: LaunchRequest, paths: dict[str, Path | None], resolution: int) -> LaunchRequest:
    """`request` with the run's dataset TOMLs (the training items', and the held-out items' when given)."""
    held_out = paths["validation_dataset"]
    return replace(
        request,
        dataset_config=_confine_dataset(paths["dataset"], request.output_dir, resolution),
        validation_dataset_config=None
        if held_out is None
        else _confine_dataset(held_out, request.output_dir, resolution, "validation_dataset"),
    )


def _model_file(folder: str, filename: str) -> Path:
    path = comfy_env.full_path(folder, filename)
    if path is None:
        raise ValueError(f"{filename!r} not found in ComfyUI's {folder} folders")
    return path


def _is_folder(pack: str) -> bool:
    return Path(pack).expanduser().is_absolute() or "/" in pack or os.sep in pack


def _face_pack(choice: str) -> str:
    """The pack a face_model_name value names: a listed choice, or a pack's folder (confined)."""
    pack = choice.strip()
    return str(comfy_env.input_path(pack, "face_model_name")) if _is_folder(pack) else pack_name(pack)


class FaceConsistencyTrainLaunch:
    """Start a LoRA training run in the background; returns at once with a TRAINING_JOB."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "dit": (
                    comfy_env.filename_list("diffusion_models"),
                    {"tooltip": "Qwen-Image-Edit 2509/2511 or Qwen-Image 2.1 DiT (as model_version says)."},
                ),
                "vae": (comfy_env.filename_list("vae"),),
                "text_encoder": (
                    comfy_env.filename_list("text_encoders"),
                    {"tooltip": "Qwen2.5-VL 7B (Edit 2509/2511) or Qwen3-VL 8B (Qwen-Image 2.1)."},
                ),
                "dataset": comfy_env.path_input(
                    "A musubi dataset .toml, or a folder with images/ (+ .txt captions) "
                    "and controls/, inside ComfyUI's folders (e.g. input/)."
                ),
                "output_name": (
                    "STRING",
                    {"default": "face_lora", "tooltip": "Checkpoints go to output/loras/<name>/."},
                ),
                **{name: options.node_input(name) for name in SETTINGS},
                "enable_face_loss": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Face-similarity metrics of the x0 "
                        "estimates and the samples during training (--enable_face_loss); the loss "
                        "itself is the optional use_face_as_loss.",
                    },
                ),
                **{
                    name: pack_input(PACK_TOOLTIP) if name == "face_model_name" else _setting_input(name)
                    for name in FACE_INPUTS
                },
            },
            "optional": {
                "sample_prompts": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "musubi sample prompts, one "
                        "per line: text --w 1024 --h 1024 --s 20 --d 42 --ci control.png",
                    },
                ),
                "sample_every_n_epochs": options.node_input("sample_every_n_epochs"),
                "max_train_steps": options.node_input("max_train_steps"),
                "resolution": (
                    "INT",
                    {
                        "default": 1024,
                        "min": 64,
                        "max": 4096,
                        "step": 16,
                        "tooltip": "For a dataset folder without a TOML.",
                    },
                ),
                "tokenizer": _setting_input("tokenizer"),
                "extra_args": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "More trainer flags, e.g. "
                        "--fp8_base --blocks_to_swap 16 (split like a shell would, never run by one).",
                    },
                ),
                **{name: _setting_input(name) for name in FACE_LOSS_INPUTS},
                "validation_dataset": comfy_env.path_input(
                    "Held-out items, never trained on (a dataset .toml or a folder like 'dataset'): their "
                    "validation loss at every checkpoint, in checkpoints.json (--validation_dataset_config)."
                ),
                "likeness_references": comfy_env.path_input(
                    "A folder of photos of the person that are neither controls nor training targets: every "
                    "checkpoint's samples are scored against them (held-out likeness, --likeness_references)."
                ),
                "model_version": options.node_input("model_version"),
            },
        }

    RETURN_TYPES = (TRAINING_JOB, "STRING")
    RETURN_NAMES = ("job", "output_dir")
    FUNCTION = "launch"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = "Starts the face-consistency LoRA trainer as a background job (the queue is not blocked)."

    @classmethod
    def VALIDATE_INPUTS(cls, face_model_name: str) -> bool | str:
        # a pack as Load Face Model checks it, or a pack's folder (confined when the node runs)
        return _is_folder(face_model_name.strip()) or pack_problem(face_model_name) or True

    def launch(
        self,
        dit: str,
        vae: str,
        text_encoder: str,
        dataset: str,
        output_name: str,
        enable_face_loss: bool,
        sample_prompts: str = "",
        sample_every_n_epochs: int = 10,
        max_train_steps: int = 0,
        resolution: int = 1024,
        tokenizer: str = "",
        extra_args: str = "",
        validation_dataset: str = "",
        likeness_references: str = "",
        **settings: Any,  # SETTINGS, FACE_INPUTS and FACE_LOSS_INPUTS, by their option names
    ) -> dict[str, Any]:
        name = output_name.strip()
        name_problem = output_name_problem(name)
        if name_problem:
            raise ValueError(f"output_name {output_name!r} {name_problem}; give a plain name such as face_lora")
        texts = {
            "dataset": dataset,
            "validation_dataset": validation_dataset,
            "tokenizer": tokenizer,
            "likeness_references": likeness_references,
            "face_loss_negatives": settings.get("face_loss_negatives", ""),
        }
        paths = {key: comfy_env.input_path(text, key) for key, text in texts.items()}  # confined before any read
        trainer_runtime()  # no trainer's libraries anywhere: refused, naming the setup command, before any write
        engine = _face_engine(settings)  # takes the face engine's inputs out of settings
        request = LaunchRequest(
            output_dir=comfy_env.output_directory() / LORAS / name,  # on ComfyUI's LoRA search path
            output_name=name,
            dit=_model_file("diffusion_models", dit),
            vae=_model_file("vae", vae),
            text_encoder=_model_file("text_encoders", text_encoder),
            face_engine=engine,
            settings={
                **settings,
                **{key: paths[key] for key in LAUNCH_PATH_SETTINGS},
                "max_train_steps": max_train_steps,
                "sample_every_n_epochs": sample_every_n_epochs,
            },
            enable_face_loss=enable_face_loss,
            sample_prompts=sample_prompts,
            extra_args=extra_args,
        )
        request.check()
        _confine_photos_and_controls(request)
        registry = open_registry()
        job_control.open_run_folder(registry, request.output_dir, name)
        record = job_control.launch(registry, _with_datasets(request, paths, resolution))
        job = TrainingJob(record.job_id, str(record.output_dir), name)
        text = f"started job {record.job_id} (pid {record.pid}) into {record.output_dir}"
        return {"ui": {"text": [text]}, "result": (job, str(record.output_dir))}


class FaceConsistencyTrainMonitor:
    """Status, loss / face-similarity plot, latest checkpoint and samples of a run; optionally waits."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "wait_until": (
                    list(WAIT_CHOICES),
                    {
                        "default": "no",
                        "tooltip": "Block this prompt until the next "
                        "checkpoint or the end of training (Cancel stops waiting, not training).",
                    },
                ),
                "timeout_minutes": ("FLOAT", {"default": 60.0, "min": 0.1, "max": 100000.0}),
                "moving_average": ("INT", {"default": 20, "min": 1, "max": 10000}),
                "max_samples": ("INT", {"default": 8, "min": 1, "max": 64}),
            },
            "optional": _optional_target_inputs(),
        }

    RETURN_TYPES = ("STRING", "IMAGE", "STRING", "IMAGE")
    RETURN_NAMES = ("status", "plot", "latest_checkpoint", "samples")
    FUNCTION = "monitor"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    @classmethod
    def IS_CHANGED(cls, job: TrainingJob | None = None, output_folder: str = "", **_: Any) -> str | float:
        return _fingerprint(job, output_folder)

    def monitor(
        self,
        wait_until: str,
        timeout_minutes: float,
        moving_average: int,
        max_samples: int,
        job: TrainingJob | None = None,
        output_folder: str = "",
    ) -> dict[str, Any]:
        record, folder = _resolve_run(job, output_folder)
        if wait_until != "no" and record is not None and not record.finished:
            record = self._wait(record, wait_until, timeout_minutes * 60.0)
        run = read_run(folder)
        status = describe_run(run, record, window=moving_average)
        latest = run.latest_checkpoint
        latest_name = ""
        if latest is not None:
            latest_name = _relative_lora_name(latest.path) or str(latest.path)
        plot = rgb_to_image(plot_run(run, window=moving_average))
        return {
            "ui": {"text": [status]},
            "result": (status, plot, latest_name, rgb_to_image(sample_grid_rgb(run, max_samples))),
        }

    @staticmethod
    def _wait(record: JobRecord, wait_until: str, timeout_s: float) -> JobRecord:
        registry = open_registry()

        def latest_checkpoint() -> Path | None:
            checkpoints = run_checkpoints(record.output_dir, read_status(record.output_dir))
            return checkpoints[-1].path if checkpoints else None

        first_checkpoint = latest_checkpoint()
        # a one-step bar until the trainer reports its step count; every update is also where
        # ComfyUI raises when the user presses Cancel (the training itself goes on)
        bar, bar_total, shown = comfy_env.Progress(1), None, 0
        deadline = time.monotonic() + timeout_s
        while True:
            record = registry.refresh(record.job_id)
            status = read_status(record.output_dir) or {}
            total, step = status.get("total_steps"), status.get("step")
            if isinstance(total, int) and total > 0 and total != bar_total:
                bar, bar_total, shown = comfy_env.Progress(total), total, 0
            advance = step - shown if bar_total and isinstance(step, int) and step > shown else 0
            bar.update(advance)
            shown += advance
            latest = latest_checkpoint()
            if record.finished or (wait_until == "next checkpoint" and latest not in (None, first_checkpoint)):
                return record
            if time.monotonic() >= deadline:
                return record
            time.sleep(POLL_S)


class FaceConsistencyTrainStop:
    """Graceful stop: the trainer saves a checkpoint and reports `stopped`; stragglers are ended."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "grace_seconds": (
                    "INT",
                    {
                        "default": 300,
                        "min": 1,
                        "max": 86400,
                        "tooltip": "How long to wait for the checkpoint before the process tree is terminated.",
                    },
                ),
            },
            "optional": _optional_target_inputs(),
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    FUNCTION = "stop"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    @classmethod
    def IS_CHANGED(cls, **_: Any) -> float:
        return math.nan  # an action: runs every time it is queued

    def stop(self, grace_seconds: int, job: TrainingJob | None = None, output_folder: str = "") -> dict[str, Any]:
        record, folder = _resolve_run(job, output_folder)
        if record is None:
            raise ValueError(f"no job launched from ComfyUI writes to {folder}; only those can be stopped here")
        progress = comfy_env.Progress(grace_seconds)
        waited = [0]

        def tick(elapsed: float) -> None:
            seconds = int(elapsed)
            progress.update(max(0, seconds - waited[0]))
            waited[0] = max(waited[0], seconds)

        was_running = not record.finished
        record = job_control.stop(open_registry(), record.job_id, grace_s=float(grace_seconds), on_wait=tick)
        checkpoints = run_checkpoints(folder, read_status(folder))
        latest = checkpoints[-1] if checkpoints else None
        lines = [f"job {record.job_id}: {record.state}" + ("" if was_running else " (had already ended)")]
        if latest is not None:
            lines.append(f"last checkpoint: {_relative_lora_name(latest.path) or latest.path} ({latest.label})")
        else:
            lines.append("no checkpoint was saved")
        if record.detail:
            lines.append(record.detail)
        if job_control.tree_alive(record):
            lines.append(f"warning: processes of group {record.pid} are still running")
        report = "\n".join(lines)
        return {"ui": {"text": [report]}, "result": (report,)}


class FaceConsistencyTrainLogs:
    """The last lines of the trainer's log (train.log)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"lines": ("INT", {"default": 50, "min": 1, "max": 5000})},
            "optional": _optional_target_inputs(),
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("log",)
    FUNCTION = "logs"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    @classmethod
    def IS_CHANGED(cls, job: TrainingJob | None = None, output_folder: str = "", **_: Any) -> str | float:
        return _fingerprint(job, output_folder)

    def logs(self, lines: int, job: TrainingJob | None = None, output_folder: str = "") -> dict[str, Any]:
        _, folder = _resolve_run(job, output_folder)
        tail = log_tail(folder, lines)
        text = "\n".join(tail) if tail else f"(nothing in {folder / LOG_FILE} yet)"  # missing or empty
        return {"ui": {"text": [text]}, "result": (text,)}


class FaceConsistencyListCheckpoints(metaclass=_LoraNameOutputs):
    """Every checkpoint of a run as a list, ordered by step: downstream nodes run once per checkpoint."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"include_final": ("BOOLEAN", {"default": True})},
            "optional": _optional_target_inputs(),
        }

    OUTPUT_TYPES = ("LORA_NAME", "STRING", "INT")
    RETURN_NAMES = ("lora_name", "name", "step")
    OUTPUT_IS_LIST = (True, True, True)
    FUNCTION = "list_checkpoints"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "lora_name links to LoraLoaderModelOnly; name (the same text) to the scoreboard; step is -1 "
        "where a checkpoint's step is unknown."
    )

    @classmethod
    def IS_CHANGED(cls, job: TrainingJob | None = None, output_folder: str = "", **_: Any) -> str | float:
        return _fingerprint(job, output_folder)

    def list_checkpoints(
        self, include_final: bool, job: TrainingJob | None = None, output_folder: str = ""
    ) -> tuple[list[str], list[str], list[int]]:
        _, folder = _resolve_run(job, output_folder)
        checkpoints = [c for c in read_run(folder).checkpoints if include_final or not c.final]
        if not checkpoints:
            raise ValueError(f"no checkpoints (*.safetensors) in {folder} yet")
        names = []
        for checkpoint in checkpoints:
            name = _relative_lora_name(checkpoint.path)
            if name is None:
                raise ValueError(
                    f"{folder} is not inside a ComfyUI loras folder, so LoRA loaders cannot load its checkpoints; "
                    "move it under models/loras or output/loras, or add it to extra_model_paths.yaml"
                )
            names.append(name)
        steps = [c.step if c.step is not None else -1 for c in checkpoints]
        return names, list(names), steps


class FaceConsistencyCheckpointScoreboard(metaclass=_LoraNameOutputs):
    """Rank checkpoints by their face-similarity scores and pick the best (optionally keep a copy)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "checkpoint_names": ("STRING", {"forceInput": True}),
                "scores": (
                    "FLOAT",
                    {
                        "forceInput": True,
                        "tooltip": "One score (or a list of scores) per checkpoint, "
                        "in the order of the names; NaN where no face was found.",
                    },
                ),
                "copy_best": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "Copy the best checkpoint to {name}-best.safetensors beside it."},
                ),
            },
            "optional": {
                "reference_agreement": (
                    "FLOAT",
                    {
                        "forceInput": True,
                        "tooltip": "The reference photos' own "
                        "agreement (Face Similarity Score's reference_agreement): a checkpoint whose "
                        "mean is above it scores more alike than real photos of the person do.",
                    },
                ),
                "face_change": (
                    "FLOAT",
                    {
                        "forceInput": True,
                        "tooltip": "Face Similarity Score's face_change, "
                        "grouped like the scores (-1 unknown): with it, checkpoints above the agreement "
                        "whose mean face change is below the similarity node's default copy_paste_threshold "
                        f"({DEFAULT_COPY_PASTE_THRESHOLD}) are flagged COPY?.",
                    },
                ),
            },
        }

    INPUT_IS_LIST = True
    OUTPUT_TYPES = ("STRING", "IMAGE", "LORA_NAME", "FLOAT")
    RETURN_NAMES = ("table", "plot", "best_lora_name", "best_score")
    FUNCTION = "rank"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    def rank(
        self,
        checkpoint_names: list[str],
        scores: list[Any],
        copy_best: list[bool],
        reference_agreement: list[float] | None = None,
        face_change: list[Any] | None = None,
    ) -> dict[str, Any]:
        saved_steps, trainer_table = _saved_steps_and_table(checkpoint_names)
        results = group_scores(checkpoint_names, scores, saved_steps)
        best = best_checkpoint(results)
        agreement = float(reference_agreement[0]) if reference_agreement else -1.0
        changes = group_scores(checkpoint_names, _unknown_as_nan(face_change)) if face_change else []
        # -1: the similarity node knew no agreement
        notes = copy_paste_notes(
            results, agreement if agreement >= 0.0 else None, changes, DEFAULT_COPY_PASTE_THRESHOLD
        )
        table = format_table(results, best, notes)
        unchanged = sum(note.startswith(UNCHANGED_NOTE) for note in notes.values())
        if len(notes) > unchanged:
            table += (
                f"\n{len(notes) - unchanged} checkpoint(s) score above the reference photos' own agreement "
                f"{agreement:.3f}: identity no real second photo reaches (see the notes)"
            )
        if unchanged:
            table += (
                f"\n{unchanged} checkpoint(s) return the control's face unchanged: their scores say "
                "nothing about likeness (see the notes)"
            )
        if trainer_table is not None:
            table += f"\n\nthe trainer's table (checkpoints.json):\n{format_checkpoint_table(trainer_table)}"
        if copy_best and copy_best[0]:
            source = comfy_env.full_path(LORAS, best.name)
            if source is None:
                raise ValueError(f"cannot copy {best.name!r}: not found in ComfyUI's loras folders")
            table += f"\ncopied {best.name} -> {copy_as_best(source).name}"
        positions, x_label = chart_positions(results)
        plot = plot_scores(
            [r.name for r in results],
            positions,
            [r.mean for r in results],
            [r.std for r in results],
            results.index(best),
            x_label=x_label,
        )
        return {"ui": {"text": [table]}, "result": (table, rgb_to_image(plot), best.name, best.mean)}


def _saved_steps_and_table(names: list[str]) -> tuple[dict[str, int], CheckpointTable | None]:
    """The step of each named checkpoint as List Checkpoints reads it (the name, else its `ss_steps`), and
    the trainer's checkpoints.json when the checkpoints lie in one run folder that has one."""
    paths = {name: comfy_env.full_path(LORAS, str(name)) for name in dict.fromkeys(names)}
    folders = list(dict.fromkeys(path.parent for path in paths.values() if path is not None))
    by_path = {c.path.resolve(): c for folder in folders for c in list_checkpoints(folder)}
    steps = {}
    for name, path in paths.items():
        checkpoint = by_path.get(path.resolve()) if path is not None else None
        if checkpoint is not None and checkpoint.step is not None:
            steps[name] = checkpoint.step
    return steps, read_table(folders[0]) if len(folders) == 1 else None


def _unknown_as_nan(values: list[Any]) -> list[Any]:
    """face_change lists mark "unknown" with -1; the scoreboard's grouping marks it with NaN."""

    def convert(item: Any) -> Any:
        if isinstance(item, (list, tuple)):
            return [convert(v) for v in item]
        return math.nan if item is None or float(item) < 0 else float(item)

    return [convert(v) for v in values]


NODE_CLASS_MAPPINGS = {
    "FaceConsistencyTrainLaunch": FaceConsistencyTrainLaunch,
    "FaceConsistencyTrainMonitor": FaceConsistencyTrainMonitor,
    "FaceConsistencyTrainStop": FaceConsistencyTrainStop,
    "FaceConsistencyTrainLogs": FaceConsistencyTrainLogs,
    "FaceConsistencyListCheckpoints": FaceConsistencyListCheckpoints,
    "FaceConsistencyCheckpointScoreboard": FaceConsistencyCheckpointScoreboard,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FaceConsistencyTrainLaunch": "Face Consistency: Train LoRA (background)",
    "FaceConsistencyTrainMonitor": "Face Consistency: Training Monitor",
    "FaceConsistencyTrainStop": "Face Consistency: Stop Training",
    "FaceConsistencyTrainLogs": "Face Consistency: Training Log",
    "FaceConsistencyListCheckpoints": "Face Consistency: List Checkpoints",
    "FaceConsistencyCheckpointScoreboard": "Face Consistency: Checkpoint Scoreboard",
}
