"""Launch and stop background training jobs. No ComfyUI imports: the nodes and routes call this with its folders.

- Launch: `open_run_folder` checks that no job or trainer writes into the run's folder and that it holds
  no finished run of the same name, then makes it; `launch` registers the job and starts
  `[python, <pack>/bootstrap.py, "train", ...]` detached (python: the trainer environment's, or the
  interpreter running ComfyUI when it has the trainer's libraries, see trainer_env.py), stdout and stderr
  in `train.log`.
- Stop: the protocol's STOP file, then wait for the trainer to save and report `stopped`; past the grace
  period its process tree is terminated, then killed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..training_contract.launch import LaunchRequest
from ..training_contract.protocol import (
    LOG_FILE,
    JobState,
    OutputFolderBusyError,
    check_output_folder_free,
    clear_stop_request,
    request_stop,
    stop_requested,
    write_status,
)
from .job_registry import JobConflictError, JobError, JobRecord, JobRegistry
from .process_tree import group_alive, process_alive, reap, signal_tree, start_detached
from .run_reader import list_checkpoints
from .trainer_env import trainer_runtime


def trainer_command(train_args: Sequence[str]) -> list[str]:
    """The argument list that runs the bundled trainer: with the trainer environment when it is set up,
    else with ComfyUI's own interpreter when that has the trainer's libraries; otherwise
    TrainerEnvironmentError names the setup command."""
    return trainer_runtime().command("train", *map(str, train_args))


def open_run_folder(registry: JobRegistry, output_dir: str | os.PathLike, output_name: str) -> Path:
    """The run's folder, made, once no job (of this registry, or a trainer started elsewhere) writes into it
    and it holds no checkpoint of a run named `output_name`; else JobConflictError saying what to do."""
    folder = Path(output_dir).resolve()
    registry.check_free(folder)
    try:
        check_output_folder_free(folder)  # the trainer's own lock: held by whoever started it
    except OutputFolderBusyError as exc:
        raise JobConflictError(str(exc)) from None
    finished = list_checkpoints(folder, output_name)
    if finished:
        raise JobConflictError(
            f"{folder} already holds the run {output_name!r} ({len(finished)} checkpoint(s), the last "
            f"{finished[-1].filename}): training into it again would overwrite its checkpoints and add to its "
            "metrics and log; choose another output_name, or move that folder away to start over"
        )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def launch(registry: JobRegistry, request: LaunchRequest) -> JobRecord:
    """Start the run `request` asks for in its folder (made by `open_run_folder`); returns at once."""
    argv = request.argv()
    request.write_inputs()
    return start_trainer(registry, request.output_dir, argv, name=request.output_name)


def start_trainer(
    registry: JobRegistry,
    output_dir: str | os.PathLike,
    train_args: Sequence[str],
    *,
    name: str,
) -> JobRecord:
    """Register the job `name` (refused when one started meanwhile in `output_dir`, a folder `open_run_folder`
    made) and start `face-consistency train train_args` detached in that folder."""
    folder = Path(output_dir).resolve()
    command = trainer_command(train_args)
    job = registry.reserve(name, folder, command)
    clear_stop_request(folder)
    # a status left by an earlier run in this folder must not be read as this job's
    write_status(folder, {"state": JobState.STARTING, "job_id": job.job_id, "output_name": name})
    try:
        pid = start_detached(command, folder, folder / LOG_FILE)
    except OSError as exc:
        registry.set_state(job.job_id, JobState.FAILED.value, f"could not start the trainer: {exc}")
        raise JobError(f"could not start the trainer ({command[0]}): {exc}") from exc
    registry.set_pid(job.job_id, pid)
    return registry.get(job.job_id)


def request_job_stop(registry: JobRegistry, job_id: str) -> JobRecord:
    """Write the stop request and mark the job `stopping` (returns at once; `stop` also waits)."""
    job = registry.refresh(job_id)
    if job.finished:
        return job
    request_stop(job.output_dir)
    registry.set_state(job.job_id, JobState.STOPPING.value)
    return registry.get(job_id)


def stop(
    registry: JobRegistry,
    job_id: str,
    *,
    grace_s: float = 300.0,
    terminate_s: float = 30.0,
    poll_s: float = 0.5,
    on_wait: Callable[[float], None] | None = None,
) -> JobRecord:
    """Ask the trainer to stop, wait for it to save and report `stopped`, then end its whole tree.

    `on_wait(elapsed_seconds)` is called while waiting (ComfyUI's progress bar; it may raise to
    abandon the wait: the stop request stays, the trainer still stops on its own).
    """
    job = request_job_stop(registry, job_id)
    if job.finished:
        return job
    started = time.monotonic()
    while process_alive(job.pid, started=job.started) and time.monotonic() - started < grace_s:
        if not stop_requested(job.output_dir):
            request_stop(job.output_dir)  # the trainer clears stale requests when it starts: ask again
        if on_wait is not None:
            on_wait(time.monotonic() - started)
        time.sleep(poll_s)
    forced = False
    if job.pid and process_alive(job.pid, started=job.started):
        forced = True
        # SIGTERM is a second graceful request the trainer honours (save, then `stopped`)
        signal_tree(job.pid, force=False)
        deadline = time.monotonic() + terminate_s
        while process_alive(job.pid, started=job.started) and time.monotonic() < deadline:
            time.sleep(poll_s)
    _end_leftovers(job)
    job = registry.refresh(job.job_id)
    if forced and not job.finished:
        registry.set_state(
            job.job_id,
            JobState.FAILED.value,
            f"the trainer did not stop within {grace_s:.0f}s of the stop request; its process tree was killed",
        )
    return registry.get(job.job_id)


def _end_leftovers(job: JobRecord) -> None:
    """Kill what is left of the job's process tree (data loader workers and the like)."""
    if not job.pid:
        return
    if group_alive(job.pid):
        signal_tree(job.pid, force=True)
    reap(job.pid, timeout=10)


def tree_alive(job: JobRecord) -> bool:
    """Whether the job's process or any process of its group is still running."""
    if not job.pid:
        return False
    return process_alive(job.pid, started=job.started) or group_alive(job.pid)
