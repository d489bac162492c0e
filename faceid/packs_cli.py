"""`face-consistency packs`: list the InsightFace packs found and downloadable, check each, fetch one."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..common.cli_help import ChoicesAndDefaultsFormatter
from ..common.face_engine import DEFAULTS, PROVIDERS
from .errors import FaceEngineError, ModelPackError
from .pack_download import OFFLINE_ENV, RELEASES, TerminalProgress, download_dir, download_pack, models_dir_of
from .pack_files import STANDARD_PACKS, validate_pack
from .packs import as_roots, find_pack_folder, list_packs
from .providers import available_providers, installed_onnxruntime


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        formatter_class=ChoicesAndDefaultsFormatter,
        prog="face-consistency packs",
        description="List InsightFace model packs under the given roots and ~/.insightface, and the "
        "standard packs that download on first use; check each one, show which onnxruntime providers "
        "are available, and download a standard pack.",
    )
    parser.add_argument(
        "--models_root",
        action="append",
        default=None,
        metavar="DIR",
        help="a folder holding models/<pack>/ (repeatable), e.g. ComfyUI/models/insightface; "
        "downloads go to the first writable one",
    )
    parser.add_argument(
        "--download",
        choices=STANDARD_PACKS,
        metavar="NAME",
        help=f"download standard pack NAME now ({', '.join(STANDARD_PACKS)}), even with {OFFLINE_ENV} set",
    )
    parser.add_argument(
        "--slim",
        action="store_true",
        help="with --download: keep only the detector and the recognizer (drop the landmark and "
        "gender/age models, which this pack never loads)",
    )
    parser.add_argument(
        "--load",
        metavar="PACK",
        help="also load PACK with onnxruntime and report the provider that actually runs",
    )
    parser.add_argument("--device", default=DEFAULTS.provider, choices=PROVIDERS, help="provider for --load")
    parser.add_argument(
        "--offline", action="store_true", help=f"--load never downloads a missing pack (also: {OFFLINE_ENV}=1)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.slim and not args.download:
        parser.error("--slim goes with --download NAME")
    roots = as_roots(args.models_root)
    if args.download:
        try:
            folder = find_pack_folder(args.download, roots) or download_pack(
                args.download, download_dir(roots), TerminalProgress(), slim=args.slim
            )
            validate_pack(folder, args.download)
        except FaceEngineError as exc:
            print(f"face-consistency packs: error: {exc}")
            return 1
        print(f"{args.download} is installed in {folder}")
    print("onnxruntime:", ", ".join(installed_onnxruntime()) or "not installed")
    print("available providers:", ", ".join(available_providers()))
    print("searched:", ", ".join(str(r) for r in roots))
    names = list_packs(roots)
    if not names:
        print("no model packs installed; put a pack under <root>/models/<pack>/ (see docs/face-models.md)")
    problems = 0
    for name in names:
        pack_folder = find_pack_folder(name, roots)
        try:
            if pack_folder is None:  # removed since it was listed
                raise ModelPackError(f"{name} is no longer in {', '.join(map(str, roots))}")
            files = validate_pack(pack_folder, name)
            print(f"  {name:<14} ok      {files.detector.name} + {files.recognizer.name}  ({pack_folder})")
        except FaceEngineError as exc:
            problems += 1
            print(f"  {name:<14} BROKEN  {exc}")
    missing = [name for name in STANDARD_PACKS if name not in names]
    if missing:
        print(f"downloadable (fetched on first use into {models_dir_of(roots[0])}, or now with --download NAME):")
        for name in missing:
            print(f"  {name:<14} {RELEASES[name].size_label:>7}")
    if args.load:
        from .model import load_face_model

        try:
            model = load_face_model(
                args.load,
                models_root=args.models_root,
                provider=args.device,
                allow_download=not args.offline,
                progress=TerminalProgress(),
            )
        except FaceEngineError as exc:
            print(f"cannot load {args.load}: {exc}")
            return 1
        info = model.describe()
        print(f"loaded {info['pack']}: provider {info['provider']}, embedding size {info['embedding_size']}")
        if info["provider_note"]:
            print("note:", info["provider_note"])
    return 1 if problems else 0
