"""A launch from ComfyUI, in the trainer's terms: what it asks for, its checks, its folder and its command line.

The launch node turns its inputs into a `LaunchRequest` (ComfyUI's file names become paths, confined there);
`training_jobs.job_control` checks that the folder is free, makes it and starts the trainer with `argv()`.
Torch-free: ComfyUI imports it at start.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.face_engine import FaceEngineSettings
from ..common.files import atomic_write_text
from . import options

SAMPLE_PROMPTS_FILE = "sample_prompts.txt"

# Flags the launch sets itself: where the run reads and writes. Its extra arguments may not move them.
LAUNCH_MANAGED_FLAGS = tuple(option.flag for option in options.OPTIONS if option.path)

# What every launch trains with: SDPA, no loss weighting, the LoRA module (the model: its `model_version`).
FIXED_ARGS = (
    "--sdpa",
    "--weighting_scheme",
    "none",
    "--network_module",
    options.NETWORK_MODULE,
    "--max_data_loader_n_workers",
    "2",
    "--persistent_data_loader_workers",
)
# Settings passed only with the face metrics or the face loss on, and the face loss's variants (only with the loss).
FACE_SETTINGS = ("face_loss_weight", "face_eval_frequency")
# The face engine as the trainer sets it up by default: it detects at one size, a number of pixels, not `auto`.
TRAINER_FACE_ENGINE = FaceEngineSettings(det_size=options.BY_NAME["face_det_size"].default)
FACE_LOSS_VARIANTS = (
    "face_loss_reference",
    "face_loss_rollout_steps",
    "face_loss_contrastive_weight",
    "face_loss_negatives",
)


@dataclass(frozen=True)
class LaunchRequest:
    """One training run asked for from ComfyUI: every path already resolved (and confined by the asker).

    `settings` are trainer options by name (`training_contract/options.py`) with the launch node's values:
    a widget's `off` value, an empty text and None pass no flag.
    """

    output_dir: Path  # the run's folder: checkpoints, samples, status, log
    output_name: str
    dit: Path
    vae: Path
    text_encoder: Path
    dataset_config: Path | None = None  # set once the folder exists (a dataset folder's TOML is written there)
    validation_dataset_config: Path | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    enable_face_loss: bool = False
    face_engine: FaceEngineSettings = TRAINER_FACE_ENGINE  # its det_thresh is the trainer's own
    sample_prompts: str = ""
    extra_args: str = ""  # more trainer flags, split like a shell would (never run by one)

    @property
    def face_on(self) -> bool:
        return self.enable_face_loss or self.face_loss_on

    @property
    def face_loss_on(self) -> bool:
        return bool(self.settings.get("use_face_as_loss"))

    @property
    def sample_prompts_file(self) -> Path:
        return self.output_dir / SAMPLE_PROMPTS_FILE

    def extra_argv(self) -> list[str]:
        try:
            extra = shlex.split(self.extra_args)
        except ValueError as exc:
            raise ValueError(f"extra_args cannot be split into arguments: {exc}") from exc
        managed = sorted({token.split("=", 1)[0] for token in extra} & set(LAUNCH_MANAGED_FLAGS))
        if managed:
            raise ValueError(
                f"extra_args may not set {', '.join(managed)}: the launch node chooses the run's files and folder "
                "(use its inputs, or run `face-consistency train` yourself for other paths)"
            )
        return extra

    def check(self) -> None:
        """Everything the trainer would refuse in the request's own values, before anything is written."""
        references = self.settings.get("likeness_references")
        if references:
            if not Path(references).is_dir():
                raise ValueError(f"likeness_references {str(references)!r} is not a folder of photos")
            if not self.sample_prompts.strip():
                raise ValueError("likeness_references scores each checkpoint's samples: give sample_prompts too")
        if self.face_loss_on:
            problem = options.contrastive_problem(
                self._setting("face_loss_contrastive_weight"), self._setting("face_loss_negatives")
            )
            if problem:
                raise ValueError(problem.replace("--", ""))
        options.check_node_values({name: value for name, value in self.settings.items() if value is not None})
        self._face_engine_argv()
        self.extra_argv()

    def _setting(self, name: str) -> Any:
        """The request's value of setting `name`, else the node's default (as a saved workflow without it has)."""
        widget = options.BY_NAME[name].node
        return self.settings.get(name, widget.default if widget else None)

    def argv(self) -> list[str]:
        """The trainer's arguments (after `train`) that run this request."""
        if self.dataset_config is None:
            raise ValueError("the launch request has no dataset_config: its folder's dataset TOML comes first")
        args = ["--dit", str(self.dit), "--vae", str(self.vae), "--text_encoder", str(self.text_encoder)]
        args += self._flag("model_version", self._setting("model_version"))  # a saved workflow without it: 2509
        args += ["--dataset_config", str(self.dataset_config), *FIXED_ARGS]
        args += ["--output_dir", str(self.output_dir), "--output_name", self.output_name]
        by_steps = bool(self._setting("max_train_steps"))  # the trainer derives the steps from epochs when given
        face_settings = set(FACE_SETTINGS) | set(FACE_LOSS_VARIANTS) | {"use_face_as_loss"}
        for name, value in self.settings.items():
            if name in face_settings or name == "model_version" or (name == "max_train_epochs" and by_steps):
                continue
            if name == "sample_every_n_epochs" and not self.sample_prompts.strip():
                continue
            args += self._flag(name, value)
        if self.validation_dataset_config is not None:
            args += options.to_argv("validation_dataset_config", str(self.validation_dataset_config))
        if self.face_on:
            args += ["--enable_face_loss", *(["--use_face_as_loss"] if self.face_loss_on else [])]
            for name in FACE_SETTINGS:
                args += self._flag(name, self._setting(name))
            args += self._face_engine_argv()
        if self.face_loss_on:
            for name in FACE_LOSS_VARIANTS:
                value = self._setting(name)
                if value != options.BY_NAME[name].default:
                    args += self._flag(name, value)
        if self.sample_prompts.strip():
            args += options.to_argv("sample_prompts", str(self.sample_prompts_file))
        return args + self.extra_argv()

    def _face_engine_argv(self) -> list[str]:
        """The face engine's settings as the trainer spells them (common/face_engine.py)."""
        engine = self.face_engine
        args = options.to_argv("face_model_name", engine.pack.strip())
        args += options.to_argv("face_device", engine.provider) + options.to_argv("face_det_size", engine.det_size)
        if engine.models_roots:
            args += options.to_argv("face_models_root", [str(root) for root in engine.models_roots])
        return args + options.to_argv("offline", not engine.allow_download)

    @staticmethod
    def _flag(name: str, value: Any) -> list[str]:
        """`to_argv` for a setting, nothing for a value that means "not passed" (None, empty, the widget's off)."""
        widget = options.BY_NAME[name].node
        if value is None or value == "" or (widget is not None and widget.off is not None and value == widget.off):
            return []
        return options.to_argv(name, value.strip() if isinstance(value, str) else value)

    def write_inputs(self) -> None:
        """Write the files the run reads from its folder (the sample prompts); the folder exists by then."""
        if self.sample_prompts.strip():
            atomic_write_text(self.sample_prompts_file, self.sample_prompts.strip() + "\n")
