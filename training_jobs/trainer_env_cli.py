"""`face-consistency setup-trainer` (also `python <pack>/bootstrap.py setup-trainer`): install the trainer's
libraries into the pack's own environment, show what it would install, or which Python training runs with."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from ..training_contract import libraries
from . import trainer_env
from .trainer_env import TrainerEnvironmentError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="face-consistency setup-trainer",
        description="Install the trainer's libraries (requirements-trainer.txt: diffusers, transformers, peft, "
        "accelerate, bitsandbytes, onnx2torch at the tested versions) into the pack's own trainer environment, "
        "for training jobs launched from ComfyUI. Run it with ComfyUI's Python; it reuses that Python's torch "
        "and changes none of its packages. Replaces an earlier environment in the same folder.",
    )
    parser.add_argument(
        "--path",
        metavar="DIR",
        help=f"the environment's folder (default: ${trainer_env.ENV_VARIABLE}, else <pack>/trainer_env); "
        f"ComfyUI finds it there (set {trainer_env.ENV_VARIABLE} for ComfyUI too when you choose another)",
    )
    parser.add_argument(
        "--layout",
        choices=trainer_env.LAYOUTS,
        default="auto",
        help="venv: a virtualenv that sees ComfyUI's packages; target: a package folder put first on the "
        "trainer's path (for Pythons without venv, as in portable Windows builds); auto: venv where it can",
    )
    parser.add_argument("--index-url", metavar="URL", help="pip's package index (default: pip's own setting)")
    parser.add_argument(
        "--find-links",
        action="append",
        default=[],
        metavar="DIR_OR_URL",
        help="also look for wheels here (repeatable), e.g. a folder of downloaded wheels",
    )
    parser.add_argument("--no-index", action="store_true", help="use only --find-links (offline)")
    actions = parser.add_mutually_exclusive_group()
    actions.add_argument(
        "--dry-run",
        action="store_true",
        help="show what the environment would hold (pip's dry run) and install nothing",
    )
    actions.add_argument(
        "--check",
        action="store_true",
        help="show which Python a training job launched now would run with, and its libraries",
    )
    actions.add_argument(
        "--libraries",
        action="store_true",
        help="import the trainer's libraries with this Python and print their versions as JSON",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.libraries:
        for name in libraries.REQUIRED:
            importlib.import_module(name)  # an import that fails ends here, with its traceback
        print(json.dumps(libraries.versions()))
        return 0
    try:
        if args.check:
            runtime = trainer_env.trainer_runtime(args.path)
            print(f"training jobs run with {runtime.description}:")
            print("\n".join(f"  {line}" for line in libraries.describe(trainer_env.probe(runtime))))
        elif args.dry_run:
            trainer_env.dry_run(index_url=args.index_url, find_links=args.find_links, no_index=args.no_index)
        else:
            trainer_env.set_up(
                args.path,
                layout=args.layout,
                index_url=args.index_url,
                find_links=args.find_links,
                no_index=args.no_index,
            )
    except TrainerEnvironmentError as exc:
        print(f"face-consistency setup-trainer: error: {exc}", file=sys.stderr)
        return 1
    return 0
