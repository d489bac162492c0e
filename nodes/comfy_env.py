"""The one place that imports ComfyUI's own modules (`folder_paths`, `comfy.utils`, `server`,
`comfy_execution`).

Everything else in the pack (library, trainer, node classes) imports without ComfyUI; tests
put small stand-ins for these modules into `sys.modules`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..common import paths
from ..training_jobs.job_registry import REGISTRY_FILENAME, JobRegistry

log = logging.getLogger(__name__)

INSIGHTFACE_FOLDER = "insightface"
LORAS_FOLDER = "loras"


def folder_paths() -> Any:
    import folder_paths  # ComfyUI

    return folder_paths


def silent_blocker() -> Any:
    """ComfyUI's ExecutionBlocker without a message: a node fed by it does not run, and says nothing."""
    from comfy_execution.graph_utils import ExecutionBlocker  # ComfyUI

    return ExecutionBlocker(None)


def register_model_folders() -> None:
    """Register `models/insightface` and `output/loras` with ComfyUI (ComfyUI itself does not).

    `output/loras` is where the training nodes write their runs: as a `loras` folder, LoRA
    loaders (LoraLoaderModelOnly) list and load its checkpoints. Entries from
    extra_model_paths.yaml are kept; the default folders are added beside them
    (add_model_folder_path ignores a path already listed).
    """
    fp = folder_paths()
    fp.add_model_folder_path(INSIGHTFACE_FOLDER, str(Path(fp.models_dir) / INSIGHTFACE_FOLDER))
    fp.add_model_folder_path(LORAS_FOLDER, str(Path(fp.get_output_directory()) / LORAS_FOLDER))


def insightface_roots() -> list[Path]:
    """Folders that may hold `models/<pack>/` (ComfyUI's models/insightface and extra paths)."""
    fp = folder_paths()
    register_model_folders()
    paths = fp.folder_names_and_paths.get(INSIGHTFACE_FOLDER, ([], set()))[0]
    return [Path(p) for p in paths]


def output_directory() -> Path:
    return Path(folder_paths().get_output_directory())


class FolderAccessError(ValueError):
    """A node or route was asked to read or write outside the folders ComfyUI gives it."""


# The key that marks a STRING input naming a file or folder in a node's INPUT_TYPES (ComfyUI and its
# frontend ignore keys they do not know); tests/nodes/test_confinement.py tries every input so marked.
PATH_INPUT = "face_consistency_path"


def path_input(tooltip: str, **options: Any) -> tuple[str, dict[str, Any]]:
    """A STRING input that names a file or folder: `input_path` confines what it names."""
    return ("STRING", {"default": "", **options, "tooltip": tooltip, PATH_INPUT: True})


def comfy_folders() -> list[Path]:
    """ComfyUI's own folders, resolved: output, input, user, temp and every model folder."""
    fp = folder_paths()
    register_model_folders()
    roots = [fp.get_output_directory(), fp.get_input_directory(), fp.get_user_directory(), fp.get_temp_directory()]
    for folder_list, _ in fp.folder_names_and_paths.values():
        roots.extend(folder_list)
    return list(dict.fromkeys(Path(root).resolve() for root in roots))


def allowed_folders() -> list[Path]:
    """Where nodes may read and write: ComfyUI's folders and the folders of registered training jobs."""
    return list(dict.fromkeys([*comfy_folders(), *(p.resolve() for p in open_registry().output_dirs())]))


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `path`, symlinks resolved, lies in `folder`: ComfyUI's own test where it has one (0.38+)."""
    test = getattr(folder_paths(), "is_within_directory", paths.is_within_directory)
    return bool(test(str(folder), str(path)))


ALLOWED_FOLDERS = "ComfyUI's folders (input, output, models, user, temp) and the training jobs' folders"


def confine(
    path: Path,
    what: str,
    folders: Sequence[Path] | None = None,
    where: str = ALLOWED_FOLDERS,
    fix: str = "move it into ComfyUI's input or output folder",
) -> Path:
    """`path` with its symlinks resolved, when it lies inside one of `folders` (default: `allowed_folders()`);
    else FolderAccessError naming `what` (the input or file), `where` it may be and the `fix`."""
    if "\x00" in str(path):
        raise FolderAccessError(f"{what} contains a NUL character; give a plain path")
    folders = allowed_folders() if folders is None else folders
    if not any(is_within(path, folder) for folder in folders):
        raise FolderAccessError(
            f"{what} {str(path)!r} is outside {where}; nodes read and write only there: {fix} "
            "(a symlink counts where it points)"
        )
    return path.resolve()


def input_path(text: str, what: str) -> Path | None:
    """The file or folder a path input names (quotes and ~ taken off; None when empty), confined."""
    text = text.strip().strip('"')
    return confine(Path(text).expanduser(), what) if text else None


def output_file(text: str, what: str, suffix: str) -> Path:
    """A file a node was asked to save: a relative path is inside ComfyUI's output folder, an
    absolute one must lie there (symlinks resolved); it must end in `suffix`."""
    output = output_directory().resolve()
    path = Path(text).expanduser()
    path = confine(
        path if path.is_absolute() else output / path,
        what,
        [output],
        f"ComfyUI's output folder {output}",
        "give a path inside it (a relative path is taken from there)",
    )
    if path.suffix.lower() != suffix:
        raise FolderAccessError(f"{what} {text!r} must name a {suffix} file")
    return path


# The job registry: in ComfyUI's system user folder (user/__face_consistency, which ComfyUI 0.3.76 and
# later never serve through /userdata) where there is one, else in user/face_consistency as before.
REGISTRY_SYSTEM_USER = "face_consistency"
_registry_move_lock = threading.Lock()


def registry_file() -> Path:
    """Where this installation's job registry lives; a registry left in the old place is moved over once."""
    fp = folder_paths()
    legacy = Path(fp.get_user_directory()) / REGISTRY_SYSTEM_USER / REGISTRY_FILENAME
    system_user_directory = getattr(fp, "get_system_user_directory", None)
    if system_user_directory is None:
        return legacy
    target = Path(system_user_directory(REGISTRY_SYSTEM_USER)) / REGISTRY_FILENAME
    with _registry_move_lock:
        if legacy.exists() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            # the journal first: SQLite finds a hot journal by the database's name
            for suffix in ("-journal", ""):
                source = legacy.with_name(legacy.name + suffix)
                # no journal, or another ComfyUI on this folder moved it first
                with contextlib.suppress(FileNotFoundError):
                    os.replace(source, target.with_name(target.name + suffix))
            log.info("moved the training job registry from %s to %s (not served through /userdata)", legacy, target)
            with contextlib.suppress(OSError):
                legacy.parent.rmdir()  # only when empty
    return target


def open_registry(busy_timeout_s: float = 30.0) -> JobRegistry:
    """The job registry of this ComfyUI installation."""
    return JobRegistry(registry_file(), busy_timeout_s)


def temp_directory() -> Path:
    """ComfyUI's temp folder (node previews; emptied by ComfyUI at start)."""
    return Path(folder_paths().get_temp_directory())


def user_directory() -> Path:
    return Path(folder_paths().get_user_directory())


def filename_list(folder_name: str) -> list[str]:
    return list(folder_paths().get_filename_list(folder_name))


def folder_roots(folder_name: str) -> list[Path]:
    """Every folder ComfyUI searches for `folder_name` models (extra_model_paths included)."""
    return [Path(p) for p in folder_paths().get_folder_paths(folder_name)]


def full_path(folder_name: str, filename: str) -> Path | None:
    path = folder_paths().get_full_path(folder_name, filename)
    return Path(path) if path else None


class Progress:
    """ComfyUI's progress bar; `update` raises when the user presses Cancel."""

    def __init__(self, total: int) -> None:
        import comfy.utils

        self._bar = comfy.utils.ProgressBar(total)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)


class DownloadProgress:
    """A model pack download shown on the node: ComfyUI's progress bar, and size and speed as
    the node's progress text. Like `Progress`, it raises when the user presses Cancel."""

    TEXT_EVERY_S = 0.5

    def __init__(self, node_id: str | None) -> None:
        self._node_id = node_id
        self._bar: Any = None
        self._last_text = 0.0

    def __call__(self, transfer: Any) -> None:
        import comfy.utils

        total = transfer.total or transfer.done
        if self._bar is None:
            log.info("%s: downloading %s into %s", transfer.pack, transfer.url, transfer.target)
            self._bar = comfy.utils.ProgressBar(total)
        self._bar.update_absolute(transfer.done, total)
        now = time.monotonic()
        if now - self._last_text >= self.TEXT_EVERY_S or transfer.done >= total:
            self._last_text = now
            instance = prompt_server()
            if instance is not None and self._node_id is not None and hasattr(instance, "send_progress_text"):
                instance.send_progress_text(str(transfer), self._node_id)


# The frontend setting registered by web/face_consistency_settings.js; the frontend saves
# settings in the user's comfy.settings.json (single-user ComfyUI: user "default").
DOWNLOAD_SETTING = "FaceConsistency.ModelPacks.DownloadOnFirstUse"
SETTINGS_FILE = Path("default") / "comfy.settings.json"


def pack_downloads_enabled() -> bool:
    """The ComfyUI setting 'download model packs on first use' (on unless the user turned it off)."""
    try:
        settings = json.loads((user_directory() / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return not (isinstance(settings, dict) and settings.get(DOWNLOAD_SETTING) is False)


def prompt_server() -> Any | None:
    """The running PromptServer, or None outside ComfyUI."""
    try:
        import server
    except ImportError:
        return None
    return getattr(server.PromptServer, "instance", None)


def send_event(event: str, data: dict[str, Any]) -> None:
    """Push a websocket event `face_consistency.<event>` to the browser (no-op outside ComfyUI)."""
    instance = prompt_server()
    if instance is not None:
        instance.send_sync(f"face_consistency.{event}", data)
