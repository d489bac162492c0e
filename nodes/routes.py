"""HTTP routes and websocket events for the live training panel (`web/face_consistency_panel.js`).

Routes (ComfyUI also serves each under `/api`):
- GET  /face_consistency/jobs                              jobs with state and progress
- GET  /face_consistency/jobs/{job_id}?max_points=N        status, metrics, checkpoints, samples
- POST /face_consistency/jobs/{job_id}/stop                graceful stop (runs in the background)
- GET  /face_consistency/jobs/{job_id}/samples/{filename}  one sample image
- GET  /face_consistency/jobs/{job_id}/log?lines=N         the log's last lines

Only files inside a registered job's folder are read (symlinks resolved: `comfy_env.is_within`, and
the run reader, which leaves out a file that points elsewhere), and only those the run reader lists;
ids and parameters are validated. Finished jobs are listed from the registry alone (the progress
it kept when they ended); only unfinished ones are refreshed from their files. A background poller
pushes `face_consistency.progress`, `.finished` and `.failed` events.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from ..musubi_formats.names import SAMPLE_DIR
from ..training_contract.checkpoint_choice import VALIDATION_LOSS
from ..training_contract.protocol import LOG_FILE, JobState
from ..training_jobs import job_control
from ..training_jobs.job_registry import FINAL_STATE_VALUES, JobRecord, JobRegistry, UnknownJobError
from ..training_jobs.run_reader import (
    FACE_SIMILARITY,
    LOSS,
    RunSnapshot,
    list_samples,
    log_tail,
    read_run,
    run_progress,
)
from . import comfy_env
from .comfy_env import open_registry

log = logging.getLogger(__name__)

PREFIX = "/face_consistency"
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_LOG_LINES = 2000
MAX_POINTS = 5000
POLL_INTERVAL_S = 2.0
ROUTE_TIMEOUT_S = 5.0  # a route's registry and file work; then 503
REGISTRY_BUSY_TIMEOUT_S = 2.0  # how long a route's registry connection waits for another's lock
SUCCESS_STATES = frozenset({JobState.COMPLETED.value, JobState.STOPPED.value})

RegistryFactory = Callable[[], JobRegistry]
EventSink = Callable[[str, dict[str, Any]], None]


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"\d{1,7}", raw) or not low <= int(raw) <= high:
        raise web.HTTPBadRequest(reason=f"{name} must be an integer from {low} to {high}")
    return int(raw)


def _job(request: web.Request, registry: JobRegistry) -> JobRecord:
    job_id = request.match_info["job_id"]
    if not JOB_ID.fullmatch(job_id):
        raise web.HTTPBadRequest(reason="malformed job id")
    try:
        return registry.refresh(job_id)
    except UnknownJobError:
        raise web.HTTPNotFound(reason="unknown job id") from None


def _downsample(records: list[dict[str, Any]], max_points: int) -> list[dict[str, Any]]:
    if len(records) <= max_points:
        return records
    stride = len(records) / max_points
    picked = [records[int(i * stride)] for i in range(max_points - 1)]
    return [*picked, records[-1]]


PROGRESS_KEYS = ("step", "total_steps", "epoch", LOSS, FACE_SIMILARITY, "latest_checkpoint")


def _summary(record: JobRecord) -> dict[str, Any]:
    """The job with its progress: a running job's from status.json (no metrics file is read), a
    finished job's as the registry kept it (no file at all; empty for a job that ended before the
    registry kept progress, until it is opened)."""
    progress = (record.progress or {}) if record.finished else run_progress(record.output_dir)
    return {**record.to_json(), **{key: progress.get(key) for key in PROGRESS_KEYS}}


def _listing(registry: JobRegistry) -> dict[str, Any]:
    """Every job, newest first: the finished ones from the registry alone, the others refreshed from their
    folders; `skipped_rows`: the ids of jobs whose registry row cannot be read."""
    listed, skipped = [], []
    for shown in registry.list_shown():
        progress = shown.pop("progress")
        if not isinstance(progress, dict):  # None while the job runs
            progress = {}
        if shown["state"] in FINAL_STATE_VALUES:
            listed.append({**shown, **{key: progress.get(key) for key in PROGRESS_KEYS}})
            continue
        try:
            listed.append(_summary(registry.refresh(str(shown["job_id"]))))
        except (ValueError, TypeError) as exc:  # e.g. a command that is not JSON
            log.warning("job registry %s: skipping job %s (%s)", registry.path, shown["job_id"], exc)
            skipped.append(str(shown["job_id"]))
    return {"jobs": listed, "skipped_rows": skipped}


def _read_run_or_none(record: JobRecord) -> RunSnapshot | None:
    try:
        return read_run(record.output_dir)
    except FileNotFoundError:
        return None


def _sample_file(record: JobRecord, filename: str) -> Path:
    """The sample image `filename` of the job, refusing anything that is not a listed sample inside its folder."""
    if "/" in filename or "\\" in filename or filename.startswith(".") or "\x00" in filename:
        raise web.HTTPBadRequest(reason="invalid file name")
    sample_dir = record.output_dir / SAMPLE_DIR
    _check_in_job_folder(record, sample_dir, "sample folder")
    path = sample_dir / filename
    _check_in_job_folder(record, path, "sample")
    # only what the run reader lists as a sample (which leaves out any file pointing elsewhere)
    if filename not in {s.path.name for s in list_samples(record.output_dir)}:  # not read_run: no metrics to parse
        raise web.HTTPNotFound(reason="no such sample")
    return path.resolve()


def _check_in_job_folder(record: JobRecord, path: Path, what: str) -> None:
    """403 unless `path`, symlinks resolved, lies in the job's folder: the check of every file a route serves."""
    if not comfy_env.is_within(path, record.output_dir):
        raise web.HTTPForbidden(reason=f"the {what} leaves the job folder")


async def _off_the_loop(work: Callable[[], Any]) -> Any:
    """Run the registry and file work of a route in a worker thread, so ComfyUI's event loop (every
    other request of the server) never waits on it; past ROUTE_TIMEOUT_S the route answers 503."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(work), ROUTE_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise web.HTTPServiceUnavailable(
            reason="the training job registry is busy (another process holds it); try again"
        ) from None
    except sqlite3.OperationalError as exc:  # locked longer than the registry's own busy timeout
        raise web.HTTPServiceUnavailable(reason=f"the training job registry is busy ({exc}); try again") from None


def route_registry() -> JobRegistry:
    """The registry as the routes open it: a lock held elsewhere is waited on only briefly."""
    return open_registry(busy_timeout_s=REGISTRY_BUSY_TIMEOUT_S)


def add_routes(routes: web.RouteTableDef, registry_factory: RegistryFactory = route_registry) -> None:
    """Add the panel's routes to `routes` (PromptServer.instance.routes in ComfyUI, any table in tests)."""
    stopping: set[str] = set()
    stopping_lock = threading.Lock()

    @routes.get(f"{PREFIX}/jobs")
    async def list_jobs(request: web.Request) -> web.Response:
        return web.json_response(await _off_the_loop(lambda: _listing(registry_factory())))

    @routes.get(f"{PREFIX}/jobs/{{job_id}}")
    async def job_detail(request: web.Request) -> web.Response:
        max_points = _int_param(request, "max_points", 500, 2, MAX_POINTS)

        def work() -> dict[str, Any]:
            registry = registry_factory()
            return _detail(registry, _job(request, registry), max_points)

        return web.json_response(await _off_the_loop(work))

    @routes.post(f"{PREFIX}/jobs/{{job_id}}/stop")
    async def stop_job(request: web.Request) -> web.Response:
        registry, record = await _off_the_loop(lambda: _registry_and_job(request, registry_factory()))
        if record.finished:
            return web.json_response({"job_id": record.job_id, "state": record.state, "stopping": False})
        await _off_the_loop(lambda: job_control.request_job_stop(registry, record.job_id))
        with stopping_lock:
            already = record.job_id in stopping
            stopping.add(record.job_id)
        if not already:

            def run_stop() -> None:
                try:
                    job_control.stop(registry, record.job_id)
                except Exception:
                    log.exception("stopping training job %s failed", record.job_id)
                finally:
                    with stopping_lock:
                        stopping.discard(record.job_id)

            threading.Thread(target=run_stop, name=f"face-consistency-stop-{record.job_id[:8]}", daemon=True).start()
        return web.json_response(
            {"job_id": record.job_id, "state": JobState.STOPPING.value, "stopping": True}, status=202
        )

    @routes.get(f"{PREFIX}/jobs/{{job_id}}/samples/{{filename}}")
    async def sample_image(request: web.Request) -> web.StreamResponse:
        filename = request.match_info["filename"]
        return web.FileResponse(await _off_the_loop(lambda: _sample_file(_job(request, registry_factory()), filename)))

    @routes.get(f"{PREFIX}/jobs/{{job_id}}/log")
    async def job_log(request: web.Request) -> web.Response:
        lines = _int_param(request, "lines", 200, 1, MAX_LOG_LINES)
        return web.json_response(await _off_the_loop(lambda: _log(_job(request, registry_factory()), lines)))


def _registry_and_job(request: web.Request, registry: JobRegistry) -> tuple[JobRegistry, JobRecord]:
    return registry, _job(request, registry)


def _log(record: JobRecord, lines: int) -> dict[str, Any]:
    _check_in_job_folder(record, record.output_dir / LOG_FILE, "log")  # e.g. a symlink elsewhere
    return {"job_id": record.job_id, "lines": log_tail(record.output_dir, lines)}


def _detail(registry: JobRegistry, record: JobRecord, max_points: int) -> dict[str, Any]:
    if record.finished and record.progress is None:  # ended before the registry kept progress: keep it now
        registry.keep_progress(record.job_id, run_progress(record.output_dir))
        record = registry.get(record.job_id)
    run = _read_run_or_none(record)
    body = _summary(record)
    if run is not None:
        body["status"] = run.status
        body["metrics_source"] = run.metrics_source
        body["metrics"] = [
            {key: r.get(key) for key in ("step", LOSS, FACE_SIMILARITY)} for r in _downsample(run.metrics, max_points)
        ]
        steps, losses = run.series(VALIDATION_LOSS)  # a few points: every one is sent
        body["validation"] = [{"step": step, VALIDATION_LOSS: loss} for step, loss in zip(steps, losses)]
        body["checkpoints"] = [
            {"filename": c.filename, "step": c.step, "epoch": c.epoch, "final": c.final} for c in run.checkpoints
        ]
        chosen = run.checkpoint_table.recommendation() if run.checkpoint_table is not None else None
        body["recommendation"] = {"name": chosen.name, "step": chosen.step, "reason": chosen.reason} if chosen else None
        body["samples"] = [
            {"filename": s.path.name, "step": s.step, "epoch": s.epoch, "prompt_index": s.prompt_index}
            for s in run.latest_samples()
        ]
    return body


class EventPoller:
    """Watches the registry and pushes progress / finished / failed events to the browser."""

    def __init__(self, registry_factory: RegistryFactory, send: EventSink, interval_s: float = POLL_INTERVAL_S):
        self._registry_factory = registry_factory
        self._send = send
        self._interval_s = interval_s
        self._seen: dict[str, tuple[Any, ...]] = {}
        self._since = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> None:
        registry = self._registry_factory()
        # jobs that ended before ComfyUI started have nothing to announce, and are not even read
        for record in registry.records(active_since=self._since):
            previous = self._seen.get(record.job_id)
            if previous == ("final",):
                continue
            if not record.finished:
                record = registry.refresh(record.job_id)
            summary = _summary(record)
            key: tuple[Any, ...] = (summary["state"], summary.get("step"), summary.get("latest_checkpoint"))
            if key != previous:
                self._send("progress", summary)
            if record.finished:
                self._send("finished" if record.state in SUCCESS_STATES else "failed", summary)
                key = ("final",)
            self._seen[record.job_id] = key

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.poll_once()
            except Exception:
                log.exception("face-consistency job poller")

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="face-consistency-job-events", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()


_poller: EventPoller | None = None


def register_with_comfyui() -> None:
    """Add the routes to ComfyUI's PromptServer and start the event poller (once)."""
    global _poller
    server = comfy_env.prompt_server()
    if server is None or _poller is not None:
        return
    add_routes(server.routes)
    _poller = EventPoller(open_registry, comfy_env.send_event)
    _poller.start()


def stop_event_poller() -> None:
    """Stop the event poller `register_with_comfyui` started (a test's server going away)."""
    global _poller
    if _poller is not None:
        _poller.stop()
        _poller = None
