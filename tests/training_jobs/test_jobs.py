"""Job control against the real trainer in a subprocess (tiny models, CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from face_consistency.training_contract import libraries
from face_consistency.training_contract.protocol import read_metrics, read_status
from face_consistency.training_jobs import job_control, trainer_env
from face_consistency.training_jobs.job_registry import JobConflictError, JobRegistry, UnknownJobError
from face_consistency.training_jobs.run_reader import read_run
from training_runs import TinyTraining, group_gone, wait_for

pytestmark = [
    pytest.mark.skipif(
        os.name == "nt", reason="process-group checks here are POSIX; Windows ends the tree psutil finds"
    ),
    pytest.mark.trainer,  # job control is the trainer's: run again at the minimum versions (psutil, filelock)
]

LAUNCHER = textwrap.dedent(
    """
    import json, sys
    from face_consistency.training_jobs import job_control, job_registry
    registry = job_registry.JobRegistry(sys.argv[1])
    job_control.open_run_folder(registry, sys.argv[2], "tiny")
    job = job_control.start_trainer(registry, sys.argv[2], json.loads(sys.argv[3]), name="tiny")
    print(json.dumps({"job_id": job.job_id, "pid": job.pid}))
    """
)


def test_the_trainer_command_uses_this_interpreter_and_the_pack_bootstrap() -> None:
    command = job_control.trainer_command(["--output_dir", "x"])
    assert command[0] == sys.executable  # it has the trainer's libraries (test_trainer_env.py: the others)
    assert Path(command[1]) == Path(job_control.__file__).resolve().parent.parent / "bootstrap.py"
    assert command[2:] == ["train", "--output_dir", "x"]


def test_unknown_job_ids_are_named(tmp_path: Path) -> None:
    with pytest.raises(UnknownJobError, match="no training job with id 'nope'"):
        JobRegistry(tmp_path / "jobs.sqlite3").get("nope")


def test_a_job_outlives_the_comfyui_that_started_it(tiny_training: TinyTraining, tmp_path: Path) -> None:
    """Launched by one process that then exits (ComfyUI restarting); another reopens the registry."""
    registry_path = tmp_path / "user" / "jobs.sqlite3"
    output_dir = tmp_path / "loras" / "tiny"
    argv = tiny_training.argv(output_dir, 4, "--save_every_n_steps", "2")
    launched = subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(registry_path), str(output_dir), json.dumps(argv)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    started = json.loads(launched.stdout)

    registry = JobRegistry(registry_path)
    job = registry.get(started["job_id"])
    assert job.pid == started["pid"] and job.output_dir == output_dir.resolve()
    assert job.command[:3] == [sys.executable, str(trainer_env.BOOTSTRAP), "train"]
    assert os.getsid(job.pid) == job.pid  # detached: leads its own session
    with pytest.raises(JobConflictError, match="already training into"):
        job_control.open_run_folder(registry, output_dir, "tiny")
    with pytest.raises(JobConflictError, match="already training into"):  # and atomically as it registers
        job_control.start_trainer(registry, output_dir, argv, name="tiny")

    done = wait_for(lambda: (r := registry.refresh(job.job_id)).finished and r, "the run to finish")
    assert done.state == "completed", done.detail
    wait_for(lambda: group_gone(job.pid), "the trainer's processes to exit")  # `completed` is written just before
    run = read_run(output_dir)
    assert [c.filename for c in run.checkpoints] == [
        "tiny-step00000002.safetensors",
        "tiny.safetensors",
    ]  # step 4 is the final file
    assert [m["step"] for m in read_metrics(output_dir)] == [1, 2, 3, 4]
    assert "saved" in (output_dir / "train.log").read_text()
    # the libraries it ran with, from where (here: this Python's own, no trainer environment)
    assert read_status(output_dir)["libraries"]["diffusers"] == libraries.versions(["diffusers"])["diffusers"]
    # a finished job leaves the folder free for the next run, under another name: the same would overwrite it
    assert JobRegistry(registry_path).records()[0].state == "completed"
    with pytest.raises(JobConflictError, match="already holds the run 'tiny' .*choose another output_name"):
        job_control.open_run_folder(registry, output_dir, "tiny")
    assert job_control.open_run_folder(registry, output_dir, "tiny_again") == output_dir.resolve()


def test_a_launch_refused_by_its_configuration_is_failed_with_the_reason(
    tiny_training: TinyTraining, tmp_path: Path
) -> None:
    registry = JobRegistry(tmp_path / "jobs.sqlite3")
    output_dir = tmp_path / "out"
    job_control.open_run_folder(registry, output_dir, "tiny")
    job = job_control.start_trainer(
        registry, output_dir, tiny_training.argv(output_dir, 2, "--learning_rate", "inf"), name="tiny"
    )
    done = wait_for(lambda: (r := registry.refresh(job.job_id)).finished and r, "the trainer to refuse")
    assert done.state == "failed"
    assert "--learning_rate must be a finite number, got inf" in done.detail
    assert "ended without a final status" not in done.detail


def test_a_killed_job_is_marked_failed_with_its_log_tail(tiny_training: TinyTraining, tmp_path: Path) -> None:
    registry = JobRegistry(tmp_path / "jobs.sqlite3")
    output_dir = tmp_path / "out"
    job_control.open_run_folder(registry, output_dir, "tiny")
    job = job_control.start_trainer(registry, output_dir, tiny_training.argv(output_dir, 10_000), name="tiny")
    # the trainer runs (its own status names its pid) and has logged something
    wait_for(lambda: (read_status(output_dir) or {}).get("pid") == job.pid, "the trainer to start")
    wait_for(lambda: (output_dir / "train.log").stat().st_size > 0, "the trainer to log")
    # another ComfyUI install (another registry) does not know the job, but sees the live trainer
    with pytest.raises(JobConflictError, match=f"another training run \\(pid {job.pid}\\) is writing to this folder"):
        job_control.open_run_folder(JobRegistry(tmp_path / "other.sqlite3"), output_dir, "tiny")

    os.killpg(job.pid, signal.SIGKILL)
    wait_for(lambda: not job_control.process_alive(job.pid), "the process to die")

    record = JobRegistry(tmp_path / "jobs.sqlite3").refresh(job.job_id)
    assert record.state == "failed"
    assert f"the trainer process {job.pid} ended without a final status" in record.detail
    last_log_line = (output_dir / "train.log").read_text().splitlines()[-1].rsplit("\r", 1)[-1]
    assert last_log_line in record.detail
    # stopping a job that has already ended changes nothing
    assert job_control.stop(registry, job.job_id).state == "failed"
