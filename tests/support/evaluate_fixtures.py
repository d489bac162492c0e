"""Sample folders for the folder-evaluation tests, built in temporary directories from the real photos.

Photos are re-encoded downscaled (the detector then runs at a small size and the tests stay
fast on two cores); nothing is written into the repository.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SAMPLE_SIDE = 400  # longest side of the re-encoded photos
TIME = "20250101120000"


def reencode(source: Path, target: Path, side: int = SAMPLE_SIDE, mirror: bool = False) -> Path:
    with Image.open(source) as img:
        img = img.convert("RGB")
        img.thumbnail((side, side), Image.Resampling.LANCZOS)
        if mirror:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        target.parent.mkdir(parents=True, exist_ok=True)
        img.save(target)
    return target


def no_face_image(target: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(90, 110, (300, 300, 3), dtype=np.uint8)).save(target)
    return target


def corrupt_image(target: Path) -> Path:
    target.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return target


def one_sample_run(root: Path, faces: Path) -> tuple[Path, Path, Path]:
    """A musubi sample folder with one sample (obama2) whose prompt's --ci is obama: (folder, sample, prompt file)."""
    sample_dir = root / "sample"
    sample_dir.mkdir()
    sample = sample_dir / "tiny_000002_00_20260101000000_100.png"
    Image.open(faces / "obama2.jpg").convert("RGB").save(sample)
    prompts = root / "prompts.txt"
    prompts.write_text(f"an edit --w 32 --h 32 --d 100 --ci {faces / 'obama.jpg'}\n", encoding="utf-8")
    return sample_dir, sample, prompts


def validate_schema(instance: Any, schema: dict[str, Any], where: str = "report") -> list[str]:
    """Check `instance` against the JSON-Schema subset REPORT_SCHEMA uses; returns the problems."""
    problems: list[str] = []
    if "enum" in schema and instance not in schema["enum"]:
        problems.append(f"{where}: {instance!r} not in {schema['enum']}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        checks = {
            "object": lambda v: isinstance(v, dict),
            "array": lambda v: isinstance(v, list),
            "string": lambda v: isinstance(v, str),
            "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "boolean": lambda v: isinstance(v, bool),
            "null": lambda v: v is None,
        }
        if not any(checks[t](instance) for t in types):
            return [*problems, f"{where}: {instance!r} is not of type {types}"]
    if "minimum" in schema and isinstance(instance, (int, float)) and instance < schema["minimum"]:
        problems.append(f"{where}: {instance} < {schema['minimum']}")
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            if key not in instance:
                problems.append(f"{where}: missing {key!r}")
        properties = schema.get("properties", {})
        for key, value in instance.items():
            if key in properties:
                problems += validate_schema(value, properties[key], f"{where}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                problems += validate_schema(value, schema["additionalProperties"], f"{where}.{key}")
    if isinstance(instance, list) and "items" in schema:
        for i, item in enumerate(instance):
            problems += validate_schema(item, schema["items"], f"{where}[{i}]")
    return problems


def build_musubi_folder(root: Path, faces: Path) -> dict[str, Path]:
    """A musubi-style run: prompt file with two controls, samples at steps 100/200, epoch 1, failures.

    prompt 0: control obama (relative --ci, resolved beside the prompt file)
    prompt 1: control biden (absolute --ci)
    prompt 2: two controls, obama and obama2 (identity from both)
    prompt 3: a --ci that does not exist
    """
    controls = root / "controls"
    paths = {
        "control_obama": reencode(faces / "obama.jpg", controls / "obama.png"),
        "control_biden": reencode(faces / "biden.jpg", controls / "biden.png"),
        "control_obama2": reencode(faces / "obama2.jpg", controls / "obama2.png"),
    }
    prompts = root / "prompts.txt"
    prompts.write_text(
        "# sample prompts for the face LoRA\n"
        "make him smile --w 1024 --h 1024 --s 20 --d 42 --ci controls/obama.png\n"
        "\n"
        f"portrait in a park --w 1024 --h 1024 --fs 2.2 --l 4.0 --ci {paths['control_biden']}\n"
        "# a comment between prompts does not count\n"
        "two references --ci controls/obama.png --ci controls/obama2.png --n blurry\n"
        "lost control --ci controls/does_not_exist.png\n",
        encoding="utf-8",
    )
    sample = root / "sample"
    paths.update(
        prompts=prompts,
        sample_dir=sample,
        s100_p0=reencode(faces / "obama2.jpg", sample / f"face_000100_00_{TIME}_42_000.png"),
        s200_p0=reencode(faces / "obama3.jpg", sample / f"face_000200_00_{TIME}_42_000.png"),
        s100_p1=reencode(faces / "biden.jpg", sample / f"face_000100_01_{TIME}_000.png", mirror=True),
        s200_p1=reencode(faces / "obama.jpg", sample / f"face_000200_01_{TIME}_000.png"),
        s200_p2=reencode(faces / "obama3.jpg", sample / f"face_000200_02_{TIME}_000.png"),
        e1_p0=reencode(faces / "obama_partial_face.jpg", sample / f"face_e000001_00_{TIME}_42_000.png"),
        no_face=no_face_image(sample / f"face_000300_00_{TIME}_42_000.png"),
        corrupt=corrupt_image(sample / f"face_000300_01_{TIME}_000.png"),
        lost_control=reencode(faces / "obama2.jpg", sample / f"face_000100_03_{TIME}_000.png"),
        stray=reencode(faces / "obama2.jpg", sample / "notes.png"),
    )
    return paths
