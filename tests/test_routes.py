"""The panel's HTTP routes through aiohttp's test client, and the websocket event poller."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from comfy_stubs import set_comfy_base, start_prompt_server, stop_prompt_server
from run_folders import MUSUBI_SAMPLES, write_musubi_run
from training_runs import TinyTraining, group_gone, tiny_training, wait_for  # noqa: F401 (fixture)
from yarl import URL

from face_consistency.nodes import comfy_env, routes
from face_consistency.training_contract.protocol import write_status
from face_consistency.training_jobs import jobs
from face_consistency.training_jobs.jobs import JobRecord, JobRegistry

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
    write_status(folder, {"state": "training", "job_id": job.job_id, "step": 3, "total_steps": 10,
                          "loss": 0.5, "face_sim/x0_mean": 0.6})
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
        assert {PREFIX, f"{PREFIX}/{{job_id}}", f"{PREFIX}/{{job_id}}/stop", f"{PREFIX}/{{job_id}}/log",
                f"{PREFIX}/{{job_id}}/samples/{{filename}}"} <= paths
        comfy_env.send_event("progress", {"job_id": "x"})
        assert server.events == [("face_consistency.progress", {"job_id": "x"})]
    finally:
        routes.stop_event_poller()
        stop_prompt_server()


def test_a_running_job_is_stopped_through_the_route(
    registry: JobRegistry, tmp_path: Path, tiny_training: TinyTraining
) -> None:
    output_dir = tmp_path / "out"
    job = jobs.launch(registry, output_dir, tiny_training.argv(output_dir, 10_000), name="tiny")

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
    assert registry.list() == []
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
