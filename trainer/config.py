"""`TrainingConfig`: one training job's settings, typed and frozen, as `cli.validate_args` makes them.

One field per option of `training_contract/options.py` (same name, the option's type; `None` where
the flag is optional and was not given), with the values the checks settle computed once: the
model version (from `--model_version` or its alias flags), the mixed precision (from the device
where not given), the canonical spelling of every choice, the seed (drawn where not given), the
validation sigmas (sorted, high to low), and the values read from files: the dataset with its
held-out items, the sample prompts, the likeness references, the optimizer's keyword arguments.
`tests/trainer/test_trainer_config.py` holds the fields to the options.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.face_engine import FaceEngineSettings
from ..musubi_formats.dataset import DatasetGroup
from .sampling import SampleSettings


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    # models
    dit: str
    vae: str
    text_encoder: str
    tokenizer: str | None
    model_version: str
    edit: bool
    edit_plus: bool
    sdpa: bool
    fp8_base: bool
    blocks_to_swap: int
    # data
    dataset_config: str
    max_data_loader_n_workers: int
    persistent_data_loader_workers: bool
    # training
    mixed_precision: str
    timestep_sampling: str
    discrete_flow_shift: float
    rope_positions: str
    sigmoid_scale: float
    weighting_scheme: str
    optimizer_type: str
    optimizer_args: tuple[str, ...]
    learning_rate: float
    lr_scheduler: str
    lr_warmup_steps: int
    lr_scheduler_num_cycles: int
    lr_scheduler_power: float
    max_grad_norm: float
    gradient_checkpointing: bool
    gradient_accumulation_steps: int
    max_train_steps: int  # as given; with --max_train_epochs the run counts its steps from the epochs
    max_train_epochs: int | None
    seed: int
    # network
    network_module: str
    network_dim: int
    network_alpha: float
    network_weights: str | None
    network_args: tuple[str, ...]
    # output
    output_dir: str
    output_name: str
    save_every_n_epochs: int | None
    save_every_n_steps: int | None
    save_state: bool
    resume: str | None
    logging_dir: str | None
    log_tracker_name: str | None
    config_file: str | None
    # sampling
    sample_prompts: str | None
    sample_every_n_steps: int | None
    sample_every_n_epochs: int | None
    sample_at_first: bool
    sample_shift_terminal: float
    # face identity
    enable_face_loss: bool  # also on with --use_face_as_loss
    use_face_as_loss: bool
    face_loss_weight: float
    face_model_name: str
    face_device: str
    face_det_size: int
    face_eval_frequency: int
    face_models_root: tuple[str, ...]
    offline: bool
    face_loss_max_t: float
    face_loss_t_weighting: str
    face_loss_every: int
    face_eval_model: str | None
    face_decode: str
    face_loss_reference: str
    face_loss_contrastive_weight: float
    face_loss_temperature: float
    face_loss_negatives: str | None
    face_loss_rollout_steps: int
    # validation
    validation_dataset_config: str | None
    validation_split: float
    validation_seed: int
    validation_sigmas: tuple[float, ...]
    validate_every_n_steps: int | None
    likeness_references: str | None
    # read from the files the options name
    dataset_group: DatasetGroup  # --dataset_config with its held-out items (validation)
    sample_settings: tuple[SampleSettings, ...]  # the prompts of --sample_prompts
    likeness_reference_paths: tuple[Path, ...]  # the photos of --likeness_references
    optimizer_kwargs: Mapping[str, Any]  # --optimizer_args as Python values

    def face_engine(self, pack: str | None = None) -> FaceEngineSettings:
        """The face engine these flags load: `pack` (else `--face_model_name`) from `--face_models_root`,
        on `--face_device`, detecting at `--face_det_size`, downloading a missing standard pack unless offline."""
        return FaceEngineSettings(
            pack=pack or self.face_model_name,
            models_roots=tuple(Path(root) for root in self.face_models_root),
            provider=self.face_device,
            det_size=self.face_det_size,
            allow_download=not self.offline,
        )


DERIVED_FIELDS = ("dataset_group", "sample_settings", "likeness_reference_paths", "optimizer_kwargs")
