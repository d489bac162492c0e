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
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ..common.files import atomic_write_json
from ..common.paths import is_within_directory

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


def run_file(output_dir: str | os.PathLike, name: str) -> Path | None:
    """`output_dir / name`, or None when it leaves the folder (a symlink to a file elsewhere):
    a watcher reads a run's own files only, whoever planted the link."""
    path = Path(output_dir) / name
    return path if is_within_directory(output_dir, path) else None


def read_status(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The last status written, or None when there is none (or it cannot be parsed, or leaves the folder)."""
    path = run_file(output_dir, STATUS_FILE)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
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


@dataclass
class _MetricsRead:
    inode: int
    offset: int  # bytes of complete lines parsed so far
    records: list[dict[str, Any]]


METRICS_READS_KEPT = 32  # runs whose parsed metrics stay cached (a monitor shows a few at a time)
_metrics_reads: dict[tuple[str, Callable[..., Any] | None], _MetricsRead] = {}
_metrics_lock = threading.Lock()


def read_metrics(
    output_dir: str | os.PathLike, transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """All complete metrics lines (each passed through `transform`); a partial last line (being
    written) is ignored. The file only grows while a run writes it, so each call parses only the
    lines appended since the last call for the same file (a monitor asks every few seconds of a
    run whose file may hold hundreds of thousands of lines); a replaced or shorter file is read anew.
    The records are shared with later calls: read them, do not change them. A metrics file that
    leaves the folder (a symlink elsewhere) is not read."""
    path = run_file(output_dir, METRICS_FILE)
    if path is None:
        return []
    try:
        stat = path.stat()
    except FileNotFoundError:
        return []
    key = (os.path.abspath(path), transform)
    with _metrics_lock:
        read = _metrics_reads.get(key)
        if read is None or read.inode != stat.st_ino or stat.st_size < read.offset:
            if len(_metrics_reads) >= METRICS_READS_KEPT:
                del _metrics_reads[next(iter(_metrics_reads))]
            read = _metrics_reads[key] = _MetricsRead(stat.st_ino, 0, [])
        if stat.st_size > read.offset:
            with open(path, "rb") as f:
                f.seek(read.offset)
                data = f.read(stat.st_size - read.offset)
            complete = data.rfind(b"\n") + 1
            for line in data[:complete].splitlines():
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if isinstance(record, dict):
                    read.records.append(transform(record) if transform else record)
            read.offset += complete
        return list(read.records)


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
            f"{folder}: another training run{f' (pid {pid})' if pid else ''} is writing to this folder; "
            "wait for it to end (or stop it), or choose another output folder"
        ) from None
    try:
        yield
    finally:
        lock.release()


def check_output_folder_free(output_dir: str | os.PathLike) -> None:
    """Raise OutputFolderBusyError when a live trainer holds the folder (taking and letting go of its lock)."""
    if (Path(output_dir) / LOCK_FILE).exists():
        with hold_output_folder(output_dir):
            pass
