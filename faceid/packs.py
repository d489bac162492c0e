"""Find InsightFace model packs before anything is loaded, downloading a missing standard one.

A root holds `models/<pack>/*.onnx` (ComfyUI: `ComfyUI/models/insightface`, standalone:
`~/.insightface`). A pack is any folder with one face detector and one recognizer ONNX
(`pack_files.py` checks it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from . import pack_download
from .errors import ModelPackError
from .pack_files import STANDARD_PACKS, PackFiles, has_onnx, validate_pack

DEFAULT_ROOT = Path("~/.insightface")


def as_roots(models_root: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    """Search roots in order: the given ones, then ~/.insightface."""
    if models_root is None:
        given: list[Path] = []
    elif isinstance(models_root, (str, os.PathLike)):
        given = [Path(models_root)]
    else:
        given = [Path(r) for r in models_root]
    roots = [r.expanduser() for r in given] + [DEFAULT_ROOT.expanduser()]
    unique: list[Path] = []
    for root in roots:
        if root not in unique:
            unique.append(root)
    return unique


def _pack_parents(root: Path) -> list[Path]:
    # A root may be given as the InsightFace root (holding models/) or as models/ itself.
    return [root / "models", root]


def list_packs(roots: Iterable[Path]) -> list[str]:
    """Names of folders holding ONNX files (validated only when loaded), sorted."""
    names: set[str] = set()
    for root in roots:
        for parent in _pack_parents(root):
            if not parent.is_dir():
                continue
            for child in parent.iterdir():
                # hidden folders: a download being extracted (see pack_download)
                if child.is_dir() and child.name != "models" and not child.name.startswith(".") and has_onnx(child):
                    names.add(child.name)
    return sorted(names)


def find_pack_folder(pack: str | os.PathLike, roots: Sequence[Path]) -> Path | None:
    """The folder of `pack` (a name under the roots, or a path to the folder itself)."""
    if not str(pack).strip():
        raise ModelPackError(
            f"the model pack name is empty: name a pack ({', '.join(STANDARD_PACKS)}, or a folder under "
            "models/) or give the path of a pack folder"
        )
    as_path = Path(pack).expanduser()
    if as_path.is_dir() and (as_path.is_absolute() or os.sep in str(pack) or "/" in str(pack)):
        return as_path
    for root in roots:
        for parent in _pack_parents(root):
            candidate = parent / str(pack)
            if candidate.is_dir():
                return candidate
    return None


def resolve_pack(
    pack: str | os.PathLike,
    roots: Sequence[Path],
    allow_download: bool = False,
    progress: pack_download.ProgressCallback | None = None,
) -> PackFiles:
    """Locate and validate a pack; a missing standard pack is downloaded into the first writable
    root when allowed and not turned off by FACE_CONSISTENCY_OFFLINE (`progress`: see pack_download)."""
    folder = find_pack_folder(pack, roots)
    if folder is None:
        name = str(pack)
        if name not in STANDARD_PACKS:
            searched = ", ".join(str(p) for r in roots for p in _pack_parents(r)[:1])
            raise ModelPackError(
                f"model pack '{name}' not found in: {searched}. Put a folder '{name}' with a detector and "
                "a recognizer .onnx under one of them."
            )
        if not allow_download or pack_download.downloads_off_by_env():
            raise ModelPackError(
                f"model pack '{name}' is not installed (searched: {', '.join(str(r) for r in roots)}) and "
                f"downloading is off ({pack_download.OFFLINE_HOW}). "
                f"{pack_download.manual_install_hint(name, pack_download.models_dir_of(roots[0]))}."
            )
        folder = pack_download.download_pack(name, pack_download.download_dir(roots), progress)
    return validate_pack(folder, folder.name)
