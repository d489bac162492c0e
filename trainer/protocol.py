"""The job protocol between a running trainer and whoever watches it.

Everything lives in the trainer's output directory:
- `status.json`: the current state and counters, rewritten atomically;
- `metrics.jsonl`: one JSON object per logged step, appended;
- `train.log`: the process's stdout and stderr;
- `STOP`: created by a monitor to ask for a graceful stop (checkpoint, then state `stopped`);
- `.train.lock`: held by the trainer for its whole life (an OS file lock, let go when the process
  ends however it ends), so one folder has one run, whoever starts it.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from enum import Enum
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

from ..faceid.fileio import atomic_write_json

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
STOP_FILE = "STOP"
LOCK_FILE = ".train.lock"


class JobState(str, Enum):
    STARTING = "starting"
    CACHING = "caching"
    TRAINING = "training"
    SAMPLING = "sampling"
    SAVING = "saving"
    STOPPING = "stopping"
    STOPPED = "stopped"
    COMPLETED = "completed"
    FAILED = "failed"


FINAL_STATES = frozenset({JobState.STOPPED, JobState.COMPLETED, JobState.FAILED})


def write_status(output_dir: str | os.PathLike, status: dict[str, Any]) -> None:
    """Replace status.json with `status` plus an `updated` timestamp."""
    record = dict(status)
    state = record.get("state")
    if isinstance(state, JobState):
        record["state"] = state.value
    record["updated"] = time.time()
    atomic_write_json(Path(output_dir) / STATUS_FILE, record)


def read_status(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The last status written, or None when there is none (or it cannot be parsed)."""
    try:
        with open(Path(output_dir) / STATUS_FILE, encoding="utf-8") as f:
            status = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return status if isinstance(status, dict) else None


def append_metrics(output_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one line; a single write() of a short line keeps concurrent readers line-consistent."""
    line = json.dumps(record, default=float) + "\n"
    with open(Path(output_dir) / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete metrics lines; a partial last line (being written) is ignored."""
    path = Path(output_dir) / METRICS_FILE
    records: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return records
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def request_stop(output_dir: str | os.PathLike) -> None:
    (Path(output_dir) / STOP_FILE).write_text(str(time.time()), encoding="utf-8")


def stop_requested(output_dir: str | os.PathLike) -> bool:
    return (Path(output_dir) / STOP_FILE).exists()


def clear_stop_request(output_dir: str | os.PathLike) -> None:
    (Path(output_dir) / STOP_FILE).unlink(missing_ok=True)


class OutputFolderBusyError(RuntimeError):
    """Another live trainer holds the output folder."""


@contextlib.contextmanager
def hold_output_folder(output_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the folder's lock for the block, or raise OutputFolderBusyError at once."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        pid = (read_status(folder) or {}).get("pid")
        raise OutputFolderBusyError(
            f"--output_dir {folder}: another training run{f' (pid {pid})' if pid else ''} is writing to this folder; "
            "wait for it to end (or stop it), or choose another --output_dir"
        ) from None
    try:
        yield
    finally:
        lock.release()


def output_folder_busy(output_dir: str | os.PathLike) -> bool:
    """Whether a live trainer holds the folder (checked by taking and letting go of its lock)."""
    if not (Path(output_dir) / LOCK_FILE).exists():
        return False
    try:
        with hold_output_folder(output_dir):
            return False
    except OutputFolderBusyError:
        return True
