"""`face-consistency demo`: a first result without data of one's own, from the photos insightface ships.

insightface's wheel holds a group photo of six people (`data/images/t1.jpg`) and one face crop of a
seventh (`Tom_Hanks_54745.png`). The demo matches the six people of the group photo to the faces of its
mirror image, where everyone has moved to the other side, one to one (what the Face Match node does to
an edit with several people), and scores other people against each other: the same person scores
high, other people low, and that gap is what `face-consistency evaluate` measures in a training run's
samples. Exit codes: 0 every person was found at their mirrored place; 1 not; 2 no model pack or no photos.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..common.cli_help import ChoicesAndDefaultsFormatter
from .engine_flags import add_engine_flags, engine_settings
from .errors import FaceEngineError
from .images import load_image
from .matching import match_faces
from .model import load_face_engine
from .pack_download import TerminalProgress
from .results import DetectedFace
from .similarity import Bands

GROUP_PHOTO = "t1.jpg"
STRANGER_PHOTO = "Tom_Hanks_54745.png"
# a face found at its mirrored place lies within this share of the photo's width of it
PLACE_TOLERANCE = 0.05


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="face-consistency demo",
        formatter_class=ChoicesAndDefaultsFormatter,
        description="Score the photos shipped inside insightface: the six people of its group photo against "
        "its mirror image (multi-person matching), and different people against each other. Needs no data "
        "of your own; the first run downloads the model pack as every command does.",
    )
    add_engine_flags(parser)
    return parser


def insightface_photos() -> Path:
    """The folder of the photos in the installed insightface package."""
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        raise FaceEngineError("insightface is not installed: pip install insightface")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "images"
    missing = [name for name in (GROUP_PHOTO, STRANGER_PHOTO) if not (folder / name).is_file()]
    if missing:
        raise FaceEngineError(f"{folder} lacks {', '.join(missing)}: this insightface ships other photos")
    return folder


def _centre_x(face: DetectedFace) -> float:
    return float(face.bbox[0] + face.bbox[2]) / 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        folder = insightface_photos()
        model = load_face_engine(engine_settings(args), progress=TerminalProgress())
    except FaceEngineError as exc:
        print(f"face-consistency demo: error: {exc}", file=sys.stderr)
        return 2
    print(f"insightface's photos: {folder}")
    print(f"model {model.pack_name} ({model.embedding_size}-d) on {model.provider}")
    group = load_image(folder / GROUP_PHOTO, "bgr")
    mirror = np.ascontiguousarray(group[:, ::-1])
    people, mirrored = model.analyze([group, mirror], all_faces=True, channel_order="bgr")
    width = group.shape[1]
    print(
        f"{GROUP_PHOTO}: {len(people.faces)} people; its mirror image, where everyone has moved to the other "
        f"side: {len(mirrored.faces)} faces"
    )
    assignment = match_faces(
        np.stack([f.embedded() for f in people.faces]), np.stack([f.embedded() for f in mirrored.faces])
    )
    bands = Bands()
    print(f"  {'person':<8} {'at x':>6}  {'found at x':>10}  {'similarity':>10}  band")
    in_place = 0
    for match in assignment.matches:
        person, found = people.faces[match.reference_index], mirrored.faces[match.output_index]
        right = abs(_centre_x(found) - (width - _centre_x(person))) <= PLACE_TOLERANCE * width
        in_place += right
        print(
            f"  {match.reference_index + 1:<8} {_centre_x(person):>6.0f}  {_centre_x(found):>10.0f}  "
            f"{match.similarity:>10.3f}  {bands.label(match.similarity)}{'' if right else '  (NOT its mirrored place)'}"
        )
    print(f"{in_place} of {len(people.faces)} people found at their mirrored place")
    others = [float(np.dot(a.embedded(), b.embedded())) for a, b in itertools.combinations(people.faces, 2)]
    if others:
        print(f"different people of {GROUP_PHOTO}: mean {np.mean(others):.3f}, highest {max(others):.3f}")
    stranger = model.analyze([folder / STRANGER_PHOTO])[0]
    if stranger.embedding is not None and people.faces:
        highest = max(float(np.dot(stranger.embedding, f.embedded())) for f in people.faces)
        print(f"{STRANGER_PHOTO} (not in {GROUP_PHOTO}) against its {len(people.faces)} people: highest {highest:.3f}")
    else:
        print(f"{STRANGER_PHOTO}: {stranger.reason}")
    print(
        "The same person scores high, other people low: `face-consistency evaluate` measures that score "
        "between your samples and their control images."
    )
    return 0 if people.faces and in_place == len(people.faces) else 1
