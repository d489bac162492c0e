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
validation = false                     # ours, not musubi's: true holds the entry out for the validation loss
```

Pairing (musubi): a control belongs to target `stem` when its name is `stem.<ext>` or
`stem_<N>.<ext>`; numeric N orders several controls. Only images with a caption file train
(others are skipped with a warning); a target without a control is an error. JSONL lines hold
`image_path`, `caption` and `control_path` or `control_path_0`, `control_path_1`, ...

Held-out items (never trained on, scored by the validation loss) are a `[[datasets]]` entry with
`validation = true` (a key musubi-tuner does not know: such a TOML is this trainer's), a separate
TOML, or a fraction of the training items split off by a fixed seed (`split_validation`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeAlias

import tomlkit
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from ..common.files import IMAGE_SUFFIXES, TextFileError, atomic_write_text, read_text_file, tomllib
from .names import musubi_controls

log = logging.getLogger(__name__)

# Qwen-Image latents are 8x smaller than pixels and packed in 2x2 patches: sizes are multiples of 16.
RESOLUTION_STEP = 16
# 4096 px a side is 4x the model's 1 MP training size; its images alone take ~200 MB each in fp32
# while caching, and attention over its 65,536 tokens would not fit any one GPU.
MAX_RESOLUTION_SIDE = 4096
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


# Called with (what, path) on every file and folder the dataset names, before it is opened or
# listed; raises to refuse it (ComfyUI's launch node keeps datasets inside ComfyUI's folders).
PathCheck = Callable[[str, Path], None]


def _any_path(what: str, path: Path) -> None:
    """The command line's PathCheck: any path."""


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
    validation: list[DatasetSpec] = field(default_factory=list)  # held out: never trained on

    @property
    def items(self) -> list[DatasetItem]:
        """The training items."""
        return [item for spec in self.datasets for item in spec.items]

    @property
    def validation_items(self) -> list[DatasetItem]:
        return [item for spec in self.validation for item in spec.items]


# 1024 or [1024, 768]
_Resolution: TypeAlias = StrictInt | Annotated[list[StrictInt], Field(min_length=2, max_length=2)]
_PositiveInt: TypeAlias = Annotated[StrictInt, Field(ge=1)]


class _GeneralSection(BaseModel):
    """`[general]`: the settings every `[[datasets]]` entry inherits."""

    model_config = ConfigDict(extra="forbid")

    resolution: _Resolution | None = None
    caption_extension: Annotated[StrictStr, Field(pattern=r"^\.")] | None = None
    batch_size: _PositiveInt | None = None
    num_repeats: _PositiveInt | None = None
    enable_bucket: StrictBool | None = None
    bucket_no_upscale: StrictBool | None = None


class _DatasetSection(_GeneralSection):
    """One `[[datasets]]` entry."""

    image_directory: StrictStr | None = None
    image_jsonl_file: StrictStr | None = None
    cache_directory: StrictStr | None = None
    control_directory: StrictStr | None = None
    control_resolution: _Resolution | None = None
    no_resize_control: StrictBool | None = None
    multiple_target: StrictBool | None = None
    validation: StrictBool | None = None


class _DatasetFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    general: _GeneralSection = _GeneralSection()
    datasets: list[_DatasetSection] | None = None


PATH_KEYS = ("image_directory", "image_jsonl_file", "cache_directory", "control_directory")
# What each key must be, in the words of the error a user reads.
_EXPECTED = {
    **{
        key: "must be true or false"
        for key in ("enable_bucket", "bucket_no_upscale", "no_resize_control", "multiple_target", "validation")
    },
    **{key: "must be a path in quotes" for key in PATH_KEYS},
    "batch_size": "must be a positive integer",
    "num_repeats": "must be a positive integer",
    "resolution": "must be an int or [width, height]",
    "control_resolution": "must be an int or [width, height]",
    "caption_extension": 'must start with a dot, e.g. ".txt"',
}
_TABLES_EXPECTED = "expected a [general] table and [[datasets]] tables (docs/training.md: Dataset TOML (musubi format))"


def _schema_error(exc: ValidationError, config: dict[str, Any], toml_path: Path) -> DatasetConfigError:
    """The first problem the schema found, as a sentence that names the file, the table and the key."""
    error = exc.errors()[0]
    loc = error["loc"]
    schema: type[BaseModel]
    if loc[0] == "datasets" and len(loc) > 1 and isinstance(loc[1], int):
        where, section, schema, key_at = (
            f"{toml_path} [[datasets]] #{loc[1] + 1}",
            config["datasets"][loc[1]],
            _DatasetSection,
            2,
        )
    elif loc[0] == "general":
        where, section, schema, key_at = f"{toml_path} [general]", config["general"], _GeneralSection, 1
    else:
        where, section, schema, key_at = str(toml_path), config, _DatasetFile, 0
    if len(loc) <= key_at or not isinstance(section, dict) or (key_at == 0 and error["type"] != "extra_forbidden"):
        return DatasetConfigError(f"{toml_path}: {_TABLES_EXPECTED}")
    if error["type"] == "extra_forbidden":
        unknown = sorted(key for key in section if key not in schema.model_fields)
        return DatasetConfigError(f"{where}: unknown {'section(s)' if key_at == 0 else 'key(s)'} {unknown}")
    key = str(loc[key_at])
    return DatasetConfigError(f"{where}: {key} {_EXPECTED.get(key, 'is not valid')}, got {section[key]!r}")


def _resolution(value: int | list[int], where: str) -> tuple[int, int]:
    """(width, height) of a resolution the schema has typed (an int or two), within the trainable bounds."""
    width, height = (value, value) if isinstance(value, int) else value
    if width < RESOLUTION_STEP or height < RESOLUTION_STEP:
        raise DatasetConfigError(f"{where}: resolution {value!r} is smaller than {RESOLUTION_STEP} pixels")
    if max(width, height) > MAX_RESOLUTION_SIDE:
        raise DatasetConfigError(
            f"{where}: resolution {value!r} is over {MAX_RESOLUTION_SIDE} pixels a side, more than "
            "memory allows; Qwen-Image-Edit trains at about [1024, 1024]"
        )
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


def _read_caption(target: Path, caption_extension: str, check_path: PathCheck) -> str | None:
    caption_path = target.with_suffix(caption_extension)
    if not caption_path.is_file():
        return None
    check_path("caption", caption_path)
    try:
        return read_text_file(caption_path, "caption").strip()
    except TextFileError as exc:
        raise DatasetConfigError(str(exc)) from None


def _directory_entries(
    cfg: dict[str, Any], where: str, check_path: PathCheck
) -> list[tuple[Path, tuple[Path, ...], str]]:
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
        raise DatasetConfigError(
            f"{where}: control_directory must differ from image_directory (same name pairs a target with itself)"
        )
    controls = pair_controls(targets, control_directory)
    entries = []
    for target in targets:
        caption = _read_caption(target, cfg["caption_extension"], check_path)
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


def _jsonl_entries(cfg: dict[str, Any], where: str, working_dir: Path) -> list[tuple[Path, tuple[Path, ...], str]]:
    jsonl = Path(cfg["image_jsonl_file"])
    if not jsonl.is_file():
        raise DatasetConfigError(f"{where}: image_jsonl_file {jsonl} does not exist")
    entries = []
    try:
        lines = read_text_file(jsonl, "image_jsonl_file").splitlines()
    except TextFileError as exc:
        raise DatasetConfigError(str(exc)) from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetConfigError(f"{jsonl} line {number}: not JSON ({exc})") from exc
        if "image_path" not in record:
            raise DatasetConfigError(f"{jsonl} line {number}: no image_path")
        target = working_dir / record["image_path"]  # musubi opens relative paths from its working directory
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
        entries.append((target, tuple(working_dir / c for c in controls), str(caption)))
    return entries


def _dataset(cfg: dict[str, Any], where: str, working_dir: Path, check_path: PathCheck) -> DatasetSpec:
    if cfg.get("multiple_target"):
        raise DatasetConfigError(f"{where}: multiple_target (layered targets) is not supported for Qwen-Image-Edit")
    has_dir, has_jsonl = "image_directory" in cfg, "image_jsonl_file" in cfg
    if has_dir == has_jsonl:
        raise DatasetConfigError(f"{where}: give exactly one of image_directory or image_jsonl_file")
    resolution = _resolution(cfg["resolution"], where)
    control_resolution = (
        _resolution(cfg["control_resolution"], where + " control_resolution") if "control_resolution" in cfg else None
    )
    cache_directory = Path(
        cfg.get("cache_directory") or cfg.get("image_directory") or Path(cfg["image_jsonl_file"]).parent
    )
    for key in PATH_KEYS:
        if key in cfg:
            check_path(f"{where} {key}", Path(cfg[key]))
    check_path(f"{where} cache_directory", cache_directory)
    entries = _directory_entries(cfg, where, check_path) if has_dir else _jsonl_entries(cfg, where, working_dir)
    if not entries:
        raise DatasetConfigError(f"{where}: no trainable images (images need a caption file and a control)")
    for target, controls, _ in entries:
        check_path("image", target)
        for control in controls:
            check_path("control image", control)
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
                    bucket_for(
                        control_size, control_resolution, enable_bucket=True, no_upscale=cfg["bucket_no_upscale"]
                    )
                )
            else:
                control_buckets.append(bucket)
        items.append(DatasetItem(target, controls, caption, size, bucket, tuple(control_buckets), cache_directory))
    keys = [item.key for item in items]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise DatasetConfigError(f"{where}: several targets share the stem(s) {duplicates}; cache files would collide")
    return DatasetSpec(items, cfg["batch_size"], cfg["num_repeats"], where)


def load_dataset_config(
    path: str | Path, *, working_dir: str | Path | None = None, check_path: PathCheck = _any_path
) -> DatasetGroup:
    """Parse and validate a musubi dataset TOML; every problem names the file and the key or image.

    Relative paths are taken from `working_dir` (musubi's: the trainer's working directory; default
    the current one), else from the TOML's folder. `check_path` sees every file and folder the dataset
    names before it is opened or listed.
    """
    toml_path = Path(path)
    if not toml_path.is_file():
        raise DatasetConfigError(f"dataset config not found: {toml_path}")
    try:
        config = tomllib.loads(read_text_file(toml_path, "dataset config"))
    except TextFileError as exc:
        raise DatasetConfigError(str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise DatasetConfigError(f"dataset config {toml_path} is not valid TOML: {exc}") from exc
    try:
        parsed = _DatasetFile.model_validate(config)
    except ValidationError as exc:
        raise _schema_error(exc, config, toml_path) from None
    general = parsed.general.model_dump(exclude_none=True)
    datasets = [entry.model_dump(exclude_none=True) for entry in parsed.datasets or []]
    if not datasets:
        raise DatasetConfigError(f"{toml_path}: no [[datasets]] entries")
    group = DatasetGroup()
    base = Path(working_dir) if working_dir is not None else Path(os.getcwd())
    for index, entry in enumerate(datasets):
        where = f"{toml_path} [[datasets]] #{index + 1}"
        cfg = {**GENERAL_DEFAULTS, **general, **entry}
        for key in PATH_KEYS:
            # musubi resolves relative paths against the working directory; fall back to the TOML's folder.
            if key in cfg and not Path(cfg[key]).is_absolute():
                from_working_dir = base / cfg[key]
                cfg[key] = str(
                    from_working_dir if from_working_dir.exists() else (toml_path.parent / cfg[key]).resolve()
                )
        spec = _dataset(cfg, where, base, check_path)
        (group.validation if cfg.get("validation") else group.datasets).append(spec)
    if not group.datasets:
        raise DatasetConfigError(
            f"{toml_path}: every [[datasets]] entry has validation = true; nothing is left to train on"
        )
    check_held_out(group)
    return group


def check_held_out(group: DatasetGroup) -> None:
    """Refuse a held-out item that is also a training target (the same file, symlinks resolved)."""
    trained = {item.target.resolve(): item for item in group.items}
    for item in group.validation_items:
        if item.target.resolve() in trained:
            raise DatasetConfigError(
                f"validation item {item.target} is also a training target: a held-out item must "
                "never be trained on; remove it from one of the two"
            )


def split_validation(group: DatasetGroup, fraction: float, seed: int) -> DatasetGroup:
    """A copy of `group` with `fraction` of each training entry's items (at least one, at most all but
    one) moved to a held-out entry; which ones depends only on `seed` and the item names."""
    held: list[DatasetSpec] = []
    kept: list[DatasetSpec] = []
    for spec in group.datasets:
        if len(spec.items) < 2:
            raise DatasetConfigError(
                f"{spec.source}: {len(spec.items)} item(s): too few to hold one out for "
                "validation; give validation items instead (a validation dataset)"
            )
        count = min(len(spec.items) - 1, max(1, round(fraction * len(spec.items))))
        order = sorted(spec.items, key=lambda item: item.key)
        random.Random(seed).shuffle(order)
        out = {item.key for item in order[:count]}
        kept.append(
            DatasetSpec([i for i in spec.items if i.key not in out], spec.batch_size, spec.num_repeats, spec.source)
        )
        held.append(DatasetSpec([i for i in spec.items if i.key in out], 1, 1, f"{spec.source} (held out)"))
    return DatasetGroup(kept, group.validation + held)


def write_dataset_config(path: str | Path, general: dict[str, Any], datasets: list[dict[str, Any]]) -> Path:
    """Write a musubi dataset TOML (`[general]` and `[[datasets]]`, atomically) that
    `load_dataset_config` reads back; paths are given as strings."""
    target = Path(path)
    atomic_write_text(target, tomlkit.dumps({"general": general, "datasets": datasets}))
    return target


def dataset_config_for(dataset: str, output_dir: Path, resolution: int, name: str = "dataset") -> Path:
    """The dataset TOML for `dataset`: the .toml given, the folder's own `dataset.toml`, or one written
    into `output_dir` for the folder (`{name}.toml`; square `resolution`, buckets on, cache in
    `output_dir/cache`, or `output_dir/{name}_cache` for another `name`, so that held-out items named
    like training items keep their own cache files).

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
    general = {
        "resolution": [resolution, resolution],
        "caption_extension": ".txt",
        "batch_size": 1,
        "enable_bucket": True,
        "bucket_no_upscale": False,
    }
    return write_dataset_config(
        output_dir / f"{name}.toml",
        general,
        [
            {
                "image_directory": str(images.resolve()),
                "control_directory": str(controls.resolve()),
                "cache_directory": str(output_dir / ("cache" if name == "dataset" else f"{name}_cache")),
                "num_repeats": 1,
            }
        ],
    )
