"""The face engine's flags as the faceid commands (`evaluate`, `demo`) spell them, and the settings they give.

Names, defaults, choices and help come from common/face_engine.py, whose table lists every surface's spelling.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..common.face_engine import (
    DEFAULTS,
    DET_SIZE_HELP,
    DET_SIZES,
    DET_THRESH_HELP,
    MODELS_ROOT_HELP,
    PACK_HELP,
    PROVIDER_HELP,
    PROVIDERS,
    FaceEngineSettings,
)
from .pack_download import OFFLINE_ENV


def add_engine_flags(group: argparse._ActionsContainer) -> None:
    """--model_name, --models_root (repeatable), --offline, --device, --det_size and --det_thresh."""
    group.add_argument("--model_name", default=DEFAULTS.pack, help=PACK_HELP)
    group.add_argument("--models_root", type=Path, action="append", help=f"{MODELS_ROOT_HELP}; repeatable")
    group.add_argument(
        "--offline",
        action="store_true",
        help=f"never download a missing standard pack (also: {OFFLINE_ENV}=1); by default it is fetched on first use",
    )
    group.add_argument("--device", choices=PROVIDERS, default=DEFAULTS.provider, help=PROVIDER_HELP)
    group.add_argument(
        "--det_size", default=DEFAULTS.det_size, help=f"{DET_SIZE_HELP}, e.g. {', '.join(map(str, DET_SIZES))}"
    )
    group.add_argument("--det_thresh", type=float, default=DEFAULTS.det_thresh, help=DET_THRESH_HELP)


def engine_settings(args: argparse.Namespace) -> FaceEngineSettings:
    """The settings the flags of `add_engine_flags` give."""
    return FaceEngineSettings(
        pack=args.model_name,
        models_roots=tuple(args.models_root or ()),
        provider=args.device,
        det_size=args.det_size,
        det_thresh=args.det_thresh,
        allow_download=not args.offline,
    )
