"""The panel's HTTP routes through aiohttp's test client, and the websocket event poller."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from comfy_stubs import set_comfy_base, start_prompt_server, stop_prompt_server
from face_consistency.nodes import comfy_env, routes
from face_consistency.training_contract.protocol import write_status
from face_consistency.training_jobs import job_control
from face_consistency.training_jobs.job_registry import REGISTRY_FILENAME, JobRecord, JobRegistry
from run_folders import MUSUBI_SAMPLES, write_musubi_run
from training_runs import TinyTraining, group_gone, wait_for
from yarl import URL

PREFIX = "/face_consistency/jobs"


@pytest.fixture()
def registry(tmp_path: Path) -> JobRegistry:
    set_comfy_base(tmp_path / "comfy")
    return JobRegistry(tmp_path / "jobs.sqlite3")


def _finished_job(registry: JobRegistry, folder: Path, state: str = "completed") -> JobRecord:
    write_musubi_run(folder)
    job = registry.reserve(folder.name, folder, ["python", "bootstrap.py", "train"])
    registry.set_state(job.job_id, state)
    return registry.get(job.job_id)


def _serve(registry: JobRegistry, scenario: Callable[[TestClient], Awaitable[None]]) -> None:
    async def main() -> None:
        table = web.RouteTableDef()
        routes.add_routes(table, lambda: registry)
        app = web.Application()
        app.add_routes(table)
        async with TestClient(TestServer(app)) as client:
            await scenario(client)

    asyncio.run(main())


def test_jobs_are_listed_and_read(registry: JobRegistry, tmp_path: Path) -> None:
    job = _finished_job(registry, tmp_path / "runs" / "musubi_face")

    async def scenario(client: TestClient) -> None:
        listing = await (await client.get(PREFIX)).json()
        assert [j["job_id"] for j in listing["jobs"]] == [job.job_id]
        assert listing["jobs"][0]["state"] == "completed"
        assert listing["jobs"][0]["latest_checkpoint"] == "musubi_face.safetensors"

        detail = await (await client.get(f"{PREFIX}/{job.job_id}", params={"max_points": "10"})).json()
        assert detail["metrics_source"] == "tensorboard"
        assert len(detail["metrics"]) == 10 and detail["metrics"][-1]["step"] == 30
        assert detail["metrics"][-1]["face_similarity"] == pytest.approx(1.0)
        assert [c["step"] for c in detail["checkpoints"]] == [10, 15, 20, 30]
        assert [s["filename"] for s in detail["samples"]] == list(MUSUBI_SAMPLES[2:])
        assert detail["validation"] == [] and detail["recommendation"] is None  # a musubi run has neither

        image = await client.get(f"{PREFIX}/{job.job_id}/samples/{MUSUBI_SAMPLES[-1]}")
        assert image.status == 200
        assert await image.read() == (tmp_path / "runs" / "musubi_face" / "sample" / MUSUBI_SAMPLES[-1]).read_bytes()

    _serve(registry, scenario)


def test_log_tail(registry: JobRegistry, tmp_path: Path) -> None:
    job = _finished_job(registry, tmp_path / "run")
    (tmp_path / "run" / "train.log").write_text("".join(f"line {i}\n" for i in range(100)))

    async def scenario(client: TestClient) -> None:
        body = await (await client.get(f"{PREFIX}/{job.job_id}/log", params={"lines": "3"})).json()
        assert body["lines"] == ["line 97", "line 98", "line 99"]
        for bad in ("0", "-1", "abc", "1e3", "99999999"):
            assert (await client.get(f"{PREFIX}/{job.job_id}/log", params={"lines": bad})).status == 400

    _serve(registry, scenario)


def test_a_log_symlinked_out_of_the_job_folder_is_refused(registry: JobRegistry, tmp_path: Path) -> None:
    job = _finished_job(registry, tmp_path / "run")
    secret = tmp_path / "secret.txt"
    secret.write_text("not the pack's to serve\n")
    (tmp_path / "run" / "train.log").symlink_to(secret)

    async def scenario(client: TestClient) -> None:
        response = await client.get(f"{PREFIX}/{job.job_id}/log")
        assert response.status == 403
        assert "secret" not in await response.text()

    _serve(registry, scenario)


def test_unknown_and_malformed_ids_are_refused(registry: JobRegistry) -> None:
    async def scenario(client: TestClient) -> None:
        assert (await client.get(f"{PREFIX}/{'0' * 32}")).status == 404
        assert (await client.post(f"{PREFIX}/{'0' * 32}/stop")).status == 404
        for bad in ("nothex", "A" * 32, "0" * 31, "%2E%2E", "..%2F..%2Fetc"):
            response = await client.get(URL(f"{PREFIX}/{bad}/log", encoded=True))
            assert response.status in (400, 404), bad

    _serve(registry, scenario)


def test_path_traversal_is_refused(registry: JobRegistry, tmp_path: Path) -> None:
    job = _finished_job(registry, tmp_path / "runs" / "musubi_face")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for the browser")
    sample_dir = tmp_path / "runs" / "musubi_face" / "sample"
    # a symlink inside the sample folder, named like a sample, pointing out of the job folder
    (sample_dir / "musubi_face_000030_00_20260101130000.png").symlink_to(secret)

    attempts = [
        "..%2F..%2F..%2Fsecret.png",
        "%2E%2E%2F%2E%2E%2F%2E%2E%2Fsecret.png",
        "%2E%2E",
        "..%5C..%5Csecret.png",
        f"{'%2F'}{str(secret).lstrip('/').replace('/', '%2F')}",
        "%252E%252E%252Fsecret.png",
        ".hidden.png",
        "train.log",
        "musubi_face_000030_00_20260101130000.png",
    ]

    async def scenario(client: TestClient) -> None:
        for attempt in attempts:
            response = await client.get(URL(f"{PREFIX}/{job.job_id}/samples/{attempt}", encoded=True))
            assert response.status in (400, 403, 404), attempt
            assert b"not for the browser" not in await response.read(), attempt
        # a whole sample folder that is a symlink out of the job folder
        real_samples = tmp_path / "outside_samples"
        sample_dir.rename(real_samples)
        sample_dir.symlink_to(real_samples, target_is_directory=True)
        response = await client.get(f"{PREFIX}/{job.job_id}/samples/{MUSUBI_SAMPLES[-1]}")
        assert response.status == 403

    _serve(registry, scenario)


def test_stopping_a_finished_job_is_a_no_op(registry: JobRegistry, tmp_path: Path) -> None:
    job = _finished_job(registry, tmp_path / "run", state="stopped")

    async def scenario(client: TestClient) -> None:
        response = await client.post(f"{PREFIX}/{job.job_id}/stop")
        assert response.status == 200
        assert await response.json() == {"job_id": job.job_id, "state": "stopped", "stopping": False}

    _serve(registry, scenario)


def test_poller_sends_progress_then_finished(registry: JobRegistry, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    job = registry.reserve("run", folder, ["python"])
    events: list[tuple[str, dict[str, Any]]] = []
    poller = routes.EventPoller(lambda: registry, lambda event, data: events.append((event, data)))

    # the trainer's status carries the last step's loss and face similarity
    write_status(
        folder,
        {"state": "training", "job_id": job.job_id, "step": 3, "total_steps": 10, "loss": 0.5, "face_sim/x0_mean": 0.6},
    )
    poller.poll_once()
    poller.poll_once()  # nothing changed: nothing sent
    write_status(folder, {"state": "completed", "job_id": job.job_id, "step": 10, "total_steps": 10})
    poller.poll_once()
    poller.poll_once()

    assert [e for e, _ in events] == ["progress", "progress", "finished"]
    assert events[0][1]["step"] == 3 and events[0][1]["loss"] == 0.5 and events[0][1]["face_similarity"] == 0.6
    assert events[-1][1]["job_id"] == job.job_id and events[-1][1]["state"] == "completed"


def test_registered_with_a_running_comfyui(registry: JobRegistry) -> None:
    server = start_prompt_server()
    try:
        routes.register_with_comfyui()
        paths = {route.path for route in server.routes}
        assert {
            PREFIX,
            f"{PREFIX}/{{job_id}}",
            f"{PREFIX}/{{job_id}}/stop",
            f"{PREFIX}/{{job_id}}/log",
            f"{PREFIX}/{{job_id}}/samples/{{filename}}",
        } <= paths
        comfy_env.send_event("progress", {"job_id": "x"})
        assert server.events == [("face_consistency.progress", {"job_id": "x"})]
    finally:
        routes.stop_event_poller()
        stop_prompt_server()


def test_a_running_job_is_stopped_through_the_route(
    registry: JobRegistry, tmp_path: Path, tiny_training: TinyTraining
) -> None:
    output_dir = tmp_path / "out"
    job_control.open_run_folder(registry, output_dir, "tiny")
    job = job_control.start_trainer(registry, output_dir, tiny_training.argv(output_dir, 10_000), name="tiny")

    async def scenario(client: TestClient) -> None:
        first = await client.post(f"{PREFIX}/{job.job_id}/stop")
        second = await client.post(f"{PREFIX}/{job.job_id}/stop")  # joins the stop under way
        assert (first.status, second.status) == (202, 202)
        assert (await first.json())["state"] == "stopping"
        listing = await (await client.get(PREFIX)).json()
        assert listing["jobs"][0]["state"] in ("stopping", "stopped")

    _serve(registry, scenario)
    done = wait_for(lambda: (r := registry.refresh(job.job_id)).finished and r, "the job to stop")
    assert done.state == "stopped", done.detail
    wait_for(lambda: group_gone(job.pid), "no process of the job's tree left", timeout_s=30)


def test_a_locked_registry_never_holds_up_the_server(registry: JobRegistry, tmp_path: Path) -> None:
    """Another process holds the registry locked: the pack's routes answer 503 after their own
    short wait, and every other request of the server answers at once meanwhile."""
    import sqlite3
    import time

    _finished_job(registry, tmp_path / "run")
    locked = JobRegistry(registry.path, busy_timeout_s=0.5)
    holder = sqlite3.connect(registry.path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")

    async def main() -> None:
        table = web.RouteTableDef()
        routes.add_routes(table, lambda: locked)

        @table.get("/system_stats")  # stands for ComfyUI's own routes
        async def system_stats(request: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        app = web.Application()
        app.add_routes(table)
        async with TestClient(TestServer(app)) as client:
            pending = asyncio.ensure_future(client.get(PREFIX))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            assert (await client.get("/system_stats")).status == 200
            assert time.monotonic() - started < 1.0
            response = await pending
            assert response.status == 503 and "busy" in response.reason

    try:
        asyncio.run(main())
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_corrupt_registry_is_moved_aside_and_a_broken_row_skipped(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    registry = JobRegistry(path)
    assert registry.records() == []
    assert [p.name.split(".corrupt-")[0] for p in tmp_path.glob("jobs.sqlite3.corrupt-*")] == ["jobs.sqlite3"]
    good = _finished_job(registry, tmp_path / "run")
    bad = registry.reserve("bad", tmp_path / "bad", ["python"])
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("UPDATE jobs SET command = ? WHERE job_id = ?", ("{not json", bad.job_id))

    async def scenario(client: TestClient) -> None:
        listing = await (await client.get(PREFIX)).json()
        assert [j["job_id"] for j in listing["jobs"]] == [good.job_id]
        assert listing["skipped_rows"] == [bad.job_id]

    _serve(registry, scenario)


SECRET = "planted secret 5c1e"


def test_no_file_of_a_job_that_links_out_is_served(registry: JobRegistry, tmp_path: Path) -> None:
    """status.json, metrics.jsonl, train.log, a checkpoint and the sample folder of a job, each a symlink to
    a planted secret outside the job's folder: no route's answer carries the secret."""
    folder = tmp_path / "run"
    job = _finished_job(registry, folder, state="failed")
    outside = tmp_path / "outside"
    (outside / "sample").mkdir(parents=True)
    (outside / "status.json").write_text(f'{{"state": "training", "step": 77, "loss": 0.77, "error": "{SECRET}"}}')
    (outside / "metrics.jsonl").write_text(f'{{"step": 5, "loss": 0.55, "note": "{SECRET}"}}\n' * 3)
    (outside / "secret.txt").write_text(SECRET)
    (folder / "sample").rename(outside / "sample_real")
    for name, target in (
        ("status.json", "status.json"),
        ("metrics.jsonl", "metrics.jsonl"),
        ("train.log", "secret.txt"),
        ("sample", "sample_real"),
        ("musubi_face-step00000099.safetensors", "secret.txt"),
    ):
        (folder / name).unlink(missing_ok=True)
        (folder / name).symlink_to(outside / target)
    for event_file in folder.rglob("events.out.tfevents.*"):  # the run's own TensorBoard metrics: none here
        event_file.unlink()
    running = registry.reserve("running", folder, ["python"])  # an unfinished job is read from its files

    async def scenario(client: TestClient) -> None:
        bodies = [await (await client.get(PREFIX)).text()]
        for job_id in (job.job_id, running.job_id):
            detail = await client.get(f"{PREFIX}/{job_id}")
            assert detail.status == 200
            body = await detail.json()
            assert body["metrics"] == [] and body["samples"] == [] and body.get("step") is None
            assert "musubi_face-step00000099.safetensors" not in [c["filename"] for c in body["checkpoints"]]
            bodies.append(await detail.text())
            log = await client.get(f"{PREFIX}/{job_id}/log")
            assert log.status == 403
            bodies.append(await log.text())
            sample = await client.get(f"{PREFIX}/{job_id}/samples/{MUSUBI_SAMPLES[-1]}")
            assert sample.status == 403
            bodies.append(await sample.text())
        assert not [body for body in bodies if SECRET in body or '"step": 77' in body or "0.55" in body]

    _serve(registry, scenario)


def _insert_finished_jobs(registry: JobRegistry, root: Path, count: int) -> None:
    """`count` finished jobs written straight into the registry, each with the progress kept when it ended;
    their folders do not exist: listing them must not need them."""
    import json
    import sqlite3

    progress = json.dumps(
        {
            "step": 100,
            "total_steps": 100,
            "epoch": 10,
            "loss": 0.1,
            "face_similarity": 0.7,
            "latest_checkpoint": "run.safetensors",
        }
    )
    rows = [
        (
            f"{i:032x}",
            f"run{i}",
            str(root / f"run{i}"),
            str(root / f"run{i}"),
            '["python"]',
            None,
            1000.0 + i,
            "completed",
            2000.0 + i,
            "",
            progress,
        )
        for i in range(count)
    ]
    with sqlite3.connect(registry.path) as db:
        db.executemany(
            "INSERT INTO jobs (job_id, name, output_dir, output_key, command, pid, started, state, ended,"
            " detail, progress) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )


def test_ten_thousand_finished_jobs_list_from_the_registry_alone(
    registry: JobRegistry, tmp_path: Path, monkeypatch
) -> None:
    import time

    _insert_finished_jobs(registry, tmp_path / "gone", 10_000)
    folder = tmp_path / "live"
    folder.mkdir()
    live = registry.reserve("live", folder, ["python"])
    write_status(folder, {"state": "training", "job_id": live.job_id, "step": 3, "total_steps": 10})
    read_folders: list[str] = []
    real_run_progress = routes.run_progress
    monkeypatch.setattr(routes, "run_progress", lambda d: read_folders.append(str(d)) or real_run_progress(d))

    async def scenario(client: TestClient) -> None:
        started = time.perf_counter()
        response = await client.get(PREFIX)
        elapsed = time.perf_counter() - started
        listing = await response.json()
        print(f"\nGET {PREFIX} with 10,001 jobs: {elapsed:.3f} s")
        assert response.status == 200 and len(listing["jobs"]) == 10_001
        assert elapsed < 5.0  # the issue's target is 0.5 s; a loose bound for a loaded CI machine
        assert listing["jobs"][0]["name"] == "live" and listing["jobs"][0]["step"] == 3
        finished = listing["jobs"][1]
        assert (finished["state"], finished["step"], finished["latest_checkpoint"]) == (
            "completed",
            100,
            "run.safetensors",
        )

    _serve(registry, scenario)
    assert read_folders == [str(folder)]  # only the unfinished job's folder was read


def test_a_finished_job_from_before_kept_progress_is_read_when_opened(registry: JobRegistry, tmp_path: Path) -> None:
    import sqlite3

    job = _finished_job(registry, tmp_path / "runs" / "musubi_face")
    with sqlite3.connect(registry.path) as db:  # as a registry written before the progress column
        db.execute("UPDATE jobs SET progress = NULL")

    async def scenario(client: TestClient) -> None:
        assert (await (await client.get(PREFIX)).json())["jobs"][0]["latest_checkpoint"] is None  # not read
        detail = await (await client.get(f"{PREFIX}/{job.job_id}")).json()
        assert detail["latest_checkpoint"] == "musubi_face.safetensors"
        assert (await (await client.get(PREFIX)).json())["jobs"][0]["latest_checkpoint"] == "musubi_face.safetensors"

    _serve(registry, scenario)


def test_a_registry_from_before_the_progress_column_is_upgraded(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, name TEXT NOT NULL, output_dir TEXT NOT NULL, "
            "output_key TEXT NOT NULL, command TEXT NOT NULL, pid INTEGER, started REAL NOT NULL, "
            "state TEXT NOT NULL, ended REAL, detail TEXT NOT NULL DEFAULT '')"
        )
        db.execute(
            "INSERT INTO jobs VALUES ('%s', 'old', '/gone', '/gone', '[]', NULL, 1.0, 'completed', 2.0, '')"
            % ("1" * 32)
        )
    (old,) = JobRegistry(path).records()
    assert (old.name, old.state, old.progress) == ("old", "completed", None)


def test_the_poller_reads_no_job_that_ended_before_comfyui_started(
    registry: JobRegistry, tmp_path: Path, monkeypatch
) -> None:
    _insert_finished_jobs(registry, tmp_path / "gone", 2_000)
    refreshed: list[str] = []
    real_refresh = registry.refresh
    monkeypatch.setattr(registry, "refresh", lambda job_id: refreshed.append(job_id) or real_refresh(job_id))
    events: list[tuple[str, dict[str, Any]]] = []
    poller = routes.EventPoller(lambda: registry, lambda event, data: events.append((event, data)))
    poller.poll_once()
    assert refreshed == [] and events == []


def test_the_registry_lives_in_comfyuis_system_user_folder_where_there_is_one(tmp_path: Path) -> None:
    """ComfyUI 0.3.76 and later: user/__face_consistency/, which /userdata never serves; an existing
    registry is moved there once, with its jobs."""
    base = tmp_path / "comfy"
    set_comfy_base(base)  # an older ComfyUI: today's place
    legacy = base / "user" / "face_consistency" / REGISTRY_FILENAME
    assert comfy_env.registry_file() == legacy
    old_job = comfy_env.open_registry().reserve("old", tmp_path / "old_run", ["python"])
    assert legacy.is_file()

    set_comfy_base(base, newer=True)  # the same installation, ComfyUI upgraded
    protected = base / "user" / "__face_consistency" / REGISTRY_FILENAME
    assert comfy_env.open_registry().path == protected
    assert [job.job_id for job in comfy_env.open_registry().records()] == [old_job.job_id]
    assert not legacy.exists() and not legacy.parent.exists()
    # once: a registry an older ComfyUI writes again in the old place later is left there
    JobRegistry(legacy).reserve("later", tmp_path / "later_run", ["python"])
    assert [job.name for job in comfy_env.open_registry().records()] == ["old"]
    assert legacy.is_file()


def test_the_registry_move_takes_a_hot_journal_along(tmp_path: Path) -> None:
    base = tmp_path / "comfy"
    set_comfy_base(base)
    legacy = comfy_env.registry_file()
    comfy_env.open_registry().reserve("old", tmp_path / "old_run", ["python"])
    journal = legacy.with_name(legacy.name + "-journal")
    journal.write_bytes(b"")  # an empty journal: nothing to roll back, but it must travel with the database
    set_comfy_base(base, newer=True)
    moved = comfy_env.registry_file()
    assert moved.with_name(moved.name + "-journal").exists() and not journal.exists()
    assert [job.name for job in comfy_env.open_registry().records()] == ["old"]


def test_the_detail_carries_the_validation_loss_and_the_checkpoint_to_keep(
    registry: JobRegistry, tmp_path: Path
) -> None:
    from face_consistency.training_contract.checkpoint_choice import CheckpointRow, CheckpointTable, write_table
    from face_consistency.training_contract.protocol import append_metrics

    folder = tmp_path / "runs" / "ours"
    job = _finished_job(registry, folder)
    for step in range(1, 31):
        append_metrics(folder, {"step": step, "loss": 1.0 / step})
        if step % 10 == 0:
            append_metrics(folder, {"step": step, "val_loss": 0.5 + abs(step - 20) / 100})
    write_table(
        folder,
        CheckpointTable(
            [
                CheckpointRow("musubi_face-000001.safetensors", 10, 1, {"1": 0.6}),
                CheckpointRow("musubi_face-000002.safetensors", 20, 2, {"1": 0.5}),
                CheckpointRow("musubi_face.safetensors", 30, None, {"1": 0.6}),
            ],
            (1.0,),
        ),
    )

    async def scenario(client: TestClient) -> None:
        detail = await (await client.get(f"{PREFIX}/{job.job_id}", params={"max_points": "5"})).json()
        assert len(detail["metrics"]) == 5  # the training loss is thinned, the few validation points are not
        assert detail["validation"] == [
            {"step": 10, "val_loss": 0.6},
            {"step": 20, "val_loss": 0.5},
            {"step": 30, "val_loss": 0.6},
        ]
        assert detail["recommendation"] == {
            "name": "musubi_face-000002.safetensors",
            "step": 20,
            "reason": "step 20: lowest validation loss 0.5000; validation loss rises after step 20",
        }

    _serve(registry, scenario)
