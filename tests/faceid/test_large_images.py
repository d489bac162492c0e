"""Images far larger than detection needs: decoded downscaled, in 8 bits, one at a time.

A 13000 x 13000 RGBA PNG is a small file (its pixels are mostly one colour) but 676 MB of
decoded pixels; converted to float before it was downscaled, one `analyze()` took 9.4 GB and
`evaluate` with three of them died without a report. Peak memory is measured in a child
process (its own VmHWM: `ru_maxrss` would include the test process's, inherited through fork).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from evaluate_fixtures import reencode
from face_consistency.faceid.images import MAX_ANALYSIS_SIDE, load_image
from PIL import Image

pytestmark = pytest.mark.large_image

LARGE_SIDE = 13000
# Decoding holds the file's full-size 8-bit pixels once (13000^2 x 4 bytes = 645 MiB); the model,
# onnxruntime and Python take ~200 MiB more: measured 870 MiB for one file, 1.1 GiB for `evaluate`
# with three. A float copy of the image alone would be 1.9 GiB.
PEAK_LIMIT_MIB = 1400
FACE_AT = (LARGE_SIDE // 2, LARGE_SIDE // 2)  # where the photo (enlarged 4x) goes

MEASURE = """
import json, resource, sys
from face_consistency.faceid import load_face_model
from face_consistency.faceid.evaluate import cli as evaluate_cli
if sys.argv[1] == "analyze":
    model = load_face_model("testpack", models_root=sys.argv[2], provider="cpu")
    result = model.analyze([sys.argv[3]])[0]
    print(json.dumps({"ok": result.ok, "reason": result.reason, "size": result.image_size,
                      "bbox": [float(v) for v in result.face.bbox]}))
else:
    print(json.dumps({"rc": evaluate_cli.main(sys.argv[2:])}))
try:  # the peak of this program: ru_maxrss carries over the forking parent's (pytest's) across exec
    with open("/proc/self/status") as status:
        peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
except OSError:
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
print(json.dumps({"peak_mib": peak_kib / 1024}))
"""


@pytest.fixture(scope="module")
def large_png(tmp_path_factory, faces_dir) -> Path:
    """A 13000 x 13000 RGBA PNG, transparent but for a photo of a face in the middle."""
    path = tmp_path_factory.mktemp("large") / "large.png"
    canvas = Image.new("RGBA", (LARGE_SIDE, LARGE_SIDE), (30, 200, 40, 0))
    with Image.open(faces_dir / "obama.jpg") as photo:
        face = photo.convert("RGBA").resize((photo.width * 4, photo.height * 4))
    canvas.paste(face, FACE_AT)
    canvas.save(path, compress_level=1)
    del canvas
    return path


def _measured(*args: str) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_large_rgba_png_is_analysed_downscaled_within_memory(large_png, insightface_root):
    result, memory = _measured("analyze", str(insightface_root), str(large_png))
    assert (result["ok"], result["reason"], result["size"]) == (True, None, [LARGE_SIDE, LARGE_SIDE])
    x1, y1, x2, y2 = result["bbox"]  # in the file's own pixels, inside the pasted photo
    assert FACE_AT[0] < x1 < x2 < LARGE_SIDE and FACE_AT[1] < y1 < y2 < LARGE_SIDE and x2 - x1 > 500
    assert memory["peak_mib"] < PEAK_LIMIT_MIB, memory


def test_evaluate_with_three_large_samples_writes_its_report(large_png, insightface_root, faces_dir, tmp_path):
    controls, generated = tmp_path / "controls", tmp_path / "generated"
    for name in ("a", "b", "c"):
        reencode(faces_dir / "obama2.jpg", controls / f"{name}.png")
        generated.mkdir(exist_ok=True)
        shutil.copy(large_png, generated / f"{name}.png")
    out = tmp_path / "report.json"
    result, memory = _measured(
        "evaluate",
        "--control_dir",
        str(controls),
        "--generated_dir",
        str(generated),
        "--output_json",
        str(out),
        "--model_name",
        "testpack",
        "--models_root",
        str(insightface_root),
        "--device",
        "cpu",
        "--quiet",
    )
    assert result == {"rc": 0}
    report = json.loads(out.read_text())
    assert report["valid_pairs"] == 3 and all(p["score_control"] > 0.3 for p in report["pairs"])
    assert all(p["face"]["bbox"][0] > FACE_AT[0] for p in report["pairs"])  # the file's own pixels
    # worker threads decode side by side, but a large file only one at a time
    assert memory["peak_mib"] < PEAK_LIMIT_MIB, memory


def test_transparent_pixels_composite_on_white_as_in_float(tmp_path):
    """The 8-bit compositing gives what the float formula gave, to the rounding."""
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (64, 48, 4), dtype=np.uint8)
    values = rgba.astype(np.float64) / 255.0
    expected = ((values[..., :3] * values[..., 3:] + 1.0 - values[..., 3:]) * 255.0 + 0.5).astype(np.uint8)
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    assert np.array_equal(load_image(path)[..., ::-1], expected)
    assert np.array_equal(load_image(rgba)[..., ::-1], expected)


@pytest.mark.parametrize("mode", ["P", "L", "I;16", "RGB"])
def test_large_files_of_other_modes_are_decoded_downscaled(tmp_path, mode):
    side = MAX_ANALYSIS_SIDE * 2 + 10
    path = tmp_path / f"large_{mode.replace(';', '')}.png"
    extra = {"exif": Image.Exif().tobytes()} if mode == "RGB" else {}  # an EXIF chunk: Pillow decodes it
    Image.new(mode, (side, side // 2)).save(path, **extra)
    bgr = load_image(path)
    assert bgr.shape == (MAX_ANALYSIS_SIDE // 2, MAX_ANALYSIS_SIDE, 3) and bgr.dtype == np.uint8


def test_large_rotated_jpeg_reports_its_size_as_seen(tmp_path):
    from face_consistency.faceid.images import load_image_sized

    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (9000, 5000), (120, 110, 100)).save(path, exif=exif.tobytes())
    bgr, original = load_image_sized(path)
    assert original == (5000, 9000) and max(bgr.shape[:2]) <= MAX_ANALYSIS_SIDE and bgr.shape[0] > bgr.shape[1]
