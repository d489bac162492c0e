"""The training loop: cache, load the DiT, add LoRA, flow-matching steps, checkpoints, samples, status.

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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    set_seed,
)
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
)
from diffusers.hooks import apply_group_offloading
from diffusers.optimization import get_scheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift
from diffusers.training_utils import (
    cast_training_params,
    compute_loss_weighting_for_sd3,
)
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..common.files import atomic_write_text
from ..musubi_formats.dataset import DatasetGroup, DatasetItem
from ..musubi_formats.names import epoch_checkpoint_name, step_checkpoint_name
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
from .hooks import ExtraLoss, StepState, TrainingHook
from .host_memory import map_large_allocations
from .lora import (
    add_lora,
    load_comfy_lora,
    lora_file_modules,
    lora_target_modules,
    parse_network_args,
    save_lora,
)
from .memory_plan import MemoryInputs, estimate, image_tokens, plan_warning
from .sampling import EncodedSample, encode_samples, save_samples
from .state import load_state, save_state

log = logging.getLogger("face_consistency.trainer")

LOG_TAIL_LINES = 40
# Qwen-Image's scheduler config, used by `qwen_shift` to pick the shift from the image size.
QWEN_BASE_SEQ_LEN, QWEN_MAX_SEQ_LEN, QWEN_BASE_SHIFT, QWEN_MAX_SHIFT = 256, 8192, 0.5, 0.9
VAE_SCALE = 8


# --------------------------------------------------------------------------- extension point


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


def sample_timesteps(args: argparse.Namespace, batch_size: int, image_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Flow time t in (0, 1) per sample, as musubi's --timestep_sampling."""
    method = args.timestep_sampling
    if method == "uniform":
        return torch.rand(batch_size, generator=generator)
    if method == "sigma":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.discrete_flow_shift)
        index = torch.randint(0, len(scheduler.sigmas) - 1, (batch_size,), generator=generator)
        return scheduler.sigmas[index].float()
    t = torch.sigmoid(args.sigmoid_scale * torch.randn(batch_size, generator=generator))
    shift = flow_shift(args, image_tokens)
    return t * shift / (1 + (shift - 1) * t)


def flow_shift(args: argparse.Namespace, image_tokens: int) -> float:
    """The shift of `shift` sampling: fixed, or from the image size for `qwen_shift`."""
    if args.timestep_sampling == "qwen_shift":
        return math.exp(calculate_shift(image_tokens, QWEN_BASE_SEQ_LEN, QWEN_MAX_SEQ_LEN, QWEN_BASE_SHIFT, QWEN_MAX_SHIFT))
    return float(args.discrete_flow_shift)


def attention_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """The prompt mask, or None when it is all ones: PyTorch's fastest attention kernels refuse a mask."""
    return None if bool(mask.all()) else mask


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, h, w] -> [B, h/2 * w/2, 4C] (diffusers' Qwen packing)."""
    b, c, _, h, w = latents.shape
    return QwenImageEditPlusPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h/2 * w/2, 4C] -> [B, C, 1, h, w]."""
    return QwenImageEditPlusPipeline._unpack_latents(tokens, h * VAE_SCALE, w * VAE_SCALE, VAE_SCALE)


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


def _prepare_transformer(
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
        if args.blocks_to_swap and name.startswith("transformer_blocks."):
            if int(name.split(".", 2)[1]) >= first_swapped:
                return torch.device("cpu")
        return device

    # With --fp8_base the base weights are stored as float8 and upcast per layer for compute
    # (the LoRA, added below, stays fp32).
    if args.fp8_base and not args.gradient_checkpointing:
        log.warning("--fp8_base without --gradient_checkpointing: the backward pass keeps every layer's "
                    "upcast weight until it runs, so float8 storage saves little memory while training; "
                    "add --gradient_checkpointing")
    transformer = models.load_transformer(
        args.dit, weight_dtype, zero_cond_t=MODEL_VERSIONS[args.model_version].zero_cond_t,
        fp8_base=args.fp8_base, placement=placement,
    )
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
            block, onload_device=device, offload_device=torch.device("cpu"), offload_type="leaf_level",
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
            return _train(args, accelerator, reporter, stop, list(hooks))
    except BaseException as exc:  # noqa: BLE001 - every failure must end in state `failed`
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


def _train(
    args: argparse.Namespace, accelerator: Accelerator, reporter: StatusReporter, stop: StopSignal,
    hooks: list[TrainingHook],
) -> JobState:
    output_dir = Path(args.output_dir)
    device = accelerator.device
    weight_dtype = _dtype(args.mixed_precision)
    set_seed(args.seed)
    started = time.time()

    def stop_reason() -> str | None:
        local = stop.received or ("STOP file" if stop_requested(output_dir) else None)
        if accelerator.num_processes == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=device)
        return (local or "stop requested by another process") if accelerator.reduce(flag, "max").item() > 0 else None

    if args.blocks_to_swap and accelerator.num_processes > 1:
        raise ValueError("--blocks_to_swap works with a single process only (it trades GPU memory for speed)")

    # ---- data and caches (text encoder and VAE only; the DiT is loaded afterwards)
    group: DatasetGroup = args.dataset_group
    items = group.items
    log.info("dataset: %d images in %d dataset(s)", len(items), len(group.datasets))
    reporter.update(JobState.CACHING, num_images=len(items))
    version = MODEL_VERSIONS[args.model_version]
    vae = models.load_vae(args.vae, torch.float32 if args.mixed_precision == "no" else weight_dtype, device)

    def load_text_side() -> tuple[torch.nn.Module, Any]:
        log.info("loading the text encoder %s", args.text_encoder)
        return models.load_text_encoder(args.text_encoder, weight_dtype, device), models.load_processor(args.tokenizer)

    pipeline_class = QwenImageEditPlusPipeline if version.several_controls else QwenImageEditPipeline
    pipeline = pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None, processor=None,
        transformer=None,
    )
    encoders = CacheEncoders(
        pipeline, Path(args.vae), Path(args.text_encoder), weight_dtype,
        str(args.tokenizer or models.DEFAULT_PROCESSOR_REPO), version.several_controls, device, load_text_side,
    )
    # Each process caches its share (a long single-process caching run would time out the others).
    share = items[accelerator.process_index :: accelerator.num_processes]
    def should_stop() -> bool:  # this process only: cheap enough to ask per cached file
        return stop.received is not None or stop_requested(output_dir)

    def stopped_before_training() -> bool:
        reason = stop_reason()
        if reason:
            reporter.update(JobState.STOPPED, stop_reason=reason, last_checkpoint=None)
        return reason is not None

    counts = cache_dataset(
        share, encoders, should_stop=should_stop,
        progress=lambda done, total: reporter.update(cached=done, cache_total=total),
    )
    log.info("cache: %d file(s) built, %d reused", counts["built"], counts["reused"])
    reporter.update(cache_built=counts["built"], cache_reused=counts["reused"])
    accelerator.wait_for_everyone()
    if stopped_before_training():
        return JobState.STOPPED
    samples: list[EncodedSample] = []
    if args.sample_prompts:
        samples = encode_samples(args.sample_settings, encoders)
    for hook in hooks:
        reporter.update(**hook.on_cached(items, accelerator, should_stop))
    if stopped_before_training():
        return JobState.STOPPED
    if accelerator.is_main_process:
        _report_memory_plan(args, group, hooks, device, reporter)
    del pipeline, encoders
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # ---- the DiT with LoRA
    transformer, lora_params = _prepare_transformer(args, device, weight_dtype)

    # ---- schedule
    steps_per_epoch = math.ceil(len(epoch_batches(group, 0, args.seed, accelerator.process_index, accelerator.num_processes))
                                / args.gradient_accumulation_steps)
    if steps_per_epoch == 0:
        raise ValueError(
            f"the dataset yields no batch per process ({len(items)} images, {accelerator.num_processes} processes)"
        )
    if args.max_train_epochs:
        args.max_train_steps = args.max_train_epochs * steps_per_epoch
    total_steps = args.max_train_steps
    total_epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer = _make_optimizer(args, lora_params)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
        num_cycles=args.lr_scheduler_num_cycles, power=args.lr_scheduler_power,
    )
    # With swapped blocks the placement above must survive: accelerate must not move the model.
    transformer = accelerator.prepare_model(transformer, device_placement=not args.blocks_to_swap)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    if accelerator.is_main_process and args.logging_dir:
        accelerator.init_trackers(args.log_tracker_name or "face_consistency", config={
            k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    generator = torch.Generator("cpu").manual_seed(args.seed + accelerator.process_index)
    progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    if args.resume:
        load_state(Path(args.resume), accelerator, transformer, generator, progress)
        log.info("resumed from %s at step %d, epoch %d", args.resume, progress["step"], progress["epoch"] + 1)
        if accelerator.is_main_process:
            # Resuming into the same folder: steps after the state are about to be redone.
            kept = [m for m in read_metrics(output_dir) if m.get("step", 0) <= progress["step"]]
            atomic_write_text(output_dir / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in kept))

    reporter.update(
        JobState.TRAINING, step=progress["step"], total_steps=total_steps, epoch=progress["epoch"] + 1,
        total_epochs=total_epochs, steps_per_epoch=steps_per_epoch, last_checkpoint=None, last_sample_step=None,
    )

    def save_checkpoint(file_name: str, state_name: str | None) -> None:
        for param in lora_params:
            check_finite(progress["step"], "LoRA weight", param.detach())
        reporter.update(JobState.SAVING)
        with checkpoint_write(output_dir / file_name):
            if accelerator.is_main_process:
                path = save_lora(
                    output_dir / file_name, accelerator.unwrap_model(transformer), args.network_alpha,
                    _lora_metadata(args, progress["step"], progress["epoch"] + 1, len(items), started),
                    torch.float32 if args.mixed_precision == "no" else weight_dtype,
                )
                reporter.status["last_checkpoint"] = str(path)
                log.info("saved %s", path)
        if state_name is not None:
            with checkpoint_write(output_dir / state_name):
                save_state(output_dir / state_name, accelerator, transformer, generator, progress)
        accelerator.wait_for_everyone()

    def sample(epoch: int | None) -> None:
        if not samples:
            return
        reporter.update(JobState.SAMPLING)
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(transformer)
            model.eval()
            with accelerator.autocast():
                paths = save_samples(
                    samples, transformer=model, vae=vae, output_dir=output_dir, output_name=args.output_name,
                    step=progress["step"], epoch=epoch, device=device, dtype=weight_dtype,
                    shift_terminal=args.sample_shift_terminal,
                )
            model.train()
            metrics = {}
            for hook in hooks:
                metrics.update(hook.on_samples(progress["step"], paths, samples))
            if metrics:
                reporter.metrics({"step": progress["step"], **metrics})
                reporter.status.update(metrics)
                if args.logging_dir:
                    accelerator.log(metrics, step=progress["step"])
            reporter.status["last_sample_step"] = progress["step"]
            log.info("wrote %d sample(s) at step %d", len(paths), progress["step"])
        accelerator.wait_for_everyone()
        reporter.update(JobState.TRAINING)

    if args.sample_at_first and progress["step"] == 0:
        sample(None)

    bar = tqdm(total=total_steps, initial=progress["step"], disable=not accelerator.is_local_main_process,
               desc="steps", dynamic_ncols=True)
    recent_losses: collections.deque[float] = collections.deque(maxlen=max(steps_per_epoch, 10))
    step_times: collections.deque[float] = collections.deque(maxlen=20)
    last_step_end = time.time()
    stopped_by: str | None = None
    micro_losses: list[torch.Tensor] = []  # flow-matching losses of the micro-batches of one optimizer step

    while progress["step"] < total_steps and stopped_by is None:
        epoch = progress["epoch"]
        batches = epoch_batches(group, epoch, args.seed, accelerator.process_index, accelerator.num_processes)
        while progress["batch_in_epoch"] < len(batches) and progress["step"] < total_steps:
            batch = collate(batches[progress["batch_in_epoch"]])
            progress["batch_in_epoch"] += 1
            with accelerator.accumulate(transformer):
                loss, extra = _micro_step(args, transformer, vae, batch, generator, device, accelerator,
                                          progress["step"] + 1, hooks)
                check_finite(progress["step"] + 1, "flow-matching loss", loss)
                if extra.loss is not None:
                    check_finite(progress["step"] + 1, "extra loss (face identity)", extra.loss)
                accelerator.backward(loss + (extra.loss if extra.loss is not None else 0))
                if accelerator.sync_gradients and args.max_grad_norm:
                    norm = accelerator.clip_grad_norm_(lora_params, args.max_grad_norm)
                    check_finite(progress["step"] + 1, "gradient norm", torch.as_tensor(norm))
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro_losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            progress["step"] += 1
            loss_value = accelerator.reduce(torch.stack(micro_losses).mean(), "mean").item()
            micro_losses.clear()
            recent_losses.append(loss_value)
            now = time.time()
            step_times.append(now - last_step_end)
            last_step_end = now
            steps_per_sec = len(step_times) / sum(step_times)
            average = sum(recent_losses) / len(recent_losses)
            lr = lr_scheduler.get_last_lr()[0]
            record = {"step": progress["step"], "epoch": epoch + 1, "loss": loss_value, "avg_loss": average,
                      "lr": lr, "steps_per_sec": steps_per_sec, "time": now, **extra.metrics}
            reporter.metrics(record)
            if args.logging_dir:
                accelerator.log({"loss/current": loss_value, "loss/average": average, "lr/unet": lr,
                                 **extra.metrics}, step=progress["step"])
            reporter.update(
                step=progress["step"], epoch=epoch + 1, loss=loss_value, avg_loss=average, lr=lr,
                steps_per_sec=steps_per_sec, eta_sec=(total_steps - progress["step"]) / steps_per_sec,
                **extra.metrics,
            )
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", avr_loss=f"{average:.4f}")
            stopped_by = stop_reason()
            if stopped_by is not None:
                break
            step = progress["step"]
            if args.save_every_n_steps and step % args.save_every_n_steps == 0 and step < total_steps:
                name = step_checkpoint_name(args.output_name, step)
                save_checkpoint(f"{name}.safetensors", f"{name}-state" if args.save_state else None)
            if args.sample_every_n_steps and step % args.sample_every_n_steps == 0:
                sample(None)
        if stopped_by is None and progress["batch_in_epoch"] >= len(batches):
            progress["epoch"] += 1
            progress["batch_in_epoch"] = 0
            finished = progress["epoch"]
            if args.save_every_n_epochs and finished % args.save_every_n_epochs == 0 and progress["step"] < total_steps:
                name = epoch_checkpoint_name(args.output_name, finished)
                save_checkpoint(f"{name}.safetensors", f"{name}-state" if args.save_state else None)
            if args.sample_every_n_epochs and finished % args.sample_every_n_epochs == 0:
                sample(finished)
    bar.close()

    if stopped_by is not None:
        log.info("stop requested (%s): saving a checkpoint at step %d", stopped_by, progress["step"])
        reporter.update(JobState.STOPPING, stop_reason=stopped_by)
        name = step_checkpoint_name(args.output_name, progress["step"])
        save_checkpoint(f"{name}.safetensors", f"{name}-state")
        reporter.update(JobState.STOPPED)
        return JobState.STOPPED
    save_checkpoint(f"{args.output_name}.safetensors", f"{args.output_name}-state" if args.save_state else None)
    reporter.update(JobState.COMPLETED, eta_sec=0)
    return JobState.COMPLETED


def memory_inputs(args: argparse.Namespace, group: DatasetGroup, hooks: Sequence[TrainingHook] = ()) -> MemoryInputs:
    """The memory plan's inputs: flags, the largest bucket with its controls, the longest cached prompt,
    and what the hooks' losses keep for backward."""
    largest = max(group.items, key=lambda item: sum(map(image_tokens, (item.bucket, *item.control_buckets))))
    text_tokens = 0
    for item in group.items:
        with safe_open(str(text_cache_path(item)), framework="pt") as handle:
            text_tokens = max(text_tokens, handle.get_slice("prompt_embeds").get_shape()[0])
    return MemoryInputs(
        transformer_config=models.architecture_config(models.read_header(args.dit, "DiT (--dit)"), models.TRANSFORMER_CONFIG),
        vae_config=models.architecture_config(models.read_header(args.vae, "VAE (--vae)"), models.VAE_CONFIG),
        compute_bytes=_dtype(args.mixed_precision).itemsize, fp8_base=args.fp8_base, blocks_to_swap=args.blocks_to_swap,
        gradient_checkpointing=args.gradient_checkpointing, batch_size=max(d.batch_size for d in group.datasets),
        target_size=largest.bucket, control_sizes=largest.control_buckets, text_tokens=text_tokens,
        network_dim=args.network_dim, network_args=parse_network_args(args.network_args), optimizer=args.optimizer_type,
        face_decode=args.face_decode if args.use_face_as_loss else None,
        face_recognizer_saved_bytes=sum(hook.saved_bytes_per_sample() for hook in hooks),
    )


def _report_memory_plan(args: argparse.Namespace, group: DatasetGroup, hooks: Sequence[TrainingHook],
                        device: torch.device, reporter: StatusReporter) -> None:
    inputs = memory_inputs(args, group, hooks)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    plan = estimate(inputs, total)
    log.info("%s", plan.describe())
    warning = plan_warning(inputs, plan)
    if warning:
        log.warning("%s", warning)
    reporter.update(memory_plan={**plan.as_status(), "warning": warning})


def _micro_step(
    args: argparse.Namespace, transformer: torch.nn.Module, vae: torch.nn.Module, batch: Batch,
    generator: torch.Generator, device: torch.device, accelerator: Accelerator, step: int, hooks: list[TrainingHook],
) -> tuple[torch.Tensor, ExtraLoss]:
    x0 = batch.x0.to(device)
    _, _, _, h, w = x0.shape
    noise = torch.randn(x0.shape, generator=generator).to(device)
    t = sample_timesteps(args, x0.shape[0], (h // 2) * (w // 2), generator).to(device)
    t_5d = t.view(-1, 1, 1, 1, 1)
    x_t = (1 - t_5d) * x0 + t_5d * noise
    controls = [c.to(device) for c in batch.controls]
    tokens = torch.cat([pack(x_t), *[pack(c) for c in controls]], dim=1)
    img_shapes = [[(1, h // 2, w // 2), *[(1, c.shape[3] // 2, c.shape[4] // 2) for c in controls]]] * x0.shape[0]
    with accelerator.autocast():
        prediction = transformer(
            hidden_states=tokens,
            timestep=t,
            encoder_hidden_states=batch.prompt_embeds.to(device),
            encoder_hidden_states_mask=attention_mask(batch.prompt_mask.to(device)),
            img_shapes=img_shapes,
            return_dict=False,
        )[0]
    v_pred = unpack(prediction[:, : (h // 2) * (w // 2)].float(), h, w)
    target = noise - x0
    weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, t_5d)
    loss = (weighting * (v_pred - target) ** 2).mean()
    extra = ExtraLoss()
    if hooks:
        state = StepState(step, x0, noise, x_t, t, v_pred, vae, batch.items)
        losses = []
        for hook in hooks:
            part = hook.extra_loss(state)
            extra.metrics.update(part.metrics)
            if part.loss is not None:
                losses.append(part.loss)
        extra.loss = sum(losses) if losses else None
    return loss, extra


__all__ = ["ExtraLoss", "StepState", "TrainingDivergedError", "TrainingHook", "run_training", "sample_timesteps", "flow_shift", "pack", "unpack"]
