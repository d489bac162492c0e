"""The job's plumbing around the training loop (`train.py`), apart from the algorithm.

status.json and metrics.jsonl (`StatusReporter`), the running figures of each step's record
(`StepMeter`), a graceful stop on SIGTERM/SIGINT (`StopSignal`; the STOP file is `protocol.py`'s),
the log's tail for the status of a failed run (`LogTail`), a checkpoint write that fails
(`checkpoint_write`: a full disk, in words) and a run that diverges (`check_finite`), and the files
a killed save left behind (`unfinished_saves`).
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from safetensors import SafetensorError

from ..training_contract.protocol import STATUS_FILE, JobState, append_metrics, write_status

log = logging.getLogger("face_consistency.trainer")

LOG_TAIL_LINES = 40


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

    def update(self, state: JobState | None = None, /, **fields: Any) -> None:
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

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # asked twice: stop now, without a checkpoint
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice")
        self.received = signal.Signals(signum).name
        log.info("%s received: stopping after the current step", self.received)


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


def failure_log_tail(tail: LogTail, exc: BaseException) -> list[str]:
    trace = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return list(tail.lines) + "".join(trace).splitlines()[-LOG_TAIL_LINES:]


def unfinished_saves(output_dir: Path, output_name: str) -> list[Path]:
    """Temporary checkpoint and status files (`atomic_path`) and state folders (`save_state`) that a
    killed save left in the run's folder; the lock the trainer holds means none is in progress."""
    patterns = (f".{output_name}*.tmp", f".{STATUS_FILE}.*.tmp", f".{output_name}*.partial")
    return sorted({p for pattern in patterns for p in output_dir.glob(pattern)})
