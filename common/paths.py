"""Whether a path lies inside a folder, every symlink resolved: the pack's one confinement test.

Used by the run reader (a run's files stay inside its folder) and, through `nodes/comfy_env.py`,
by every node input and route that names a file or folder. ComfyUI 0.38 and later offer the same
test as `folder_paths.is_within_directory`; `comfy_env` uses theirs where it exists.
"""

from __future__ import annotations

import os


def is_within_directory(directory: str | os.PathLike, target: str | os.PathLike) -> bool:
    """Whether `target`, symlinks resolved, is `directory` (symlinks resolved) or lies inside it.

    A path that does not exist yet is resolved as far as it exists. Paths on different Windows
    drives are not inside each other.
    """
    folder = os.path.normcase(os.path.realpath(directory))
    path = os.path.normcase(os.path.realpath(target))
    try:
        return os.path.commonpath([folder, path]) == folder
    except ValueError:
        return False
