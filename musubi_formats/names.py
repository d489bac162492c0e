"""How musubi-tuner names what it writes, and what the names say.

- samples in `{output_dir}/sample/`: `{output_name}_{step:06d}_{prompt:02d}_{YYYYmmddHHMMSS}[_{seed}]_{n:03d}.png`
  (`e{epoch:06d}` in place of the step when an epoch end triggered them; `output_name_` is
  absent when no output name was set); the seed guide's layout names them `..._step_{N}_{i}.png`
  beside `control_image_{i}.png`;
- dataset controls: target `stem.*` has the controls `stem.<ext>`, then `stem_<N>.<ext>` in order of N;
- LoRA checkpoints: `{name}-step{step:08d}.safetensors`, `{name}-{epoch:06d}.safetensors` and the
  final `{name}.safetensors`; the checkpoint picked as best is copied to `{name}-best.safetensors`.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..common.paths import is_within_directory

SAMPLE_DIR = "sample"
BEST_SUFFIX = "-best"
# A run's name becomes file names: `.{name}-step00000000.safetensors.<random>.tmp` stays within the
# 255 bytes file systems allow a name.
MAX_OUTPUT_NAME_BYTES = 160
_NOT_IN_NAMES = '/\\:*?"<>|'
_NUMBERED_CONTROL = re.compile(r"^(?P<stem>.+)_(?P<index>\d+)$")
MUSUBI_SAMPLE = re.compile(
    r"^(?:(?P<name>.*)_)?(?:e(?P<epoch>\d{6,})|(?P<step>\d{6,}))_(?P<prompt>\d{2,})_(?P<time>\d{14})"
    r"(?:_(?P<tail1>\d+))?(?:_(?P<tail2>\d+))?$"
)
SEED_SAMPLE = re.compile(r"^(?P<name>.*?)_?step_?(?P<step>\d+)_(?P<index>\d+)$", re.IGNORECASE)
SEED_CONTROL = re.compile(r"^control_image_(?P<index>\d+)$", re.IGNORECASE)
UNSTEPPED_KEY = "none"


def output_name_problem(name: str) -> str | None:
    """Why `name` cannot name a run's files (a name, never a path), or None when it can."""
    if not name:
        return "is empty"
    if any(ord(c) < 32 for c in name):
        return "contains a NUL or control character"
    if any(c in _NOT_IN_NAMES for c in name):
        return (
            f"contains a path separator or a character file names cannot hold ({' '.join(_NOT_IN_NAMES)}): "
            "it names the run's files, not a folder"
        )
    if name.startswith(".") or ".." in name:
        return "starts with a dot or contains '..': it names the run's files, not a folder"
    if len(name.encode("utf-8")) > MAX_OUTPUT_NAME_BYTES:
        return f"is longer than {MAX_OUTPUT_NAME_BYTES} bytes: its checkpoint file names would be too long"
    return None


@dataclass(frozen=True)
class SampleName:
    """What a sample's file name says about it."""

    step: int | None = None
    epoch: int | None = None
    prompt_index: int | None = None
    seed: int | None = None
    timestamp: str | None = None  # musubi's YYYYmmddHHMMSS
    layout: str = "unknown"  # "musubi", "seed_guide", "dir_pair", "unknown"

    @property
    def step_key(self) -> str:
        """`by_step` key: "1200" for a step, "e3" for an epoch, "none" when the name has neither."""
        if self.epoch is not None:
            return f"e{self.epoch}"
        if self.step is not None:
            return str(self.step)
        return UNSTEPPED_KEY


def step_sort_key(key: str) -> tuple[int, int]:
    """Order `by_step` keys: steps, then epochs, then unstepped."""
    if key == UNSTEPPED_KEY:
        return (2, 0)
    if key.startswith("e"):
        return (1, int(key[1:]))
    return (0, int(key))


def parse_sample_name(path: str | os.PathLike) -> SampleName:
    stem = Path(path).stem
    match = MUSUBI_SAMPLE.match(stem)
    if match:
        tails = [int(t) for t in (match["tail1"], match["tail2"]) if t is not None]
        # musubi always appends the 3-digit image number; the seed comes before it when set.
        seed = tails[0] if len(tails) == 2 else None
        if len(tails) == 1 and len(match["tail1"]) != 3:
            seed = tails[0]
        return SampleName(
            step=int(match["step"]) if match["step"] else None,
            epoch=int(match["epoch"]) if match["epoch"] else None,
            prompt_index=int(match["prompt"]),
            seed=seed,
            timestamp=match["time"],
            layout="musubi",
        )
    match = SEED_SAMPLE.match(stem)
    if match:
        return SampleName(step=int(match["step"]), prompt_index=int(match["index"]), layout="seed_guide")
    return SampleName()


def sample_file_name(output_name: str, prompt_index: int, seed: int | None, *, step: int, epoch: int | None) -> str:
    """musubi's name; the seed only when the prompt file gave one (`--d`), then the image number
    `_000` that musubi's save_images_grid appends to every image."""
    when = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
    suffix = f"_{seed}" if seed is not None else ""
    return f"{output_name}_{when}_{prompt_index:02d}_{stamp}{suffix}_000.png"


def musubi_controls(targets: Iterable[Path], controls: Iterable[Path]) -> dict[Path, list[Path]]:
    """musubi-tuner's dataset rule: the controls of target `stem.*` are `stem.<ext>` first,
    then `stem_<N>.<ext>` in order of N (so `a_1.png` is a control of `a` and of `a_1`)."""
    candidates: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted(controls):
        candidates.setdefault(path.stem, []).append((-1, path))
        match = _NUMBERED_CONTROL.match(path.stem)
        if match:
            candidates.setdefault(match["stem"], []).append((int(match["index"]), path))
    return {
        target: [path for _, path in sorted(candidates.get(target.stem, []), key=lambda pair: pair[0])]
        for target in targets
    }


_EPOCH_CHECKPOINT = re.compile(r"^(?P<name>.+)-(?P<epoch>\d{6})$")
_STEP_CHECKPOINT = re.compile(r"^(?P<name>.+)-step(?P<step>\d{8})$")


def step_checkpoint_name(output_name: str, step: int) -> str:
    """The stem of the checkpoint saved at `step` (its state folder is `{stem}-state`)."""
    return f"{output_name}-step{step:08d}"


def epoch_checkpoint_name(output_name: str, epoch: int) -> str:
    """The stem of the checkpoint saved at the end of `epoch`."""
    return f"{output_name}-{epoch:06d}"


def parse_checkpoint_name(filename: str) -> tuple[str, int | None, int | None, bool]:
    """(output name, step, epoch, final) from a musubi checkpoint file name (folders ignored)."""
    stem = Path(filename.replace("\\", "/")).name
    stem = stem[: -len(".safetensors")] if stem.endswith(".safetensors") else stem
    if m := _STEP_CHECKPOINT.match(stem):
        return m["name"], int(m["step"]), None, False
    if m := _EPOCH_CHECKPOINT.match(stem):
        return m["name"], None, int(m["epoch"]), False
    return stem, None, None, True


def checkpoint_files(folder: str | os.PathLike, output_name: str | None = None) -> list[Path]:
    """The LoRA checkpoint files in `folder` (of the run `output_name` only, when given), by file name:
    hidden files, `-best` copies and links to files outside the folder are not checkpoints."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [
        path
        for path in sorted(folder.glob("*.safetensors"))
        if path.is_file()
        and not path.name.startswith(".")
        and not path.stem.endswith(BEST_SUFFIX)
        and is_within_directory(folder, path)
        and (output_name is None or parse_checkpoint_name(path.name)[0] == output_name)
    ]
