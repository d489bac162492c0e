"""What a model pack folder must hold, and the check of it: one face detector and one recognizer ONNX,
told apart the way InsightFace's model router does. Both finding a pack (`packs.py`) and
downloading one (`pack_download.py`) check with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelPackError

STANDARD_PACKS = ("buffalo_l", "buffalo_m", "buffalo_s", "buffalo_sc", "antelopev2")
RELEASES_URL = "https://github.com/deepinsight/insightface/releases"


@dataclass(frozen=True)
class PackFiles:
    name: str
    folder: Path
    detector: Path
    recognizer: Path


def has_onnx(folder: Path) -> bool:
    try:
        return any(p.suffix.lower() == ".onnx" for p in folder.iterdir()) or any(
            sub.is_dir() and any(p.suffix.lower() == ".onnx" for p in sub.iterdir()) for sub in folder.iterdir()
        )
    except PermissionError:  # listed, so that checking it names the problem instead of hiding the pack
        return True
    except OSError:
        return False


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
        nested = [sub for sub in contents if sub.is_dir() and has_onnx(sub)]
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
