"""The trainer's processes: started detached, alive or not, ended as a whole tree.

A job's trainer leads its own session / process group (POSIX) or process group (Windows), so it outlives
the prompt and can be ended with every process it started. Liveness is psutil's; a pid reused by a later
process is told apart by its start time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import psutil

IS_WINDOWS = os.name == "nt"
LAUNCH_WINDOW_S = 60.0  # a process created this long after its job was launched is another program

# Children this process started, kept so their exit status is collected (no zombies) and
# liveness is exact; jobs from an earlier ComfyUI session are checked by pid.
_children: dict[int, subprocess.Popen] = {}
_children_lock = threading.Lock()


def start_detached(command: Sequence[str], cwd: Path, log_file: Path) -> int:
    """Start `command` in `cwd` in a session of its own, stdout and stderr appended to `log_file`; its pid."""
    if sys.platform == "win32":
        creationflags, new_session = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW, False
    else:
        creationflags, new_session = 0, True
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log shows progress as it happens
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            list(command),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            close_fds=True,
            creationflags=creationflags,
            start_new_session=new_session,
        )
    with _children_lock:
        _children[process.pid] = process
    return process.pid


def process_alive(pid: int | None, *, started: float | None = None) -> bool:
    """Whether `pid` runs. With `started` (when the job was launched), a process created well after
    it is another program that has been given the same pid."""
    if not pid:
        return False
    with _children_lock:
        child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or process.create_time() <= started + LAUNCH_WINDOW_S
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # someone else's process: it runs, and it is not ours
        return started is None


def group_alive(pid: int) -> bool:
    """Whether any process of the group `pid` leads (children included, whose parent may be gone) runs."""
    if IS_WINDOWS:
        return process_alive(pid)
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_tree(pid: int, *, force: bool) -> None:
    """Terminate (or kill) the whole process tree `pid` started."""
    if not IS_WINDOWS:
        # one signal to the job's session group reaches every process once, orphans included
        # (a second SIGTERM to the trainer would cut its final save short)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL if force else signal.SIGTERM)
        return
    try:
        leader = psutil.Process(pid)
        tree = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            if force:
                process.kill()
            else:
                process.terminate()
    psutil.wait_procs(tree, timeout=5)


def reap(pid: int, timeout: float) -> None:
    """Collect the exit status of our child `pid` (waiting up to `timeout`), so it leaves no zombie."""
    with _children_lock:
        child = _children.get(pid)
    if child is None:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=timeout)
    if child.poll() is not None:
        with _children_lock:
            _children.pop(pid, None)
