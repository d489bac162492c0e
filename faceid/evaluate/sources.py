"""What an evaluation reads: the sample folder (with its prompt file), or a control and a generated
folder, and reference photos; checked before any work, and kept apart from the outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...common.files import IMAGE_SUFFIXES
from ...musubi_formats.prompts import PromptFileError, load_prompt_file, resolve_prompt_path
from ..errors import FaceEngineError
from ..images import UNSUPPORTED_IMAGE_SUFFIXES, list_images
from .plot import is_evaluation_plot


class EvaluationError(FaceEngineError):
    """Bad evaluation arguments: missing folders, unreadable prompt file, reference without a face."""


@dataclass
class EvaluationSources:
    """Where samples, controls and references come from (the command's flags)."""

    sample_dir: Path | None = None
    sample_prompts: Path | None = None
    control_dir: Path | None = None
    generated_dir: Path | None = None
    references: list[Path] = field(default_factory=list)
    base_dir: Path | None = None  # musubi's working directory, for relative --ci paths
    exclude: list[Path] = field(default_factory=list)  # our own outputs inside the folders (`check_outputs`)

    def check(self) -> None:
        if self.sample_dir is None and self.generated_dir is None:
            raise EvaluationError("give --sample_dir, or --control_dir with --generated_dir")
        if self.sample_dir is not None and self.generated_dir is not None:
            raise EvaluationError("use either --sample_dir or --control_dir/--generated_dir, not both")
        if (self.control_dir is None) != (self.generated_dir is None) and self.sample_dir is None:
            raise EvaluationError("--control_dir and --generated_dir go together")
        if self.control_dir is not None and self.sample_dir is not None:
            raise EvaluationError("--control_dir pairs with --generated_dir; with --sample_dir use --sample_prompts")
        for label, folder in (
            ("--sample_dir", self.sample_dir),
            ("--control_dir", self.control_dir),
            ("--generated_dir", self.generated_dir),
        ):
            if folder is not None and not folder.is_dir():
                raise EvaluationError(f"{label} {folder} is not a folder")
        if self.sample_prompts is not None and not self.sample_prompts.is_file():
            raise EvaluationError(f"--sample_prompts file not found: {self.sample_prompts}")
        for reference in self.references:
            if not reference.is_file():
                raise EvaluationError(f"--reference image not found: {reference}")

    def check_outputs(self, outputs: dict[str, Path | None]) -> None:
        """Refuse outputs (named as the user gave them) that are one and the same file, or that would
        overwrite a file this evaluation reads (a sample, a control, a reference photo, the prompt
        file), symlinks resolved; a plot an earlier evaluation wrote is its own to replace. The
        outputs are then left out of the samples. Call after `check()`, before any work."""
        given = {what: path for what, path in outputs.items() if path is not None}
        claimed: dict[Path, str] = {}
        for what, path in given.items():
            first = claimed.setdefault(path.resolve(), what)
            if first != what:
                raise EvaluationError(f"{first} and {what} are the same file ({path}): give each output its own path")
        inputs = self._input_files()
        for what, path in given.items():
            read_as = inputs.get(path.resolve())
            if read_as is not None and not is_evaluation_plot(path):
                raise EvaluationError(
                    f"{what} {path} is {read_as} of this evaluation; writing there would overwrite "
                    "it: choose another path for the output"
                )
        self.exclude = list(given.values())

    def _input_files(self) -> dict[Path, str]:
        """Every file the evaluation may read (resolved), with what it is to the user."""
        found: dict[Path, str] = {}
        for reference in self.references:
            found.setdefault(reference.resolve(), "a reference photo")
        if self.sample_prompts is not None:
            found.setdefault(self.sample_prompts.resolve(), "the prompt file")
            try:
                prompts = load_prompt_file(self.sample_prompts)
            except PromptFileError as exc:
                raise EvaluationError(str(exc)) from None
            for raw in (raw for prompt in prompts for raw in prompt.control_images):
                path, _ = resolve_prompt_path(raw, self.sample_prompts, self.base_dir)
                if path is not None:
                    found.setdefault(path.resolve(), "a control image of the prompt file")
        for what, folder in (
            ("an image in the sample folder", self.sample_dir),
            ("a control image in", self.control_dir),
            ("an image in the generated folder", self.generated_dir),
        ):
            if folder is not None:
                for path in list_images(folder, suffixes=IMAGE_SUFFIXES | UNSUPPORTED_IMAGE_SUFFIXES):
                    found.setdefault(path.resolve(), f"{what} {folder}")
        return found
