"""Minimal stand-ins for ComfyUI's `folder_paths`, `comfy.utils`, `comfy_execution.graph_utils` and `server` modules.

They implement just the surface the pack uses, so node classes run in unit tests without
ComfyUI. `install_comfy_stubs()` puts them in sys.modules; `set_comfy_base(path)` points
models/output/user folders at a temporary directory. `set_comfy_base(path, newer=True)` adds what
later ComfyUIs offer: `get_system_user_directory` (0.3.76), as ComfyUI's own code does it, and
`is_within_directory` (0.38).
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any, ClassVar


class ProgressBar:
    instances: ClassVar[list[ProgressBar]] = []
    interrupt_after: int | None = None  # simulate the user pressing Cancel after N updates

    def __init__(self, total: int) -> None:
        self.total = total
        self.current = 0
        ProgressBar.instances.append(self)

    def update(self, value: int) -> None:
        self.current += value
        if ProgressBar.interrupt_after is not None and self.current >= ProgressBar.interrupt_after:
            raise InterruptedError("Processing interrupted")

    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        self.current = value


class ExecutionBlocker:
    """ComfyUI's: returned as an output, it keeps the nodes it feeds from running (silently when message is None)."""

    def __init__(self, message: str | None) -> None:
        self.message = message


class _PromptServer:
    instance: _PromptServer | None = None

    def __init__(self) -> None:
        from aiohttp import web

        self.routes = web.RouteTableDef()
        self.events: list[tuple[str, Any]] = []

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        self.events.append((event, data))

    def send_progress_text(self, text: str, node_id: str, sid: str | None = None) -> None:
        self.events.append(("progress_text", {"node": node_id, "text": text}))


SYSTEM_USER_PREFIX = "__"


def _get_system_user_directory(fp: types.ModuleType, name: str = "system") -> str:
    """ComfyUI's folder_paths.get_system_user_directory (0.3.76 and later), line for line in effect:
    user/__<name>, which its /userdata routes refuse to serve."""
    if not name or not isinstance(name, str):
        raise ValueError("System user name cannot be empty")
    if not name.replace("_", "").isalnum():
        raise ValueError(f"Invalid system user name: '{name}'")
    if name.startswith("_"):
        raise ValueError("System user name should not start with underscore")
    return os.path.join(fp.get_user_directory(), f"{SYSTEM_USER_PREFIX}{name}")


def _is_within_directory(directory: str, target: str) -> bool:
    """ComfyUI's folder_paths.is_within_directory (0.38 and later): realpath of both, then commonpath."""
    directory, target = os.path.realpath(directory), os.path.realpath(target)
    try:
        return os.path.commonpath([directory, target]) == directory
    except ValueError:
        return False


def _make_folder_paths(base: Path) -> types.ModuleType:
    fp = types.ModuleType("folder_paths")
    fp.base_path = str(base)
    fp.models_dir = str(base / "models")
    fp.folder_names_and_paths = {
        name: ([str(base / "models" / name)], set()) for name in ("diffusion_models", "vae", "text_encoders", "loras")
    }

    def add_model_folder_path(name: str, path: str, is_default: bool = False) -> None:
        paths, _ = fp.folder_names_and_paths.setdefault(name, ([], set()))
        if path not in paths:
            paths.insert(0, path) if is_default else paths.append(path)

    def get_folder_paths(name: str) -> list[str]:
        return list(fp.folder_names_and_paths[name][0])

    def get_filename_list(name: str) -> list[str]:
        found: set[str] = set()
        for root in fp.folder_names_and_paths.get(name, ([], set()))[0]:
            for dirpath, _, files in os.walk(root):
                for f in files:
                    found.add(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
        return sorted(found)

    def get_full_path(name: str, filename: str) -> str | None:
        for root in fp.folder_names_and_paths.get(name, ([], set()))[0]:
            candidate = os.path.join(root, filename)
            if os.path.isfile(candidate):
                return candidate
        return None

    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = get_folder_paths
    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path
    fp.get_output_directory = lambda: str(base / "output")
    fp.get_user_directory = lambda: str(base / "user")
    fp.get_input_directory = lambda: str(base / "input")
    fp.get_temp_directory = lambda: str(base / "temp")
    return fp


def set_comfy_base(base: Path, *, newer: bool = False) -> types.ModuleType:
    """Re-point the stand-in `folder_paths` at `base` (creates the usual folders); `newer`: with the
    system user directory and containment test of later ComfyUIs."""
    for sub in ("models", "output", "user", "input", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    fp = _make_folder_paths(base)
    if newer:
        fp.get_system_user_directory = lambda name="system": _get_system_user_directory(fp, name)
        fp.is_within_directory = _is_within_directory
    sys.modules["folder_paths"] = fp
    return fp


def install_comfy_stubs(base: Path | None = None) -> None:
    import tempfile

    set_comfy_base(base or Path(tempfile.mkdtemp(prefix="comfy-stub-")))
    comfy = types.ModuleType("comfy")
    comfy_utils = types.ModuleType("comfy.utils")
    comfy_utils.ProgressBar = ProgressBar
    comfy.utils = comfy_utils
    sys.modules["comfy"] = comfy
    sys.modules["comfy.utils"] = comfy_utils
    comfy_execution = types.ModuleType("comfy_execution")
    graph_utils = types.ModuleType("comfy_execution.graph_utils")
    graph_utils.ExecutionBlocker = ExecutionBlocker
    comfy_execution.graph_utils = graph_utils
    sys.modules["comfy_execution"] = comfy_execution
    sys.modules["comfy_execution.graph_utils"] = graph_utils
    server = types.ModuleType("server")
    server.PromptServer = _PromptServer
    sys.modules["server"] = server


def start_prompt_server() -> _PromptServer:
    """Simulate a running ComfyUI server (PromptServer.instance set)."""
    _PromptServer.instance = _PromptServer()
    return _PromptServer.instance


def stop_prompt_server() -> None:
    _PromptServer.instance = None
