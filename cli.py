"""`face-consistency` command line: one subcommand per module, each owning its own parser."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module relative to this package, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "packs": (".faceid.packs_cli", "list and check InsightFace model packs"),
    "evaluate": (".faceid.evaluate.cli", "score sample folders against controls/references; JSON report and plot"),
    "demo": (".faceid.demo_cli", "score the photos shipped inside insightface: a first result without data"),
    "train": (".trainer.cli", "train a Qwen-Image-Edit LoRA (musubi-tuner flags) with an optional face-identity loss"),
    "setup-trainer": (
        ".training_jobs.trainer_env_cli",
        "install the trainer's libraries into the pack's own environment (for ComfyUI)",
    ),
}


def _usage() -> str:
    lines = ["usage: face-consistency <command> [options]", "", "commands:"]
    lines += [f"  {name:<13} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    lines += ["", "Run `face-consistency <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from .common.version import __version__

        print(__version__)
        return 0
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        print(f"face-consistency: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0], __package__)
    return int(module.main(rest) or 0)
