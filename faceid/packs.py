"""Find and validate InsightFace model packs before anything is loaded.

A root holds `models/<pack>/*.onnx` (ComfyUI: `ComfyUI/models/insightface`, standalone:
`~/.insightface`). A pack is any folder with one face detector and one recognizer ONNX;
the files are told apart the way InsightFace's model router does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ModelPackError

if TYPE_CHECKING:
    from .pack_download import ProgressCallback

STANDARD_PACKS = ("buffalo_l", "buffalo_m", "buffalo_s", "buffalo_sc", "antelopev2")
DEFAULT_ROOT = Path("~/.insightface")
RELEASES_URL = "https://github.com/deepinsight/insightface/releases"


@dataclass(frozen=True)
class PackFiles:
    name: str
    folder: Path
    detector: Path
    recognizer: Path


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
                if child.is_dir() and child.name != "models" and not child.name.startswith(".") and _has_onnx(child):
                    names.add(child.name)
    return sorted(names)


def _has_onnx(folder: Path) -> bool:
    try:
        return any(p.suffix.lower() == ".onnx" for p in folder.iterdir()) or any(
            sub.is_dir() and any(p.suffix.lower() == ".onnx" for p in sub.iterdir()) for sub in folder.iterdir()
        )
    except PermissionError:  # listed, so that checking it names the problem instead of hiding the pack
        return True
    except OSError:
        return False


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


def root_of_pack(pack: str, roots: Sequence[Path]) -> Path | None:
    """The first search root that holds the pack named `pack` (as `find_pack_folder` searches)."""
    return next((root for root in roots if any((parent / pack).is_dir() for parent in _pack_parents(root))), None)


def classify_onnx(path: Path) -> str:
    """'detector', 'recognizer' or 'other', by the same rules as InsightFace's model router."""
    import onnx

    try:
        with open(path, "rb") as file:
            empty = os.fstat(file.fileno()).st_size == 0
            model = None if empty else onnx.load(file, load_external_data=False)
    except PermissionError:
        raise ModelPackError(
            f"cannot read ONNX model {path}: permission denied. Let this user read it "
            f"(chmod a+r '{path}') or run as its owner."
        ) from None
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError... for bad files
        raise ModelPackError(
            f"cannot read ONNX model {path}: {exc}. The file is corrupt or truncated; download the pack again."
        ) from None
    if model is None or not model.graph.node:  # protobuf reads zero bytes as an empty model
        raise ModelPackError(
            f"ONNX model {path} is empty ({'0 bytes' if model is None else 'no graph'}): the download or copy "
            "did not finish. Download the pack again."
        )
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(graph.output) >= 5:
        return "detector"
    if not inputs:
        return "other"
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        return "other"
    height, width = dims[2], dims[3]
    if (height, width) in ((192, 192), (96, 96)) or len(inputs) == 2:
        return "other"  # landmark, gender/age, swapper
    if height == width and height >= 112 and height % 16 == 0:
        return "recognizer"
    return "other"


def validate_pack(folder: Path, name: str | None = None) -> PackFiles:
    """Check a pack folder; raise ModelPackError that names the folder, the problem and the fix."""
    name = name or folder.name
    if not folder.exists():
        raise ModelPackError(f"model pack folder not found: {folder}")
    if not folder.is_dir():
        raise ModelPackError(f"model pack path is not a folder: {folder}")
    try:
        contents = sorted(folder.iterdir())
    except PermissionError:
        raise ModelPackError(
            f"model pack folder {folder}: permission denied. Let this user read it (chmod a+rx '{folder}') "
            "or run as its owner."
        ) from None
    onnx_files = [p for p in contents if p.is_file() and p.suffix.lower() == ".onnx"]
    misnamed = [p.name for p in onnx_files if p.suffix != ".onnx"]
    if misnamed:  # InsightFace loads a model only by a name ending in lowercase ".onnx"
        raise ModelPackError(
            f"model pack '{name}' in {folder}: {', '.join(misnamed)} must end in lowercase .onnx for "
            f"InsightFace to load it; rename it ({misnamed[0]} -> {Path(misnamed[0]).stem}.onnx)."
        )
    if not onnx_files:
        nested = [sub for sub in contents if sub.is_dir() and _has_onnx(sub)]
        if nested:
            raise ModelPackError(
                f"model pack '{name}' is nested: the .onnx files are in {nested[0]}, not in {folder}. "
                f"Move them up one level (into {folder}) and remove the empty inner folder — "
                "a common result of unzipping an archive into a folder of the same name."
            )
        raise ModelPackError(
            f"model pack folder {folder} is empty (no .onnx files). Put the pack's detector and "
            f"recognizer .onnx files there (for {', '.join(STANDARD_PACKS)}: unzip the release "
            f"from {RELEASES_URL})."
        )
    by_kind: dict[str, list[Path]] = {"detector": [], "recognizer": [], "other": []}
    for path in onnx_files:
        by_kind[classify_onnx(path)].append(path)
    found = ", ".join(p.name for p in onnx_files)
    if not by_kind["detector"]:
        raise ModelPackError(
            f"model pack '{name}' in {folder} has no face detector (an ONNX with >= 5 outputs, "
            f"such as det_10g.onnx or scrfd_*.onnx); found: {found}. Add the pack's detector file."
        )
    if not by_kind["recognizer"]:
        raise ModelPackError(
            f"model pack '{name}' in {folder} has no face recognizer (an ArcFace ONNX with a square "
            f"112x112 input, such as w600k_r50.onnx or glintr100.onnx); found: {found}. "
            "Add the pack's recognizer file."
        )
    for kind, label in (("detector", "face detectors"), ("recognizer", "face recognizers")):
        if len(by_kind[kind]) > 1:
            raise ModelPackError(
                f"model pack '{name}' in {folder} has {len(by_kind[kind])} {label} "
                f"({', '.join(p.name for p in by_kind[kind])}); a pack holds one of each. Move the ones "
                "you do not want into a pack folder of their own."
            )
    return PackFiles(name, folder, by_kind["detector"][0], by_kind["recognizer"][0])


def resolve_pack(
    pack: str | os.PathLike,
    roots: Sequence[Path],
    allow_download: bool = False,
    progress: ProgressCallback | None = None,
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
        from . import pack_download  # it validates packs with this module

        if not allow_download or pack_download.downloads_off_by_env():
            raise ModelPackError(
                f"model pack '{name}' is not installed (searched: {', '.join(str(r) for r in roots)}) and "
                f"downloading is off ({pack_download.OFFLINE_HOW}). "
                f"{pack_download.manual_install_hint(name, pack_download.models_dir_of(roots[0]))}."
            )
        folder = pack_download.download_pack(name, pack_download.download_dir(roots), progress)
    return validate_pack(folder, folder.name)
