"""The real-ComfyUI end-to-end tier's shared parts: the servers and a headless Chromium driver.

`running_comfyui()` runs `main.py --cpu` with COMFYUI_PYTHON (default: this interpreter) on
127.0.0.1 with `--base-directory` in a temporary folder, so the checkout is left untouched: the pack
is symlinked into that folder's custom_nodes under a hyphenated name (as users clone it), the shared
test photos are copied into its input folder (`_prepare_base`), and an extra_model_paths.yaml maps
`insightface` to the shared test pack root. The session's servers, one per frontend, are the
fixtures `comfy_server` and `frontend_server` of tests/e2e/conftest.py.

`chromium()` starts headless Chromium (CHROMIUM, or `chromium` / `chromium-browser` on PATH;
skips without one) and `open_page()` drives a tab over the DevTools protocol (no Playwright),
collecting the page's console errors and uncaught exceptions.

Under CI=true nothing of the tier skips: a missing ComfyUI, frontend or Chromium fails the test.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NoReturn

import cv2
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_FOLDER = "ComfyUI-Face-Consistency"
STARTUP_TIMEOUT_S = 300
RUN_TIMEOUT_S = 300
BROWSER_TIMEOUT_S = 60


FRONTENDS = ("pinned", "newest")


def unavailable(reason: str) -> NoReturn:
    """Skip a test of the tier for want of something it needs; under CI=true, fail it instead."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the end-to-end tier must run in CI, see .ci/run)")
    pytest.skip(reason)


def comfyui_dir() -> Path:
    value = os.environ.get("COMFYUI_DIR")
    if not value:
        unavailable("set COMFYUI_DIR to a ComfyUI checkout to run the end-to-end tier")
    path = Path(value).expanduser().resolve()
    if not (path / "main.py").is_file():
        unavailable(f"COMFYUI_DIR={path} has no main.py: not a ComfyUI checkout")
    return path


def newest_frontend_root() -> Path:
    """The static folder of the frontend installed apart in COMFYUI_NEWEST_FRONTEND."""
    value = os.environ.get("COMFYUI_NEWEST_FRONTEND")
    if not value:
        unavailable(
            "set COMFYUI_NEWEST_FRONTEND to a folder holding another frontend "
            "(pip install --target DIR --no-deps comfyui-frontend-package) to check it too"
        )
    static = Path(value).expanduser().resolve() / "comfyui_frontend_package" / "static"
    if not (static / "index.html").is_file():
        unavailable(f"COMFYUI_NEWEST_FRONTEND={value} holds no comfyui_frontend_package/static/index.html")
    return static


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    def __init__(self, url: str, process: subprocess.Popen, log_path: Path, base: Path, frontend: str) -> None:
        self.url, self.process, self.log_path, self.base, self.frontend = url, process, log_path, base, frontend

    def get(self, route: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{route}", timeout=30) as response:
            return json.loads(response.read())

    def post(self, route: str, payload: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            f"{self.url}{route}", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:  # ComfyUI explains a rejected prompt in the body
            raise AssertionError(f"POST {route} -> {exc.code}: {exc.read().decode()}") from None

    def rejections(self, workflow: dict[str, Any]) -> dict[str, Any]:
        """The node errors the server rejects `workflow` with (failing if it queues it)."""
        request = urllib.request.Request(
            f"{self.url}/prompt",
            data=json.dumps({"prompt": workflow}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            urllib.request.urlopen(request, timeout=30).close()
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())["node_errors"]
        raise AssertionError("the server queued a workflow expected to be rejected")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


def _prepare_base(base: Path, testdata: Path) -> Path:
    """The server's base directory; returns its extra_model_paths.yaml."""
    for sub in ("custom_nodes", "input", "output", "temp", "user", "models"):
        (base / sub).mkdir()
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(REPO_ROOT, target_is_directory=True)
    for name in ("obama.jpg", "obama2.jpg", "obama_partial_face.jpg", "biden.jpg"):
        shutil.copyfile(testdata / "faces" / name, base / "input" / name)
    # the example workflows' input names: a control and its "edit", another photo of the person,
    # a group photo and its mirror
    shutil.copyfile(testdata / "faces" / "obama.jpg", base / "input" / "control.png")
    shutil.copyfile(testdata / "faces" / "obama2.jpg", base / "input" / "edited.png")
    shutil.copyfile(testdata / "faces" / "obama3.jpg", base / "input" / "reference.png")
    from insightface.data import get_image

    group_bgr = get_image("t1")
    cv2.imwrite(str(base / "input" / "group.png"), group_bgr)
    cv2.imwrite(str(base / "input" / "group_edited.png"), group_bgr[:, ::-1])
    # a returning user: the frontend opens no template browser over the page
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    extra_paths = base / "extra_model_paths.yaml"
    extra_paths.write_text(f"face_test_data:\n    base_path: {testdata}\n    insightface: insightface\n")
    return extra_paths


def _stop(process: subprocess.Popen) -> None:
    """Terminate a server process this module started; kill it if it ignores that for 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


@contextlib.contextmanager
def running_comfyui(
    comfyui: Path,
    base: Path,
    extra_paths: Path,
    *,
    frontend: str = "pinned",
    front_end_root: Path | None = None,
) -> Iterator[ComfyServer]:
    """ComfyUI on `base` (prepared by `_prepare_base`); a second server on the same base passes
    `front_end_root` and gets its own temp folder (ComfyUI empties its temp folder at start)."""
    port = free_port()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    log_path = base / f"server-{frontend}.log"
    options = []
    if front_end_root is not None:
        temp_parent = base / f"temp-{frontend}"
        temp_parent.mkdir()
        options += ["--front-end-root", str(front_end_root), "--temp-directory", str(temp_parent)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                python,
                "main.py",
                "--cpu",
                "--listen",
                "127.0.0.1",
                "--port",
                str(port),
                "--base-directory",
                str(base),
                "--extra-model-paths-config",
                str(extra_paths),
                "--database-url",
                "sqlite:///:memory:",
                *options,
            ],
            cwd=comfyui,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = ComfyServer(f"http://127.0.0.1:{port}", process, log_path, base, frontend)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with code {process.returncode} while starting:\n{server.log()}")
            try:
                server.get("/object_info/FaceConsistencyLoadModel")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer within {STARTUP_TIMEOUT_S}s:\n{server.log()}")
                time.sleep(1.0)
        yield server
    finally:
        _stop(process)


def run_prompt(server: ComfyServer, workflow: dict[str, Any], timeout_s: float = RUN_TIMEOUT_S) -> dict[str, Any]:
    """Queue a workflow, wait for it, return its outputs (failing with the server log if it fails)."""
    queued = server.post("/prompt", {"prompt": workflow, "client_id": uuid.uuid4().hex})
    # ComfyUI runs the outputs that validate and names the others' errors here
    assert not queued["node_errors"], f"outputs left out: {queued['node_errors']}"
    prompt_id = queued["prompt_id"]
    deadline = time.monotonic() + timeout_s
    while prompt_id not in (history := server.get(f"/history/{prompt_id}")):
        assert time.monotonic() < deadline, f"prompt not finished in {timeout_s:.0f}s:\n{server.log()}"
        time.sleep(0.5)
    entry = history[prompt_id]
    assert entry["status"]["status_str"] == "success", f"{entry['status']}\n{server.log()}"
    return entry["outputs"]


def _chromium_binary() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        unavailable("no Chromium (set CHROMIUM) for the browser checks of ComfyUI's frontend")
    return path


# offline and quiet: no GPU, no sandbox (CI runs as root), nothing fetched from the network
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@contextlib.contextmanager
def chromium(user_data_dir: Path) -> Iterator[int]:
    """Headless Chromium with its DevTools endpoint open on a fresh profile in `user_data_dir`
    (which must not exist yet); yields the endpoint's port."""
    user_data_dir.mkdir(parents=True)
    port = free_port()
    browser = subprocess.Popen(
        [
            _chromium_binary(),
            *CHROMIUM_FLAGS,
            f"--remote-debugging-port={port}",
            f"--user-data-dir={user_data_dir}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + BROWSER_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version", timeout=5).close()
                break
            except OSError:
                assert browser.poll() is None, f"Chromium exited with code {browser.returncode}"
                assert time.monotonic() < deadline, "Chromium's DevTools endpoint did not open"
                time.sleep(0.5)
        yield port
    finally:
        _stop(browser)


class DevToolsPage:
    """One browser tab driven over the DevTools protocol; keeps the console errors it sees."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self._message_ids = iter(range(1, 1_000_000))
        self.console_errors: list[str] = []

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self._message_ids)
        await self._ws.send_json({"id": message_id, "method": method, "params": params})
        while (message := await self._ws.receive_json()).get("id") != message_id:
            self._note(message)
        assert "error" not in message, f"{method}: {message['error']}"
        return message["result"]

    def _note(self, event: dict[str, Any]) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.console_errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.console_errors.append(
                " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            )
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            self.console_errors.append(f"{entry.get('text', '')} {entry.get('url', '')}".strip())

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, json.dumps(result["exceptionDetails"])[:2000]
        return result["result"].get("value")

    async def wait_for(
        self, expression: str, what: str, timeout_s: float = BROWSER_TIMEOUT_S, explain: str | None = None
    ) -> Any:
        """Evaluate `expression` until it is truthy; return its value. On a timeout the message holds
        the value of `explain` (a JS expression describing what the page shows instead), if given."""
        deadline = time.monotonic() + timeout_s
        while not (value := await self.evaluate(expression)):
            if time.monotonic() >= deadline:
                shown = f"; the page shows: {await self.evaluate(explain)}" if explain else ""
                raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}{shown}")
            await asyncio.sleep(0.5)
        return value

    async def click(self, element: str) -> None:
        """Click the middle of `element` (a JS expression) with the mouse, as a user would: it must
        be on screen and not covered by anything else."""
        x, y = await self.evaluate(
            f"(() => {{ const e = {element}; e.scrollIntoView({{block: 'nearest'}});"
            " const r = e.getBoundingClientRect(); const x = r.left + r.width / 2, y = r.top + r.height / 2;"
            " return e.contains(document.elementFromPoint(x, y)) ? [x, y] : [null, null]; })()"
        )
        assert x is not None, f"{element} is covered by another element"
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    async def screenshot(self, path: Path) -> Path:
        result = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(result["data"]))
        return path


@contextlib.asynccontextmanager
async def open_page(devtools_port: int, url: str, size: tuple[int, int] = (1400, 900)) -> AsyncIterator[DevToolsPage]:
    """A new tab that listens for console errors from before `url` starts loading."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.put(f"http://127.0.0.1:{devtools_port}/json/new?about:blank") as response:
            target = await response.json()
        try:
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = DevToolsPage(ws)
                for domain in ("Runtime", "Log", "Page"):
                    await page.send(f"{domain}.enable")
                await page.send(
                    "Emulation.setDeviceMetricsOverride",
                    width=size[0],
                    height=size[1],
                    deviceScaleFactor=1,
                    mobile=False,
                )
                await page.send("Page.navigate", url=url)
                yield page
        finally:
            async with http.get(f"http://127.0.0.1:{devtools_port}/json/close/{target['id']}"):
                pass
