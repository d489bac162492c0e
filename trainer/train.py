"""The training loop: a `TrainingRun` goes through the job's steps, in the order `TrainingRun.run` lists them.

`run_training` sets up the process (accelerate, the log tail, signals, the status of a failure); the
run then loads the encoders, caches the dataset, encodes the sample prompts and lets the hooks cache
theirs, reports the memory plan, loads the DiT with its LoRA, optimizer and schedule, resumes, trains
(optimizer steps of `flow_matching.micro_step`, the algorithm, with checkpoints, samples and
validation on the way) and finishes with the last checkpoint.

The job protocol (`protocol.py`) is written throughout (`job_status.py`): status.json on every state
change and step, metrics.jsonl per step. A STOP file or SIGTERM/SIGINT finishes the current step, saves
a checkpoint (LoRA and resumable state) and ends in `stopped`; an exception ends in `failed`.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.hooks import apply_group_offloading
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from tqdm.auto import tqdm

from ..common.files import atomic_write_text
from ..musubi_formats.dataset import DatasetGroup, DatasetItem
from ..musubi_formats.names import epoch_checkpoint_name, step_checkpoint_name
from ..training_contract import libraries
from ..training_contract.checkpoint_choice import CheckpointRow, CheckpointTable, format_table, read_table, write_table
from ..training_contract.model_versions import MODEL_VERSIONS, QWEN_IMAGE_21
from ..training_contract.options import NETWORK_MODULE
from ..training_contract.protocol import METRICS_FILE, JobState, clear_stop_request, read_metrics, stop_requested
from . import models
from . import qwen_image21_loading as q21
from .cache import CacheEncoders, Encoders, QwenImage21Encoders, cache_dataset, latent_cache_path, text_cache_path
from .checkpoint_eval import SampleEvidence, ValidationLoss
from .config import TrainingConfig
from .flow_matching import Batch, batch_velocity, collate, micro_step
from .hooks import ExtraLoss, TrainingHook
from .host_memory import map_large_allocations
from .job_status import (
    CheckpointWriteError,
    LogTail,
    StatusReporter,
    StepMeter,
    StopSignal,
    TrainingDivergedError,
    check_finite,
    checkpoint_write,
    failure_log_tail,
    unfinished_saves,
)
from .lora import add_lora, load_comfy_lora, lora_file_modules, lora_target_modules, parse_network_args, save_lora
from .memory_plan import MemoryInputs, estimate, image_tokens, plan_warning
from .positions import set_positions
from .sampling import EncodedSample, encode_samples, save_samples
from .state import load_state, save_state
from .vae_decode import vae_scale

log = logging.getLogger("face_consistency.trainer")


def run_training(
    config: TrainingConfig, hooks: Sequence[TrainingHook] = (), evidence: SampleEvidence | None = None
) -> JobState:
    """Run one training job (`cli.validate_args` makes its configuration); returns its final state."""
    map_large_allocations()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tail = LogTail()
    package_logger = logging.getLogger("face_consistency")
    package_logger.addHandler(tail)
    reporter = StatusReporter(output_dir, True, {"output_name": config.output_name, "output_dir": str(output_dir)})
    accelerator = None
    try:
        accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with="tensorboard" if config.logging_dir else None,
            project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=config.logging_dir),
            # musubi's target set (and a LoRA file from it) holds layers that get no gradient
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=_may_hold_dead_ends(config))],
        )
        reporter.enabled = accelerator.is_main_process
        reporter.status["num_processes"] = accelerator.num_processes
        # which libraries, from which folder (the trainer environment's or ComfyUI's), this job runs with
        reporter.status["libraries"] = libraries.versions()
        log.info("libraries: %s", ", ".join(libraries.describe(reporter.status["libraries"])))
        if accelerator.is_main_process:
            clear_stop_request(output_dir)
            for leftover in unfinished_saves(output_dir, config.output_name):
                log.info("removing %s, left by a save that was cut short", leftover)
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
        stop = StopSignal()
        with stop.installed():
            reporter.update(JobState.STARTING, step=0, total_steps=config.max_train_steps, epoch=0)
            return TrainingRun(config, accelerator, reporter, stop, list(hooks), evidence).run()
    except BaseException as exc:
        log.error("training failed: %s", exc)
        reporter.update(JobState.FAILED, error=f"{type(exc).__name__}: {exc}", log_tail=failure_log_tail(tail, exc))
        raise
    finally:
        package_logger.removeHandler(tail)
        if accelerator is not None:
            accelerator.end_training()
            if accelerator.num_processes == 1:
                # accelerate keeps its state process-wide; a later in-process run may pick other settings.
                AcceleratorState._reset_state(reset_partial_state=True)


class TrainingRun:
    """One training job, from the dataset cache to the final checkpoint; `run()` reads as its steps.

    `progress` (step, epoch, batch within the epoch) is the resumable position that `save_state`
    writes and `load_state` restores.
    """

    def __init__(
        self,
        config: TrainingConfig,
        accelerator: Accelerator,
        reporter: StatusReporter,
        stop: StopSignal,
        hooks: list[TrainingHook],
        evidence: SampleEvidence | None = None,
    ) -> None:
        self.config = config
        self.accelerator = accelerator
        self.reporter = reporter
        self.stop = stop
        self.hooks = hooks
        self.evidence = evidence  # what scores each checkpoint's samples (`checkpoint_eval.py`)
        self.output_dir = Path(config.output_dir)
        self.device = accelerator.device
        self.weight_dtype = _dtype(config.mixed_precision)
        self.group: DatasetGroup = config.dataset_group
        self.started = time.time()
        self.progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
        self.samples: list[EncodedSample] = []
        held_out = self.group.validation_items
        self.validation = (
            ValidationLoss(held_out, config.validation_sigmas, config.validation_seed) if held_out else None
        )
        self.validated: dict[int, dict[str, float]] = {}  # step -> its validation loss
        self.sampled: dict[int, list[Path]] = {}  # step -> the samples drawn at it
        self.table = CheckpointTable(
            sigmas=tuple(config.validation_sigmas),
            references=len(config.likeness_reference_paths),
            validation_items=len(held_out),
        )
        # what validation and the checkpoints' samples and scoring cost, against the run's time
        self.validation_seconds = self.checkpoint_sampling_seconds = self.checkpoint_scoring_seconds = 0.0

    def run(self) -> JobState:
        if self.config.blocks_to_swap and self.accelerator.num_processes > 1:
            raise ValueError("--blocks_to_swap works with a single process only (it trades GPU memory for speed)")
        set_seed(self.config.seed)
        encoders = self.load_encoders()
        self.cache_dataset(encoders)
        if self.stopped_before_training():
            return JobState.STOPPED
        self.prepare_samples_and_hooks(encoders)
        if self.stopped_before_training():
            return JobState.STOPPED
        self.report_memory_plan()
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
        if self.config.sample_at_first and self.progress["step"] == 0:
            self.sample(None)
        stopped_by = self.train()
        return self.finish(stopped_by)

    # ---- the job, in the order `run` goes through it

    def load_encoders(self) -> Encoders:
        """The VAE (kept for sampling and the hooks) and, loaded when first needed, the text encoder."""
        config = self.config
        version = MODEL_VERSIONS[config.model_version]
        vae_dtype = torch.float32 if config.mixed_precision == "no" else self.weight_dtype
        if version.family == QWEN_IMAGE_21:
            self.vae: torch.nn.Module = q21.load_vae(config.vae, vae_dtype, self.device)

            def load_21_text_side() -> tuple[torch.nn.Module, Any]:
                log.info("loading the text encoder %s", config.text_encoder)
                return (
                    q21.load_text_encoder(config.text_encoder, self.weight_dtype, self.device),
                    q21.load_processor(config.tokenizer),
                )

            return QwenImage21Encoders(
                self.vae,
                Path(config.vae),
                Path(config.text_encoder),
                self.weight_dtype,
                str(config.tokenizer or q21.PROCESSOR_REPO),
                self.device,
                load_21_text_side,
            )
        self.vae = models.load_vae(config.vae, vae_dtype, self.device)

        def load_text_side() -> tuple[torch.nn.Module, Any]:
            log.info("loading the text encoder %s", config.text_encoder)
            return (
                models.load_text_encoder(config.text_encoder, self.weight_dtype, self.device),
                models.load_processor(config.tokenizer),
            )

        pipeline_class = QwenImageEditPlusPipeline if version.several_controls else QwenImageEditPipeline
        pipeline = pipeline_class(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=self.vae,
            text_encoder=None,  # type: ignore[arg-type]
            tokenizer=None,  # type: ignore[arg-type]
            processor=None,  # type: ignore[arg-type]
            transformer=None,  # type: ignore[arg-type]
        )
        return CacheEncoders(
            pipeline,
            Path(config.vae),
            Path(config.text_encoder),
            self.weight_dtype,
            str(config.tokenizer or models.DEFAULT_PROCESSOR_REPO),
            version.several_controls,
            self.device,
            load_text_side,
        )

    def cache_dataset(self, encoders: Encoders) -> None:
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

    def stopped_before_training(self) -> bool:
        reason = self.stop_reason()
        if reason:
            self.reporter.update(JobState.STOPPED, stop_reason=reason, last_checkpoint=None)
        return reason is not None

    def prepare_samples_and_hooks(self, encoders: Encoders) -> None:
        """The sample prompts encoded, and the hooks' own caches (the face targets)."""
        if self.config.sample_prompts:
            self.samples = encode_samples(self.config.sample_settings, encoders)
        for hook in self.hooks:
            self.reporter.update(**hook.on_cached(self.group.items, self.accelerator, self.should_stop))

    def report_memory_plan(self) -> None:
        """The memory plan of this job on this device, logged and in status.json (main process)."""
        if not self.accelerator.is_main_process:
            return
        inputs = memory_inputs(self.config, self.group, self.hooks)
        total = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None
        plan = estimate(inputs, total)
        log.info("%s", plan.describe())
        warning = plan_warning(inputs, plan)
        if warning:
            log.warning("%s", warning)
        self.reporter.update(memory_plan={**plan.as_status(), "warning": warning})

    def prepare_training(self) -> None:
        config, accelerator = self.config, self.accelerator
        transformer, self.lora_params = prepare_transformer(config, self.device, self.weight_dtype)
        batches = epoch_batches(self.group, 0, config.seed, accelerator.process_index, accelerator.num_processes)
        self.steps_per_epoch = math.ceil(len(batches) / config.gradient_accumulation_steps)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the dataset yields no batch per process ({len(self.group.items)} images, "
                f"{accelerator.num_processes} processes)"
            )
        self.total_steps = (
            config.max_train_epochs * self.steps_per_epoch if config.max_train_epochs else config.max_train_steps
        )
        self.total_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        optimizer = _make_optimizer(config, self.lora_params)
        lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer,
            num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=self.total_steps * accelerator.num_processes,
            num_cycles=config.lr_scheduler_num_cycles,
            power=config.lr_scheduler_power,
        )
        # With swapped blocks the placement above must survive: accelerate must not move the model.
        self.transformer = accelerator.prepare_model(transformer, device_placement=not config.blocks_to_swap)
        self.optimizer, self.lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
        if accelerator.is_main_process and config.logging_dir:
            accelerator.init_trackers(
                config.log_tracker_name or "face_consistency",
                config={**scalar_settings(config), "max_train_steps": self.total_steps},
            )
        self.generator = torch.Generator("cpu").manual_seed(config.seed + accelerator.process_index)

    def resume(self) -> None:
        if not self.config.resume:
            return
        load_state(Path(self.config.resume), self.accelerator, self.transformer, self.generator, self.progress)
        log.info(
            "resumed from %s at step %d, epoch %d",
            self.config.resume,
            self.progress["step"],
            self.progress["epoch"] + 1,
        )
        if self.accelerator.is_main_process:
            # Resuming into the same folder: steps after the state are about to be redone.
            kept = [m for m in read_metrics(self.output_dir) if m.get("step", 0) <= self.progress["step"]]
            atomic_write_text(self.output_dir / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in kept))
            earlier = read_table(self.output_dir)
            if earlier is not None:
                self.table.rows = [row for row in earlier.rows if row.step <= self.progress["step"]]

    def train(self) -> str | None:
        """Optimizer steps to the last one, saving and sampling on the way; returns why it stopped
        early, or None when it reached the end."""
        config, progress = self.config, self.progress
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
                    self.group, epoch, config.seed, accelerator.process_index, accelerator.num_processes
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

    def finish(self, stopped_by: str | None) -> JobState:
        """The last checkpoint: the final LoRA, or on a stop one at the current step with its state to resume."""
        if stopped_by is not None:
            log.info("stop requested (%s): saving a checkpoint at step %d", stopped_by, self.progress["step"])
            self.reporter.update(JobState.STOPPING, stop_reason=stopped_by)
            saved = self.save_checkpoint(
                step_checkpoint_name(self.config.output_name, self.progress["step"]), with_state=True
            )
            self.list_stop_checkpoint(saved)
            self.reporter.update(JobState.STOPPED)
            return JobState.STOPPED
        saved = self.save_checkpoint(self.config.output_name, with_state=self.config.save_state)
        self.record_checkpoint(saved, None)
        self.reporter.update(JobState.COMPLETED, eta_sec=0)
        return JobState.COMPLETED

    # ---- one optimizer step, and what follows it (`train`)

    def accumulate(self, batch: Batch) -> tuple[torch.Tensor, ExtraLoss]:
        """One micro-batch's forward and backward; the optimizer steps when the accumulation is complete."""
        step = self.progress["step"] + 1
        with self.accelerator.accumulate(self.transformer):
            loss, extra = micro_step(
                self.config,
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
            if self.accelerator.sync_gradients and self.config.max_grad_norm:
                norm = self.accelerator.clip_grad_norm_(self.lora_params, self.config.max_grad_norm)
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
        if self.config.logging_dir:
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
        config = self.config
        saved = None
        if config.save_every_n_steps and step % config.save_every_n_steps == 0 and step < self.total_steps:
            saved = self.save_checkpoint(step_checkpoint_name(config.output_name, step), with_state=config.save_state)
        if config.sample_every_n_steps and step % config.sample_every_n_steps == 0:
            self.sample(None)
        if config.validate_every_n_steps and step % config.validate_every_n_steps == 0:
            self.validate()
        if saved is not None:
            self.record_checkpoint(saved, None)

    def after_epoch(self, finished: int) -> None:
        config = self.config
        saved = None
        if (
            config.save_every_n_epochs
            and finished % config.save_every_n_epochs == 0
            and self.progress["step"] < self.total_steps
        ):
            saved = self.save_checkpoint(
                epoch_checkpoint_name(config.output_name, finished), with_state=config.save_state
            )
        if config.sample_every_n_epochs and finished % config.sample_every_n_epochs == 0:
            self.sample(finished)
        if saved is not None:
            self.record_checkpoint(saved, finished)

    # ---- checkpoints, samples and validation

    def save_checkpoint(self, stem: str, *, with_state: bool) -> Path:
        """`{stem}.safetensors` (the LoRA, ComfyUI's format) and, `with_state`, `{stem}-state/` to resume from;
        returns the LoRA's path."""
        config, accelerator = self.config, self.accelerator
        for param in self.lora_params:
            check_finite(self.progress["step"], "LoRA weight", param.detach())
        self.reporter.update(JobState.SAVING)
        lora_file = self.output_dir / f"{stem}.safetensors"
        with checkpoint_write(lora_file):
            if accelerator.is_main_process:
                path = save_lora(
                    lora_file,
                    accelerator.unwrap_model(self.transformer),
                    config.network_alpha,
                    _lora_metadata(
                        config,
                        self.progress["step"],
                        self.progress["epoch"] + 1,
                        self.total_steps,
                        len(self.group.items),
                        self.started,
                    ),
                    torch.float32 if config.mixed_precision == "no" else self.weight_dtype,
                )
                self.reporter.status["last_checkpoint"] = str(path)
                log.info("saved %s", path)
        if with_state:
            state_dir = self.output_dir / f"{stem}-state"
            with checkpoint_write(state_dir):
                save_state(state_dir, accelerator, self.transformer, self.generator, self.progress)
        accelerator.wait_for_everyone()
        return lora_file

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
                    output_name=self.config.output_name,
                    step=step,
                    epoch=epoch,
                    device=self.device,
                    dtype=self.weight_dtype,
                    shift_terminal=self.config.sample_shift_terminal,
                )
            model.train()
            metrics = {}
            for hook in self.hooks:
                metrics.update(hook.on_samples(step, paths, self.samples))
            if metrics:
                self.reporter.metrics({"step": step, **metrics})
                self.reporter.status.update(metrics)
                if self.config.logging_dir:
                    accelerator.log(metrics, step=step)
            self.reporter.status["last_sample_step"] = step
            self.sampled[step] = paths
            log.info("wrote %d sample(s) at step %d", len(paths), step)
        accelerator.wait_for_everyone()
        self.reporter.update(JobState.TRAINING)

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
            if self.config.logging_dir:
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
        evidence = self.evidence
        if evidence is not None and self.sampled.get(step):
            for key, value in evidence.score(self.sampled[step]).items():
                setattr(row, key, value)
            if row.near_copies:
                row.note = f"{row.near_copies} sample(s) near-copy a training target"
        self.table.rows = [r for r in self.table.rows if r.step != step or r.name != row.name] + [row]
        self.publish_table()
        self.checkpoint_scoring_seconds += time.perf_counter() - started
        self.reporter.update(
            validation_seconds=round(self.validation_seconds, 3),
            checkpoint_sampling_seconds=round(self.checkpoint_sampling_seconds, 3),
            checkpoint_scoring_seconds=round(self.checkpoint_scoring_seconds, 3),
            run_seconds=round(time.time() - self.started, 3),
        )

    def list_stop_checkpoint(self, lora_file: Path) -> None:
        """The checkpoint saved on a stop gets its row of checkpoints.json without figures: a stop is not
        held up by validation and sampling."""
        if not self.accelerator.is_main_process:
            return
        row = CheckpointRow(lora_file.name, self.progress["step"], note="saved on stop: not validated or sampled")
        self.table.rows = [r for r in self.table.rows if r.name != row.name] + [row]
        self.publish_table()

    def publish_table(self) -> None:
        """checkpoints.json rewritten, the table logged and the checkpoint to keep reported."""
        write_table(self.output_dir, self.table)
        chosen = self.table.recommendation()
        log.info("checkpoints so far:\n%s", format_table(self.table))
        self.reporter.update(
            recommendation=chosen.reason if chosen else None,
            recommended_checkpoint=chosen.name if chosen else None,
        )

    # ---- stopping: a signal, the STOP file, another process

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


# --------------------------------------------------------------------------- what the run is made of


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


def prepare_transformer(
    config: TrainingConfig, device: torch.device, weight_dtype: torch.dtype
) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """Load the DiT, apply the memory options, add the LoRA (fp32, on the device); returns its parameters."""
    header = models.read_header(config.dit, "DiT (--dit)")
    num_blocks = models.count_transformer_blocks(header)
    if config.blocks_to_swap and config.blocks_to_swap >= num_blocks:
        raise ValueError(
            f"--blocks_to_swap {config.blocks_to_swap} must be smaller than the model's {num_blocks} blocks"
        )
    first_swapped = num_blocks - config.blocks_to_swap

    def placement(name: str) -> torch.device:
        """Each base weight straight onto its device: the last --blocks_to_swap blocks stay on the CPU."""
        if (
            config.blocks_to_swap
            and name.startswith("transformer_blocks.")
            and int(name.split(".", 2)[1]) >= first_swapped
        ):
            return torch.device("cpu")
        return device

    # With --fp8_base the base weights are stored as float8 and upcast per layer for compute
    # (the LoRA, added below, stays fp32).
    if config.fp8_base and not config.gradient_checkpointing:
        log.warning(
            "--fp8_base without --gradient_checkpointing: the backward pass keeps every layer's "
            "upcast weight until it runs, so float8 storage saves little memory while training; "
            "add --gradient_checkpointing"
        )
    version = MODEL_VERSIONS[config.model_version]
    transformer: torch.nn.Module = (
        q21.load_transformer(config.dit, weight_dtype, fp8_base=config.fp8_base, placement=placement)
        if version.family == QWEN_IMAGE_21
        else models.load_transformer(
            config.dit, weight_dtype, zero_cond_t=version.zero_cond_t, fp8_base=config.fp8_base, placement=placement
        )
    )
    set_positions(transformer, config.rope_positions)
    targets = lora_target_modules(transformer, parse_network_args(config.network_args))
    if config.network_weights:
        # Continuing a LoRA trains every layer it holds (a musubi-tuner LoRA also holds img_mod/txt_mod).
        chosen = set(targets)
        added = [m for m in lora_file_modules(transformer, config.network_weights) if m not in chosen]
        if added:
            log.info("--network_weights adds %d layer(s) outside the target set (e.g. %s)", len(added), added[0])
        targets += added
    blocks: torch.nn.ModuleList = transformer.transformer_blocks  # type: ignore[assignment]
    for block in blocks[first_swapped:] if config.blocks_to_swap else []:
        # Frozen base weights of the swapped blocks live on the CPU and are streamed in layer by
        # layer; LoRA layers are added afterwards, so they (and their gradients) stay on the device.
        apply_group_offloading(
            block,
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="leaf_level",
            use_stream=device.type == "cuda",
        )
    lora_params = add_lora(transformer, config.network_dim, config.network_alpha, targets)
    for param in lora_params:
        param.data = param.data.to(device)
    cast_training_params(transformer, dtype=torch.float32)
    if config.fp8_base:
        # peft created the adapter in the base weights' float8 dtype: initialise it again in fp32.
        for module in transformer.modules():
            if isinstance(module, LoraLayer):
                module.reset_lora_parameters("default", init_lora_weights=True)
    if config.network_weights:
        count = load_comfy_lora(transformer, config.network_weights, config.network_alpha)
        log.info("started from %s (%d layers)", config.network_weights, count)
    log.info("LoRA on %d layers (rank %d, alpha %s)", len(targets), config.network_dim, config.network_alpha)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()  # type: ignore[operator]  # diffusers' ModelMixin
    transformer.train()
    return transformer, lora_params


def _may_hold_dead_ends(config: TrainingConfig) -> bool:
    return bool(config.network_weights) or parse_network_args(config.network_args).target_set == "musubi"


def _make_optimizer(config: TrainingConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    kwargs = dict(config.optimizer_kwargs)
    name = config.optimizer_type.lower()
    if name == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, **kwargs)
    if name == "adamw8bit":
        import bitsandbytes as bnb  # presence checked by the CLI

        return bnb.optim.AdamW8bit(params, lr=config.learning_rate, **kwargs)
    from transformers.optimization import Adafactor

    kwargs = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **kwargs}
    return Adafactor(params, lr=config.learning_rate, **kwargs)


def _lora_metadata(
    config: TrainingConfig, step: int, epoch: int, total_steps: int, num_images: int, started: float
) -> dict[str, str]:
    values = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": config.network_dim,
        "ss_network_alpha": config.network_alpha,
        "ss_network_args": json.dumps(dict(entry.split("=", 1) for entry in config.network_args or [])),
        "ss_output_name": config.output_name,
        "ss_training_started_at": started,
        "ss_training_finished_at": time.time(),
        "ss_steps": step,
        "ss_epoch": epoch,
        "ss_max_train_steps": total_steps,
        "ss_learning_rate": config.learning_rate,
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": config.lr_warmup_steps,
        "ss_optimizer": config.optimizer_type,
        "ss_mixed_precision": config.mixed_precision,
        "ss_seed": config.seed,
        "ss_num_train_images": num_images,
        "ss_gradient_accumulation_steps": config.gradient_accumulation_steps,
        "ss_gradient_checkpointing": config.gradient_checkpointing,
        "ss_timestep_sampling": config.timestep_sampling,
        "ss_discrete_flow_shift": config.discrete_flow_shift,
        "ss_weighting_scheme": config.weighting_scheme,
        "ss_fp8_base": config.fp8_base,
        "ss_dit": Path(config.dit).name,
        "ss_vae": Path(config.vae).name,
        "ss_text_encoder": Path(config.text_encoder).name,
        "ss_dataset_config": Path(config.dataset_config).name,
    }
    return {**{k: str(v) for k, v in values.items()}, **MODEL_VERSIONS[config.model_version].lora_metadata}


def memory_inputs(config: TrainingConfig, group: DatasetGroup, hooks: Sequence[TrainingHook] = ()) -> MemoryInputs:
    """The memory plan's inputs: flags, the largest bucket with its controls, the longest cached prompt,
    and what the hooks' losses keep for backward."""
    family = MODEL_VERSIONS[config.model_version].family
    shipped = q21 if family == QWEN_IMAGE_21 else models  # the module naming the family's shipped configs
    vae_config = models.architecture_config(models.read_header(config.vae, "VAE (--vae)"), shipped.VAE_CONFIG)
    # the controls at the sizes they were encoded at (2.1 encodes them at the target's area, not at the
    # dataset's control resolution): from the latent cache's shapes
    scale = vae_scale(vae_config)
    images: list[tuple[tuple[int, int], tuple[tuple[int, int], ...]]] = []  # (target, controls) per item
    for item in group.items:
        with safe_open(str(latent_cache_path(item)), framework="pt") as handle:
            shapes = [handle.get_slice(f"control_latents_{k}").get_shape() for k in range(len(item.controls))]
        images.append((item.bucket, tuple((shape[-1] * scale, shape[-2] * scale) for shape in shapes)))
    target_size, control_sizes = max(images, key=lambda pair: sum(map(image_tokens, (pair[0], *pair[1]))))
    text_tokens = 0
    for item in group.items:
        with safe_open(str(text_cache_path(item)), framework="pt") as handle:
            tokens = handle.get_slice("prompt_embeds").get_shape()[0]
            if "image_pad_mask" in set(handle.keys()):  # 2.1: the controls' vision slots are their latents' tokens
                tokens -= int(handle.get_tensor("image_pad_mask").sum())
            text_tokens = max(text_tokens, tokens)
    return MemoryInputs(
        transformer_config=models.architecture_config(
            models.read_header(config.dit, "DiT (--dit)"), shipped.TRANSFORMER_CONFIG
        ),
        vae_config=vae_config,
        compute_bytes=_dtype(config.mixed_precision).itemsize,
        fp8_base=config.fp8_base,
        blocks_to_swap=config.blocks_to_swap,
        gradient_checkpointing=config.gradient_checkpointing,
        batch_size=max(d.batch_size for d in group.datasets),
        target_size=target_size,
        control_sizes=control_sizes,
        text_tokens=text_tokens,
        network_dim=config.network_dim,
        network_args=parse_network_args(config.network_args),
        optimizer=config.optimizer_type,
        face_decode=config.face_decode if config.use_face_as_loss else None,
        face_recognizer_saved_bytes=sum(hook.saved_bytes_per_sample() for hook in hooks),
        face_rollout_steps=config.face_loss_rollout_steps if config.use_face_as_loss else 1,
        family=family,
    )


def scalar_settings(config: TrainingConfig) -> dict[str, int | float | str | bool]:
    """The settings TensorBoard records with the run: the numbers, texts and switches that were set."""
    values = {field.name: getattr(config, field.name) for field in fields(config)}
    return {name: value for name, value in values.items() if isinstance(value, (int, float, str, bool))}


def _dtype(mixed_precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


__all__ = [
    "CheckpointWriteError",
    "TrainingDivergedError",
    "TrainingRun",
    "prepare_transformer",
    "run_training",
]
