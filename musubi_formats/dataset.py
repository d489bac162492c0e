"""musubi-tuner's dataset TOML for Qwen-Image-Edit: targets, controls, captions, aspect buckets.

```toml
[general]
resolution = [1024, 1024]      # or a single int
caption_extension = ".txt"
batch_size = 1
num_repeats = 1
enable_bucket = true
bucket_no_upscale = false

[[datasets]]
image_directory = "/data/targets"      # or image_jsonl_file = "/data/pairs.jsonl"
control_directory = "/data/controls"
cache_directory = "/data/cache"        # default: the image directory
control_resolution = [1024, 1024]      # default: the target's bucket
no_resize_control = false
```

Pairing (musubi): a control belongs to target `stem` when its name is `stem.<ext>` or
`stem_<N>.<ext>`; numeric N orders several controls. Only images with a caption file train
(others are skipped with a warning); a target without a control is an error. JSONL lines hold
`image_path`, `caption` and `control_path` or `control_path_0`, `control_path_1`, ...
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit
from PIL import Image, UnidentifiedImageError

from ..common.files import IMAGE_SUFFIXES, atomic_write_text, tomllib
from .names import musubi_controls

log = logging.getLogger(__name__)

# Qwen-Image latents are 8x smaller than pixels and packed in 2x2 patches: sizes are multiples of 16.
RESOLUTION_STEP = 16
# 4096 px a side is 4x the model's 1 MP training size; its images alone take ~200 MB each in fp32
# while caching, and attention over its 65,536 tokens would not fit any one GPU.
MAX_RESOLUTION_SIDE = 4096
BOOLEAN_KEYS = ("enable_bucket", "bucket_no_upscale", "no_resize_control", "multiple_target")
PATH_KEYS = ("image_directory", "image_jsonl_file", "cache_directory", "control_directory")

GENERAL_KEYS = {"resolution", "caption_extension", "batch_size", "num_repeats", "enable_bucket", "bucket_no_upscale"}
DATASET_KEYS = GENERAL_KEYS | {
    "image_directory",
    "image_jsonl_file",
    "cache_directory",
    "control_directory",
    "control_resolution",
    "no_resize_control",
    "multiple_target",
}
GENERAL_DEFAULTS: dict[str, Any] = {
    "resolution": (960, 544),
    "caption_extension": ".txt",
    "batch_size": 1,
    "num_repeats": 1,
    "enable_bucket": False,
    "bucket_no_upscale": False,
}


class DatasetConfigError(ValueError):
    """A dataset TOML, folder or image that cannot be trained on, with the reason."""


@dataclass(frozen=True)
class DatasetItem:
    """One training pair: target image, its control images (ordered) and caption."""

    target: Path
    controls: tuple[Path, ...]
    caption: str
    target_size: tuple[int, int]  # (width, height) of the image file
    bucket: tuple[int, int]  # (width, height) the target is trained at
    control_buckets: tuple[tuple[int, int], ...]
    cache_directory: Path

    @property
    def key(self) -> str:
        """Cache file stem: unique within a cache directory (musubi uses the image stem)."""
        return self.target.stem


@dataclass
class DatasetSpec:
    items: list[DatasetItem]
    batch_size: int
    num_repeats: int
    source: str


@dataclass
class DatasetGroup:
    """All `[[datasets]]` of one TOML file."""

    datasets: list[DatasetSpec] = field(default_factory=list)

    @property
    def items(self) -> list[DatasetItem]:
        return [item for spec in self.datasets for item in spec.items]


def _resolution(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        width = height = value
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        width, height = value
    else:
        raise DatasetConfigError(f"{where}: resolution must be an int or [width, height], got {value!r}")
    if width < RESOLUTION_STEP or height < RESOLUTION_STEP:
        raise DatasetConfigError(f"{where}: resolution {value!r} is smaller than {RESOLUTION_STEP} pixels")
    if max(width, height) > MAX_RESOLUTION_SIDE:
        raise DatasetConfigError(f"{where}: resolution {value!r} is over {MAX_RESOLUTION_SIDE} pixels a side, more than "
                                 "memory allows; Qwen-Image-Edit trains at about [1024, 1024]")
    return width, height


def bucket_for(
    image_size: tuple[int, int], resolution: tuple[int, int], *, enable_bucket: bool, no_upscale: bool
) -> tuple[int, int]:
    """The (width, height) an image trains at: multiples of 16, area ~ resolution's area.

    Without buckets every image trains at the resolution itself (multiples of 16). With buckets
    the image's aspect ratio is kept at the resolution's area; `no_upscale` caps the area at the
    image's own area.
    """
    res_w, res_h = resolution
    if not enable_bucket:
        return (res_w // RESOLUTION_STEP * RESOLUTION_STEP, res_h // RESOLUTION_STEP * RESOLUTION_STEP)
    width, height = image_size
    area = res_w * res_h
    if no_upscale:
        area = min(area, width * height)
    aspect = width / height
    bucket_w = math.sqrt(area * aspect)
    bucket_h = bucket_w / aspect
    step = RESOLUTION_STEP
    bucket_w = max(step, int(bucket_w // step) * step)
    bucket_h = max(step, int(bucket_h // step) * step)
    return bucket_w, bucket_h


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            size = image.size  # from the header; verify() then checks the file and spends the image
            image.verify()
            return size
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetConfigError(f"cannot read image {path}: {exc}") from exc


def pair_controls(targets: list[Path], control_directory: Path) -> dict[Path, tuple[Path, ...]]:
    """Controls of each target by musubi's rule: `stem.<ext>` first, then `stem_<N>.<ext>` by N."""
    controls = [p for p in control_directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    return {target: tuple(found) for target, found in musubi_controls(targets, controls).items()}


def _read_caption(target: Path, caption_extension: str) -> str | None:
    caption_path = target.with_suffix(caption_extension)
    if not caption_path.is_file():
        return None
    try:
        return caption_path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as exc:
        raise DatasetConfigError(f"caption {caption_path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                 "save it as UTF-8") from None


def _directory_entries(cfg: dict[str, Any], where: str) -> list[tuple[Path, tuple[Path, ...], str]]:
    image_directory = Path(cfg["image_directory"])
    if not image_directory.is_dir():
        raise DatasetConfigError(f"{where}: image_directory {image_directory} does not exist")
    targets = sorted(p for p in image_directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if "control_directory" not in cfg:
        raise DatasetConfigError(
            f"{where}: control_directory is required for Qwen-Image-Edit training (each target needs a control image)"
        )
    control_directory = Path(cfg["control_directory"])
    if not control_directory.is_dir():
        raise DatasetConfigError(f"{where}: control_directory {control_directory} does not exist")
    if control_directory.resolve() == image_directory.resolve():
        raise DatasetConfigError(f"{where}: control_directory must differ from image_directory (same name pairs a target with itself)")
    controls = pair_controls(targets, control_directory)
    entries = []
    for target in targets:
        caption = _read_caption(target, cfg["caption_extension"])
        if caption is None:
            log.warning("skipping %s: no caption file %s", target, target.with_suffix(cfg["caption_extension"]))
            continue
        if not controls[target]:
            raise DatasetConfigError(
                f"{where}: target {target} has no control image in {control_directory} "
                f"(expected {target.stem}.<ext> or {target.stem}_<N>.<ext>)"
            )
        entries.append((target, controls[target], caption))
    return entries


def _jsonl_entries(cfg: dict[str, Any], where: str) -> list[tuple[Path, tuple[Path, ...], str]]:
    jsonl = Path(cfg["image_jsonl_file"])
    if not jsonl.is_file():
        raise DatasetConfigError(f"{where}: image_jsonl_file {jsonl} does not exist")
    entries = []
    for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetConfigError(f"{jsonl} line {number}: not JSON ({exc})") from exc
        if "image_path" not in record:
            raise DatasetConfigError(f"{jsonl} line {number}: no image_path")
        target = Path(record["image_path"])
        caption = record.get("caption")
        if not caption:
            log.warning("skipping %s (%s line %d): no caption", target, jsonl, number)
            continue
        indexed = sorted(
            (int(k.rsplit("_", 1)[1]), v) for k, v in record.items() if re.fullmatch(r"control_path_\d+", k)
        )
        controls = ([record["control_path"]] if "control_path" in record else []) + [v for _, v in indexed]
        if not controls:
            raise DatasetConfigError(f"{jsonl} line {number}: target {target} has no control_path")
        entries.append((target, tuple(Path(c) for c in controls), str(caption)))
    return entries


def _check_types(cfg: dict[str, Any], where: str) -> None:
    for key in BOOLEAN_KEYS:
        if key in cfg and not isinstance(cfg[key], bool):
            raise DatasetConfigError(f"{where}: {key} must be true or false, got {cfg[key]!r}")
    for key in PATH_KEYS:
        if key in cfg and not isinstance(cfg[key], str):
            raise DatasetConfigError(f"{where}: {key} must be a path in quotes, got {cfg[key]!r}")


def _dataset(cfg: dict[str, Any], where: str) -> DatasetSpec:
    if cfg.get("multiple_target"):
        raise DatasetConfigError(f"{where}: multiple_target (layered targets) is not supported for Qwen-Image-Edit")
    has_dir, has_jsonl = "image_directory" in cfg, "image_jsonl_file" in cfg
    if has_dir == has_jsonl:
        raise DatasetConfigError(f"{where}: give exactly one of image_directory or image_jsonl_file")
    resolution = _resolution(cfg["resolution"], where)
    control_resolution = (
        _resolution(cfg["control_resolution"], where + " control_resolution") if "control_resolution" in cfg else None
    )
    if not isinstance(cfg["caption_extension"], str) or not cfg["caption_extension"].startswith("."):
        raise DatasetConfigError(f"{where}: caption_extension must start with a dot, e.g. \".txt\", got {cfg['caption_extension']!r}")
    for key in ("batch_size", "num_repeats"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise DatasetConfigError(f"{where}: {key} must be a positive integer, got {cfg[key]!r}")
    entries = _directory_entries(cfg, where) if has_dir else _jsonl_entries(cfg, where)
    if not entries:
        raise DatasetConfigError(f"{where}: no trainable images (images need a caption file and a control)")
    cache_directory = Path(cfg.get("cache_directory") or cfg.get("image_directory") or Path(cfg["image_jsonl_file"]).parent)
    items = []
    for target, controls, caption in entries:
        size = _image_size(target)
        bucket = bucket_for(size, resolution, enable_bucket=cfg["enable_bucket"], no_upscale=cfg["bucket_no_upscale"])
        control_buckets = []
        for control in controls:
            control_size = _image_size(control)
            if cfg.get("no_resize_control"):
                control_buckets.append(bucket_for(control_size, control_size, enable_bucket=False, no_upscale=False))
            elif control_resolution is not None:
                control_buckets.append(
                    bucket_for(control_size, control_resolution, enable_bucket=True, no_upscale=cfg["bucket_no_upscale"])
                )
            else:
                control_buckets.append(bucket)
        items.append(DatasetItem(target, controls, caption, size, bucket, tuple(control_buckets), cache_directory))
    keys = [item.key for item in items]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise DatasetConfigError(f"{where}: several targets share the stem(s) {duplicates}; cache files would collide")
    return DatasetSpec(items, cfg["batch_size"], cfg["num_repeats"], where)


def load_dataset_config(path: str | Path) -> DatasetGroup:
    """Parse and validate a musubi dataset TOML; every problem names the file and the key or image."""
    toml_path = Path(path)
    if not toml_path.is_file():
        raise DatasetConfigError(f"dataset config not found: {toml_path}")
    try:
        config = tomllib.loads(toml_path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise DatasetConfigError(f"dataset config {toml_path} is not valid TOML: {exc}") from exc
    unknown_sections = set(config) - {"general", "datasets"}
    if unknown_sections:
        raise DatasetConfigError(f"{toml_path}: unknown section(s) {sorted(unknown_sections)}")
    general = config.get("general", {})
    datasets = config.get("datasets")
    if not isinstance(general, dict) or not isinstance(datasets, (list, type(None))) or not all(
        isinstance(entry, dict) for entry in datasets or []
    ):
        raise DatasetConfigError(f"{toml_path}: expected a [general] table and [[datasets]] tables (docs/training.md: "
                                 "Dataset TOML (musubi format))")
    unknown = set(general) - GENERAL_KEYS
    if unknown:
        raise DatasetConfigError(f"{toml_path} [general]: unknown key(s) {sorted(unknown)}")
    _check_types(general, f"{toml_path} [general]")
    if not datasets:
        raise DatasetConfigError(f"{toml_path}: no [[datasets]] entries")
    group = DatasetGroup()
    for index, entry in enumerate(datasets):
        where = f"{toml_path} [[datasets]] #{index + 1}"
        unknown = set(entry) - DATASET_KEYS
        if unknown:
            raise DatasetConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
        cfg = {**GENERAL_DEFAULTS, **general, **entry}
        _check_types(cfg, where)
        for key in PATH_KEYS:
            # musubi resolves relative paths against the working directory; fall back to the TOML's folder.
            if key in cfg and not Path(cfg[key]).is_absolute() and not Path(cfg[key]).exists():
                cfg[key] = str((toml_path.parent / cfg[key]).resolve())
        group.datasets.append(_dataset(cfg, where))
    return group


def write_dataset_config(path: str | Path, general: dict[str, Any], datasets: list[dict[str, Any]]) -> Path:
    """Write a musubi dataset TOML (`[general]` and `[[datasets]]`, atomically) that
    `load_dataset_config` reads back; paths are given as strings."""
    target = Path(path)
    atomic_write_text(target, tomlkit.dumps({"general": general, "datasets": datasets}))
    return target


def dataset_config_for(dataset: str, output_dir: Path, resolution: int) -> Path:
    """The dataset TOML for `dataset`: the .toml given, the folder's own `dataset.toml`, or one written
    into `output_dir` for the folder (square `resolution`, buckets on, cache in `output_dir/cache`).

    A folder without a TOML holds targets + captions in `images/` (or the folder itself) and the
    control images in `controls/` (or `control/`), paired by name the musubi way.
    """
    path = Path(dataset.strip().strip('"')).expanduser()
    if path.is_file() and path.suffix.lower() == ".toml":
        return path.resolve()
    if not path.is_dir():
        raise ValueError(f"dataset {dataset!r} is neither a dataset .toml file nor a folder")
    if (path / "dataset.toml").is_file():
        return (path / "dataset.toml").resolve()
    images = path / "images" if (path / "images").is_dir() else path
    controls = next((path / name for name in ("controls", "control") if (path / name).is_dir()), None)
    if controls is None:
        raise ValueError(
            f"dataset folder {path} has no controls/ folder: put the edit's input images there "
            "(same names as the targets), or give a musubi dataset .toml"
        )
    general = {"resolution": [resolution, resolution], "caption_extension": ".txt", "batch_size": 1,
               "enable_bucket": True, "bucket_no_upscale": False}
    return write_dataset_config(output_dir / "dataset.toml", general, [{
        "image_directory": str(images.resolve()), "control_directory": str(controls.resolve()),
        "cache_directory": str(output_dir / "cache"), "num_repeats": 1,
    }])
