"""musubi-tuner sample prompt files: `.txt` lines with `--w --h --s --d --fs --l --n --ci` options.

Parsed the way musubi-tuner's `line_to_prompt_dict` / `load_prompts` parse them, so that a
prompt's index here is the `{prompt:02d}` number musubi writes into sample file names:
blank lines and lines whose first character is `#` are skipped and do not count; a line is
split on " --" and each option is matched by its leading letters. `.json` (a list of
objects) and `.toml` (`[prompt]` with `[[prompt.subset]]`) files use musubi's key names.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.files import TextFileError, read_text_file, tomllib

# option letters -> (SamplePrompt field, pattern, converter), in musubi's matching order
_OPTIONS: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("width", r"w (\d+)", int),
    ("height", r"h (\d+)", int),
    ("frame_count", r"f (\d+)", int),
    ("seed", r"d (\d+)", int),
    ("sample_steps", r"s (\d+)", lambda v: max(1, min(1000, int(v)))),
    ("guidance_scale", r"g ([\d\.]+)", float),
    ("discrete_flow_shift", r"fs ([\d\.]+)", float),
    ("cfg_scale", r"l ([\d\.]+)", float),
    ("negative_prompt", r"n (.+)", str),
    ("image_path", r"i (.+)", str.strip),
    ("end_image_path", r"ei (.+)", str.strip),
    ("control_video_path", r"cn (.+)", str.strip),
    ("control_images", r"ci (.+)", str.strip),
    ("one_frame", r"of (.+)", str.strip),
)
# musubi's dict keys for the fields whose names differ here
_MUSUBI_KEYS = {"control_images": "control_image_path"}


class PromptFileError(ValueError):
    """A prompt file that cannot be read or parsed."""


@dataclass
class SamplePrompt:
    """One sample prompt; `index` is musubi's prompt number (`enum`)."""

    index: int
    prompt: str
    line_number: int | None = None  # 1-based line in a .txt file
    width: int | None = None
    height: int | None = None
    frame_count: int | None = None
    seed: int | None = None
    sample_steps: int | None = None
    guidance_scale: float | None = None
    discrete_flow_shift: float | None = None
    cfg_scale: float | None = None
    negative_prompt: str | None = None
    image_path: str | None = None
    end_image_path: str | None = None
    control_video_path: str | None = None
    one_frame: str | None = None
    control_images: list[str] = field(default_factory=list)  # every `--ci`, in order
    unknown_options: list[str] = field(default_factory=list)  # options musubi ignores too


def parse_prompt_line(line: str, index: int = 0, line_number: int | None = None) -> SamplePrompt:
    """Parse one prompt line (`a photo --w 1024 --h 1024 --ci face.png`)."""
    text, *options = line.strip().split(" --")
    parsed = SamplePrompt(index=index, prompt=text, line_number=line_number)
    for option in options:
        for name, pattern, convert in _OPTIONS:
            match = re.match(pattern, option, re.IGNORECASE)
            if not match:
                continue
            try:
                value = convert(match.group(1))
            except ValueError:
                break  # musubi logs and ignores an unparsable value
            if name == "control_images":
                parsed.control_images.append(value)
            else:
                setattr(parsed, name, value)
            break
        else:
            parsed.unknown_options.append(f"--{option}")
    return parsed


def _from_mapping(item: dict[str, Any], index: int) -> SamplePrompt:
    parsed = SamplePrompt(index=index, prompt=str(item.get("prompt", "")))
    for name, _, _ in _OPTIONS:
        value = item.get(_MUSUBI_KEYS.get(name, name))
        if value is None:
            continue
        if name == "control_images":
            parsed.control_images = [str(v) for v in (value if isinstance(value, list) else [value])]
        else:
            setattr(parsed, name, value)
    return parsed


def parse_prompt_text(text: str) -> list[SamplePrompt]:
    """Prompts of a .txt prompt file's contents."""
    prompts: list[SamplePrompt] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        prompts.append(parse_prompt_line(line, index=len(prompts), line_number=number))
    return prompts


def load_prompt_file(path: str | os.PathLike) -> list[SamplePrompt]:
    """Read a musubi prompt file (.txt; .json and .toml as musubi reads them)."""
    path = Path(path)
    try:
        text = read_text_file(path, "prompt file")
    except FileNotFoundError:
        raise PromptFileError(f"prompt file not found: {path}") from None
    except TextFileError as exc:
        raise PromptFileError(str(exc)) from None
    except OSError as exc:
        raise PromptFileError(f"cannot read prompt file {path}: {exc}") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"prompt file {path} is not valid JSON: {exc}") from None
        if not isinstance(items, list):
            raise PromptFileError(f"prompt file {path} must hold a JSON list of prompts")
        for i, item in enumerate(items):
            if not isinstance(item, (str, dict)):
                raise PromptFileError(
                    f"prompt file {path}: item {i} is {json.dumps(item)[:60]}, not a prompt; each item must be an "
                    'object such as {"prompt": "...", "control_image_path": ["face.png"]} or a prompt line'
                )
        return [
            parse_prompt_line(item, index=i) if isinstance(item, str) else _from_mapping(item, i)
            for i, item in enumerate(items)
        ]
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
            base = {k: v for k, v in data["prompt"].items() if k != "subset"}
            return [_from_mapping({**base, **subset}, i) for i, subset in enumerate(data["prompt"]["subset"])]
        except (tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
            raise PromptFileError(
                f"prompt file {path} is not a musubi TOML prompt file ([prompt] with [[prompt.subset]]): {exc}"
            ) from None
    return parse_prompt_text(text)


def resolve_prompt_path(
    raw: str, prompt_file: str | os.PathLike | None = None, base_dir: str | os.PathLike | None = None
) -> tuple[Path | None, list[Path]]:
    """Find the file a `--ci`/`--i` path names: (found path or None, every path tried).

    musubi opens the path as written, so a relative path is relative to the trainer's working
    directory: `base_dir` (default: the current directory) is tried first, then the prompt
    file's folder, where users often keep their control images beside the prompts.
    """
    path = Path(raw).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [Path(base_dir or os.getcwd()) / path]
        if prompt_file is not None:
            beside_prompts = Path(prompt_file).resolve().parent / path
            if beside_prompts.resolve() != candidates[0].resolve():
                candidates.append(beside_prompts)
    for candidate in candidates:
        if candidate.is_file():
            return candidate, candidates
    return None, candidates
