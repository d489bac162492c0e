"""The real-ComfyUI tier's servers, started once for the session (support/comfyui_server.py runs them).

`comfy_server` starts one ComfyUI when COMFYUI_DIR points at a checkout, and skips otherwise (fails
under CI=true). `frontend_server` (one parameter per frontend in FRONTENDS) is the server a browser
check opens: "pinned" is `comfy_server`, with the frontend ComfyUI's requirements pin; "newest" is a
second ComfyUI on the same base directory (same models, outputs and training jobs; its own temp
folder) serving the frontend installed with `pip install --target $COMFYUI_NEWEST_FRONTEND
comfyui-frontend-package` through `--front-end-root`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from comfyui_server import (
    FRONTENDS,
    ComfyServer,
    _prepare_base,
    comfyui_dir,
    newest_frontend_root,
    running_comfyui,
)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory: pytest.TempPathFactory, testdata: Path) -> Iterator[ComfyServer]:
    """ComfyUI with the frontend its requirements pin."""
    comfyui = comfyui_dir()
    base = tmp_path_factory.mktemp("comfy-base")
    with running_comfyui(comfyui, base, _prepare_base(base, testdata)) as server:
        yield server


@pytest.fixture(scope="session", params=FRONTENDS)
def frontend_server(request: pytest.FixtureRequest, comfy_server: ComfyServer) -> Iterator[ComfyServer]:
    """The server a browser check opens, once per frontend."""
    if request.param == "pinned":
        yield comfy_server
        return
    root = newest_frontend_root()
    extra_paths = comfy_server.base / "extra_model_paths.yaml"
    with running_comfyui(
        comfyui_dir(), comfy_server.base, extra_paths, frontend="newest", front_end_root=root
    ) as server:
        yield server
