"""The training options, defined once: names, types, choices, defaults and help.

`face-consistency train`'s argparse parser (`add_arguments`) and the Train Launch node's inputs
(`node_input`, `to_argv`) are both built from `OPTIONS`, so the two cannot drift apart. Defaults
are musubi-tuner's (the command line); an option the node shows also carries the node's widget,
whose default is the seed guide's. Torch-free: ComfyUI imports it at start.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..common.face_engine import DEFAULTS as FACE_ENGINE_DEFAULTS
from ..common.face_engine import MODELS_ROOT_HELP, PACK_HELP, PROVIDER_HELP, PROVIDERS
from ..common.values import Bounds, ValueCheckError, check_number, check_text
from .checkpoint_choice import DEFAULT_VALIDATION_SIGMAS
from .model_versions import MODEL_VERSIONS

NETWORK_MODULE = "networks.lora_qwen_image"
TIMESTEP_SAMPLING = ("sigma", "uniform", "shift", "qwen_shift")
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "cosmap")
OPTIMIZERS = ("AdamW", "AdamW8bit", "Adafactor")
MIXED_PRECISION = ("no", "fp16", "bf16")
FACE_DECODE_MODES = ("full", "half", "face")
FACE_LOSS_T_WEIGHTINGS = ("none", "linear")  # linear: each sample's 1 - cos weighted by 1 - t
FACE_LOSS_REFERENCES = ("control", "target")  # whose identity the face loss pulls towards
# how the DiT numbers its tokens' rotary positions while training (trainer/positions.py; samples: always ComfyUI's)
ROPE_POSITIONS = ("comfyui", "diffusers")
# off: the samples' schedule is then KSampler euler/simple's, as the pack's example workflows and ComfyUI's
# Qwen-Image-Edit template draw (musubi-tuner's scheduler config has 0.02: SamplerCustom + LTXVScheduler)
DEFAULT_SHIFT_TERMINAL = 0.0
DEFAULT_FACE_LOSS_MAX_T = 0.5
MAX_FACE_LOSS_ROLLOUT_STEPS = 8  # each step is one more forward and backward pass of the DiT
# Ceilings of the counts: far beyond any real run, low enough that nothing downstream overflows.
STEPS_CEILING = 10**9
EPOCHS_CEILING = 10**6


@dataclass(frozen=True)
class NodeWidget:
    """How the launch node shows an option: its default (the seed guide's) and range."""

    default: Any
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | None = None  # the node's order of the option's choices
    tooltip: str | None = None  # what the node's value means, where it differs from the flag's help
    off: Any = None  # the widget value that means "not passed" (outside the option's bounds)


@dataclass(frozen=True)
class Option:
    name: str  # the flag without its dashes, and the TOML key of --config_file
    kind: type  # bool (a switch), int, float or str
    group: str
    help: str = ""
    default: Any = None
    choices: tuple[str, ...] | None = None  # checked with the bounds, listed in the help
    many: bool = False  # takes a list of values (nargs="*")
    path: bool = False  # names a file or folder the run reads or writes
    node: NodeWidget | None = None
    bounds: Bounds | None = None  # every int or float option has them: what the trainer can train with
    case_insensitive: bool = False  # a choice in any case names its canonical spelling

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    def __post_init__(self) -> None:
        if self.kind in (int, float) and self.bounds is None:
            raise TypeError(f"option --{self.name} is a number: declare its bounds")

    def check(self, value: Any) -> None:
        """Raise ValueCheckError naming the flag unless `value` fits: numbers finite and within
        `bounds`, text (each item of a list) of bounded length without NUL, one of the `choices`.
        None: not given."""
        if value is None or self.kind is bool:
            return
        for item in value if self.many else (value,):
            if self.kind is str:
                check_text(str(item), self.flag)
            elif self.bounds is not None:  # always, for a number (__post_init__)
                check_number(item, self.bounds, self.flag)
        if self.choices is not None:
            self.choice(value)

    def choice(self, value: str) -> str:
        """The choice `value` names, in its canonical spelling; ValueCheckError listing the choices."""
        return choose(value, self.choices or (), self.flag, case_insensitive=self.case_insensitive)


def choose(value: str, choices: Sequence[str], flag: str, *, case_insensitive: bool = False) -> str:
    """`value` as one of `choices` (matched ignoring case if asked); ValueCheckError naming the flag."""
    lookup = {c.lower(): c for c in choices} if case_insensitive else {c: c for c in choices}
    key = value.lower() if case_insensitive else value
    if key not in lookup:
        raise ValueCheckError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
    return lookup[key]


def _choices(values: tuple[str, ...]) -> str:
    return f"one of {', '.join(values)}"


OPTIONS: tuple[Option, ...] = (
    # models
    Option("dit", str, "models", "DiT single file, e.g. qwen_image_edit_2509_bf16.safetensors", path=True),
    Option("vae", str, "models", "VAE single file, e.g. qwen_image_vae.safetensors", path=True),
    Option(
        "text_encoder",
        str,
        "models",
        "Qwen2.5-VL single file, e.g. qwen_2.5_vl_7b.safetensors (or _fp8_scaled)",
        path=True,
    ),
    Option(
        "tokenizer",
        str,
        "models",
        "local folder with the Qwen-Image-Edit tokenizer/processor (default: the "
        "`processor` folder of Qwen/Qwen-Image-Edit-2509 from the hub)",
        node=NodeWidget(""),
        path=True,
    ),
    Option(
        "model_version",
        str,
        "models",
        f"the model trained: {', '.join(MODEL_VERSIONS)} (Edit, Edit-2509, "
        "Edit-2511 as musubi-tuner names them; Qwen-Image 2.1 as ComfyUI does)",
        choices=tuple(MODEL_VERSIONS),
        case_insensitive=True,
        node=NodeWidget(
            "edit-2509",
            choices=("edit-2509", "edit-2511", "qwen-image-2.1", "edit"),
            tooltip="The model trained: Qwen-Image-Edit 2509 or 2511 (Qwen2.5-VL, qwen_image_vae), or Qwen-Image "
            "2.1 (qwen_image_2.1_* DiT, Qwen3-VL qwen3vl_8b_* text encoder, qwen_image_2.1_vae_*).",
        ),
    ),
    Option("edit", bool, "models", "same as --model_version edit"),
    Option("edit_plus", bool, "models", "same as --model_version edit-2509"),
    Option("sdpa", bool, "models", "PyTorch SDPA attention (the only backend; accepted)"),
    Option("fp8_base", bool, "models", "store the DiT base weights as float8 (diffusers layerwise casting)"),
    Option(
        "blocks_to_swap",
        int,
        "models",
        "keep N transformer blocks on the CPU, streamed in per layer",
        0,
        bounds=Bounds(0, 1000),
    ),
    # data
    Option("dataset_config", str, "data", "musubi dataset TOML", path=True),
    Option(
        "max_data_loader_n_workers",
        int,
        "data",
        "accepted for compatibility: cached tensors are read in the training process",
        2,
        bounds=Bounds(0, 1024),
    ),
    Option(
        "persistent_data_loader_workers", bool, "data", "accepted for compatibility (see --max_data_loader_n_workers)"
    ),
    # training
    Option(
        "mixed_precision",
        str,
        "training",
        f"{_choices(MIXED_PRECISION)} (default: bf16 where the GPU supports it, as musubi-tuner trains Qwen; else no)",
        choices=MIXED_PRECISION,
        node=NodeWidget("bf16", choices=("bf16", "fp16", "no")),
    ),
    Option(
        "timestep_sampling",
        str,
        "training",
        _choices(TIMESTEP_SAMPLING),
        "sigma",
        TIMESTEP_SAMPLING,
        node=NodeWidget("shift", choices=("shift", "qwen_shift", "sigma", "uniform")),
    ),
    Option(
        "discrete_flow_shift",
        float,
        "training",
        "shift for sigma/shift sampling and samples",
        1.0,
        node=NodeWidget(2.2, 0.1, 20.0, 0.1),
        bounds=Bounds(0, 100, low_open=True),
    ),
    Option(
        "rope_positions",
        str,
        "training",
        f"{_choices(ROPE_POSITIONS)}: the tokens' rotary positions while "
        "training, numbered as ComfyUI's Qwen-Image model or as diffusers' (they differ for a side of 16 mod 32 px "
        "and a control larger than its target; docs/training.md)",
        "comfyui",
        ROPE_POSITIONS,
    ),
    Option(
        "sigmoid_scale",
        float,
        "training",
        "scale of the normal before the sigmoid (shift sampling)",
        1.0,
        bounds=Bounds(0, 100, low_open=True),
    ),
    Option("weighting_scheme", str, "training", _choices(WEIGHTING_SCHEMES), "none", WEIGHTING_SCHEMES),
    Option(
        "optimizer_type",
        str,
        "training",
        f"{_choices(OPTIMIZERS)} (AdamW8bit needs bitsandbytes)",
        "AdamW",
        OPTIMIZERS,
        node=NodeWidget("AdamW8bit", choices=("AdamW8bit", "AdamW", "Adafactor")),
        case_insensitive=True,
    ),
    Option("optimizer_args", str, "training", "optimizer keyword args as key=value", many=True),
    Option(
        "learning_rate",
        float,
        "training",
        "the optimizer's learning rate",
        2e-6,
        node=NodeWidget(5e-5, 1e-7, 1e-2, 1e-6),
        bounds=Bounds(0, math.inf, low_open=True),
    ),  # any finite rate: a diverging run is stopped and said
    Option("lr_scheduler", str, "training", "diffusers scheduler name (constant, cosine, linear, ...)", "constant"),
    Option(
        "lr_warmup_steps", int, "training", "steps over which the rate rises from 0", 0, bounds=Bounds(0, STEPS_CEILING)
    ),
    Option("lr_scheduler_num_cycles", int, "training", "restarts of cosine_with_restarts", 1, bounds=Bounds(1, 10**6)),
    Option("lr_scheduler_power", float, "training", "power of the polynomial scheduler", 1.0, bounds=Bounds(0, 100)),
    Option("max_grad_norm", float, "training", "gradient clipping (0 disables)", 1.0, bounds=Bounds(0, 1e6)),
    Option(
        "gradient_checkpointing",
        bool,
        "training",
        "recompute each block in the backward pass (less memory)",
        node=NodeWidget(True),
    ),
    Option(
        "gradient_accumulation_steps",
        int,
        "training",
        "micro-batches summed into one optimizer step",
        1,
        bounds=Bounds(1, 10**4),
    ),
    Option(
        "max_train_steps",
        int,
        "training",
        "optimizer steps to train (--max_train_epochs overrides it)",
        1600,
        bounds=Bounds(1, STEPS_CEILING),
        node=NodeWidget(0, 0, 10**7, tooltip="0: train by epochs.", off=0),
    ),
    Option(
        "max_train_epochs",
        int,
        "training",
        "overrides --max_train_steps",
        node=NodeWidget(100, 1, 100000),
        bounds=Bounds(1, EPOCHS_CEILING),
    ),
    Option(
        "seed",
        int,
        "training",
        "random seed (default: random, recorded in the LoRA metadata)",
        node=NodeWidget(42, 0, 2**31 - 1),
        bounds=Bounds(0, 2**32 - 1),
    ),  # numpy's seeds
    # network
    Option("network_module", str, "network", "accepted for compatibility", NETWORK_MODULE),
    Option("network_dim", int, "network", "LoRA rank", 4, node=NodeWidget(16, 1, 256), bounds=Bounds(1, 4096)),
    Option(
        "network_alpha",
        float,
        "network",
        "LoRA alpha (scale alpha/dim)",
        1.0,
        node=NodeWidget(16.0, 0.1, 256.0),
        bounds=Bounds(0, 4096, low_open=True),
    ),
    Option("network_weights", str, "network", "LoRA file (this trainer's or musubi's) to start from", path=True),
    Option(
        "network_args",
        str,
        "network",
        "include_patterns=[...] exclude_patterns=[...] (regex on module paths)",
        many=True,
    ),
    # output
    Option(
        "output_dir", str, "output", "the run's folder: checkpoints, sample/, status.json, metrics.jsonl", path=True
    ),
    Option("output_name", str, "output", "the run's name, the stem of its checkpoint files", "lora", path=True),
    Option(
        "save_every_n_epochs",
        int,
        "output",
        "save a checkpoint every N epochs",
        node=NodeWidget(10, 1, 100000),
        bounds=Bounds(1, EPOCHS_CEILING),
    ),
    Option("save_every_n_steps", int, "output", "save a checkpoint every N steps", bounds=Bounds(1, STEPS_CEILING)),
    Option("save_state", bool, "output", "save resumable state beside each checkpoint"),
    Option("resume", str, "output", "state folder to continue from (continues at its step and epoch)", path=True),
    Option("logging_dir", str, "output", "TensorBoard log folder", path=True),
    Option("log_tracker_name", str, "output", "TensorBoard run name"),
    Option("config_file", str, "output", "TOML file with any of these flags as keys", path=True),
    # sampling
    Option("sample_prompts", str, "sampling", "musubi prompt file (--w --h --s --d --fs --l --n --ci)", path=True),
    Option(
        "sample_every_n_steps",
        int,
        "sampling",
        "draw the sample prompts every N steps",
        bounds=Bounds(1, STEPS_CEILING),
    ),
    Option(
        "sample_every_n_epochs",
        int,
        "sampling",
        "draw the sample prompts every N epochs",
        node=NodeWidget(
            10,
            0,
            100000,
            off=0,
            tooltip="Sample every N epochs (0: none, unless extra_args sets --sample_every_n_steps).",
        ),
        bounds=Bounds(1, EPOCHS_CEILING),
    ),
    Option("sample_at_first", bool, "sampling", "draw the sample prompts before the first step"),
    Option(
        "sample_shift_terminal",
        float,
        "sampling",
        "stretch the sample sigmas so the last is this (0: off, KSampler euler/simple's schedule; musubi-tuner's "
        "0.02 is ComfyUI's SamplerCustom + LTXVScheduler)",
        DEFAULT_SHIFT_TERMINAL,
        bounds=Bounds(0, 1, high_open=True),
    ),
    # face identity
    Option(
        "enable_face_loss", bool, "face", "face-similarity metrics of the x0 estimates and the samples during training"
    ),
    Option(
        "use_face_as_loss",
        bool,
        "face",
        "add the face-identity loss (implies the metrics); experimental: in the "
        'benchmark a trade-off, likeness for accuracy outside the face (docs/face-loss.md, "Evidence, tier 1")',
        node=NodeWidget(
            False,
            tooltip="EXPERIMENTAL: add the face-identity loss to training (--use_face_as_loss). "
            "In the benchmark it buys likeness at a cost in accuracy outside the face, a trade-off, not a "
            "proven help (docs/face-loss.md); the metrics and checkpoint selection are the recommended use.",
        ),
    ),
    Option(
        "face_loss_weight",
        float,
        "face",
        "weight of 1 - cos added to the loss",
        0.1,
        node=NodeWidget(
            0.1,
            0.0,
            10.0,
            0.01,
            tooltip="Weight of 1 - cos in the experimental face loss (used only with use_face_as_loss).",
        ),
        bounds=Bounds(0, 100),
    ),
    # the face engine's settings (common/face_engine.py: one name, default and set of choices each)
    Option(
        "face_model_name",
        str,
        "face",
        PACK_HELP,
        FACE_ENGINE_DEFAULTS.pack,
        node=NodeWidget(FACE_ENGINE_DEFAULTS.pack),
    ),
    Option(
        "face_device",
        str,
        "face",
        PROVIDER_HELP,
        FACE_ENGINE_DEFAULTS.provider,
        PROVIDERS,
        node=NodeWidget(FACE_ENGINE_DEFAULTS.provider),
    ),
    Option(
        "face_det_size",
        int,
        "face",
        "face detector input size",
        640,
        node=NodeWidget(640, 128, 2048, 32),
        bounds=Bounds(64, 2048),
    ),
    Option(
        "face_eval_frequency",
        int,
        "face",
        "measure x0-estimate similarity every N steps",
        100,
        node=NodeWidget(100, 1, 100000),
        bounds=Bounds(1, STEPS_CEILING),
    ),
    Option("face_models_root", str, "face", f"{MODELS_ROOT_HELP}; several are searched in order", path=True, many=True),
    Option(
        "offline", bool, "face", "never download a missing standard face pack (by default it is fetched on first use)"
    ),
    Option(
        "face_loss_max_t",
        float,
        "face",
        "apply the loss only where t <= this (1 for every t; 0.5 keeps the sharper estimates)",
        DEFAULT_FACE_LOSS_MAX_T,
        bounds=Bounds(0, 1, low_open=True),
    ),
    Option(
        "face_loss_t_weighting",
        str,
        "face",
        f"{_choices(FACE_LOSS_T_WEIGHTINGS)}: linear weighs each sample's term by 1 - t",
        "none",
        FACE_LOSS_T_WEIGHTINGS,
    ),
    Option("face_loss_every", int, "face", "compute the loss every N steps", 1, bounds=Bounds(1, STEPS_CEILING)),
    Option(
        "face_eval_model",
        str,
        "face",
        "a second, held-out pack reported beside the training one; dlib: the dlib "
        'judge (pip install "comfyui-face-consistency[judge]")',
    ),
    Option(
        "face_decode",
        str,
        "face",
        "decode for the face term: face (only the face region, default), half (the "
        "whole image at half resolution) or full",
        "face",
        FACE_DECODE_MODES,
    ),
    Option(
        "face_loss_reference",
        str,
        "face",
        f"{_choices(FACE_LOSS_REFERENCES)}: the identity the loss pulls "
        "towards, the control images' (the person the edit starts from) or the training target's",
        "control",
        FACE_LOSS_REFERENCES,
        node=NodeWidget("control"),
    ),
    Option(
        "face_loss_contrastive_weight",
        float,
        "face",
        "weight of an InfoNCE term that also pushes the face away "
        "from other people's (WithAnyone's; needs --face_loss_negatives; 0: off)",
        0.0,
        node=NodeWidget(0.0, 0.0, 10.0, 0.01),
        bounds=Bounds(0, 100),
    ),
    Option(
        "face_loss_temperature",
        float,
        "face",
        "temperature of the InfoNCE term",
        0.07,
        bounds=Bounds(0, 100, low_open=True),
    ),
    Option(
        "face_loss_negatives",
        str,
        "face",
        "folder of photos of other people (one face each), the InfoNCE term's negatives",
        path=True,
        node=NodeWidget(""),
    ),
    Option(
        "face_loss_rollout_steps",
        int,
        "face",
        "score the face of x0 reached by N Euler steps of the model from "
        "x_t (gradients through every step; 1: the one-step estimate x_t - t v)",
        1,
        node=NodeWidget(1, 1, MAX_FACE_LOSS_ROLLOUT_STEPS),
        bounds=Bounds(1, MAX_FACE_LOSS_ROLLOUT_STEPS),
    ),
    # validation and the choice of a checkpoint (checkpoints.json)
    Option(
        "validation_dataset_config",
        str,
        "validation",
        "musubi dataset TOML of held-out items (never trained on) "
        "for the validation loss; a [[datasets]] entry of --dataset_config with validation = true is held out too",
        path=True,
    ),
    Option(
        "validation_split",
        float,
        "validation",
        "hold out this fraction of the training items (at least one, "
        "chosen by --validation_seed) for the validation loss when no validation items are given (0: none)",
        0.0,
        bounds=Bounds(0, 0.5),
    ),
    Option(
        "validation_seed",
        int,
        "validation",
        "seed of the held-out split and of the validation loss's fixed noise",
        0,
        bounds=Bounds(0, 2**32 - 1),
    ),
    Option(
        "validation_sigmas",
        float,
        "validation",
        "sigmas (flow times) of the validation loss (default: "
        f"{' '.join(f'{s:g}' for s in DEFAULT_VALIDATION_SIGMAS)})",
        DEFAULT_VALIDATION_SIGMAS,
        many=True,
        bounds=Bounds(0, 1),
    ),
    Option(
        "validate_every_n_steps",
        int,
        "validation",
        "validation loss every N steps as well as at every checkpoint",
        bounds=Bounds(1, STEPS_CEILING),
    ),
    Option(
        "likeness_references",
        str,
        "validation",
        "folder of photos of the person, neither controls nor training "
        "targets: every checkpoint's samples are scored against them (held-out likeness, checkpoints.json)",
        path=True,
    ),
)
BY_NAME = {option.name: option for option in OPTIONS}


def contrastive_problem(weight: float, negatives: str | None) -> str | None:
    """Why the InfoNCE term's weight and negatives folder do not go together (None: they do)."""
    if weight > 0 and not negatives:
        return (
            "--face_loss_contrastive_weight needs --face_loss_negatives: a folder of photos of other people, "
            "the faces the loss pushes away from"
        )
    if negatives and weight == 0:
        return (
            "--face_loss_negatives is used only by the contrastive term: set --face_loss_contrastive_weight "
            "(e.g. 0.1) or leave the folder out"
        )
    return None


GROUP_TITLES = {
    "models": "models",
    "data": "data",
    "training": "training",
    "network": "network",
    "output": "output",
    "sampling": "sampling",
    "face": "face identity (docs/face-loss.md)",
    "validation": "validation and the checkpoint to keep (docs/training.md)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option as a flag, in its group (the parser's ChoicesAndDefaultsFormatter ends each help with
    its default); the choices shown in the usage. They are checked with the bounds (`check_values`), not by
    argparse: some match in any case, and the messages name the flag."""
    groups = {key: parser.add_argument_group(title) for key, title in GROUP_TITLES.items()}
    for option in OPTIONS:
        group = groups[option.group]
        if option.kind is bool:
            group.add_argument(option.flag, action="store_true", help=option.help or None)
        else:
            numeric: dict[str, Any] = {"type": option.kind} if option.kind in (int, float) else {}
            group.add_argument(
                option.flag,
                default=list(option.default or ()) if option.many else option.default,
                nargs="*" if option.many else None,
                metavar="{" + ",".join(option.choices) + "}" if option.choices else None,
                help=option.help.replace("%", "%%") or None,
                **numeric,
            )


_NODE_TYPES = {bool: "BOOLEAN", int: "INT", float: "FLOAT", str: "STRING"}


def node_input(name: str) -> tuple[Any, ...]:
    """The launch node's input for option `name`, as ComfyUI's INPUT_TYPES wants it."""
    option = BY_NAME[name]
    widget = option.node
    if widget is None:
        raise KeyError(f"--{name} is not one of the launch node's inputs")
    settings: dict[str, Any] = {"default": widget.default}
    settings.update(
        {
            key: value
            for key, value in (("min", widget.min), ("max", widget.max), ("step", widget.step))
            if value is not None
        }
    )
    if widget.tooltip or option.help:
        settings["tooltip"] = widget.tooltip or option.help
    choices = widget.choices or option.choices
    if choices:
        return list(choices), settings
    return _NODE_TYPES[option.kind], settings


def check_values(values: Any) -> None:
    """Check every option's value in `values` (parsed arguments: one attribute per option) against its
    declaration; raises ValueCheckError naming the first flag out of bounds."""
    for option in OPTIONS:
        option.check(getattr(values, option.name, None))


def check_node_values(values: dict[str, Any]) -> None:
    """The launch node's values (by option name), checked as the trainer will check them, before the
    node writes anything; a widget's `off` value (not passed) is not checked."""
    for name, value in values.items():
        option = BY_NAME.get(name)  # the node's own inputs (dataset, output_name, ...) are no options
        if option is not None and (option.node is None or option.node.off is None or value != option.node.off):
            option.check(value)


def to_argv(name: str, value: Any) -> list[str]:
    """The command-line arguments that give option `name` the `value` (a switch: present or not);
    ValueCheckError if the value is not one the trainer accepts."""
    option = BY_NAME[name]
    option.check(value)
    if option.kind is bool:
        return [option.flag] if value else []
    if option.many:
        return [option.flag, *map(str, value)]
    return [option.flag, f"{value:g}" if option.kind is float else str(value)]
