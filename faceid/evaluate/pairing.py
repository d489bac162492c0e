"""Which generated image is scored against which control image(s).

Three layouts, as users have them:

- musubi-tuner sample folders: `{output_name}_{step:06d}_{prompt:02d}_{YYYYmmddHHMMSS}[_{seed}]_{n:03d}.png`
  (epoch-triggered samples: `e{epoch:06d}` instead of the step; `output_name_` is absent when
  no output name was set). The controls of prompt k are the `--ci` paths on line k of the
  prompt file.
- the seed guide's layout: `control_image_{i}.png` beside `..._step_{N}_{i}.png`.
- two folders (`--control_dir`, `--generated_dir`): a generated `stem.png` gets the controls
  named `stem.<ext>` or `stem_{N}.<ext>` (musubi's dataset rule, shared with the trainer).

Nothing is dropped silently: every image that cannot be paired becomes an `Unpaired` entry
with the file and the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ...musubi_formats.names import SEED_CONTROL, SampleName, musubi_controls, parse_sample_name
from ...musubi_formats.prompts import SamplePrompt, resolve_prompt_path
from ..images import UNSUPPORTED_IMAGE_SUFFIXES, list_images, unsupported_format_reason


@dataclass
class SampleItem:
    """One generated image and the control images whose identity it should keep."""

    image: Path
    name: SampleName
    controls: list[Path] = field(default_factory=list)


@dataclass
class Unpaired:
    file: str
    reason: str
    kind: str = "sample"  # "sample" or "control"

    def to_dict(self) -> dict[str, str]:
        return {"file": self.file, "kind": self.kind, "reason": self.reason}


@dataclass
class Pairing:
    items: list[SampleItem] = field(default_factory=list)
    unpaired: list[Unpaired] = field(default_factory=list)


def unsupported_images(folder: Path, kind: str = "sample") -> list[Unpaired]:
    """Images in `folder` of a format the engine cannot read (GIF, HEIC, ...), as failures."""
    return [
        Unpaired(str(p), unsupported_format_reason(p), kind)
        for p in list_images(folder, suffixes=UNSUPPORTED_IMAGE_SUFFIXES)
    ]


def pair_sample_folder(
    sample_dir: Path,
    prompts: Sequence[SamplePrompt] | None = None,
    prompt_file: Path | None = None,
    have_reference: bool = False,
    exclude: Iterable[Path] = (),
    base_dir: Path | None = None,
) -> Pairing:
    """Pair a musubi sample folder (and/or the seed guide's layout) with its controls.

    With a reference identity, a sample without a control is still scored (against the
    reference); without one, it is reported as unpaired.
    """
    pairing = Pairing(unpaired=unsupported_images(sample_dir))
    files = list_images(sample_dir, exclude)
    seed_controls = {int(m["index"]): p for p in files if (m := SEED_CONTROL.match(p.stem))}
    prompt_controls: dict[int, list[Path]] = {}
    prompt_problems: dict[int, str] = {}
    for prompt in prompts or ():
        found: list[Path] = []
        for raw in prompt.control_images:
            path, tried = resolve_prompt_path(raw, prompt_file, base_dir)
            if path is None:
                where = f"line {prompt.line_number}" if prompt.line_number else f"prompt {prompt.index}"
                pairing.unpaired.append(
                    Unpaired(raw, f"--ci of {where} not found (tried {', '.join(map(str, tried))})", "control")
                )
            else:
                found.append(path)
        prompt_controls[prompt.index] = found
        if not found:
            prompt_problems[prompt.index] = (
                "its prompt's --ci control image(s) were not found"
                if prompt.control_images
                else "its prompt has no --ci control image"
            )
    for path in files:
        if SEED_CONTROL.match(path.stem):
            continue
        name = parse_sample_name(path)
        if name.layout == "unknown":
            pairing.unpaired.append(Unpaired(str(path), "name matches no sample pattern (musubi or seed guide)"))
            continue
        controls: list[Path] = []
        problem = None
        if name.layout == "seed_guide" and name.prompt_index is not None:  # the seed guide's names always have it
            control = seed_controls.get(name.prompt_index)
            if control is not None:
                controls = [control]
            else:
                problem = f"control_image_{name.prompt_index}.png not found beside it"
        elif prompts is None:
            problem = "no --sample_prompts file to find its control image"
        elif name.prompt_index not in prompt_controls:
            problem = (
                f"prompt index {name.prompt_index} is beyond the {len(prompt_controls)} prompt(s) of the prompt file"
            )
        else:
            controls = prompt_controls[name.prompt_index]
            problem = prompt_problems.get(name.prompt_index)
        if controls or have_reference:
            pairing.items.append(SampleItem(path, name, controls))
        else:
            pairing.unpaired.append(Unpaired(str(path), problem or "no control image"))
    return pairing


def pair_dirs(
    control_dir: Path, generated_dir: Path, exclude: Iterable[Path] = (), have_reference: bool = False
) -> Pairing:
    """Pair each `generated_dir/stem.*` with its controls in `control_dir` (`musubi_controls`)."""
    pairing = Pairing(unpaired=unsupported_images(generated_dir) + unsupported_images(control_dir, "control"))
    generated = list_images(generated_dir, exclude)
    controls = list_images(control_dir, exclude)
    claimed = musubi_controls(generated, controls)
    remaining = set(controls).difference(*claimed.values())
    for path in generated:
        name = parse_sample_name(path)
        name = SampleName(name.step, name.epoch, name.prompt_index, name.seed, "dir_pair")
        if claimed[path] or have_reference:
            pairing.items.append(SampleItem(path, name, claimed[path]))
        else:
            pairing.unpaired.append(
                Unpaired(str(path), f"no control named {path.stem}.<ext> or {path.stem}_<N>.<ext> in {control_dir}")
            )
    for control in sorted(remaining):
        pairing.unpaired.append(
            Unpaired(str(control), f"no generated image in {generated_dir} for this control", "control")
        )
    return pairing
