"""The training loop: cache, load the DiT, add LoRA, flow-matching steps, checkpoints, samples, status.

`run_training` sets up the process (accelerate, the log tail, signals, status on failure); a
`TrainingRun` then goes through the job's steps, in the order `TrainingRun.run` lists them.

One optimizer step, as musubi-tuner trains Qwen-Image-Edit (its `qwen_image_train_network.py`, with
diffusers' `QwenImageEditPlusPipeline` for the packing and the image shapes):

    x0 (target latents), eps ~ N(0, 1), t ~ timestep sampling
    x_t = (1 - t) x0 + t eps                     target velocity  eps - x0
    tokens = pack(x_t) ++ pack(control latents)  img_shapes = [(1, h/2, w/2), (1, hc/2, wc/2), ...]
    v_pred = transformer(tokens, t, prompt)[:, :target tokens] -> unpacked to [B, 16, 1, h, w]
    loss = mean(weighting(t) * (v_pred - (eps - x0))^2) + extra losses from hooks

Extension point (the face-identity loss): the hooks of `hooks.py` get `on_cached` once the dataset
is cached, `extra_loss(StepState)` inside every micro-step (the state carries x_t, t, v_pred, the
VAE and each sample's DatasetItem, so `x0_hat = x_t - t v_pred` can be decoded and scored with
gradients) and `on_samples` after each sampling round.

The job protocol (`protocol.py`) is written throughout: status.json on every state change and
step, metrics.jsonl per step. A STOP file or SIGTERM/SIGINT finishes the current step, saves a
checkpoint (LoRA and resumable state) and ends in `stopped`; an exception ends in `failed`.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import logging
import math
import os
import random
import shutil
import signal
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.hooks import apply_group_offloading
from diffusers.optimization import get_scheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift
from diffusers.training_utils import cast_training_params, compute_loss_weighting_for_sd3
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..common.files import atomic_write_text
from ..musubi_formats.dataset import DatasetGroup, DatasetItem
from ..musubi_formats.names import epoch_checkpoint_name, step_checkpoint_name
from ..training_contract import libraries
from ..training_contract.checkpoint_choice import CheckpointRow, CheckpointTable, format_table, read_table, write_table
from ..training_contract.model_versions import MODEL_VERSIONS
from ..training_contract.options import NETWORK_MODULE
from ..training_contract.protocol import (
    METRICS_FILE,
    STATUS_FILE,
    JobState,
    append_metrics,
    clear_stop_request,
    read_metrics,
    stop_requested,
    write_status,
)
from . import models
from .cache import CacheEncoders, cache_dataset, load_cached_item, text_cache_path
from .checkpoint_eval import ValidationLoss
from .hooks import ExtraLoss, StepState, TrainingHook
from .host_memory import map_large_allocations
from .lora import add_lora, load_comfy_lora, lora_file_modules, lora_target_modules, parse_network_args, save_lora
from .memory_plan import MemoryInputs, estimate, image_tokens, plan_warning
from .positions import set_positions
from .sampling import EncodedSample, encode_samples, pack, save_samples, unpack
from .state import load_state, save_state

log = logging.getLogger("face_consistency.trainer")

LOG_TAIL_LINES = 40
# Qwen-Image's scheduler config, used by `qwen_shift` to pick the shift from the image size.
QWEN_BASE_SEQ_LEN, QWEN_MAX_SEQ_LEN, QWEN_BASE_SHIFT, QWEN_MAX_SHIFT = 256, 8192, 0.5, 0.9


# --------------------------------------------------------------------------- status / logging


class TrainingDivergedError(RuntimeError):
    """The loss, the gradient or the LoRA stopped being finite: the run ends `failed`, unsaved."""


# what torch.save's zip writer says when the disk fills (it raises a bare RuntimeError)
TORCH_WRITE_FAILURES = ("inline_container.cc", "PytorchStreamWriter", "basic_ios::clear")


class CheckpointWriteError(OSError):
    """A checkpoint or state folder could not be written (a full disk, most often)."""


@contextmanager
def checkpoint_write(path: Path) -> Iterator[None]:
    """Turn a failed write (the OS's error, or safetensors' and torch's wrappers of it) into one message;
    the save's temporary file is gone by then, so the previous checkpoint stays as it was."""
    try:
        yield
    except (OSError, SafetensorError, RuntimeError) as exc:
        if type(exc) is RuntimeError and not any(mark in str(exc) for mark in TORCH_WRITE_FAILURES):
            raise  # a bug, not a write that failed
        raise CheckpointWriteError(
            f"could not write {path}: {exc}. Free space in {path.parent} (or choose another --output_dir), then "
            "resume from the last state folder (--resume) or start again"
        ) from exc


def check_finite(step: int, what: str, value: torch.Tensor) -> None:
    """Raise TrainingDivergedError when `value` holds a NaN or an infinity (before it is saved)."""
    if not bool(torch.isfinite(value).all()):
        shown = value.item() if value.numel() == 1 else "not finite"
        raise TrainingDivergedError(
            f"training diverged at step {step}: the {what} is {shown}; no checkpoint was written from it. "
            "Lower --learning_rate (or --face_loss_weight), keep --max_grad_norm on, and resume from the last "
            "saved state if there is one"
        )


class LogTail(logging.Handler):
    """Keeps the last lines logged, for the status of a failed run."""

    def __init__(self, lines: int = LOG_TAIL_LINES) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=lines)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class StatusReporter:
    """status.json and metrics.jsonl of the job (main process only)."""

    def __init__(self, output_dir: Path, enabled: bool, base: dict[str, Any]) -> None:
        self.output_dir = output_dir
        self.enabled = enabled
        self.status: dict[str, Any] = {"pid": os.getpid(), "started": time.time(), **base}

    def update(self, state: JobState | None = None, **fields: Any) -> None:
        if state is not None:
            self.status["state"] = state.value
        self.status.update(fields)
        if self.enabled:
            write_status(self.output_dir, self.status)

    def metrics(self, record: dict[str, Any]) -> None:
        if self.enabled:
            append_metrics(self.output_dir, record)


class StopSignal:
    """SIGTERM/SIGINT set a flag checked between steps (a second one aborts); old handlers are restored after."""

    def __init__(self) -> None:
        self.received: str | None = None

    @contextmanager
    def installed(self) -> Iterator[None]:
        previous = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: rely on the STOP file
            previous.clear()
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # asked twice: stop now, without a checkpoint
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice")
        self.received = signal.Signals(signum).name
        log.info("%s received: stopping after the current step", self.received)


# --------------------------------------------------------------------------- data


@dataclass
class Batch:
    items: list[DatasetItem]
    x0: torch.Tensor  # [B, 16, 1, h, w]
    controls: list[torch.Tensor]  # each [B, 16, 1, hc, wc]
    prompt_embeds: torch.Tensor  # [B, L, D]
    prompt_mask: torch.Tensor  # [B, L]


def collate(items: list[DatasetItem]) -> Batch:
    cached = [load_cached_item(item) for item in items]
    x0 = torch.stack([c["latents"] for c in cached])
    n_controls = len(items[0].controls)
    controls = [torch.stack([c[f"control_latents_{k}"] for c in cached]) for k in range(n_controls)]
    embeds = [c["prompt_embeds"] for c in cached]
    length = max(e.shape[0] for e in embeds)
    prompt = torch.zeros(len(embeds), length, embeds[0].shape[1])
    mask = torch.zeros(len(embeds), length, dtype=torch.long)
    for i, e in enumerate(embeds):
        prompt[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = 1
    return Batch(items, x0, controls, prompt, mask)


def epoch_batches(group: DatasetGroup, epoch: int, seed: int, rank: int, world: int) -> list[list[DatasetItem]]:
    """This process's batches of an epoch: same-bucket batches per dataset, shuffled by (seed, epoch)."""
    rng = random.Random(seed * 100_003 + epoch)
    batches: list[list[DatasetItem]] = []
    for spec in group.datasets:
        by_bucket: dict[tuple, list[DatasetItem]] = {}
        for item in spec.items * spec.num_repeats:
            by_bucket.setdefault((item.bucket, item.control_buckets), []).append(item)
        for bucket_items in by_bucket.values():
            rng.shuffle(bucket_items)
            batches += [bucket_items[i : i + spec.batch_size] for i in range(0, len(bucket_items), spec.batch_size)]
    rng.shuffle(batches)
    usable = len(batches) // world * world
    return batches[rank:usable:world]


# --------------------------------------------------------------------------- flow matching


def sample_timesteps(
    args: argparse.Namespace, batch_size: int, num_target_tokens: int, generator: torch.Generator
) -> torch.Tensor:
    """Flow time t in (0, 1) per sample, as musubi's --timestep_sampling."""
    method = args.timestep_sampling
    if method == "uniform":
        return torch.rand(batch_size, generator=generator)
    if method == "sigma":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.discrete_flow_shift)
        index = torch.randint(0, len(scheduler.sigmas) - 1, (batch_size,), generator=generator)
        return scheduler.sigmas[index].float()
    t = torch.sigmoid(args.sigmoid_scale * torch.randn(batch_size, generator=generator))
    shift = flow_shift(args, num_target_tokens)
    return t * shift / (1 + (shift - 1) * t)


def flow_shift(args: argparse.Namespace, num_target_tokens: int) -> float:
    """The shift of `shift` sampling: fixed, or from the image size for `qwen_shift`."""
    if args.timestep_sampling == "qwen_shift":
        return math.exp(
            calculate_shift(num_target_tokens, QWEN_BASE_SEQ_LEN, QWEN_MAX_SEQ_LEN, QWEN_BASE_SHIFT, QWEN_MAX_SHIFT)
        )
    return float(args.discrete_flow_shift)


def attention_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """The prompt mask, or None when it is all ones: PyTorch's fastest attention kernels refuse a mask."""
    return None if bool(mask.all()) else mask


# --------------------------------------------------------------------------- the run


def _dtype(mixed_precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def _lora_metadata(args: argparse.Namespace, step: int, epoch: int, num_images: int, started: float) -> dict[str, str]:
    values = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": args.network_dim,
        "ss_network_alpha": args.network_alpha,
        "ss_network_args": json.dumps(dict(entry.split("=", 1) for entry in args.network_args or [])),
        "ss_output_name": args.output_name,
        "ss_training_started_at": started,
        "ss_training_finished_at": time.time(),
        "ss_steps": step,
        "ss_epoch": epoch,
        "ss_max_train_steps": args.max_train_steps,
        "ss_learning_rate": args.learning_rate,
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_lr_warmup_steps": args.lr_warmup_steps,
        "ss_optimizer": args.optimizer_type,
        "ss_mixed_precision": args.mixed_precision,
        "ss_seed": args.seed,
        "ss_num_train_images": num_images,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
        "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_timestep_sampling": args.timestep_sampling,
        "ss_discrete_flow_shift": args.discrete_flow_shift,
        "ss_weighting_scheme": args.weighting_scheme,
        "ss_fp8_base": args.fp8_base,
        "ss_dit": Path(args.dit).name,
        "ss_vae": Path(args.vae).name,
        "ss_text_encoder": Path(args.text_encoder).name,
        "ss_dataset_config": Path(args.dataset_config).name,
    }
    return {**{k: str(v) for k, v in values.items()}, **MODEL_VERSIONS[args.model_version].lora_metadata}


def _make_optimizer(args: argparse.Namespace, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    kwargs = dict(args.optimizer_kwargs)
    name = args.optimizer_type.lower()
    if name == "adamw":
        return torch.optim.AdamW(params, lr=args.learning_rate, **kwargs)
    if name == "adamw8bit":
        import bitsandbytes as bnb  # presence checked by the CLI

        return bnb.optim.AdamW8bit(params, lr=args.learning_rate, **kwargs)
    from transformers.optimization import Adafactor

    kwargs = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **kwargs}
    return Adafactor(params, lr=args.learning_rate, **kwargs)


def _log_tail(tail: LogTail, exc: BaseException) -> list[str]:
    trace = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return list(tail.lines) + "".join(trace).splitlines()[-LOG_TAIL_LINES:]


def prepare_transformer(
    args: argparse.Namespace, device: torch.device, weight_dtype: torch.dtype
) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """Load the DiT, apply the memory options, add the LoRA (fp32, on the device); returns its parameters."""
    header = models.read_header(args.dit, "DiT (--dit)")
    num_blocks = models.count_transformer_blocks(header)
    if args.blocks_to_swap and args.blocks_to_swap >= num_blocks:
        raise ValueError(f"--blocks_to_swap {args.blocks_to_swap} must be smaller than the model's {num_blocks} blocks")
    first_swapped = num_blocks - args.blocks_to_swap

    def placement(name: str) -> torch.device:
        """Each base weight straight onto its device: the last --blocks_to_swap blocks stay on the CPU."""
        if (
            args.blocks_to_swap
            and name.startswith("transformer_blocks.")
            and int(name.split(".", 2)[1]) >= first_swapped
        ):
            return torch.device("cpu")
        return device

    # With --fp8_base the base weights are stored as float8 and upcast per layer for compute
    # (the LoRA, added below, stays fp32).
    if args.fp8_base and not args.gradient_checkpointing:
        log.warning(
            "--fp8_base without --gradient_checkpointing: the backward pass keeps every layer's "
            "upcast weight until it runs, so float8 storage saves little memory while training; "
            "add --gradient_checkpointing"
        )
    transformer = models.load_transformer(
        args.dit,
        weight_dtype,
        zero_cond_t=MODEL_VERSIONS[args.model_version].zero_cond_t,
        fp8_base=args.fp8_base,
        placement=placement,
    )
    set_positions(transformer, args.rope_positions)
    targets = lora_target_modules(transformer, parse_network_args(args.network_args))
    if args.network_weights:
        # Continuing a LoRA trains every layer it holds (a musubi-tuner LoRA also holds img_mod/txt_mod).
        chosen = set(targets)
        added = [m for m in lora_file_modules(transformer, args.network_weights) if m not in chosen]
        if added:
            log.info("--network_weights adds %d layer(s) outside the target set (e.g. %s)", len(added), added[0])
        targets += added
    for block in transformer.transformer_blocks[first_swapped:] if args.blocks_to_swap else []:
        # Frozen base weights of the swapped blocks live on the CPU and are streamed in layer by
        # layer; LoRA layers are added afterwards, so they (and their gradients) stay on the device.
        apply_group_offloading(
            block,
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="leaf_level",
            use_stream=device.type == "cuda",
        )
    lora_params = add_lora(transformer, args.network_dim, args.network_alpha, targets)
    for param in lora_params:
        param.data = param.data.to(device)
    cast_training_params(transformer, dtype=torch.float32)
    if args.fp8_base:
        # peft created the adapter in the base weights' float8 dtype: initialise it again in fp32.
        for module in transformer.modules():
            if isinstance(module, LoraLayer):
                module.reset_lora_parameters("default", init_lora_weights=True)
    if args.network_weights:
        count = load_comfy_lora(transformer, args.network_weights, args.network_alpha)
        log.info("started from %s (%d layers)", args.network_weights, count)
    log.info("LoRA on %d layers (rank %d, alpha %s)", len(targets), args.network_dim, args.network_alpha)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    return transformer, lora_params


def _may_hold_dead_ends(args: argparse.Namespace) -> bool:
    return bool(args.network_weights) or parse_network_args(args.network_args).target_set == "musubi"


def unfinished_saves(output_dir: Path, output_name: str) -> list[Path]:
    """Temporary checkpoint and status files (`atomic_path`) and state folders (`save_state`) that a
    killed save left in the run's folder; the lock the trainer holds means none is in progress."""
    patterns = (f".{output_name}*.tmp", f".{STATUS_FILE}.*.tmp", f".{output_name}*.partial")
    return sorted({p for pattern in patterns for p in output_dir.glob(pattern)})


def run_training(args: argparse.Namespace, hooks: list[TrainingHook] | tuple = ()) -> JobState:
    """Run one training job described by parsed/validated CLI args; returns its final state."""
    map_large_allocations()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tail = LogTail()
    package_logger = logging.getLogger("face_consistency")
    package_logger.addHandler(tail)
    reporter = StatusReporter(output_dir, True, {"output_name": args.output_name, "output_dir": str(output_dir)})
    accelerator = None
    try:
        accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with="tensorboard" if args.logging_dir else None,
            project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=args.logging_dir),
            # musubi's target set (and a LoRA file from it) holds layers that get no gradient
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=_may_hold_dead_ends(args))],
        )
        reporter.enabled = accelerator.is_main_process
        reporter.status["num_processes"] = accelerator.num_processes
        # which libraries, from which folder (the trainer environment's or ComfyUI's), this job runs with
        reporter.status["libraries"] = libraries.versions()
        log.info("libraries: %s", ", ".join(libraries.describe(reporter.status["libraries"])))
        if accelerator.is_main_process:
            clear_stop_request(output_dir)
            for leftover in unfinished_saves(output_dir, args.output_name):
                log.info("removing %s, left by a save that was cut short", leftover)
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
        stop = StopSignal()
        with stop.installed():
            reporter.update(JobState.STARTING, step=0, total_steps=args.max_train_steps, epoch=0)
            return TrainingRun(args, accelerator, reporter, stop, list(hooks)).run()
    except BaseException as exc:
        log.error("training failed: %s", exc)
        reporter.update(JobState.FAILED, error=f"{type(exc).__name__}: {exc}", log_tail=_log_tail(tail, exc))
        raise
    finally:
        package_logger.removeHandler(tail)
        if accelerator is not None:
            accelerator.end_training()
            if accelerator.num_processes == 1:
                # accelerate keeps its state process-wide; a later in-process run may pick other settings.
                AcceleratorState._reset_state(reset_partial_state=True)


class StepMeter:
    """The running figures of the step records: mean loss over the last epoch (at least 10 steps)
    and steps per second over the last 20."""

    def __init__(self, steps_per_epoch: int) -> None:
        self.recent_losses: collections.deque[float] = collections.deque(maxlen=max(steps_per_epoch, 10))
        self.step_times: collections.deque[float] = collections.deque(maxlen=20)
        self.last_step_end = time.time()

    def tick(self, loss: float) -> tuple[float, float, float]:
        """Count a finished step with its loss; returns (average loss, steps per second, now)."""
        now = time.time()
        self.recent_losses.append(loss)
        self.step_times.append(now - self.last_step_end)
        self.last_step_end = now
        return sum(self.recent_losses) / len(self.recent_losses), len(self.step_times) / sum(self.step_times), now


class TrainingRun:
    """One training job, from the dataset cache to the final checkpoint; `run()` reads as its steps.

    `progress` (step, epoch, batch within the epoch) is the resumable position that `save_state`
    writes and `load_state` restores.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        accelerator: Accelerator,
        reporter: StatusReporter,
        stop: StopSignal,
        hooks: list[TrainingHook],
    ) -> None:
        self.args = args
        self.accelerator = accelerator
        self.reporter = reporter
        self.stop = stop
        self.hooks = hooks
        self.output_dir = Path(args.output_dir)
        self.device = accelerator.device
        self.weight_dtype = _dtype(args.mixed_precision)
        self.group: DatasetGroup = args.dataset_group
        self.started = time.time()
        self.progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
        self.samples: list[EncodedSample] = []
        held_out = self.group.validation_items
        self.validation = ValidationLoss(held_out, args.validation_sigmas, args.validation_seed) if held_out else None
        self.validated: dict[int, dict[str, float]] = {}  # step -> its validation loss
        self.sampled: dict[int, list[Path]] = {}  # step -> the samples drawn at it
        self.table = CheckpointTable(
            sigmas=tuple(args.validation_sigmas),
            references=len(getattr(args, "likeness_reference_paths", [])),
            validation_items=len(held_out),
        )
        # what validation and the checkpoints' samples and scoring cost, against the run's time
        self.validation_seconds = self.checkpoint_sampling_seconds = self.checkpoint_scoring_seconds = 0.0

    def run(self) -> JobState:
        if self.args.blocks_to_swap and self.accelerator.num_processes > 1:
            raise ValueError("--blocks_to_swap works with a single process only (it trades GPU memory for speed)")
        set_seed(self.args.seed)
        encoders = self.load_encoders()
        self.cache_dataset(encoders)
        if self.stopped_before_training():
            return JobState.STOPPED
        self.prepare_samples_and_hooks(encoders)
        if self.stopped_before_training():
            return JobState.STOPPED
        if self.accelerator.is_main_process:
            _report_memory_plan(self.args, self.group, self.hooks, self.device, self.reporter)
        del encoders  # the text encoder: the DiT needs the memory
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.prepare_training()
        self.resume()
        self.reporter.update(
            JobState.TRAINING,
            step=self.progress["step"],
            total_steps=self.total_steps,
            epoch=self.progress["epoch"] + 1,
            total_epochs=self.total_epochs,
            steps_per_epoch=self.steps_per_epoch,
            last_checkpoint=None,
            last_sample_step=None,
        )
        if self.args.sample_at_first and self.progress["step"] == 0:
            self.sample(None)
        stopped_by = self.train()
        return self.finish(stopped_by)

    # ---- stopping

    def stop_reason(self) -> str | None:
        """Why to stop (a signal, the STOP file, another process), asked of every process; None: go on."""
        local = self.stop_asked_here()
        if self.accelerator.num_processes == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=self.device)
        return (
            (local or "stop requested by another process") if self.accelerator.reduce(flag, "max").item() > 0 else None
        )

    def stop_asked_here(self) -> str | None:
        """This process only: cheap enough to ask per cached file."""
        return self.stop.received or ("STOP file" if stop_requested(self.output_dir) else None)

    def should_stop(self) -> bool:
        """`stop_asked_here` as the caches' `should_stop` callback."""
        return self.stop_asked_here() is not None

    def stopped_before_training(self) -> bool:
        reason = self.stop_reason()
        if reason:
            self.reporter.update(JobState.STOPPED, stop_reason=reason, last_checkpoint=None)
        return reason is not None

    # ---- data and caches (text encoder and VAE only; the DiT is loaded afterwards)

    def load_encoders(self) -> CacheEncoders:
        """The VAE (kept for sampling and the hooks) and, loaded when first needed, the text encoder."""
        args = self.args
        version = MODEL_VERSIONS[args.model_version]
        self.vae = models.load_vae(
            args.vae, torch.float32 if args.mixed_precision == "no" else self.weight_dtype, self.device
        )

        def load_text_side() -> tuple[torch.nn.Module, Any]:
            log.info("loading the text encoder %s", args.text_encoder)
            return (
                models.load_text_encoder(args.text_encoder, self.weight_dtype, self.device),
                models.load_processor(args.tokenizer),
            )

        pipeline_class = QwenImageEditPlusPipeline if version.several_controls else QwenImageEditPipeline
        pipeline = pipeline_class(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=self.vae,
            text_encoder=None,
            tokenizer=None,
            processor=None,
            transformer=None,
        )
        return CacheEncoders(
            pipeline,
            Path(args.vae),
            Path(args.text_encoder),
            self.weight_dtype,
            str(args.tokenizer or models.DEFAULT_PROCESSOR_REPO),
            version.several_controls,
            self.device,
            load_text_side,
        )

    def cache_dataset(self, encoders: CacheEncoders) -> None:
        items = self.group.items + self.group.validation_items
        log.info(
            "dataset: %d images in %d dataset(s), %d held out for validation",
            len(self.group.items),
            len(self.group.datasets),
            len(self.group.validation_items),
        )
        self.reporter.update(JobState.CACHING, num_images=len(items))
        # Each process caches its share (a long single-process caching run would time out the others).
        share = items[self.accelerator.process_index :: self.accelerator.num_processes]
        counts = cache_dataset(
            share,
            encoders,
            should_stop=self.should_stop,
            progress=lambda done, total: self.reporter.update(cached=done, cache_total=total),
        )
        log.info("cache: %d file(s) built, %d reused", counts["built"], counts["reused"])
        self.reporter.update(cache_built=counts["built"], cache_reused=counts["reused"])
        self.accelerator.wait_for_everyone()

    def prepare_samples_and_hooks(self, encoders: CacheEncoders) -> None:
        """The sample prompts encoded, and the hooks' own caches (the face targets)."""
        if self.args.sample_prompts:
            self.samples = encode_samples(self.args.sample_settings, encoders)
        for hook in self.hooks:
            self.reporter.update(**hook.on_cached(self.group.items, self.accelerator, self.should_stop))

    # ---- the DiT with LoRA, optimizer and schedule

    def prepare_training(self) -> None:
        args, accelerator = self.args, self.accelerator
        transformer, self.lora_params = prepare_transformer(args, self.device, self.weight_dtype)
        batches = epoch_batches(self.group, 0, args.seed, accelerator.process_index, accelerator.num_processes)
        self.steps_per_epoch = math.ceil(len(batches) / args.gradient_accumulation_steps)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the dataset yields no batch per process ({len(self.group.items)} images, "
                f"{accelerator.num_processes} processes)"
            )
        if args.max_train_epochs:
            args.max_train_steps = args.max_train_epochs * self.steps_per_epoch
        self.total_steps = args.max_train_steps
        self.total_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        optimizer = _make_optimizer(args, self.lora_params)
        lr_scheduler = get_scheduler(
            args.lr_scheduler,
            optimizer,
            num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=self.total_steps * accelerator.num_processes,
            num_cycles=args.lr_scheduler_num_cycles,
            power=args.lr_scheduler_power,
        )
        # With swapped blocks the placement above must survive: accelerate must not move the model.
        self.transformer = accelerator.prepare_model(transformer, device_placement=not args.blocks_to_swap)
        self.optimizer, self.lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
        if accelerator.is_main_process and args.logging_dir:
            accelerator.init_trackers(
                args.log_tracker_name or "face_consistency",
                config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))},
            )
        self.generator = torch.Generator("cpu").manual_seed(args.seed + accelerator.process_index)

    def resume(self) -> None:
        if not self.args.resume:
            return
        load_state(Path(self.args.resume), self.accelerator, self.transformer, self.generator, self.progress)
        log.info(
            "resumed from %s at step %d, epoch %d", self.args.resume, self.progress["step"], self.progress["epoch"] + 1
        )
        if self.accelerator.is_main_process:
            # Resuming into the same folder: steps after the state are about to be redone.
            kept = [m for m in read_metrics(self.output_dir) if m.get("step", 0) <= self.progress["step"]]
            atomic_write_text(self.output_dir / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in kept))
            earlier = read_table(self.output_dir)
            if earlier is not None:
                self.table.rows = [row for row in earlier.rows if row.step <= self.progress["step"]]

    # ---- training

    def train(self) -> str | None:
        """Optimizer steps to the last one, saving and sampling on the way; returns why it stopped
        early, or None when it reached the end."""
        args, progress = self.args, self.progress
        accelerator = self.accelerator
        bar = tqdm(
            total=self.total_steps,
            initial=progress["step"],
            disable=not accelerator.is_local_main_process,
            desc="steps",
            dynamic_ncols=True,
        )
        meter = StepMeter(self.steps_per_epoch)
        micro_losses: list[torch.Tensor] = []  # flow-matching losses of the micro-batches of one optimizer step
        try:
            while progress["step"] < self.total_steps:
                epoch = progress["epoch"]
                batches = epoch_batches(
                    self.group, epoch, args.seed, accelerator.process_index, accelerator.num_processes
                )
                while progress["batch_in_epoch"] < len(batches) and progress["step"] < self.total_steps:
                    batch = collate(batches[progress["batch_in_epoch"]])
                    progress["batch_in_epoch"] += 1
                    loss, extra = self.accumulate(batch)
                    micro_losses.append(loss.detach())
                    if not accelerator.sync_gradients:
                        continue
                    progress["step"] += 1
                    self.record_step(
                        epoch, accelerator.reduce(torch.stack(micro_losses).mean(), "mean").item(), extra, meter, bar
                    )
                    micro_losses.clear()
                    stopped_by = self.stop_reason()
                    if stopped_by is not None:
                        return stopped_by
                    self.after_step(progress["step"])
                if progress["batch_in_epoch"] >= len(batches):
                    progress["epoch"] += 1
                    progress["batch_in_epoch"] = 0
                    self.after_epoch(progress["epoch"])
            return None
        finally:
            bar.close()

    def accumulate(self, batch: Batch) -> tuple[torch.Tensor, ExtraLoss]:
        """One micro-batch's forward and backward; the optimizer steps when the accumulation is complete."""
        step = self.progress["step"] + 1
        with self.accelerator.accumulate(self.transformer):
            loss, extra = micro_step(
                self.args,
                self.transformer,
                self.vae,
                batch,
                self.generator,
                self.device,
                self.accelerator,
                step,
                self.hooks,
            )
            check_finite(step, "flow-matching loss", loss)
            if extra.loss is not None:
                check_finite(step, "extra loss (face identity)", extra.loss)
            self.accelerator.backward(loss + (extra.loss if extra.loss is not None else 0))
            if self.accelerator.sync_gradients and self.args.max_grad_norm:
                norm = self.accelerator.clip_grad_norm_(self.lora_params, self.args.max_grad_norm)
                check_finite(step, "gradient norm", torch.as_tensor(norm))
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss, extra

    def record_step(self, epoch: int, loss: float, extra: ExtraLoss, meter: StepMeter, bar: tqdm) -> None:
        """The step's record in metrics.jsonl, TensorBoard, status.json and the progress bar."""
        step = self.progress["step"]
        average, steps_per_sec, now = meter.tick(loss)
        lr = self.lr_scheduler.get_last_lr()[0]
        self.reporter.metrics(
            {
                "step": step,
                "epoch": epoch + 1,
                "loss": loss,
                "avg_loss": average,
                "lr": lr,
                "steps_per_sec": steps_per_sec,
                "time": now,
                **extra.metrics,
            }
        )
        if self.args.logging_dir:
            self.accelerator.log(
                {"loss/current": loss, "loss/average": average, "lr/unet": lr, **extra.metrics}, step=step
            )
        self.reporter.update(
            step=step,
            epoch=epoch + 1,
            loss=loss,
            avg_loss=average,
            lr=lr,
            steps_per_sec=steps_per_sec,
            eta_sec=(self.total_steps - step) / steps_per_sec,
            **extra.metrics,
        )
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", avr_loss=f"{average:.4f}")

    def after_step(self, step: int) -> None:
        args = self.args
        saved = None
        if args.save_every_n_steps and step % args.save_every_n_steps == 0 and step < self.total_steps:
            saved = self.save_checkpoint(step_checkpoint_name(args.output_name, step), with_state=args.save_state)
        if args.sample_every_n_steps and step % args.sample_every_n_steps == 0:
            self.sample(None)
        if args.validate_every_n_steps and step % args.validate_every_n_steps == 0:
            self.validate()
        if saved is not None:
            self.record_checkpoint(saved, None)

    def after_epoch(self, finished: int) -> None:
        args = self.args
        saved = None
        if (
            args.save_every_n_epochs
            and finished % args.save_every_n_epochs == 0
            and self.progress["step"] < self.total_steps
        ):
            saved = self.save_checkpoint(epoch_checkpoint_name(args.output_name, finished), with_state=args.save_state)
        if args.sample_every_n_epochs and finished % args.sample_every_n_epochs == 0:
            self.sample(finished)
        if saved is not None:
            self.record_checkpoint(saved, finished)

    def finish(self, stopped_by: str | None) -> JobState:
        """The last checkpoint: the final LoRA, or on a stop one at the current step with its state to resume."""
        if stopped_by is not None:
            log.info("stop requested (%s): saving a checkpoint at step %d", stopped_by, self.progress["step"])
            self.reporter.update(JobState.STOPPING, stop_reason=stopped_by)
            self.save_checkpoint(step_checkpoint_name(self.args.output_name, self.progress["step"]), with_state=True)
            self.reporter.update(JobState.STOPPED)
            return JobState.STOPPED
        saved = self.save_checkpoint(self.args.output_name, with_state=self.args.save_state)
        self.record_checkpoint(saved, None)
        self.reporter.update(JobState.COMPLETED, eta_sec=0)
        return JobState.COMPLETED

    # ---- checkpoints and samples

    def save_checkpoint(self, stem: str, *, with_state: bool) -> Path:
        """`{stem}.safetensors` (the LoRA, ComfyUI's format) and, `with_state`, `{stem}-state/` to resume from;
        returns the LoRA's path."""
        args, accelerator = self.args, self.accelerator
        for param in self.lora_params:
            check_finite(self.progress["step"], "LoRA weight", param.detach())
        self.reporter.update(JobState.SAVING)
        lora_file = self.output_dir / f"{stem}.safetensors"
        with checkpoint_write(lora_file):
            if accelerator.is_main_process:
                path = save_lora(
                    lora_file,
                    accelerator.unwrap_model(self.transformer),
                    args.network_alpha,
                    _lora_metadata(
                        args, self.progress["step"], self.progress["epoch"] + 1, len(self.group.items), self.started
                    ),
                    torch.float32 if args.mixed_precision == "no" else self.weight_dtype,
                )
                self.reporter.status["last_checkpoint"] = str(path)
                log.info("saved %s", path)
        if with_state:
            state_dir = self.output_dir / f"{stem}-state"
            with checkpoint_write(state_dir):
                save_state(state_dir, accelerator, self.transformer, self.generator, self.progress)
        accelerator.wait_for_everyone()
        return lora_file

    def validate(self) -> dict[str, float]:
        """The validation loss at this step (main process; measured once per step), in metrics.jsonl and
        status.json; {} without held-out items."""
        step = self.progress["step"]
        if self.validation is None or not self.accelerator.is_main_process:
            return {}
        if step not in self.validated:
            started = time.perf_counter()
            model = self.accelerator.unwrap_model(self.transformer)
            model.eval()
            losses = self.validation.measure(
                collate, lambda batch: batch_velocity(model, self.accelerator, batch, self.device), self.device
            )
            model.train()
            self.validation_seconds += time.perf_counter() - started
            self.validated[step] = losses
            self.reporter.metrics({"step": step, **losses})
            self.reporter.update(**losses)
            if self.args.logging_dir:
                self.accelerator.log(losses, step=step)
            log.info(
                "validation loss at step %d: %.5f (%s)",
                step,
                losses["val_loss"],
                ", ".join(
                    f"{key.rsplit('_', 1)[1]}: {value:.5f}" for key, value in losses.items() if key != "val_loss"
                ),
            )
        return self.validated[step]

    def record_checkpoint(self, lora_file: Path, epoch: int | None) -> None:
        """The checkpoint's row of checkpoints.json (validation loss, its samples' likeness and nearness
        to the training targets), the table rewritten and the checkpoint to keep logged and reported."""
        step = self.progress["step"]
        losses = self.validate()
        if self.samples and step not in self.sampled:  # every process: sampling waits for them all
            started = time.perf_counter()
            self.sample(epoch)
            self.checkpoint_sampling_seconds += time.perf_counter() - started
        if not self.accelerator.is_main_process:
            return
        started = time.perf_counter()
        row = CheckpointRow(
            lora_file.name,
            step,
            epoch,
            validation_loss={key.rsplit("_", 1)[1]: value for key, value in losses.items() if key != "val_loss"}
            or None,
        )
        evidence = getattr(self.args, "sample_evidence", None)
        if evidence is not None and self.sampled.get(step):
            for key, value in evidence.score(self.sampled[step]).items():
                setattr(row, key, value)
            if row.near_copies:
                row.note = f"{row.near_copies} sample(s) near-copy a training target"
        self.table.rows = [r for r in self.table.rows if r.step != step or r.name != row.name] + [row]
        write_table(self.output_dir, self.table)
        self.checkpoint_scoring_seconds += time.perf_counter() - started
        chosen = self.table.recommendation()
        log.info("checkpoints so far:\n%s", format_table(self.table))
        self.reporter.update(
            recommendation=chosen.reason if chosen else None,
            recommended_checkpoint=chosen.name if chosen else None,
            validation_seconds=round(self.validation_seconds, 3),
            checkpoint_sampling_seconds=round(self.checkpoint_sampling_seconds, 3),
            checkpoint_scoring_seconds=round(self.checkpoint_scoring_seconds, 3),
            run_seconds=round(time.time() - self.started, 3),
        )

    def sample(self, epoch: int | None) -> None:
        """Draw the sample prompts with the current LoRA (main process) and pass the images to the hooks."""
        if not self.samples:
            return
        accelerator, step = self.accelerator, self.progress["step"]
        self.sampled[step] = []  # the images, on the main process
        self.reporter.update(JobState.SAMPLING)
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(self.transformer)
            model.eval()
            with accelerator.autocast():
                paths = save_samples(
                    self.samples,
                    transformer=model,
                    vae=self.vae,
                    output_dir=self.output_dir,
                    output_name=self.args.output_name,
                    step=step,
                    epoch=epoch,
                    device=self.device,
                    dtype=self.weight_dtype,
                    shift_terminal=self.args.sample_shift_terminal,
                )
            model.train()
            metrics = {}
            for hook in self.hooks:
                metrics.update(hook.on_samples(step, paths, self.samples))
            if metrics:
                self.reporter.metrics({"step": step, **metrics})
                self.reporter.status.update(metrics)
                if self.args.logging_dir:
                    accelerator.log(metrics, step=step)
            self.reporter.status["last_sample_step"] = step
            self.sampled[step] = paths
            log.info("wrote %d sample(s) at step %d", len(paths), step)
        accelerator.wait_for_everyone()
        self.reporter.update(JobState.TRAINING)


def memory_inputs(args: argparse.Namespace, group: DatasetGroup, hooks: Sequence[TrainingHook] = ()) -> MemoryInputs:
    """The memory plan's inputs: flags, the largest bucket with its controls, the longest cached prompt,
    and what the hooks' losses keep for backward."""
    largest = max(group.items, key=lambda item: sum(map(image_tokens, (item.bucket, *item.control_buckets))))
    text_tokens = 0
    for item in group.items:
        with safe_open(str(text_cache_path(item)), framework="pt") as handle:
            text_tokens = max(text_tokens, handle.get_slice("prompt_embeds").get_shape()[0])
    return MemoryInputs(
        transformer_config=models.architecture_config(
            models.read_header(args.dit, "DiT (--dit)"), models.TRANSFORMER_CONFIG
        ),
        vae_config=models.architecture_config(models.read_header(args.vae, "VAE (--vae)"), models.VAE_CONFIG),
        compute_bytes=_dtype(args.mixed_precision).itemsize,
        fp8_base=args.fp8_base,
        blocks_to_swap=args.blocks_to_swap,
        gradient_checkpointing=args.gradient_checkpointing,
        batch_size=max(d.batch_size for d in group.datasets),
        target_size=largest.bucket,
        control_sizes=largest.control_buckets,
        text_tokens=text_tokens,
        network_dim=args.network_dim,
        network_args=parse_network_args(args.network_args),
        optimizer=args.optimizer_type,
        face_decode=args.face_decode if args.use_face_as_loss else None,
        face_recognizer_saved_bytes=sum(hook.saved_bytes_per_sample() for hook in hooks),
        face_rollout_steps=args.face_loss_rollout_steps if args.use_face_as_loss else 1,
    )


def _report_memory_plan(
    args: argparse.Namespace,
    group: DatasetGroup,
    hooks: Sequence[TrainingHook],
    device: torch.device,
    reporter: StatusReporter,
) -> None:
    inputs = memory_inputs(args, group, hooks)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    plan = estimate(inputs, total)
    log.info("%s", plan.describe())
    warning = plan_warning(inputs, plan)
    if warning:
        log.warning("%s", warning)
    reporter.update(memory_plan={**plan.as_status(), "warning": warning})


def batch_velocity(
    transformer: torch.nn.Module, accelerator: Accelerator, batch: Batch, device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model's velocity with `batch`'s prompt and controls: (latents [B, 16, 1, h, w], t [B]) -> v, as latents."""
    controls = [c.to(device) for c in batch.controls]
    prompt_embeds = batch.prompt_embeds.to(device)
    prompt_mask = attention_mask(batch.prompt_mask.to(device))

    def velocity(latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        h, w = latents.shape[3], latents.shape[4]
        img_shapes = [
            [(1, h // 2, w // 2), *[(1, c.shape[3] // 2, c.shape[4] // 2) for c in controls]]
        ] * latents.shape[0]
        tokens = torch.cat([pack(latents), *[pack(c) for c in controls]], dim=1)
        with accelerator.autocast():
            prediction = transformer(
                hidden_states=tokens,
                timestep=timestep,
                encoder_hidden_states=prompt_embeds,
                encoder_hidden_states_mask=prompt_mask,
                img_shapes=img_shapes,
                return_dict=False,
            )[0]
        return unpack(prediction[:, : (h // 2) * (w // 2)].float(), h, w)

    return velocity


def micro_step(
    args: argparse.Namespace,
    transformer: torch.nn.Module,
    vae: torch.nn.Module,
    batch: Batch,
    generator: torch.Generator,
    device: torch.device,
    accelerator: Accelerator,
    step: int,
    hooks: list[TrainingHook],
) -> tuple[torch.Tensor, ExtraLoss]:
    x0 = batch.x0.to(device)
    _, _, _, h, w = x0.shape
    noise = torch.randn(x0.shape, generator=generator).to(device)
    t = sample_timesteps(args, x0.shape[0], (h // 2) * (w // 2), generator).to(device)
    t_5d = t.view(-1, 1, 1, 1, 1)
    x_t = (1 - t_5d) * x0 + t_5d * noise
    velocity = batch_velocity(transformer, accelerator, batch, device)
    v_pred = velocity(x_t, t)
    target = noise - x0
    weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, t_5d)
    loss = (weighting * (v_pred - target) ** 2).mean()
    extra = ExtraLoss()
    if hooks:
        state = StepState(step, x0, noise, x_t, t, v_pred, vae, batch.items, velocity)
        losses = []
        for hook in hooks:
            part = hook.extra_loss(state)
            extra.metrics.update(part.metrics)
            if part.loss is not None:
                losses.append(part.loss)
        extra.loss = sum(losses) if losses else None
    return loss, extra


__all__ = [
    "CheckpointWriteError",
    "TrainingDivergedError",
    "TrainingRun",
    "flow_shift",
    "micro_step",
    "prepare_transformer",
    "run_training",
    "sample_timesteps",
]
