"""`face-consistency train`: musubi-tuner's Qwen-Image-Edit LoRA flags, validated before any model loads.

Also `python -m face_consistency.trainer ...` and `accelerate launch -m face_consistency.trainer ...`.
`--config_file x.toml` supplies any flag as a TOML key (top level or in sections); flags given on
the command line win. Exit codes: 0 completed or stopped, 1 failed while training, 2 bad
arguments/configuration (reported in status.json too when --output_dir is known).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import logging
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.optimization import SchedulerType

from ..common.cli_help import ChoicesAndDefaultsFormatter
from ..common.files import TextFileError, read_text_file, tomllib
from ..common.values import ValueCheckError
from ..faceid.images import list_images
from ..musubi_formats.dataset import (
    DatasetConfigError,
    DatasetGroup,
    check_held_out,
    load_dataset_config,
    split_validation,
)
from ..musubi_formats.names import checkpoint_files, output_name_problem
from ..training_contract import libraries
from ..training_contract.checkpoint_choice import DEFAULT_VALIDATION_SIGMAS
from ..training_contract.model_versions import ALIAS_FLAGS, MODEL_VERSIONS, QWEN_IMAGE_21
from ..training_contract.options import BY_NAME as OPTIONS_BY_NAME
from ..training_contract.options import (
    NETWORK_MODULE,
    OPTIONS,
    Option,
    add_arguments,
    check_values,
    choose,
    contrastive_problem,
)
from ..training_contract.protocol import JobState, OutputFolderBusyError, hold_output_folder, write_status
from . import qwen_image21
from .checkpoint_eval import SampleEvidence, build_sample_evidence
from .config import TrainingConfig
from .hooks import TrainingHook
from .job_status import CheckpointWriteError, TrainingDivergedError
from .lora import NetworkArgsError, lora_file_ranks, parse_network_args
from .models import MAX_PROMPT_TOKENS, ModelFileError, check_dit_version, load_processor, read_header
from .qwen_image21_loading import check_dit_family, check_text_encoder_family, check_vae_family
from .sampling import PromptFileError, load_prompt_file
from .state import StateFolderError, check_state_folder, state_lora_rank
from .train import run_training

log = logging.getLogger("face_consistency.trainer")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
ACCEPTED_NETWORK_MODULES = (NETWORK_MODULE, "networks.lora")
# musubi flags this trainer does not implement, with what to use instead.
UNSUPPORTED_FLAGS = {
    "--fp8_scaled": "use --fp8_base (float8 storage of the base weights)",
    "--fp8_vl": "the text encoder runs only while caching; load it in bf16",
    "--xformers": "use --sdpa (PyTorch scaled-dot-product attention)",
    "--flash_attn": "use --sdpa (PyTorch picks flash attention kernels itself)",
    "--sage_attn": "use --sdpa",
    "--flash3": "use --sdpa",
}


class ConfigError(ValueError):
    """Arguments or configuration that cannot train, found before any model loads."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="face-consistency train",
        description="Train a Qwen-Image-Edit LoRA (musubi-tuner compatible flags, dataset TOML, outputs).",
        formatter_class=ChoicesAndDefaultsFormatter,
        allow_abbrev=False,
    )
    add_arguments(parser)
    return parser


def _flatten(table: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value))
        else:
            flat[key] = value
    return flat


def _config_type_error(option: Option, value: Any) -> str | None:
    """What is wrong with a --config_file value for `option`, strictly (TOML has types; a string is
    no boolean), or None when it fits."""

    def fits(item: Any) -> bool:
        if isinstance(item, bool):
            return False
        if option.kind is int:
            return isinstance(item, int)
        if option.kind is float:
            return isinstance(item, (int, float))
        return isinstance(item, str)

    kind = {int: "an integer", float: "a number"}.get(option.kind, "a string")
    if option.kind is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if option.many:
        if isinstance(value, list) and all(fits(item) for item in value):
            return None
        example = '["key=value"]' if option.kind is str else "[1.0, 0.5]"
        return f"must be a list of {kind.split(' ', 1)[1]}s, e.g. {example}, got {value!r}"
    return None if fits(value) else f"must be {kind}, got {value!r}"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse flags (and --config_file); unknown flags are a ConfigError."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(list(argv))
    if unknown:
        described = [
            f"{u} ({UNSUPPORTED_FLAGS[u.split('=')[0]]})" if u.split("=")[0] in UNSUPPORTED_FLAGS else u
            for u in unknown
        ]
        raise ConfigError(f"unknown or unsupported argument(s): {', '.join(described)}")
    _check_values(args)  # the command line's, --config_file among them, before that file is read
    if args.config_file:
        path = Path(args.config_file)
        try:
            config = _flatten(tomllib.loads(read_text_file(path, "--config_file")))
        except FileNotFoundError:
            raise ConfigError(f"--config_file {path} not found") from None
        except TextFileError as exc:
            raise ConfigError(str(exc)) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"--config_file {path} is not valid TOML: {exc}") from None
        unknown_keys = sorted(set(config) - set(OPTIONS_BY_NAME))
        if unknown_keys:
            raise ConfigError(f"--config_file {path}: unknown key(s) {', '.join(unknown_keys)}")
        for key, value in config.items():
            problem = _config_type_error(OPTIONS_BY_NAME[key], value)
            if problem:
                raise ConfigError(f"--config_file {path}: {key} {problem}")
        parser.set_defaults(**config)
        args = parser.parse_args(list(argv))
        _check_values(args)
    return args


def _check_values(args: argparse.Namespace) -> None:
    """Every number within its declared bounds, every text bounded and NUL-free (options.py)."""
    try:
        check_values(args)
    except ValueCheckError as exc:
        raise ConfigError(str(exc)) from None


def _check_contrastive(args: argparse.Namespace) -> None:
    """The InfoNCE term's weight and negatives folder agree (their ranges are the options' bounds)."""
    problem = contrastive_problem(args.face_loss_contrastive_weight, args.face_loss_negatives)
    if problem:
        raise ConfigError(problem)
    if args.face_loss_negatives and not Path(args.face_loss_negatives).is_dir():
        raise ConfigError(f"--face_loss_negatives {args.face_loss_negatives}: folder not found")


def _optimizer_kwargs(values: list[str]) -> dict[str, Any]:
    kwargs = {}
    for entry in values:
        key, sep, raw = entry.partition("=")
        if not sep:
            raise ConfigError(f"--optimizer_args entry {entry!r} is not key=value")
        try:
            kwargs[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            raise ConfigError(f"--optimizer_args {key}: {raw!r} is not a Python literal") from None
    return kwargs


def default_mixed_precision() -> str:
    """bf16 on a CUDA device with bf16 support (Ampere or newer), else no (fp32): CPUs train fp32."""
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _model_version(args: argparse.Namespace) -> str:
    """--model_version, or the version its alias flags (--edit, --edit_plus) name."""
    chosen = {f"--{flag}": version for flag, version in ALIAS_FLAGS.items() if getattr(args, flag)}
    if args.model_version is not None:
        chosen[f"--model_version {args.model_version}"] = OPTIONS_BY_NAME["model_version"].choice(args.model_version)
    if not chosen:
        raise ConfigError(
            "this trainer trains Qwen-Image-Edit: pass --model_version edit-2509 (or edit-2511, edit; "
            "--edit_plus and --edit are musubi's older spellings)"
        )
    if len(set(chosen.values())) > 1:
        raise ConfigError(f"{' and '.join(chosen)} conflict: pass one --model_version ({', '.join(MODEL_VERSIONS)})")
    return next(iter(chosen.values()))


def validate_args(args: argparse.Namespace) -> TrainingConfig:
    """Check everything checkable without loading a model; returns the job's configuration, with the
    values the checks settle (the parsed dataset and sample prompts among them)."""
    missing = [
        f"--{name}"
        for name in ("dit", "vae", "text_encoder", "dataset_config", "output_dir")
        if not getattr(args, name)
    ]
    if missing:
        raise ConfigError(f"missing required argument(s): {', '.join(missing)}")
    name_problem = output_name_problem(args.output_name)
    if name_problem:  # the run writes only inside --output_dir
        raise ConfigError(f"--output_name {args.output_name!r} {name_problem}; give a plain name such as face_lora")
    model_version = _model_version(args)
    version = MODEL_VERSIONS[model_version]
    too_old = libraries.too_old_for(model_version)
    if too_old:
        raise ConfigError(too_old)
    for flag in ("dit", "vae", "text_encoder", "dataset_config"):
        if not Path(getattr(args, flag)).is_file():
            raise ConfigError(f"--{flag} {getattr(args, flag)}: file not found")
    try:
        header = read_header(args.dit, "DiT (--dit)")
        check_dit_family(header, version.family)
        check_dit_version(header, version.zero_cond_t)
        check_text_encoder_family(read_header(args.text_encoder, "text encoder (--text_encoder)"), version.family)
        check_vae_family(read_header(args.vae, "VAE (--vae)"), version.family)
    except ModelFileError as exc:
        raise ConfigError(str(exc)) from None
    _check_output_dir(Path(args.output_dir), args.output_name, resuming=bool(args.resume))
    if args.network_weights and args.resume:
        raise ConfigError("--network_weights and --resume conflict: a state folder already holds the LoRA weights")
    if args.network_weights:
        _check_network_weights(Path(args.network_weights), args.network_dim)
    if args.tokenizer and not Path(args.tokenizer).is_dir():
        raise ConfigError(f"--tokenizer {args.tokenizer}: folder not found")
    try:  # the choices' canonical spellings (parse_args has checked them)
        chosen = {
            option.name: option.choice(getattr(args, option.name))
            for option in OPTIONS
            if option.choices and getattr(args, option.name) is not None
        }
        chosen["mixed_precision"] = OPTIONS_BY_NAME["mixed_precision"].choice(
            args.mixed_precision or default_mixed_precision()
        )
        chosen["lr_scheduler"] = choose(args.lr_scheduler, [s.value for s in SchedulerType], "--lr_scheduler")
    except ValueCheckError as exc:
        raise ConfigError(str(exc)) from None
    chosen["model_version"] = model_version
    if args.network_module not in ACCEPTED_NETWORK_MODULES:
        raise ConfigError(f"--network_module {args.network_module!r}: this trainer trains LoRA ({NETWORK_MODULE})")
    sampling_flags = [
        f for f in ("sample_every_n_steps", "sample_every_n_epochs", "sample_at_first") if getattr(args, f)
    ]
    if sampling_flags and not args.sample_prompts:
        raise ConfigError(f"--{sampling_flags[0]} needs --sample_prompts")
    if chosen["optimizer_type"] == "AdamW8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--optimizer_type AdamW8bit needs bitsandbytes (pip install bitsandbytes), or use AdamW")
    optimizer_kwargs = _optimizer_kwargs(args.optimizer_args)
    try:
        parse_network_args(args.network_args)
    except NetworkArgsError as exc:
        raise ConfigError(str(exc)) from None
    if args.resume:
        _check_resume(Path(args.resume), args)
    enable_face_loss = args.enable_face_loss or args.use_face_as_loss
    if enable_face_loss:
        _check_contrastive(args)
    try:
        group = load_dataset_config(args.dataset_config)
        qwen21 = version.family == QWEN_IMAGE_21
        prompts = load_prompt_file(args.sample_prompts, qwen21=qwen21) if args.sample_prompts else []
        group = _held_out_items(args, group)
        if qwen21:
            qwen_image21.check_items(group.items + group.validation_items)
    except (DatasetConfigError, PromptFileError) as exc:
        raise ConfigError(str(exc)) from None
    likeness_reference_paths = _likeness_references(args, group, prompts)
    if not version.several_controls:
        several = [str(i.target) for i in group.items if len(i.controls) != 1]
        several += [f"sample prompt {p.index}" for p in prompts if len(p.controls) != 1]
        if several:
            raise ConfigError(
                f"--model_version edit takes exactly one control image per target ({several[0]} has "
                "more); use edit-2509 or edit-2511 for several"
            )
    _check_prompt_lengths(group, prompts, args)
    flags = {option.name: getattr(args, option.name) for option in OPTIONS}
    return TrainingConfig(
        **{
            **flags,
            **chosen,
            "enable_face_loss": enable_face_loss,
            "seed": random.randint(0, 2**31 - 1) if args.seed is None else args.seed,
            "optimizer_args": tuple(args.optimizer_args),
            "network_args": tuple(args.network_args or ()),
            "validation_sigmas": tuple(sorted(set(args.validation_sigmas or DEFAULT_VALIDATION_SIGMAS), reverse=True)),
        },
        dataset_group=group,  # read once: the run trains on these
        sample_settings=tuple(prompts),
        likeness_reference_paths=tuple(likeness_reference_paths),
        optimizer_kwargs=optimizer_kwargs,
    )


def _held_out_items(args: argparse.Namespace, group: DatasetGroup) -> DatasetGroup:
    """The dataset with its held-out items: validation entries of the TOML, --validation_dataset_config's
    items, or --validation_split's share of the training items; the sigmas of the validation loss."""
    if args.validation_dataset_config:
        given = load_dataset_config(args.validation_dataset_config)
        group = DatasetGroup(group.datasets, group.validation + given.datasets + given.validation)
        check_held_out(group)
    if args.validation_split:
        if group.validation:
            raise ConfigError(
                "--validation_split holds out training items, but validation items are given "
                "already (a validation dataset or validation = true): use one or the other"
            )
        group = split_validation(group, args.validation_split, args.validation_seed)
    if args.validate_every_n_steps and not group.validation:
        raise ConfigError(
            "--validate_every_n_steps needs held-out items: --validation_split, "
            "--validation_dataset_config or a [[datasets]] entry with validation = true"
        )
    return group


def _likeness_references(args: argparse.Namespace, group: DatasetGroup, prompts: list) -> list[Path]:
    """The reference photos of --likeness_references: none of them a training target or a sample's control."""
    if not args.likeness_references:
        return []
    folder = Path(args.likeness_references)
    if not folder.is_dir():
        raise ConfigError(f"--likeness_references {folder}: folder not found")
    if not args.sample_prompts:
        raise ConfigError("--likeness_references scores each checkpoint's samples: it needs --sample_prompts")
    photos = list_images(folder)
    if not photos:
        raise ConfigError(f"--likeness_references {folder}: no images in it")
    used = {item.target.resolve(): "a training target" for item in group.items}
    used.update(
        {
            control.resolve(): f"the control of sample prompt {n + 1}"
            for n, prompt in enumerate(prompts)
            for control in prompt.controls
        }
    )
    for photo in photos:
        if photo.resolve() in used:
            raise ConfigError(
                f"--likeness_references {photo} is {used[photo.resolve()]}: the likeness must be "
                "measured against photos the LoRA never saw and the samples do not start from"
            )
    return photos


def _check_prompt_lengths(group: Any, prompts: list, args: argparse.Namespace) -> None:
    """Captions and sample prompts the text encoder can take: longer ones fail deep in the transformer
    after all the caching, so they are refused here. A token is at least one UTF-8 byte, so only
    texts longer than the limit in bytes are tokenized (the tokenizer loaded only for them)."""
    texts = [(f"the caption of {item.target}", item.caption) for item in group.items]
    texts += [(f"sample prompt {p.index} of {args.sample_prompts}", p.prompt) for p in prompts]
    long = [(where, text) for where, text in texts if len(text.encode("utf-8")) > MAX_PROMPT_TOKENS]
    if not long:
        return
    try:
        tokenizer = load_processor(args.tokenizer).tokenizer
    except ModelFileError as exc:
        raise ConfigError(f"{long[0][0]} is long enough to need counting its tokens, and {exc}") from None
    for where, text in long:
        count = len(tokenizer(text)["input_ids"])
        if count > MAX_PROMPT_TOKENS:
            raise ConfigError(
                f"{where} is {count} tokens long; Qwen-Image's text encoder takes at most "
                f"{MAX_PROMPT_TOKENS}: shorten it (it begins {text[:60]!r})"
            )


def _check_output_dir(folder: Path, output_name: str, *, resuming: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output_dir {folder} is a file, not a folder: choose a folder for the run")
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--output_dir {folder}: {existing} is not writable by this user; choose a folder you can write to"
        )
    earlier = checkpoint_files(folder, output_name)
    if earlier and not resuming:  # a fresh run would overwrite these and add to the run's metrics and log
        raise ConfigError(
            f"--output_dir {folder} already holds the run {output_name!r} ({len(earlier)} checkpoint(s), such as "
            f"{earlier[-1].name}): pass --resume with its -state folder to continue it, another --output_name, "
            "or another --output_dir"
        )


def _check_network_weights(file: Path, network_dim: int) -> None:
    if not file.is_file():
        raise ConfigError(f"--network_weights {file}: file not found")
    try:
        ranks = set(lora_file_ranks(file).values())
    except NetworkArgsError as exc:
        raise ConfigError(str(exc)) from None
    if ranks != {network_dim}:
        raise ConfigError(
            f"--network_weights {file} was trained at rank {', '.join(map(str, sorted(ranks)))}: "
            f"pass --network_dim {max(ranks)} (got {network_dim}) to train it on"
        )


def _check_resume(folder: Path, args: argparse.Namespace) -> None:
    try:
        progress = check_state_folder(folder)
    except StateFolderError as exc:
        raise ConfigError(str(exc)) from None
    rank = state_lora_rank(folder)
    if rank is not None and rank != args.network_dim:
        raise ConfigError(
            f"--resume {folder} was trained at rank {rank}: pass --network_dim {rank} (got {args.network_dim})"
        )
    if args.max_train_epochs is None and progress["step"] >= args.max_train_steps:
        raise ConfigError(
            f"--resume {folder} is at step {progress['step']}, which --max_train_steps "
            f"{args.max_train_steps} has already reached: raise --max_train_steps to train on"
        )


def build_hooks(config: TrainingConfig) -> list[TrainingHook]:
    """Training-step additions selected by flags (the face identity: face/hook.py)."""
    if not config.enable_face_loss:
        return []
    from .face.hook import build_training_hook

    try:
        return [build_training_hook(config)]
    except (ValueError, OSError, ImportError) as exc:  # e.g. a missing or broken face model pack
        raise ConfigError(f"--enable_face_loss: {exc}") from None


def build_evidence(config: TrainingConfig) -> SampleEvidence | None:
    """What scores each checkpoint's samples (None without sample prompts)."""
    if not config.sample_prompts:
        return None
    try:
        return build_sample_evidence(config, [item.target for item in config.dataset_group.items])
    except (ValueError, OSError, ImportError) as exc:
        raise ConfigError(str(exc)) from None


def _report_config_error(output_dir: str | None, message: str) -> None:
    """The message on stderr, and in status.json when the folder can hold one (the pid tells a
    watcher whose status it is)."""
    print(f"face-consistency train: error: {message}", file=sys.stderr)
    if output_dir:
        try:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            write_status(
                output_dir, {"state": JobState.FAILED, "pid": os.getpid(), "error": message, "log_tail": [message]}
            )
        except OSError:  # a file where the folder should be, a read-only disk: stderr is all there is
            pass


def _output_dir_in(argv: list[str]) -> str | None:
    """--output_dir from raw arguments, so even unparsable ones can be reported in its status.json."""
    for index, arg in enumerate(argv):
        if arg == "--output_dir" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--output_dir="):
            return arg.split("=", 1)[1]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        build_parser().print_help()
        return EXIT_OK
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    package_logger = logging.getLogger("face_consistency")
    package_logger.addHandler(handler)
    previous_level = package_logger.level
    package_logger.setLevel(logging.INFO)
    output_dir = _output_dir_in(argv)
    try:
        with contextlib.ExitStack() as held:
            try:
                if output_dir and _is_main_process():
                    # before anything is written there: a second run must not touch the first one's status
                    with contextlib.suppress(OSError):  # no folder can be made there: validate_args says why
                        held.enter_context(hold_output_folder(output_dir))
                args = parse_args(argv)
                output_dir = args.output_dir
                config = validate_args(args)
                hooks = build_hooks(config)
                evidence = build_evidence(config)
            except OutputFolderBusyError as exc:
                print(f"face-consistency train: error: {exc}", file=sys.stderr)
                return EXIT_USAGE
            except ConfigError as exc:
                _report_config_error(output_dir, str(exc))
                return EXIT_USAGE
            except SystemExit as exc:  # argparse has printed the usage error (e.g. a non-number for an int flag)
                _report_config_error(output_dir, "invalid command-line arguments (see the usage message)")
                return int(exc.code or EXIT_USAGE)
            return _run(config, hooks, evidence)
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)


def _is_main_process() -> bool:
    """Rank 0 of an `accelerate launch` (which sets RANK), or a plain single process."""
    return os.environ.get("RANK", "0") == "0"


def _run(config: TrainingConfig, hooks: list[TrainingHook], evidence: SampleEvidence | None) -> int:
    try:
        state = run_training(config, hooks, evidence)
    except (
        ModelFileError,
        DatasetConfigError,
        PromptFileError,
        NetworkArgsError,
        TrainingDivergedError,
        CheckpointWriteError,
    ) as exc:
        print(f"face-consistency train: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception:
        log.exception("training failed")
        return EXIT_FAILED
    return EXIT_OK if state in (JobState.COMPLETED, JobState.STOPPED) else EXIT_FAILED
