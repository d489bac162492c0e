"""The job registry: jobs launched from ComfyUI, in one SQLite file that survives restarts.

A job whose process is gone without a final status is marked failed, with the tail of its log as the reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..training_contract.protocol import FINAL_STATES, LOG_FILE, JobState, read_status
from .process_tree import LAUNCH_WINDOW_S, process_alive, reap
from .run_reader import log_tail, run_progress

log = logging.getLogger(__name__)

REGISTRY_FILENAME = "face_consistency_jobs.sqlite3"
FAILURE_LOG_LINES = 30
FINAL_STATE_VALUES = frozenset(s.value for s in FINAL_STATES)
_FINAL_STATES_SQL = ",".join("?" * len(FINAL_STATE_VALUES))  # the placeholders of sorted(FINAL_STATE_VALUES)


class JobError(RuntimeError):
    """A job request that cannot be carried out; the message says why and what to do."""


class UnknownJobError(JobError):
    pass


class JobConflictError(JobError):
    pass


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    name: str
    output_dir: Path
    command: list[str]
    pid: int | None
    started: float
    state: str
    ended: float | None
    detail: str
    # run_progress() as the job ended, kept so that listing finished jobs reads none of their files
    progress: dict[str, object] | None = field(default=None, hash=False)

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATE_VALUES

    def to_json(self) -> dict[str, object]:
        return {field: str(self.output_dir) if field == "output_dir" else getattr(self, field) for field in JSON_FIELDS}


# What a job list shows of a job (JobRecord.to_json, JobRegistry.list_shown), besides its progress.
JSON_FIELDS = ("job_id", "name", "output_dir", "pid", "started", "state", "ended", "detail")


def _progress(text: str | None) -> dict[str, object] | None:
    try:
        progress = json.loads(text) if text else None
    except ValueError:  # damaged: the job lists without it
        return None
    return progress if isinstance(progress, dict) else None


def _status_is_of(status: dict[str, object], job: JobRecord) -> bool:
    """Whether status.json was written for `job`: by launch (job id) or by its trainer (pid)."""
    if status.get("job_id") == job.job_id:
        return True
    return job.pid is not None and status.get("pid") == job.pid


def _same_dir(path: str | os.PathLike) -> str:
    return os.path.normcase(str(Path(path).resolve()))


class JobRegistry:
    """Jobs launched from ComfyUI, in one SQLite file shared by every thread and restart."""

    def __init__(self, path: str | os.PathLike, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.skipped_rows: list[str] = []  # rows of the last records() that could not be read
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._create()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d%H%M%S')}")
            os.replace(self.path, aside)
            log.warning(
                "the job registry %s could not be read (%s): moved aside to %s, starting a new one",
                self.path,
                exc,
                aside,
            )
            self._create()

    def _create(self) -> None:
        with self._connect() as db:
            db.execute(
                """CREATE TABLE IF NOT EXISTS jobs (
                    job_id TEXT PRIMARY KEY,
                    name TEXT NOT NULL,
                    output_dir TEXT NOT NULL,
                    output_key TEXT NOT NULL,
                    command TEXT NOT NULL,
                    pid INTEGER,
                    started REAL NOT NULL,
                    state TEXT NOT NULL,
                    ended REAL,
                    detail TEXT NOT NULL DEFAULT '',
                    progress TEXT
                )"""
            )
            db.execute("CREATE INDEX IF NOT EXISTS jobs_by_output ON jobs(output_key)")
            db.execute("CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state)")
            if "progress" not in {column["name"] for column in db.execute("PRAGMA table_info(jobs)")}:
                try:  # a registry from before the column
                    db.execute("ALTER TABLE jobs ADD COLUMN progress TEXT")
                except sqlite3.OperationalError as exc:  # another process added it meanwhile
                    if "duplicate column" not in str(exc):
                        raise

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    @staticmethod
    def _record(row: sqlite3.Row) -> JobRecord:
        return JobRecord(
            job_id=row["job_id"],
            name=row["name"],
            output_dir=Path(row["output_dir"]),
            command=json.loads(row["command"]),
            pid=row["pid"],
            started=row["started"],
            state=row["state"],
            ended=row["ended"],
            detail=row["detail"],
            progress=_progress(row["progress"]),
        )

    def _row(self, db: sqlite3.Connection, job_id: str) -> sqlite3.Row:
        row = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJobError(f"no training job with id {job_id!r} in {self.path}")
        return row

    def _check_free(self, db: sqlite3.Connection, output_dir: Path) -> None:
        for row in db.execute(
            f"SELECT * FROM jobs WHERE output_key = ? AND state NOT IN ({_FINAL_STATES_SQL})",
            (_same_dir(output_dir), *sorted(FINAL_STATE_VALUES)),
        ):
            starting = row["pid"] is None and time.time() - row["started"] < LAUNCH_WINDOW_S
            if starting or process_alive(row["pid"], started=row["started"]):
                raise JobConflictError(
                    f"job {row['job_id']} ({row['state']}) is already training into {output_dir}; "
                    "stop it first or choose another output name"
                )

    def check_free(self, output_dir: Path) -> None:
        """Raise JobConflictError when an unfinished job of this registry writes into `output_dir`."""
        with self._connect() as db:
            self._check_free(db, output_dir)

    def reserve(self, name: str, output_dir: Path, command: list[str]) -> JobRecord:
        """Register a job about to start; refuses (atomically) when an unfinished job uses `output_dir`."""
        job_id = uuid.uuid4().hex
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                self._check_free(db, output_dir)
                db.execute(
                    "INSERT INTO jobs (job_id, name, output_dir, output_key, command, pid, started, state)"
                    " VALUES (?, ?, ?, ?, ?, NULL, ?, ?)",
                    (
                        job_id,
                        name,
                        str(output_dir),
                        _same_dir(output_dir),
                        json.dumps(command),
                        time.time(),
                        JobState.STARTING.value,
                    ),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return self.get(job_id)

    def set_pid(self, job_id: str, pid: int) -> None:
        with self._connect() as db:
            db.execute("UPDATE jobs SET pid = ? WHERE job_id = ?", (pid, job_id))

    def set_state(self, job_id: str, state: str, detail: str | None = None) -> None:
        """Record the job's state; a final one with the run's progress as it ended (`keep_progress`)."""
        ended = time.time() if state in FINAL_STATE_VALUES else None
        if ended is not None:
            self.keep_progress(job_id, run_progress(self.get(job_id).output_dir))
        with self._connect() as db:
            if detail is None:
                db.execute("UPDATE jobs SET state = ?, ended = ? WHERE job_id = ?", (state, ended, job_id))
            else:
                db.execute(
                    "UPDATE jobs SET state = ?, ended = ?, detail = ? WHERE job_id = ?",
                    (state, ended, detail, job_id),
                )

    def keep_progress(self, job_id: str, progress: dict[str, object]) -> None:
        """Keep a finished job's progress in the registry, so listing it reads none of its files."""
        with self._connect() as db:
            db.execute("UPDATE jobs SET progress = ? WHERE job_id = ?", (json.dumps(progress, default=str), job_id))

    def get(self, job_id: str) -> JobRecord:
        with self._connect() as db:
            return self._record(self._row(db, job_id))

    def find_by_output_dir(self, output_dir: str | os.PathLike) -> JobRecord | None:
        """The most recent job that wrote into `output_dir`, if any."""
        with self._connect() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE output_key = ? ORDER BY started DESC LIMIT 1", (_same_dir(output_dir),)
            ).fetchone()
        return self._record(row) if row else None

    def records(self, *, active_since: float | None = None) -> list[JobRecord]:
        """Every readable job, newest first (with `active_since`, only those unfinished or ended since);
        the ids of unreadable rows are in `skipped_rows`."""
        records, self.skipped_rows = [], []
        query = "SELECT * FROM jobs"
        parameters: tuple[object, ...] = ()
        if active_since is not None:
            query += f" WHERE state NOT IN ({_FINAL_STATES_SQL}) OR ended >= ?"
            parameters = (*sorted(FINAL_STATE_VALUES), active_since)
        with self._connect() as db:
            for row in db.execute(query + " ORDER BY started DESC", parameters):
                try:
                    records.append(self._record(row))
                except (ValueError, TypeError) as exc:  # e.g. a command that is not JSON
                    log.warning("job registry %s: skipping job %s (%s)", self.path, row["job_id"], exc)
                    self.skipped_rows.append(str(row["job_id"]))
        return records

    def refresh(self, job_id: str) -> JobRecord:
        """Bring the recorded state up to date with status.json and whether the process lives."""
        job = self.get(job_id)
        if job.finished:
            return job
        status = read_status(job.output_dir) or {}
        state = status.get("state") if _status_is_of(status, job) else None
        alive = process_alive(job.pid, started=job.started)
        if isinstance(state, str) and state in FINAL_STATE_VALUES:
            detail = str(status.get("error") or "")
            if state == JobState.FAILED.value:
                tail = status.get("log_tail")
                lines = tail if isinstance(tail, list) else log_tail(job.output_dir, FAILURE_LOG_LINES)
                detail = "\n".join([detail, *map(str, lines)]).strip()
            if alive and job.pid:
                reap(job.pid, timeout=5)
            self.set_state(job.job_id, state, detail)
        elif job.pid is not None and not alive:
            tail = "\n".join(log_tail(job.output_dir, FAILURE_LOG_LINES))
            self.set_state(
                job.job_id,
                JobState.FAILED.value,
                f"the trainer process {job.pid} ended without a final status (state was {state or job.state!r}).\n"
                f"Last lines of {LOG_FILE}:\n{tail}",
            )
        elif isinstance(state, str) and state != job.state and job.state != JobState.STOPPING.value:
            self.set_state(job.job_id, state)  # a requested stop shows as `stopping` until the end
        return self.get(job_id)

    def list_shown(self) -> list[dict[str, object]]:
        """Every job as a job list shows it, newest first, straight from the registry (no command parsed,
        no path built: a list of thousands of jobs stays fast): its JSON_FIELDS, and `progress`, kept
        when it ended (None while it runs and for jobs that ended before the registry kept it)."""
        with self._connect() as db:
            rows = db.execute(f"SELECT {', '.join(JSON_FIELDS)}, progress FROM jobs ORDER BY started DESC").fetchall()
        return [
            {**{field: row[field] for field in JSON_FIELDS}, "progress": _progress(row["progress"])} for row in rows
        ]

    def output_dirs(self) -> list[Path]:
        """Every folder a registered job writes or wrote into."""
        with self._connect() as db:
            return [Path(row["output_dir"]) for row in db.execute("SELECT DISTINCT output_dir FROM jobs")]
