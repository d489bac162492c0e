"""`face-consistency packs`: list the InsightFace packs found and say what is wrong with each."""
from __future__ import annotations

import argparse
from typing import Sequence

from .errors import FaceEngineError
from .packs import as_roots, find_pack_folder, list_packs, validate_pack
from .providers import available_providers, installed_onnxruntime


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="face-consistency packs",
        description="List InsightFace model packs under the given roots and ~/.insightface, "
        "check each one, and show which onnxruntime providers are available.",
    )
    parser.add_argument(
        "--models_root", action="append", default=None, metavar="DIR",
        help="a folder holding models/<pack>/ (repeatable), e.g. ComfyUI/models/insightface",
    )
    parser.add_argument(
        "--load", metavar="PACK",
        help="also load PACK with onnxruntime and report the provider that actually runs",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="provider for --load")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    roots = as_roots(args.models_root)
    print("onnxruntime:", ", ".join(installed_onnxruntime()) or "not installed")
    print("available providers:", ", ".join(available_providers()))
    print("searched:", ", ".join(str(r) for r in roots))
    names = list_packs(roots)
    if not names:
        print("no model packs found; put a pack under <root>/models/<pack>/ (see README)")
    problems = 0
    for name in names:
        folder = find_pack_folder(name, roots)
        try:
            files = validate_pack(folder, name)
            print(f"  {name:<14} ok      {files.detector.name} + {files.recognizer.name}  ({folder})")
        except FaceEngineError as exc:
            problems += 1
            print(f"  {name:<14} BROKEN  {exc}")
    if args.load:
        from .model import load_face_model

        try:
            model = load_face_model(args.load, models_root=args.models_root, provider=args.device)
        except FaceEngineError as exc:
            print(f"cannot load {args.load}: {exc}")
            return 1
        info = model.describe()
        print(f"loaded {info['pack']}: provider {info['provider']}, embedding size {info['embedding_size']}")
        if info["provider_note"]:
            print("note:", info["provider_note"])
    return 1 if problems else 0
